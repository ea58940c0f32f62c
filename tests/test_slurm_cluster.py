"""The local SLURM test cluster (slurm/testcluster/) really schedules jobs.

Runs against a real slurmctld/slurmd/slurmdbd on localhost, started by
`slurm/testcluster/start.sh` (installs Debian's packages when absent, needs root).
Set FADA_SKIP_SLURM=1 to skip these tests on a machine that cannot run the cluster.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

TESTCLUSTER = Path(__file__).resolve().parents[1] / "slurm" / "testcluster"
START = TESTCLUSTER / "start.sh"
STOP = TESTCLUSTER / "stop.sh"
STATUS = TESTCLUSTER / "status.sh"

# Job states after which a job never runs again (sacct's names).
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY",
    "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE",
}  # fmt: skip


def _run(*cmd: str | Path, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run a command and return it; the caller checks returncode."""
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, check=False)


def _check(*cmd: str | Path, timeout: float = 30) -> str:
    """Run a command, fail the test with its output if it fails, return its stdout."""
    proc = _run(*cmd, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout


def _pids() -> dict[str, str]:
    """Daemon name -> PID from the state folder's pid files."""
    run_dir = Path(os.environ["SLURM_CONF"]).parents[1] / "run"
    return {p.stem: p.read_text().strip() for p in sorted(run_dir.glob("*.pid"))}


def _wait_for_sacct(job_ids: list[str], expected_rows: int, timeout_s: float = 45) -> dict[str, str]:
    """Poll sacct until `expected_rows` allocations of `job_ids` are all terminal.

    Returns:
        JobID (e.g. "12_0") -> State, as sacct reports them.
    """
    deadline = time.monotonic() + timeout_s
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        out = _check("sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids))
        states = dict(line.split("|", 1) for line in out.splitlines() if line)
        # "CANCELLED by 0" -> "CANCELLED"
        states = {job: state.split()[0] for job, state in states.items()}
        if len(states) == expected_rows and set(states.values()) <= TERMINAL_STATES:
            return states
        time.sleep(0.5)
    pytest.fail(f"jobs {job_ids} not finished after {timeout_s} s; sacct says {states}")


def test_node_is_idle(slurm_conf: str) -> None:
    out = _check("sinfo", "-h", "-N", "-o", "%N %T")
    assert out.split() == ["localhost", "idle"], out


def test_array_and_dependent_job_complete(slurm_conf: str, tmp_path: Path) -> None:
    array_id = _check(
        "sbatch", "--parsable", "--array=0-2", f"--output={tmp_path}/array_%A_%a.out",
        "--wrap", "echo task=$SLURM_ARRAY_TASK_ID",
    ).strip()  # fmt: skip
    after_id = _check(
        "sbatch", "--parsable", f"--dependency=afterany:{array_id}",
        f"--output={tmp_path}/after_%j.out", "--wrap", "echo after",
    ).strip()  # fmt: skip

    states = _wait_for_sacct([array_id, after_id], expected_rows=4)

    assert states == {
        f"{array_id}_0": "COMPLETED",
        f"{array_id}_1": "COMPLETED",
        f"{array_id}_2": "COMPLETED",
        after_id: "COMPLETED",
    }
    for task in range(3):
        text = (tmp_path / f"array_{array_id}_{task}.out").read_text()
        assert text.strip() == f"task={task}"
    assert (tmp_path / f"after_{after_id}.out").read_text().strip() == "after"


def test_start_is_idempotent(slurm_conf: str) -> None:
    pids_before = _pids()
    t0 = time.monotonic()
    proc = _run("bash", START)
    elapsed = time.monotonic() - t0

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"export SLURM_CONF={slurm_conf}"
    assert "already running" in proc.stderr
    assert elapsed < 5, f"second start.sh took {elapsed:.1f} s"
    assert _pids() == pids_before
    assert set(pids_before) == {"munged", "mariadbd", "slurmdbd", "slurmctld", "slurmd"}


def test_submitit_map_array(slurm_conf: str, tmp_path: Path) -> None:
    submitit = pytest.importorskip("submitit")

    def square(x: int) -> tuple[int, str]:
        # Defined inside the test so cloudpickle ships it by value: the job's interpreter
        # cannot import this test module.
        return x * x, os.environ["SLURM_ARRAY_TASK_ID"]

    executor = submitit.AutoExecutor(folder=tmp_path / "submitit")
    assert executor.cluster == "slurm"
    executor.update_parameters(timeout_min=2, cpus_per_task=1, mem_gb=1, slurm_array_parallelism=2)

    jobs = executor.map_array(square, [0, 1, 2])

    # job.result() waits without a limit: wait here with one so a broken cluster fails fast.
    deadline = time.monotonic() + 45
    while not all(job.done() for job in jobs) and time.monotonic() < deadline:
        time.sleep(0.5)
    if not all(job.done() for job in jobs):
        for job in jobs:
            job.cancel(check=False)
        pytest.fail(f"submitit jobs not done after 45 s: {[(j.job_id, j.state) for j in jobs]}")
    assert [job.result() for job in jobs] == [(0, "0"), (1, "1"), (4, "2")]
