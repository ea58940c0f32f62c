"""Helpers for tests that run jobs on the local SLURM test cluster: sacct states, waiting,
task logs and summaries. Not a test module (no `test_` prefix)."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}

# small tasks that fit two at a time on the 2-CPU test node
SMALL = {
    "cluster.gpus_per_task": 0,
    "cluster.cpus_per_task": 1,
    "cluster.mem_gb": 2,
    "cluster.signal_delay_s": 10,
    "eval.after_training": False,
}


def sacct(job_id: str, *, duplicates: bool = False) -> list[dict[str, str]]:
    """The job's allocations (no steps) as sacct lists them; with `duplicates`, every run of a
    requeued job too (its earlier runs show as REQUEUED)."""
    cmd = ["sacct", "-X", "-n", "-P", "-j", job_id, "--format=JobID,State,Start,End,ExitCode"]
    if duplicates:
        cmd.insert(1, "--duplicates")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=30).stdout
    rows = []
    for line in out.strip().splitlines():
        jid, state, start, end, code = line.split("|")
        rows.append({"JobID": jid, "State": state.split()[0], "Start": start, "End": end, "ExitCode": code})
    return rows


def wait_done(job_id: str, timeout_s: float, *, expected: int = 1) -> dict[str, dict[str, str]]:
    """Poll sacct until `expected` allocations of the job are listed and all are over."""
    deadline = time.monotonic() + timeout_s
    rows: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        rows = {r["JobID"]: r for r in sacct(job_id)}
        if len(rows) >= expected and all(r["State"] in TERMINAL for r in rows.values()):
            return rows
        time.sleep(2)
    pytest.fail(f"job {job_id} did not finish in {timeout_s} s: {rows}\n{cluster_state()}")


def wait_for(
    what: str,
    check: Callable[[], Any],
    timeout_s: float,
    every_s: float = 0.5,
    *,
    detail: Callable[[], str] | None = None,
) -> Any:
    """Poll `check()` until it returns something true; fail naming `what` otherwise, with the
    cluster's state and `detail()` (a task's log, say)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(every_s)
    extra = detail() if detail else ""
    pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n{cluster_state()}\n{extra}")


def task_log(log_dir: Path, task_job_id: str) -> str:
    """stdout and stderr of every run of one task (submitit's log files, appended on requeue)."""
    texts = [p.read_text(errors="replace") for p in sorted(log_dir.glob(f"{task_job_id}_0_log.*"))]
    return "\n".join(texts)


def summary(out_root: Path, category: str) -> dict[str, Any]:
    return json.loads((out_root / f"blip2_{category.lower()}" / "training_summary.json").read_text())


def read_summary_now(out_root: Path, category: str) -> dict[str, Any] | None:
    """The summary as it is at this instant, or None (not written yet, or mid-replace)."""
    try:
        return summary(out_root, category)
    except (OSError, ValueError):
        return None


def _run_text(*cmd: str) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return f"({e})"
    return (done.stdout + done.stderr).strip() or "(nothing)"


def cluster_state() -> str:
    """What the test cluster says now (its queue, recent allocations with every requeued run,
    the node): printed when a wait on it times out, so a failure in CI says why."""
    return "\n".join(
        [
            "--- squeue -t all",
            _run_text("squeue", "-t", "all", "-o", "%i|%T|%r|%M|%l|%S|%N"),
            "--- sacct --duplicates (last 30 min)",
            _run_text(
                "sacct",
                "-X",
                "-n",
                "-P",
                "--duplicates",
                "-S",
                "now-30minutes",
                "--format=JobID,JobName%20,State,Start,End,Elapsed,ExitCode,Reason",
            ),
            "--- node",
            _run_text("scontrol", "-o", "show", "node"),
            "--- uptime",
            _run_text("uptime"),
        ]
    )


def queued_jobs(under: Path) -> set[str]:
    """Jobs not over (squeue's default: pending, running, completing, held) whose stdout lies
    under `under` (a test session's temporary folder), by array job id (a plain job's own id):
    other sessions' jobs on the shared test cluster are never touched."""
    out = _run_text("squeue", "-h", "-O", "ArrayJobID:|,StdOut:")
    jobs = (line.split("|", 1) for line in out.splitlines() if "|" in line)
    return {j.strip() for j, stdout in jobs if j.strip().isdigit() and stdout.startswith(str(under))}


def cancel_new(under: Path, known: set[str], timeout_s: float = 90) -> list[str]:
    """Cancel the jobs `queued_jobs(under)` lists that are not in `known` (a module fixture's
    jobs, say), wait until they are gone; return their ids."""
    new = sorted(queued_jobs(under) - known, key=int)
    if new:
        subprocess.run(["scancel", *new], capture_output=True, timeout=30, check=False)
        deadline = time.monotonic() + timeout_s
        while queued_jobs(under) & set(new) and time.monotonic() < deadline:
            time.sleep(1)
    return new
