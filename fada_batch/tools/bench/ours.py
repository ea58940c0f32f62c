"""Our recipe timed: the production training step (`training.step`) for a fixed number of
optimizer steps, after the frozen-feature cache (timed apart, per image).

    result = bench_ours(loaded, cfg, inputs, steps=10)      # -> RecipeResult
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fada_batch.config import JobConfig
from fada_batch.text import plural
from fada_batch.tools.bench.inputs import BenchInputs, make_encoder
from fada_batch.tools.bench.measure import PeakMemory, RecipeResult, sync
from fada_batch.training.model import LoadedModel, base_of

if TYPE_CHECKING:
    from fada_batch.training.features import FeatureSource


def bench_ours(
    loaded: LoadedModel,
    cfg: JobConfig,
    inputs: BenchInputs,
    *,
    steps: int,
    warmup: int = 1,
    load_s: float = 0.0,
) -> RecipeResult:
    """Time `steps` optimizer steps of the production training step after `warmup` steps.

    The samples' images go through the feature cache first (timed apart, per image). On CUDA
    out of memory the micro-batch is halved and the step retried, as in training.
    """
    from fada_batch.training.features import FeatureSource

    tc = cfg.train
    step_size = tc.batch_size * tc.grad_accum_steps
    features = FeatureSource(
        loaded, inputs.image_paths, cache=tc.feature_cache, max_pixels=cfg.data.max_image_pixels
    )
    names = list(inputs.image_paths)
    features.warm(names[:1])  # one-time start-up (kernels, allocator) outside the per-image time
    t0 = time.perf_counter()
    features.warm(names[1:])
    sync(loaded.device)
    feature_s = time.perf_counter() - t0
    timed = _time_steps(loaded, cfg, inputs, features, _full_steps(inputs, cfg, warmup + steps), warmup)
    if not tc.feature_cache:
        timed.notes.append("train.feature_cache is off: the vision tower runs in every step")
    return RecipeResult(
        recipe="ours",
        quantization=loaded.quantization,
        dtype=str(loaded.dtype).removeprefix("torch."),
        micro_batch=timed.micro,
        grad_accum=math.ceil(step_size / timed.micro),
        steps=steps,
        samples=timed.samples,
        seconds=round(timed.seconds, 3),
        samples_per_s=round(timed.samples / timed.seconds, 3),
        tokens_per_s=round(timed.padded / timed.seconds, 1),
        answer_prompt_tokens_per_s=round(timed.tokens / timed.seconds, 1),
        peak_memory_gb=timed.memory.gb,
        memory_kind=timed.memory.kind,
        load_s=round(load_s, 2),
        cpu_seconds=round(timed.cpu_seconds, 3),
        samples_per_cpu_s=round(timed.samples / timed.cpu_seconds, 3),
        feature_s_per_image=round(feature_s / max(1, len(names) - 1), 5) if tc.feature_cache else 0.0,
        gradient_checkpointing=checkpointing_on(loaded.model),
        notes=timed.notes,
    )


def _full_steps(inputs: BenchInputs, cfg: JobConfig, n: int) -> list[list[int]]:
    """The first `n` full optimizer steps of epoch 0, as training orders them.

    Raises:
        ValueError: the inputs make fewer than `n` full steps.
    """
    from fada_batch.training.step import epoch_steps

    tc = cfg.train
    step_size = tc.batch_size * tc.grad_accum_steps
    lengths = [len(e.input_ids) for e in inputs.encoded]
    plan = epoch_steps(
        lengths, seed=tc.seed, epoch=0, step_size=step_size, group_by_length=tc.group_by_length
    )
    plan = [s for s in plan if len(s) == step_size][:n]
    if len(plan) < n:
        raise ValueError(
            f"{plural(len(inputs.samples), 'sample')} make only {plural(len(plan), 'full step')} of {step_size}"
        )
    return plan


@dataclass
class _Timed:
    """What the steps after the warm-up did, and what they took."""

    seconds: float
    cpu_seconds: float
    samples: int
    tokens: int  # image + prompt + answer tokens, no padding
    padded: int  # tokens the language model processed, padding included
    micro: int  # the micro-batch at the end (smaller after an out-of-memory back-off)
    memory: PeakMemory
    notes: list[str]


def _time_steps(
    loaded: LoadedModel,
    cfg: JobConfig,
    inputs: BenchInputs,
    features: FeatureSource,
    plan: list[list[int]],
    warmup: int,
) -> _Timed:
    """Run `plan`'s optimizer steps (AdamW, gradient clipping, the OOM back-off, as training
    does) and time those after the first `warmup`."""
    from fada_batch.training.step import accumulate_step, micro_batches, run_with_oom_backoff, set_train_mode

    tc = cfg.train
    model, device = loaded.model, loaded.device
    encoder = make_encoder(loaded)
    micro = tc.batch_size
    lengths = [len(e.input_ids) for e in inputs.encoded]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    set_train_mode(model)
    notes: list[str] = []
    samples = tokens = padded = 0
    with PeakMemory(device) as mem:
        for i, step in enumerate(plan):
            if i == warmup:
                sync(device)
                t_start, c_start = time.perf_counter(), time.process_time()
            _, micro = run_with_oom_backoff(
                lambda m, step=step: accumulate_step(
                    model, features, inputs.samples, inputs.encoded, encoder, device, step, m
                ),
                micro,
                optimizer=optimizer,
                device=device,
                on_backoff=lambda m: notes.append(f"CUDA out of memory: micro-batch halved to {m}"),
            )
            if tc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if i >= warmup:
                samples += len(step)
                tokens += sum(lengths[j] for j in step)
                padded += sum(len(mb) * max(lengths[j] for j in mb) for mb in micro_batches(step, micro))
        sync(device)
        seconds = time.perf_counter() - t_start
        cpu_seconds = time.process_time() - c_start
    return _Timed(seconds, cpu_seconds, samples, tokens, padded, micro, mem, notes)


def checkpointing_on(model: Any) -> bool:
    lm = base_of(model).language_model
    # transformers 5.x renamed the flag and warns on the old name; older versions have only that
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lm), name) or name in vars(lm):
            return bool(getattr(lm, name))
    return False
