"""The offline tiny BLIP-2: save/load round trip, processor wiring, caching, and frozen image
features that carry what is drawn (side and noise), checked with a linear probe."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoProcessor, Blip2ForConditionalGeneration, Blip2Processor

from fada_batch.tools.demo import SIDES, render_scan
from fada_batch.tools.tiny import (
    BOS_EOS_ID,
    MARKER_NAME,
    PAD_ID,
    RECIPE_VERSION,
    TinyRecipe,
    image_features,
    is_complete,
    make_tiny_model,
)

PROMPT = "Question: Fetal Orientation: Describe the orientation of the fetus Answer:"


@pytest.fixture(scope="module", autouse=True)
def offline() -> Iterator[None]:
    """Everything here must work without the hub."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, offline: None) -> Path:
    """The session's tiny model: `make_tiny_model(..., seed=0)` with the default recipe, the
    very build checked here (built by the first test that needs it; 30-60 s), so the suite
    does not pay for the same build twice. `test_a_fresh_build_...` builds one of its own."""
    return tiny_model_dir


def test_a_fresh_build_is_complete_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    """The build path itself, on every run (the cached model may be from an earlier one), with
    a small recipe (few steps, a small pool) into a folder whose name has a space and quotes."""
    small = TinyRecipe(steps=6, pool_size=64, batch_size=8, text_batch_size=4, warmup_steps=2)
    out = tmp_path / "tiny 'blip2'"
    assert make_tiny_model(out, seed=3, recipe=small) == out
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    marker = json.loads((out / MARKER_NAME).read_text())
    assert marker["seed"] == 3 and marker["recipe"]["steps"] == 6
    assert [p.name for p in tmp_path.iterdir()] == [out.name], "temporary build folder left behind"
    assert is_complete(out, seed=3, recipe=small) and not is_complete(out, seed=3)
    model = Blip2ForConditionalGeneration.from_pretrained(out)
    assert model.config.num_query_tokens == small.num_query_tokens
    AutoProcessor.from_pretrained(out)


@pytest.fixture(scope="module")
def loaded(model_dir: Path) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir)
    processor = AutoProcessor.from_pretrained(model_dir)
    return model.eval(), processor


def _scans(seed: int, n: int, size: int = 128) -> tuple[list, torch.Tensor, torch.Tensor]:
    """`n` demo-style scans with random side and noise: images, side labels, noise labels."""
    rng = np.random.default_rng(seed)
    side = rng.integers(0, 2, n)
    noisy = rng.integers(0, 2, n)
    categories = ("Abdomen", "Femur", "Thorax", "Cervix")
    images = [
        render_scan(rng, side=SIDES[s], noisy=bool(z), size=size, category=categories[i % 4])
        for i, (s, z) in enumerate(zip(side, noisy, strict=True))
    ]
    return images, torch.as_tensor(side), torch.as_tensor(noisy)


def test_folder_and_marker(model_dir: Path) -> None:
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (model_dir / name).is_file(), name
    marker = json.loads((model_dir / MARKER_NAME).read_text())
    assert marker["recipe_version"] == RECIPE_VERSION and marker["seed"] == 0
    assert marker["pretraining"]["last_loss"] < marker["pretraining"]["first_loss"]
    assert not list(model_dir.parent.glob(".*tmp*")), "temporary build folder left behind"


def test_config_and_processor_agree(
    loaded: tuple[Blip2ForConditionalGeneration, Blip2Processor],
) -> None:
    model, processor = loaded
    config, tok = model.config, processor.tokenizer
    assert type(processor).__name__ == "Blip2Processor"
    assert processor.num_query_tokens == config.num_query_tokens
    assert config.image_token_id == tok.convert_tokens_to_ids("<image>") != tok.unk_token_id
    assert config.text_config.vocab_size == len(tok)
    assert (tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"])) == [0, 1, 2, 3]
    assert tok.pad_token_id == config.text_config.pad_token_id == PAD_ID
    assert tok.eos_token_id == config.text_config.eos_token_id == BOS_EOS_ID
    assert model.generation_config.eos_token_id == BOS_EOS_ID
    # Dropout would swamp the small image signal (see docs/blip2.md, the tiny model).
    assert config.qformer_config.hidden_dropout_prob == 0.0
    assert config.qformer_config.attention_probs_dropout_prob == 0.0
    assert config.vision_config.attention_dropout == 0.0
    text = config.text_config
    assert text.dropout == text.attention_dropout == text.activation_dropout == 0.0


def test_processor_inserts_image_tokens_before_bos(
    loaded: tuple[Blip2ForConditionalGeneration, Blip2Processor],
) -> None:
    model, processor = loaded
    images, _, _ = _scans(0, 2)
    batch = processor(images=images, text=[PROMPT, PROMPT + " x"], padding=True, return_tensors="pt")
    n = processor.num_query_tokens
    ids = batch.input_ids  # (B, T)
    assert ((ids == model.config.image_token_id).sum(dim=1) == n).all()
    assert (ids[:, :n] == model.config.image_token_id).all()
    assert (ids[:, n] == BOS_EOS_ID).all()
    size = model.config.vision_config.image_size
    assert batch.pixel_values.shape == (2, 3, size, size)
    # The prompt's tokens are an exact prefix of prompt + answer (teacher forcing relies on it).
    tok = processor.tokenizer
    prompt_ids = tok(PROMPT).input_ids
    assert tok(PROMPT + " Fetus lies on the left side").input_ids[: len(prompt_ids)] == prompt_ids


def test_reload_gives_the_same_logits(
    loaded: tuple[Blip2ForConditionalGeneration, Blip2Processor], tmp_path: Path
) -> None:
    model, processor = loaded
    images, _, _ = _scans(1, 3)
    batch = processor(images=images, text=[PROMPT] * 3, return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits  # (B, T, V)
    model.save_pretrained(tmp_path / "again")
    processor.save_pretrained(tmp_path / "again")
    again = Blip2ForConditionalGeneration.from_pretrained(tmp_path / "again").eval()
    batch_again = AutoProcessor.from_pretrained(tmp_path / "again")(
        images=images, text=[PROMPT] * 3, return_tensors="pt"
    )
    assert torch.equal(batch_again.input_ids, batch.input_ids)
    with torch.no_grad():
        after = again(**batch_again).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_generate_runs(loaded: tuple[Blip2ForConditionalGeneration, Blip2Processor]) -> None:
    model, processor = loaded
    processor.tokenizer.padding_side = "left"
    try:
        images, _, _ = _scans(2, 2)
        batch = processor(
            images=images, text=[PROMPT, "Question: hi Answer:"], padding=True, return_tensors="pt"
        )
        out = model.generate(**batch, max_new_tokens=5, do_sample=False)
    finally:
        processor.tokenizer.padding_side = "right"
    assert out.shape[0] == 2 and out.shape[1] <= batch.input_ids.shape[1] + 5


def test_second_call_is_a_cache_hit(model_dir: Path) -> None:
    stamp = (model_dir / "model.safetensors").stat().st_mtime_ns
    start = time.perf_counter()
    assert make_tiny_model(model_dir, seed=0) == model_dir
    assert time.perf_counter() - start < 2.0
    assert (model_dir / "model.safetensors").stat().st_mtime_ns == stamp
    assert is_complete(model_dir, seed=0)
    assert not is_complete(model_dir, seed=1)  # another seed would rebuild


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny-model folder"):
        make_tiny_model(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def _probe_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor
) -> float:
    """Ridge-regression linear probe on standardised features; held-out accuracy."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    a = torch.cat([(train_x - mean) / std, torch.ones(len(train_x), 1)], dim=1)  # (N, F + 1)
    b = torch.cat([(test_x - mean) / std, torch.ones(len(test_x), 1)], dim=1)
    target = 2.0 * train_y.float() - 1.0  # (N,) in {-1, 1}
    w = torch.linalg.solve(a.T @ a + torch.eye(a.shape[1]), a.T @ target)  # (F + 1,)
    return float(((b @ w > 0).long() == test_y).float().mean())


def test_frozen_image_features_carry_side_and_noise(
    loaded: tuple[Blip2ForConditionalGeneration, Blip2Processor],
) -> None:
    model, processor = loaded
    train_images, train_side, train_noise = _scans(100, 300)
    test_images, test_side, test_noise = _scans(200, 200)

    def features(images: list) -> torch.Tensor:
        pixel_values = processor.image_processor(images, return_tensors="pt").pixel_values
        return image_features(model, pixel_values).flatten(1)  # (N, Q * D)

    train_x, test_x = features(train_images), features(test_images)
    side_acc = _probe_accuracy(train_x, train_side, test_x, test_side)
    noise_acc = _probe_accuracy(train_x, train_noise, test_x, test_noise)
    # Measured 1.0 and 1.0 on seeds 0-2 (see fada_batch.tools.tiny's docstring); 0.5 is chance.
    assert side_acc >= 0.9, side_acc
    assert noise_acc >= 0.9, noise_acc


def test_pretraining_taught_captions_of_what_is_drawn(
    loaded: tuple[Blip2ForConditionalGeneration, Blip2Processor],
) -> None:
    """The language model reads both cues, not only the features: a base that learned one cue
    could leave the other in the features yet never use it (seen while tuning the recipe)."""
    model, processor = loaded
    images, side, noisy = _scans(300, 40)
    batch = processor(images=images, text=[""] * len(images), return_tensors="pt")
    out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    captions = processor.tokenizer.batch_decode(out[:, batch.input_ids.shape[1] :], skip_special_tokens=True)
    side_ok = [("nine o clock" in c) == (s == 0) for c, s in zip(captions, side.tolist(), strict=True)]
    noise_ok = [("grainy" in c) == bool(z) for c, z in zip(captions, noisy.tolist(), strict=True)]
    assert sum(side_ok) >= 0.9 * len(captions), captions
    assert sum(noise_ok) >= 0.9 * len(captions), captions
