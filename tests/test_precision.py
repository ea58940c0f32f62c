"""Precision as the user asked for it: 8-bit/4-bit quantise the language model's Linear layers
and nothing else changes dtype; the counted weight bytes are the bytes the model holds; the
training forward runs under bf16 autocast on a bf16 base; the quantization and dtype used in
training travel with the adapter, and evaluation from disk answers as training's own did.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from fada_batch.config import config_from_dict
from fada_batch.training.model import (
    GiB,
    apply_lora_section,
    load_base_model,
    quantization_config,
    weight_bytes,
)

QUANTIZATIONS = ("none", "8bit", "4bit")


def blip2_opt_27b_config():
    """Salesforce/blip2-opt-2.7b's architecture: the published values in `tools.bench.model`."""
    from fada_batch.tools.bench.model import BLIP2_OPT_27B, blip2_config

    return blip2_config(BLIP2_OPT_27B)


def as_loaded_on_meta(config, quantization: str, dtype: torch.dtype):
    """The model as `load_base_model` holds it, on the meta device: built from `config`, its
    Linear layers swapped by transformers' own bitsandbytes quantizer (as `from_pretrained`
    does), then each parameter given the dtype and shape loading gives it (int8; nf4 packed two
    to a byte; everything else `dtype`). `test_meta_replica_matches_a_real_load` checks this
    against real loads of the tiny model."""
    import bitsandbytes as bnb
    from transformers import Blip2ForConditionalGeneration
    from transformers.quantizers import AutoHfQuantizer

    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    if quantization != "none":
        quantizer = AutoHfQuantizer.from_config(quantization_config(quantization, dtype), pre_quantized=False)
        quantizer.preprocess_model(model, dtype=dtype, device_map={"": "cpu"}, keep_in_fp32_modules=[])
    done: dict[int, torch.nn.Parameter] = {}  # tied weights (OPT's head and embeddings) stay one
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if id(p) not in done:
                if isinstance(p, bnb.nn.Int8Params):
                    t = torch.empty(p.shape, dtype=torch.int8, device="meta")
                elif isinstance(p, bnb.nn.Params4bit):
                    t = torch.empty(((p.numel() + 1) // 2, 1), dtype=torch.uint8, device="meta")
                else:
                    t = torch.empty(p.shape, dtype=dtype, device="meta")
                done[id(p)] = torch.nn.Parameter(t, requires_grad=False)
            module._parameters[name] = done[id(p)]
    return model


def parameter_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def quant_state_bytes(model) -> int:
    """Bytes bitsandbytes keeps beside the weights: int8 row scales, nf4 block absmax."""
    total = 0
    for p in model.parameters():
        if getattr(p, "SCB", None) is not None:
            total += p.SCB.numel() * p.SCB.element_size()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            total += qs.absmax.numel() * qs.absmax.element_size()
            if qs.nested:
                total += qs.state2.absmax.numel() * qs.state2.absmax.element_size()
    return total


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_weight_bytes_of_the_full_architecture_are_what_it_holds(quantization):
    """blip2-opt-2.7b built on the meta device as loaded: `weight_bytes` (which
    `pick_quantization` uses) equals the parameters' bytes plus bitsandbytes' scales, and no
    weight outside the quantised layers is fp32 (peft's prepare_model_for_kbit_training made
    all of them fp32: 6.92 GiB in 8-bit, where 4.63 GiB is right)."""
    config = blip2_opt_27b_config()
    counted = weight_bytes(config, torch.bfloat16)[quantization]
    model = as_loaded_on_meta(config, quantization, torch.bfloat16)
    held = parameter_bytes(model)
    dtypes = {p.dtype for p in model.parameters()}
    print(f"blip2-opt-2.7b {quantization}: parameters {held / GiB:.3f} GiB, counted {counted / GiB:.3f} GiB")
    assert torch.float32 not in dtypes
    if quantization == "none":
        assert counted == held and sum(p.numel() for p in model.parameters()) == 3_744_679_936
    else:
        scales = counted - held  # int8: one fp32 scale per row; nf4: ~1/64 byte per weight
        assert 0 < scales < {"8bit": 0.001, "4bit": 0.012}[quantization] * held
    expected_gib = {"none": 6.975, "8bit": 4.634, "4bit": 3.497}[quantization]
    assert counted / GiB == pytest.approx(expected_gib, abs=0.001)


@pytest.mark.parametrize("quantization", QUANTIZATIONS)
def test_meta_replica_matches_a_real_load_and_nothing_is_upcast(tiny_model_dir, quantization):
    """A real bf16 load of the tiny model, prepared for training as training prepares it
    (LoRA): every parameter has the dtype and shape the meta replica gives it, the frozen
    ones stay bf16 (LoRA's own are fp32), and `weight_bytes` counts the bytes held."""
    from transformers import Blip2Config

    cfg = config_from_dict({"lora": {"target_modules": ["q_proj", "v_proj"]}})
    loaded = load_base_model(str(tiny_model_dir), device="cpu", dtype="bfloat16", quantization=quantization)
    real = {n: (p.dtype, tuple(p.shape)) for n, p in loaded.model.named_parameters()}
    config = Blip2Config.from_pretrained(tiny_model_dir)
    replica = as_loaded_on_meta(config, quantization, torch.bfloat16)
    assert {n: (p.dtype, tuple(p.shape)) for n, p in replica.named_parameters()} == real
    counted = weight_bytes(config, torch.bfloat16)[quantization]
    held = parameter_bytes(loaded.model) + quant_state_bytes(loaded.model)
    assert counted == pytest.approx(held, rel=0.01)

    model = apply_lora_section(loaded, cfg.lora)
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_training_forward_runs_under_bf16_autocast_on_a_bf16_base(job_factory):
    """bf16 base (quantised or not): the language model runs under bf16 autocast, without a
    key/value cache; an fp32 base runs as it is."""
    from fada_batch.data.categories import get_category
    from fada_batch.data.samples import prepare_data
    from fada_batch.training.collate import Encoder
    from fada_batch.training.features import FeatureSource
    from fada_batch.training.model import base_of, eos_token_id
    from fada_batch.training.step import batch_loss_sum

    cfg = job_factory({"data.num_images": 6})
    out = Path(cfg.output.root) / "blip2_femur"
    out.mkdir(parents=True)
    cs = prepare_data(cfg, get_category("Femur"), out, resuming=False)
    seen = []
    for dtype, quantization in (("bfloat16", "8bit"), ("bfloat16", "none"), ("float32", "none")):
        loaded = load_base_model(cfg.model.name_or_path, device="cpu", dtype=dtype, quantization=quantization)
        model = apply_lora_section(loaded, cfg.lora)
        lm = base_of(model).language_model

        def hook(_module, _args, kwargs, dtype=dtype):
            seen.append((dtype, torch.is_autocast_enabled("cpu"), kwargs.get("use_cache")))

        handle = lm.register_forward_pre_hook(hook, with_kwargs=True)
        bc = base_of(model).config
        enc = Encoder(
            loaded.processor,
            num_query_tokens=bc.num_query_tokens,
            image_token_id=bc.image_token_id,
            eos_token_id=eos_token_id(model, loaded.processor),
        )
        samples = cs.train[:4]
        fs = FeatureSource(loaded, cs.image_paths, cache=True, max_pixels=cfg.data.max_image_pixels)
        loss, n = batch_loss_sum(model, fs, samples, [enc.encode(s) for s in samples], enc, loaded.device)
        (loss / n).backward()
        handle.remove()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert seen == [("bfloat16", True, False), ("bfloat16", True, False), ("float32", False, False)]


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "eval" / "predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_quantized_training_travels_with_the_adapter_and_evaluation_from_disk_equals_it(job_factory):
    """8-bit on a bf16 base (the GPU's path, here on the CPU): the adapter records how the base
    was loaded; `evaluate` loads it the same way even where the config now says otherwise, and
    answers exactly as the evaluation right after training did."""
    from fada_batch.evaluation.ask import Asker
    from fada_batch.evaluation.evaluate import evaluate_category

    overrides = {
        "data.num_images": 24,
        "train.num_epochs": 2,
        "model.quantization": "8bit",
        "model.dtype": "bfloat16",
        "eval.after_training": True,
    }
    cfg = job_factory(overrides)
    from fada_batch.run.task import run_category

    summary = run_category(cfg, "Femur")
    out = Path(cfg.output.root) / "blip2_femur"
    marker = json.loads((out / "final_model" / "fada_batch.json").read_text())
    assert (marker["quantization"], marker["dtype"]) == ("8bit", "bfloat16")
    assert (summary["quantization"], summary["dtype"]) == ("8bit", "bfloat16")
    after_training = (json.loads((out / "eval" / "metrics.json").read_text()), _rows(out))
    assert after_training[0]["n_pairs"] > 0

    now_unquantised = config_from_dict(
        {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "quantization": "none", "dtype": "float32"}}
    )
    from_disk = evaluate_category(now_unquantised, "Femur")
    for key in ("adapter", "base", "majority", "no_eos", "settings"):
        assert from_disk[key] == after_training[0][key], key
    assert _rows(out) == after_training[1]

    asker = Asker(out / "final_model", device="cpu")
    assert (asker.loaded.quantization, asker.loaded.dtype) == ("8bit", torch.bfloat16)
