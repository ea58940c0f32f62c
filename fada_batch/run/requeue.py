"""Why a SLURM task stopped, and its requeue, also from an image that has no SLURM client.

A task stops before it completes on the time-limit warning, on a preemption signal or when
SLURM ends it; it has saved a checkpoint by then. What follows is recorded in its
`training_summary.json` (`status`, `stop_reason`, `message` saying how it resumes):

| stop_reason      | status      | what happens                                                 |
|------------------|-------------|--------------------------------------------------------------|
| `time_limit`     | interrupted | requeued; the requeued task resumes from the checkpoint      |
| `preempted`      | interrupted | requeued (by the task, or by SLURM itself after a SIGTERM)   |
| `requeue_limit`  | interrupted | not requeued: `cluster.max_requeues` requeues already        |
| `requeue_failed` | failed      | the requeue was asked for and could not happen (an error)    |
| `user`           | interrupted | Ctrl-C on a workstation                                      |

How a task is requeued, in this order:

1. `FADA_REQUEUE_REQUEST` names a file (fada-batch's batch scripts set it, on the host): the
   task writes that file and exits; the batch script, which runs on the host where the site's
   `scontrol`, munge and slurm.conf are, runs `scontrol requeue` once the task's step has
   ended. The task may thus run in an image without a SLURM client (a SLURM client must match
   the site's controller version and needs munge and slurm.conf, which no image can carry for
   every site). Should `scontrol` fail there, the batch script records it in the summary
   (`fada-batch requeue-failed`) and the job ends FAILED.
2. `scontrol` is on the PATH (the task runs on the host): the task requeues itself, as
   submitit's own `SlurmJobEnvironment._requeue` does.
3. Neither: the requeue cannot happen; that is an error in the log and in the summary.

Every requeue counts against `cluster.max_requeues` (SLURM_RESTART_COUNT: time-outs,
preemptions and requeues by an administrator alike).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from fada_batch.fsutil import atomic_write_json
from fada_batch.training.summary import now_iso, read_summary, write_summary

log = logging.getLogger(__name__)

STOP_REASONS = ("time_limit", "preempted", "requeue_limit", "requeue_failed", "user")
REQUEST_ENV = "FADA_REQUEUE_REQUEST"
END_ENV = "FADA_JOB_END_EPOCH"  # the job's end time (its limit), as the batch script read it
# SLURM sends the `--signal` warning up to a minute before the time it was asked for (its
# signal check runs every 30 s); a warning that comes this much earlier still is a time limit.
WARNING_SLACK_S = 90


class RequeueError(RuntimeError):
    """A requeue was needed and could not happen (the message says why and the fix)."""


class RequeueLimitError(RuntimeError):
    """The task stopped again after `cluster.max_requeues` requeues: it is not requeued."""


def slurm_job_id() -> str | None:
    """This task's job id as `scontrol requeue` takes it (`<array>_<task>` for array tasks)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return env.get("SLURM_JOB_ID")


def restart_count() -> int:
    """How many times SLURM has requeued this job (every cause counts)."""
    value = os.environ.get("SLURM_RESTART_COUNT", "0")
    return int(value) if value.isdigit() else 0


def seconds_left() -> float | None:
    """Seconds until this job's time limit, from the end time the batch script read with
    squeue (`FADA_JOB_END_EPOCH`); None when unknown (not set, or no limit)."""
    end = os.environ.get(END_ENV, "")
    return float(end) - time.time() if end.isdigit() else None


def classify_signal(
    signum: int,
    *,
    warning_signal: int,
    left_s: float | None,
    elapsed_s: float,
    time_limit_s: float | None,
    signal_delay_s: float,
) -> str:
    """`time_limit` or `preempted`: what a stop signal means for this task.

    The warning signal (`--signal`, sent `signal_delay_s` before the limit) is a time limit
    when it comes near the end of the allocation, and a preemption (`scancel --signal`, a
    site's preemption warning) any earlier. Near the end: `left_s`, the seconds left before
    the job's own limit, when known; else the time since the task started against the
    job's configured limit. SIGTERM is SLURM ending the job (preemption, `scontrol
    requeue`, `scancel`): `preempted`.
    """
    if signum != warning_signal:
        return "preempted"
    if left_s is not None:
        return "time_limit" if left_s <= signal_delay_s + WARNING_SLACK_S else "preempted"
    if not time_limit_s:
        return "preempted"
    return "time_limit" if elapsed_s >= time_limit_s - signal_delay_s - WARNING_SLACK_S else "preempted"


def resume_hint(job_name: str, category: str, checkpoint: Path | None) -> str:
    where = f"from {checkpoint.name}" if checkpoint else "from its last checkpoint"
    if category == "joint":  # outputs.JOINT: the joint adapter's task (train.mode: joint)
        return f"`fada-batch submit --job JOB` with this run's job file (job name '{job_name}') resumes it {where}"
    return (
        f"`fada-batch submit --job JOB --categories {category}` with this run's job file "
        f"(job name '{job_name}') resumes it {where}"
    )


def record_stop(
    out_dir: Path,
    *,
    status: str,
    stop_reason: str,
    message: str,
    checkpoint: Path | None = None,
    error: str | None = None,
) -> dict[str, Any]:
    """Write why the task stopped into its summary (kept as it is otherwise)."""
    assert stop_reason in STOP_REASONS, stop_reason
    try:
        summary = read_summary(out_dir) or {}
    except ValueError:
        summary = {}
    summary.update(status=status, stop_reason=stop_reason, message=message, end_time=now_iso())
    if checkpoint is not None:
        summary["checkpoint"] = str(checkpoint)
        step = checkpoint.name.rpartition("-")[2]
        if step.isdigit():
            summary["last_step"] = int(step)
    if error is not None:
        summary["error"] = error
    write_summary(out_dir, summary)
    return summary


def request_requeue(out_dir: Path, category: str, checkpoint: Path | None, stop_reason: str) -> str:
    """Have SLURM requeue this task; returns how (`host` or `scontrol`).

    Raises:
        RequeueError: no way to requeue here, or `scontrol requeue` failed (says the fix).
    """
    job = slurm_job_id()
    if not job:
        raise RequeueError("not a SLURM job (no SLURM_JOB_ID): nothing to requeue")
    request = os.environ.get(REQUEST_ENV)
    if request:
        atomic_write_json(
            Path(request),
            {
                "job_id": job,
                "category": category,
                "output_dir": str(out_dir),
                "checkpoint": str(checkpoint) if checkpoint else None,
                "stop_reason": stop_reason,
                "requested": now_iso(),
                "from_host": socket.gethostname(),
            },
        )
        log.info("asked the batch script to requeue job %s (request %s)", job, request)
        return "host"
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise RequeueError(
            f"cannot requeue job {job}: there is no `scontrol` here (the task runs in an image "
            f"without a SLURM client?) and {REQUEST_ENV} is not set, so the batch script was "
            f"not asked either. Fix: submit with `fada-batch submit` (its batch script requeues "
            f"on the host when the task asks) and let {REQUEST_ENV} into the container "
            f"(podman: --env 'FADA_*'; Apptainer passes it unless --cleanenv)"
        )
    r = subprocess.run([scontrol, "requeue", job], capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise RequeueError(
            f"`scontrol requeue {job}` failed (exit {r.returncode}): "
            f"{(r.stderr or r.stdout).strip() or 'no message'}. Is the job requeueable "
            f"(--no-requeue, JobRequeue=0 in slurm.conf)?"
        )
    log.info("requeued job %s with scontrol", job)
    return "scontrol"


def requeue_message(stop_reason: str, *, how: str, requeues: int, max_requeues: int, resume: str) -> str:
    cause = "reached its time limit" if stop_reason == "time_limit" else "was preempted"
    by = "by the batch script on the host" if how == "host" else "with scontrol"
    return (
        f"{cause}; requeued {by} (requeue {requeues + 1} of at most {max_requeues}): the "
        f"requeued task resumes by itself. Should it not come back, {resume}"
    )


def limit_message(stop_reason: str, *, requeues: int, max_requeues: int, resume: str) -> str:
    cause = "reached its time limit" if stop_reason == "time_limit" else "was preempted"
    return (
        f"{cause} again after {requeues} requeues (cluster.max_requeues={max_requeues}): not "
        f"requeued. {resume[0].upper()}{resume[1:]}; to need fewer requeues, raise "
        f"cluster.time_min or cluster.max_requeues"
    )


def terminated_message(resume: str) -> str:
    return (
        "SLURM ended the task (SIGTERM: preemption, `scontrol requeue` or `scancel`) after it "
        "saved a checkpoint. If SLURM requeued it, it resumes by itself; if it was cancelled, "
        f"{resume}"
    )


def failed_message(error: str, resume: str) -> str:
    return f"the requeue could not happen: {error}. The checkpoint is kept: {resume}"


def after_sbatch_stop(
    out_dir: Path,
    category: str,
    *,
    job_name: str,
    max_requeues: int,
    checkpoint: Path | None,
    signum: int | None,
) -> str:
    """`fada-batch train` stopped on a signal after saving `checkpoint` (a plain sbatch array
    task, or a workstation): record why in the summary and, after SLURM's time-limit warning
    (SIGUSR1), have the task requeued. Returns the `stop_reason` recorded.

    SIGTERM under SLURM is a preemption (SLURM decides whether it comes back); outside SLURM
    any signal is the user's. A requeue past `max_requeues`, or one that cannot happen, is an
    error (printed, and in the summary).
    """
    resume = resume_hint(job_name, category, checkpoint)
    under_slurm = bool(os.environ.get("SLURM_JOB_ID"))
    if signum != signal.SIGUSR1 or not under_slurm:
        reason, message = (
            ("preempted", terminated_message(resume))
            if under_slurm
            else ("user", f"stopped by signal {signum}; run the same command again to resume")
        )
        record_stop(out_dir, status="interrupted", stop_reason=reason, message=message, checkpoint=checkpoint)
        return reason
    done = restart_count()
    if done >= max_requeues:
        msg = limit_message("time_limit", requeues=done, max_requeues=max_requeues, resume=resume)
        record_stop(
            out_dir, status="interrupted", stop_reason="requeue_limit", message=msg, checkpoint=checkpoint
        )
        print(f"{category}: ERROR: {msg}", file=sys.stderr, flush=True)
        return "requeue_limit"
    try:
        how = request_requeue(out_dir, category, checkpoint, "time_limit")
    except RequeueError as e:
        message = failed_message(str(e), resume)
        record_stop(
            out_dir,
            status="failed",
            stop_reason="requeue_failed",
            message=message,
            checkpoint=checkpoint,
            error=str(e),
        )
        print(f"{category}: ERROR: {e}", file=sys.stderr, flush=True)
        return "requeue_failed"
    msg = requeue_message("time_limit", how=how, requeues=done, max_requeues=max_requeues, resume=resume)
    record_stop(out_dir, status="interrupted", stop_reason="time_limit", message=msg, checkpoint=checkpoint)
    print(f"{category}: {msg}", file=sys.stderr, flush=True)
    return "time_limit"


def record_host_failure(request: Path, error: str) -> dict[str, Any]:
    """The batch script's `scontrol requeue` failed: mark the task's summary (failed).

    Raises:
        ValueError: the request file is missing or not what a task writes (names the file).
    """
    try:
        info = json.loads(request.read_text())
        out_dir = Path(info["output_dir"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{request}: not a requeue request written by a fada-batch task ({e})") from e
    checkpoint = Path(info["checkpoint"]) if info.get("checkpoint") else None
    summary = read_summary(out_dir) or {}
    resume = resume_hint(summary.get("job_name", "?"), info.get("category", "?"), checkpoint)
    why = f"the batch script could not requeue job {info.get('job_id')}: {error.strip()}"
    print(f"[fada-batch] ERROR: {why}", file=sys.stderr, flush=True)
    return record_stop(
        out_dir,
        status="failed",
        stop_reason="requeue_failed",
        message=failed_message(why, resume),
        checkpoint=checkpoint,
        error=why,
    )


def batch_setup_lines(log_dir: Path) -> list[str]:
    """sbatch lines before the task's step: where the task asks for its requeue."""
    folder = shlex.quote(str(log_dir / "requeue"))
    return [
        "# fada-batch: a task that must be requeued asks for it in this file; the lines after",
        "# the task's step requeue it here, on the host, where scontrol, munge and slurm.conf",
        "# are (the task may run in an image without a SLURM client).",
        f'export {REQUEST_ENV}={folder}/"${{SLURM_JOB_ID}}.json"',
        f'mkdir -p {folder} && rm -f "${REQUEST_ENV}"',
        "# the job's end time, so that the task tells its time limit from a preemption",
        'fada_end="$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null)"',
        f'if [ -n "$fada_end" ] && fada_end="$(date -d "$fada_end" +%s 2>/dev/null)"; then export {END_ENV}="$fada_end"; fi',
    ]


def batch_teardown_lines(fada_batch_command: str) -> list[str]:
    """sbatch lines right after the task's step: requeue when it asked; on failure, say so in
    the task's log and summary (`<fada_batch_command> requeue-failed`) and fail the job.
    Otherwise the job ends with the step's exit status, as it would without these lines."""
    return [
        "fada_step_status=$?",
        f'if [ -e "${REQUEST_ENV}" ]; then',
        '    fada_job="${SLURM_ARRAY_JOB_ID:+${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}}"',
        '    fada_job="${fada_job:-$SLURM_JOB_ID}"',
        '    echo "[fada-batch] the task asked for a requeue: scontrol requeue $fada_job on $(hostname)"',
        '    if fada_out="$(scontrol requeue "$fada_job" 2>&1)"; then',
        f'        rm -f "${REQUEST_ENV}"',
        "    else",
        '        echo "[fada-batch] ERROR: scontrol requeue $fada_job failed: $fada_out" >&2',
        f'        {fada_batch_command} requeue-failed "${REQUEST_ENV}" --error "scontrol requeue $fada_job: $fada_out"',
        f'        rm -f "${REQUEST_ENV}"',
        "        exit 1",
        "    fi",
        "fi",
        'exit "$fada_step_status"',
    ]


__all__ = [
    "REQUEST_ENV",
    "STOP_REASONS",
    "RequeueError",
    "RequeueLimitError",
    "after_sbatch_stop",
    "batch_setup_lines",
    "batch_teardown_lines",
    "classify_signal",
    "record_host_failure",
    "record_stop",
    "request_requeue",
    "restart_count",
    "slurm_job_id",
]
