"""The models the benchmarks build: a random-weight BLIP-2 shaped like blip2-opt-2.7b for the CPU
bench (`make_bench_model`), blip2-opt-2.7b's own architecture (`BLIP2_OPT_27B`, for
scripts/gpu_benchmark.py), and what a configuration costs per sample (parameters, FLOPs).

    make_bench_model(Path("models/bench-blip2"))                     # saved for the production load path
    model = build_random_model(blip2_config(BLIP2_OPT_27B), torch.device("cuda"), torch.bfloat16)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fada_batch.data.categories import STANDARD_QUESTIONS

log = logging.getLogger(__name__)

# Salesforce/blip2-opt-2.7b's config.json, the values that set the architecture (the sections
# of `blip2_config`): built with random weights, it times the real model without a download.
BLIP2_OPT_27B: dict[str, Any] = {
    "vision": dict(
        hidden_size=1408,
        num_hidden_layers=39,
        num_attention_heads=16,
        intermediate_size=6144,
        image_size=224,
        patch_size=14,
    ),
    "qformer": {},  # Blip2QFormerConfig defaults: 12 layers, hidden 768, cross-attention every 2nd
    "text": dict(
        hidden_size=2560,
        num_hidden_layers=32,
        ffn_dim=10240,
        num_attention_heads=32,
        vocab_size=50272,
        max_position_embeddings=2048,
        word_embed_proj_dim=2560,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=50118,
    ),
    "num_query_tokens": 32,
    "image_token_index": 50265,
}


def blip2_config(spec: dict[str, Any]) -> Any:
    """A `Blip2Config` from `spec`: keyword arguments of the vision, Q-Former and OPT text
    configs (`vision`, `qformer`, `text`), `num_query_tokens` and `image_token_index`."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    return Blip2Config(
        vision_config=Blip2VisionConfig(**spec["vision"]).to_dict(),
        qformer_config=Blip2QFormerConfig(**spec["qformer"]).to_dict(),
        text_config=OPTConfig(**spec["text"]).to_dict(),
        num_query_tokens=spec["num_query_tokens"],
        image_token_index=spec["image_token_index"],
    )


def build_random_model(config: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Random weights, allocated and initialised on `device` in `dtype` (never materialised on
    the CPU first; `meta` gives a model without storage), all frozen, in eval mode."""
    from transformers import Blip2ForConditionalGeneration

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(old)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


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
    vision = vision_forward_flops(config, n)
    lm = 2 * n["lm"] * lm_tokens
    return {
        "vision_forward": float(vision),
        "lm_forward": float(lm),
        "vision_over_lm": round(vision / lm, 3),
        "lm_tokens": round(float(lm_tokens), 1),
        "vision_tokens": vision_tokens(config),
    }


def vision_tokens(config: Any) -> int:
    """Tokens the vision tower runs on: one per patch, plus the class token."""
    vc = config.vision_config
    return (vc.image_size // vc.patch_size) ** 2 + 1


def vision_forward_flops(config: Any, counts: dict[str, int]) -> int:
    """Forward FLOPs of the frozen vision side for one image, from `parameter_counts`:
    2 N_vision x `vision_tokens` + 2 N_qformer x the query tokens."""
    return 2 * counts["vision"] * vision_tokens(config) + 2 * counts["qformer"] * config.num_query_tokens


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
    from transformers import Blip2ForConditionalGeneration

    from fada_batch.tools.demo import all_answers
    from fada_batch.tools.tiny import build_processor, build_tokenizer

    torch.manual_seed(seed)
    prompts = [f"Question: {q} Answer:" for q in STANDARD_QUESTIONS]
    corpus = prompts + [a for options in all_answers().values() for a in options]
    tokenizer = build_tokenizer(corpus, vocab_size=recipe.tokenizer_vocab)
    processor = build_processor(
        tokenizer, image_size=recipe.image_size, num_query_tokens=recipe.num_query_tokens
    )
    config = blip2_config(_bench_spec(recipe, len(processor.tokenizer), processor))
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)
    return model.eval(), processor


def _bench_spec(recipe: BenchModelRecipe, vocab: int, processor: Any) -> dict[str, Any]:
    """`recipe`'s sections for `blip2_config` (widths scaled, the tokenizer's vocabulary)."""
    from fada_batch.tools.tiny import BOS_EOS_ID, PAD_ID

    vh, qh, th, heads = (
        recipe.width(recipe.vision_hidden),
        recipe.width(recipe.qformer_hidden),
        recipe.width(recipe.text_hidden),
        recipe.num_heads,
    )
    return {
        "vision": dict(
            hidden_size=vh,
            intermediate_size=4 * vh,
            num_hidden_layers=recipe.vision_layers,
            num_attention_heads=heads,
            image_size=recipe.image_size,
            patch_size=recipe.patch_size,
            initializer_range=0.02,
        ),
        "qformer": dict(
            hidden_size=qh,
            num_hidden_layers=recipe.qformer_layers,
            num_attention_heads=heads,
            intermediate_size=4 * qh,
            cross_attention_frequency=1,
            encoder_hidden_size=vh,
            vocab_size=vocab,
        ),
        "text": dict(
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
        ),
        "num_query_tokens": recipe.num_query_tokens,
        "image_token_index": processor.tokenizer.convert_tokens_to_ids("<image>"),
    }
