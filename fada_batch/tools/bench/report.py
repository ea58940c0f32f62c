"""The bench result as the table `fada-batch bench` prints.

    print(format_report(run_bench(cfg)))

Per recipe a row, the ratio, notes, then the estimate per category.
"""

from __future__ import annotations

from typing import Any

from fada_batch.text import plural
from fada_batch.tools.bench.estimates import REFERENCE_IMAGES


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_report(result: dict[str, Any]) -> str:
    """The bench result as a table: per recipe, the ratio, then the estimate per category."""
    lines = _head_lines(result) + _recipe_lines(result) + _estimate_lines(result)
    if result.get("scaling"):
        lines += scaling_lines(result["scaling"], result["machine"].get("type", ""))
    return "\n".join(lines)


def _head_lines(result: dict[str, Any]) -> list[str]:
    """Where it ran, on what inputs, and the header of the recipes' table."""
    m, inp = result["machine"], result["inputs"]
    where = m.get("name", m.get("type"))
    if m.get("type") == "cpu":
        where = (
            f"CPU {m['cpu_model']} ({plural(m['cpus'], 'CPU')}, {plural(m['torch_threads'], 'torch thread')})"
        )
    elif m.get("memory_gb"):
        where = f"{where} ({m['memory_gb']} GB)"
    fl = result["flops_per_sample"]
    return [
        f"bench: job {result['job']}, model {result['model']}",
        f"device: {where}; torch {m['versions'].get('torch')}, transformers "
        f"{m['versions'].get('transformers')}",
        f"inputs: {inp['source']}, {plural(inp['samples'], 'sample')} on {plural(inp['images'], 'image')} "
        f"({inp['image_size']} px), {inp['tokens_min']}-{inp['tokens_max']} tokens per sample "
        f"(mean {inp['tokens_mean']}, {inp['num_query_tokens']} of them image tokens)",
        f"per sample: vision forward / language-model forward = {fl['vision_over_lm']} "
        f"({fl['vision_forward'] / 1e9:.3g} / {fl['lm_forward'] / 1e9:.3g} GFLOP)",
        "",
        f"{'recipe':<6} {'quant':<6} {'dtype':<9} {'batch':<10} {'ckpt':<5} {'samples':>7} "
        f"{'samples/s':>10} {'tokens/s':>10} {'peak mem':>14}",
    ]


def _recipe_lines(result: dict[str, Any]) -> list[str]:
    """A row per recipe, the ratio, CPU-time and token figures, the feature cache, load time, notes."""
    m, ours = result["machine"], result["ours"]
    lines: list[str] = []
    for key in ("ours", "seed"):
        r = result.get(key)
        if r is None:
            continue
        batch = f"{r['micro_batch']}x{r['grad_accum']}"
        mem = f"{r['peak_memory_gb']:.2f} GB {'GPU' if r['memory_kind'].startswith('gpu') else 'RSS'}"
        lines.append(
            f"{key:<6} {r['quantization']:<6} {r['dtype']:<9} {batch:<10} "
            f"{'yes' if r['gradient_checkpointing'] else 'no':<5} {r['samples']:>7} "
            f"{r['samples_per_s']:>10.2f} {r['tokens_per_s']:>10.0f} {mem:>14}"
        )
    if "ratio" in result:
        lines.append(f"ratio (samples/s, ours / seed): {result['ratio']:.1f}x")
    if m.get("type") == "cpu":
        cpu = f"per CPU-second of this process: ours {ours['samples_per_cpu_s']:.2f} samples"
        if "seed" in result:
            seed_cpu = result["seed"]["samples_per_cpu_s"]
            cpu += f", seed {seed_cpu:.2f}; ratio {ours['samples_per_cpu_s'] / seed_cpu:.1f}x"
        lines.append(cpu + " (not affected by other load on a shared machine)")
    lines.append(
        f"tokens/s counts padding; without it ours {ours['answer_prompt_tokens_per_s']:.0f}"
        + (f", seed {result['seed']['answer_prompt_tokens_per_s']:.0f}" if "seed" in result else "")
    )
    if ours["feature_s_per_image"]:
        lines.append(
            f"feature cache: {ours['feature_s_per_image'] * 1000:.1f} ms per image, once per image "
            "(reused by its 8 questions in every epoch)"
        )
    lines.append(
        f"model load + LoRA: ours {ours['load_s']:.1f} s (the process's first import of transformers "
        "and peft included)" + (f", seed {result['seed']['load_s']:.1f} s" if "seed" in result else "")
    )
    for key in ("ours", "seed"):
        for note in result.get(key, {}).get("notes", []):
            lines.append(f"note ({key}): {note}")
    return lines


def _estimate_lines(result: dict[str, Any]) -> list[str]:
    """The estimated wall time and sbatch --time per category, and one limit for the array."""
    lines = [
        "",
        "estimated wall time per category (sbatch --time = estimate x 1.3 + 10 min, rounded up to 5 min):",
    ]
    seed_col = "seed" in result
    lines.append(
        f"{'category':<18} {'images':>7} {'QA pairs':>9} {'train pairs':>11} {'estimate':>10} "
        f"{'--time':>10}" + (f" {'seed est.':>10}" if seed_col else "")
    )
    for e in result["estimates"]:
        if not e["total_s"]:
            lines.append(f"{e['category']:<18} {e['status']}")
            continue
        flag = "" if e["within_time_min"] else "  > cluster.time_min: runs in requeued parts"
        lines.append(
            f"{e['category']:<18} {e['images']:>7} {e['qa_pairs']:>9} {e['train_pairs']:>11} "
            f"{_hms(e['total_s']):>10} {e['sbatch_time']:>10}"
            + (f" {_hms(e['seed_total_s']):>10}" if seed_col else "")
            + flag
        )
    limits = [e["time_min"] for e in result["estimates"] if e["time_min"]]
    if limits:
        lines.append(
            f"one limit for the whole array: -p cluster.time_min={max(limits)} "
            f"(configured: {result['time_min_configured']})"
        )
    if any(e["status"] == "reference" for e in result["estimates"]):
        lines.append(
            f"(no label sheets under data.root: 'reference' is {REFERENCE_IMAGES:,} images x 8 "
            "questions, the seed's Abdomen; --images N estimates for N images)"
        )
    return lines


def scaling_lines(sc: dict[str, Any], device_type: str) -> list[str]:
    """The data-parallel ESTIMATE (`bench.scaling`): inputs, one row per GPU count, assumptions."""
    mb = sc["gradient_bytes"] / 1e6
    batch = sc["batch"]
    where = " (on the CPU: read GPU as a device like this one)" if device_type == "cpu" else ""
    lines = [
        "",
        "data-parallel ESTIMATE for N GPUs (arithmetic, not measured on N GPUs):",
        f"  the optimizer step measured here{where}, {sc['measured_step_s']:.4g} s for {batch} "
        "samples, split over N ranks, plus a ring all-reduce of the LoRA gradients",
        f"  gradients: {sc['trainable_parameters']:,} trainable parameters x {sc['bytes_per_gradient']:g} "
        f"bytes = {mb:.2f} MB per step; each rank sends and receives 2(N-1)/N of it",
        f"  bandwidth: {sc['intra_node_gbps']:g} GB/s within a node (NVLink), {sc['inter_node_gbps']:g} GB/s "
        f"across nodes (network), {sc['latency_us']:g} us per message, {sc['gpus_per_node']} GPUs per "
        "node (--nvlink-gbps, --network-gbps, --latency-us, --gpus-per-node set them)",
        f"  {'GPUs':>5} {'nodes':>5} {'per GPU':>7} {'compute s':>10} {'all-reduce MB':>13} "
        f"{'all-reduce ms':>13} {'link':<10} {'step s':>9} {'samples/s':>10} {'speed-up':>8} {'efficiency':>10}",
    ]
    for r in sc["rows"]:
        lines.append(
            f"  {r['gpus']:>5} {r['nodes']:>5} {r['per_rank_batch']:>7} {r['compute_s']:>10.4g} "
            f"{r['allreduce_bytes'] / 1e6:>13.2f} {r['allreduce_s'] * 1e3:>13.3f} {r['link']:<10} "
            f"{r['step_s']:>9.4g} {r['samples_per_s']:>10.2f} {r['speedup']:>7.2f}x {r['efficiency']:>10.2f}"
        )
    lines.append(
        f"  assumes: the effective batch stays {batch} samples per step (train.batch_size x "
        f"grad_accum_steps), the slowest rank taking ceil({batch}/N); compute per sample as measured "
        f"at {batch} per step (a GPU given fewer samples is used less well: optimistic at large N); "
        "the all-reduce not overlapped with the backward pass and, across nodes, at the network's "
        "pace for the whole ring (both make its time an upper bound); model loading, the feature "
        "cache and evaluation not included"
    )
    idle = [r["gpus"] for r in sc["rows"] if r["gpus"] > batch]
    if idle:
        lines.append(
            f"  with {', '.join(map(str, idle))} GPUs some have no sample of a {batch}-sample step: "
            "raise train.batch_size (or grad_accum_steps) to use them"
        )
    return lines
