"""The collector beside a real training process that holds a category.

Femur trains in its own process (`fada-batch train`) while Abdomen and Thorax are done and
Cervix awaits labels. The process is first frozen (SIGSTOP, `fada_batch.killpoints`) at the
worst instant for a reader: checkpoint-2's files all written in a temporary folder, not yet
renamed into place. Then it runs on while the collector reads the run again and again until
it ends: Femur is always shown running (or, at the end, completed), the others as they are,
and nothing half-written is ever read (no problem reported, progress never goes back).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from fada_batch import killpoints
from fada_batch.cli import main as cli_main
from fada_batch.config import dump_yaml
from fada_batch.run.collect import collect
from fada_batch.training.recipe import train_category

RUN = {"data.num_images": 20, "train.num_epochs": 3, "train.checkpoint_every_steps": 1, "train.batch_size": 8}


def _states(result) -> dict[str, str]:
    return {c.category: c.state for c in result.categories}


def test_collector_beside_a_training_process(job_factory, tmp_path, capsys, wait_stopped):
    cfg = job_factory({**RUN, "eval.after_training": False})
    root = Path(cfg.output.root)
    for done in ("Abdomen", "Thorax"):
        train_category(job_factory({"data.num_images": 12, "train.num_epochs": 1}, out=root), done)
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    femur = root / "blip2_femur"
    env = {**os.environ, killpoints.STOP_ENV: "checkpoint.files@2"}
    cmd = [sys.executable, "-m", "fada_batch", "train", "--job", str(job), "--category", "Femur"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_stopped(proc)
        half = [p.name for p in femur.iterdir() if p.name.startswith("checkpoint-2.tmp-")]
        assert half, sorted(p.name for p in femur.iterdir())  # the half-written checkpoint is there
        frozen = collect(root, categories=list(cfg.data.categories), data_root=Path(cfg.data.root))
        assert _states(frozen) == {
            "Abdomen": "completed",
            "Femur": "running",
            "Thorax": "completed",
            "Cervix": "awaiting_labels",
        }
        row = next(c for c in frozen.categories if c.category == "Femur")
        assert row.last_step == 1 and Path(row.last_checkpoint).name == "checkpoint-1", row
        assert frozen.problems == [] and frozen.exit_code() == 0
        capsys.readouterr()
        assert cli_main(["collect", "--job", str(job)]) == 0  # the command, with its report files
        assert "running" in (root / "report.md").read_text()

        os.kill(proc.pid, signal.SIGCONT)
        seen, last_step = [], 0
        while proc.poll() is None:
            result = collect(root, categories=list(cfg.data.categories), data_root=Path(cfg.data.root))
            states = _states(result)
            assert result.problems == [], result.problems
            assert states["Femur"] in ("running", "completed"), states
            assert (
                states["Abdomen"] == states["Thorax"] == "completed" and states["Cervix"] == "awaiting_labels"
            )
            step = next(c for c in result.categories if c.category == "Femur").last_step or 0
            assert step >= last_step, (step, last_step)  # never an older or half-read state
            last_step = step
            seen.append(states["Femur"])
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
            proc.wait()
    print(f"\n{len(seen)} collections while Femur trained: {seen.count('running')} saw it running")
    assert seen.count("running") >= 5, seen  # it really read the run while it trained
    final = collect(root, categories=list(cfg.data.categories), data_root=Path(cfg.data.root))
    assert _states(final)["Femur"] == "completed" and final.exit_code() == 0
    summary = json.loads((femur / "training_summary.json").read_text())
    assert last_step <= summary["steps"]
