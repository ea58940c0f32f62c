"""The collector after the array: a category that did not complete needs attention, says its
last step and the exact command that resumes it, and the collector exits non-zero; while the
tasks still run (a collector started by hand) it reports them as running or queued.

With summaries as a task writes them (the stop_reason/message contract, and older ones
without), a real interrupted training whose resume command is run as printed, and on the
real local SLURM cluster: a task cancelled mid-training leaves the collector job FAILED with a
report that names it and how to resume; that command, run as printed, completes it.
"""

from __future__ import annotations

import html
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fada_batch import cli
from fada_batch.fsutil import JobPhase
from fada_batch.run import slurmjobs
from fada_batch.run.collect import EXIT_FAILED, EXIT_OK, collect
from fada_batch.run.report import render_html, resume_all
from fada_batch.training.recipe import StopRequested, train_category

FADA_BATCH = str(Path(sys.executable).parent / "fada-batch")


def _summary(root: Path, category: str, **fields) -> Path:
    folder = root / f"blip2_{category.lower().replace('-', '_')}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "training_summary.json").write_text(json.dumps({"category": category, **fields}))
    (folder / "config.yaml").write_text("name: x\n")  # the task's resolved job (resume commands)
    return folder


def _stopped_at(step: int, **fields) -> dict:
    return {
        "status": "interrupted",
        "steps": step,
        "total_steps": 8400,
        "checkpoint": f"/shared/out/blip2_x/checkpoint-{step}",
        "slurm": {"job_id": "812", "array_job_id": "800", "array_task_id": "3"},
        **fields,
    }


def _probe(phase: str | None, detail: str):
    return lambda job_id: JobPhase(phase, detail)


@pytest.mark.parametrize(
    ("fields", "phase", "finished", "state", "words"),
    [
        # requeue pending after the time limit: it will resume
        ({"stop_reason": "time_limit"}, ("pending", "PENDING (squeue)"), False, "queued", "resumes from"),
        ({"stop_reason": "time_limit"}, ("running", "RUNNING (squeue)"), False, "running", "is RUNNING"),
        # its job is over and no requeue came: stopped, by hand or after the array
        ({"stop_reason": "preempted"}, ("ended", "CANCELLED (sacct)"), False, "stopped", "CANCELLED (sacct)"),
        ({"stop_reason": "time_limit"}, (None, "squeue: not on PATH"), True, "stopped", "has ended"),
        # gave up (the other helper's requeue path writes these): stopped whatever SLURM says
        (
            {"stop_reason": "requeue_limit", "message": "requeued 3 times; resume: fada-batch submit ..."},
            (None, ""),
            False,
            "stopped",
            "gave up: requeued cluster.max_requeues times",
        ),
        # an older summary: no stop_reason, no message; without SLURM nobody can tell
        ({}, (None, "no SLURM"), False, "incomplete", "resumes when requeued or rerun"),
        ({}, (None, "no SLURM"), True, "stopped", "nothing will resume it"),
    ],
)
def test_unfinished_category_states(tmp_path, fields, phase, finished, state, words):
    root = tmp_path / "out"
    folder = _summary(root, "Femur", **_stopped_at(5628, **fields))
    result = collect(root, categories=["Femur"], finished=finished, job_probe=_probe(*phase))
    (c,) = result.categories
    assert c.state == state, c.detail
    assert words in c.detail and "step 5628 (checkpoint-5628)" in c.detail
    if fields.get("message"):
        assert fields["message"] in c.detail
    assert c.stop_reason == fields.get("stop_reason")
    attention = state == "stopped"
    assert result.exit_code() == (EXIT_FAILED if attention else EXIT_OK)
    if state in ("stopped", "incomplete"):
        # no submission.json: how it ran comes from the summary (a SLURM job: submit)
        assert (
            c.resume
            == f"fada-batch submit --job {shlex.quote(str(folder / 'config.yaml'))} --categories Femur"
        )
    else:
        assert c.resume is None


def test_not_started_tasks_are_queued_then_stopped(tmp_path):
    """A task that never wrote anything: queued while SLURM holds it, stopped once the run is
    over, and resumed with the job `submit` wrote in the output root."""
    root = tmp_path / "out"
    root.mkdir()
    (root / "submission.json").write_text(json.dumps({"executor": "slurm", "tasks": {"Thorax": "800_4"}}))
    (root / "job.yaml").write_text("name: x\n")
    asked = []

    def probe(job_id):
        asked.append(job_id)
        return JobPhase("pending", "PENDING (squeue)")

    (c,) = collect(root, categories=["Thorax"], job_probe=probe).categories
    assert (c.state, asked) == ("queued", ["800_4"]) and "SLURM job 800_4 is PENDING" in c.detail
    (c,) = collect(
        root, categories=["Thorax"], finished=True, job_probe=_probe("ended", "FAILED (sacct)")
    ).categories
    assert c.state == "stopped" and c.detail.startswith("never started (no folder")
    assert "SLURM job 800_4 is FAILED (sacct)" in c.detail
    assert c.resume == f"fada-batch submit --job {shlex.quote(str(root / 'job.yaml'))} --categories Thorax"


def test_failed_with_a_stop_reason_shows_it(tmp_path):
    root = tmp_path / "out"
    _summary(
        root,
        "Femur",
        status="failed",
        stop_reason="requeue_failed",
        error="FileNotFoundError: 'scontrol'",
        message="the requeue failed; resume with: fada-batch submit ...",
    )
    (c,) = collect(root, categories=["Femur"], finished=True).categories
    assert c.state == "failed"
    assert c.detail.startswith("could not be requeued; FileNotFoundError: 'scontrol'; the requeue failed")
    assert c.resume and c.resume.startswith("fada-batch train --job ")  # no SLURM ids: a workstation


def test_report_and_cli_after_the_run(tmp_path, capsys, monkeypatch):
    # SLURM's word is kept out: the summaries' job 812 is made up, and the local test cluster
    # (SLURM_CONF in CI) may have had a real job 812 by now (seen: "CANCELLED (sacct)")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "no SLURM here" / "slurm.conf"))
    slurmjobs._cache.clear()
    root = tmp_path / "out"
    for name, step in (("Femur", 5628), ("Thorax", 17)):
        _summary(root, name, **_stopped_at(step, stop_reason="time_limit"))
    _summary(root, "Abdomen", status="awaiting_labels", message="no label sheet yet")
    job = tmp_path / "job.yaml"
    job.write_text(
        f"output: {{root: {json.dumps(str(root))}}}\ndata: {{categories: [Femur, Thorax, Abdomen]}}\n"
    )

    assert cli.main(["collect", "--job", str(job), "--finished"]) == EXIT_FAILED
    out = capsys.readouterr().out
    femur_cmd = (
        f"fada-batch submit --job {shlex.quote(str(root / 'blip2_femur' / 'config.yaml'))} --categories Femur"
    )
    assert f"    to resume: {femur_cmd}" in out
    assert "0 of 3 categories done, 0 failed, 2 stopped unfinished (need a rerun), 1 waiting" in out
    md = (root / "report.md").read_text()
    assert (
        "- **Femur**: stopped unfinished: interrupted at step 5628 (checkpoint-5628): reached its time" in md
    )
    assert femur_cmd in md and "To resume all of them:" in md
    collected = json.loads((root / "collected.json").read_text())
    assert collected["finished"] is True
    every = resume_all(collected["categories"])
    assert len(every) == 2  # one job file per category folder here
    assert html.escape(femur_cmd) in render_html(collected, {})
    # by hand, without --finished and without SLURM's word: not known to be over
    assert cli.main(["collect", "--job", str(job)]) == EXIT_OK


def test_printed_resume_command_resumes(job_factory, tmp_path):
    """The command the collector prints, run as printed (a workstation's: `train`), resumes
    the category from its last checkpoint and completes it."""
    cfg = job_factory({"train.num_epochs": 2, "data.num_images": 12, "train.checkpoint_every_steps": 1})
    calls = {"n": 0}

    def stop_at_3() -> bool:
        calls["n"] += 1
        return calls["n"] >= 3

    with pytest.raises(StopRequested):
        train_category(cfg, "Thorax", should_stop=stop_at_3)
    root = Path(cfg.output.root)
    result = collect(root, categories=["Thorax"], finished=True)
    (c,) = result.categories
    assert c.state == "stopped" and c.last_step == 3 and result.exit_code() == EXIT_FAILED
    argv = shlex.split(c.resume)
    assert argv[:2] == ["fada-batch", "train"]
    done = subprocess.run([FADA_BATCH, *argv[1:]], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    s = json.loads((root / "blip2_thorax" / "training_summary.json").read_text())
    assert s["status"] == "completed" and s["resumes"] == 1
    assert collect(root, categories=["Thorax"], finished=True).exit_code() == EXIT_OK


def test_live_training_process_by_hand(job_factory, tmp_path, capsys):
    """A collector started by hand beside a live `fada-batch train`: running (exit 0); once
    that process is killed (SIGKILL: it records nothing), stopped after the run."""
    from fada_batch.config import dump_yaml

    cfg = job_factory({"train.num_epochs": 400, "data.num_images": 12, "train.checkpoint_every_steps": 2})
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    folder = Path(cfg.output.root) / "blip2_femur"
    proc = subprocess.Popen(
        [FADA_BATCH, "train", "--job", str(job), "--category", "Femur"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait("a checkpoint", lambda: list(folder.glob("checkpoint-*")) or proc.poll() is not None, every=0.2)
        assert proc.poll() is None, "training ended before the collector could see it run"
        assert cli.main(["collect", "--job", str(job), "-p", "data.categories=[Femur]"]) == EXIT_OK
        assert "Femur              running" in capsys.readouterr().out
        (femur,) = json.loads((Path(cfg.output.root) / "collected.json").read_text())["categories"]
        assert f"pid {proc.pid} on" in femur["detail"] and "is alive" in femur["detail"]
    finally:
        proc.kill()
        proc.wait()
    assert (
        cli.main(["collect", "--job", str(job), "-p", "data.categories=[Femur]", "--finished"]) == EXIT_FAILED
    )
    out = capsys.readouterr().out
    assert "Femur: stopped unfinished: still marked running after its task ended" in out
    assert (
        f"to resume: fada-batch train --job {shlex.quote(str(folder / 'config.yaml'))} --category Femur"
        in out
    )


# ------------------------------------------------------------------------ the real cluster

CLUSTER = {
    "cluster.gpus_per_task": 0,
    "cluster.cpus_per_task": 1,
    "cluster.mem_gb": 2,
    "cluster.time_min": 10,
    "cluster.extra_sbatch": {"hold": True},
    "train.num_epochs": 40,
    "train.checkpoint_every_steps": 2,
    "data.num_images": 12,
    "eval.after_training": False,
}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "-o", "JobID,State"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    rows = dict(ln.split("|", 1) for ln in out.splitlines() if "|" in ln)
    return rows.get(job_id, "").split(" ")[0]


def _wait(what: str, ok, timeout_s: float = 400, every: float = 1.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := ok():
            return value
        time.sleep(every)
    pytest.fail(f"{what}: not after {timeout_s} s")


def _by_hand(cfg):
    slurmjobs._cache.clear()
    (c,) = collect(Path(cfg.output.root), categories=["Femur"], job_probe=slurmjobs.job_phase).categories
    return c


@pytest.mark.slurm
def test_collector_job_after_a_cancelled_task(slurm_conf, job_factory):
    from fada_batch.run.launch import submit

    cfg = job_factory(CLUSTER)
    root = Path(cfg.output.root)
    record = submit(cfg, executor="slurm", categories=["Femur"])
    task, coll = record["tasks"]["Femur"], record["collector_job_id"]
    try:
        c = _by_hand(cfg)  # held in the queue, nothing written yet
        assert c.state == "queued" and f"SLURM job {task} is PENDING (squeue)" in c.detail, c.detail
        subprocess.run(["scontrol", "release", record["array_job_id"]], check=True, timeout=30)
        subprocess.run(["scontrol", "release", coll], check=True, timeout=30)
        _wait("a checkpoint", lambda: list((root / "blip2_femur").glob("checkpoint-*")), every=0.5)
        c = _by_hand(cfg)
        assert c.state == "running", c.detail
    finally:
        subprocess.run(["scancel", task], check=False, timeout=30)  # killed mid-training
    assert _wait("the collector", lambda: _sacct_state(coll) in TERMINAL and _sacct_state(coll)) == "FAILED"
    assert _sacct_state(task) == "CANCELLED"
    collected = json.loads((root / "collected.json").read_text())
    (femur,) = [c for c in collected["categories"] if c["category"] == "Femur"]
    assert femur["state"] == "stopped" and femur["last_step"] >= 2, femur["detail"]
    assert f"step {femur['last_step']} (checkpoint-{femur['last_step']})" in femur["detail"]
    cmd = (
        f"fada-batch submit --job {shlex.quote(str(root / 'blip2_femur' / 'config.yaml'))} --categories Femur"
    )
    assert femur["resume"] == cmd
    md = (root / "report.md").read_text()
    assert "**Femur**: stopped unfinished" in md and cmd in md
    log = next((root / "logs").glob(f"{coll}_0_log.err")).read_text()
    assert "categories need attention: Femur (stopped, resume: fada-batch submit" in log

    # the command, as printed; the cancelled task's lock (if any) does not stand in its way
    argv = shlex.split(cmd)
    sub = subprocess.run([FADA_BATCH, *argv[1:]], capture_output=True, text=True, timeout=120)
    assert sub.returncode == 0, sub.stderr
    again = json.loads((root / "submission.json").read_text())
    subprocess.run(["scontrol", "release", again["array_job_id"]], check=True, timeout=30)
    subprocess.run(["scontrol", "release", again["collector_job_id"]], check=True, timeout=30)
    coll2 = again["collector_job_id"]
    assert _wait("the second collector", lambda: _sacct_state(coll2) in TERMINAL and _sacct_state(coll2)) == (
        "COMPLETED"
    )
    s = json.loads((root / "blip2_femur" / "training_summary.json").read_text())
    assert s["status"] == "completed" and s["resumes"] >= 1
