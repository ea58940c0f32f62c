"""TensorBoard event files written during training, read back with TensorBoard's own reader.

The writer (`training.tblog`) encodes the records by hand; these tests read them with the
`tensorboard` package (a test-only dependency): tags and steps of a real run on the tiny
model, no duplicate step after a crash and a resume, a torn record left by a kill, the job key
that turns it off, and evaluation scores replaced (not repeated) when evaluation runs again.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("tensorboard", reason="pip install tensorboard (a dev dependency in requirements.lock)")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

from fada_batch.run.task import run_category
from fada_batch.training import tblog
from fada_batch.training.tblog import TENSORBOARD_DIR, EventLog

SMALL = {
    "data.num_images": 16,
    "train.num_epochs": 3,
    "train.batch_size": 8,
    "train.checkpoint_every_steps": 2,
    "eval.after_training": True,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _all_events(folder: Path) -> list[tuple[str, int, float]]:
    """(tag, step, value) of every scalar in every event file, as TensorBoard's loader reads them."""
    out = []
    for path in sorted(folder.iterdir()):
        for event in LegacyEventFileLoader(str(path)).Load():  # the events as written
            for v in event.summary.value:
                out.append((v.tag, event.step, v.simple_value))
    return out


def _scalars(folder: Path) -> EventAccumulator:
    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def test_training_writes_curves_readable_by_tensorboard(job_factory):
    cfg = job_factory(SMALL)
    summary = run_category(cfg, "Femur")
    folder = Path(summary["output_dir"]) / TENSORBOARD_DIR
    acc = _scalars(folder)
    tags = set(acc.Tags()["scalars"])
    for tag in ("train/loss", "train/learning_rate", "train/samples_per_s", "train/epoch", "val/loss"):
        assert tag in tags, (tag, sorted(tags))
    steps = summary["steps"]
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, steps + 1))
    # the same numbers as the summary's curve (float32 in the file)
    for e, (step, value) in zip(loss, summary["loss_curve"], strict=True):
        assert e.step == step and math.isclose(e.value, value, rel_tol=1e-5, abs_tol=1e-6)
    assert [[e.step, round(e.value, 5)] for e in acc.Scalars("val/loss")] == [
        [s, round(v, 5)] for s, v in summary["val_loss_steps"]
    ]
    lrs = [e.value for e in acc.Scalars("train/learning_rate")]
    assert max(lrs) <= cfg.train.learning_rate * (1 + 1e-6) and lrs[-1] < lrs[len(lrs) // 2]  # cosine
    assert all(e.value > 0 for e in acc.Scalars("train/samples_per_s"))
    # evaluation scores per question, adapter against the baselines, at the step that shipped
    shipped = summary["shipped"]["step"]
    per_q = summary["eval"]["per_question"]
    for q, models in per_q.items():
        for model in ("adapter", "base", "majority"):
            tag = f"eval/{model}/{q}/exact_match"
            got = acc.Scalars(tag)
            assert [e.step for e in got] == [shipped], tag
            assert math.isclose(got[0].value, models[model]["exact_match"], abs_tol=1e-6)
    assert "eval/adapter/overall/token_f1" in tags


def test_resume_after_a_crash_continues_the_curves_without_duplicates(job_factory, tmp_path):
    """A crash after step 5 (checkpoint at 4): the next attempt resumes from step 4, and the
    events of step 5 the first attempt wrote are not there twice; the curve equals an
    uninterrupted run's."""
    cfg = job_factory({**SMALL, "eval.after_training": False})
    calls = Counter()

    def crash_after_five() -> bool:
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated crash after step 5")
        return False

    from fada_batch.training.recipe import train_category

    with pytest.raises(RuntimeError, match="simulated crash"):
        train_category(cfg, "Femur", should_stop=crash_after_five)
    folder = Path(cfg.output.root) / "blip2_femur" / TENSORBOARD_DIR
    first = _all_events(folder)
    assert max(step for tag, step, _ in first if tag == "train/loss") == 5
    summary = train_category(cfg, "Femur")
    assert summary["resumes"] == 1
    events = _all_events(folder)
    counts = Counter((tag, step) for tag, step, _ in events)
    assert [k for k, n in counts.items() if n > 1] == []
    steps = sorted(step for tag, step, _ in events if tag == "train/loss")
    assert steps == list(range(1, summary["steps"] + 1))
    assert len(list(folder.iterdir())) == 2  # one file per attempt
    # the same curve as an uninterrupted run (same data order, restored RNG and optimizer)
    other = run_category(
        job_factory({**SMALL, "eval.after_training": False}, out=tmp_path / "again"), "Femur"
    )
    want = _scalars(Path(other["output_dir"]) / TENSORBOARD_DIR).Scalars("train/loss")
    got = _scalars(folder).Scalars("train/loss")
    assert [(e.step, e.value) for e in got] == [(e.step, e.value) for e in want]


def test_torn_record_and_events_past_the_resume_step_are_dropped(tmp_path):
    folder = tmp_path / "tb"
    first = EventLog.open(folder)
    for step in range(1, 7):
        first.scalars({"train/loss": 1.0 / step, "val/loss": None}, step)
    first.close()
    with first.path.open("ab") as f:  # a kill in the middle of a record
        f.write(tblog.frame(tblog.encode_event(7, 0.0, {"train/loss": 0.1}))[:-9])
    second = EventLog.open(folder, resume_step=4)
    second.scalars({"train/loss": 0.5}, 5)
    second.close()
    events = _all_events(folder)
    assert [(t, s) for t, s, _ in events] == [("train/loss", s) for s in (1, 2, 3, 4, 5)]
    assert events[-1][2] == 0.5
    acc = _scalars(folder)
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    # a fresh start (no checkpoint) drops every step; a file left with nothing is removed
    EventLog.open(folder, resume_step=0).close()
    assert _all_events(folder) == []
    assert len(tblog.event_files(folder)) == 1


def test_evaluation_scores_are_replaced_not_repeated(tmp_path):
    folder = tmp_path / "tb"
    log = EventLog.open(folder)
    log.scalars({"train/loss": 1.0}, 1)
    log.close()
    tblog.append_scalars(folder, {"eval/adapter/Q1/exact_match": 0.25}, 1, replace="eval/")
    tblog.append_scalars(folder, {"eval/adapter/Q1/exact_match": 0.75}, 1, replace="eval/")
    assert sorted(_all_events(folder)) == [("eval/adapter/Q1/exact_match", 1, 0.75), ("train/loss", 1, 1.0)]


def test_crc32c_known_answer():
    assert tblog.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value (RFC 3720)


def test_job_key_turns_it_off(job_factory):
    cfg = job_factory(
        {**SMALL, "train.num_epochs": 1, "train.tensorboard": False, "eval.after_training": False}
    )
    summary = run_category(cfg, "Femur")
    assert summary["status"] == "completed"
    assert not (Path(summary["output_dir"]) / TENSORBOARD_DIR).exists()
