"""Throughput, memory and wall-time estimates: what `fada-batch bench` prints.

    result = run_bench(cfg, steps=10, baseline=True)
    print(format_report(result))

`bench_ours` trains the production path for a fixed number of optimizer steps: the
frozen-feature cache (`features.FeatureSource`), length-grouped steps (`step.epoch_steps`),
dynamic padding (`collate`), the token-mean loss over each step (`step.accumulate_step`) and
AdamW. It reports samples/s, tokens/s and peak memory; the feature cache is timed apart,
because it runs once per image and is reused by 8 questions in every epoch.

`bench_seed` runs the seed's recipe on the same samples: 8-bit weights, batch 1, the prompt
padded to 256 tokens and the answer to 128, the vision tower and Q-Former run for every
sample, HF `Trainer` with gradient checkpointing. Its ratio to ours is the speed-up.

`estimate` turns a samples/s figure into a wall time per category (from the pre-flight
counts) and the sbatch `--time` to ask for. The inputs are synthetic but shaped like the
configured model's (its image size, the standard questions through the prompt template,
short clinical answers), so no data set is needed; `category=` uses a category's real data.

`make_bench_model` saves a random-weight BLIP-2 whose vision tower outweighs its language
model per sample in the same proportion as blip2-opt-2.7b's, for measuring on a CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import platform
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fada_batch.config import JobConfig
from fada_batch.data.categories import NUM_QUESTIONS, STANDARD_QUESTIONS, get_category
from fada_batch.data.samples import Sample
from fada_batch.text import plural
from fada_batch.training.collate import Encoded, Encoder
from fada_batch.training.model import LoadedModel, apply_lora_section, base_of, eos_token_id, load_base_model

log = logging.getLogger(__name__)

SAFETY = 1.3  # sbatch --time = estimate x SAFETY + SLACK_S, rounded up to ROUND_S
SLACK_S = 600
ROUND_S = 300
SEED_PROMPT_LEN = 256  # the seed's processor(padding="max_length", max_length=256)
SEED_ANSWER_LEN = 128  # the seed's answer `labels`, padded to 128
REFERENCE_IMAGES = 2424  # the seed's Abdomen: its 3-3.5 h figure is for this many images
EVAL_COST = 1 / 3  # a validation forward costs ~1/3 of a training step (forward + backward)


# ----------------------------------------------------------------------------------- inputs


@dataclass
class BenchInputs:
    """The samples both recipes train on: text, token ids and image files."""

    samples: list[Sample]
    encoded: list[Encoded]
    image_paths: dict[str, Path]  # image name -> file
    source: str  # "synthetic" or "category <name>"

    def answer_ids(self, i: int) -> list[int]:
        """Answer token ids of sample `i` (without the EOS that ours appends)."""
        e = self.encoded[i]
        return e.input_ids[e.prompt_len : -1]


def synthetic_inputs(
    encoder: Encoder,
    *,
    template: str,
    n_samples: int,
    folder: Path,
    vocab_size: int,
    answer_tokens: tuple[int, int] = (6, 24),
    image_px: int = 512,
    seed: int = 0,
) -> BenchInputs:
    """`n_samples` samples on ceil(n/8) synthetic scans, 8 standard questions each.

    The prompts are the standard questions through `template`, tokenised by the model's own
    tokenizer; the answers are random token ids, `answer_tokens` (min, max) long, like short
    clinical answers. The scans are PNGs of `image_px` pixels written to `folder`, so the image
    processor's cost (once per image for ours, once per sample for the seed) is real.
    """
    import numpy as np

    from fada_batch.tools.demo import SIDES, render_scan

    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    special = {encoder.image_token_id, encoder.pad_token_id, encoder.eos_token_id}
    special |= set(encoder.tokenizer.all_special_ids)
    n_images = math.ceil(n_samples / NUM_QUESTIONS)
    folder.mkdir(parents=True, exist_ok=True)
    samples, encoded, paths = [], [], {}
    for i in range(n_images):
        name = f"synthetic_{i:04d}.png"
        paths[name] = folder / name
        render_scan(rng, side=SIDES[i % 2], noisy=bool(i % 3 == 0), size=image_px).save(paths[name])
        for qi, question in enumerate(STANDARD_QUESTIONS):
            if len(samples) == n_samples:
                break
            prompt = template.format(question=question)
            n_answer = int(torch.randint(answer_tokens[0], answer_tokens[1] + 1, (), generator=g))
            answer = [
                t
                for t in torch.randint(4, vocab_size, (n_answer * 2,), generator=g).tolist()
                if t not in special
            ][:n_answer]
            prompt_ids = encoder.prompt_ids(prompt)
            samples.append(Sample(name, qi, prompt, "<synthetic>"))
            encoded.append(Encoded([*prompt_ids, *answer, encoder.eos_token_id], len(prompt_ids)))
    return BenchInputs(samples, encoded, paths, "synthetic")


def category_inputs(cfg: JobConfig, encoder: Encoder, category: str, n_samples: int) -> BenchInputs:
    """The first `n_samples` question/answer pairs of a category's real data (sheet order).

    Raises:
        ValueError: the category's data cannot be used or holds too few pairs.
    """
    from fada_batch.data.dataset import load_category
    from fada_batch.data.samples import samples_for

    data = load_category(
        Path(cfg.data.root),
        get_category(category),
        clean_answers=cfg.data.clean_answers,
        check_images=False,
        max_image_pixels=cfg.data.max_image_pixels,
    )
    if data.status != "ok":
        raise ValueError(f"{category}: its data cannot be used (status {data.status}); run validate")
    names = {r.image_name for r in data.records}
    samples = samples_for(list(data.records), names, list(data.questions), cfg.data.prompt_template)
    if len(samples) < n_samples:
        raise ValueError(
            f"{category} has {plural(len(samples), 'question/answer pair')}; the bench needs {n_samples}: "
            "use fewer --steps or a smaller train.batch_size"
        )
    samples = samples[:n_samples]
    paths = {r.image_name: Path(r.path) for r in data.records}
    used = {s.image for s in samples}
    return BenchInputs(
        samples,
        [encoder.encode(s) for s in samples],
        {n: p for n, p in paths.items() if n in used},
        f"category {data.category.name}",
    )


# ----------------------------------------------------------------------------------- memory


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -------------------------------------------------------------------------------- recipes


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


def load_for_bench(
    cfg: JobConfig, *, quantization: str, gradient_checkpointing: bool
) -> tuple[LoadedModel, float]:
    """The production load path (`load_base_model` + `apply_lora`) and its time in seconds."""
    t0 = time.perf_counter()
    mc, lc = cfg.model, cfg.lora
    torch.manual_seed(cfg.train.seed)
    loaded = load_base_model(mc.name_or_path, device=mc.device, dtype=mc.dtype, quantization=quantization)
    apply_lora_section(loaded, lc, gradient_checkpointing=gradient_checkpointing)
    _sync(loaded.device)
    return loaded, time.perf_counter() - t0


def make_encoder(loaded: LoadedModel) -> Encoder:
    conf = base_of(loaded.model).config
    return Encoder(
        loaded.processor,
        num_query_tokens=conf.num_query_tokens,
        image_token_id=conf.image_token_id,
        eos_token_id=eos_token_id(loaded.model, loaded.processor),
    )


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
    from fada_batch.training.step import (
        accumulate_step,
        epoch_steps,
        micro_batches,
        run_with_oom_backoff,
        set_train_mode,
    )

    tc = cfg.train
    model, device = loaded.model, loaded.device
    encoder = make_encoder(loaded)
    micro, accum = tc.batch_size, tc.grad_accum_steps
    step_size = micro * accum
    features = FeatureSource(
        loaded, inputs.image_paths, cache=tc.feature_cache, max_pixels=cfg.data.max_image_pixels
    )
    names = list(inputs.image_paths)
    features.warm(names[:1])  # one-time start-up (kernels, allocator) outside the per-image time
    t0 = time.perf_counter()
    features.warm(names[1:])
    _sync(device)
    feature_s = time.perf_counter() - t0
    lengths = [len(e.input_ids) for e in inputs.encoded]
    plan = epoch_steps(
        lengths, seed=tc.seed, epoch=0, step_size=step_size, group_by_length=tc.group_by_length
    )
    plan = [s for s in plan if len(s) == step_size][: warmup + steps]
    if len(plan) < warmup + steps:
        raise ValueError(
            f"{plural(len(inputs.samples), 'sample')} make only {plural(len(plan), 'full step')} of {step_size}"
        )
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)
    set_train_mode(model)
    notes: list[str] = []
    samples = tokens = padded = 0
    with PeakMemory(device) as mem:
        for i, step in enumerate(plan):
            if i == warmup:
                _sync(device)
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
        _sync(device)
        seconds = time.perf_counter() - t_start
        cpu_seconds = time.process_time() - c_start
    if not tc.feature_cache:
        notes.append("train.feature_cache is off: the vision tower runs in every step")
    return RecipeResult(
        recipe="ours",
        quantization=loaded.quantization,
        dtype=str(loaded.dtype).removeprefix("torch."),
        micro_batch=micro,
        grad_accum=math.ceil(step_size / micro),
        steps=steps,
        samples=samples,
        seconds=round(seconds, 3),
        samples_per_s=round(samples / seconds, 3),
        tokens_per_s=round(padded / seconds, 1),
        answer_prompt_tokens_per_s=round(tokens / seconds, 1),
        peak_memory_gb=mem.gb,
        memory_kind=mem.kind,
        load_s=round(load_s, 2),
        cpu_seconds=round(cpu_seconds, 3),
        samples_per_cpu_s=round(samples / cpu_seconds, 3),
        feature_s_per_image=round(feature_s / max(1, len(names) - 1), 5) if tc.feature_cache else 0.0,
        gradient_checkpointing=_checkpointing_on(model),
        notes=notes,
    )


def _checkpointing_on(model: Any) -> bool:
    lm = base_of(model).language_model
    # transformers 5.x renamed the flag and warns on the old name; older versions have only that
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(lm), name) or name in vars(lm):
            return bool(getattr(lm, name))
    return False


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
            _sync(device)
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


# ---------------------------------------------------------------------------------- estimate


@dataclass
class CategoryEstimate:
    """The estimated wall time of one category's training and the sbatch --time for it."""

    category: str
    status: str  # ok, awaiting_labels, error, reference, given
    images: int = 0
    qa_pairs: int = 0
    train_pairs: int = 0
    val_pairs: int = 0
    load_s: float = 0.0
    feature_s: float = 0.0
    train_s: float = 0.0
    eval_s: float = 0.0
    total_s: float = 0.0
    sbatch_time: str = ""  # HH:MM:SS
    time_min: int = 0  # the same in minutes (cluster.time_min)
    within_time_min: bool = True  # total fits cluster.time_min (else it runs in requeued parts)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sbatch_seconds(seconds: float) -> int:
    """The time limit to ask for: `seconds` x 1.3 + 10 min, rounded up to 5 min."""
    return math.ceil((seconds * SAFETY + SLACK_S) / ROUND_S) * ROUND_S


def sbatch_time(seconds: float) -> str:
    """`sbatch_seconds` as sbatch's `--time` HH:MM:SS."""
    total = sbatch_seconds(seconds)
    return f"{total // 3600:02d}:{total % 3600 // 60:02d}:{total % 60:02d}"


def category_counts(cfg: JobConfig) -> dict[str, tuple[str, int, int]]:
    """Category -> (status, usable images, QA pairs) from the pre-flight (images not opened)."""
    from fada_batch.data.validate import preflight

    return {
        d.category.name: (d.status, d.stats.images_usable, d.stats.qa_pairs)
        for d in preflight(cfg, check_images=False).results
    }


def estimate(
    cfg: JobConfig,
    samples_per_s: float,
    feature_s_per_image: float,
    *,
    load_s: float = 0.0,
    counts: dict[str, tuple[str, int, int]] | None = None,
) -> list[CategoryEstimate]:
    """Estimated wall time per category for the configured epochs.

    Per category, with `N` images and `P` question/answer pairs (capped by data.num_images):
    train pairs = P x train_fraction, val pairs = P x val_fraction;
    feature cache = N x (train + val fraction) x feature_s_per_image (once per image);
    training = epochs x train pairs / samples_per_s;
    validation = epochs x val pairs / samples_per_s x 1/3 (forward only);
    total = load_s + feature cache + training + validation. Checkpoints (a LoRA adapter, a few
    MB) and the generation of eval.after_training are not counted; the 1.3x margin of
    `sbatch_time` covers small extras.

    Args:
        counts: category -> (status, images, QA pairs); default: the pre-flight of cfg's data.
    """
    d, t = cfg.data, cfg.train
    counts = category_counts(cfg) if counts is None else counts
    out = []
    for name, (status, images, qa) in counts.items():
        if status not in ("ok", "reference", "given") or images == 0:
            out.append(CategoryEstimate(name, status))
            continue
        if d.num_images is not None and d.num_images < images:
            qa = round(qa * d.num_images / images)
            images = d.num_images
        train_pairs = round(qa * d.train_fraction)
        val_pairs = round(qa * d.val_fraction)
        feature_s = images * (d.train_fraction + d.val_fraction) * feature_s_per_image
        train_s = t.num_epochs * train_pairs / samples_per_s
        eval_s = t.num_epochs * val_pairs / samples_per_s * EVAL_COST
        total = load_s + feature_s + train_s + eval_s
        out.append(
            CategoryEstimate(
                category=name,
                status=status,
                images=images,
                qa_pairs=qa,
                train_pairs=train_pairs,
                val_pairs=val_pairs,
                load_s=round(load_s, 1),
                feature_s=round(feature_s, 1),
                train_s=round(train_s, 1),
                eval_s=round(eval_s, 1),
                total_s=round(total, 1),
                sbatch_time=sbatch_time(total),
                time_min=sbatch_seconds(total) // 60,
                within_time_min=total <= cfg.cluster.time_min * 60,
            )
        )
    return out


# -------------------------------------------------------------------------------- bench run


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
) -> dict[str, Any]:
    """Measure ours (and with `baseline` the seed's recipe) on the same samples, then estimate.

    Args:
        steps: timed optimizer steps of ours; the seed runs as many samples at batch 1.
        warmup: untimed steps before (the seed gets two more samples than that).
        category: take the samples from this category's real data instead of synthetic ones.
        images: estimate for categories of this many images x 8 questions instead of the
            pre-flight's counts (no data needed).
        threads: torch CPU threads for the run (restored afterwards); None leaves torch's.
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
    if loaded.quantization_reason:
        result["ours"]["notes"].append(f"quantization auto: {loaded.quantization_reason}")
    del loaded
    _free()
    counts = _counts(cfg, images)
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
        _free()
        result["seed"] = dataclasses.asdict(seed)
        result["ratio"] = round(ours.samples_per_s / seed.samples_per_s, 2)
        seed_est = estimate(cfg, seed.samples_per_s, 0.0, load_s=seed.load_s, counts=counts)
        for e, s in zip(result["estimates"], seed_est, strict=True):
            e["seed_total_s"] = s.total_s  # the vision side runs per sample: no feature cache
    return result


def _counts(cfg: JobConfig, images: int | None) -> dict[str, tuple[str, int, int]]:
    """What to estimate for: `images` x 8 questions per job category when given, else the
    pre-flight's counts, else (no sheets at all) the seed's 2,424-image Abdomen as a reference."""
    if images is not None:
        return {c: ("given", images, images * NUM_QUESTIONS) for c in _job_categories(cfg)}
    counts = category_counts(cfg)
    if not any(status == "ok" for status, _, _ in counts.values()):
        return {"reference": ("reference", REFERENCE_IMAGES, REFERENCE_IMAGES * NUM_QUESTIONS)}
    return counts


def _job_categories(cfg: JobConfig) -> list[str]:
    return list(dict.fromkeys(get_category(c).name for c in cfg.data.categories))


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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


# ------------------------------------------------------------------------------------ FLOPs


def parameter_counts(config: Any) -> dict[str, int]:
    """Parameters of the vision tower, the Q-Former (+ projection) and the language model
    (its position embeddings left out: a lookup, not a matmul), built on the meta device."""
    from transformers import Blip2ForConditionalGeneration

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    lm = model.language_model
    positions = getattr(lm.model.decoder, "embed_positions", None)
    return {
        "vision": sum(p.numel() for p in model.vision_model.parameters()),
        "qformer": sum(p.numel() for p in model.qformer.parameters())
        + sum(p.numel() for p in model.language_projection.parameters()),
        "lm": sum(p.numel() for p in lm.parameters())
        - (positions.weight.numel() if positions is not None else 0),
    }


def per_sample_flops(config: Any, lm_tokens: float) -> dict[str, float]:
    """Forward FLOPs per sample of the frozen vision side and of the language model.

    2 FLOPs per parameter per token (matmuls; attention's T^2 terms are left out, under 2%
    at these lengths): vision = 2 N_vision (image/patch)^2+1 tokens + 2 N_qformer x queries;
    language model = 2 N_lm x `lm_tokens` (the tied head counted once via the embeddings).
    Training the LoRA'd language model costs ~2x its forward, 4 N_lm T: the backward needs the
    activation gradients (2 N T) but no weight gradients for the frozen layers.
    """
    n = parameter_counts(config)
    vc = config.vision_config
    vision_tokens = (vc.image_size // vc.patch_size) ** 2 + 1
    vision = 2 * n["vision"] * vision_tokens + 2 * n["qformer"] * config.num_query_tokens
    lm = 2 * n["lm"] * lm_tokens
    return {
        "vision_forward": float(vision),
        "lm_forward": float(lm),
        "vision_over_lm": round(vision / lm, 3),
        "lm_tokens": round(float(lm_tokens), 1),
        "vision_tokens": vision_tokens,
    }


# ------------------------------------------------------------------------------- bench model


@dataclass(frozen=True)
class BenchModelRecipe:
    """A small BLIP-2 shaped like blip2-opt-2.7b in the one way that matters for speed.

    Per sample, blip2-opt-2.7b's frozen vision side (ViT-g, ~0.99B parameters on 257 tokens,
    plus the Q-Former on 32 queries: 0.51 TFLOP) costs 1.2-1.4x the forward of OPT-2.7B (~2.65B
    parameters on 70-80 tokens: 0.37-0.42 TFLOP). These defaults give 1.1-1.3 on the same
    token counts (`per_sample_flops`), with the real 32 query tokens and an 8 x 8 patch grid.
    `scale` multiplies every width (FLOPs go with its square on both sides; the ratio stays).
    """

    image_size: int = 112
    patch_size: int = 14
    vision_hidden: int = 256
    vision_layers: int = 5
    qformer_hidden: int = 128
    qformer_layers: int = 2
    num_query_tokens: int = 32
    text_hidden: int = 256
    text_layers: int = 4
    num_heads: int = 4
    tokenizer_vocab: int = 1024
    scale: float = 1.0

    def width(self, w: int) -> int:
        step = 4 * self.num_heads
        return max(step, round(w * self.scale / step) * step)


BENCH_MARKER = "fada_bench_model.json"


def make_bench_model(out_dir: Path, *, scale: float = 1.0, seed: int = 0) -> Path:
    """Save a random-weight benchmark BLIP-2 (model + processor) in `out_dir`; reuse a
    complete one of the same recipe. Random weights are enough: timing does not depend on them.

    Raises:
        FileExistsError: `out_dir` holds something else (refusing to replace it).
    """
    from fada_batch.fsutil import atomic_dir

    out_dir = Path(out_dir)
    recipe = BenchModelRecipe(scale=scale)
    wanted = {"recipe": dataclasses.asdict(recipe), "seed": seed}
    marker = out_dir / BENCH_MARKER
    if marker.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            if json.loads(marker.read_text()) == wanted:
                return out_dir
    elif out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a bench-model folder (no {BENCH_MARKER})")
    model, processor = build_bench_model(recipe, seed=seed)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / BENCH_MARKER).write_text(json.dumps(wanted, indent=2) + "\n")
    log.info("bench model saved in %s", out_dir)
    return out_dir


def build_bench_model(recipe: BenchModelRecipe, *, seed: int = 0) -> tuple[Any, Any]:
    """(model, processor) of `recipe` with random weights; the tokenizer is a byte-level BPE
    trained on the standard prompts and demo answers, so prompts get realistic token counts."""
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        OPTConfig,
    )

    from fada_batch.tools.demo import all_answers
    from fada_batch.tools.tiny import BOS_EOS_ID, PAD_ID, build_processor, build_tokenizer

    torch.manual_seed(seed)
    prompts = [f"Question: {q} Answer:" for q in STANDARD_QUESTIONS]
    corpus = prompts + [a for options in all_answers().values() for a in options]
    tokenizer = build_tokenizer(corpus, vocab_size=recipe.tokenizer_vocab)
    processor = build_processor(
        tokenizer, image_size=recipe.image_size, num_query_tokens=recipe.num_query_tokens
    )
    vocab = len(processor.tokenizer)
    vh, qh, th, heads = (
        recipe.width(recipe.vision_hidden),
        recipe.width(recipe.qformer_hidden),
        recipe.width(recipe.text_hidden),
        recipe.num_heads,
    )
    vision = Blip2VisionConfig(
        hidden_size=vh,
        intermediate_size=4 * vh,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        initializer_range=0.02,
    )
    qformer = Blip2QFormerConfig(
        hidden_size=qh,
        num_hidden_layers=recipe.qformer_layers,
        num_attention_heads=heads,
        intermediate_size=4 * qh,
        cross_attention_frequency=1,
        encoder_hidden_size=vh,
        vocab_size=vocab,
    )
    text = OPTConfig(
        vocab_size=vocab,
        hidden_size=th,
        word_embed_proj_dim=th,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=heads,
        ffn_dim=4 * th,
        max_position_embeddings=512,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_EOS_ID,
        eos_token_id=BOS_EOS_ID,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=recipe.num_query_tokens,
        image_token_index=processor.tokenizer.convert_tokens_to_ids("<image>"),
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    return model.eval(), processor


# ------------------------------------------------------------------------------------ report


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_report(result: dict[str, Any]) -> str:
    """The bench result as a table: per recipe, the ratio, then the estimate per category."""
    m, inp = result["machine"], result["inputs"]
    where = m.get("name", m.get("type"))
    if m.get("type") == "cpu":
        where = (
            f"CPU {m['cpu_model']} ({plural(m['cpus'], 'CPU')}, {plural(m['torch_threads'], 'torch thread')})"
        )
    elif m.get("memory_gb"):
        where = f"{where} ({m['memory_gb']} GB)"
    fl, ours = result["flops_per_sample"], result["ours"]
    lines = [
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
    lines += [
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
    return "\n".join(lines)
