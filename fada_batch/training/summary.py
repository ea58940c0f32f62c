"""`training_summary.json`: what one category's task did, written atomically.

The collector reads these files (never pickles), so each one is self-contained: status, times,
data counts, the loss curves, speed, memory, where it ran, library versions and the adapter.
A completed one also says which step's adapter shipped and why (`shipped`: kind best/last,
step, validation loss, reason, how training ended), and every one carries the training
`fingerprint` (the config keys that change the adapter) a rerun is compared against.
Statuses: `running`, `completed`, `failed`, `interrupted` (requeued or stopped by a signal),
`awaiting_labels` (no sheet yet), `invalid_data` (pre-flight problems block it).
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from fada_batch.fsutil import atomic_write_json

SUMMARY_FILE = "training_summary.json"
SCHEMA_VERSION = 1
STATUSES = ("running", "completed", "failed", "interrupted", "awaiting_labels", "invalid_data")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("fada-batch", "torch", "transformers", "peft", "bitsandbytes", "submitit"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def slurm_ids() -> dict[str, str | None]:
    """SLURM job identity from the environment (None outside SLURM)."""
    env = os.environ
    return {
        "job_id": env.get("SLURM_JOB_ID"),
        "array_job_id": env.get("SLURM_ARRAY_JOB_ID"),
        "array_task_id": env.get("SLURM_ARRAY_TASK_ID"),
        "restart_count": env.get("SLURM_RESTART_COUNT"),
        "node": env.get("SLURMD_NODENAME"),
    }


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "type": device.type,
        "host": socket.gethostname(),
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
    if device.type == "cuda":
        idx = device.index or 0
        info["name"] = torch.cuda.get_device_name(idx)
        info["memory_gb"] = round(torch.cuda.get_device_properties(idx).total_memory / 2**30, 1)
    else:
        info["name"] = platform.processor() or platform.machine()
        info["cpus"] = os.cpu_count()
        info["torch_threads"] = torch.get_num_threads()
    return info


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak GPU memory where there is one, else the process's peak resident set size."""
    if device.type == "cuda":
        return {
            "kind": "gpu_max_allocated",
            "gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 3),
        }
    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux
    return {"kind": "process_max_rss", "gb": round(rss_kb / 2**20, 3)}


def write_summary(output_dir: Path, summary: dict[str, Any]) -> Path:
    """Write `training_summary.json` atomically (a reader never sees half of it)."""
    summary = {"schema_version": SCHEMA_VERSION, **summary, "updated": now_iso()}
    path = output_dir / SUMMARY_FILE
    atomic_write_json(path, summary)
    return path


def read_summary(output_dir: Path) -> dict[str, Any] | None:
    """The summary in `output_dir`, or None when there is none.

    Raises:
        ValueError: the file exists but is not a JSON object (names the file).
    """
    path = output_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); delete it or rerun the category") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object; delete it or rerun the category")
    return data
