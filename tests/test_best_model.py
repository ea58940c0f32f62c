"""The adapter that ships: validation loss at epoch ends (or every N steps), the best step kept
and shipped (`train.final_model: best`, as the seed's load_best_model_at_end) or the last one,
early stopping, and a summary and report that say which step shipped and why.

A learning rate of 5e-2 makes the tiny model's validation loss rise after its first step: a
deterministic run whose best step is not its last.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fada_batch.training.checkpoint import BEST_DIR, list_checkpoints
from fada_batch.training.outputs import FINAL_MODEL
from fada_batch.training.recipe import StopRequested, train_category

DIVERGING = {
    "data.num_images": 12,
    "train.num_epochs": 2,
    "train.batch_size": 8,
    "train.learning_rate": 5e-2,
    "train.lr_schedule": "constant",
    "train.warmup_ratio": 0.0,
    "train.eval_every_steps": 1,
    "train.checkpoint_every_steps": 1,
    "eval.after_training": False,
}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """Trainable tensors by a name shared by checkpoints and peft's saved adapter."""
    raw = load_file(str(path / "adapter_model.safetensors"))
    return {k.replace(".default", "").replace(".modules_to_save", ""): v for k, v in raw.items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_best_step_ships_and_the_summary_and_report_say_why(job_factory):
    from fada_batch.run.collect import collect

    cfg = job_factory(DIVERGING)
    summary = train_category(cfg, "Femur")
    out = Path(cfg.output.root) / "blip2_femur"
    history = summary["val_loss_steps"]
    assert [s for s, _ in history] == list(range(1, summary["steps"] + 1))  # every step
    best_step = min(history, key=lambda h: h[1])[0]
    shipped = summary["shipped"]
    assert best_step < summary["steps"]  # this run's loss rises: the best is not the last
    assert (shipped["kind"], shipped["step"], summary["best_step"]) == ("best", best_step, best_step)
    assert f"at step {best_step} of {summary['steps']}" in shipped["reason"]
    final = _weights(out / FINAL_MODEL)
    assert _same(final, _weights(out / BEST_DIR))
    assert not _same(final, _weights(list_checkpoints(out)[-1][1]))  # not the last step's
    marker = json.loads((out / FINAL_MODEL / "fada_batch.json").read_text())
    assert marker["shipped"]["step"] == best_step and marker["shipped"]["kind"] == "best"

    row = next(c for c in collect(Path(cfg.output.root), categories=["Femur"]).categories)
    assert f"ships step {best_step}: lowest validation loss" in row.detail


def test_final_model_last_ships_the_last_step(job_factory):
    cfg = job_factory({**DIVERGING, "train.final_model": "last"})
    summary = train_category(cfg, "Femur")
    out = Path(cfg.output.root) / "blip2_femur"
    assert summary["shipped"]["kind"] == "last" and summary["shipped"]["step"] == summary["steps"]
    assert summary["best_step"] < summary["steps"]  # still reported
    assert _same(_weights(out / FINAL_MODEL), _weights(list_checkpoints(out)[-1][1]))
    assert not (out / BEST_DIR).exists()


def test_validation_at_epoch_ends_by_default(job_factory):
    cfg = job_factory({**DIVERGING, "train.eval_every_steps": 0, "train.num_epochs": 3})
    summary = train_category(cfg, "Femur")
    spe = summary["steps_per_epoch"]
    assert [s for s, _ in summary["val_loss_steps"]] == [spe, 2 * spe, 3 * spe]
    assert [e for e, _ in summary["val_loss"]] == [1, 2, 3]


def test_early_stopping_after_patience_validations_without_improvement(job_factory):
    cfg = job_factory({**DIVERGING, "train.early_stopping_patience": 2})
    summary = train_category(cfg, "Femur")
    history = summary["val_loss_steps"]
    best = summary["best_step"]
    assert summary["early_stopped"] is True and summary["status"] == "completed"
    assert summary["steps"] == best + 2 < summary["total_steps"]  # two worse validations, then stop
    assert all(loss >= history[best - 1][1] for _s, loss in history[best:])
    assert summary["shipped"]["training_ended"].startswith("early stopping: 2 validations")
    assert summary["shipped"]["step"] == best


def test_a_resumed_run_ships_the_same_best_adapter(job_factory, tmp_path):
    """Stopped after the best step was saved, resumed in a fresh call: the shipped adapter is
    the uninterrupted run's (the best step's weights survive in best_checkpoint/)."""
    reference = train_category(job_factory(DIVERGING, out=tmp_path / "reference"), "Femur")
    cfg = job_factory(DIVERGING, out=tmp_path / "stopped")
    polls = iter(range(100))
    with pytest.raises(StopRequested):
        train_category(cfg, "Femur", should_stop=lambda: next(polls) >= reference["best_step"] + 1)
    resumed = train_category(cfg, "Femur")
    assert resumed["resumes"] == 1 and resumed["shipped"] == reference["shipped"]
    a = _weights(Path(reference["adapter_path"]))
    b = _weights(Path(resumed["adapter_path"]))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
