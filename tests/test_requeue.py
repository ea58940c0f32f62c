"""The requeue protocol without a cluster: what a stop signal means, the task's request, the
batch script's lines around the task's step (run by bash against a stand-in `scontrol`), and
the record in the summary when a requeue cannot happen. The real thing on SLURM:
tests/test_preemption.py and tests/test_image_cluster.py."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fada_batch.cli import main
from fada_batch.run import requeue
from fada_batch.training.summary import read_summary, write_summary

USR2, TERM = signal.SIGUSR2, signal.SIGTERM


@pytest.mark.parametrize(
    ("signum", "left", "elapsed", "limit", "reason"),
    [
        (USR2, 75, 0, None, "time_limit"),  # the warning, 45 s early (signal check period)
        (USR2, 500, 9 * 60, 10 * 60, "preempted"),  # the job's own end time wins over the config
        (USR2, None, 9 * 60, 10 * 60, "time_limit"),  # end time unknown: elapsed vs the config
        (USR2, None, 25, 60, "time_limit"),  # a 1-minute limit: every warning is the limit
        (USR2, None, 60, 10 * 60, "preempted"),  # `scancel --signal=USR2` early in the run
        (TERM, 10, 9 * 60, 10 * 60, "preempted"),  # SLURM ends the job
    ],
)
def test_a_stop_signal_is_a_time_limit_near_the_end_else_a_preemption(signum, left, elapsed, limit, reason):
    got = requeue.classify_signal(
        signum, warning_signal=USR2, left_s=left, elapsed_s=elapsed, time_limit_s=limit, signal_delay_s=30
    )
    assert got == reason


def test_the_batch_script_exports_the_job_end_time(tmp_path, monkeypatch):
    fake_tool(tmp_path / "bin", "squeue", 'echo "2031-05-04T03:02:01"')
    lines = "\n".join([*requeue.batch_setup_lines(tmp_path / "logs"), f'echo "${requeue.END_ENV}"'])
    env = {"PATH": f"{tmp_path}/bin:/usr/bin:/bin", "SLURM_JOB_ID": "5", "TZ": "UTC"}
    r = subprocess.run(["bash", "-c", lines], env=env, capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "1935630121", r.stderr  # 2031-05-04T03:02:01Z
    monkeypatch.setenv(requeue.END_ENV, "1935630121")
    assert requeue.seconds_left() == pytest.approx(1935630121 - time.time(), abs=5)
    fake_tool(tmp_path / "bin", "squeue", "exit 1")  # no squeue answer: no end time
    r = subprocess.run(["bash", "-c", lines], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == ""


@pytest.fixture()
def slurm_task(monkeypatch, tmp_path):
    monkeypatch.setenv("SLURM_JOB_ID", "107")
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "100")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    out = tmp_path / "out puts" / "blip2_femur"
    out.mkdir(parents=True)
    write_summary(out, {"category": "Femur", "status": "interrupted", "job_name": "demo", "last_step": 0})
    return out


def fake_tool(bindir: Path, name: str, body: str) -> Path:
    bindir.mkdir(exist_ok=True)
    tool = bindir / name
    tool.write_text(f"#!/bin/sh\n{body}\n")
    tool.chmod(0o755)
    return tool


def test_the_task_asks_the_host_when_the_batch_script_said_where(slurm_task, monkeypatch, tmp_path):
    request = tmp_path / "logs" / "requeue" / "107.json"
    request.parent.mkdir(parents=True)
    monkeypatch.setenv(requeue.REQUEST_ENV, str(request))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no scontrol: not needed for this
    how = requeue.request_requeue(slurm_task, "Femur", slurm_task / "checkpoint-40", "time_limit")
    assert how == "host" and requeue.restart_count() == 2
    info = json.loads(request.read_text())
    assert info["job_id"] == "100_7" and info["category"] == "Femur"
    assert info["output_dir"] == str(slurm_task) and info["checkpoint"].endswith("checkpoint-40")


def test_without_request_or_scontrol_the_requeue_fails_with_the_fix(slurm_task, monkeypatch, tmp_path):
    monkeypatch.delenv(requeue.REQUEST_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(
        requeue.RequeueError, match=r"cannot requeue job 100_7: there is no `scontrol`.*--env 'FADA_\*'"
    ):
        requeue.request_requeue(slurm_task, "Femur", None, "preempted")


def test_scontrol_on_the_path_requeues_and_its_failure_is_reported(slurm_task, monkeypatch, tmp_path):
    monkeypatch.delenv(requeue.REQUEST_ENV, raising=False)
    calls = tmp_path / "calls"
    fake_tool(tmp_path / "bin", "scontrol", f'echo "$*" >> "{calls}"')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    assert requeue.request_requeue(slurm_task, "Femur", None, "time_limit") == "scontrol"
    assert calls.read_text() == "requeue 100_7\n"
    fake_tool(tmp_path / "bin", "scontrol", 'echo "Requested operation is presently disabled" >&2; exit 1')
    with pytest.raises(requeue.RequeueError, match=r"presently disabled.*--no-requeue"):
        requeue.request_requeue(slurm_task, "Femur", None, "time_limit")


def test_record_stop_keeps_the_summary_and_sets_reason_message_and_step(slurm_task):
    s = requeue.record_stop(
        slurm_task,
        status="interrupted",
        stop_reason="requeue_limit",
        message="gave up",
        checkpoint=slurm_task / "checkpoint-120",
    )
    on_disk = read_summary(slurm_task)
    assert on_disk == s and s["category"] == "Femur" and s["job_name"] == "demo"
    assert (s["status"], s["stop_reason"], s["message"], s["last_step"]) == (
        "interrupted",
        "requeue_limit",
        "gave up",
        120,
    )
    with pytest.raises(AssertionError):
        requeue.record_stop(slurm_task, status="interrupted", stop_reason="tired", message="?")


def test_requeue_failed_command_marks_the_summary(slurm_task, tmp_path, capsys):
    request = tmp_path / "107.json"
    request.write_text(
        json.dumps(
            {
                "job_id": "100_7",
                "category": "Femur",
                "output_dir": str(slurm_task),
                "checkpoint": str(slurm_task / "checkpoint-40"),
            }
        )
    )
    assert main(["requeue-failed", str(request), "--error", "scontrol requeue 100_7: disabled"]) == 0
    s = read_summary(slurm_task)
    assert s["status"] == "failed" and s["stop_reason"] == "requeue_failed" and s["last_step"] == 40
    assert "could not requeue job 100_7: scontrol requeue 100_7: disabled" in s["error"]
    assert "--categories Femur" in s["message"] and "from checkpoint-40" in s["message"]
    assert "[fada-batch] ERROR: the batch script could not requeue job 100_7" in capsys.readouterr().err
    request.write_text("not json")
    assert main(["requeue-failed", str(request), "--error", "x"]) == 2
    assert f"{request}: not a requeue request" in capsys.readouterr().err


def batch_script(tmp_path: Path, step: str) -> Path:
    """setup lines, a stand-in for the task's step, then the teardown lines, as submitit
    writes them into the array's batch script."""
    lines = ["#!/bin/bash", *requeue.batch_setup_lines(tmp_path / "log dir")]
    lines += [step, *requeue.batch_teardown_lines(f"{tmp_path}/bin/fada-batch")]
    script = tmp_path / "batch.sh"
    script.write_text("\n".join(lines) + "\n")
    return script


@pytest.mark.parametrize(
    ("step", "scontrol_ok", "status", "scontrol_calls", "marked"),
    [
        ('echo asked > "$FADA_REQUEUE_REQUEST"; exit 255', True, 255, ["requeue 100_7"], False),
        ("exit 0", True, 0, [], False),  # completed: no requeue, the step's status
        ("exit 1", True, 1, [], False),  # the task failed: the job still fails
        ('echo asked > "$FADA_REQUEUE_REQUEST"; exit 255', False, 1, ["requeue 100_7"], True),
    ],
)
def test_batch_script_requeues_on_request_and_keeps_the_step_status(
    tmp_path, step, scontrol_ok, status, scontrol_calls, marked
):
    calls, marks = tmp_path / "scontrol.calls", tmp_path / "marks"
    fake_tool(
        tmp_path / "bin",
        "scontrol",
        f'echo "$*" >> "{calls}"' + ("" if scontrol_ok else "; echo refused >&2; exit 1"),
    )
    fake_tool(tmp_path / "bin", "fada-batch", f'echo "$*" >> "{marks}"')
    env = {
        "PATH": f"{tmp_path}/bin:/usr/bin:/bin",
        "SLURM_JOB_ID": "107",
        "SLURM_ARRAY_JOB_ID": "100",
        "SLURM_ARRAY_TASK_ID": "7",
    }
    r = subprocess.run(
        ["bash", str(batch_script(tmp_path, f"( {step} )"))],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode == status, r.stderr
    assert (calls.read_text().splitlines() if calls.exists() else []) == scontrol_calls
    request = tmp_path / "log dir" / "requeue" / "107.json"
    assert not request.exists()
    if marked:
        assert marks.read_text() == f"requeue-failed {request} --error scontrol requeue 100_7: refused\n"
        assert "ERROR: scontrol requeue 100_7 failed: refused" in r.stderr
    else:
        assert not marks.exists()


def test_the_jobs_clock_stops_the_task_when_the_warning_signal_is_lost(monkeypatch, capsys):
    """Without any signal, a task whose job ends within `signal_delay_s` stops at its next step
    as if the warning had come (a signal lost on its way into a container, or a late one)."""
    from fada_batch.run.launch import TrainTask

    task = TrainTask()
    monkeypatch.delenv(requeue.END_ENV, raising=False)
    assert task._should_stop(20) is False  # end time unknown (not under the batch script)
    monkeypatch.setenv(requeue.END_ENV, str(int(time.time()) + 300))
    assert task._should_stop(20) is False and task._signum is None  # 5 minutes left
    monkeypatch.setenv(requeue.END_ENV, str(int(time.time()) + 15))
    assert task._should_stop(20) is True
    assert task._signum == USR2  # handled as the time-limit warning: checkpoint, then requeue
    assert "before the job's time limit" in capsys.readouterr().out
    reason = requeue.classify_signal(
        task._signum,
        warning_signal=USR2,
        left_s=requeue.seconds_left(),
        elapsed_s=40,
        time_limit_s=60,
        signal_delay_s=20,
    )
    assert reason == "time_limit"
