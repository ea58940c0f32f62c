"""The pre-flight check: every requested category's sheet and images, every problem at once.

Runs on a login node in seconds (no model, no GPU); `fada-batch validate` prints it and
`fada-batch submit` runs it first so that only categories with usable data are submitted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fada_batch.categories import get_category
from fada_batch.config import JobConfig
from fada_batch.dataset import CategoryData, load_category


@dataclass
class Preflight:
    """The pre-flight result of a job: one CategoryData per requested category."""

    results: list[CategoryData]

    @property
    def ready(self) -> list[CategoryData]:
        return [d for d in self.results if d.status == "ok"]

    @property
    def awaiting(self) -> list[CategoryData]:
        return [d for d in self.results if d.status == "awaiting_labels"]

    @property
    def blocked(self) -> list[CategoryData]:
        return [d for d in self.results if d.status == "error"]

    def to_dict(self) -> list[dict[str, Any]]:
        return [d.to_dict() for d in self.results]


def preflight(cfg: JobConfig, categories: list[str] | None = None, *, check_images: bool = True) -> Preflight:
    """Load every requested category's data (sheets parsed, images checked), never raising
    for bad data: problems are collected per category.

    Raises:
        UnknownCategoryError: a requested name is neither a category nor an alias.
    """
    names = categories if categories is not None else list(cfg.data.categories)
    cats = [get_category(n.strip()) for n in names]
    seen: set[str] = set()
    results = []
    for cat in cats:
        if cat.name in seen:
            continue
        seen.add(cat.name)
        results.append(
            load_category(
                Path(cfg.data.root),
                cat,
                clean_answers=cfg.data.clean_answers,
                check_images=check_images,
                max_image_pixels=cfg.data.max_image_pixels,
            )
        )
    return Preflight(results)


def format_table(pf: Preflight, *, max_problems: int = 20) -> str:
    """A human-readable table: one line per category, then its problems."""
    lines = [f"{'category':<18} {'status':<16} {'images':>7} {'QA pairs':>9}  answers per question"]
    for d in pf.results:
        s = d.stats
        per_q = " ".join(str(n) for n in s.qa_pairs_per_question) if d.status != "awaiting_labels" else ""
        lines.append(f"{d.category.name:<18} {d.status:<16} {s.images_usable:>7} {s.qa_pairs:>9}  {per_q}")
        if d.status == "awaiting_labels":
            lines.append(f"    no sheet yet (expected {d.expected_sheet})")
        shown = sorted(d.problems, key=lambda p: p.severity != "error")
        for p in shown[:max_problems]:
            lines.append(f"    [{p.severity}] {p.message}")
        if len(shown) > max_problems:
            lines.append(f"    ... and {len(shown) - max_problems} more (see --json)")
    ready, waiting, blocked = len(pf.ready), len(pf.awaiting), len(pf.blocked)
    lines.append(f"\n{ready} ready, {waiting} awaiting labels, {blocked} blocked by data problems")
    return "\n".join(lines)
