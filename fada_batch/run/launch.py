"""The launcher: where `train` runs (SLURM array, workstation, in-process) and when `collect` runs.

This is the only module that imports submitit. It never touches tensors: each array task is a
`TrainTask` (a `submitit.helpers.Checkpointable`) that runs one category's task
(`run.task.run_category`: train, then evaluate). On the time-limit warning signal or a
preemption the task asks training to stop at the next optimizer step, training saves a
checkpoint, submitit pickles the task's
`checkpoint()` and the task is requeued: by the batch script on the host when the task asks
for it (the task may run in an image without a SLURM client), else with `scontrol` (see
`fada_batch.run.requeue`). The requeued task resumes from the latest checkpoint it finds in the
category's output folder at run time (nothing about checkpoints is baked into the pickle).

    fada-batch submit --job job/full.yaml [--categories A,B] [--dry-run] [--executor local]
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import submitit
from submitit.core.job_environment import SignalHandler
from submitit.slurm.slurm import SlurmJobEnvironment

from fada_batch.config import JobConfig, config_from_dict, dump_yaml, parallel_layout
from fada_batch.data.validate import NoDataError, Preflight, preflight
from fada_batch.fsutil import atomic_write_json, atomic_write_text, ensure_writable
from fada_batch.run import requeue
from fada_batch.run.collect import JOB_FILE
from fada_batch.run.task import code_origin, match_threads_to_allocation, run_category
from fada_batch.text import plural
from fada_batch.training import distributed
from fada_batch.training.recipe import StopRequested
from fada_batch.training.summary import SUMMARY_FILE, now_iso, read_summary, write_summary

log = logging.getLogger(__name__)

SUBMISSION_FILE = "submission.json"


class SubmitError(RuntimeError):
    """sbatch refused a job; the message has its reason and what to check."""


class TrainTask(submitit.helpers.Checkpointable):
    """One array task: train one category, checkpointing and requeueing on the warning signal.

    Holds no model and no paths beyond the config: a requeue gets a fresh TrainTask with the
    same (config, category) and the training finds its own latest checkpoint.
    """

    def __init__(self) -> None:
        self._stop = False
        self._signum: int | None = None
        self._started = time.time()

    def __call__(self, job: dict[str, Any], category: str, force: bool = False) -> dict[str, Any]:
        from fada_batch.logsetup import setup_logging

        self._started = time.time()
        setup_logging()  # a fresh process: none of the CLI's logging set-up is here
        print(f"[fada-batch] {code_origin()}", flush=True)
        cfg = config_from_dict(job, source="submitted job")
        match_threads_to_allocation()
        ranks = start_data_parallel(cfg)
        handler = _install_stop_handler(self)
        try:
            return run_category(
                cfg,
                category,
                force=force,
                should_stop=lambda: self._should_stop(cfg.cluster.signal_delay_s),
                requeues=requeue.restart_count(),
            )
        except StopRequested as e:
            if not ranks.is_main:  # rank 0 records the stop and asks for the requeue
                return {"category": category, "status": "interrupted", "rank": ranks.rank}
            if self._signum is None and ranks.parallel:
                # another rank was told (its signal or its clock came first): the stop is agreed
                # at every step, and only rank 0 asks for the requeue, as for the warning
                self._signum = signal.SIGUSR2
                print("[fada-batch] another rank was asked to stop: requeueing the job", flush=True)
            self._after_stop(cfg, category, e.checkpoint, handler)
            raise
        finally:
            distributed.shutdown()

    def _should_stop(self, signal_delay_s: float) -> bool:
        """Polled after every optimizer step: a stop signal came, or the job's own clock says
        the time limit is `signal_delay_s` away.

        The clock (the job's end time, which the batch script read with squeue) stands in for
        SLURM's warning signal, which can be lost on its way into a container (podman forwards
        each signal through a short-lived child that the next signal of the job step can
        kill) or come late (slurmctld looks at limits every 30 s). It is then handled as the
        warning: checkpoint, then requeue.
        """
        if self._stop:
            return True
        left = requeue.seconds_left()
        if left is not None and left <= signal_delay_s:
            self._stop = True
            self._signum = signal.SIGUSR2
            print(
                f"[fada-batch] {left:.0f} s left before the job's time limit "
                f"(cluster.signal_delay_s={signal_delay_s:g}): checkpointing at the next step",
                flush=True,
            )
        return self._stop

    def checkpoint(self, job: dict[str, Any], category: str, force: bool = False) -> Any:
        """What submitit resubmits: a fresh task, never `force` (that would discard progress)."""
        return submitit.helpers.DelayedSubmission(TrainTask(), job, category, False)

    def _after_stop(self, cfg: JobConfig, category: str, checkpoint: Path | None, handler: Any) -> None:
        """The checkpoint is on disk: record why the task stopped and have it requeued.

        After the warning signal, submitit's own handler pickles `checkpoint()`'s
        DelayedSubmission and requeues, through `requeue.request_requeue` (the batch script on
        the host when the task asks it, else scontrol). After SIGTERM, SLURM itself decides.

        Raises:
            requeue.RequeueLimitError: `cluster.max_requeues` reached (summary: requeue_limit).
            requeue.RequeueError: the requeue could not happen (summary: failed, requeue_failed).
            SystemExit: requeued (submitit's exit after a requeue).
        """
        from fada_batch.training.outputs import category_output_dir, task_category

        cat = task_category(cfg, category)
        out_dir = category_output_dir(cfg, cat)
        resume = requeue.resume_hint(cfg.name, cat.name, checkpoint)
        if self._signum == signal.SIGTERM:
            requeue.record_stop(
                out_dir,
                status="interrupted",
                stop_reason="preempted",
                message=requeue.terminated_message(resume),
                checkpoint=checkpoint,
            )
            return
        owner = getattr(handler, "__self__", None)
        if self._signum is None or handler is None:
            return  # not under submitit (debug executor): nothing to requeue
        if not isinstance(owner, SignalHandler) or not isinstance(owner.env, SlurmJobEnvironment):
            handler(self._signum, None)  # the local executor: its own checkpoint-and-restart
            return
        reason = requeue.classify_signal(
            self._signum,
            warning_signal=signal.SIGUSR2,
            left_s=requeue.seconds_left(),
            elapsed_s=time.time() - self._started,
            time_limit_s=cfg.cluster.time_min * 60,
            signal_delay_s=cfg.cluster.signal_delay_s,
        )
        done, limit = requeue.restart_count(), cfg.cluster.max_requeues
        if done >= limit:
            msg = requeue.limit_message(reason, requeues=done, max_requeues=limit, resume=resume)
            requeue.record_stop(
                out_dir, status="interrupted", stop_reason="requeue_limit", message=msg, checkpoint=checkpoint
            )
            print(f"[fada-batch] ERROR: {category}: {msg}", file=sys.stderr, flush=True)
            raise requeue.RequeueLimitError(f"{category}: {msg}")

        def requeue_now(_countdown: int) -> None:  # submitit's JobEnvironment._requeue hook
            how = requeue.request_requeue(out_dir, category, checkpoint, reason)
            msg = requeue.requeue_message(reason, how=how, requeues=done, max_requeues=limit, resume=resume)
            requeue.record_stop(
                out_dir, status="interrupted", stop_reason=reason, message=msg, checkpoint=checkpoint
            )
            print(f"[fada-batch] {category}: {msg}", flush=True)

        owner.env._requeue = requeue_now
        try:
            handler(self._signum, None)  # pickles checkpoint(), calls requeue_now, exits
        except Exception as e:  # SystemExit (requeued) passes through
            why = f"{type(e).__name__}: {e}" if not isinstance(e, requeue.RequeueError) else str(e)
            requeue.record_stop(
                out_dir,
                status="failed",
                stop_reason="requeue_failed",
                message=requeue.failed_message(why, resume),
                checkpoint=checkpoint,
                error=why,
            )
            print(f"[fada-batch] ERROR: {category}: {why}", file=sys.stderr, flush=True)
            raise requeue.RequeueError(f"{category}: {why}") from e


def start_data_parallel(cfg: JobConfig) -> distributed.Ranks:
    """A task of a multi-process SLURM job (cluster.nodes / gpus_per_node / tasks_per_node):
    start torch.distributed from SLURM's environment (submitit's `TorchDistributedEnvironment`:
    the job's first node as MASTER_ADDR, a port drawn from the job id, SLURM_PROCID as rank)
    and return this process's ranks; `SINGLE` for a one-process job (nothing started)."""
    try:
        env = submitit.JobEnvironment()
        n_tasks = env.num_tasks
    except RuntimeError:  # not under submitit (called in-process)
        return distributed.SINGLE
    if n_tasks <= 1:
        return distributed.SINGLE
    _one_gpu_per_process(env.local_rank)
    dist_env = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    print(
        f"[fada-batch] data parallel: rank {dist_env.rank} of {dist_env.world_size} on "
        f"{os.uname().nodename} (master {dist_env.master_addr}:{dist_env.master_port})",
        flush=True,
    )
    return distributed.init_from_env(backend=cfg.cluster.dist_backend, timeout_s=cfg.cluster.dist_timeout_s)


def _one_gpu_per_process(local_rank: int) -> None:
    """Where SLURM shows every task of a node all of its GPUs, keep this task's own one (by
    local rank) visible, before CUDA starts; a task already bound to one GPU keeps it."""
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if len(visible) > 1:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible[local_rank % len(visible)]


def _install_stop_handler(task: TrainTask) -> Any:
    """Replace submitit's USR2 and SIGTERM handlers by one that only flags a stop; return
    submitit's USR2 handler.

    submitit's USR2 handler would requeue and exit at once, mid-step, and it ignores SIGTERM
    (SLURM's preemption or `scontrol requeue`, KillWait seconds before SIGKILL); training
    instead saves a checkpoint at the next optimizer step, then `_after_stop` goes on.
    """
    original = signal.getsignal(signal.SIGUSR2)
    if not callable(original):  # not under submitit (debug executor): nothing to requeue
        return None

    def flag(signum: int, _frame: Any) -> None:
        task._stop = True
        if task._signum is None:
            task._signum = signum
        name = signal.Signals(signum).name
        print(f"[fada-batch] caught {name}: checkpointing at the next step", flush=True)

    try:
        signal.signal(signal.SIGUSR2, flag)
        signal.signal(signal.SIGTERM, flag)
    except ValueError:  # not the main thread
        return None
    return original


def run_collect(job: dict[str, Any], categories: list[str]) -> dict[str, Any]:
    """The collector step: write the report for the run; raise when a category failed or
    ended without completing.

    Raises:
        RuntimeError: naming those categories and how to resume them (so the dependent job
            shows FAILED).
    """
    from fada_batch.logsetup import setup_logging
    from fada_batch.run.collect import LabelSource, collect
    from fada_batch.run.slurmjobs import job_phase

    setup_logging()
    print(f"[fada-batch] {code_origin()}", flush=True)
    cfg = config_from_dict(job, source="submitted job")
    # runs after the array ended (afterany): a category that has not completed is stopped
    result = collect(
        Path(cfg.output.root),
        categories=categories,
        labels=LabelSource.from_data(asdict(cfg.data), Path(cfg.output.root)),
        table=cfg.data.table(),
        finished=True,
        job_probe=job_phase,
        joint=cfg.train.mode == "joint",
    )
    written = result.write_report()
    print(result.text(), flush=True)
    print(f"report: {written.get('md')}", flush=True)
    if result.exit_code() != 0:
        names = "; ".join(
            f"{c.category} ({c.state}" + (f", resume: {c.resume})" if c.resume else ")")
            for c in result.attention()
        )
        raise RuntimeError(f"categories need attention: {names}; see {written.get('md')}")
    return {"report": str(Path(cfg.output.root) / "report.md")}


@dataclass
class Plan:
    """What `submit` will do: which categories go, in which order, and which are left out."""

    submit: list[str]
    sizes: dict[str, int]
    awaiting: list[str]
    blocked: dict[str, list[str]]  # category -> problem messages
    requested: list[str]
    executor: str
    log_dir: Path
    output_root: Path
    slurm: dict[str, Any] = field(default_factory=dict)
    completed: list[str] = field(default_factory=list)  # under this training config: not run
    resumes: dict[str, str] = field(default_factory=dict)  # category -> checkpoint it resumes from

    def leave_out_completed(self, found: dict[str, str], completed_mark: str) -> None:
        """Take categories completed under this training config out of the tasks to run (their
        task would only skip them) and note which checkpoint each other one resumes from.

        Args:
            found: `outputs.check_fingerprints`' answer; `completed_mark` is its COMPLETED.
        """
        self.completed = [c for c in self.submit if found.get(c) == completed_mark]
        self.resumes = {c: v for c, v in found.items() if v != completed_mark and c in self.submit}
        self.submit = [c for c in self.submit if c not in self.completed]

    def describe(self) -> str:
        lines = []
        if self.awaiting:
            lines.append(f"awaiting labels (skipped): {', '.join(self.awaiting)}")
        for name, problems in self.blocked.items():
            lines.append(f"blocked by data problems (not submitted): {name}")
            lines.extend(f"    {p}" for p in problems[:10])
        if self.completed:
            lines.append(
                f"completed under this training config (skipped; --force trains again): {', '.join(self.completed)}"
            )
        order = ", ".join(
            f"{c} ({plural(self.sizes[c], 'image')}"
            + (f", resumes from {self.resumes[c]})" if c in self.resumes else ")")
            for c in self.submit
        )
        if self.submit:
            lines.append(f"{plural(len(self.submit), 'task')} to run, in this order: {order}")
        else:
            lines.append(
                "no task to run" + (": every ready category has completed" if self.completed else "")
            )
        lines.append(f"executor: {self.executor}; logs: {self.log_dir}; outputs: {self.output_root}")
        if self.executor == "slurm":
            flags = " ".join(f"{k}={v}" for k, v in self.slurm.items() if v not in (None, {}, ""))
            lines.append(f"slurm: {flags}")
        return "\n".join(lines)


def make_plan(
    cfg: JobConfig,
    pf: Preflight,
    *,
    executor: str,
    smallest_first: bool = False,
) -> Plan:
    """Order the ready categories by size (largest first by default: shortest array wall time)."""
    cap = cfg.data.num_images  # what each task will train on (5 for a validation run)
    sizes = {
        d.category.name: min(d.stats.images_usable, cap) if cap else d.stats.images_usable for d in pf.results
    }
    ready = [d.category.name for d in pf.ready]
    ready.sort(key=lambda c: (sizes[c], c) if smallest_first else (-sizes[c], c))
    return Plan(
        submit=ready,
        sizes=sizes,
        awaiting=[d.category.name for d in pf.awaiting],
        blocked={d.category.name: [p.message for p in d.errors] for d in pf.blocked},
        requested=[d.category.name for d in pf.results],
        executor=executor,
        log_dir=log_dir(cfg),
        output_root=Path(cfg.output.root),
        slurm=slurm_parameters(cfg),
    )


def joint_description(cfg: JobConfig, plan: Plan) -> str:
    """What a joint run (train.mode=joint) will use: its categories and images, the prompt,
    the folder; or why it cannot start (a category awaiting labels or blocked)."""
    from fada_batch.training.outputs import joint_output_dir

    cats = plan.requested
    missing = plan.awaiting + list(plan.blocked)
    if missing:
        return (
            f"joint mode: cannot start: {', '.join(missing)} not ready (awaiting labels or "
            "blocked); a joint adapter trains on every category in data.categories. Leave them "
            "out (-p data.categories=[...]) or fix their data."
        )
    images = ", ".join(f"{c} {plural(plan.sizes[c], 'image')}" for c in cats)
    prompt = (
        "each prompt starts with the category's name (train.category_in_prompt)"
        if cfg.train.category_in_prompt
        else "prompts without the category (train.category_in_prompt=false)"
    )
    return (
        f"joint mode: ONE adapter on {plural(len(cats), 'category', 'categories')} ({images}; "
        f"{sum(plan.sizes[c] for c in cats)} in all), each split by image as on its own; {prompt}; "
        f"output: {joint_output_dir(cfg)}"
    )


def joint_plan(cfg: JobConfig, plan: Plan, *, chosen: bool, out: Any) -> Plan:
    """The plan of a joint run: one task, `outputs.JOINT`, for all of data.categories (said
    on `out`); `chosen`: submit was given --categories, which a joint run refuses.

    Raises:
        SubmitError: `chosen` (the joint adapter trains on data.categories; the fix).
        NoDataError: a requested category is awaiting labels or blocked (named, with the fix).
    """
    from fada_batch.training.outputs import JOINT

    if chosen:
        raise SubmitError(
            "--categories does not apply to train.mode=joint (one adapter on all of "
            "data.categories): choose them with -p 'data.categories=[A,B]'"
        )
    if plan.awaiting or plan.blocked:
        raise NoDataError(joint_description(cfg, plan))
    print(joint_description(cfg, plan), file=out, flush=True)
    plan.sizes[JOINT] = sum(plan.sizes[c] for c in plan.requested)
    plan.submit = [JOINT] if plan.submit else []
    return plan


def log_dir(cfg: JobConfig) -> Path:
    """Logs go to shared storage next to the outputs (never /tmp: other nodes can't see it)."""
    return Path(cfg.cluster.log_dir or Path(cfg.output.root) / "logs")


def slurm_parameters(cfg: JobConfig) -> dict[str, Any]:
    """submitit `update_parameters` for the training array, from the job's `cluster:` section."""
    c = cfg.cluster
    nodes, tasks, gpus = parallel_layout(c)
    params: dict[str, Any] = {
        "name": f"fada-{cfg.name}",
        "timeout_min": c.time_min,
        "slurm_partition": c.partition,
        "slurm_account": c.account,
        "slurm_qos": c.qos,
        "slurm_constraint": c.constraint,
        "nodes": nodes if nodes > 1 else None,
        "tasks_per_node": tasks if tasks > 1 else None,  # data parallel: one process per GPU
        "gpus_per_node": gpus or None,
        "cpus_per_task": c.cpus_per_task,
        "mem_gb": c.mem_gb,
        "slurm_array_parallelism": c.array_parallelism,
        "slurm_signal_delay_s": c.signal_delay_s,
        "slurm_additional_parameters": dict(c.extra_sbatch),
    }
    if nodes * tasks > 1:  # a rank that dies ends the step (the others would wait on it)
        params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
    return {k: v for k, v in params.items() if v is not None}


def _record_skipped(cfg: JobConfig, pf: Preflight) -> None:
    """Write summaries for categories that will not run, so the collector names them.

    Never overwrites a summary of a category that completed in an earlier run.
    """
    from fada_batch.data.categories import Category

    for d in pf.awaiting + pf.blocked:
        cat: Category = d.category
        out = Path(cfg.output.root) / cat.output_dirname
        try:
            prev = read_summary(out)
        except ValueError:
            prev = None
        if prev and prev.get("status") == "completed":
            continue
        status = "awaiting_labels" if d.status == "awaiting_labels" else "invalid_data"
        summary: dict[str, Any] = {"category": cat.name, "status": status, "output_dir": str(out)}
        if status == "invalid_data":
            summary["error"] = "\n".join(p.message for p in d.errors)
            summary["end_time"] = now_iso()
        else:
            summary["message"] = f"no label sheet (expected {d.expected_sheet})"
        write_summary(out, summary)


def _executor(cfg: JobConfig, kind: str, folder: Path) -> submitit.AutoExecutor:
    kwargs: dict[str, Any] = {}
    if kind == "slurm":
        kwargs["slurm_max_num_timeout"] = cfg.cluster.max_requeues
        if cfg.cluster.python:
            kwargs["slurm_python"] = cfg.cluster.python
    return submitit.AutoExecutor(folder=folder, cluster=kind, **kwargs)


def submit(
    cfg: JobConfig,
    *,
    categories: list[str] | None = None,
    executor: str = "slurm",
    dry_run: bool = False,
    smallest_first: bool = False,
    force: bool = False,
    out: Any = None,
) -> dict[str, Any]:
    """Pre-flight, then one task per ready category and a collector after them.

    `slurm`: an array job plus a collector job with `--dependency=afterany:<array>`; returns
    at once with the IDs. `local`: the same tasks as subprocesses, one after another, then the
    collector. `debug`: in this process. Writes `submission.json` in the output root.

    Raises:
        FingerprintMismatch: (without `force`) categories whose folders hold a completed adapter
            or checkpoints trained under another training config; nothing is submitted.
        NoDataError: no requested category is ready (no data at all, or none labelled).
        SlurmUnavailable: `slurm`, and SLURM cannot be reached from here (with the fix).
        SubmitError: sbatch refused the array or the collector.
    """
    out = out or sys.stdout
    ensure_writable(Path(cfg.output.root))
    pf = preflight(cfg, categories)
    if pf.no_data:
        raise NoDataError(pf.no_data)
    plan = make_plan(cfg, pf, executor=executor, smallest_first=smallest_first)
    if cfg.train.mode == "joint":  # one task trains one adapter on every requested category
        plan = joint_plan(cfg, plan, chosen=categories is not None, out=out)
    if not force:  # refuse now, not in each task: completed/checkpointed under another config
        from fada_batch.training.outputs import COMPLETED, check_fingerprints

        plan.leave_out_completed(check_fingerprints(cfg, plan.submit), COMPLETED)
    print(plan.describe(), file=out, flush=True)
    if dry_run:
        print("dry run: nothing submitted", file=out, flush=True)
        return {"dry_run": True, "plan": plan.submit, "completed": plan.completed}
    if (why := pf.nothing_ready()) is not None:
        raise NoDataError(f"{why}; nothing submitted")
    if executor == "slurm":
        from fada_batch.run.slurmjobs import check_reachable

        check_reachable()  # before anything is written: one line with the fix, no traceback
    _record_skipped(cfg, pf)
    # the resolved job, for the collector's resume commands of tasks that never started
    atomic_write_text(plan.output_root / JOB_FILE, dump_yaml(cfg))
    job = cfg.to_dict()
    record: dict[str, Any] = {
        "job_name": cfg.name,
        "submitted": now_iso(),
        "executor": executor,
        "categories": plan.submit,
        "completed_earlier": plan.completed,
        "awaiting_labels": plan.awaiting,
        "blocked": plan.blocked,
        "log_dir": str(plan.log_dir),
        "output_root": str(plan.output_root),
        "config_hash": cfg.config_hash(),
        "job_file": str(plan.output_root / JOB_FILE),
    }
    plan.log_dir.mkdir(parents=True, exist_ok=True)
    if executor == "slurm":
        try:
            record.update(_submit_slurm(cfg, plan, job, force=force))
        except submitit.core.utils.FailedJobError as e:
            lines = [ln for ln in str(e).splitlines() if ln.strip()]
            raise SubmitError(
                f"sbatch refused the job: {lines[-1] if lines else e}. Check the job's cluster: "
                "section (partition, account, qos, time_min, mem_gb) against the site's limits "
                "(`sinfo`, `sacctmgr show assoc user=$USER`), or run here with --executor local"
            ) from e
    else:
        record.update(_run_here(cfg, plan, job, executor, force=force, out=out))
    atomic_write_json(plan.output_root / SUBMISSION_FILE, record)
    print(f"submission record: {plan.output_root / SUBMISSION_FILE}", file=out, flush=True)
    return record


def requeue_script_lines(cfg: JobConfig, log_dir: Path) -> dict[str, list[str]]:
    """The array's batch-script lines around the task's step (submitit's setup/teardown):
    the task asks for its requeue, the batch script on the host requeues it (see
    `fada_batch.run.requeue`), with the task's own Python (`cluster.python`, an image's) to
    record in the summary a requeue that failed."""
    python = cfg.cluster.python or shlex.quote(sys.executable)
    return {
        "slurm_setup": requeue.batch_setup_lines(log_dir),
        "slurm_teardown": requeue.batch_teardown_lines(f"{python} -m fada_batch"),
    }


def _submit_slurm(cfg: JobConfig, plan: Plan, job: dict[str, Any], *, force: bool) -> dict[str, Any]:
    ex = _executor(cfg, "slurm", plan.log_dir)
    ex.update_parameters(**plan.slurm, **requeue_script_lines(cfg, plan.log_dir))
    array_id = None
    task_ids: dict[str, str] = {}
    if plan.submit:
        n = len(plan.submit)
        jobs = ex.map_array(TrainTask(), [job] * n, plan.submit, [force] * n)
        task_ids = {c: j.job_id for c, j in zip(plan.submit, jobs, strict=True)}
        array_id = jobs[0].job_id.split("_")[0]
    coll = _executor(cfg, "slurm", plan.log_dir)
    coll_params = {
        k: v
        for k, v in plan.slurm.items()
        if k not in ("gpus_per_node", "slurm_array_parallelism", "nodes", "tasks_per_node", "slurm_srun_args")
    }
    coll_params.update(
        name=f"fada-{cfg.name}-collect",
        timeout_min=cfg.cluster.collector_time_min,
        cpus_per_task=1,
        mem_gb=min(cfg.cluster.mem_gb, 8),
        slurm_additional_parameters={
            **dict(cfg.cluster.extra_sbatch),
            **({"dependency": f"afterany:{array_id}"} if array_id else {}),
        },
    )
    coll.update_parameters(**coll_params)
    collector = coll.submit(run_collect, job, plan.requested)
    print(
        f"array job {array_id} ({plural(len(plan.submit), 'task')}), collector job {collector.job_id} "
        f"(after the array ends)\nlogs: {plan.log_dir}\noutputs: {plan.output_root}/blip2_<category>/",
        flush=True,
    )
    return {"array_job_id": array_id, "tasks": task_ids, "collector_job_id": collector.job_id}


LOCAL_TIMEOUT_MIN = 60 * 24 * 30  # `--executor local`: a month, i.e. none


def local_parameters(cfg: JobConfig) -> dict[str, Any]:
    """submitit parameters of `--executor local` (a workstation's tasks, one after another).

    No time limit: cluster.time_min is SLURM's, and submitit's local executor would signal,
    checkpoint and restart a task at it (a few times at most), so a long category would lose
    time to restarts and could stop unfinished. The tasks see this process's GPUs.
    """
    return {"timeout_min": LOCAL_TIMEOUT_MIN, "name": f"fada-{cfg.name}", "local_setup": [_same_gpus_line()]}


def _same_gpus_line() -> str:
    """A shell line that gives a local task this process's GPUs.

    submitit's local executor sets CUDA_VISIBLE_DEVICES to the GPUs it is asked for, none by
    default: a workstation's tasks would not see its GPU. Asking for N GPUs would not do either
    (it numbers them 0..N-1, whatever this process was given), so the task gets this process's
    own setting back, or none when it has none.
    """
    v = os.environ.get("CUDA_VISIBLE_DEVICES")
    return "unset CUDA_VISIBLE_DEVICES" if v is None else f"export CUDA_VISIBLE_DEVICES={shlex.quote(v)}"


def _run_here(
    cfg: JobConfig, plan: Plan, job: dict[str, Any], kind: str, *, force: bool, out
) -> dict[str, Any]:
    """`local`/`debug`: tasks one after another (one GPU), then the collector."""
    ex = _executor(cfg, kind, plan.log_dir)
    if kind == "local":
        ex.update_parameters(**local_parameters(cfg))
    outcome: dict[str, str] = {}
    for name in plan.submit:
        t0 = time.time()
        j = ex.submit(TrainTask(), job, name, force)
        try:
            s = j.result()
            outcome[name] = s.get("status", "?")
        except Exception as e:  # a failed category must not stop the others
            outcome[name] = "failed"
            first = str(e).strip().splitlines()
            print(f"{name}: failed: {first[-1] if first else e}", file=out, flush=True)
        print(f"{name}: {outcome[name]} in {time.time() - t0:.1f} s", file=out, flush=True)
    from fada_batch.run.collect import LabelSource, collect

    labels = LabelSource.from_data(asdict(cfg.data), plan.output_root)
    result = collect(
        plan.output_root,
        categories=plan.requested,
        labels=labels,
        table=cfg.data.table(),
        finished=True,
        joint=cfg.train.mode == "joint",
    )
    written = result.write_report()
    print(result.text(), file=out, flush=True)
    print(f"report: {written.get('md')}", file=out, flush=True)
    return {"results": outcome, "collect_exit_code": result.exit_code()}


def sbatch_command(cfg_path: Path, n_tasks: int) -> str:
    """The plain-sbatch equivalent (see slurm/README.md)."""
    return f"sbatch --array=0-{n_tasks - 1} slurm/train_array.sbatch {shlex.quote(str(cfg_path))}"


__all__ = ["SUMMARY_FILE", "Plan", "TrainTask", "make_plan", "run_collect", "submit"]
