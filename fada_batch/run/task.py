"""One category's task: train it, then evaluate the adapter it ships (when the job asks).

    summary = run_category(cfg, "Femur")

Training (`training.recipe.train_category`) knows neither evaluation nor SLURM; this module
composes them. It hands training the evaluation to run on the adapter still in memory when
`eval.after_training` is set (no second load of the model), and the probe that asks SLURM
whether the holder of a lock found in the category's folder still runs. Every way a category
is trained goes through here: the launcher's array task (`run.launch.TrainTask`), and
`fada-batch train` on a workstation or in a plain sbatch array (`run_category_on_signals`).
"""

from __future__ import annotations

import logging
import os
import platform
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fada_batch.config import JobConfig
from fada_batch.evaluation.evaluate import evaluate_after_training
from fada_batch.run import requeue
from fada_batch.run.slurmjobs import job_phase
from fada_batch.training.outputs import JOINT, category_output_dir, task_category
from fada_batch.training.recipe import FinalModel, StopRequested, train_category, train_joint

log = logging.getLogger(__name__)


def run_category(
    cfg: JobConfig,
    category: str,
    *,
    force: bool = False,
    should_stop: Callable[[], bool] | None = None,
    requeues: int = 0,
    progress_stream: Any = None,
) -> dict[str, Any]:
    """Train one category (`train_category`: same arguments, same exceptions), or the joint
    adapter when `category` is `outputs.JOINT` (`train_joint`), evaluating the adapter it ships
    when `eval.after_training`; returns the summary."""
    if category == JOINT:
        return train_joint(
            cfg,
            force=force,
            should_stop=should_stop,
            requeues=requeues,
            progress_stream=progress_stream,
            job_probe=job_phase,
            after_save=evaluate_in_memory if cfg.eval.after_training else None,
        )
    return train_category(
        cfg,
        category,
        force=force,
        should_stop=should_stop,
        requeues=requeues,
        progress_stream=progress_stream,
        job_probe=job_phase,  # a lock left by a requeued or ended SLURM job is taken over
        after_save=evaluate_in_memory if cfg.eval.after_training else None,
    )


def evaluate_in_memory(final: FinalModel) -> dict[str, Any]:
    """The summary's `eval` entry: the held-out images answered by the adapter in memory.

    A failure is reported in the entry, not raised (`evaluate_after_training`): the adapter is
    saved already, and `fada-batch evaluate` can run the evaluation again.
    """
    return {
        "eval": evaluate_after_training(
            final.loaded,
            final.samples,
            final.out_dir,
            eos_token_id=final.eos_token_id,
            cfg=final.cfg,
            max_new_tokens=final.max_new_tokens,
        )
    }


@dataclass(frozen=True)
class Stopped:
    """`run_category_on_signals` stopped after a checkpoint; `stop_reason` is what its summary says."""

    stop_reason: str  # one of requeue.STOP_REASONS

    @property
    def failed(self) -> bool:
        """Not requeued although it should have been (limit reached, or the requeue failed)."""
        return self.stop_reason in ("requeue_limit", "requeue_failed")


def run_category_on_signals(
    cfg: JobConfig, category: str, *, force: bool = False
) -> dict[str, Any] | Stopped:
    """`fada-batch train`: `run_category` with SIGUSR1 (the sbatch `--signal` warning before the
    time limit) and SIGTERM (preemption) turned into a checkpoint at the next step.

    After the warning under SLURM the task is requeued (up to cluster.max_requeues; see
    `run.requeue.after_sbatch_stop`) and resumes from that checkpoint.

    Returns:
        the summary, or `Stopped` after a stop on a signal.
    """
    match_threads_to_allocation()
    caught: list[int] = []

    def on_signal(signum: int, _frame: object) -> None:
        caught.append(signum)
        print(f"caught signal {signum}: checkpointing at the next step", file=sys.stderr, flush=True)

    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        return run_category(
            cfg, category, force=force, should_stop=lambda: bool(caught), requeues=requeue.restart_count()
        )
    except StopRequested as e:
        print(f"{category}: stopped after saving {e.checkpoint}", file=sys.stderr, flush=True)
        cat = task_category(cfg, category)
        reason = requeue.after_sbatch_stop(
            category_output_dir(cfg, cat),
            cat.name,
            job_name=cfg.name,
            max_requeues=cfg.cluster.max_requeues,
            checkpoint=e.checkpoint,
            signum=caught[0] if caught else None,
        )
        return Stopped(reason)


def code_origin() -> str:
    """Which fada_batch this process runs: version, folder and Python (an image's or a checkout's)."""
    import fada_batch

    return (
        f"fada_batch {fada_batch.__version__} from {Path(fada_batch.__file__).resolve().parent} "
        f"(python {platform.python_version()} {sys.executable})"
    )


def match_threads_to_allocation() -> int | None:
    """Give torch as many CPU threads as SLURM gave this task CPUs, unless OMP_NUM_THREADS says.

    Where SLURM binds no CPUs (TaskPlugin=task/none), torch starts a thread per core of the
    node, and array tasks sharing a node fight over them (on this project's 2-core VM, two
    threads per process on busy cores made steps 20-40x slower). Returns the count set, or None.
    """
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not cpus.isdigit() or int(cpus) < 1:
        return None
    import torch

    torch.set_num_threads(int(cpus))
    log.info("torch CPU threads: %d (SLURM_CPUS_PER_TASK)", int(cpus))
    return int(cpus)
