"""What a recipe measures and where: peak memory of a phase, the figures of its timed steps
(`RecipeResult`), and the machine they come from.

    with PeakMemory(device) as mem:
        ...                                  # the timed steps
    print(mem.gb, mem.kind)                  # GPU max-allocated, or the process's RSS
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class PeakMemory:
    """Peak memory of a phase: GPU max-allocated on CUDA, else the process's RSS.

    RSS is sampled every 20 ms in a thread (the kernel's own peak, ru_maxrss, cannot be reset
    between the two recipes of one process).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "gpu_max_allocated" if device.type == "cuda" else "process_rss"
        self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self.peak = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(0.02):
                    self.peak = max(self.peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()

    @property
    def gb(self) -> float:
        return round(self.peak / 2**30, 3)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA), so that a clock read after it counts it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory() -> None:
    """Drop unreachable objects and hand the CUDA cache back (between the two recipes)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass
class RecipeResult:
    """What one recipe did in the timed steps."""

    recipe: str  # "ours" or "seed"
    quantization: str
    dtype: str
    micro_batch: int  # rows per forward pass
    grad_accum: int  # forward passes per optimizer step
    steps: int  # timed optimizer steps (after warm-up)
    samples: int  # question/answer pairs in the timed steps
    seconds: float
    samples_per_s: float
    tokens_per_s: float  # tokens the language model processes, padding included
    answer_prompt_tokens_per_s: float  # the same without padding (image + prompt + answer)
    peak_memory_gb: float
    memory_kind: str
    load_s: float  # from_pretrained + LoRA
    # process CPU time of the timed steps: on a shared CPU, the work done regardless of what
    # else runs (wall-clock time also counts waiting for a core)
    cpu_seconds: float = 0.0
    samples_per_cpu_s: float = 0.0
    feature_s_per_image: float = 0.0  # ours: the frozen-feature cache, per image
    gradient_checkpointing: bool = False
    notes: list[str] = field(default_factory=list)


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the figures come from: the device, CPU, threads and library versions."""
    from fada_batch.training.summary import device_info, library_versions

    info = device_info(device)
    info.pop("host", None)
    info["cpu_model"] = _cpu_model()
    info["cpus"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    info["platform"] = platform.platform()
    info["versions"] = library_versions()
    with contextlib.suppress(OSError, AttributeError):
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    return info


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()
