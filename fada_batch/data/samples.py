"""One category's question/answer samples, split by image: what training and evaluation read.

    cs = prepare_data(cfg, category, out_dir, resuming=False)   # -> CategorySamples

The sheet and images are loaded and checked (`dataset.load_category`), the first
`data.num_images` are taken, and they are split by image (`split.json`, reused while it still
fits the data and the split settings). Every non-empty answer becomes one `Sample`: one question
about one image, with its prompt and reference answer. Token ids come later (`training.collate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
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
    category: str = ""  # joint mode: the category the image belongs to; "" for a category's own run


@dataclass
class CategorySamples:
    """Everything training and evaluation need from the data side."""

    split: Split
    image_paths: dict[str, Path]  # image name -> file
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    questions: list[str]
    data: Any  # dataset.CategoryData (for counts and problems); None for a joint run's union
    # joint mode (`prepare_joint_data`): each category's own samples, under the same image
    # keys and prompts as the union's; empty for a category's own run
    parts: dict[str, CategorySamples] = field(default_factory=dict)
    # joint mode: what each category's prompts start with (`joint_prefix`; None: nothing)
    prompt_prefixes: dict[str, str | None] = field(default_factory=dict)


def format_prompt(template: str, question: str, category: str | None = None) -> str:
    """The prompt the model reads: `template` (data.prompt_template) with the question in it,
    after the category's name as a short prefix when one is given (joint mode with
    train.category_in_prompt): "Abdomen. Question: ... Answer:". The one place prompts are made:
    training, evaluation and `ask` all call it."""
    text = template.format(question=question)
    return f"{category}. {text}" if category else text


def joint_prefix(category: Category, in_prompt: bool) -> str | None:
    """What a joint adapter's prompts start with for `category` (`format_prompt`'s `category`):
    its display name with train.category_in_prompt, else nothing. Recorded per category in the
    joint adapter's `fada_batch.json` (`prompt_prefixes`), which `evaluate` and `ask` read."""
    return category.display_name if in_prompt else None


def samples_for(records: list[Any], names: set[str], questions: list[str], template: str) -> list[Sample]:
    """One sample per non-empty answer of each image in `names` (sheet order)."""
    out = []
    for rec in records:
        if rec.image_name not in names:
            continue
        for qi, answer in enumerate(rec.answers):
            if answer:
                out.append(Sample(rec.image_name, qi, format_prompt(template, questions[qi]), answer))
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


JOINT_PARTS_DIR = "categories"  # joint mode: {joint folder}/categories/<slug>/ (split.json, eval/)


def joint_image_key(category: Category, image: str) -> str:
    """A joint run's key for an image: `<slug>/<name>`, since two categories may hold files of
    the same name (the feature cache and the combined split.json are keyed by it)."""
    return f"{category.slug}/{image}"


def _joint_part(
    cs: CategorySamples, category: Category, prefix: str | None, template: str
) -> CategorySamples:
    """One category's samples re-keyed for the joint run: images `<slug>/<name>`, prompts with
    the category prefix (or without), the category named on every sample."""

    def rekey(samples: list[Sample]) -> list[Sample]:
        return [
            replace(
                s,
                image=joint_image_key(category, s.image),
                prompt=format_prompt(template, cs.questions[s.question_index], prefix),
                category=category.name,
            )
            for s in samples
        ]

    sp = cs.split
    return CategorySamples(
        split=Split(
            train=[joint_image_key(category, n) for n in sp.train],
            val=[joint_image_key(category, n) for n in sp.val],
            test=[joint_image_key(category, n) for n in sp.test],
            seed=sp.seed,
            fractions=sp.fractions,
            source=sp.source,
        ),
        image_paths={joint_image_key(category, n): p for n, p in cs.image_paths.items()},
        train=rekey(cs.train),
        val=rekey(cs.val),
        test=rekey(cs.test),
        questions=cs.questions,
        data=cs.data,
    )


def prepare_joint_data(
    cfg: JobConfig, categories: list[Category], out_dir: Path, *, resuming: bool, replace_split: bool = False
) -> CategorySamples:
    """Joint mode: every category loaded and split by image exactly as its own run would be
    (`prepare_data`, its split.json in `{out_dir}/categories/<slug>/`), then put together: the
    training and validation sets are the union; `parts` keeps each category's own samples for
    evaluation per category. A combined `split.json` in `out_dir` lists every category's images
    (as `<slug>/<name>`).

    Raises:
        DataError: a category's data cannot be used (its name in the message).
    """
    parts: dict[str, CategorySamples] = {}
    prefixes: dict[str, str | None] = {}
    for category in categories:
        sub = out_dir / JOINT_PARTS_DIR / category.slug
        sub.mkdir(parents=True, exist_ok=True)
        cs = prepare_data(cfg, category, sub, resuming=resuming, replace_split=replace_split)
        prefix = prefixes[category.name] = joint_prefix(category, cfg.train.category_in_prompt)
        parts[category.name] = _joint_part(cs, category, prefix, cfg.data.prompt_template)
    first = next(iter(parts.values()))
    union = CategorySamples(
        split=Split(
            train=[n for p in parts.values() for n in p.split.train],
            val=[n for p in parts.values() for n in p.split.val],
            test=[n for p in parts.values() for n in p.split.test],
            seed=first.split.seed,
            fractions=first.split.fractions,
            source=first.split.source,
        ),
        image_paths={k: v for p in parts.values() for k, v in p.image_paths.items()},
        train=[s for p in parts.values() for s in p.train],
        val=[s for p in parts.values() for s in p.val],
        test=[s for p in parts.values() for s in p.test],
        questions=first.questions,
        data=None,
        parts=parts,
        prompt_prefixes=prefixes,
    )
    write_split(out_dir, union.split)
    return union
