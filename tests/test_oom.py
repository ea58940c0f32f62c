"""Out-of-memory back-off where a real CUDA OOM strikes: in `backward()`, in the middle of a
step's accumulation (earlier micro-batches' gradients, and part of this one's, already in),
across a resume, and while generating answers in evaluation.

A CPU has no CUDA memory to run out of, so the error is raised where the GPU would raise it:
from inside the autograd engine (a gradient hook on the deepest LoRA weight, which backward
reaches last) and from the generate call. Everything around it is the production path.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fada_batch.evaluation.evaluate as ev
import fada_batch.training.step as step_mod
from fada_batch.data.samples import prepare_data
from fada_batch.training.recipe import StopRequested, train_category

# two epochs of 4 steps, each step 2 micro-batches of 8 rows: an OOM fits mid-step
OVERRIDES = {
    "train.num_epochs": 2,
    "data.num_images": 12,
    "train.batch_size": 8,
    "train.grad_accum_steps": 2,
    "train.checkpoint_every_steps": 0,
    "eval.after_training": False,
}


class _OomInBackward:
    """Wraps `step.batch_loss_sum`: the backward of any micro-batch over 4 rows that starts
    while gradients of the step's earlier micro-batches are in raises CUDA out of memory
    from inside the autograd engine, after this micro-batch's gradients reached the layers
    nearest the loss (its partial gradients are in too)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.ooms = 0
        self.partial = []  # per OOM: did this micro-batch's own gradients already land?
        self.micro_sizes = []
        self.real = step_mod.batch_loss_sum
        monkeypatch.setattr(step_mod, "batch_loss_sum", self)

    def __call__(self, model, features, samples, *args, **kwargs):
        s, n = self.real(model, features, samples, *args, **kwargs)
        named = dict(model.named_parameters())
        if model.training:
            self.micro_sizes.append(len(samples))
        earlier = [p.grad is not None for p in named.values() if p.requires_grad]
        if model.training and len(samples) > 4 and any(earlier):
            # backward reaches the final LayerNorm (modules_to_save) first, layer 0's LoRA last
            near = next(p for k, p in named.items() if "final_layer_norm" in k and p.requires_grad)
            deep = next(p for k, p in named.items() if "lora_A" in k)
            near_before = near.grad.clone()
            handle = []

            def out_of_memory(_grad: torch.Tensor) -> None:
                handle.pop().remove()
                self.ooms += 1
                self.partial.append(not torch.equal(near.grad, near_before))
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")

            handle.append(deep.register_hook(out_of_memory))
        return s, n


def _adapter(summary: dict) -> dict[str, torch.Tensor]:
    return load_file(str(Path(summary["adapter_path"]) / "adapter_model.safetensors"))


def _assert_same_training(got: dict, ref: dict) -> None:
    """Same steps and the same adapter up to summation order: micro-batches of 4 instead of
    8 add the same per-row gradients in another order (float32: ~1e-7 relative)."""
    assert got["steps"] == ref["steps"] and got["samples_seen"] == ref["samples_seen"]
    assert [s for s, _ in got["loss_curve"]] == [s for s, _ in ref["loss_curve"]]
    a, b = _adapter(ref), _adapter(got)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), (k, (a[k] - b[k]).abs().max())


def test_oom_in_backward_mid_accumulation_drops_partial_gradients(job_factory, tmp_path, monkeypatch, capsys):
    """The second micro-batch's backward runs out of memory with the first one's gradients
    and part of its own in: they are dropped, the step is redone in micro-batches of 4 with
    the same effective batch, the smaller micro-batch stays for the rest of the run (both
    epochs), and the adapter equals a run that never ran out of memory."""
    ref = train_category(job_factory(OVERRIDES, out=tmp_path / "ref"), "Abdomen")
    oom = _OomInBackward(monkeypatch)
    got = train_category(job_factory(OVERRIDES, out=tmp_path / "oom"), "Abdomen", progress_stream=sys.stderr)
    assert oom.ooms == 1 and oom.partial == [True]
    assert oom.micro_sizes[0] == 8 and max(oom.micro_sizes[2:]) == 4  # 8, 8-or-fewer (OOM), then 4s
    assert got["micro_batch_size"] == 4 and got["effective_batch_size"] == 16
    assert "micro-batch halved to 4, 4 micro-batches per optimizer step" in capsys.readouterr().err
    _assert_same_training(got, ref)


def test_reduced_micro_batch_is_kept_across_a_resume(job_factory, tmp_path, monkeypatch):
    """Backed off to 4 rows, stopped (time limit) at step 3, resumed: the resumed attempt
    starts at 4 rows and never runs out of memory again, keeps the first plan's steps (same
    data order), and ends with the adapter of an uninterrupted run without OOM."""
    ref = train_category(job_factory(OVERRIDES, out=tmp_path / "ref"), "Abdomen")
    oom = _OomInBackward(monkeypatch)
    cfg = job_factory(OVERRIDES, out=tmp_path / "oom")
    polls = []
    with pytest.raises(StopRequested) as stopped:
        train_category(cfg, "Abdomen", should_stop=lambda: polls.append(1) or len(polls) == 3)
    state = json.loads((stopped.value.checkpoint / "trainer_state.json").read_text())
    assert stopped.value.checkpoint.name == "checkpoint-3" and state["micro_batch_size"] == 4
    assert oom.ooms == 1
    oom.micro_sizes.clear()
    got = train_category(cfg, "Abdomen")
    assert oom.ooms == 1, "the resumed attempt started at 8 rows again and ran out of memory"
    assert max(oom.micro_sizes) == 4 and got["micro_batch_size"] == 4 and got["resumes"] == 1
    _assert_same_training(got, ref)


def test_generation_oom_halves_the_batch_and_keeps_every_answer(job_factory, tmp_path, monkeypatch, caplog):
    """Out of memory in generate(): the batch is halved until it fits (16 -> 2 here), every
    prompt is answered once, in input order, as without the OOM; at a batch of 1 it raises."""
    from fada_batch.data.categories import get_category
    from fada_batch.evaluation.evaluate import GenerationSettings, generate_answers, make_encoder
    from fada_batch.training.features import FeatureSource
    from fada_batch.training.model import load_base_model

    cfg = job_factory({"data.num_images": 12})
    out = tmp_path / "femur"
    out.mkdir()
    cs = prepare_data(cfg, get_category("Femur"), out, resuming=False)
    loaded = load_base_model(cfg.model.name_or_path, device="cpu")
    names = cs.split.test[:2]
    fs = FeatureSource(loaded, cs.image_paths, cache=True, max_pixels=cfg.data.max_image_pixels)
    fs.warm(names)
    prompts = [cfg.data.prompt_template.format(question=q) for _n in names for q in cs.questions]
    feats = [fs.cache[n] for n in names for _q in cs.questions]
    encoder = make_encoder(loaded, 2)
    settings = GenerationSettings(batch_size=16, max_new_tokens=6)
    plain = generate_answers(loaded.model, encoder, prompts, feats, eos_token_id=2, settings=settings)

    real, tried = ev._generate_batch, []

    def oom_above_2(model, encoder, batch_prompts, *args, **kwargs):
        tried.append(len(batch_prompts))
        if len(batch_prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, encoder, batch_prompts, *args, **kwargs)

    monkeypatch.setattr(ev, "_generate_batch", oom_above_2)
    with caplog.at_level(logging.WARNING, logger="fada_batch.evaluation.evaluate"):
        backed_off = generate_answers(
            loaded.model, encoder, prompts, feats, eos_token_id=2, settings=settings
        )
    assert backed_off == plain and len(plain) == 16
    assert tried == [16, 8, 4, *[2] * 8]
    assert "batch halved to 8" in caplog.text and "batch halved to 2" in caplog.text

    def never_fits(*_args, **_kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(ev, "_generate_batch", never_fits)
    with pytest.raises(torch.OutOfMemoryError):
        generate_answers(loaded.model, encoder, prompts[:2], feats[:2], eos_token_id=2, settings=settings)
