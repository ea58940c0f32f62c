"""A category's output folder: its name, what marks it complete, and whether what it holds
was trained under this job's training config.

    out_dir = category_output_dir(cfg, category)        # {output.root}/blip2_{slug}
    final_model_complete(out_dir)                        # adapter + marker in final_model/
    check_fingerprints(cfg, ["Femur", "Thorax"])         # before a submission: skip, resume, refuse

Training writes the folder, evaluation and the collector read it, and the launcher asks it what
each task would do. A completed adapter or a checkpoint is reused (skipped, resumed) only under
the same training fingerprint (`config.training_fingerprint`); otherwise `FingerprintMismatch`
names the keys that differ and the two ways on.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from fada_batch.config import FingerprintMismatch, JobConfig, fingerprint_diff, training_fingerprint
from fada_batch.data.categories import Category
from fada_batch.training import checkpoint as ckpt
from fada_batch.training.summary import read_summary

log = logging.getLogger(__name__)

FINAL_MODEL = "final_model"

FINAL_MARKER = "fada_batch.json"  # written last into final_model/: its presence = complete

CONFIG_FILE = "config.yaml"

EXPORTS_FILE = (
    "exports.json"  # where `fada-batch export` put copies of final_model/ (the collector links them)
)


JOINT = "joint"  # the joint adapter's name: its folder is `blip2_joint/`


def category_output_dir(cfg: JobConfig, category: Category) -> Path:
    return Path(cfg.output.root) / category.output_dirname


def joint_category(cfg: JobConfig) -> Category:
    """The joint adapter (train.mode=joint) as the recipe sees a category: named `joint`, its
    folder `{output.root}/blip2_joint/`, shown as "Joint (Abdomen, Femur)"."""
    names = ", ".join(cfg.data.category(c).display_name for c in cfg.data.categories)
    return Category(JOINT, folder="", sheet="", display=f"Joint ({names})")


def task_category(cfg: JobConfig, name: str) -> Category:
    """The category a task trains: `joint_category` for the joint task (`JOINT`), else the
    job's category of that name or alias."""
    return joint_category(cfg) if name == JOINT else cfg.data.category(name)


def joint_output_dir(cfg: JobConfig) -> Path:
    """`{output.root}/blip2_joint/`: the joint adapter's folder."""
    return category_output_dir(cfg, joint_category(cfg))


def final_model_complete(folder: Path) -> bool:
    """True when `final_model/` holds the adapter, the processor and the completion marker."""
    fm = folder / FINAL_MODEL
    return all((fm / f).is_file() for f in ("adapter_config.json", "adapter_model.safetensors", FINAL_MARKER))


def completed_summary(out_dir: Path) -> dict[str, Any] | None:
    """The summary of a completed category whose adapter is complete, else None."""
    try:
        previous = read_summary(out_dir)
    except ValueError:
        return None
    if previous and previous.get("status") == "completed" and final_model_complete(out_dir):
        return previous
    return None


def fingerprint_from_yaml(path: Path) -> dict[str, Any] | None:
    """The training fingerprint of a written `config.yaml`, or None when it cannot be read."""
    from fada_batch.config import ConfigError, config_from_dict, safe_load_yaml

    try:
        raw = safe_load_yaml(path.read_text()) or {}
        return training_fingerprint(config_from_dict(raw, source=str(path)))
    except (OSError, ConfigError, yaml.YAMLError):
        return None


def fingerprint_mismatch(
    category: Category, out_dir: Path, what: str, old: dict[str, Any] | None, new: dict[str, Any]
) -> FingerprintMismatch:
    diff = (
        fingerprint_diff(old, new)
        if old is not None
        else ["(the earlier config cannot be read: it was written by another version of fada-batch)"]
    )
    lines = "\n".join(f"    {d}" for d in diff)
    return FingerprintMismatch(
        f"{category.name}: {out_dir} holds {what} trained under another training config; "
        f"refusing to skip, resume or overwrite it. Keys that differ (then -> now):\n{lines}\n"
        "Two ways on: retrain here, replacing it, with --force (`fada-batch train ... --force` or "
        "`fada-batch submit ... --force`); or keep it and write this run elsewhere, e.g. "
        "-p output.root=outputs/<run name>."
    )


COMPLETED = "completed"  # check_fingerprints: completed under the same training config


def completed_under(
    out_dir: Path, category: Category, cfg: JobConfig, *, quiet: bool = False
) -> dict[str, Any] | None:
    """The summary of a category completed under this config's training fingerprint, else None
    (logged as skipped unless `quiet`).

    Raises:
        FingerprintMismatch: it was completed under another training config.
    """
    previous = completed_summary(out_dir)
    if previous is None:
        return None
    then = previous.get("fingerprint") or fingerprint_from_yaml(out_dir / FINAL_MODEL / CONFIG_FILE)
    now = training_fingerprint(cfg)
    if then != now:
        raise fingerprint_mismatch(category, out_dir, "a completed adapter", then, now)
    if quiet:
        return previous
    log.info(
        "%s: already completed under the same training config (%s); skipping. Use --force to train it again.",
        category.name,
        out_dir / FINAL_MODEL,
    )
    return previous


def check_checkpoint(cfg: JobConfig, category: Category, out_dir: Path, latest: Path) -> None:
    """Refuse to resume a checkpoint written under another training fingerprint."""
    try:
        then = ckpt.read_state(latest).fingerprint or fingerprint_from_yaml(latest / CONFIG_FILE)
    except (OSError, ValueError):
        return  # unreadable: loading it fails later, and it is quarantined then
    now = training_fingerprint(cfg)
    if then != now:
        raise fingerprint_mismatch(
            category, out_dir, f"checkpoints of an unfinished run (latest {latest.name})", then, now
        )


def check_fingerprints(cfg: JobConfig, categories: list[str]) -> dict[str, str]:
    """Before a submission: what each category's task would do with its folder, and every
    category whose folder holds a completed adapter or checkpoints from another training
    config, all at once.

    Returns:
        category -> `COMPLETED` (its task would skip it) or the name of the checkpoint it
        would resume from; categories that would start fresh are left out.
    Raises:
        FingerprintMismatch: listing each such category with its differing keys.
    """
    messages = []
    found: dict[str, str] = {}
    for name in categories:
        category = task_category(cfg, name)
        out_dir = category_output_dir(cfg, category)
        try:
            if completed_under(out_dir, category, cfg, quiet=True) is not None:
                found[name] = COMPLETED
            elif latest := ckpt.find_latest(out_dir):
                check_checkpoint(cfg, category, out_dir, latest)
                found[name] = latest.name
        except FingerprintMismatch as e:
            messages.append(str(e))
    if messages:
        raise FingerprintMismatch("\n\n".join(messages))
    return found
