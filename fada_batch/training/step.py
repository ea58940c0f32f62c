"""One optimizer step and what it is made of: the learning rate, the epoch's steps, the loss of a
micro-batch, gradient accumulation, the out-of-memory back-off and the validation loss.

    loss = accumulate_step(model, features, samples, encoded, encoder, device, step, micro)

The recipe (`training.recipe`) runs these in its loop; `fada-batch bench` and
scripts/gpu_benchmark.py time the very same step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from fada_batch.data.samples import Sample
from fada_batch.training.collate import Encoded, Encoder, collate, masked_lm_loss_sum
from fada_batch.training.features import FeatureSource
from fada_batch.training.model import base_of, forward_autocast, lm_logits


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
    # the base's load dtype, read off its (never quantised) input embeddings
    dtype = base_of(model).get_input_embeddings().weight.dtype
    with forward_autocast(device, dtype):
        logits = lm_logits(
            model, batch["input_ids"].to(device), batch["attention_mask"].to(device), feats
        )  # (B, T, V)
    return masked_lm_loss_sum(logits, batch["labels"])  # in fp32, outside autocast


def accumulate_step(
    model: Any,
    features: FeatureSource,
    samples: list[Sample],
    encoded: list[Encoded],
    encoder: Encoder,
    device: torch.device,
    step: list[int],
    micro: int,
    *,
    shard: list[int] | None = None,
) -> float:
    """Backward over one optimizer step's samples in micro-batches; returns the step's loss.

    The loss is the mean over the answer (+EOS) tokens of the WHOLE step, so cutting the step
    into smaller micro-batches (out-of-memory back-off) gives the same gradient. Under data
    parallelism `shard` is this rank's part of `step` (`Ranks.shard`): only it goes through the
    model, still divided by the whole step's token count, so the ranks' gradients and losses
    sum to the one-process ones.
    """
    n_tokens = sum(len(encoded[i].input_ids) - encoded[i].prompt_len for i in step)
    step = step if shard is None else shard
    step_loss = 0.0
    for mb in micro_batches(step, micro):
        s, _n = batch_loss_sum(
            model, features, [samples[i] for i in mb], [encoded[i] for i in mb], encoder, device
        )
        (s / n_tokens).backward()
        step_loss += float(s.detach()) / n_tokens
    return step_loss


@torch.no_grad()
def evaluate_loss_sum(
    model: Any,
    features: FeatureSource,
    samples: list[Sample],
    encoded: list[Encoded],
    encoder: Encoder,
    device: torch.device,
    batch_size: int,
) -> tuple[float, int]:
    """Summed answer-token loss over `samples` (dropout off) and its token count (0, 0 for
    none): what data-parallel ranks add up for the validation loss."""
    if not samples:
        return 0.0, 0
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
    return total, count


def set_train_mode(model: Any) -> None:
    """LoRA (and the language model's dropout) in train mode; frozen vision side in eval."""
    model.train()
    base = base_of(model)
    for m in (base.vision_model, base.qformer, base.language_projection):
        m.eval()


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
