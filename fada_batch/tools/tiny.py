"""A small, pretrained BLIP-2 built offline, for demos and tests without the real 3.8B model.

`make_tiny_model(out_dir)` trains a byte-level BPE tokenizer on the questions, the demo's
answers and captions, builds a `Blip2ForConditionalGeneration` from config (ViT, Q-Former,
OPT) and pretrains all of it briefly on captioned synthetic scans from
`fada_batch.tools.demo.render_scan`, so that its frozen image features carry what is drawn (which
side the structure lies on, how noisy the scan is) and LoRA on the language model alone can
learn image-dependent answers. It then saves model and processor with `save_pretrained`, so
`Blip2ForConditionalGeneration.from_pretrained(out_dir)` and
`AutoProcessor.from_pretrained(out_dir)` work offline, like the real checkpoint's folder.

Why this recipe (measured; docs/blip2.md has the trials behind it):

- A random-init tiny BLIP-2 carries almost no image information through its frozen vision
  side, so LoRA-only training learns image-dependent answers for some seeds only.
- The vision tower needs `initializer_range` 0.02 (its default, 1e-10, starts near zero and
  the image path collapses) and the Q-Former's query tokens need a random start (they start
  at zero, so all queries are identical).
- Left/right needs big patches: at patch 8 a linear probe on the features could not tell the
  sides apart; at patch 16 and 32 pretraining learned side for some seeds only (probe 0.75 at
  patch 32, seed 1); with one 64-pixel patch for the whole image it scored 1.0 on seeds 0-2.
- Captioning learns the strongest image cue first and then got stuck there: with faint
  noise, captions' side words were right by step 200 and their texture words still at chance
  after 2,000 steps (texture alone was learned by step 200-400). The demo's poor scans
  therefore also carry haze (`render_scan`); both are then learned by step ~200.
- The captions describe side and noise in words other than the VQA answers, and every step
  also trains the language model on text-only "Question: ... Answer: ..." lines with the
  answers drawn at random: without those lines LoRA could not steer the language model into
  the answer words at all.
- All dropouts are 0 in the saved config: at this size they swamp the image signal.

Measured (seeds 0-2, 2 CPU cores shared with other jobs): build ~30 s; ridge probe on the
frozen `image_features` of held-out scans 1.0 for side and 1.0 for noise; LoRA-only on 40
demo images (r=8, alpha 16, dropout 0, final LayerNorm trained, AdamW lr 1e-2, batch 16, 20
epochs, ~8 s) answered held-out Q2 and Q6 100% (majority 35-47%).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    GPT2Tokenizer,
    OPTConfig,
)

from fada_batch.data.categories import SEED_CATEGORY_NAMES as CATEGORY_NAMES
from fada_batch.data.categories import STANDARD_QUESTIONS, TINY_MODEL_MARKER
from fada_batch.tools.demo import SIDES, all_answers, describe, render_scan

logger = logging.getLogger(__name__)

RECIPE_VERSION = 3  # bump whenever the recipe changes what gets built
MARKER_NAME = TINY_MODEL_MARKER  # written last: its presence marks a complete model
PROMPT_TEMPLATE = "Question: {question} Answer:"

# OPT's special tokens and ids (facebook/opt-*, Salesforce/blip2-opt-2.7b). OPT prepends
# `</s>` as BOS; `<s>` exists but is unused.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>")
PAD_ID, BOS_EOS_ID, UNK_ID = 1, 2, 3

# Files that `save_pretrained` of model and processor write and `from_pretrained` needs.
_REQUIRED_FILES: tuple[str, ...] = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "processor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)


@dataclass(frozen=True)
class TinyRecipe:
    """Architecture and pretraining settings of the tiny model (all recorded in the marker)."""

    image_size: int = 64  # model input, pixels per side
    patch_size: int = 64  # one patch for the whole image: keeps left/right readable
    vision_hidden: int = 64
    vision_layers: int = 2
    qformer_hidden: int = 64
    qformer_layers: int = 2
    num_query_tokens: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    num_heads: int = 4  # in all three towers
    tokenizer_vocab: int = 1024  # upper bound; the small corpus saturates below it
    render_sizes: tuple[int, ...] = (96, 128, 160)  # scans are rendered at these, then resized
    pool_size: int = 1536  # distinct captioned scans rendered for pretraining
    steps: int = 500
    batch_size: int = 32  # captioned scans per step
    text_batch_size: int = 16  # text-only question/answer lines per step
    lr: float = 2e-3
    warmup_steps: int = 50
    weight_decay: float = 0.01


DEFAULT_RECIPE = TinyRecipe()


def make_tiny_model(out_dir: Path, *, seed: int = 0, recipe: TinyRecipe = DEFAULT_RECIPE) -> Path:
    """Build, pretrain and save a tiny BLIP-2 with its processor; reuse it when already built.

    Returns at once when `out_dir` already holds a complete model of the same recipe and seed.
    Otherwise builds in a temporary sibling folder and renames it into place, so a killed
    build never leaves a half-written model behind.

    Args:
        out_dir: folder to write; its parent is created if needed.
        seed: seeds the tokenizer corpus order, the weights, the scans and the batches.
        recipe: architecture and pretraining settings.

    Returns:
        `out_dir`, ready for `Blip2ForConditionalGeneration.from_pretrained` and
        `AutoProcessor.from_pretrained` (also with HF_HUB_OFFLINE=1).

    Raises:
        FileExistsError: `out_dir` exists, is not empty and is not a tiny-model folder
            (refusing to replace something that was not made here).
    """
    out_dir = Path(out_dir)
    wanted = _marker(seed, recipe)
    if is_complete(out_dir, seed=seed, recipe=recipe):
        logger.info("Tiny BLIP-2 already built in %s (recipe %d)", out_dir, RECIPE_VERSION)
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / MARKER_NAME).is_file():
        raise FileExistsError(
            f"{out_dir} exists and is not a tiny-model folder (no {MARKER_NAME}); refusing to "
            "replace it. Pass a new or empty folder."
        )

    start = time.perf_counter()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # One thread: the tiny model's matrices are too small to split, and torch's default (a
        # thread per core) made this build ~10x slower where anything else used the CPUs
        # (the image's build beside CI's tests: 10+ CPU-minutes against ~65 s with one).
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            model, processor, stats = build_pretrained(seed=seed, recipe=recipe)
        finally:
            torch.set_num_threads(threads)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        marker = {**wanted, "pretraining": stats, "build_seconds": time.perf_counter() - start}
        (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
        _move_into_place(tmp, out_dir, seed=seed, recipe=recipe)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("Tiny BLIP-2 built in %.1f s: %s", time.perf_counter() - start, out_dir)
    return out_dir


def is_complete(out_dir: Path, *, seed: int = 0, recipe: TinyRecipe = DEFAULT_RECIPE) -> bool:
    """True when `out_dir` holds a complete tiny model made by this recipe with this seed."""
    out_dir = Path(out_dir)
    marker_path = out_dir / MARKER_NAME
    if not marker_path.is_file() or not all((out_dir / f).is_file() for f in _REQUIRED_FILES):
        return False
    try:
        marker = json.loads(marker_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    wanted = _marker(seed, recipe)
    return all(marker.get(k) == v for k, v in wanted.items())


def build_pretrained(
    *, seed: int = 0, recipe: TinyRecipe = DEFAULT_RECIPE
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor, dict[str, Any]]:
    """Build tokenizer, processor and model, and pretrain the model (no files written).

    Returns:
        `(model, processor, stats)`: the model in eval mode, its processor, and pretraining
        statistics (steps, seconds, first and last losses).
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tokenizer = build_tokenizer(_corpus(rng), vocab_size=recipe.tokenizer_vocab)
    processor = build_processor(
        tokenizer, image_size=recipe.image_size, num_query_tokens=recipe.num_query_tokens
    )
    config = build_config(recipe, processor)
    model = Blip2ForConditionalGeneration(config)
    # Query tokens start at zero, which makes all queries identical; BLIP-2 itself draws them
    # from N(0, 0.02).
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    # OPT's convention (`</s>` is BOS and EOS); generation stops at `</s>`.
    model.generation_config.bos_token_id = BOS_EOS_ID
    model.generation_config.eos_token_id = BOS_EOS_ID
    model.generation_config.pad_token_id = PAD_ID
    stats = pretrain(model, processor, recipe, rng)
    model.eval()
    return model, processor, stats


def build_tokenizer(texts: Iterable[str], *, vocab_size: int = 1024) -> GPT2Tokenizer:
    """Train a byte-level BPE on `texts` and wrap it as OPT does (`GPT2Tokenizer`).

    Special ids follow OPT: `<s>`=0, `<pad>`=1, `</s>`=2 (BOS and EOS), `<unk>`=3. Being
    byte-level, it encodes any text, also words it never saw.
    """
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(list(texts), trainer)
    vocab = bpe.get_vocab()
    assert [vocab[t] for t in SPECIAL_TOKENS] == [0, PAD_ID, BOS_EOS_ID, UNK_ID], vocab
    # GPT2Tokenizer wants merges as tuples; tokenizers serialises them as pairs or "a b".
    raw = json.loads(bpe.to_str())["model"]["merges"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in raw]
    return GPT2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        add_bos_token=True,
    )


def build_processor(tokenizer: GPT2Tokenizer, *, image_size: int, num_query_tokens: int) -> Blip2Processor:
    """The BLIP-2 processor; note that creating it adds the `<image>` token to `tokenizer`."""
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    return Blip2Processor(
        image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens
    )


def build_config(recipe: TinyRecipe, processor: Blip2Processor) -> Blip2Config:
    """Blip2Config for `recipe`, with all dropouts 0 and the processor's `<image>` id.

    The text vocabulary is `len(tokenizer)` (which counts `<image>`), not `vocab_size`.
    """
    tokenizer = processor.tokenizer
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    assert image_token_id != tokenizer.unk_token_id, "processor did not add <image>"
    vision = Blip2VisionConfig(
        hidden_size=recipe.vision_hidden,
        intermediate_size=4 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.num_heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        attention_dropout=0.0,
        initializer_range=0.02,  # default 1e-10 starts the vision path near zero
    )
    qformer = Blip2QFormerConfig(
        hidden_size=recipe.qformer_hidden,
        num_hidden_layers=recipe.qformer_layers,
        num_attention_heads=recipe.num_heads,
        intermediate_size=4 * recipe.qformer_hidden,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        cross_attention_frequency=1,
        encoder_hidden_size=recipe.vision_hidden,
        vocab_size=len(tokenizer),
        max_position_embeddings=128,
    )
    text = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=recipe.text_hidden,
        word_embed_proj_dim=recipe.text_hidden,
        num_hidden_layers=recipe.text_layers,
        num_attention_heads=recipe.num_heads,
        ffn_dim=4 * recipe.text_hidden,
        max_position_embeddings=256,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        layerdrop=0.0,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_EOS_ID,
        eos_token_id=BOS_EOS_ID,
    )
    return Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=recipe.num_query_tokens,
        image_token_index=image_token_id,
    )


@torch.no_grad()
def image_features(model: Blip2ForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """Frozen image features as the language model sees them, computed in eval mode.

    Args:
        pixel_values: `(B, 3, H, W)` from the processor.

    Returns:
        `(B, num_query_tokens, text_hidden)`: vision -> Q-Former -> language projection.
    """
    was_training = model.training
    model.eval()
    try:
        out = model.get_image_features(pixel_values=pixel_values, return_dict=True)
    finally:
        model.train(was_training)
    return out.pooler_output  # (B, Q, D)


def pretrain(
    model: Blip2ForConditionalGeneration,
    processor: Blip2Processor,
    recipe: TinyRecipe,
    rng: np.random.Generator,
) -> dict[str, Any]:
    """Full-parameter pretraining: captioning of synthetic scans plus text-only LM lines.

    Each step takes `batch_size` captioned scans (`[<image>*N] </s> caption </s>`, loss on
    caption and EOS) and `text_batch_size` question/answer lines (`</s> Question: q Answer:
    a </s>`, loss on every token after BOS), and sums both losses.

    Returns:
        `{"steps", "seconds", "first_loss", "last_loss"}` (losses averaged over 20 steps).
    """
    start = time.perf_counter()
    pixel_values, captions = _caption_pool(processor, recipe, rng)  # (P, 3, S, S), P strings
    tok = processor.tokenizer
    eos = tok.eos_token
    cap_ids, cap_mask, cap_labels = _encode(processor, [c + eos for c in captions], image=True)
    lines = _text_lines(rng, 4 * recipe.text_batch_size * 8)
    txt_ids, txt_mask, txt_labels = _encode(processor, [t + eos for t in lines], image=False)

    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": recipe.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=recipe.lr,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: _lr_factor(step, recipe.warmup_steps, recipe.steps)
    )
    gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
    losses: list[float] = []
    model.train()
    for _ in range(recipe.steps):
        ci = torch.randint(len(captions), (recipe.batch_size,), generator=gen)
        ti = torch.randint(len(lines), (recipe.text_batch_size,), generator=gen)
        out = model(
            pixel_values=pixel_values[ci],
            input_ids=cap_ids[ci],
            attention_mask=cap_mask[ci],
            labels=cap_labels[ci],
        )
        text_loss = _text_loss(model, txt_ids[ti], txt_mask[ti], txt_labels[ti])
        loss = out.loss + text_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    window = max(1, min(20, len(losses)))
    stats = {
        "steps": recipe.steps,
        "seconds": round(seconds, 1),
        "first_loss": round(float(np.mean(losses[:window])), 4),
        "last_loss": round(float(np.mean(losses[-window:])), 4),
    }
    logger.info("Pretrained tiny BLIP-2: %s", stats)
    return stats


def _text_loss(
    model: Blip2ForConditionalGeneration,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """Causal LM loss of the language model alone on text-only lines."""
    logits = model.language_model(input_ids=input_ids, attention_mask=attention_mask).logits
    # (B, T, V) -> predict token t+1 from position t
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1), ignore_index=-100
    )


def _encode(
    processor: Blip2Processor, texts: Sequence[str], *, image: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, mask and labels (-100 on image tokens, BOS and padding).

    Returns:
        Three `(B, T)` tensors; with `image`, each row starts with `num_query_tokens`
        `<image>` tokens, as the processor writes them.
    """
    tok = processor.tokenizer
    enc = tok(list(texts), padding=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask  # (B, T)
    if image:
        n = processor.num_query_tokens
        image_id = tok.convert_tokens_to_ids("<image>")
        ids = torch.cat([torch.full((ids.size(0), n), image_id), ids], dim=1)  # (B, N + T)
        mask = torch.cat([torch.ones(ids.size(0), n, dtype=mask.dtype), mask], dim=1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, : (processor.num_query_tokens if image else 0) + 1] = -100  # image tokens, BOS
    return ids, mask, labels


def _caption_pool(
    processor: Blip2Processor, recipe: TinyRecipe, rng: np.random.Generator
) -> tuple[torch.Tensor, list[str]]:
    """Render `pool_size` scans (balanced sides and noise, all categories) with captions.

    Returns:
        `pixel_values` `(P, 3, S, S)` through the same image processor as real data, and the
        `P` captions.
    """
    images, captions = [], []
    for i in range(recipe.pool_size):
        side = SIDES[i % 2]
        noisy = bool((i // 2) % 2)
        category = CATEGORY_NAMES[int(rng.integers(len(CATEGORY_NAMES)))]
        size = int(rng.choice(recipe.render_sizes))
        images.append(render_scan(rng, side=side, noisy=noisy, size=size, category=category))
        captions.append(describe(side=side, noisy=noisy, category=category))
    pixel_values = processor.image_processor(images, return_tensors="pt").pixel_values
    return pixel_values, captions


def _text_lines(rng: np.random.Generator, count: int) -> list[str]:
    """Text-only `Question: q Answer: a` lines, each answer drawn at random for its question.

    Drawing the answer at random teaches the language model the answer words and the format
    without tying any answer to a question: LoRA must still look at the image to choose.
    """
    answers = all_answers()
    lines = []
    for _ in range(count):
        q = int(rng.integers(len(STANDARD_QUESTIONS)))
        options = answers[q]
        a = options[int(rng.integers(len(options)))]
        lines.append(f"{PROMPT_TEMPLATE.format(question=STANDARD_QUESTIONS[q])} {a}")
    return lines


def _corpus(rng: np.random.Generator) -> list[str]:
    """Tokenizer training texts: prompts with every answer, captions, category names."""
    answers = all_answers()
    texts = [PROMPT_TEMPLATE.format(question=q) for q in STANDARD_QUESTIONS]
    texts += [f"{texts[i]} {a}" for i, options in answers.items() for a in options]
    texts += [a for options in answers.values() for a in options]
    texts += [
        describe(side=side, noisy=noisy, category=category)
        for side in SIDES
        for noisy in (False, True)
        for category in CATEGORY_NAMES
    ]
    texts += list(CATEGORY_NAMES)
    order = rng.permutation(len(texts))
    return [texts[i] for i in order]


def _lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _marker(seed: int, recipe: TinyRecipe) -> dict[str, Any]:
    """What identifies a build: recipe version, seed and every recipe setting."""
    settings = dataclasses.asdict(recipe)
    settings["render_sizes"] = list(recipe.render_sizes)  # JSON has no tuples
    return {"recipe_version": RECIPE_VERSION, "seed": seed, "recipe": settings}


def _move_into_place(tmp: Path, out_dir: Path, *, seed: int, recipe: TinyRecipe) -> None:
    """Rename the finished `tmp` folder to `out_dir`, replacing an older tiny model there."""
    if out_dir.exists():
        if is_complete(out_dir, seed=seed, recipe=recipe):
            return  # another process finished the same build first
        old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
        out_dir.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(out_dir)
    except OSError:
        # A concurrent build renamed its folder into place between our check and our rename.
        if not is_complete(out_dir, seed=seed, recipe=recipe):
            raise
