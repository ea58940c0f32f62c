"""The samples both recipes train on: synthetic ones shaped like the configured model's
inputs, or a category's real question/answer pairs; and the production load path, timed.

    loaded, load_s = load_for_bench(cfg, quantization="none", gradient_checkpointing=False)
    inputs = synthetic_inputs(make_encoder(loaded), template=..., n_samples=64, folder=tmp, vocab_size=...)
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fada_batch.config import JobConfig
from fada_batch.data.categories import NUM_QUESTIONS, STANDARD_QUESTIONS
from fada_batch.data.samples import Sample
from fada_batch.text import plural
from fada_batch.tools.bench.measure import sync
from fada_batch.training.collate import Encoded, Encoder
from fada_batch.training.model import LoadedModel, apply_lora_section, base_of, eos_token_id, load_base_model


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
        cfg.data.category(category),
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


def load_for_bench(
    cfg: JobConfig, *, quantization: str, gradient_checkpointing: bool
) -> tuple[LoadedModel, float]:
    """The production load path (`load_base_model` + `apply_lora`) and its time in seconds."""
    t0 = time.perf_counter()
    mc, lc = cfg.model, cfg.lora
    torch.manual_seed(cfg.train.seed)
    loaded = load_base_model(mc.name_or_path, device=mc.device, dtype=mc.dtype, quantization=quantization)
    apply_lora_section(loaded, lc, gradient_checkpointing=gradient_checkpointing)
    sync(loaded.device)
    return loaded, time.perf_counter() - t0


def make_encoder(loaded: LoadedModel) -> Encoder:
    conf = base_of(loaded.model).config
    return Encoder(
        loaded.processor,
        num_query_tokens=conf.num_query_tokens,
        image_token_id=conf.image_token_id,
        eos_token_id=eos_token_id(loaded.model, loaded.processor),
    )
