#!/usr/bin/env python
"""Our training recipe against the seed's, on the full blip2-opt-2.7b architecture, on one GPU.

    python scripts/gpu_benchmark.py --out gpu_benchmark.json           # one H100: under 8 min
    python scripts/gpu_benchmark.py --scale tiny --device cpu --out b.json   # smoke test, CPU

No download and no tokenizer: the model is built from blip2-opt-2.7b's published config values
(`fada_batch.tools.bench.model.BLIP2_OPT_27B`, with the package's `blip2_config` and
`build_random_model`) with random weights, directly on the device in bf16 (never materialised on
the CPU; parameter counts come from a copy on the meta device). Timing does not depend on the
weights. Inputs are random token ids with realistic lengths: prompts of 15-28 text tokens
after the 32 image tokens and BOS (48-61 in all; the standard questions through the prompt
template), answers of 10-30 tokens, then EOS.

OURS: the production step (`fada_batch.training.step`): frozen features computed once per image
(vision -> Q-Former -> projection, `image_features`) for 32 images x 8 questions,
length-grouped steps of 16 dynamically padded rows, token-mean loss (`accumulate_step`), AdamW,
LoRA r=8 on q_proj/v_proj, bf16 weights.

SEED: 8-bit weights (bitsandbytes LLM.int8; bf16 where bitsandbytes cannot run 8-bit on this
GPU: the JSON says which), batch 1, the prompt padded to 256 tokens and the answer to 128 as
separate labels, pixel values through the full model in every step, HF `Trainer` with
gradient checkpointing (`fada_batch.tools.bench.seed.time_trainer`, the same code `fada-batch bench
--baseline` runs).

Model FLOP utilisation (MFU) = model FLOPs per second / the card's dense bf16 peak, with
model FLOPs per sample (N = parameters, T = tokens the language model processes, padding
included; activation recompute from gradient checkpointing not counted, as in PaLM's MFU):
  language model, LoRA training: 4 N_lm T (forward 2 N T; backward 2 N T for the activation
      gradients; frozen weights need no weight gradients, LoRA's own are < 1% and left out);
  vision side, frozen, forward only: 2 N_vision (257 tokens) + 2 N_qformer (32 queries), once
      per sample for the seed, once per image (in the feature cache, timed apart) for ours.
  Attention's T^2 terms are left out (under 2% at T <= 256).
`useful_tflops_per_s` counts the same work for both recipes (real tokens only, vision once per
image), so its ratio equals the samples/s ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout

from fada_batch.data.samples import Sample
from fada_batch.tools.bench.measure import free_memory, sync
from fada_batch.tools.bench.model import (
    BLIP2_OPT_27B,
    blip2_config,
    build_random_model,
    parameter_counts,
    vision_forward_flops,
)
from fada_batch.tools.bench.seed import SEED_ANSWER_LEN, SEED_PROMPT_LEN, time_trainer
from fada_batch.training.collate import Encoded
from fada_batch.training.model import LoadedModel, apply_lora, image_features, quantization_config
from fada_batch.training.step import accumulate_step, epoch_steps, set_train_mode

FULL = BLIP2_OPT_27B  # Salesforce/blip2-opt-2.7b's architecture (`tools.bench.model`)
# the same sections at a smoke-test size (--scale tiny)
TINY = {
    "vision": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=56,
        patch_size=14,
    ),
    "qformer": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256),
    "text": dict(
        hidden_size=64,
        num_hidden_layers=2,
        ffn_dim=256,
        num_attention_heads=4,
        vocab_size=1000,
        max_position_embeddings=512,
        word_embed_proj_dim=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=2,
    ),
    "num_query_tokens": 32,
    "image_token_index": 999,
}
# Dense bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; first match wins.
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
    ("A10G", 70.0),
    ("A10", 125.0),
    ("RTX 4090", 165.0),
    ("RTX A6000", 155.0),
)
PROMPT_TEXT_TOKENS = (15, 28)
ANSWER_TOKENS = (10, 30)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="JSON file for the figures")
    p.add_argument("--scale", choices=("full", "tiny"), default="full")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--steps", type=int, help="timed optimizer steps of ours (default 30; tiny 3)")
    p.add_argument("--seed-steps", type=int, help="timed steps of the seed (default 40; tiny 6)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each recipe")
    p.add_argument("--batch", type=int, default=16, help="our micro-batch (default 16)")
    p.add_argument("--images", type=int, default=32, help="images in the feature cache (x 8 questions)")
    p.add_argument(
        "--seed-quantization",
        choices=("auto", "8bit", "none"),
        default="auto",
        help="auto: 8bit when bitsandbytes runs it on this GPU, else none (always none on CPU)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="weights (auto: bf16 on a GPU that has it, else fp32)",
    )
    p.add_argument(
        "--ours-only", action="store_true", help="skip the seed's recipe (e.g. to measure our memory alone)"
    )
    args = p.parse_args(argv)
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the seed's timing starts at the end of a warm-up step)")
    tiny = args.scale == "tiny"
    args.steps = args.steps or (3 if tiny else 30)
    args.seed_steps = args.seed_steps or (6 if tiny else 40)
    return args


def peak_tflops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    return name, next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None  # RSS is not per phase; the CPU run is a smoke test
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def make_samples(n_images: int, config: Any, g: torch.Generator) -> tuple[list[Sample], list[Encoded]]:
    """8 questions per image, each `[<image>*32] BOS prompt answer EOS` with random text ids."""
    tc = config.text_config
    q, image_id = config.num_query_tokens, config.image_token_id
    samples, encoded = [], []
    for i in range(n_images):
        for qi in range(8):
            n_p = int(torch.randint(PROMPT_TEXT_TOKENS[0], PROMPT_TEXT_TOKENS[1] + 1, (), generator=g))
            n_a = int(torch.randint(ANSWER_TOKENS[0], ANSWER_TOKENS[1] + 1, (), generator=g))
            text = torch.randint(4, min(tc.vocab_size, image_id), (n_p + n_a,), generator=g).tolist()
            prompt = [image_id] * q + [tc.bos_token_id] + text[:n_p]
            samples.append(Sample(f"img{i:03d}", qi, "", ""))
            encoded.append(Encoded([*prompt, *text[n_p:], tc.eos_token_id], len(prompt)))
    return samples, encoded


class SavedActivations:
    """Bytes that autograd keeps for the backward pass during a forward (distinct storages,
    weights left out): the activation memory of a training step, the same on any device,
    which a CPU's resident size does not show (its kernels keep their own weight copies)."""

    def __init__(self, model: Any) -> None:
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self._hooks: Any = None

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.storages[ptr] = t.untyped_storage().nbytes()
        return t

    def __enter__(self) -> SavedActivations:
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._hooks.__exit__(*exc)


class CachedFeatures:
    """The feature cache's interface (`get`) over precomputed features."""

    def __init__(self, cache: dict[str, torch.Tensor]) -> None:
        self.cache = cache

    def get(self, names: list[str]) -> torch.Tensor:
        return torch.stack([self.cache[n] for n in names])  # (B, Q, H)


def run_ours(
    model: Any,
    config: Any,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    flops: dict[str, float],
) -> tuple[dict[str, Any], Any]:
    """Our recipe on `model`; returns the figures and the LoRA-wrapped model."""
    g = torch.Generator().manual_seed(0)
    vc = config.vision_config
    pixels = torch.randn(args.images, 3, vc.image_size, vc.image_size, generator=g).to(device, dtype)
    loaded = LoadedModel(model, None, device, dtype, "none", "random blip2-opt-2.7b architecture")
    model = apply_lora(
        loaded, r=8, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"], modules_to_save=[]
    )
    image_features(model, pixels[:1])  # CUDA kernels and cuBLAS start up outside the timing
    reset_peak(device)
    t0 = time.perf_counter()
    cache = {}
    for i in range(0, args.images, 16):
        feats = image_features(model, pixels[i : i + 16])  # (b, Q, H)
        cache.update({f"img{i + j:03d}": f for j, f in enumerate(feats)})
    sync(device)
    feature_s = time.perf_counter() - t0
    samples, encoded = make_samples(args.images, config, g)
    lengths = [len(e.input_ids) for e in encoded]
    plan: list[list[int]] = []
    epoch = 0
    while len(plan) < args.warmup + args.steps:  # more epochs of the same samples when needed
        steps = epoch_steps(lengths, seed=0, epoch=epoch, step_size=args.batch, group_by_length=True)
        plan += [s for s in steps if len(s) == args.batch]
        epoch += 1
    plan = plan[: args.warmup + args.steps]
    encoder = SimpleNamespace(
        pad_token_id=config.text_config.pad_token_id,
        image_token_id=config.image_token_id,
        num_query_tokens=config.num_query_tokens,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    set_train_mode(model)
    features = CachedFeatures(cache)
    real = padded = 0
    saved = SavedActivations(model)
    for i, step in enumerate(plan):
        if i == args.warmup:
            sync(device)
            t_start = time.perf_counter()
        with saved if i == 0 else contextlib.nullcontext():  # the first (warm-up) step only
            accumulate_step(model, features, samples, encoded, encoder, device, step, args.batch)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            real += sum(lengths[j] for j in step)
            padded += len(step) * max(lengths[j] for j in step)
    sync(device)
    seconds = time.perf_counter() - t_start
    saved_tokens = len(plan[0]) * max(lengths[j] for j in plan[0])  # padded rows of that step
    n = args.steps * args.batch
    model_flops = 4 * flops["n_lm"] * padded
    return {
        "recipe": "ours",
        "quantization": "none",
        "dtype": str(dtype).removeprefix("torch."),
        "batch": args.batch,
        "steps": args.steps,
        "samples": n,
        "seconds": round(seconds, 3),
        "samples_per_s": round(n / seconds, 4),
        "tokens_per_s": round(padded / seconds, 1),
        "real_tokens_per_s": round(real / seconds, 1),
        "feature_cache_s": round(feature_s, 3),
        "feature_s_per_image": round(feature_s / args.images, 5),
        "peak_memory_gb": peak_gb(device),
        "saved_activations_gb": round(saved.nbytes / 2**30, 3),
        "saved_activations_tokens": saved_tokens,
        "model_tflops_per_s": round(model_flops / seconds / 1e12, 4),
        "useful_tflops_per_s": round(useful_flops(flops, real / n, n) / seconds / 1e12, 4),
    }, model


def useful_flops(flops: dict[str, float], mean_tokens: float, n: int) -> float:
    """The training work itself: real tokens only, the vision side once per image (8 questions)."""
    return n * (4 * flops["n_lm"] * mean_tokens + flops["vision_forward"] / 8)


def seed_model(
    model: Any, config: Any, args: argparse.Namespace, device: torch.device, dtype: torch.dtype, tmp: Path
) -> tuple[Any, str, list[str]]:
    """The seed's model: 8-bit from a saved copy of the same random weights, else `model`."""
    notes = []
    want = args.seed_quantization
    if want == "auto":
        want = "8bit" if device.type == "cuda" else "none"
    if want == "8bit":
        try:
            from transformers import Blip2ForConditionalGeneration

            model.save_pretrained(tmp / "model")
            del model
            free_memory()
            model = Blip2ForConditionalGeneration.from_pretrained(
                tmp / "model",
                dtype=dtype,
                quantization_config=quantization_config("8bit", dtype),
                device_map={"": device.index or 0} if device.type == "cuda" else {"": "cpu"},
            )
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
        except (ImportError, RuntimeError, ValueError) as e:
            if args.seed_quantization == "8bit":
                raise
            notes.append(f"8-bit unavailable ({type(e).__name__}: {e}); the seed ran in {dtype}")
            want = "none"
            model = build_random_model(config, device, dtype)
    loaded = LoadedModel(model, None, device, dtype, want, "random blip2-opt-2.7b architecture")
    model = apply_lora(
        loaded,
        r=8,
        alpha=16,
        dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=[],
        gradient_checkpointing=True,
    )
    model.enable_input_require_grads()  # as prepare_model_for_kbit_training did in the seed's recipe
    return model, want, notes


def seed_dataset(config: Any, n: int, g: torch.Generator) -> list[dict[str, torch.Tensor]]:
    """The seed's inputs: prompt padded to 256 (image tokens included), answer labels padded to
    128 with unmasked pads (its bug, kept for timing only), pixel values for every sample."""
    tc, vc = config.text_config, config.vision_config
    _, encoded = make_samples(math.ceil(n / 8), config, g)
    items = []
    for e in encoded[:n]:
        prompt, answer = e.input_ids[: e.prompt_len], e.input_ids[e.prompt_len : -1]
        ids = torch.full((SEED_PROMPT_LEN,), tc.pad_token_id)
        ids[: len(prompt)] = torch.tensor(prompt)
        mask = torch.zeros(SEED_PROMPT_LEN, dtype=torch.long)
        mask[: len(prompt)] = 1
        labels = torch.full((SEED_ANSWER_LEN,), tc.pad_token_id)
        labels[: len(answer) + 1] = torch.tensor([tc.bos_token_id, *answer])
        pixels = torch.randn(3, vc.image_size, vc.image_size, generator=g)
        items.append({"input_ids": ids, "attention_mask": mask, "pixel_values": pixels, "labels": labels})
    return items


def run_seed(
    model: Any,
    config: Any,
    args: argparse.Namespace,
    device: torch.device,
    dtype: torch.dtype,
    flops: dict[str, float],
    quantization: str,
    notes: list[str],
    tmp: Path,
) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    items = seed_dataset(config, args.warmup + args.seed_steps, g)
    pad = config.text_config.pad_token_id
    # prompt + answer + EOS tokens as ours sees them (the labels' BOS stands in for the EOS)
    real = sum(
        int(it["attention_mask"].sum()) + int((it["labels"] != pad).sum()) for it in items[args.warmup :]
    )
    timing = time_trainer(
        model,
        items,
        device=device,
        warmup=args.warmup,
        learning_rate=1e-4,
        seed=0,
        output_dir=tmp / "trainer",
    )
    seconds, timed = timing.seconds, timing.steps
    per_sample = 4 * flops["n_lm"] * SEED_PROMPT_LEN + flops["vision_forward"]
    return {
        "recipe": "seed",
        "quantization": quantization,
        "dtype": str(dtype).removeprefix("torch."),
        "batch": 1,
        "steps": timed,
        "samples": timed,
        "seconds": round(seconds, 3),
        "samples_per_s": round(timed / seconds, 4),
        "tokens_per_s": round(timed * SEED_PROMPT_LEN / seconds, 1),
        "real_tokens_per_s": round(real / seconds, 1),
        "peak_memory_gb": peak_gb(device),
        "model_tflops_per_s": round(timed * per_sample / seconds / 1e12, 4),
        "useful_tflops_per_s": round(useful_flops(flops, real / timed, timed) / seconds / 1e12, 4),
        "gradient_checkpointing": True,
        "notes": notes,
    }


def proc_status_gb(field: str) -> float | None:
    """A memory figure of this process from /proc/self/status (Linux), in GiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return round(int(line.split()[1]) / 2**20, 2)  # kB
    except OSError:
        pass
    return None


def reset_rss_peak() -> None:
    """Reset the kernel's peak resident set size (VmHWM) of this process (Linux)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def write_json(path: str, data: dict[str, Any]) -> None:
    """Write `data` whole or not at all (a temporary file renamed over `path`)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_all = time.perf_counter()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            "error: --device cuda but no CUDA GPU is visible (use --scale tiny --device cpu)", file=sys.stderr
        )
        return 2
    device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    config = blip2_config(FULL if args.scale == "full" else TINY)
    counts = parameter_counts(config)
    flops = {
        "n_lm": counts["lm"],
        "n_vision": counts["vision"],
        "n_qformer": counts["qformer"],
        "vision_forward": vision_forward_flops(config, counts),
    }
    name, peak = peak_tflops(device)
    t0 = time.perf_counter()
    model = build_random_model(config, device, dtype)
    build_s = time.perf_counter() - t0
    result: dict[str, Any] = {
        "device": name,
        "scale": args.scale,
        "peak_bf16_tflops": peak,
        "torch": torch.__version__,
        "parameters": counts,
        "flops": flops,
        "build_s": round(build_s, 1),
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "mfu_formula": "LM: 4*N_lm*T per sample (T incl. padding, no recompute); "
        "vision: 2*N_vision*tokens + 2*N_qformer*queries per run; peak = dense bf16",
    }
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp_name:
        tmp = Path(tmp_name)
        rss_before = proc_status_gb("VmRSS") if device.type != "cuda" else None
        reset_rss_peak()
        ours, peft_model = run_ours(model, config, args, device, dtype, flops)
        print(f"ours: {ours['samples_per_s']} samples/s, peak {ours['peak_memory_gb']} GB", flush=True)
        ours["mfu"] = round(ours["model_tflops_per_s"] / peak, 4) if peak else None
        if device.type != "cuda":  # the CPU's counterpart of the GPU's peak: resident memory
            ours["process_peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
            ours["rss_before_gb"] = rss_before
            ours["peak_rss_gb"] = proc_status_gb("VmHWM")  # since the reset: features + training
        # ours alone first: a run cut short in the seed's part still leaves these figures
        write_json(args.out, {**result, "ours": ours, "seed": None, "partial": not args.ours_only})
        if args.ours_only:
            print(f"{name}: ours {ours['samples_per_s']} samples/s; written {args.out}")
            return 0
        base = peft_model.unload()  # the same base weights, without our adapter, for the seed
        del model, peft_model
        free_memory()
        smodel, quant, notes = seed_model(base, config, args, device, dtype, tmp)
        del base
        free_memory()
        reset_peak(device)
        seed = run_seed(smodel, config, args, device, dtype, flops, quant, notes, tmp)
        print(
            f"seed: {seed['samples_per_s']} samples/s ({quant}), peak {seed['peak_memory_gb']} GB", flush=True
        )
    for r in (ours, seed):
        r["mfu"] = round(r["model_tflops_per_s"] / peak, 4) if peak else None
    # from the unrounded rates: a slow seed's rounded rate would distort the ratio
    ratio = (ours["samples"] / ours["seconds"]) / (seed["samples"] / seed["seconds"])
    result.update(ours=ours, seed=seed, ratio=round(ratio, 2))
    result["wall_s"] = round(time.perf_counter() - t_all, 1)
    write_json(args.out, result)
    print(
        f"{name}: ours {ours['samples_per_s']} samples/s (MFU {ours['mfu']}), seed {seed['samples_per_s']} "
        f"samples/s ({quant}, MFU {seed['mfu']}); ratio {result['ratio']}x; wall {result['wall_s']} s; "
        f"written {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
