"""The training recipe's guard rails: only the language model can train (the image side runs
frozen, under no_grad, once per image), the frozen image side runs without its dropout, the
training forward keeps no key/value cache, and the full job warms its learning rate up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fada_batch.config import ConfigError, config_from_dict, load_job
from fada_batch.training.model import apply_lora, base_of, image_features, lm_logits, load_base_model

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("target_modules", ["q_proj", "v_proj", "query"], "'query'"),  # the Q-Former's attention
        ("target_modules", ["q_proj", "qkv"], "'qkv'"),  # the vision tower's attention
        ("modules_to_save", ["language_projection"], "'language_projection'"),
        ("modules_to_save", ["qformer.layernorm"], "'qformer.layernorm'"),
    ],
)
def test_image_side_modules_are_a_config_error(key, value, named):
    with pytest.raises(ConfigError) as e:
        config_from_dict({"lora": {key: value}})
    text = str(e.value)
    assert f"lora.{key}: {named} would train modules of the image side" in text
    assert "never get a gradient" in text and "q_proj" in text


def test_a_name_that_also_matches_the_image_side_is_refused_when_lora_is_applied(tiny_model_dir):
    """`fc1` is an OPT layer and also the vision tower's MLP: no name list can tell, so the
    trainable parameters themselves are checked once LoRA is on."""
    cfg = config_from_dict({"lora": {"target_modules": ["q_proj", "fc1"]}})  # passes the config check
    loaded = load_base_model(str(tiny_model_dir), device="cpu")
    with pytest.raises(ConfigError) as e:
        apply_lora(
            loaded,
            r=4,
            alpha=8,
            dropout=0.0,
            target_modules=cfg.lora.target_modules,
            modules_to_save=[],
        )
    text = str(e.value)
    assert "lora.target_modules puts trainable weights in" in text
    assert "vision_model.encoder.layers.0.mlp.fc1" in text and "leave them out" in text
    fine = load_base_model(str(tiny_model_dir), device="cpu")
    model = apply_lora(
        fine,
        r=4,
        alpha=8,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["language_model.model.decoder.final_layer_norm"],
    )
    assert all(".language_model." in n for n, p in model.named_parameters() if p.requires_grad)


def test_the_frozen_image_side_runs_without_qformer_dropout(tiny_model_dir):
    """blip2-opt-2.7b's Q-Former has dropout 0.1; features are taken in eval mode even when
    the model is in train mode, so every epoch (and the cache) sees the same features."""
    loaded = load_base_model(str(tiny_model_dir), device="cpu")
    base = base_of(loaded.model)
    for m in base.qformer.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.1  # as in the real checkpoint
    base.train()
    pixels = torch.rand(2, 3, 64, 64)
    torch.manual_seed(0)
    a = image_features(loaded.model, pixels)
    b = image_features(loaded.model, pixels)
    assert torch.equal(a, b)
    assert base.qformer.training  # the caller's mode is given back
    with torch.no_grad():
        noisy = base.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    assert not torch.allclose(noisy, a)  # dropout on would change them


def test_the_training_forward_keeps_no_key_value_cache(tiny_model_dir):
    loaded = load_base_model(str(tiny_model_dir), device="cpu")
    model, lm = loaded.model, base_of(loaded.model).language_model
    seen = []
    handle = lm.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("use_cache")), with_kwargs=True
    )
    n = model.config.num_query_tokens
    ids = torch.tensor([[model.config.image_token_id] * n + [2, 10, 11]])
    logits = lm_logits(
        model, ids, torch.ones_like(ids), torch.zeros(1, n, model.config.text_config.hidden_size)
    )
    handle.remove()
    assert seen == [False] and logits.shape[:2] == ids.shape


def test_the_full_job_warms_the_learning_rate_up():
    from fada_batch.training.step import get_lr

    cfg = load_job(REPO / "job" / "full.yaml")
    assert 0.03 <= cfg.train.warmup_ratio <= 0.05
    total = 3000
    warmup = int(cfg.train.warmup_ratio * total)
    lrs = [get_lr(s, total=total, base_lr=cfg.train.learning_rate, warmup=warmup, schedule=cfg.train.lr_schedule)
           for s in (0, warmup - 1, warmup, total - 1)]  # fmt: skip
    assert lrs[0] < lrs[1] == cfg.train.learning_rate == lrs[2] and lrs[3] < lrs[2] / 100
    assert cfg.train.final_model == "best"
