"""The one place that names, writes, finds and loads training checkpoints.

A checkpoint is the folder `checkpoint-{step}/` in the category's output folder:

    adapter_model.safetensors   trainable weights (LoRA + modules_to_save)
    optimizer.pt                optimizer state (tensors only; loaded with weights_only=True)
    rng.pt                      torch CPU/CUDA RNG states (tensors only)
    trainer_state.json          step, epoch, position in the epoch, curves, scheduler state
    config.yaml                 the resolved job config

It is built under a temporary name and renamed into place, so a folder called
`checkpoint-{step}` is always complete; a kill mid-save leaves only a temporary folder, which
is ignored and cleaned up. Nothing is unpickled: a user-replaceable file can't run code.

`best_checkpoint/` holds the trainable weights of the step with the lowest validation loss so
far (`best.json` says which), apart from the rolling checkpoints, which are pruned; with
`train.final_model: best` they become `final_model/`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fada_batch.fsutil import atomic_dir, remove_dir, remove_stale_tmp
from fada_batch.killpoints import reached

log = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
BEST_DIR = "best_checkpoint"
BEST_FILE = "best.json"
REQUIRED = ("adapter_model.safetensors", "optimizer.pt", "rng.pt", STATE_FILE)


@dataclass
class TrainerState:
    """Where training stands; enough to resume on the same data order."""

    global_step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    step_in_epoch: int = 0  # optimizer steps of `epoch` already done
    samples_seen: int = 0
    train_time_s: float = 0.0  # time spent in the loop so far, across requeues/resumes
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, loss]
    val_loss: list[list[float]] = field(default_factory=list)  # [epoch, loss] at epoch ends
    val_history: list[list[float]] = field(default_factory=list)  # [step, loss], every validation
    best_step: int | None = None  # step of the lowest validation loss so far
    best_val_loss: float | None = None
    bad_validations: int = 0  # validations since the best (early stopping counts these)
    early_stopped: bool = False
    fingerprint: dict[str, Any] = field(default_factory=dict)  # config.training_fingerprint
    epoch_train_loss: list[list[float]] = field(default_factory=list)  # [epoch, mean loss]
    scheduler: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    resumes: int = 0
    micro_batch_size: int = 0  # current micro-batch (after OOM back-off)
    grad_accum_steps: int = 0


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return output_dir / f"checkpoint-{step}"


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first (folders whose name and contents are whole)."""
    found = []
    if not output_dir.is_dir():
        return found
    for p in output_dir.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and all((p / f).is_file() for f in REQUIRED):
            found.append((int(m.group(1)), p))
    return sorted(found)


class CheckpointLoadError(RuntimeError):
    """A checkpoint folder that looks complete cannot be loaded (corrupt or unsafe)."""


def find_latest(output_dir: Path) -> Path | None:
    """The latest complete checkpoint in `output_dir`, found at run time (never baked in)."""
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1][1] if ckpts else None


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _set_rng_state(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        keys = [k for k in state if k.startswith("cuda") and k[4:].isdigit()]
        cuda = [state[k] for k in sorted(keys, key=lambda k: int(k[4:]))]  # cuda10 after cuda9
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


def trainable_state_dict(model: Any) -> dict[str, torch.Tensor]:
    """Trainable tensors by parameter name (LoRA + modules_to_save), contiguous, on CPU."""
    return {
        n: p.detach().to("cpu").contiguous().clone() for n, p in model.named_parameters() if p.requires_grad
    }


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, I/O error); earlier ones are intact."""


def save_checkpoint(
    output_dir: Path,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    state: TrainerState,
    config_yaml: str,
    keep: int,
) -> Path:
    """Write `checkpoint-{state.global_step}` atomically, then prune to the last `keep`.

    Raises:
        CheckpointWriteError: on ENOSPC, EIO or any OS error while writing; the temporary
            folder is removed and the previous checkpoints are untouched.
    """
    target = checkpoint_dir(output_dir, state.global_step)
    try:
        with atomic_dir(target) as tmp:
            save_file(trainable_state_dict(model), str(tmp / "adapter_model.safetensors"))
            reached("checkpoint.adapter", state.global_step)
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(_rng_state(), tmp / "rng.pt")
            (tmp / "config.yaml").write_text(config_yaml)
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=1))
            reached("checkpoint.files", state.global_step)
    except OSError as e:
        previous = find_latest(output_dir)
        kept = (
            f"the previous checkpoint {previous.name} is kept" if previous else "no earlier checkpoint exists"
        )
        raise CheckpointWriteError(
            f"could not write {target.name} in {output_dir}: {e.strerror or e} "
            f"(errno {e.errno}); {kept}. Free space or fix the file system, then run the same "
            "command again to resume."
        ) from e
    prune(output_dir, keep)
    reached("checkpoint.pruned", state.global_step)
    return target


def prune(output_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints, and stale temp folders."""
    ckpts = list_checkpoints(output_dir)
    for _step, path in ckpts[:-keep] if keep > 0 else []:
        remove_dir(path)
    remove_stale_tmp(output_dir)


def load_checkpoint(path: Path, *, model: Any, optimizer: torch.optim.Optimizer) -> TrainerState:
    """Restore trainable weights, optimizer and RNG from `path`; return the trainer state.

    Raises:
        RuntimeError: the checkpoint does not fit this model (names the mismatch and the fix).
    """
    try:
        weights = load_file(str(path / "adapter_model.safetensors"))
        # weights_only: nothing in a checkpoint folder is ever unpickled into code objects
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        raw = json.loads((path / STATE_FILE).read_text())
    except Exception as e:  # corrupt bytes, unsafe pickle, bad JSON: all mean "unusable"
        raise CheckpointLoadError(f"{path} cannot be loaded ({type(e).__name__}: {e})") from e
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    extra = [n for n in weights if n not in params]
    if missing or extra:
        raise RuntimeError(
            f"{path} does not match this model (missing {missing[:3]}, unexpected {extra[:3]}): "
            "it was written with another LoRA or model config. Resume with the same job, or "
            "start over with --force."
        )
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    optimizer.load_state_dict(opt_state)  # moves state to the parameters' device
    _set_rng_state(rng)
    known = {k: v for k, v in raw.items() if k in TrainerState.__dataclass_fields__}
    return TrainerState(**known)


def quarantine(path: Path) -> Path:
    """Rename an unusable checkpoint out of the way (kept for inspection, never loaded)."""
    target = path.with_name(f"{path.name}.unusable-{int(time.time())}")
    os.replace(path, target)
    return target


def read_state(path: Path) -> TrainerState:
    raw = json.loads((path / STATE_FILE).read_text())
    return TrainerState(**{k: v for k, v in raw.items() if k in TrainerState.__dataclass_fields__})


def remove_all(output_dir: Path) -> None:
    """Delete every checkpoint and the best one (used by --force before a fresh start)."""
    for _step, path in list_checkpoints(output_dir):
        remove_dir(path)
    remove_dir(output_dir / BEST_DIR)
    remove_stale_tmp(output_dir)


def save_best(output_dir: Path, *, model: Any, step: int, val_loss: float) -> Path:
    """Write the trainable weights as `best_checkpoint/` (atomically, replacing the last one).

    Raises:
        CheckpointWriteError: on an OS error; the previous best is intact.
    """
    target = output_dir / BEST_DIR
    try:
        with atomic_dir(target) as tmp:
            save_file(trainable_state_dict(model), str(tmp / "adapter_model.safetensors"))
            (tmp / BEST_FILE).write_text(json.dumps({"step": step, "val_loss": val_loss}))
    except OSError as e:
        raise CheckpointWriteError(
            f"could not write {target}: {e.strerror or e} (errno {e.errno}). Free space or fix the "
            "file system, then run the same command again to resume."
        ) from e
    return target


def load_best(output_dir: Path, *, model: Any, step: int) -> None:
    """Put the weights of `best_checkpoint/` into `model`'s trainable parameters.

    Raises:
        RuntimeError: the folder is missing, unreadable, or holds another step than `step`.
    """
    path = output_dir / BEST_DIR
    fix = (
        "Run the category again with --force (or with -p train.final_model=last to ship the last "
        "step's adapter)."
    )
    try:
        info = json.loads((path / BEST_FILE).read_text())
        weights = load_file(str(path / "adapter_model.safetensors"))
    except Exception as e:  # missing, truncated or not JSON: all mean "unusable"
        raise RuntimeError(
            f"the best adapter in {path} cannot be read ({type(e).__name__}: {e}). {fix}"
        ) from e
    if info.get("step") != step:
        raise RuntimeError(
            f"{path} holds step {info.get('step')}, but the lowest validation loss was at step {step}. {fix}"
        )
    params = dict(model.named_parameters())
    wanted = {n for n, p in params.items() if p.requires_grad}
    if set(weights) != wanted:
        raise RuntimeError(f"{path} does not match this model's trainable weights. {fix}")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
