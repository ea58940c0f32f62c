"""One category's question/answer samples, split by image: what training and evaluation read.

    cs = prepare_data(cfg, category, out_dir, resuming=False)   # -> CategorySamples

The sheet and images are loaded and checked (`dataset.load_category`), the first
`data.num_images` are taken, and they are split by image (`split.json`, reused while it still
fits the data and the split settings). Every non-empty answer becomes one `Sample`: one question
about one image, with its prompt and reference answer. Token ids come later (`training.collate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fada_batch.config import JobConfig, normalize_level
from fada_batch.data.categories import Category
from fada_batch.data.dataset import load_category, load_workbook
from fada_batch.data.given_split import SplitFileError, split_from_file
from fada_batch.data.split import Split, make_split, read_split, write_split
from fada_batch.data.workbook_cache import CACHE_DIRNAME

log = logging.getLogger(__name__)


class DataError(RuntimeError):
    """The category's data has blocking problems (listed in the message)."""


@dataclass(frozen=True)
class Sample:
    """One question about one image, with its reference answer."""

    image: str  # image name (key of the feature cache and of split.json)
    question_index: int  # 0..7 (Q1..Q8)
    prompt: str  # the formatted prompt, e.g. "Question: ... Answer:"
    answer: str


@dataclass
class CategorySamples:
    """Everything training and evaluation need from the data side."""

    split: Split
    image_paths: dict[str, Path]  # image name -> file
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    questions: list[str]
    data: Any  # dataset.CategoryData (for counts and problems)


def samples_for(records: list[Any], names: set[str], questions: list[str], template: str) -> list[Sample]:
    """One sample per non-empty answer of each image in `names` (sheet order)."""
    out = []
    for rec in records:
        if rec.image_name not in names:
            continue
        for qi, answer in enumerate(rec.answers):
            if answer:
                out.append(Sample(rec.image_name, qi, template.format(question=questions[qi]), answer))
    return out


def blocking_text(category: Category, data: Any) -> str:
    """A category's blocking data problems, worded as `fada-batch validate` words them."""
    errors = [p for p in data.problems if p.severity == "error"]
    lines = "\n".join(f"  - {p.message}" for p in errors) or f"  - status {data.status}"
    return f"{category.name}: the data cannot be used:\n{lines}"


def split_file_path(cfg: JobConfig) -> Path | None:
    """`data.split_file` as a path (relative to `data.root`), or None when the job has none."""
    if not cfg.data.split_file:
        return None
    path = Path(cfg.data.split_file)
    return path if path.is_absolute() else Path(cfg.data.root) / path


def workbook_cache_dir(cfg: JobConfig) -> Path | None:
    """Where the master workbook's cell values are kept between the tasks of a run
    (`fada_batch.data.workbook_cache`): `{output.root}/.cache/workbook/`, beside the outputs
    every task writes, so the array's tasks share it. None (no cache) while the output root
    does not exist: a `validate` before any run leaves nothing behind, and `submit` makes
    the root before its pre-flight, which so fills the cache for the array's tasks."""
    root = Path(cfg.output.root)
    return root / CACHE_DIRNAME if root.is_dir() else None


def _fresh_split(
    cfg: JobConfig, category: Category, data: Any, names: list[str], fractions: tuple[float, float, float]
) -> Split:
    """Ours (seed and fractions), or the one `data.split_file` gives; the file's problems
    are added to `data.problems` (warnings).

    Raises:
        DataError: the split file cannot be read.
    """
    path = split_file_path(cfg)
    if path is None:
        return make_split(names, seed=cfg.data.split_seed, fractions=fractions)
    try:
        split, problems = split_from_file(
            path, category, names, seed=cfg.data.split_seed, fractions=fractions
        )
    except SplitFileError as e:
        raise DataError(f"{category.name}: data.split_file cannot be used: {e}") from e
    data.problems.extend(problems)
    for p in problems:
        log.warning("%s", p.message)
    return split


def prepare_data(
    cfg: JobConfig, category: Category, out_dir: Path, *, resuming: bool, replace_split: bool = False
) -> CategorySamples:
    """Load the sheet and images, take the first `num_images`, and split by image.

    An existing `split.json` is reused when it covers the same images with the same seed and
    fractions (so a resumed or re-run category trains and evaluates on the same images), unless
    `replace_split` (a --force retraining) makes a fresh one.

    Raises:
        DataError: blocking data problems, or a changed image set under a checkpoint.
    """
    d = cfg.data
    category = d.category(category.name)  # with the job's aliases, folder and display name
    level = normalize_level(d)
    # this category's rows only: the others' are no concern of its task
    book = load_workbook(
        Path(d.root), d.labels, d.workbook, [category], normalize=level, cache_dir=workbook_cache_dir(cfg)
    )
    data = load_category(
        Path(d.root),
        category,
        normalize=level,
        max_image_pixels=d.max_image_pixels,
        workbook=book,
    )
    if data.status != "ok":
        raise DataError(blocking_text(category, data))
    records = list(data.records)
    if cfg.data.num_images is not None:
        records = records[: cfg.data.num_images]
    names = [r.image_name for r in records]
    fractions = (cfg.data.train_fraction, cfg.data.val_fraction, cfg.data.test_fraction)
    split = None if replace_split else read_split(out_dir)
    fresh = _fresh_split(cfg, category, data, names, fractions)
    if (
        split is None
        or split.images() != fresh.images()
        or split.seed != fresh.seed
        or tuple(split.fractions) != tuple(fractions)
        or (fresh.source is not None and split.to_dict() != fresh.to_dict())
    ):
        if split is not None and resuming:
            raise DataError(
                f"{category.name}: {out_dir / 'split.json'} no longer matches the data or the "
                "split settings, but checkpoints exist. Resuming would mix two data sets: rerun "
                "with --force to start this category over, or restore the original data."
            )
        split = fresh
        write_split(out_dir, split)
    questions = list(data.questions)
    t = cfg.data.prompt_template
    return CategorySamples(
        split=split,
        image_paths={r.image_name: Path(r.path) for r in records},
        train=samples_for(records, set(split.train), questions, t),
        val=samples_for(records, set(split.val), questions, t),
        test=samples_for(records, set(split.test), questions, t),
        questions=questions,
        data=data,
    )
