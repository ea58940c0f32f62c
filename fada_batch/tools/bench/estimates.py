"""Wall time per category and the sbatch `--time` to ask for, from a measured samples/s.

    estimates = estimate(cfg, samples_per_s=30.0, feature_s_per_image=0.01)
    sbatch_time(3600)                      # "01:30:00": x 1.3 + 10 min, rounded up to 5 min

The counts per category come from the pre-flight (`category_counts`), or are given.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fada_batch.config import JobConfig
from fada_batch.data.categories import NUM_QUESTIONS

SAFETY = 1.3  # sbatch --time = estimate x SAFETY + SLACK_S, rounded up to ROUND_S
SLACK_S = 600
ROUND_S = 300
REFERENCE_IMAGES = 2424  # the seed's Abdomen: its 3-3.5 h figure is for this many images
EVAL_COST = 1 / 3  # a validation forward costs ~1/3 of a training step (forward + backward)


@dataclass
class CategoryEstimate:
    """The estimated wall time of one category's training and the sbatch --time for it."""

    category: str
    status: str  # ok, awaiting_labels, error, reference, given
    images: int = 0
    qa_pairs: int = 0
    train_pairs: int = 0
    val_pairs: int = 0
    load_s: float = 0.0
    feature_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    total_s: float = 0.0
    sbatch_time: str = ""  # HH:MM:SS
    time_min: int = 0  # the same in minutes (cluster.time_min)
    within_time_min: bool = True  # total fits cluster.time_min (else it runs in requeued parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sbatch_seconds(seconds: float) -> int:
    """The time limit to ask for: `seconds` x 1.3 + 10 min, rounded up to 5 min."""
    return math.ceil((seconds * SAFETY + SLACK_S) / ROUND_S) * ROUND_S


def sbatch_time(seconds: float) -> str:
    """`sbatch_seconds` as sbatch's `--time` HH:MM:SS."""
    total = sbatch_seconds(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def category_counts(cfg: JobConfig) -> dict[str, tuple[str, int, int]]:
    """Category -> (status, usable images, QA pairs) from the pre-flight (images not opened)."""
    from fada_batch.data.validate import preflight

    return {
        d.category.name: (d.status, d.stats.images_usable, d.stats.qa_pairs)
        for d in preflight(cfg, check_images=False).results
    }


def estimate(
    cfg: JobConfig,
    samples_per_s: float,
    feature_s_per_image: float,
    *,
    load_s: float = 0.0,
    counts: dict[str, tuple[str, int, int]] | None = None,
) -> list[CategoryEstimate]:
    """Estimated wall time per category for the configured epochs.

    Per category, with `N` images and `P` question/answer pairs (capped by data.num_images):
    train pairs = P x train_fraction, val pairs = P x val_fraction;
    feature cache = N x (train + val fraction) x feature_s_per_image (once per image);
    training = epochs x train pairs / samples_per_s;
    validation = epochs x val pairs / samples_per_s x 1/3 (forward only);
    total = load_s + feature cache + training + validation. Checkpoints (a LoRA adapter, a few
    MB) and the generation of eval.after_training are not counted; the 1.3x margin of
    `sbatch_time` covers small extras.

    Args:
        counts: category -> (status, images, QA pairs); default: the pre-flight of cfg's data.
    """
    d, t = cfg.data, cfg.train
    counts = category_counts(cfg) if counts is None else counts
    out = []
    for name, (status, images, qa) in counts.items():
        if status not in ("ok", "reference", "given") or images == 0:
            out.append(CategoryEstimate(name, status))
            continue
        if d.num_images is not None and d.num_images < images:
            qa = round(qa * d.num_images / images)
            images = d.num_images
        train_pairs = round(qa * d.train_fraction)
        val_pairs = round(qa * d.val_fraction)
        feature_s = images * (d.train_fraction + d.val_fraction) * feature_s_per_image
        train_s = t.num_epochs * train_pairs / samples_per_s
        eval_s = t.num_epochs * val_pairs / samples_per_s * EVAL_COST
        total = load_s + feature_s + train_s + eval_s
        out.append(
            CategoryEstimate(
                category=name,
                status=status,
                images=images,
                qa_pairs=qa,
                train_pairs=train_pairs,
                val_pairs=val_pairs,
                load_s=round(load_s, 1),
                feature_s=round(feature_s, 1),
                train_s=round(train_s, 1),
                eval_s=round(eval_s, 1),
                total_s=round(total, 1),
                sbatch_time=sbatch_time(total),
                time_min=sbatch_seconds(total) // 60,
                within_time_min=total <= cfg.cluster.time_min * 60,
            )
        )
    return out


def estimate_counts(cfg: JobConfig, images: int | None) -> dict[str, tuple[str, int, int]]:
    """What to estimate for: `images` x 8 questions per job category when given, else the
    pre-flight's counts, else (no sheets at all) the seed's 2,424-image Abdomen as a reference."""
    if images is not None:
        return {c: ("given", images, images * NUM_QUESTIONS) for c in job_categories(cfg)}
    counts = category_counts(cfg)
    if not any(status == "ok" for status, _, _ in counts.values()):
        return {"reference": ("reference", REFERENCE_IMAGES, REFERENCE_IMAGES * NUM_QUESTIONS)}
    return counts


def job_categories(cfg: JobConfig) -> list[str]:
    return list(dict.fromkeys(cfg.data.category(c).name for c in cfg.data.categories))
