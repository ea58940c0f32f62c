"""An existing split file (image -> train/val/test) used instead of ours (`data.split_file`),
so that scores are comparable with other models tested on the same images.

Shapes read (JSON):

- the FADA team's ``dataset_splits.json``: ``{"splits": {"train": {"<Category>":
  ["<Category>/<image>", ...]}, "val": {...}, "test": {...}}}``;
- parts as lists: ``{"train": [...], "val": [...], "test": [...]}`` (our own `split.json`);
- one part per image: ``{"<image>": "train", ...}``.

An entry may carry its category as a folder (``Abdomen/abd_001.png``) or as the key it is
listed under; entries of other categories are ignored. Images are matched to the category's
usable images by name, with or without extension, case-insensitively.

Decisions, each reported as a problem of the category (code, severity):

- An entry naming no usable image of the category (``split_image_unknown``, warning): the
  count and the first names; it cannot be trained nor scored.
- An image listed twice (``split_image_duplicate``, warning): in one part, once kept; in two
  parts, left out of every part, since which one was meant is unknown and a test image that
  is also trained on would inflate its scores.
- A usable image the file does not list (``split_image_unlisted``, warning): it goes to
  train, so the test images stay exactly the file's.
- A file that cannot be read or has none of these shapes (``split_file_unreadable``, error).

The split used is written to the category's `split.json` like ours, with its source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fada_batch.data.categories import Category, category_key
from fada_batch.data.images import name_key
from fada_batch.data.problems import Problem, make_problem, shorten
from fada_batch.data.split import Split
from fada_batch.text import plural

PARTS = ("train", "val", "test")
SHOWN = 5  # names quoted in a message


class SplitFileError(ValueError):
    """The split file cannot be read or has no known shape."""


def _entries(raw: Any) -> list[tuple[str, str | None, str]]:
    """(part, category or None, image entry) for every entry of a parsed split file."""
    if isinstance(raw, dict) and isinstance(raw.get("splits"), dict):
        raw = raw["splits"]
    out: list[tuple[str, str | None, str]] = []
    if isinstance(raw, dict) and any(k in raw for k in PARTS):
        for part in PARTS:
            value = raw.get(part, [])
            if isinstance(value, dict):  # category -> images
                out += [(part, str(cat), str(img)) for cat, imgs in value.items() for img in imgs]
            elif isinstance(value, list):
                out += [(part, None, str(img)) for img in value]
            else:
                raise SplitFileError(
                    f"part {part!r} is neither a list of images nor a category -> images mapping"
                )
        return out
    if isinstance(raw, dict) and raw and all(isinstance(v, str) for v in raw.values()):
        bad = sorted({v for v in raw.values() if v not in PARTS})
        if bad:
            raise SplitFileError(
                f"parts must be train, val or test; found {', '.join(map(repr, bad[:SHOWN]))}"
            )
        return [(part, None, str(img)) for img, part in raw.items()]
    raise SplitFileError("none of the known shapes ({'splits': {...}}, {'train': [...], ...}, {image: part})")


def read_split_entries(path: Path) -> list[tuple[str, str | None, str]]:
    """Parse a split file into (part, category or None, image entry).

    Raises:
        SplitFileError: naming the file, what is wrong and the shapes accepted.
    """
    try:
        return _entries(json.loads(path.read_text("utf-8")))
    except (OSError, ValueError) as exc:  # JSONDecodeError and SplitFileError are ValueErrors
        raise SplitFileError(f"{path}: {shorten(str(exc), 300)}") from exc


def _belongs(category: Category, listed_under: str | None, entry: str) -> tuple[bool, str]:
    """Whether an entry is this category's, and its image name (any folder prefix removed)."""
    folder, _, name = entry.replace("\\", "/").rpartition("/")
    owner = listed_under or (folder.rsplit("/", 1)[-1] if folder else None)
    if owner is None:
        return True, name
    keys = {category_key(n) for n in category.all_names()}
    return category_key(owner) in keys, name


def split_from_file(
    path: Path,
    category: Category,
    image_names: list[str],
    *,
    seed: int,
    fractions: tuple[float, float, float],
) -> tuple[Split, list[Problem]]:
    """The split of `image_names` (the category's usable images) that the file gives, and
    the problems found (module docstring); raises `SplitFileError` for an unreadable file."""
    entries = read_split_entries(path)
    by_key = {name_key(n): n for n in image_names}
    parts_of: dict[str, list[str]] = {}
    unknown: list[str] = []
    for part, cat, entry in entries:
        mine, name = _belongs(category, cat, entry)
        if not mine:
            continue
        image = by_key.get(name_key(name))
        if image is None:
            unknown.append(entry)
        else:
            parts_of.setdefault(image, []).append(part)
    problems = _problems(path, category, unknown, parts_of, image_names)
    chosen = {img: parts[0] for img, parts in parts_of.items() if len(set(parts)) == 1}
    for img in image_names:
        if img not in parts_of:
            chosen[img] = "train"
    lists = {part: sorted(i for i, p in chosen.items() if p == part) for part in PARTS}
    split = Split(**lists, seed=seed, fractions=fractions, source=str(path))
    return split, problems


def _problems(
    path: Path, category: Category, unknown: list[str], parts_of: dict[str, list[str]], image_names: list[str]
) -> list[Problem]:
    """The warnings of one category's use of the split file."""
    out: list[Problem] = []

    def listed(names: list[str]) -> str:
        return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")

    if unknown:
        out.append(
            make_problem(
                "split_image_unknown",
                f"{plural(len(unknown), 'entry', 'entries')} of {category.name} in the split file name no usable "
                f"image of the category: {listed(unknown)}; they are neither trained nor scored.",
                fix="correct the names in the split file, or the images/labels they refer to; "
                "nothing if those images were left out of the data on purpose.",
                file=path,
            )
        )
    twice = sorted(i for i, p in parts_of.items() if len(p) > 1)
    conflicting = [i for i in twice if len(set(parts_of[i])) > 1]
    if twice:
        out.append(
            make_problem(
                "split_image_duplicate",
                f"{plural(len(twice), 'image')} of {category.name} listed more than once in the split file: "
                f"{listed(twice)}; {len(conflicting)} of them in different parts, left out of every part.",
                fix="list each image once, in one part.",
                file=path,
            )
        )
    unlisted = [n for n in image_names if n not in parts_of]
    if unlisted:
        out.append(
            make_problem(
                "split_image_unlisted",
                f"{plural(len(unlisted), 'usable image')} of {category.name} the split file does not list: "
                f"{listed(unlisted)}; they go to train, so the test images stay the file's.",
                fix="add them to the split file if they should be held out; nothing otherwise.",
                file=path,
            )
        )
    return out
