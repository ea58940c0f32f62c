"""Question/answer samples -> token ids with image tokens, and teacher-forced, masked labels.

A row is `[<image> * num_query_tokens] <bos> prompt answer <eos>`, laid out exactly as
`Blip2Processor` lays out a prompt (image tokens first, then the tokenizer's own special
tokens). Labels copy the ids of the answer and the EOS and are -100 everywhere else (image
tokens, prompt, padding), so the loss covers the answer only. Nothing is ever truncated: a
cut row would lose image tokens or the answer.

The seed tokenised the answer apart from the prompt and padded both to fixed lengths, so its
loss landed on padding positions (see docs/blip2.md); this module is the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from fada_batch.data.samples import Sample

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    """A sample's token ids; `prompt_len` counts image tokens + BOS + prompt tokens."""

    input_ids: list[int]
    prompt_len: int


class TokenLayoutError(RuntimeError):
    """The processor and model disagree on image tokens; training would ignore the image."""


class Encoder:
    """Tokenises samples the way `Blip2Processor` does, and checks the image-token layout.

    Args:
        processor: a `Blip2Processor` (its tokenizer and `num_query_tokens` are used).
        num_query_tokens: the MODEL's `config.num_query_tokens`.
        image_token_id: the model's `config.image_token_id`.
        eos_token_id: the id generation stops at (the model's generation config).
    """

    def __init__(
        self, processor: Any, *, num_query_tokens: int, image_token_id: int | None, eos_token_id: int
    ) -> None:
        self.tokenizer = processor.tokenizer
        missing = [
            what
            for what, value in (
                ("the processor has no num_query_tokens", getattr(processor, "num_query_tokens", None)),
                ("the model config has no image_token_index", image_token_id),
            )
            if value is None
        ]
        if missing:
            raise TokenLayoutError(
                f"{' and '.join(missing)} (an old revision of the model): the processor would insert "
                "no <image> tokens, or the model would not know where they are, and training "
                "would ignore the image. Stage the model again: `fada-batch stage-model --model "
                "MODEL --to FOLDER` brings processor and config up to date. Or do both by hand: "
                f'"num_query_tokens": {num_query_tokens} in processor_config.json, and in '
                'config.json "image_token_index": the id of the tokenizer\'s "<image>" token '
                "(below text_config.vocab_size)."
            )
        if processor.num_query_tokens != num_query_tokens:
            raise TokenLayoutError(
                f"processor.num_query_tokens={processor.num_query_tokens} but the model's "
                f"config.num_query_tokens={num_query_tokens}: processor and model come from "
                "different checkpoints. Load both from the same model.name_or_path."
            )
        image_token = processor.image_token
        image_token = getattr(image_token, "content", image_token)
        ids = self.tokenizer(image_token * num_query_tokens, add_special_tokens=False)["input_ids"]
        if len(ids) != num_query_tokens or any(i != image_token_id for i in ids):
            raise TokenLayoutError(
                f"the tokenizer turns {num_query_tokens} image tokens into {ids[:8]}..., expected "
                f"{num_query_tokens} x id {image_token_id} (config.image_token_id). The processor's "
                "tokenizer does not belong to this model."
            )
        _check_bos(self.tokenizer)
        self.image_ids = ids
        self.num_query_tokens = num_query_tokens
        self.image_token_id = image_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos_token_id
        )

    def prompt_ids(self, prompt: str) -> list[int]:
        """Ids of image tokens + the tokenizer's special prefix + prompt (generation input)."""
        return self.image_ids + self.tokenizer(prompt)["input_ids"]

    def encode(self, sample: Sample) -> Encoded:
        """Ids of `prompt + " " + answer + <eos>`; `prompt_len` marks where the answer starts."""
        prompt = self.prompt_ids(sample.prompt)
        full = self.image_ids + self.tokenizer(f"{sample.prompt} {sample.answer}")["input_ids"]
        # The byte-level BPE keeps the prompt's tokens an exact prefix of prompt + answer; if a
        # tokenizer merged across the boundary, fall back to concatenating the two encodings.
        if full[: len(prompt)] != prompt:
            answer_ids = self.tokenizer(f" {sample.answer}", add_special_tokens=False)["input_ids"]
            full = prompt + answer_ids
        if full and full[-1] == self.eos_token_id and len(full) > len(prompt):
            full = full[:-1]  # tokenizers that append EOS themselves: keep exactly one
        return Encoded(input_ids=[*full, self.eos_token_id], prompt_len=len(prompt))


def _check_bos(tokenizer: Any) -> None:
    """BLIP-2's OPT was trained with BOS (`</s>`) before the text; rows are laid out, and the
    prompt/answer boundary found, on that assumption.

    Raises:
        TokenLayoutError: the tokenizer has no BOS or does not put it first.
    """
    bos = tokenizer.bos_token_id
    probe = tokenizer("Question: a Answer:")["input_ids"]
    if bos is not None and probe and probe[0] == bos:
        return
    raise TokenLayoutError(
        f"the tokenizer does not start a text with its BOS token (bos_token_id={bos}; "
        f"'Question: a Answer:' -> {probe[:4]}...), but BLIP-2's language model was trained with "
        "BOS first (OPT: </s>, id 2). Use the tokenizer saved with the model (add_bos_token: true "
        "in its tokenizer_config.json), e.g. by staging the model again with `fada-batch "
        "stage-model`."
    )


def answer_length_stats(encoded: list[Encoded]) -> dict[str, int | float]:
    """Answer lengths in tokens (EOS included) over `encoded`, and the generation limit they
    call for: the longest answer plus a margin of a quarter of it (at least 8 tokens), so
    evaluation does not cut off an answer of a length training taught.

    Returns:
        {"max", "p99", "mean", "max_new_tokens"}; zeros (and 32 new tokens) when empty.
    """
    lengths = sorted(len(e.input_ids) - e.prompt_len for e in encoded)
    if not lengths:
        return {"max": 0, "p99": 0, "mean": 0.0, "max_new_tokens": 32}
    longest = lengths[-1]
    return {
        "max": longest,
        "p99": lengths[min(len(lengths) - 1, math.ceil(0.99 * len(lengths)) - 1)],
        "mean": round(sum(lengths) / len(lengths), 2),
        "max_new_tokens": longest + max(8, math.ceil(longest / 4)),
    }


def collate(
    encoded: list[Encoded], *, pad_token_id: int, image_token_id: int, num_query_tokens: int
) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest row (dynamic padding) and build masked labels.

    Returns:
        input_ids (B, T), attention_mask (B, T), labels (B, T) with -100 off the answer.

    Raises:
        TokenLayoutError: if a row does not hold exactly `num_query_tokens` image tokens.
    """
    width = max(len(e.input_ids) for e in encoded)
    b = len(encoded)
    input_ids = torch.full((b, width), pad_token_id, dtype=torch.long)  # (B, T)
    attention = torch.zeros((b, width), dtype=torch.long)  # (B, T)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, e in enumerate(encoded):
        n = len(e.input_ids)
        row = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[i, :n] = row
        attention[i, :n] = 1
        labels[i, e.prompt_len : n] = row[e.prompt_len :]
    counts = (input_ids == image_token_id).sum(dim=1)  # (B,)
    if not bool((counts == num_query_tokens).all()):
        raise TokenLayoutError(
            f"rows hold {counts.tolist()} image tokens, expected {num_query_tokens} each: the "
            "image features would be misplaced. Check that processor and model match."
        )
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def masked_lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropy over labelled positions, and their count.

    `logits[:, t]` predicts token `t + 1`, so logits drop the last position and labels the
    first. Returning the sum (not the mean) lets gradient accumulation divide by the tokens of
    the whole optimizer step, which keeps a split micro-batch's gradient identical.

    Args:
        logits: (B, T, V); labels: (B, T) with -100 where no loss is taken.
    """
    shift_logits = logits[:, :-1, :].float()  # (B, T-1, V)
    shift_labels = labels[:, 1:].to(shift_logits.device)  # (B, T-1)
    loss = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())
