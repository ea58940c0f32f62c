"""Data parallelism: one process per GPU (or per CPU task), each on its shard of every step.

    ranks = distributed.init_from_env(backend="auto", timeout_s=1800)   # the launcher, once
    ranks = distributed.current()        # training: Ranks(rank, world), SINGLE when not started

Each optimizer step's sample list (`training.step.epoch_steps`, fixed by seed and epoch, so every
rank computes the same list) is cut as `step[rank::world]`; each rank's loss is its shard's
answer-token loss sum divided by the WHOLE step's token count, and one all-reduce (SUM) of the
LoRA gradients after backward gives every rank the gradient one process would compute over the
whole step, up to the order of float sums. No DistributedDataParallel wrapper: only the LoRA
parameters train, and they are few; one flat all-reduce per step is all DDP would do here.

A world of one (no process group) is `SINGLE`: every method is a no-op and training runs the
one-process code path unchanged. Training never learns where the ranks came from: the launcher
(`run.launch`) exports MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE from SLURM (submitit's
`TorchDistributedEnvironment`) and calls `init_from_env`; a test sets them by hand.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as tdist

log = logging.getLogger(__name__)

T = TypeVar("T")

BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: `rank` of `world`; `control` is a gloo group for the
    small CPU messages (flags, sums, the leader's word), whatever the gradients' backend."""

    rank: int = 0
    world: int = 1
    control: Any = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only one that writes (checkpoints, summary, final model, events, lock)."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world > 1

    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's part of `items`: every `world`-th one from `rank` (all of them alone)."""
        return list(items[self.rank :: self.world]) if self.parallel else list(items)

    def all_reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of `params` over the ranks, in one flat all-reduce.

        A rank whose shard was empty (the epoch's last step can be shorter than the world)
        contributes zeros; a parameter no rank gave a gradient keeps none, as in one process
        (AdamW skips it), hence one count per parameter at the end of the flat tensor.
        """
        if not self.parallel:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        had = torch.tensor([p.grad is not None for p in params], dtype=grads[0].dtype, device=grads[0].device)
        flat = torch.cat([g.reshape(-1) for g in grads] + [had])  # (N + P,) LoRA gradients, counts
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        counts = flat[-len(params) :].tolist()  # one device-to-host copy
        offset = 0
        for p, g, count in zip(params, grads, counts, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone() if count > 0 else None
            offset += n

    def sum(self, *values: float) -> tuple[float, ...]:
        """Each of `values` summed over the ranks (float64 on the control group)."""
        if not self.parallel:
            return tuple(values)
        t = torch.tensor(values, dtype=torch.float64)
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=self.control)
        return tuple(float(v) for v in t)

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request seen by one rank)."""
        if not self.parallel:
            return flag
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=self.control)
        return bool(t.item())

    def barrier(self) -> None:
        """Wait until every rank is here (e.g. rank 0's checkpoint is on disk)."""
        if self.parallel:
            tdist.barrier(group=self.control)

    def from_main(self, value: Any = None) -> Any:
        """Rank 0's `value` on every rank (a small picklable object)."""
        if not self.parallel:
            return value
        box = [value if self.is_main else None]
        tdist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]


SINGLE = Ranks()

_current: Ranks = SINGLE


def current() -> Ranks:
    """The ranks of this process (`SINGLE` unless `init_from_env` started a process group)."""
    return _current


def choose_backend(backend: str) -> str:
    """`auto`: nccl when this process sees a CUDA GPU, else gloo (CPU tasks, the tests)."""
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in BACKENDS:
        raise ValueError(f"cluster.dist_backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def init_from_env(*, backend: str = "auto", timeout_s: float = 1800) -> Ranks:
    """Start the process group from the env:// variables (MASTER_ADDR, MASTER_PORT, RANK,
    WORLD_SIZE) and return this process's `Ranks`; a WORLD_SIZE of 1 (or none) starts nothing.

    `timeout_s` bounds every collective: a rank that waits longer for a peer (one that hangs
    without dying; a dead peer's closed connection fails at once under gloo) raises.

    Raises:
        ValueError: an unknown backend.
        RuntimeError: the group could not be formed (torch's message: the address, the port).
    """
    global _current
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _current = SINGLE
        return SINGLE
    name = choose_backend(backend)
    if name == "nccl":  # one GPU per process: the launcher left this task one visible device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    tdist.init_process_group(backend=name, timeout=timedelta(seconds=timeout_s))
    control = tdist.new_group(backend="gloo") if name != "gloo" else tdist.group.WORLD
    _current = Ranks(rank=tdist.get_rank(), world=tdist.get_world_size(), control=control)
    log.info(
        "data parallel: rank %d of %d (%s, master %s:%s)",
        _current.rank,
        _current.world,
        name,
        os.environ.get("MASTER_ADDR"),
        os.environ.get("MASTER_PORT"),
    )
    return _current


def shutdown() -> None:
    """Leave the process group (end of a task); `current()` is `SINGLE` again."""
    global _current
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
    _current = SINGLE
