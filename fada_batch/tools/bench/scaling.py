"""An ESTIMATE of a training step on N GPUs (data parallel) from the one measured on one.

    rows = scale_estimate(step_s=0.8, batch=16, grad_numel=2_621_440, grad_bytes=4,
                          gpus=[1, 2, 4, 8, 16], gpus_per_node=8)

Nothing here is measured on N GPUs: it is arithmetic on the bench's one-device figure, under
these assumptions (printed with the figures):

- The effective batch stays: `batch` samples per optimizer step, split over the N ranks, each
  taking ceil(batch / N); the step's compute is the slowest rank's, ceil(batch / N) / batch of
  the measured step (compute per sample as measured, whatever the smaller micro-batch: a GPU
  given a few samples per step is used less well, so this part is optimistic at large N).
- After the backward pass, the LoRA gradients (trainable parameters x bytes per gradient) are
  all-reduced with a ring: each rank sends and receives 2(N-1)/N of them, in 2(N-1) messages.
  Time = volume / bandwidth + 2(N-1) x latency, not overlapped with compute (an upper bound:
  DDP overlaps part of it with the backward pass).
- Within one node the ring runs at the GPU interconnect's bandwidth (NVLink by default); once
  it spans nodes, its slowest link, the network, sets the pace for the whole ring (NCCL's
  hierarchical algorithms do better: again an upper bound on the time).
- Everything else of a step (optimizer update of the LoRA weights) is in the measured figure.

Default bandwidths are all-reduce bus bandwidths NCCL reaches on common hardware, rounded
down: 100 GB/s within a node (NVLink; an H100 node's NVLink reaches several times that, PCIe
4.0 x16 about 25) and 10 GB/s across nodes (a 100 Gb/s InfiniBand or Ethernet link is 12.5 GB/s
on the wire). Both are flags of `fada-batch bench` for a site's own figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

INTRA_NODE_GBPS = 100.0  # GB/s, ring all-reduce bus bandwidth within a node (NVLink)
INTER_NODE_GBPS = 10.0  # GB/s, across nodes (100 Gb/s network)
LATENCY_US = 10.0  # per ring message (one hop), microseconds
DEFAULT_GPUS = (1, 2, 4, 8)  # within a node; `gpu_counts` adds 2 and 4 full nodes
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class ScaleRow:
    """The estimated optimizer step on `gpus` GPUs over `nodes` nodes."""

    gpus: int
    nodes: int
    per_rank_batch: int  # ceil(batch / gpus): the slowest rank's samples per step
    compute_s: float  # the measured step x per_rank_batch / batch
    allreduce_bytes: int  # sent (and received) per rank per step: 2(N-1)/N x the gradients
    allreduce_s: float
    link: str  # "none", "intra-node" or "network": the bandwidth the ring runs at
    step_s: float  # compute + all-reduce
    samples_per_s: float
    speedup: float  # over the measured one-GPU step
    efficiency: float  # speedup / gpus

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ring_allreduce_bytes(grad_bytes_total: int, n: int) -> int:
    """Bytes each rank sends (and receives) in a ring all-reduce of `grad_bytes_total`:
    2(N-1)/N of it (reduce-scatter, then all-gather; Patarasuk & Yuan 2009); 0 for one rank."""
    return 0 if n <= 1 else math.ceil(2 * (n - 1) * grad_bytes_total / n)


def allreduce_seconds(volume: int, n: int, gbps: float, latency_us: float = LATENCY_US) -> float:
    """`volume` bytes at `gbps` GB/s (1e9 bytes/s), plus 2(N-1) messages of `latency_us` each."""
    if n <= 1:
        return 0.0
    return volume / (gbps * 1e9) + 2 * (n - 1) * latency_us * 1e-6


def scale_estimate(
    *,
    step_s: float,
    batch: int,
    grad_numel: int,
    grad_bytes: float,
    gpus: list[int] | tuple[int, ...] = DEFAULT_GPUS,
    gpus_per_node: int = GPUS_PER_NODE,
    intra_gbps: float = INTRA_NODE_GBPS,
    inter_gbps: float = INTER_NODE_GBPS,
    latency_us: float = LATENCY_US,
) -> list[ScaleRow]:
    """One `ScaleRow` per GPU count (see the module's assumptions).

    Args:
        step_s: the measured optimizer step on one GPU, `batch` samples.
        grad_numel, grad_bytes: trainable parameters and bytes per gradient element.
        gpus_per_node: GPUs in one node; more GPUs than that span ceil(N / it) nodes.

    Raises:
        ValueError: a non-positive step, batch, GPU count or bandwidth.
    """
    bad = [
        f"{k} must be > 0, got {v}"
        for k, v in (
            ("step_s", step_s),
            ("batch", batch),
            ("gpus_per_node", gpus_per_node),
            ("intra-node bandwidth", intra_gbps),
            ("network bandwidth", inter_gbps),
        )
        if v <= 0
    ] + [f"a GPU count must be >= 1, got {n}" for n in gpus if n < 1]
    if bad:
        raise ValueError("scaling estimate: " + "; ".join(bad))
    total = math.ceil(grad_numel * grad_bytes)
    rows = []
    for n in gpus:
        nodes = math.ceil(n / gpus_per_node)
        per_rank = math.ceil(batch / n)
        compute = step_s * per_rank / batch
        volume = ring_allreduce_bytes(total, n)
        link = "none" if n == 1 else ("intra-node" if nodes == 1 else "network")
        ar = allreduce_seconds(volume, n, intra_gbps if nodes == 1 else inter_gbps, latency_us)
        step = compute + ar
        rows.append(
            ScaleRow(
                gpus=n,
                nodes=nodes,
                per_rank_batch=per_rank,
                compute_s=compute,
                allreduce_bytes=volume,
                allreduce_s=ar,
                link=link,
                step_s=step,
                samples_per_s=batch / step,
                speedup=step_s / step,
                efficiency=step_s / step / n,
            )
        )
    return rows


@dataclass(frozen=True)
class ScalingSettings:
    """What `fada-batch bench` estimates the data-parallel step for (its flags)."""

    gpus: tuple[int, ...] | None = None  # None: `gpu_counts(gpus_per_node)`
    gpus_per_node: int = GPUS_PER_NODE
    intra_gbps: float = INTRA_NODE_GBPS
    inter_gbps: float = INTER_NODE_GBPS
    latency_us: float = LATENCY_US

    def __post_init__(self) -> None:
        bad = [
            f"{flag} must be > 0, got {v}"
            for flag, v in (
                ("--gpus-per-node", self.gpus_per_node),
                ("--nvlink-gbps", self.intra_gbps),
                ("--network-gbps", self.inter_gbps),
            )
            if v <= 0
        ]
        bad += [f"--latency-us must be >= 0, got {self.latency_us}"] if self.latency_us < 0 else []
        bad += [f"--gpus: a GPU count must be >= 1, got {n}" for n in self.gpus or () if n < 1]
        if bad:
            raise ValueError("data-parallel estimate: " + "; ".join(bad))


def gpu_counts(gpus_per_node: int) -> tuple[int, ...]:
    """1, 2, 4, 8 GPUs (those a node holds), then 2 and 4 full nodes."""
    within = [n for n in DEFAULT_GPUS if n <= gpus_per_node]
    return tuple(sorted({*within, gpus_per_node, 2 * gpus_per_node, 4 * gpus_per_node}))


def scaling_block(
    settings: ScalingSettings, *, step_s: float, batch: int, grad_numel: int, grad_bytes: float
) -> dict[str, Any]:
    """The bench result's `scaling` entry: the inputs, the assumptions' numbers and one row
    per GPU count (`scale_estimate`)."""
    gpus = settings.gpus or gpu_counts(settings.gpus_per_node)
    rows = scale_estimate(
        step_s=step_s,
        batch=batch,
        grad_numel=grad_numel,
        grad_bytes=grad_bytes,
        gpus=gpus,
        gpus_per_node=settings.gpus_per_node,
        intra_gbps=settings.intra_gbps,
        inter_gbps=settings.inter_gbps,
        latency_us=settings.latency_us,
    )
    return {
        "estimate": True,  # arithmetic on the one-device step, not measured on N GPUs
        "measured_step_s": round(step_s, 6),
        "batch": batch,
        "trainable_parameters": grad_numel,
        "bytes_per_gradient": round(grad_bytes, 3),
        "gradient_bytes": math.ceil(grad_numel * grad_bytes),
        "gpus_per_node": settings.gpus_per_node,
        "intra_node_gbps": settings.intra_gbps,
        "inter_node_gbps": settings.inter_gbps,
        "latency_us": settings.latency_us,
        "rows": [r.to_dict() for r in rows],
    }
