"""The seed's recipe re-enacted on the same samples, for the ratio `fada-batch bench --baseline`
prints: 8-bit weights, batch 1, the prompt padded to 256 tokens and the answer to 128, the vision
tower and Q-Former run for every sample, HF `Trainer` with gradient checkpointing.

    result = bench_seed(cfg, inputs, samples=160, work_dir=tmp)   # -> RecipeResult

`time_trainer` is the timed `Trainer` loop itself; scripts/gpu_benchmark.py runs the same one.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fada_batch.config import JobConfig
from fada_batch.text import plural
from fada_batch.tools.bench.inputs import BenchInputs, load_for_bench
from fada_batch.tools.bench.measure import PeakMemory, RecipeResult, sync

SEED_PROMPT_LEN = 256  # the seed's processor(padding="max_length", max_length=256)
SEED_ANSWER_LEN = 128  # the seed's answer `labels`, padded to 128


class SeedDataset:
    """The seed's per-sample preprocessing: open the image, run the processor on image and
    prompt padded to 256 tokens, and tokenised answer padded to 128 as separate `labels`.

    The answer's pads are NOT masked with -100: that is the seed's bug (its loss lands on
    padding, see docs/blip2.md). It is reproduced here for timing only, so the seed's
    work per step is what it was; nothing trains with it.
    """

    def __init__(self, inputs: BenchInputs, processor: Any, *, n: int, max_pixels: int) -> None:
        self.inputs, self.processor, self.n, self.max_pixels = inputs, processor, n, max_pixels
        tok = processor.tokenizer
        self.prefix = tok("")["input_ids"]  # the tokenizer's own BOS, as tokenizer(answer) adds
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from fada_batch.data.images import load_image_rgb

        s = self.inputs.samples[i]
        image = load_image_rgb(self.inputs.image_paths[s.image], max_pixels=self.max_pixels)
        enc = self.processor(
            images=image,
            text=s.prompt,
            padding="max_length",
            max_length=SEED_PROMPT_LEN,
            truncation=True,
            return_tensors="pt",
        )
        answer = [*self.prefix, *self.inputs.answer_ids(i)][:SEED_ANSWER_LEN]
        labels = answer + [self.pad] * (SEED_ANSWER_LEN - len(answer))  # pads not masked (seed bug)
        return {
            "input_ids": enc["input_ids"][0],
            "attention_mask": enc["attention_mask"][0],
            "pixel_values": enc["pixel_values"][0],
            "labels": torch.tensor(labels, dtype=torch.long),
        }


@dataclass
class StepTiming:
    """Time of the steps after warm-up."""

    seconds: float  # wall clock
    cpu_seconds: float  # this process's CPU time
    steps: int
    peak_memory_gb: float


def time_trainer(
    model: Any,
    dataset: Any,
    *,
    device: torch.device,
    warmup: int,
    learning_rate: float,
    seed: int,
    output_dir: Path,
) -> StepTiming:
    """Train with HF `Trainer` at batch 1 with gradient checkpointing (the seed's loop), one
    step per item of `dataset`, and time the steps after the first `warmup` (at least 1: the
    timing runs from the end of the last warm-up step)."""
    if warmup < 1 or len(dataset) <= warmup:
        raise ValueError(
            f"time_trainer needs warmup >= 1 and more items than that (got {warmup}, {len(dataset)})"
        )
    from transformers import (
        PrinterCallback,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    ends: list[tuple[float, float]] = []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            sync(device)
            ends.append((time.perf_counter(), time.process_time()))

    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    # the seed's `gradient_checkpointing=True`, under the name this transformers prefers
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    checkpointing = (
        "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    )
    args = TrainingArguments(
        output_dir=str(output_dir),
        per_device_train_batch_size=1,
        gradient_accumulation_steps=1,
        max_steps=len(dataset),
        learning_rate=learning_rate,
        **{checkpointing: True},
        bf16=bf16,
        use_cpu=device.type == "cpu",
        remove_unused_columns=False,
        logging_strategy="no",
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=seed,
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=default_data_collator,
        callbacks=[StepTimes()],
    )
    # Trainer counts FLOPs for its logs through the model's main input (`pixel_values` for
    # BLIP-2), which crashes on inputs without it (docs/blip2.md, HF Trainer); it is only logged.
    trainer.floating_point_ops = lambda inputs: 0
    trainer.remove_callback(PrinterCallback)  # its end-of-training metrics line goes to stdout
    with PeakMemory(device) as mem:
        trainer.train()
    (t0, c0), (t1, c1) = ends[warmup - 1], ends[-1]
    return StepTiming(t1 - t0, c1 - c0, len(ends) - warmup, mem.gb)


def bench_seed(
    cfg: JobConfig,
    inputs: BenchInputs,
    *,
    samples: int,
    warmup: int = 2,
    quantization: str = "8bit",
    work_dir: Path,
) -> RecipeResult:
    """Time the seed's recipe on the first `samples` samples (after `warmup` more).

    8-bit (the seed's setting) falls back to none where bitsandbytes cannot load it; the
    result says which ran.
    """
    notes: list[str] = []
    try:
        loaded, load_s = load_for_bench(cfg, quantization=quantization, gradient_checkpointing=True)
    except (ImportError, RuntimeError) as e:
        if quantization == "none":
            raise
        notes.append(f"{quantization} unavailable here ({type(e).__name__}: {e}); seed ran unquantised")
        quantization = "none"
        loaded, load_s = load_for_bench(cfg, quantization="none", gradient_checkpointing=True)
    model = loaded.model
    # as peft's prepare_model_for_kbit_training did in the seed's 8-bit recipe (the production
    # load no longer calls it): without it, Trainer's checkpointed layers, whose inputs need no
    # gradient, would give LoRA no gradient at all
    model.enable_input_require_grads()
    n = warmup + samples
    if len(inputs.samples) < n:
        raise ValueError(f"the seed needs {plural(n, 'sample')}, the inputs hold {len(inputs.samples)}")
    dataset = SeedDataset(inputs, loaded.processor, n=n, max_pixels=cfg.data.max_image_pixels)
    timing = time_trainer(
        model,
        dataset,
        device=loaded.device,
        warmup=warmup,
        learning_rate=cfg.train.learning_rate,
        seed=cfg.train.seed,
        output_dir=work_dir / "seed-trainer",
    )
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    if not any(bool(p.detach().abs().sum() > 0) for p in lora_b):
        notes.append("warning: the seed's LoRA weights did not change (no gradient reached them)")
    timed, seconds = timing.steps, timing.seconds
    lm_tokens = timed * SEED_PROMPT_LEN
    real = sum(len(inputs.encoded[i].input_ids) for i in range(warmup, n))  # same text, unpadded
    return RecipeResult(
        recipe="seed",
        quantization=loaded.quantization,
        dtype=str(loaded.dtype).removeprefix("torch."),
        micro_batch=1,
        grad_accum=1,
        steps=timed,
        samples=timed,
        seconds=round(seconds, 3),
        samples_per_s=round(timed / seconds, 3),
        tokens_per_s=round(lm_tokens / seconds, 1),
        answer_prompt_tokens_per_s=round(real / seconds, 1),
        peak_memory_gb=timing.peak_memory_gb,
        memory_kind="gpu_max_allocated" if loaded.device.type == "cuda" else "process_rss",
        load_s=round(load_s, 2),
        cpu_seconds=round(timing.cpu_seconds, 3),
        samples_per_cpu_s=round(timed / timing.cpu_seconds, 3),
        gradient_checkpointing=True,
        notes=notes,
    )
