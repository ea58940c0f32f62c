"""Train ONE category: label sheet -> split -> LoRA training -> `final_model/` + summary.

    summary = train_category(cfg, "Abdomen")

Setup, train, save, clean up, top to bottom. Running it again resumes from the latest
complete checkpoint in the category's output folder (found at run time), and a completed
category is skipped unless `force=True`. The code never knows whether it runs under SLURM: a
launcher that wants a checkpoint-and-stop passes `should_stop`, polled after every optimizer
step.
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fada_batch import checkpoint as ckpt
from fada_batch.categories import Category, get_category
from fada_batch.collate import Encoded, Encoder, Sample, collate, masked_lm_loss_sum
from fada_batch.config import JobConfig, dump_yaml
from fada_batch.features import FeatureSource
from fada_batch.fsutil import (
    atomic_dir,
    atomic_write_text,
    category_lock,
    ensure_writable,
    remove_stale_tmp,
    touch,
)
from fada_batch.model import (
    LoadedModel,
    apply_lora_section,
    eos_token_id,
    lm_logits,
    load_base_model,
    trainable_parameters,
)
from fada_batch.progress import Progress
from fada_batch.slurmjobs import job_phase
from fada_batch.split import Split, make_split, read_split, write_split
from fada_batch.summary import (
    device_info,
    library_versions,
    now_iso,
    peak_memory,
    read_summary,
    slurm_ids,
    write_summary,
)

log = logging.getLogger(__name__)

FINAL_MODEL = "final_model"
FINAL_MARKER = "fada_batch.json"  # written last into final_model/: its presence = complete
CONFIG_FILE = "config.yaml"


class DataError(RuntimeError):
    """The category's data has blocking problems (listed in the message)."""


class StopRequested(Exception):
    """Training stopped on request after saving a checkpoint (time limit, preemption)."""

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__(f"stopped on request; checkpoint {checkpoint}")
        self.checkpoint = checkpoint


def category_output_dir(cfg: JobConfig, category: Category) -> Path:
    return Path(cfg.output.root) / category.output_dirname


def final_model_complete(folder: Path) -> bool:
    """True when `final_model/` holds the adapter, the processor and the completion marker."""
    fm = folder / FINAL_MODEL
    return all((fm / f).is_file() for f in ("adapter_config.json", "adapter_model.safetensors", FINAL_MARKER))


# --------------------------------------------------------------------------------------- data


@dataclass
class CategorySamples:
    """Everything training needs from the data side."""

    split: Split
    image_paths: dict[str, Path]  # image name -> file
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    questions: list[str]
    data: Any  # dataset.CategoryData (for counts and problems)


def samples_for(records: list[Any], names: set[str], questions: list[str], template: str) -> list[Sample]:
    """One sample per non-empty answer of each image in `names` (sheet order)."""
    out = []
    for rec in records:
        if rec.image_name not in names:
            continue
        for qi, answer in enumerate(rec.answers):
            if answer:
                out.append(Sample(rec.image_name, qi, template.format(question=questions[qi]), answer))
    return out


def prepare_data(cfg: JobConfig, category: Category, out_dir: Path, *, resuming: bool) -> CategorySamples:
    """Load the sheet and images, take the first `num_images`, and split by image.

    An existing `split.json` is reused when it covers the same images with the same seed and
    fractions (so a resumed or re-run category trains and evaluates on the same images).

    Raises:
        DataError: blocking data problems, or a changed image set under a checkpoint.
    """
    from fada_batch.dataset import load_category

    data = load_category(
        Path(cfg.data.root),
        category,
        clean_answers=cfg.data.clean_answers,
        max_image_pixels=cfg.data.max_image_pixels,
    )
    if data.status != "ok":
        errors = [p for p in data.problems if p.severity == "error"]
        lines = "\n".join(f"  - {p.message}" for p in errors) or f"  - status {data.status}"
        raise DataError(f"{category.name}: the data cannot be used:\n{lines}")
    records = list(data.records)
    if cfg.data.num_images is not None:
        records = records[: cfg.data.num_images]
    names = [r.image_name for r in records]
    fractions = (cfg.data.train_fraction, cfg.data.val_fraction, cfg.data.test_fraction)
    split = read_split(out_dir)
    fresh = make_split(names, seed=cfg.data.split_seed, fractions=fractions)
    if (
        split is None
        or split.images() != set(names)
        or split.seed != fresh.seed
        or tuple(split.fractions) != tuple(fractions)
    ):
        if split is not None and resuming:
            raise DataError(
                f"{category.name}: {out_dir / 'split.json'} no longer matches the data or the "
                "split settings, but checkpoints exist. Resuming would mix two data sets: rerun "
                "with --force to start this category over, or restore the original data."
            )
        split = fresh
        write_split(out_dir, split)
    questions = list(data.questions)
    t = cfg.data.prompt_template
    return CategorySamples(
        split=split,
        image_paths={r.image_name: Path(r.path) for r in records},
        train=samples_for(records, set(split.train), questions, t),
        val=samples_for(records, set(split.val), questions, t),
        test=samples_for(records, set(split.test), questions, t),
        questions=questions,
        data=data,
    )


# --------------------------------------------------------------------------------- training


def get_lr(step: int, *, total: int, base_lr: float, warmup: int, schedule: str) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warm-up, then the schedule."""
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return base_lr
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return base_lr * max(0.0, 1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def epoch_steps(
    lengths: list[int], *, seed: int, epoch: int, step_size: int, group_by_length: bool
) -> list[list[int]]:
    """The optimizer steps of one epoch: lists of sample indices, fixed by (seed, epoch).

    A resumed run replays the same steps without saving them. With `group_by_length`, the
    shuffled order is cut into windows of 50 steps, each sorted by token length and cut into
    steps, and the steps are shuffled again: rows of a batch have similar lengths, so dynamic
    padding wastes little, while the epoch stays random.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(lengths), generator=g).tolist()
    if not group_by_length or step_size == 1:
        return [order[i : i + step_size] for i in range(0, len(order), step_size)]
    window = step_size * 50
    steps: list[list[int]] = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w : w + window], key=lambda i: (-lengths[i], i))
        steps.extend(chunk[i : i + step_size] for i in range(0, len(chunk), step_size))
    perm = torch.randperm(len(steps), generator=g).tolist()
    return [steps[i] for i in perm]


def micro_batches(step: list[int], micro: int) -> list[list[int]]:
    return [step[i : i + micro] for i in range(0, len(step), micro)]


def batch_loss_sum(
    model: Any,
    features: FeatureSource,
    samples: list[Sample],
    encoded: list[Encoded],
    encoder: Encoder,
    device: torch.device,
) -> tuple[torch.Tensor, int]:
    """Summed answer-token loss of one micro-batch and its number of answer tokens."""
    batch = collate(
        encoded,
        pad_token_id=encoder.pad_token_id,
        image_token_id=encoder.image_token_id,
        num_query_tokens=encoder.num_query_tokens,
    )
    feats = features.get([s.image for s in samples])  # (B, Q, H)
    logits = lm_logits(
        model, batch["input_ids"].to(device), batch["attention_mask"].to(device), feats
    )  # (B, T, V)
    return masked_lm_loss_sum(logits, batch["labels"])


def accumulate_step(
    model: Any,
    features: FeatureSource,
    samples: list[Sample],
    encoded: list[Encoded],
    encoder: Encoder,
    device: torch.device,
    step: list[int],
    micro: int,
) -> float:
    """Backward over one optimizer step's samples in micro-batches; returns the step's loss.

    The loss is the mean over the answer (+EOS) tokens of the WHOLE step, so cutting the step
    into smaller micro-batches (out-of-memory back-off) gives the same gradient.
    """
    n_tokens = sum(len(encoded[i].input_ids) - encoded[i].prompt_len for i in step)
    step_loss = 0.0
    for mb in micro_batches(step, micro):
        s, _n = batch_loss_sum(
            model, features, [samples[i] for i in mb], [encoded[i] for i in mb], encoder, device
        )
        (s / n_tokens).backward()
        step_loss += float(s.detach()) / n_tokens
    return step_loss


@torch.no_grad()
def evaluate_loss(
    model: Any,
    features: FeatureSource,
    samples: list[Sample],
    encoded: list[Encoded],
    encoder: Encoder,
    device: torch.device,
    batch_size: int,
) -> float | None:
    """Mean answer-token loss over `samples` (dropout off); None when there are none."""
    if not samples:
        return None
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(samples), batch_size):
            s, n = batch_loss_sum(
                model, features, samples[i : i + batch_size], encoded[i : i + batch_size], encoder, device
            )
            total += float(s)
            count += n
    finally:
        model.train(was)
    return total / max(1, count)


def set_train_mode(model: Any) -> None:
    """LoRA (and the language model's dropout) in train mode; frozen vision side in eval."""
    from fada_batch.model import base_of

    model.train()
    base = base_of(model)
    for m in (base.vision_model, base.qformer, base.language_projection):
        m.eval()


def save_final_model(
    out_dir: Path, loaded: LoadedModel, cfg: JobConfig, category: Category, questions: list[str], eos: int
) -> Path:
    """Write `final_model/` atomically: adapter, tokenizer + processor files, then the marker."""
    from fada_batch.fsutil import atomic_write_json

    target = out_dir / FINAL_MODEL
    with atomic_dir(target) as tmp:
        loaded.model.save_pretrained(str(tmp))
        loaded.processor.save_pretrained(str(tmp))
        (tmp / CONFIG_FILE).write_text(dump_yaml(cfg))
        atomic_write_json(
            tmp / FINAL_MARKER,
            {
                "category": category.name,
                "base_model": cfg.model.name_or_path,
                "config_hash": cfg.config_hash(),
                "questions": questions,
                "prompt_template": cfg.data.prompt_template,
                "eos_token_id": eos,
                "created": now_iso(),
            },
        )
    return target


def _base_summary(cfg: JobConfig, category: Category, out_dir: Path) -> dict[str, Any]:
    return {
        "category": category.name,
        "output_dir": str(out_dir),
        "config_hash": cfg.config_hash(),
        "seed": cfg.train.seed,
        "job_name": cfg.name,
        "slurm": slurm_ids(),
        "versions": library_versions(),
    }


def _data_counts(cs: CategorySamples) -> dict[str, Any]:
    data = cs.data
    warnings = [p for p in data.problems if p.severity == "warning"]
    return {
        "images": {"train": len(cs.split.train), "val": len(cs.split.val), "test": len(cs.split.test)},
        "qa_pairs": {"train": len(cs.train), "val": len(cs.val), "test": len(cs.test)},
        "sheet": str(data.sheet_path) if data.sheet_path else None,
        "empty_answers_skipped": sum(data.stats.empty_answers_per_question),
        "empty_answers_per_question": data.stats.empty_answers_per_question,
        # rows skipped and why: counts by problem code, and the first messages in full
        "warnings": dict(Counter(p.code for p in warnings)),
        "warning_examples": [p.message for p in warnings[:20]],
    }


def train_category(
    cfg: JobConfig,
    category_name: str,
    *,
    force: bool = False,
    should_stop: Callable[[], bool] | None = None,
    requeues: int = 0,
    progress_stream: Any = None,
) -> dict[str, Any]:
    """Train one category end to end and return its summary.

    Args:
        cfg: the resolved job config.
        category_name: canonical name or alias.
        force: retrain a completed category from scratch (old checkpoints removed).
        should_stop: polled after each optimizer step; when it returns True a checkpoint is
            saved and StopRequested is raised (the launcher requeues).
        requeues: how many times this task was requeued so far (for the summary).

    Raises:
        DataError: blocking data problems (summary status `invalid_data`).
        StopRequested: stopped on request after a checkpoint (summary status `interrupted`).
        LockedError: another live task trains this category into the same folder.
    """
    category = get_category(category_name)
    out_dir = ensure_writable(category_output_dir(cfg, category))
    summary = _base_summary(cfg, category, out_dir)

    from fada_batch.categories import find_sheet

    if find_sheet(Path(cfg.data.root), category) is None:
        summary.update(status="awaiting_labels", message=f"no label sheet for {category.name} yet")
        write_summary(out_dir, summary)
        log.info("%s: awaiting labels (no sheet); nothing to train", category.name)
        return summary

    if not force and (previous := _completed(out_dir, category)) is not None:
        return previous
    # a lock left by a requeued or ended SLURM job is taken over, whichever node wrote it
    with category_lock(out_dir, job_probe=job_phase):
        # another task may have completed it while this one waited for the lock
        if not force and (previous := _completed(out_dir, category)) is not None:
            return previous
        return _train_locked(
            cfg,
            category,
            out_dir,
            summary,
            force=force,
            should_stop=should_stop,
            requeues=requeues,
            progress_stream=progress_stream,
        )


def run_with_oom_backoff(
    run_step: Callable[[int], Any],
    micro: int,
    *,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    on_backoff: Callable[[int], None],
) -> tuple[Any, int]:
    """`run_step(micro)`; on CUDA out of memory, drop the step's partial gradients, hand the
    cache back, halve the micro-batch (the caller keeps the effective batch: more micro-batches
    per step), tell `on_backoff`, and retry. Returns the step's result and the micro-batch used.

    Raises:
        RuntimeError: out of memory even with a micro-batch of 1 (says what to change).
    """
    while True:
        try:
            return run_step(micro), micro
        except torch.OutOfMemoryError as e:
            if micro == 1:
                raise RuntimeError(
                    "out of memory even with a micro-batch of 1: set model.quantization=8bit (or "
                    "4bit) and/or model.gradient_checkpointing=true, or use a larger GPU"
                ) from e
        # Out of the except block the traceback's frames, and the activations they hold, are
        # gone: only now can the cache be handed back.
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        micro = max(1, micro // 2)
        on_backoff(micro)


def _completed(out_dir: Path, category: Category) -> dict[str, Any] | None:
    """The summary of a completed category with a complete adapter, else None."""
    try:
        previous = read_summary(out_dir)
    except ValueError:
        return None
    if previous and previous.get("status") == "completed" and final_model_complete(out_dir):
        log.info(
            "%s: already completed (%s); skipping. Use --force to train it again.",
            category.name,
            out_dir / FINAL_MODEL,
        )
        return previous
    return None


def _train_locked(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    *,
    force: bool,
    should_stop: Callable[[], bool] | None,
    requeues: int,
    progress_stream: Any,
) -> dict[str, Any]:
    t_start = time.time()
    remove_stale_tmp(out_dir)
    if force:
        ckpt.remove_all(out_dir)
        shutil.rmtree(out_dir / FINAL_MODEL, ignore_errors=True)
        (out_dir / "split.json").unlink(missing_ok=True)
    latest = ckpt.find_latest(out_dir)
    first_start, earlier_wall = now_iso(), 0.0
    if latest is not None:  # a resumed or requeued run: keep the first attempt's start and time
        try:
            prev = read_summary(out_dir) or {}
        except ValueError:
            prev = {}
        first_start = prev.get("first_start_time") or prev.get("start_time") or first_start
        earlier_wall = _earlier_wall_time(prev)
    summary.update(
        status="running",
        start_time=now_iso(),
        first_start_time=first_start,
        requeues=requeues,
        earlier_attempts_wall_time_s=round(earlier_wall, 2),
    )
    try:
        cs = prepare_data(cfg, category, out_dir, resuming=latest is not None)
    except DataError as e:
        summary.update(status="invalid_data", error=str(e), end_time=now_iso())
        write_summary(out_dir, summary)
        raise
    summary.update(_data_counts(cs))
    if not cs.train:
        summary.update(status="invalid_data", error="no training QA pairs after the split")
        write_summary(out_dir, summary)
        raise DataError(f"{category.name}: no training question/answer pairs (all answers empty?)")
    config_yaml = dump_yaml(cfg)
    atomic_write_text(out_dir / CONFIG_FILE, config_yaml)
    write_summary(out_dir, summary)
    try:
        return _run_training(
            cfg,
            category,
            out_dir,
            summary,
            cs,
            latest,
            config_yaml,
            t_start,
            should_stop=should_stop,
            progress_stream=progress_stream,
        )
    except StopRequested as e:
        summary.update(status="interrupted", end_time=now_iso(), checkpoint=str(e.checkpoint))
        summary.update(_wall_times(t_start, earlier_wall))
        write_summary(out_dir, summary)
        raise
    except KeyboardInterrupt:  # the user stopped it (Ctrl-C): not a failure of the category
        latest_now = ckpt.find_latest(out_dir)
        summary.update(
            status="interrupted",
            end_time=now_iso(),
            checkpoint=str(latest_now) if latest_now else None,
            message="stopped by the user (SIGINT); run the same command again to resume",
        )
        summary.update(_wall_times(t_start, earlier_wall))
        write_summary(out_dir, summary)
        raise
    except BaseException as e:
        summary.update(
            status="failed",
            end_time=now_iso(),
            error=f"{type(e).__name__}: {e}"[-4000:],
        )
        summary.update(_wall_times(t_start, earlier_wall))
        write_summary(out_dir, summary)
        raise


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _earlier_wall_time(prev: dict[str, Any]) -> float:
    """Wall time of the attempts before this one, from the last summary they left."""
    total = _number(prev.get("total_wall_time_s"))
    if prev.get("status") != "running" and total is not None:  # it ended and said so
        return total
    # it died without a word: its time up to its last summary write (its last checkpoint)
    earlier = _number(prev.get("earlier_attempts_wall_time_s")) or 0.0
    try:
        start = datetime.fromisoformat(prev["start_time"])
        last = datetime.fromisoformat(prev["updated"])
    except (KeyError, TypeError, ValueError):
        return earlier
    return earlier + max(0.0, (last - start).total_seconds())


def _wall_times(t_start: float, earlier_wall: float) -> dict[str, float]:
    """This attempt's wall time and the total over every attempt that led here (requeues,
    resumes after a crash): what the category has cost, start to end."""
    wall = time.time() - t_start
    return {"wall_time_s": round(wall, 2), "total_wall_time_s": round(earlier_wall + wall, 2)}


def _run_training(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    cs: CategorySamples,
    latest: Path | None,
    config_yaml: str,
    t_start: float,
    *,
    should_stop: Callable[[], bool] | None,
    progress_stream: Any,
) -> dict[str, Any]:
    tc, mc = cfg.train, cfg.model
    torch.manual_seed(tc.seed)  # LoRA init; dropout RNG continues from here (or the checkpoint)
    loaded = load_base_model(mc.name_or_path, device=mc.device, dtype=mc.dtype, quantization=mc.quantization)
    model = apply_lora_section(loaded, cfg.lora, gradient_checkpointing=mc.gradient_checkpointing)
    device = loaded.device
    base_config = model.get_base_model().config
    eos = eos_token_id(model, loaded.processor)
    encoder = Encoder(
        loaded.processor,
        num_query_tokens=base_config.num_query_tokens,
        image_token_id=base_config.image_token_id,
        eos_token_id=eos,
    )
    train_enc = [encoder.encode(s) for s in cs.train]
    val_enc = [encoder.encode(s) for s in cs.val]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay)

    micro, accum = tc.batch_size, tc.grad_accum_steps
    steps_per_epoch = math.ceil(len(cs.train) / (micro * accum))
    total_steps = steps_per_epoch * tc.num_epochs
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    warmup = int(tc.warmup_ratio * total_steps)

    state = ckpt.TrainerState(config_hash=cfg.config_hash(), micro_batch_size=micro, grad_accum_steps=accum)
    while latest is not None:
        try:
            state = ckpt.load_checkpoint(latest, model=model, optimizer=optimizer)
            break
        except ckpt.CheckpointLoadError as e:
            moved = ckpt.quarantine(latest)
            log.warning("%s: %s; moved it to %s and trying the previous one", category.name, e, moved.name)
            latest = ckpt.find_latest(out_dir)
    if latest is not None:
        state.resumes += 1
        micro = state.micro_batch_size or micro  # keep an earlier out-of-memory back-off
        if state.config_hash != cfg.config_hash():
            log.warning(
                "%s: resuming %s written under another config (hash %s, now %s)",
                category.name,
                latest.name,
                state.config_hash,
                cfg.config_hash(),
            )
            state.config_hash = cfg.config_hash()
    trainable, total_params = trainable_parameters(model)
    summary.update(
        device=device_info(device),
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        last_step=state.global_step,
    )
    write_summary(out_dir, summary)  # the collector sees where a running task runs
    progress = Progress(
        label=category.name,
        total_steps=total_steps,
        start_step=state.global_step,
        interval_s=tc.log_every_s,
        stream=progress_stream,
    )
    progress.line(
        f"{len(cs.train)} train / {len(cs.val)} val QA pairs on {len(cs.split.train)}/"
        f"{len(cs.split.val)} images; {trainable:,} of {total_params:,} parameters train; "
        f"device {device.type} {str(loaded.dtype).removeprefix('torch.')}; "
        + (f"resuming from {latest.name} (step {state.global_step})" if latest else "fresh start")
    )

    features = FeatureSource(
        loaded, cs.image_paths, cache=tc.feature_cache, max_pixels=cfg.data.max_image_pixels
    )
    t_feat = time.time()
    features.warm(cs.split.train + cs.split.val)
    feature_s = time.time() - t_feat
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def checkpoint_now() -> Path:
        touch(out_dir / ".lock")  # a live task keeps its lock fresh (see fsutil.category_lock)
        path = ckpt.save_checkpoint(
            out_dir,
            model=model,
            optimizer=optimizer,
            state=state,
            config_yaml=config_yaml,
            keep=tc.keep_checkpoints,
        )
        # the summary's `updated` time now marks this checkpoint: if this attempt dies without
        # a word (SIGKILL, a node lost), the next one counts its time up to here
        write_summary(out_dir, summary)
        return path

    set_train_mode(model)
    t_loop = time.time()
    train_time_before = state.train_time_s
    last_ckpt: Path | None = latest
    done = state.global_step >= total_steps
    epoch = state.epoch
    lengths = [len(e.input_ids) for e in train_enc]
    while not done and epoch < tc.num_epochs:
        steps = epoch_steps(
            lengths, seed=tc.seed, epoch=epoch, step_size=micro * accum, group_by_length=tc.group_by_length
        )
        for s_index in range(state.step_in_epoch, len(steps)):
            step = steps[s_index]
            lr = get_lr(
                state.global_step,
                total=total_steps,
                base_lr=tc.learning_rate,
                warmup=warmup,
                schedule=tc.lr_schedule,
            )
            for g in optimizer.param_groups:
                g["lr"] = lr

            def halved(new_micro: int) -> None:
                progress.line(
                    f"CUDA out of memory: micro-batch halved to {new_micro}, "
                    f"{math.ceil(tc.batch_size * accum / new_micro)} micro-batches per optimizer "
                    f"step (same effective batch of {tc.batch_size * accum}); retrying the step"
                )
                state.micro_batch_size = new_micro

            step_loss, micro = run_with_oom_backoff(
                lambda m, step=step: accumulate_step(
                    model, features, cs.train, train_enc, encoder, device, step, m
                ),
                micro,
                optimizer=optimizer,
                device=device,
                on_backoff=halved,
            )
            if tc.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.global_step += 1
            state.step_in_epoch = s_index + 1
            state.samples_seen += len(step)
            state.loss_curve.append([state.global_step, round(step_loss, 6)])
            state.train_time_s = train_time_before + (time.time() - t_loop)
            progress.update(state.global_step, step_loss, len(step), epoch)
            if state.global_step >= total_steps:
                done = True
            if s_index == len(steps) - 1 or done:
                break
            if should_stop is not None and should_stop():
                last_ckpt = checkpoint_now()
                progress.line(f"stop requested: saved {last_ckpt.name}; exiting for requeue")
                progress.close()
                raise StopRequested(last_ckpt)
            if tc.checkpoint_every_steps and state.global_step % tc.checkpoint_every_steps == 0:
                last_ckpt = checkpoint_now()
        # end of epoch (or of max_steps): validation loss, then a checkpoint at the boundary
        val = evaluate_loss(model, features, cs.val, val_enc, encoder, device, micro)
        epoch_losses = [loss for st, loss in state.loss_curve if st > epoch * steps_per_epoch]
        if epoch_losses:
            state.epoch_train_loss.append([epoch + 1, round(sum(epoch_losses) / len(epoch_losses), 6)])
        if val is not None:
            state.val_loss.append([epoch + 1, round(val, 6)])
        if state.step_in_epoch >= len(steps):
            state.epoch = epoch + 1
            state.step_in_epoch = 0
        progress.line(
            f"epoch {epoch + 1}/{tc.num_epochs} done at step {state.global_step}: "
            f"train loss {state.epoch_train_loss[-1][1] if state.epoch_train_loss else float('nan'):.4f}"
            + (f", val loss {val:.4f}" if val is not None else "")
        )
        state.train_time_s = train_time_before + (time.time() - t_loop)
        last_ckpt = checkpoint_now()
        epoch += 1
        if should_stop is not None and should_stop() and not done and epoch < tc.num_epochs:
            progress.close()
            raise StopRequested(last_ckpt)
    progress.close()

    final = save_final_model(out_dir, loaded, cfg, category, cs.questions, eos)
    if cfg.eval.after_training:  # answers from the model in memory: no second load
        from fada_batch.evaluate import evaluate_after_training

        summary["eval"] = evaluate_after_training(loaded, cs, out_dir, eos_token_id=eos, cfg=cfg)
    walls = _wall_times(t_start, float(summary.get("earlier_attempts_wall_time_s") or 0.0))
    wall = walls["wall_time_s"]
    adapter_bytes = (final / "adapter_model.safetensors").stat().st_size
    summary.update(
        status="completed",
        end_time=now_iso(),
        **walls,
        train_time_s=round(state.train_time_s, 2),
        feature_cache_s=round(feature_s, 2),
        epochs=tc.num_epochs,
        epochs_completed=state.epoch,
        steps=state.global_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        batch_size=tc.batch_size,
        grad_accum_steps=accum,
        effective_batch_size=tc.batch_size * accum,
        micro_batch_size=micro,  # smaller than batch_size after an out-of-memory back-off
        learning_rate=tc.learning_rate,
        lr_schedule=tc.lr_schedule,
        samples_seen=state.samples_seen,
        samples_per_s=round(state.samples_seen / state.train_time_s, 3) if state.train_time_s > 0 else None,
        loss_curve=_thin(state.loss_curve, 1000),
        epoch_train_loss=state.epoch_train_loss,
        val_loss=state.val_loss,
        final_train_loss=state.epoch_train_loss[-1][1] if state.epoch_train_loss else None,
        final_val_loss=state.val_loss[-1][1] if state.val_loss else None,
        peak_memory=peak_memory(device),
        device=device_info(device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        quantization=loaded.quantization,
        base_model=mc.name_or_path,
        feature_cache=tc.feature_cache,
        trainable_parameters=trainable,
        total_parameters=total_params,
        resumes=state.resumes,
        adapter_path=str(final),
        adapter_bytes=adapter_bytes,
        last_checkpoint=str(last_ckpt) if last_ckpt else None,
    )
    write_summary(out_dir, summary)
    progress.line(f"done in {wall:.1f} s; adapter in {final}")
    return summary


def _thin(curve: list[list[float]], max_points: int) -> list[list[float]]:
    """At most `max_points` points: means over equal windows of steps (keeps long runs small)."""
    if len(curve) <= max_points:
        return curve
    w = math.ceil(len(curve) / max_points)
    out = []
    for i in range(0, len(curve), w):
        chunk = curve[i : i + w]
        out.append([chunk[-1][0], round(sum(c[1] for c in chunk) / len(chunk), 6)])
    return out
