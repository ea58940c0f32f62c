"""`fada-batch bench`: ours, with `baseline` the seed's recipe on the same samples, then the
estimates; one JSON-able dict that `report.format_report` prints.

    result = run_bench(cfg, steps=10, baseline=True)
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
from typing import Any

import torch

from fada_batch.config import JobConfig
from fada_batch.tools.bench.estimates import estimate, estimate_counts
from fada_batch.tools.bench.inputs import category_inputs, load_for_bench, make_encoder, synthetic_inputs
from fada_batch.tools.bench.measure import free_memory, machine_info
from fada_batch.tools.bench.model import per_sample_flops
from fada_batch.tools.bench.ours import bench_ours
from fada_batch.tools.bench.scaling import ScalingSettings, scaling_block
from fada_batch.tools.bench.seed import bench_seed
from fada_batch.training.model import base_of


def run_bench(
    cfg: JobConfig,
    *,
    steps: int = 10,
    warmup: int = 1,
    baseline: bool = False,
    baseline_quantization: str = "8bit",
    category: str | None = None,
    images: int | None = None,
    answer_tokens: tuple[int, int] = (6, 24),
    threads: int | None = None,
    scaling: ScalingSettings | None = None,
) -> dict[str, Any]:
    """Measure ours (and with `baseline` the seed's recipe) on the same samples, then estimate.

    Args:
        steps: timed optimizer steps of ours; the seed runs as many samples at batch 1.
        warmup: untimed steps before (the seed gets two more samples than that).
        category: take the samples from this category's real data instead of synthetic ones.
        images: estimate for categories of this many images x 8 questions instead of the
            pre-flight's counts (no data needed).
        threads: torch CPU threads for the run (restored afterwards); None leaves torch's.
        scaling: GPU counts and bandwidths of the data-parallel estimate (`bench.scaling`);
            None: its defaults.
    Returns:
        A JSON-able dict; `format_report` prints it.
    """
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with tempfile.TemporaryDirectory(prefix="fada-bench-") as tmp:
            return _run(
                cfg,
                Path(tmp),
                steps=steps,
                warmup=warmup,
                baseline=baseline,
                baseline_quantization=baseline_quantization,
                category=category,
                images=images,
                answer_tokens=answer_tokens,
                scaling=scaling or ScalingSettings(),
            )
    finally:
        torch.set_num_threads(old_threads)


def _run(
    cfg: JobConfig,
    tmp: Path,
    *,
    steps: int,
    warmup: int,
    baseline: bool,
    baseline_quantization: str,
    category: str | None,
    images: int | None,
    answer_tokens: tuple[int, int],
    scaling: ScalingSettings,
) -> dict[str, Any]:
    step_size = cfg.train.batch_size * cfg.train.grad_accum_steps
    loaded, load_s = load_for_bench(
        cfg, quantization=cfg.model.quantization, gradient_checkpointing=cfg.model.gradient_checkpointing
    )
    encoder = make_encoder(loaded)
    seed_warmup = warmup + 1
    n = max((warmup + steps) * step_size, steps * step_size + seed_warmup if baseline else 0)
    if category:
        inputs = category_inputs(cfg, encoder, category, n)
    else:
        inputs = synthetic_inputs(
            encoder,
            template=cfg.data.prompt_template,
            n_samples=n,
            folder=tmp / "images",
            vocab_size=len(loaded.processor.tokenizer),
            answer_tokens=answer_tokens,
            seed=cfg.train.seed,
        )
    base_config = base_of(loaded.model).config
    lengths = [len(e.input_ids) for e in inputs.encoded]
    result: dict[str, Any] = {
        "job": cfg.name,
        "model": cfg.model.name_or_path,
        "inputs": {
            "source": inputs.source,
            "samples": len(inputs.samples),
            "images": len(inputs.image_paths),
            "image_size": base_config.vision_config.image_size,
            "tokens_min": min(lengths),
            "tokens_mean": round(sum(lengths) / len(lengths), 1),
            "tokens_max": max(lengths),
            "num_query_tokens": base_config.num_query_tokens,
        },
        "machine": machine_info(loaded.device),
        "time_min_configured": cfg.cluster.time_min,
        "flops_per_sample": per_sample_flops(base_config, sum(lengths) / len(lengths)),
    }
    ours = bench_ours(loaded, cfg, inputs, steps=steps, warmup=warmup, load_s=load_s)
    result["ours"] = dataclasses.asdict(ours)
    result["scaling"] = _scaling(loaded.model, ours.seconds / ours.steps, step_size, scaling)
    if loaded.quantization_reason:
        result["ours"]["notes"].append(f"quantization auto: {loaded.quantization_reason}")
    del loaded
    free_memory()
    counts = estimate_counts(cfg, images)
    ests = estimate(cfg, ours.samples_per_s, ours.feature_s_per_image, load_s=ours.load_s, counts=counts)
    result["estimates"] = [e.to_dict() for e in ests]
    if baseline:
        seed = bench_seed(
            cfg,
            inputs,
            samples=steps * step_size,
            warmup=seed_warmup,
            quantization=baseline_quantization,
            work_dir=tmp,
        )
        free_memory()
        result["seed"] = dataclasses.asdict(seed)
        result["ratio"] = round(ours.samples_per_s / seed.samples_per_s, 2)
        seed_est = estimate(cfg, seed.samples_per_s, 0.0, load_s=seed.load_s, counts=counts)
        for e, s in zip(result["estimates"], seed_est, strict=True):
            e["seed_total_s"] = s.total_s  # the vision side runs per sample: no feature cache
    return result


def _scaling(model: Any, step_s: float, batch: int, settings: ScalingSettings) -> dict[str, Any]:
    """The data-parallel estimate (`bench.scaling`) from the measured step and the model's
    trainable parameters; a gradient has its parameter's dtype (bytes: the mean, if mixed)."""
    grads = [p for p in model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in grads)
    total = sum(p.numel() * p.element_size() for p in grads)
    return scaling_block(
        settings, step_s=step_s, batch=batch, grad_numel=numel, grad_bytes=total / max(1, numel)
    )
