"""The pre-flight check: every requested category's sheet and images, every problem at once.

Runs on a login node in seconds (no model, no GPU); `fada-batch validate` prints it and
`fada-batch submit` runs it first so that only categories with usable data are submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fada_batch.config import JobConfig, normalize_level
from fada_batch.data.categories import (
    IMAGES_DIR,
    LABELS_DIR,
    SHEET_SUFFIX,
    Category,
)
from fada_batch.data.dataset import CategoryData, load_category, load_workbook
from fada_batch.data.given_split import SplitFileError, split_from_file
from fada_batch.data.normalize import Normalization
from fada_batch.data.problems import Problem, make_problem
from fada_batch.data.samples import split_file_path, workbook_cache_dir
from fada_batch.data.workbook import resolve_labels_form, unknown_category_problems


class NoDataError(ValueError):
    """The data root holds no data at all: missing, empty, or not the expected layout."""


@dataclass
class Preflight:
    """The pre-flight result of a job: one CategoryData per requested category."""

    results: list[CategoryData]
    data_root: Path | None = None
    no_data: str | None = None  # why the data root holds no data at all (see `find_no_data`)
    workbook: Path | None = None  # the master workbook read, when the job reads one
    workbook_problems: list[Problem] = field(default_factory=list)  # rows no category took

    @property
    def ready(self) -> list[CategoryData]:
        return [d for d in self.results if d.status == "ok"]

    @property
    def awaiting(self) -> list[CategoryData]:
        return [d for d in self.results if d.status == "awaiting_labels"]

    @property
    def blocked(self) -> list[CategoryData]:
        return [d for d in self.results if d.status == "error"]

    def normalization(self) -> Normalization | None:
        """Answer normalisation over every category read (None when none was)."""
        parts = [d.normalization for d in self.results if d.normalization is not None]
        if not parts:
            return None
        total = Normalization(level=parts[0].level)
        for part in parts:
            total.merge(part)
        return total

    def to_dict(self) -> dict[str, Any]:
        """What `validate --json` prints: every category, the master workbook's own warnings
        (categories not in the job, rows without a category), the normalisation over every
        category read, the counts, and why nothing can train (null when something can)."""
        norm = self.normalization()
        workbook = None
        if self.workbook is not None:
            workbook = {
                "path": str(self.workbook),
                "problems": [p.to_dict() for p in self.workbook_problems],
            }
        return {
            "categories": [d.to_dict() for d in self.results],
            "workbook": workbook,
            "normalization": None if norm is None else norm.to_dict(),
            "summary": {
                "ready": len(self.ready),
                "awaiting_labels": len(self.awaiting),
                "blocked": len(self.blocked),
            },
            "nothing_ready": self.nothing_ready(),
        }

    def nothing_ready(self) -> str | None:
        """Why no requested category can train (None when one can): no data at all, or every
        category awaiting labels or blocked; the text names where it looked."""
        if self.no_data:
            return self.no_data
        if self.ready or not self.results:
            return None
        awaiting = [d for d in self.results if d.status == "awaiting_labels"]
        if len(awaiting) == len(self.results):
            images = sum(1 for d in self.results if d.image_dir is not None)
            where = self.data_root / LABELS_DIR if self.data_root else LABELS_DIR
            return (
                f"nothing is ready: the data root is there ({images} of {len(awaiting)} category "
                f"image folders found) but no category has a label sheet yet; looked in {where} "
                f"for {awaiting[0].expected_sheet.name} and the other categories' sheets"
            )
        return (
            f"nothing is ready: {len(self.blocked)} blocked by data problems, {len(awaiting)} awaiting labels"
        )


def find_no_data(data_root: Path, categories: list[Category]) -> str | None:
    """Why `data_root` holds no data at all, naming the folders expected there; None when
    either of its two folders is there.

    Tells a missing root, a file, an empty folder (a share or a container bind that is not
    mounted here looks like that) and a folder of other things apart.
    """
    images, labels = data_root / IMAGES_DIR, data_root / LABELS_DIR
    if images.is_dir() or labels.is_dir():
        return None
    if not data_root.exists():
        why = f"the data root {data_root} does not exist here (not mounted, or not bound into the container?)"
    elif not data_root.is_dir():
        why = f"the data root {data_root} is not a folder"
    else:
        try:
            entries = sorted(p.name for p in data_root.iterdir())
        except OSError as e:
            entries, why = [], f"the data root {data_root} cannot be listed ({e.strerror})"
        else:
            why = f"the data root {data_root} is empty (is the share, or the container's bind, mounted?)"
        if entries:
            shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
            why = f"the data root {data_root} holds neither '{IMAGES_DIR}/' nor '{LABELS_DIR}/' (it holds {shown})"
    names = ",".join(c.folder for c in categories) if len(categories) > 1 else categories[0].folder
    return (
        f"no data found: {why}. Looked for the scans in {images}/{{{names}}}/ and the label "
        f"sheets in {labels}/<Category>{SHEET_SUFFIX}. Fix: set data.root (or -p data.root=DIR) "
        "to the folder that holds both; in a container, bind that folder in "
        "(podman/docker -v DIR:DIR:ro, apptainer --bind DIR)."
    )


def preflight(cfg: JobConfig, categories: list[str] | None = None, *, check_images: bool = True) -> Preflight:
    """Load every requested category's data (sheets parsed, images checked), never raising
    for bad data: problems are collected per category.

    Raises:
        UnknownCategoryError: a requested name is neither a category nor an alias.
    """
    names = categories if categories is not None else list(cfg.data.categories)
    table = cfg.data.table()
    cats = [table.get(n.strip()) for n in names]
    root = Path(cfg.data.root)
    wb_path = resolve_labels_form(root, cfg.data.labels, cfg.data.workbook)
    has_book = wb_path is not None and wb_path.is_file()
    if cats and not has_book and (no_data := find_no_data(root, cats)) is not None:
        # one message, not one "data root not found" per category
        results = [load_category(root, c, check_images=False) for c in dict.fromkeys(cats)]
        return Preflight(results, data_root=root, no_data=no_data)
    job_cats = list(dict.fromkeys(table.get(n.strip()) for n in cfg.data.categories))
    d = cfg.data
    level = normalize_level(d)
    book = load_workbook(
        root, d.labels, d.workbook, job_cats, normalize=level, cache_dir=workbook_cache_dir(cfg)
    )
    results = [
        load_category(
            root,
            cat,
            normalize=level,
            check_images=check_images,
            max_image_pixels=d.max_image_pixels,
            workbook=book,
        )
        for cat in dict.fromkeys(cats)
    ]
    _check_split_file(cfg, results)
    if book is None:
        return Preflight(results, data_root=root)
    extra = [p for p in book.problems if p.severity != "error"] + unknown_category_problems(book, table)
    return Preflight(results, data_root=root, workbook=book.path, workbook_problems=extra)


def normalization_lines(norm: Normalization | None, *, top: int = 10) -> list[str]:
    """Unique answers per question before and after normalisation, and the top fixes."""
    if norm is None or norm.level == "none":
        return []
    before, after = norm.unique_before(), norm.unique_after()
    per_q = "  ".join(f"Q{q + 1} {b}->{a}" for q, (b, a) in enumerate(zip(before, after, strict=True)))
    lines = [
        f"\nanswers normalised ({norm.level}): {sum(before)} -> {sum(after)} unique (per question: {per_q})",
        "    cells changed per layer: "
        + (", ".join(f"{k} {v}" for k, v in norm.cells_changed.items()) or "none"),
    ]
    for layer, a, b, n in norm.top_fixes(top):
        lines.append(f"    {n:>6}  {layer:<9} {a!r} -> {b!r}")
    return lines


def _check_split_file(cfg: JobConfig, results: list[CategoryData]) -> None:
    """Add the problems of `data.split_file` to each trainable category (unknown, duplicate
    and unlisted images; an unreadable file blocks every category)."""
    path = split_file_path(cfg)
    if path is None:
        return
    fractions = (cfg.data.train_fraction, cfg.data.val_fraction, cfg.data.test_fraction)
    for d in results:
        if d.status != "ok":
            continue
        names = [r.image_name for r in d.records][: cfg.data.num_images]
        try:
            _, problems = split_from_file(
                path, d.category, names, seed=cfg.data.split_seed, fractions=fractions
            )
        except SplitFileError as e:
            problems = [
                make_problem(
                    "split_file_unreadable",
                    f"The split file cannot be used: {e}.",
                    fix="point data.split_file at a JSON file of one of the shapes in the message, "
                    "or remove data.split_file to use our split.",
                    file=path,
                )
            ]
            d.status = "error"
        d.problems.extend(problems)


def format_table(pf: Preflight, *, max_problems: int = 20) -> str:
    """A human-readable table: one line per category, then its problems (or, when there is
    no data at all, why and where it looked)."""
    if pf.no_data:
        return f"error: {pf.no_data}"
    lines = [f"{'category':<18} {'status':<16} {'images':>7} {'QA pairs':>9}  answers per question"]
    for d in pf.results:
        s = d.stats
        per_q = " ".join(str(n) for n in s.qa_pairs_per_question) if d.status != "awaiting_labels" else ""
        c = d.category
        name = f"{c.name} ({c.display})" if c.display and c.display != c.name else c.name
        lines.append(f"{name:<18} {d.status:<16} {s.images_usable:>7} {s.qa_pairs:>9}  {per_q}")
        if d.status == "awaiting_labels":
            where = "no rows in" if pf.workbook is not None else "no sheet yet (expected"
            lines.append(f"    {where} {d.expected_sheet}{'' if pf.workbook is not None else ')'}")
        shown = sorted(d.problems, key=lambda p: p.severity != "error")
        for p in shown[:max_problems]:
            lines.append(f"    [{p.severity}] {p.message}")
        if len(shown) > max_problems:
            lines.append(f"    ... and {len(shown) - max_problems} more (see --json)")
    lines += normalization_lines(pf.normalization())
    if pf.workbook is not None:
        lines.append(f"\nlabels from the master workbook {pf.workbook}")
        for p in pf.workbook_problems[:max_problems]:
            lines.append(f"    [{p.severity}] {p.message}")
        if len(pf.workbook_problems) > max_problems:
            lines.append(f"    ... and {len(pf.workbook_problems) - max_problems} more (see --json)")
    ready, waiting, blocked = len(pf.ready), len(pf.awaiting), len(pf.blocked)
    lines.append(f"\n{ready} ready, {waiting} awaiting labels, {blocked} blocked by data problems")
    if (why := pf.nothing_ready()) is not None:
        lines.append(f"error: {why}")
    return "\n".join(lines)
