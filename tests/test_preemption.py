"""Preemption, the requeue limit and a requeue that cannot happen, on the REAL local SLURM.

Plain host Python (no image): `fada-batch submit`'s array with submitit, as on a site.

- `scancel --signal=USR2` (a preemption warning) and `scontrol requeue` (SLURM ends the task
  with SIGTERM and requeues it) each save a checkpoint at the next step; the requeued task
  resumes from exactly that checkpoint (then the test cancels it: completing after a requeue
  is shown by tests/test_image_cluster.py).
- After `cluster.max_requeues` requeues the task is not requeued again: the summary says
  `interrupted` / `requeue_limit` with how to go on, and the collector's report names it.
- A requeue that the batch script cannot do (`--no-requeue`) is an error in the task's log
  and its summary (`failed` / `requeue_failed`), not a quiet FAILED.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from clusterjobs import SMALL, read_summary_now, sacct, summary, task_log, wait_done, wait_for

from fada_batch.run.launch import submit

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent

# ~1,700 steps: still training when signalled after its first checkpoint, even on an idle CPU
# (~25 steps/s); once the resume is seen, the test cancels what is left (minutes on a busy one).
PREEMPTIBLE = {
    **SMALL,
    "cluster.time_min": 10,
    "cluster.max_requeues": 3,
    "data.num_images": 24,
    "train.batch_size": 8,
    "train.num_epochs": 100,
    "train.checkpoint_every_steps": 5,
}
# Never done within a 1-minute limit: each run is stopped by the time-limit warning. slurmctld
# looks at time limits every 30 s and warns when at most `signal_delay_s` + 30 s are left: with
# 20 s that is 10-60 s into a run. Earlier (55 s) it came while Python was still starting,
# before any handler, and killed the task; 10 s was once never delivered (the job ran out).
ENDLESS = {
    **SMALL,
    "cluster.time_min": 1,
    "cluster.signal_delay_s": 20,
    "data.num_images": 60,
    "train.batch_size": 8,
    "train.num_epochs": 400,
    "train.checkpoint_every_steps": 0,
}


def saved_and_resumed(log: str) -> tuple[list[int], list[int]]:
    """Steps of the checkpoints saved on a stop request, and of those resumed from."""
    saved = [int(s) for s in re.findall(r"stop requested: saved checkpoint-(\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resuming from checkpoint-(\d+) \(step \d+\)", log)]
    return saved, resumed


def test_preemption_signal_and_scontrol_requeue_resume_from_the_saved_checkpoint(slurm_conf, job_factory):
    cfg = job_factory({**PREEMPTIBLE, "data.categories": ["Abdomen", "Femur"]})
    record = submit(cfg, executor="slurm")
    tasks, root, logs = record["tasks"], Path(cfg.output.root), Path(cfg.output.root) / "logs"

    def checkpointed(category: str) -> bool:
        s = read_summary_now(root, category)
        folder = root / f"blip2_{category.lower()}"
        return bool(s and s.get("status") == "running" and list(folder.glob("checkpoint-*")))

    wait_for("both tasks training, with a checkpoint", lambda: all(map(checkpointed, tasks)), 300)
    subprocess.run(["scancel", "--signal=USR2", tasks["Abdomen"]], check=True, timeout=30)
    subprocess.run(["scontrol", "requeue", tasks["Femur"]], check=True, timeout=30)

    def resumed_both() -> bool:
        return all(saved_and_resumed(task_log(logs, tasks[c]))[1] for c in tasks)

    wait_for("both requeued tasks resuming", resumed_both, 600, every_s=1)
    for category in tasks:  # the rest of the run would take minutes on a busy CPU
        subprocess.run(["scancel", tasks[category]], check=True, timeout=30)
    wait_done(record["array_job_id"], 300, expected=2)

    for category, signal_name in (("Abdomen", "SIGUSR2"), ("Femur", "SIGTERM")):
        log = task_log(logs, tasks[category])
        assert f"caught {signal_name}: checkpointing at the next step" in log
        saved, resumed = saved_and_resumed(log)
        assert resumed and resumed[0] == saved[0], (category, saved, resumed)  # where it stopped
        assert summary(root, category)["requeues"] == 1
        runs = [r["State"] for r in sacct(tasks[category], duplicates=True)]
        assert runs[0] == "REQUEUED" and len(runs) == 2, runs
    abdomen = task_log(logs, tasks["Abdomen"])
    # the task asked, the batch script (on the host) requeued it
    assert "Abdomen: was preempted; requeued by the batch script on the host" in abdomen
    assert f"the task asked for a requeue: scontrol requeue {tasks['Abdomen']}" in abdomen


@pytest.fixture(scope="module")
def stopped_jobs(slurm_conf, tiny_model_dir, demo_root, tmp_path_factory):
    """Two submissions at once (they run side by side): one that reaches the requeue limit,
    one whose requeue the batch script cannot do (`--no-requeue`)."""
    from fada_batch.config import config_from_dict, load_job

    def job(name: str, extra: dict) -> object:
        raw = load_job(REPO / "job" / "demo.yaml").to_dict()
        raw["data"]["root"] = str(demo_root)
        raw["model"]["name_or_path"] = str(tiny_model_dir)
        raw["output"]["root"] = str(tmp_path_factory.mktemp(name) / "out puts")
        raw["train"]["log_every_s"] = 0.0
        for k, v in {**ENDLESS, "data.categories": ["Femur"], **extra}.items():
            section, key = k.split(".", 1)
            raw[section][key] = v
        return config_from_dict(raw)

    limit = job("limit", {"cluster.max_requeues": 1})
    failing = job("noreq", {"cluster.extra_sbatch": {"no-requeue": True}})
    plain = job("plain", {"cluster.max_requeues": 1})
    return {
        "limit": (limit, submit(limit, executor="slurm")),
        "failing": (failing, submit(failing, executor="slurm")),
        "plain": (plain, submit_plain_sbatch(plain)),
    }


def submit_plain_sbatch(cfg) -> str:
    """slurm/train_array.sbatch for the job's one category, with a 1-minute limit."""
    from fada_batch.config import dump_yaml

    top = Path(cfg.output.root).parent
    job_file = top / "job.yaml"
    job_file.write_text(dump_yaml(cfg))
    env = {
        **os.environ,
        "FADA_BATCH": str(Path(sys.executable).parent / "fada-batch"),
        "FADA_REQUEUE_DIR": str(top),
    }
    script = REPO / "slurm" / "train_array.sbatch"
    limits = ["--array=0-0", "--time=1", "--signal=USR1@20", "--cpus-per-task=1", "--mem=2G"]
    cmd = ["sbatch", "--parsable", *limits, f"--output={top}/train-%A_%a.out", str(script), str(job_file)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=top, check=True, timeout=30)
    return out.stdout.strip().split(";")[0]


def test_max_requeues_gives_up_with_a_clear_status(stopped_jobs):
    cfg, record = stopped_jobs["limit"]
    task, root = record["tasks"]["Femur"], Path(cfg.output.root)
    wait_done(record["array_job_id"], 600)
    wait_done(record["collector_job_id"], 300)
    runs = sacct(task, duplicates=True)
    assert [r["State"] for r in runs] == ["REQUEUED", "FAILED"], runs
    s = summary(root, "Femur")
    assert s["status"] == "interrupted" and s["stop_reason"] == "requeue_limit", s
    assert s["requeues"] == 1
    assert "cluster.max_requeues=1" in s["message"]
    assert "fada-batch submit --job JOB --categories Femur" in s["message"]
    assert re.search(rf"from checkpoint-{s['last_step']}\b", s["message"]), s["message"]
    log = task_log(root / "logs", task)
    assert "ERROR" in log and "not requeued" in log
    saved, resumed = saved_and_resumed(log)
    assert len(saved) == 2 and resumed == saved[:1] and saved[1] == s["last_step"], (saved, resumed)
    report = (root / "report.md").read_text()
    assert "Femur" in report and str(s["last_step"]) in report


def test_a_requeue_the_batch_script_cannot_do_is_an_error_in_the_summary(stopped_jobs):
    cfg, record = stopped_jobs["failing"]
    task, root = record["tasks"]["Femur"], Path(cfg.output.root)
    wait_done(record["array_job_id"], 600)
    runs = sacct(task, duplicates=True)
    assert [r["State"] for r in runs] == ["FAILED"], runs
    s = summary(root, "Femur")
    assert s["status"] == "failed" and s["stop_reason"] == "requeue_failed", s
    assert f"scontrol requeue {task}" in s["error"]
    assert "The checkpoint is kept" in s["message"] and "--categories Femur" in s["message"]
    log = task_log(root / "logs", task)
    assert f"[fada-batch] ERROR: scontrol requeue {task} failed" in log
    assert not list((root / "logs" / "requeue").glob("*.json")), "the request is cleared"


def test_plain_sbatch_script_requeues_on_the_host_then_stops_at_the_limit(stopped_jobs):
    """slurm/train_array.sbatch: `fada-batch train` asks, the script requeues with scontrol."""
    cfg, array_id = stopped_jobs["plain"]
    root, task = Path(cfg.output.root), f"{array_id}_0"
    wait_done(task, 600)
    assert [r["State"] for r in sacct(task, duplicates=True)] == ["REQUEUED", "FAILED"]
    s = summary(root, "Femur")
    assert s["status"] == "interrupted" and s["stop_reason"] == "requeue_limit", s
    assert s["requeues"] == 1 and "cluster.max_requeues=1" in s["message"]
    log = (root.parent / f"train-{array_id}_0.out").read_text()
    assert f"the task asked for a requeue: scontrol requeue {task}" in log
    saved, resumed = saved_and_resumed(log)
    assert len(saved) == 2 and resumed == saved[:1], (saved, resumed)
    assert "ERROR" in log and not list(root.parent.glob("fada-requeue-*.json"))
