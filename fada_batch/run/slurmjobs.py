"""Ask SLURM about a job (running, waiting in the queue, or over?) and whether SLURM is here.

    job_phase("1234")   -> JobPhase("running", "RUNNING (squeue)")
    check_reachable()   # raises SlurmUnavailable with the fix when sbatch cannot work here

The category lock (`fsutil.category_lock(job_probe=job_phase)`) and the collector use
`job_phase` to judge a task on another node; `submit` calls `check_reachable` before it
writes or submits anything. Only SLURM's own client commands run here (squeue, then sacct for
jobs the controller has forgotten; scontrol ping); nothing imports submitit.

When SLURM cannot answer (no client on PATH, no configuration, controller and database
unreachable, a timeout, a job id neither knows), the phase is None: the lock then falls back
to the holder's pid on the same host and to the lock's age elsewhere, and the collector to
what the files say. Job ids are SLURM_JOB_ID values ("1234"), or array task ids ("1230_4").
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import time

from fada_batch.fsutil import JobPhase

log = logging.getLogger(__name__)

# squeue/sacct state names (`man squeue`, JOB STATE CODES) by what they mean for a process
# that the job started: still there, gone and the job waits to run again, gone for good.
RUNNING_STATES = frozenset(
    {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
)
PENDING_STATES = frozenset(
    {"PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "SPECIAL_EXIT", "RESV_DEL_HOLD"}
)
ENDED_STATES = frozenset(
    {
        "COMPLETED",
        "CANCELLED",
        "FAILED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "REVOKED",
    }
)
JOB_ID = re.compile(r"^\d+(_\d+)?$")
TIMEOUT_S = 20.0  # per command; squeue/sacct answer in well under a second when SLURM is up
CACHE_S = 5.0  # one answer serves the lock's retries and a collector's categories

_cache: dict[str, tuple[float, JobPhase]] = {}


class SlurmUnavailable(RuntimeError):
    """SLURM's client cannot reach a cluster from here; the message says why and the fix."""


def _config_problem() -> str | None:
    """Why SLURM's commands would fail at once (or retry for a minute) here, else None."""
    conf = os.environ.get("SLURM_CONF")
    if conf and not os.path.isfile(conf):
        # the clients retry a missing file for 60 s before they give up
        return f"SLURM_CONF={conf} is not a file"
    return None


def _run(cmd: list[str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr); 127 when the command is not on PATH, 124 on a timeout."""
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    except FileNotFoundError:
        return 127, "", f"{cmd[0]} is not on PATH"
    except subprocess.TimeoutExpired:
        return 124, "", f"{cmd[0]} gave no answer in {TIMEOUT_S:g} s"
    except OSError as e:
        return 126, "", f"{cmd[0]} cannot run ({e.strerror or e})"
    return p.returncode, p.stdout, p.stderr


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _phase(state: str, source: str) -> JobPhase:
    word = state.split()[0].rstrip("+") if state.split() else ""  # "CANCELLED by 0", "FAILED+"
    if word in RUNNING_STATES:
        return JobPhase("running", f"{word} ({source})")
    if word in PENDING_STATES:
        return JobPhase("pending", f"{word} ({source})")
    if word in ENDED_STATES:
        return JobPhase("ended", f"{word} ({source})")
    return JobPhase(None, f"in a state this version does not know: {word!r} ({source})")


def _rows(text: str, job_id: str) -> list[str]:
    """States of the rows about `job_id` (lines `raw id|id|state`): `-j` on an array's id
    also lists its tasks, and the raw id of an array's last task is the array's own id."""
    out = []
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and job_id in (parts[0], parts[1]):
            out.append(parts[2])
    return out


def _ask(job_id: str) -> JobPhase:
    if (problem := _config_problem()) is not None:
        return JobPhase(None, problem)
    # the controller knows pending, running and recently ended jobs (MinJobAge)
    rc, out, err = _run(["squeue", "--noheader", "--states=all", "--jobs", job_id, "--format=%A|%i|%T"])
    if rc == 0 and (states := _rows(out, job_id)):
        return _phase(states[0], "squeue")
    squeue_said = "not in the queue" if rc == 0 or "Invalid job id" in err else _last_line(err)
    # the accounting database knows ended ones; its last record is the latest run
    sacct = ["sacct", "--noheader", "--parsable2", "--allocations", "--jobs", job_id]
    rc, out, err = _run([*sacct, "--format=JobIDRaw,JobID,State"])
    if rc == 0 and (states := _rows(out, job_id)):
        return _phase(states[-1], "sacct")
    sacct_said = "no record" if rc == 0 else _last_line(err)
    return JobPhase(None, f"squeue: {squeue_said}; sacct: {sacct_said}")


def job_phase(job_id: str) -> JobPhase:
    """What SLURM says of `job_id` now: running, pending (queued or requeued), ended, or None.

    Never raises: when SLURM cannot tell, the phase is None and `detail` says why.
    """
    job_id = str(job_id).strip()
    if not JOB_ID.match(job_id):
        return JobPhase(None, f"{job_id!r} is not a SLURM job id")
    now = time.monotonic()
    hit = _cache.get(job_id)
    if hit is not None and now - hit[0] < CACHE_S:
        return hit[1]
    phase = _ask(job_id)
    if phase.phase is None:
        log.debug("SLURM job %s: state unknown: %s", job_id, phase.detail)
    _cache[job_id] = (now, phase)
    return phase


def check_reachable() -> None:
    """Raise SlurmUnavailable (one line: why, and the fix) unless `sbatch` can reach a cluster.

    Checks that sbatch and srun (submitit needs both) are on PATH, that SLURM_CONF (when
    set) is a file, and that `scontrol ping` reaches the controller.
    """
    fix = (
        "run `fada-batch submit` where SLURM works (a login node; or load the cluster's "
        "SLURM environment, e.g. `module load slurm` or `export SLURM_CONF=<its slurm.conf>`), "
        "or run the tasks on this machine with `--executor local`"
    )
    missing = [cmd for cmd in ("sbatch", "srun") if shutil.which(cmd) is None]
    if missing:
        raise SlurmUnavailable(f"no SLURM here: {' and '.join(missing)} not on PATH; {fix}")
    if (problem := _config_problem()) is not None:
        raise SlurmUnavailable(f"SLURM is not configured here: {problem}; {fix}")
    if shutil.which("scontrol") is None:
        return  # sbatch will say it if the controller is down
    rc, out, err = _run(["scontrol", "ping"])
    if rc != 0:
        why = _last_line(err) or _last_line(out) or f"scontrol ping exited {rc}"
        raise SlurmUnavailable(f"SLURM cannot be reached from here (scontrol ping: {why}); {fix}")
