"""Runs that do what the user meant: a category is skipped or resumed only under the same
training config (its fingerprint), and a wrong data root neither passes nor overwrites.

The CLI tests run `fada-batch train` as a user would: a validation-sized run, then a full-sized
run into the same output root (as job/validation.yaml and job/full.yaml once shared one).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fada_batch.cli import main
from fada_batch.config import (
    FingerprintMismatch,
    config_from_dict,
    dump_yaml,
    fingerprint_diff,
    load_job,
    training_fingerprint,
)
from fada_batch.training.checkpoint import list_checkpoints
from fada_batch.training.recipe import StopRequested, train_category

REPO = Path(__file__).resolve().parent.parent
VALIDATION = {"data.num_images": 6, "train.num_epochs": 1, "train.learning_rate": 1e-2}
FULL = {"data.num_images": 12, "train.num_epochs": 2, "train.learning_rate": 3e-3}


def _job(tmp_path: Path, cfg, name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_yaml(cfg))
    return path


def _summary(cfg, category: str = "femur") -> dict:
    return json.loads((Path(cfg.output.root) / f"blip2_{category}" / "training_summary.json").read_text())


def test_fingerprint_covers_what_changes_the_adapter_only():
    base = load_job(REPO / "job" / "full.yaml")
    fp = training_fingerprint(base)
    for key in ("train.learning_rate", "train.num_epochs", "data.num_images", "lora.r", "model.quantization"):
        assert key in fp, key
    for key in (
        "output.root",
        "data.root",
        "cluster.partition",
        "train.log_every_s",
        "train.tensorboard",
        "eval.batch_size",
        "name",
    ):
        assert key not in fp, key
    moved = config_from_dict(
        {
            **base.to_dict(),
            "name": "elsewhere",
            "output": {"root": "/other"},
            "eval": {"batch_size": 4, "after_training": False},
            "train": {
                **base.to_dict()["train"],
                "log_every_s": 1.0,
                "checkpoint_every_steps": 7,
                "tensorboard": False,
            },
        }
    )
    assert training_fingerprint(moved) == fp
    other = config_from_dict({**base.to_dict(), "train": {**base.to_dict()["train"], "num_epochs": 5}})
    assert fingerprint_diff(fp, training_fingerprint(other)) == ["train.num_epochs: 3 -> 5"]
    # smaller micro-batches, more accumulation: the same steps, the same adapter
    split = {**base.to_dict()["train"], "batch_size": 4, "grad_accum_steps": 4}
    assert training_fingerprint(config_from_dict({**base.to_dict(), "train": split})) == fp
    doubled = {**base.to_dict()["train"], "grad_accum_steps": 2}
    assert fingerprint_diff(
        fp, training_fingerprint(config_from_dict({**base.to_dict(), "train": doubled}))
    ) == ["train.effective_batch_size: 16 -> 32"]


def test_validation_and_full_jobs_write_to_different_roots():
    validation, full = (load_job(REPO / "job" / f"{n}.yaml") for n in ("validation", "full"))
    assert validation.output.root != full.output.root
    assert not Path(full.output.root, "blip2_femur").is_relative_to(Path(validation.output.root))


def test_validation_then_full_run_refuses_then_force_trains_then_skips(job_factory, tmp_path, capsys, caplog):
    """CLI: the full-sized run into the validation run's root names the keys that differ and
    the two ways on, changes nothing, exits non-zero; --force retrains; a rerun skips."""
    out = tmp_path / "shared outputs"
    small = job_factory(VALIDATION, out=out)
    big = job_factory(FULL, out=out)
    assert main(["train", "--job", str(_job(tmp_path, small, "validation")), "--category", "Femur"]) == 0
    first = _summary(small)
    adapter = Path(first["adapter_path"]) / "adapter_model.safetensors"
    before = (adapter.read_bytes(), (out / "blip2_femur" / "training_summary.json").read_text())
    capsys.readouterr()

    full_job = _job(tmp_path, big, "full")
    assert main(["train", "--job", str(full_job), "--category", "Femur"]) == 2
    err = capsys.readouterr().err
    assert "holds a completed adapter trained under another training config" in err
    for line in (
        "data.num_images: 6 -> 12",
        "train.num_epochs: 1 -> 2",
        "train.learning_rate: 0.01 -> 0.003",
    ):
        assert line in err, err
    assert "--force" in err and "-p output.root=" in err
    assert (adapter.read_bytes(), (out / "blip2_femur" / "training_summary.json").read_text()) == before

    assert main(["train", "--job", str(full_job), "--category", "Femur", "--force"]) == 0
    forced = _summary(big)
    assert forced["status"] == "completed" and forced["fingerprint"] == training_fingerprint(big)
    assert sum(forced["images"].values()) == 12 and forced["epochs"] == 2
    caplog.set_level("INFO", logger="fada_batch")
    assert main(["train", "--job", str(full_job), "--category", "Femur", "-p", "train.log_every_s=5"]) == 0
    assert "already completed under the same training config" in caplog.text
    assert _summary(big)["end_time"] == forced["end_time"]


def test_checkpoint_of_another_config_is_refused_not_resumed(job_factory, tmp_path):
    out = tmp_path / "out"
    small = job_factory({**VALIDATION, "train.batch_size": 4}, out=out)
    with pytest.raises(StopRequested):
        train_category(small, "Femur", should_stop=lambda: True)  # stops after its first step
    folder = out / "blip2_femur"
    ckpts = list_checkpoints(folder)
    assert ckpts and _summary(small)["status"] == "interrupted"
    big = job_factory(FULL, out=out)
    with pytest.raises(FingerprintMismatch, match=r"checkpoints of an unfinished run") as e:
        train_category(big, "Femur")
    assert "data.num_images: 6 -> 12" in str(e.value) and "--force" in str(e.value)
    assert list_checkpoints(folder) == ckpts and _summary(small)["status"] == "interrupted"
    # submit refuses up front, for every such category at once, and submits nothing
    from fada_batch.run.launch import submit

    with pytest.raises(FingerprintMismatch, match="Femur"):
        submit(big, categories=["Femur", "Thorax"], executor="debug", dry_run=True)
    assert not (out / "submission.json").exists()
    resumed = train_category(small, "Femur")  # the same config resumes
    assert resumed["status"] == "completed" and resumed["resumes"] == 1


def test_wrong_data_root_fails_like_validate_and_keeps_the_completed_summary(job_factory, tmp_path, capsys):
    """CLI: `-p data.root=/no/such/folder` exits 1 with validate's message and writes nothing;
    a root without this category's sheet does not turn a completed category into awaiting."""
    cfg = job_factory({"data.num_images": 6, "train.num_epochs": 1})
    job = _job(tmp_path, cfg, "job")
    assert main(["train", "--job", str(job), "--category", "Femur"]) == 0
    summary_path = Path(cfg.output.root) / "blip2_femur" / "training_summary.json"
    before = summary_path.read_text()
    capsys.readouterr()

    missing = tmp_path / "no such folder"
    assert main(["validate", "--job", str(job), "--categories", "Femur", "-p", f"data.root={missing}"]) == 1
    validate_out = capsys.readouterr().out
    assert main(["train", "--job", str(job), "--category", "Femur", "-p", f"data.root={missing}"]) == 1
    err = capsys.readouterr().err
    # the same "no data found" message as validate's, naming the folder and the fix
    message = f"no data found: the data root {missing} does not exist here"
    assert message in err and message in validate_out
    assert "Fix: set data.root" in err
    assert summary_path.read_text() == before
    assert not (Path(cfg.output.root) / "blip2_thorax").exists()
    assert main(["train", "--job", str(job), "--category", "Thorax", "-p", f"data.root={missing}"]) == 1
    assert not (Path(cfg.output.root) / "blip2_thorax").exists()  # nothing written for it either

    empty = tmp_path / "empty data"
    (empty / "Fetal Ultrasound Labeled").mkdir(parents=True)
    assert main(["train", "--job", str(job), "--category", "Femur", "-p", f"data.root={empty}"]) == 1
    assert "holds a completed adapter" in capsys.readouterr().err
    assert summary_path.read_text() == before


def test_force_on_unusable_data_keeps_the_completed_adapter(job_factory, tmp_path, demo_root):
    import shutil

    data = tmp_path / "data copy"
    shutil.copytree(demo_root, data)
    cfg = job_factory({"data.num_images": 6, "train.num_epochs": 1}, data_root=data)
    done = train_category(cfg, "Femur")
    folder = Path(cfg.output.root) / "blip2_femur"
    shutil.rmtree(data / "Fetal Ultrasound" / "Femur")  # the images are gone: invalid data
    from fada_batch.data.samples import DataError

    with pytest.raises(DataError):
        train_category(cfg, "Femur", force=True)
    assert _summary(cfg)["end_time"] == done["end_time"] and _summary(cfg)["status"] == "completed"
    assert (folder / "final_model" / "adapter_model.safetensors").is_file()


def test_submit_shows_and_runs_only_what_would_actually_run(job_factory, tmp_path):
    """A category completed under the same training config is shown as skipped, not as a task,
    by --dry-run, and is not run by the submission itself; one with a checkpoint is shown
    resuming from it. --force puts the completed one back."""
    import io

    from fada_batch.run.launch import submit

    cfg = job_factory({**VALIDATION, "train.checkpoint_every_steps": 1}, out=tmp_path / "out")
    done = train_category(cfg, "Femur")
    with pytest.raises(StopRequested):
        train_category(cfg, "Thorax", should_stop=lambda: True)  # a checkpoint after one step
    latest = list_checkpoints(Path(cfg.output.root) / "blip2_thorax")[-1][1].name
    categories = ["Abdomen", "Femur", "Thorax"]

    buf = io.StringIO()
    record = submit(cfg, categories=categories, executor="slurm", dry_run=True, out=buf)
    assert record == {"dry_run": True, "plan": ["Abdomen", "Thorax"], "completed": ["Femur"]}
    text = buf.getvalue()
    assert "completed under this training config (skipped; --force trains again): Femur" in text
    assert (
        f"2 tasks to run, in this order: Abdomen (6 images), Thorax (6 images, resumes from {latest})" in text
    )

    buf = io.StringIO()
    forced = submit(cfg, categories=categories, executor="slurm", dry_run=True, force=True, out=buf)
    assert forced["plan"] == ["Abdomen", "Femur", "Thorax"] and forced["completed"] == []
    assert "completed under" not in buf.getvalue()

    buf = io.StringIO()
    ran = submit(cfg, categories=categories, executor="debug", out=buf)
    assert ran["results"] == {"Abdomen": "completed", "Thorax": "completed"}  # Femur did not run
    assert ran["completed_earlier"] == ["Femur"] and _summary(cfg)["end_time"] == done["end_time"]

    buf = io.StringIO()
    again = submit(cfg, categories=categories, executor="slurm", dry_run=True, out=buf)
    assert again["plan"] == [] and "no task to run: every ready category has completed" in buf.getvalue()
