"""Collect a run: where each category stands, read from the files under the output root.

    result = collect(Path("outputs"), categories=["Abdomen", "Femur"], data_root=Path("data"))
    report.write_report(result.to_dict(), Path("outputs"))
    sys.exit(result.exit_code())

For every category it reads `blip2_{slug}/training_summary.json`, the latest checkpoint's
`trainer_state.json` (for categories that have not finished) and `eval/metrics.json` (when
evaluation has run). It never needs the submitting process or submitit's pickles, works on a
partial run, and changes nothing it reads. A summary that cannot be read is named in
`problems` and that category is reported as `unreadable`; it never stops the collection.

Category states (`CategoryResult.state`):

- `completed`: trained; the adapter is in `final_model/`.
- `running`: a live task trains it (it holds the category's lock, or SLURM runs its job).
- `queued`: its SLURM job waits in the queue (requeued after a time limit or preemption, or
  not started yet); it resumes from its last checkpoint when it runs.
- `incomplete`: stopped part-way, and whether a task will resume it is unknown (no SLURM to
  ask, and the run may not be over); the next run resumes from its last checkpoint.
- `stopped`: its task ended without completing it and nothing will resume it: after the run
  (`finished`), when SLURM says its job has ended, or when the summary says it gave up
  (`stop_reason`). Needs attention: `resume` holds the command that resumes it.
- `failed`: training raised; `error_tail` holds the end of the error.
- `invalid_data`: the data checks blocked training (counts as failed).
- `awaiting_labels`: the category has no labels yet (from its summary; or, when it never
  ran, from the job's labels as `LabelSource` reads them: no sheet of its own, or no row
  in the master workbook).
- `not_started`: asked for, but there is no summary.
- `unreadable`: the summary is corrupt or has an unknown status (named in `problems`).
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from fada_batch.data.categories import (
    DEFAULT_TABLE,
    DEFAULT_WORKBOOK,
    LABELS_DIR,
    Category,
    CategoryTable,
    build_table,
    find_sheet,
)
from fada_batch.data.problems import has_errors
from fada_batch.data.workbook import Workbook, read_workbook, resolve_labels_form
from fada_batch.data.workbook_cache import CACHE_DIRNAME
from fada_batch.fsutil import STALE_AFTER_S, JobProbe, judge_holder
from fada_batch.run.questions import compare_questions, question_rows
from fada_batch.run.report import fmt_duration
from fada_batch.text import plural
from fada_batch.training.card import CARD_FILE
from fada_batch.training.outputs import EXPORTS_FILE, FINAL_MODEL, JOINT
from fada_batch.training.summary import STATUSES, SUMMARY_FILE, now_iso, read_summary
from fada_batch.training.tblog import TENSORBOARD_DIR, event_files

SCHEMA_VERSION = 1
EVAL_FILE = Path("eval") / "metrics.json"
LOCK_FILE = ".lock"
SUBMISSION_FILE = "submission.json"  # written by `submit` in the output root
JOB_FILE = "job.yaml"  # the resolved job, written by `submit` next to it
CONFIG_FILE = "config.yaml"  # the resolved job, written by each task in its folder
MODELS = ("adapter", "base", "majority")  # the blocks of eval/metrics.json
GENERATION_KEYS = ("num_beams", "no_repeat_ngram_size", "repetition_penalty", "max_new_tokens")
# `stop_reason`s after which no requeue follows (the task gave up or was stopped by hand)
FINAL_STOP_REASONS = ("requeue_limit", "requeue_failed", "user")
ERROR_TAIL_LINES = 8
ERROR_TAIL_CHARS = 1200

STATES = (
    "completed",
    "running",
    "queued",
    "incomplete",
    "stopped",
    "failed",
    "invalid_data",
    "awaiting_labels",
    "not_started",
    "unreadable",
)
FAILED_STATES = ("failed", "invalid_data")
ALIVE_STATES = ("running", "queued")  # a task will still write to it

EXIT_OK = 0
EXIT_FAILED = 1


@dataclass
class CategoryResult:
    """What the collector knows about one category (plain values, ready for JSON)."""

    category: str
    folder: str
    state: str  # one of STATES
    display: str = ""  # the name people see (data.category_table display), "" = `category`
    detail: str = ""  # one line for people: why this state, what to do
    requested: bool = True  # the job asked for it
    summary_status: str | None = None  # the raw `status` of the summary
    last_step: int | None = None  # optimizer steps done (summary or latest checkpoint)
    total_steps: int | None = None
    last_checkpoint: str | None = None
    images: dict[str, int] | None = None  # per split: train/val/test
    qa_pairs: dict[str, int] | None = None
    epochs: int | None = None
    epochs_completed: int | None = None
    steps: int | None = None
    wall_time_s: float | None = None  # model load to save, all attempts together (requeues, resumes)
    train_time_s: float | None = None  # time in the training loop, all attempts together
    samples_per_s: float | None = None
    peak_memory_gb: float | None = None
    peak_memory_kind: str | None = None  # gpu_max_allocated or process_max_rss
    device_type: str | None = None  # cuda / cpu
    device_name: str | None = None
    final_train_loss: float | None = None
    final_val_loss: float | None = None
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, training loss]
    val_loss: list[list[float]] = field(default_factory=list)  # [epoch, validation loss]
    val_loss_steps: list[list[float]] = field(default_factory=list)  # [step, validation loss]
    eval: dict[str, dict[str, dict[str, float]]] | None = None  # model -> question -> metric
    eval_source: str | None = None
    # eval/metrics.json "questions": each question on its own terms, 95% intervals, McNemar tests
    questions: dict[str, Any] | None = None
    generation: dict[str, Any] | None = None  # the generation settings of the evaluation
    normalization: dict[str, Any] | None = None  # data.normalize counts (unique answers, fixes)
    empty_answers_skipped: int | None = None
    data_warnings: dict[str, int] | None = None  # rows skipped, by problem code
    demo_data: bool | None = None  # the data are the synthetic demo's (`fada-batch demo`)
    tiny_model: bool | None = None  # the base model is the tiny test model (`tools.tiny`)
    base_model: str | None = None  # the base model's name or path
    requeues: int | None = None
    resumes: int | None = None
    stop_reason: str | None = None  # why the task stopped (time_limit, preempted, requeue_limit, ...)
    message: str | None = None  # the summary's word on it (how to resume)
    job_state: str | None = None  # what SLURM says of its job, e.g. "TIMEOUT (sacct)"
    resume: str | None = None  # the command that resumes (or reruns) it, for the unfinished
    slurm_job_id: str | None = None
    slurm_array_job_id: str | None = None
    slurm_array_task_id: str | None = None
    adapter_path: str | None = None
    adapter_bytes: int | None = None
    tensorboard_dir: str | None = None  # its TensorBoard event files (written as it trains)
    card_path: str | None = None  # the model card: README.md in final_model/
    exports: list[dict[str, Any]] = field(default_factory=list)  # `fada-batch export`s that exist
    # the joint adapter's row (train.mode=joint): its scores on each category's held-out images,
    # category -> model -> overall metrics; None for a category's own adapter
    joint_scores: dict[str, dict[str, dict[str, float]]] | None = None
    error: str | None = None  # the whole error text, as the summary holds it
    error_tail: str | None = None  # its last lines
    start_time: str | None = None
    end_time: str | None = None
    updated: str | None = None

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES

    def needs_attention(self, *, finished: bool = False) -> bool:
        """Failed, or ended without completing (after the run: also unreadable)."""
        return self.failed or self.state == "stopped" or (finished and self.state == "unreadable")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CollectResult:
    """A whole run: one `CategoryResult` per category, totals, problems and a comparison."""

    output_root: str
    generated: str
    categories: list[CategoryResult]
    totals: dict[str, Any]
    problems: list[str]  # unreadable files and other things a person should look at
    categories_from: str  # where the list of categories came from
    compare: dict[str, Any] | None = None
    finished: bool = False  # collected after the tasks ended

    def exit_code(self) -> int:
        """EXIT_FAILED when a category that was asked for failed or ended unfinished."""
        return exit_code(self)

    def attention(self) -> list[CategoryResult]:
        """The requested categories that need a person: failed, or ended unfinished."""
        return [c for c in self.categories if c.requested and c.needs_attention(finished=self.finished)]

    def text(self) -> str:
        """A short plain-text table for a terminal or a job log."""
        from fada_batch.run.report import text_table

        return text_table(self.to_dict())

    def write_report(self, out_dir: Path | None = None) -> dict[str, Path]:
        """Write report.md/.html, results.csv and collected.json (default: the output root)."""
        from fada_batch.run.report import write_report

        return write_report(self.to_dict(), Path(out_dir or self.output_root))

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "generated": self.generated,
            "output_root": self.output_root,
            "categories_from": self.categories_from,
            "finished": self.finished,
            "totals": self.totals,
            "problems": self.problems,
            "categories": [c.to_dict() for c in self.categories],
            # one row per category and question: the figures of results.csv
            "per_question": question_rows([c.to_dict() for c in self.categories]),
            "compare": self.compare,
        }


def exit_code(result: CollectResult) -> int:
    """Non-zero when a category the job asked for failed or ended without completing (so a
    dependency chain can react, and a collector job after the array shows FAILED).

    Categories running, queued, waiting for labels, or incomplete and not known to be over
    do not count; after the run (`finished`) an unreadable summary does.
    """
    return EXIT_FAILED if result.attention() else EXIT_OK


# ------------------------------------------------------------------------- coercion helpers
# A summary is user-reachable input: every field is checked for its type, so a hand-edited or
# truncated file gives a blank cell, never a crash.


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def _int(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return int(v)
    return None


def _str(v: Any) -> str | None:
    if isinstance(v, str):
        return v
    if isinstance(v, int) and not isinstance(v, bool):
        return str(v)  # SLURM ids written as numbers
    return None


def _dict(v: Any) -> dict[str, Any]:
    return v if isinstance(v, dict) else {}


def _pairs(v: Any) -> list[list[float]]:
    """[[x, y], ...] with finite numbers only (anything else dropped)."""
    out: list[list[float]] = []
    if not isinstance(v, list):
        return out
    for item in v:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            x, y = _num(item[0]), _num(item[1])
            if x is not None and y is not None:
                out.append([x, y])
    return out


def _splits(v: Any) -> dict[str, int] | None:
    d = _dict(v)
    out = {k: n for k in ("train", "val", "test") if (n := _int(d.get(k))) is not None}
    return out or None


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        return None
    return t if t.tzinfo is not None else t.astimezone()


def _tail(text: str, lines: int = ERROR_TAIL_LINES, chars: int = ERROR_TAIL_CHARS) -> str:
    kept = "\n".join(text.rstrip().splitlines()[-lines:])
    return kept if len(kept) <= chars else "…" + kept[-chars:]


def _error_line(error: str | None, limit: int = 300) -> str:
    """One line for the table: the error's last line (a traceback ends with the exception)."""
    lines = [ln.strip().removeprefix("- ") for ln in (error or "").splitlines() if ln.strip()]
    if not lines:
        return "no error recorded"
    return lines[-1] if len(lines[-1]) <= limit else lines[-1][: limit - 1] + "…"


# ------------------------------------------------------------------------------- one category


def _summary_steps_per_epoch(s: dict[str, Any], qa_train: int | None) -> int | None:
    """Optimizer steps per epoch of a finished run: recorded, or QA pairs / samples per step."""
    if (spe := _int(s.get("steps_per_epoch"))) and spe > 0:
        return spe
    per_step = _int(s.get("effective_batch_size"))
    if per_step is None and (bs := _int(s.get("batch_size"))) and (acc := _int(s.get("grad_accum_steps"))):
        per_step = bs * acc
    if not qa_train or not per_step or per_step < 1:
        return None
    return math.ceil(qa_train / per_step)


def _state_steps_per_epoch(state: Any) -> int | None:
    """Optimizer steps per epoch from a checkpoint: the steps of its finished epochs."""
    epoch, step = _int(getattr(state, "epoch", None)), _int(getattr(state, "global_step", None))
    in_epoch = _int(getattr(state, "step_in_epoch", 0)) or 0
    if not epoch or epoch < 1 or step is None or (step - in_epoch) % epoch:
        return None
    return (step - in_epoch) // epoch or None


def _val_at_steps(val_loss: list[list[float]], spe: int | None, last_step: int | None) -> list[list[float]]:
    """Place each epoch's validation loss at the step where that epoch ended."""
    if spe is None:
        return []
    out = []
    for epoch, loss in val_loss:
        step = epoch * spe
        if last_step is not None:
            step = min(step, last_step)
        out.append([float(step), loss])
    return out


def _fill_from_summary(r: CategoryResult, s: dict[str, Any]) -> None:
    r.summary_status = _str(s.get("status"))
    r.images = _splits(s.get("images"))
    r.qa_pairs = _splits(s.get("qa_pairs"))
    r.epochs = _int(s.get("epochs"))
    r.epochs_completed = _int(s.get("epochs_completed"))
    r.steps = _int(s.get("steps"))
    r.total_steps = _int(s.get("total_steps"))
    r.wall_time_s = _num(s.get("total_wall_time_s"))  # older summaries: the last attempt only
    if r.wall_time_s is None:
        r.wall_time_s = _num(s.get("wall_time_s"))
    r.train_time_s = _num(s.get("train_time_s"))
    r.samples_per_s = _num(s.get("samples_per_s"))
    mem = _dict(s.get("peak_memory"))
    r.peak_memory_gb = _num(mem.get("gb"))
    r.peak_memory_kind = _str(mem.get("kind"))
    dev = _dict(s.get("device"))
    r.device_type = _str(dev.get("type"))
    r.device_name = _str(dev.get("name"))
    r.final_train_loss = _num(s.get("final_train_loss"))
    r.final_val_loss = _num(s.get("final_val_loss"))
    r.loss_curve = _pairs(s.get("loss_curve"))
    r.val_loss = _pairs(s.get("val_loss"))
    r.requeues = _int(s.get("requeues"))
    r.resumes = _int(s.get("resumes"))
    r.stop_reason = _str(s.get("stop_reason"))
    r.message = _str(s.get("message"))
    slurm = _dict(s.get("slurm"))
    r.slurm_job_id = _str(slurm.get("job_id"))
    r.slurm_array_job_id = _str(slurm.get("array_job_id"))
    r.slurm_array_task_id = _str(slurm.get("array_task_id"))
    r.adapter_path = _str(s.get("adapter_path"))
    r.adapter_bytes = _int(s.get("adapter_bytes"))
    r.error = _str(s.get("error"))
    r.error_tail = _tail(r.error) if r.error else None
    r.start_time = _str(s.get("first_start_time")) or _str(s.get("start_time"))  # the first attempt's
    r.end_time = _str(s.get("end_time"))
    r.updated = _str(s.get("updated"))
    r.last_step = r.steps
    r.last_checkpoint = _str(s.get("last_checkpoint")) or _str(s.get("checkpoint"))
    spe = _summary_steps_per_epoch(s, (r.qa_pairs or {}).get("train"))
    r.val_loss_steps = _pairs(s.get("val_loss_steps")) or _val_at_steps(r.val_loss, spe, r.steps)
    r.normalization = _dict(s.get("normalization")) or None
    r.empty_answers_skipped = _int(s.get("empty_answers_skipped"))
    r.data_warnings = {
        k: n for k, v in _dict(s.get("warnings")).items() if (n := _int(v)) is not None
    } or None
    synthetic = _dict(s.get("synthetic"))
    r.demo_data = synthetic.get("demo_data") if isinstance(synthetic.get("demo_data"), bool) else None
    r.tiny_model = synthetic.get("tiny_model") if isinstance(synthetic.get("tiny_model"), bool) else None
    r.base_model = _str(s.get("base_model"))


def _fill_from_checkpoint(r: CategoryResult, folder: Path, problems: list[str]) -> None:
    """Progress of an unfinished category from its latest complete checkpoint."""
    from fada_batch.training.checkpoint import find_latest, read_state

    latest = find_latest(folder)
    if latest is None:
        return
    try:
        state = read_state(latest)
    except (OSError, ValueError, TypeError) as e:
        problems.append(f"{latest / 'trainer_state.json'} cannot be read ({e}); progress not shown")
        return
    r.last_checkpoint = str(latest)
    r.last_step = _int(state.global_step)
    r.epochs_completed = _int(state.epoch)
    if r.train_time_s is None:
        r.train_time_s = _num(state.train_time_s)
    if r.resumes is None:
        r.resumes = _int(state.resumes)
    if not r.loss_curve:
        r.loss_curve = _pairs(state.loss_curve)
    if not r.val_loss:
        r.val_loss = _pairs(state.val_loss)
    if r.final_train_loss is None and (epochs := _pairs(state.epoch_train_loss)):
        r.final_train_loss = epochs[-1][1]
    if r.final_val_loss is None and r.val_loss:
        r.final_val_loss = r.val_loss[-1][1]
    r.val_loss_steps = _val_at_steps(r.val_loss, _state_steps_per_epoch(state), r.last_step)


def _last_activity(folder: Path) -> float | None:
    """The newest modification time among the lock, the summary and the checkpoints."""
    times = []
    for p in [folder / LOCK_FILE, folder / SUMMARY_FILE, *folder.glob("checkpoint-*")]:
        with contextlib.suppress(OSError):
            times.append(p.stat().st_mtime)
    return max(times) if times else None


def task_alive(
    folder: Path, *, now: float | None = None, job_probe: JobProbe | None = None, finished: bool = False
) -> tuple[bool, str]:
    """Whether a live task holds `folder/.lock`, and why the collector thinks so.

    `fsutil.judge_holder` decides, as the lock does, with the folder's last write as the
    holder's age (it writes checkpoints and its summary while it runs): the holder's SLURM job
    as `job_probe` reports it, its pid on this host, else nothing written for STALE_AFTER_S.
    After the run (`finished`) only SLURM's word that its job runs makes a holder alive (a pid
    that lives then was reused).
    """
    now = time.time() if now is None else now
    lock = folder / LOCK_FILE
    try:
        text = lock.read_text()
    except FileNotFoundError:
        return False, "no task holds the lock"
    except OSError as e:
        return False, f"the lock {lock} cannot be read ({e.strerror})"
    try:
        holder = _dict(json.loads(text or "{}"))
    except ValueError:
        holder = {}
    last = _last_activity(folder)
    age = now - last if last is not None else math.inf
    verdict = judge_holder(holder, age_s=age, job_probe=job_probe, stale_after_s=STALE_AFTER_S)
    alive = verdict.alive and (not finished or verdict.basis == "job")
    return alive, f"lock holder ({_holder_name(holder)}): {verdict.why}"


def _holder_name(holder: dict[str, Any]) -> str:
    job = _str(holder.get("slurm_job_id"))
    return f"pid {_int(holder.get('pid'))} on {holder.get('host')}" + (f", SLURM job {job}" if job else "")


def _read_eval(folder: Path, summary: dict[str, Any] | None, problems: list[str]) -> tuple[Any, str | None]:
    """Evaluation metrics: `eval/metrics.json` when present, else the summary's `eval` block.

    Returns ({model: {question: {metric: value}}}, where they came from), or (None, None).
    """
    path = folder / EVAL_FILE
    raw: Any = None
    source = None
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            source = str(path)
        except (OSError, ValueError) as e:
            problems.append(f"{path} is not valid JSON ({e}); its metrics are left out")
            raw = None
        if raw is not None and not isinstance(raw, dict):
            problems.append(f"{path} does not hold a JSON object; its metrics are left out")
            raw = None
    if raw is None and summary is not None and isinstance(summary.get("eval"), dict):
        raw = _summary_eval(summary["eval"])
        source = str(folder / SUMMARY_FILE)
    if raw is None:
        return None, None
    out: dict[str, dict[str, dict[str, float]]] = {}
    for model in MODELS:
        questions = _dict(raw.get(model))
        block = {}
        for q in sorted(questions, key=_question_order):
            metrics = {k: n for k, v in _dict(questions[q]).items() if (n := _num(v)) is not None}
            if metrics:
                block[str(q)] = metrics
        if block:
            out[model] = block
    return (out or None), (source if out else None)


def _read_joint_scores(folder: Path) -> dict[str, dict[str, dict[str, float]]] | None:
    """The joint adapter's overall scores per category (eval/metrics.json "categories", as
    `evaluation.evaluate.evaluate_joint_loaded` writes them): category -> model -> metric."""
    raw: Any = None
    with contextlib.suppress(OSError, ValueError):
        raw = json.loads((folder / EVAL_FILE).read_text())
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, block in _dict(_dict(raw).get("categories")).items():
        models = {}
        for model, key in (
            ("adapter", "overall"),
            ("base", "base_overall"),
            ("majority", "majority_overall"),
        ):
            metrics = {k: n for k, v in _dict(_dict(block).get(key)).items() if (n := _num(v)) is not None}
            if metrics:
                models[model] = metrics
        if models:
            out[str(name)] = models
    return out or None


def _read_questions(folder: Path, summary: dict[str, Any] | None) -> tuple[Any, Any]:
    """(metrics.json's per-question block, its generation settings), each None when absent.

    Unreadable files are named once, by `_read_eval`; here they only leave the block out.
    """
    raw: Any = None
    with contextlib.suppress(OSError, ValueError):
        raw = json.loads((folder / EVAL_FILE).read_text())
    raw = raw if isinstance(raw, dict) else {}
    questions = raw.get("questions") if isinstance(raw.get("questions"), dict) else None
    settings = _dict(raw.get("settings")) or _dict(_dict(_dict(summary).get("eval")).get("generation"))
    generation = {k: settings[k] for k in GENERATION_KEYS if k in settings} or None
    return questions, generation


def _summary_eval(block: dict[str, Any]) -> dict[str, Any]:
    """The summary's `eval` block in metrics.json's shape.

    Accepts metrics.json's own shape, `{"overall": ...}` (the adapter's), and the one
    `train` writes: `overall`, `base_overall`, `majority_overall` and
    `per_question: {"Q1": {"adapter": ..., "base": ..., "majority": ...}}`.
    """
    if any(m in block for m in MODELS):
        return block
    out: dict[str, dict[str, Any]] = {m: {} for m in MODELS}
    for q, per_model in _dict(block.get("per_question")).items():
        for m in MODELS:
            if isinstance(_dict(per_model).get(m), dict):
                out[m][q] = per_model[m]
    for m, key in (("adapter", "overall"), ("base", "base_overall"), ("majority", "majority_overall")):
        if isinstance(block.get(key), dict):
            out[m]["overall"] = block[key]
    return out


def _question_order(q: str) -> tuple[int, int, str]:
    """Q1 < Q2 < ... < Q10 < anything else < overall."""
    if q == "overall":
        return (2, 0, q)
    if q[:1] == "Q" and q[1:].isdigit():
        return (0, int(q[1:]), q)
    return (1, 0, q)


@dataclass
class RunInfo:
    """What the output root says of how the run was submitted (`submission.json`, `job.yaml`)."""

    executor: str | None = None  # slurm / local / debug
    tasks: dict[str, str] = field(default_factory=dict)  # category -> its SLURM job ("12_3")
    job_file: Path | None = None  # the resolved job that was submitted


def read_run_info(output_root: Path, problems: list[str]) -> RunInfo:
    """`submission.json` and `job.yaml` of the output root (an empty RunInfo without them)."""
    info = RunInfo()
    if (output_root / JOB_FILE).is_file():
        info.job_file = output_root / JOB_FILE
    path = output_root / SUBMISSION_FILE
    if not path.is_file():
        return info
    try:
        record = _dict(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        problems.append(f"{path} cannot be read ({e}); task ids and executor not used")
        return info
    info.executor = _str(record.get("executor"))
    info.tasks = {str(k): v for k, v in _dict(record.get("tasks")).items() if isinstance(v, str)}
    return info


STOP_REASONS = {
    "time_limit": "reached its time limit",
    "preempted": "was preempted",
    "requeue_limit": "gave up: requeued cluster.max_requeues times",
    "requeue_failed": "could not be requeued",
    "user": "was stopped by a user",
}


def resume_command(category: Category, folder: Path, output_root: Path, run: RunInfo, *, slurm: bool) -> str:
    """The command that resumes (or reruns) one category the way the run was launched.

    The job is the resolved config the task wrote in its folder (every override applied,
    absolute paths), else the one `submit` wrote in the output root, else a sibling's.
    """
    job = folder / CONFIG_FILE
    if not job.is_file():
        siblings = sorted(output_root.glob(f"blip2_*/{CONFIG_FILE}"))
        job = run.job_file or (siblings[0] if siblings else Path("JOB.yaml"))
    on_slurm = run.executor == "slurm" if run.executor else slurm
    if category.name == JOINT:  # the joint adapter: the job itself says train.mode=joint
        return f"fada-batch {'submit' if on_slurm else 'train'} --job {shlex.quote(str(job))}"
    if on_slurm:
        return f"fada-batch submit --job {shlex.quote(str(job))} --categories {shlex.quote(category.name)}"
    return f"fada-batch train --job {shlex.quote(str(job))} --category {shlex.quote(category.name)}"


def _read(r: CategoryResult, folder: Path, problems: list[str]) -> tuple[dict[str, Any] | None, bool]:
    """The category's summary (None when there is none), and False when it is unreadable."""
    summary_path = folder / SUMMARY_FILE
    try:
        summary = read_summary(folder)
    except (ValueError, OSError) as e:
        named = str(e) if str(summary_path) in str(e) else f"{summary_path}: {e}"
        problems.append(f"{named}; {r.category} is skipped")
        r.state, r.detail = "unreadable", f"{SUMMARY_FILE} cannot be read: {e}"
        return None, False
    status = None if summary is None else summary.get("status")
    if summary is not None and status not in STATUSES:
        msg = f"unknown status {status!r} (expected one of {', '.join(STATUSES)})"
        problems.append(f"{summary_path}: {msg}; {r.category} is skipped")
        r.state, r.detail = "unreadable", f"{SUMMARY_FILE}: {msg}"
        return None, False
    if summary is not None:
        _fill_from_summary(r, summary)
        named = summary.get("category")
        if named is not None and named != r.category:
            problems.append(f"{summary_path} is for category {named!r}, found in {r.category}'s folder")
    return summary, True


def _find_files(r: CategoryResult, folder: Path) -> None:
    """The category's event files folder, model card and exports, where they exist."""
    if event_files(folder / TENSORBOARD_DIR):
        r.tensorboard_dir = str(folder / TENSORBOARD_DIR)
    if (folder / FINAL_MODEL / CARD_FILE).is_file():
        r.card_path = str(folder / FINAL_MODEL / CARD_FILE)
    try:
        entries = json.loads((folder / EXPORTS_FILE).read_text())
    except (OSError, ValueError):
        return
    for e in entries if isinstance(entries, list) else []:
        path = _str(e.get("path")) if isinstance(e, dict) else None
        if path and Path(path).is_dir():  # an export deleted since is not linked
            r.exports.append({"path": path, "merged": bool(e.get("merged")), "dtype": _str(e.get("dtype"))})


def _status_now(folder: Path) -> str | None:
    """The summary's status as it is on disk now (None when it cannot be read)."""
    try:
        summary = read_summary(folder)
    except Exception:  # unreadable now: the caller keeps what it read before
        return None
    return summary.get("status") if isinstance(summary, dict) else None


def _cache_dir(output_root: Path) -> Path | None:
    """The run's workbook cache, when the output root is there."""
    return output_root / CACHE_DIRNAME if output_root.is_dir() else None


@dataclass
class LabelSource:
    """Where the job reads its labels (`data.root`, `data.labels`, `data.workbook`): tells a
    category that never ran "awaiting labels" (no sheet, or no row in the master workbook)
    from "not started". Categories come from the job's table (`DataConfig.table`), with its
    aliases. The workbook is read once, for every category `expect` named, on the first
    question (from the run's cache when the output root holds it)."""

    data_root: Path
    labels: str = "auto"  # auto | per_category | workbook, as data.labels
    workbook: str = DEFAULT_WORKBOOK  # data.workbook
    cache_dir: Path | None = None  # the run's workbook cache (workbook_cache.CACHE_DIRNAME)
    _books: dict[str, Workbook | None] = field(default_factory=dict, repr=False)  # per category
    _expected: list[Category] = field(default_factory=list, repr=False)

    def expect(self, categories: list[Category]) -> None:
        """The categories that will be asked about: one read of the workbook serves them all."""
        self._expected = list(categories)

    @classmethod
    def from_data(cls, data: dict[str, Any], output_root: Path | None = None) -> LabelSource | None:
        """From a job's `data` section as a mapping (None without a `root`)."""
        if not isinstance(data.get("root"), str):
            return None
        cache = _cache_dir(output_root) if output_root is not None else None
        return cls(
            Path(data["root"]),
            labels=str(data.get("labels") or "auto"),
            workbook=str(data.get("workbook") or DEFAULT_WORKBOOK),
            cache_dir=cache,
        )

    def labelled(self, category: Category) -> tuple[bool | None, str]:
        """(whether `category` has labels, where they were looked for): None when that cannot
        be told here (no label folder, a missing or broken workbook)."""
        path = resolve_labels_form(self.data_root, self.labels, self.workbook)
        if path is None:
            folder = self.data_root / LABELS_DIR
            if not folder.is_dir():
                return None, str(folder)
            return find_sheet(self.data_root, category) is not None, f"no label sheet in {folder}"
        if not path.is_file():
            return None, str(path)
        if category.name not in self._books:
            cats = [*(c for c in self._expected if c.name not in self._books), category]
            book = read_workbook(path, list(dict.fromkeys(cats)), cache_dir=self.cache_dir)
            for c in cats:
                self._books[c.name] = None if has_errors(book.problems) else book
        book = self._books[category.name]
        if book is None:
            return None, str(path)
        return book.sheet_for(category) is not None, f"no rows in the master workbook {path}"


def collect_category(
    category: Category,
    folder: Path,
    *,
    requested: bool,
    labels: LabelSource | None,
    problems: list[str],
    finished: bool = False,
    now: float | None = None,
    job_probe: JobProbe | None = None,
    run: RunInfo | None = None,
) -> CategoryResult:
    """Read one category's folder and decide its state (never raises on bad files).

    Args:
        finished: the run's tasks are over (a category that has not completed is `stopped`).
        job_probe: asks SLURM about the category's job (`slurmjobs.job_phase`); None: never.
        run: the output root's submission record (task ids, executor, job file).
    """
    run = run or RunInfo()
    r = CategoryResult(
        category=category.name,
        folder=str(folder),
        state="not_started",
        requested=requested,
        display=category.display if category.display != category.name else "",
    )
    summary, readable = _read(r, folder, problems)
    if not readable:
        return r
    r.eval, r.eval_source = _read_eval(folder, summary, problems)
    r.joint_scores = _read_joint_scores(folder) if category.name == JOINT else None
    _find_files(r, folder)
    r.questions, r.generation = _read_questions(folder, summary)
    status = summary.get("status") if summary is not None else None
    if summary is None:
        has, where = labels.labelled(category) if labels is not None else (None, "")
        if has is False:
            r.state = "awaiting_labels"
            r.detail = where
            return r
        _fill_from_checkpoint(r, folder, problems)
        if r.last_checkpoint:
            said = f"no summary, but checkpoints up to step {r.last_step}"
        else:
            said = f"no {SUMMARY_FILE} in {folder}" if folder.is_dir() else f"no folder {folder}"
        job = run.tasks.get(category.name)
        _unfinished(r, said, job, finished=finished, job_probe=job_probe)
    elif status == "completed":
        _completed(r, summary, problems)
    elif status in ("running", "interrupted"):
        if not _running_or_interrupted(
            r, folder, status, problems, finished=finished, now=now, job_probe=job_probe
        ):
            return collect_category(
                category,
                folder,
                requested=requested,
                labels=labels,
                problems=problems,
                finished=finished,
                now=now,
                job_probe=job_probe,
                run=run,
            )
    elif status in FAILED_STATES:
        r.state = status
        _fill_from_checkpoint(r, folder, problems)
        reason = STOP_REASONS.get(r.stop_reason or "", r.stop_reason)
        r.detail = "; ".join(x for x in (reason, _error_line(r.error), r.message) if x)
    elif status == "awaiting_labels":
        r.state = "awaiting_labels"
        r.detail = r.message or "no label sheet yet"
        if labels is not None and labels.labelled(category)[0]:
            r.detail += "; labels are there now: rerun to train"
    if r.state in ("incomplete", "stopped", "failed"):
        r.resume = resume_command(category, folder, folder.parent, run, slurm=r.slurm_job_id is not None)
    return r


def _running_or_interrupted(
    r: CategoryResult,
    folder: Path,
    status: str,
    problems: list[str],
    *,
    finished: bool,
    now: float | None,
    job_probe: JobProbe | None,
) -> bool:
    """The state of a category whose summary says running or interrupted: running while a
    live task holds its lock, else stopped, queued or incomplete (`_unfinished`).

    Returns False when the task finished between the reading of its summary and of its lock
    (it writes its last summary, then lets the lock go): the caller reads the folder again.
    """
    _fill_from_checkpoint(r, folder, problems)
    where = (
        f"step {r.last_step} ({Path(r.last_checkpoint).name})"
        if r.last_checkpoint and r.last_step is not None
        else "no checkpoint yet"
    )
    if status == "interrupted":
        reason = STOP_REASONS.get(r.stop_reason or "", r.stop_reason)
        said = f"interrupted at {where}" + (f": {reason}" if reason else "")
    else:
        alive, why = task_alive(folder, now=now, job_probe=job_probe, finished=finished)
        if not alive and _status_now(folder) != "running":
            return False
        if alive:
            r.state, r.detail = "running", f"running at {where}: {why}"
            return True
        if finished:
            said = f"still marked running after its task ended (killed before it could record its state); last {where}"
        else:
            said = f"stopped at {where}: {why}"
    _unfinished(r, said, r.slurm_job_id, finished=finished, job_probe=job_probe)
    return True


def _completed(r: CategoryResult, summary: dict[str, Any], problems: list[str]) -> None:
    r.state = "completed"
    epochs = r.epochs_completed or r.epochs
    done = [plural(r.steps, "step") if r.steps is not None else "", plural(epochs, "epoch") if epochs else ""]
    r.detail = ", ".join(x for x in done if x) or "completed"
    if r.wall_time_s is not None:
        r.detail += f" in {fmt_duration(r.wall_time_s)}"
    shipped = _dict(summary.get("shipped"))
    if shipped.get("step") is not None:  # which step's adapter is final_model/, and why
        r.detail += f"; ships step {shipped['step']}: {shipped.get('reason', shipped.get('kind'))}"
    adapter = Path(r.adapter_path) if r.adapter_path else None
    if adapter is None or not (adapter / "adapter_model.safetensors").is_file():
        r.detail += f"; adapter missing at {r.adapter_path}"
        problems.append(f"{r.category}: completed but the adapter is missing at {r.adapter_path}")


def _unfinished(
    r: CategoryResult, said: str, job: str | None, *, finished: bool, job_probe: JobProbe | None
) -> None:
    """The state of a category that has not completed and has no live lock holder: running or
    queued (SLURM says so of its job), stopped (its task ended: SLURM says so, the run is over,
    or the summary's stop reason is final), else incomplete or not started (unknown).

    Args:
        said: what its files say, e.g. "interrupted at step 3 (checkpoint-3)".
        job: its SLURM job id (the summary's, or the submission's task id), if known.
    """
    seen = job_probe(job) if job and job_probe is not None else None
    phase = seen.phase if seen is not None else None
    r.job_state = seen.detail if phase is not None else None
    started = r.summary_status is not None or r.last_checkpoint is not None
    on_slurm = f"SLURM job {job} is {r.job_state}"
    if r.stop_reason in FINAL_STOP_REASONS:
        r.state, end = "stopped", "nothing will resume it"
    elif phase == "running":
        r.state, end = "running", on_slurm
    elif phase == "pending":
        r.state, end = "queued", f"{on_slurm}: it resumes from its last checkpoint when it runs"
    elif phase == "ended" or finished:
        r.state = "stopped"
        end = (f"{on_slurm}; " if phase else "its task has ended; ") + "nothing will resume it"
        if not started:
            said = f"never started ({said})"
    elif not started:
        r.state, end = "not_started", ""
    else:
        r.state, end = "incomplete", "resumes when requeued or rerun"
    r.detail = "; ".join(x for x in (said, end, r.message or "") if x)


# --------------------------------------------------------------------------------- the run


def table_from_data(data: dict[str, Any]) -> CategoryTable:
    """The job's category table from its `data` section as a mapping (a task's config.yaml);
    the defaults when it names none or it cannot be built."""
    entries = {str(k): _dict(v) for k, v in _dict(data.get("category_table")).items()}
    aliases = {
        str(k): [str(a) for a in v]
        for k, v in _dict(data.get("category_aliases")).items()
        if isinstance(v, list)
    }
    try:
        table, problems = build_table(entries, aliases)
    except Exception:  # a hand-edited config.yaml: the defaults still read the folders
        return DEFAULT_TABLE
    return DEFAULT_TABLE if problems else table


def _infer_job(
    output_root: Path, problems: list[str]
) -> tuple[list[str], LabelSource | None, str, CategoryTable]:
    """Categories, where the labels are and the job's category table, from the `config.yaml`
    each task writes next to its results; the labels only when every file names the same
    data root."""
    from fada_batch.config import safe_load_yaml

    sections: list[dict[str, Any]] = []
    for cfg_path in sorted(output_root.glob("blip2_*/config.yaml")):
        try:
            sections.append(_dict(_dict(safe_load_yaml(cfg_path.read_text())).get("data")))
        except Exception as e:  # any YAML error: this file just does not help
            problems.append(f"{cfg_path} cannot be read ({type(e).__name__}); ignored")
    table = table_from_data(sections[0]) if sections else DEFAULT_TABLE
    names: list[str] = []
    for data in sections:
        listed = data.get("categories")
        for n in listed if isinstance(listed, list) else []:
            with contextlib.suppress(Exception):
                name = table.get(str(n)).name
                if name not in names:
                    names.append(name)
    found = [c.name for c in table if (output_root / c.output_dirname).is_dir()]
    if names:
        order = [c.name for c in table if c.name in set(names) | set(found)]
        source = "the config.yaml files in the category folders"
    else:
        order = found
        source = "the category folders found"
    rooted = [d for d in sections if isinstance(d.get("root"), str)]
    same_root = len({d["root"] for d in rooted}) == 1
    labels = LabelSource.from_data(rooted[0], output_root) if same_root else None
    return order, labels, source, table


def _totals(cats: list[CategoryResult], now: datetime) -> dict[str, Any]:
    counts = {s: sum(1 for c in cats if c.state == s) for s in STATES}
    by_device: dict[str, dict[str, Any]] = {}
    for c in cats:
        if c.train_time_s is None and c.wall_time_s is None:
            continue
        d = by_device.setdefault(
            c.device_type or "unknown", {"categories": 0, "train_time_s": None, "wall_time_s": None}
        )
        d["categories"] += 1
        for key in ("train_time_s", "wall_time_s"):
            value = getattr(c, key)
            if value is not None:
                d[key] = round((d[key] or 0.0) + value, 2)
    # Only tasks that started count towards the run's span; a task stopped without an end
    # time ended, at the latest, when its summary was last written.
    started = [c for c in cats if _parse_time(c.start_time)]
    starts = [t for c in started if (t := _parse_time(c.start_time))]
    ends = [t for c in started if (t := _parse_time(c.end_time or c.updated))]
    still_running = any(c.state in ALIVE_STATES for c in cats)
    first = min(starts) if starts else None
    last = now if still_running else (max(ends) if ends else None)
    run_wall = (last - first).total_seconds() if first and last and last >= first else None
    return {
        "categories": len(cats),
        "requested": sum(1 for c in cats if c.requested),
        "done": counts["completed"],
        "failed": sum(counts[s] for s in FAILED_STATES),
        "stopped": counts["stopped"],  # ended unfinished: needs a rerun
        "waiting": counts["running"]
        + counts["queued"]
        + counts["incomplete"]
        + counts["not_started"]
        + counts["awaiting_labels"],
        "by_state": counts,
        "gpu_train_time_s": by_device.get("cuda", {}).get("train_time_s") or 0.0,
        "gpu_wall_time_s": by_device.get("cuda", {}).get("wall_time_s") or 0.0,
        "cpu_train_time_s": by_device.get("cpu", {}).get("train_time_s") or 0.0,
        "cpu_wall_time_s": by_device.get("cpu", {}).get("wall_time_s") or 0.0,
        "by_device": by_device,
        "run_start": first.isoformat() if first else None,
        "run_end": last.isoformat() if last and not still_running else None,
        "run_wall_time_s": round(run_wall, 2) if run_wall is not None else None,
        "still_running": still_running,
    }


def collect(
    output_root: Path,
    *,
    categories: list[str] | None = None,
    data_root: Path | None = None,
    labels: LabelSource | None = None,
    table: CategoryTable | None = None,
    compare: Path | None = None,
    finished: bool = False,
    job_probe: JobProbe | None = None,
    joint: bool = False,
) -> CollectResult:
    """Read every category's results under `output_root`, and the joint adapter's
    (`blip2_joint/`) when it is there.

    Args:
        output_root: the job's `output.root` (holds `blip2_{slug}/`).
        categories: the categories the job asked for (names or aliases). None: those named by
            the `config.yaml` files under the root, else every category folder found.
        data_root: the job's `data.root`; tells "awaiting labels" from "not started" for a
            category that never ran (per-category sheets, or the default master workbook).
            None: taken from the folders' config.yaml when they agree.
        labels: where the job reads its labels (`LabelSource.from_data(cfg.data)`): the
            master workbook too; wins over `data_root`.
        table: the job's categories (`DataConfig.table`: its own categories, aliases and
            display names). None: from the folders' config.yaml, else the 14 defaults.
        compare: another output root to compare with (its categories inferred).
        finished: the tasks are known to be over (a collector that runs after the array):
            a category that has not completed is `stopped` (needs attention, exit non-zero).
        job_probe: asks SLURM about a task's job (`slurmjobs.job_phase`): running, queued
            or ended. None: judge from the files (and the lock holder's pid and age) alone.
        joint: the job trains one joint adapter (train.mode=joint): its row is the one asked
            for, and a category's own adapter is shown beside it only where its folder exists.

    Returns:
        A CollectResult; `exit_code()` is non-zero when a requested category failed or
        stopped unfinished.

    Raises:
        FileNotFoundError: `output_root` (or `compare`) is not a folder (a missing root is
            allowed when `categories` is given: every category is then not started).
        UnknownCategoryError: a name in `categories` is not a category.
    """
    output_root = Path(output_root)
    problems: list[str] = _check_root(output_root, has_categories=categories is not None)
    names, labels, table, source = _the_job(output_root, categories, data_root, labels, table, problems)
    now = time.time()
    run = read_run_info(output_root, problems)
    results = _rows(
        output_root,
        names,
        table,
        labels,
        problems,
        joint=joint,
        finished=finished,
        now=now,
        job_probe=job_probe,
        run=run,
    )
    problems += _folders_left_out(output_root, names, table)
    result = CollectResult(
        output_root=str(output_root),
        generated=now_iso(),
        categories=results,
        totals=_totals(results, datetime.fromtimestamp(now).astimezone()),
        problems=problems,
        categories_from=source,
        finished=finished,
    )
    if compare is not None:
        other = collect(Path(compare), categories=None, finished=finished)
        result.compare = compare_runs(result, other)
    return result


def _rows(
    output_root: Path,
    names: list[str],
    table: CategoryTable,
    labels: LabelSource | None,
    problems: list[str],
    *,
    joint: bool,
    finished: bool,
    now: float,
    job_probe: JobProbe | None,
    run: RunInfo,
) -> list[CategoryResult]:
    """One result per category asked for, then the joint adapter's when the job trains one or
    its folder is there. A joint job asks for the joint adapter only: a category's own adapter
    is shown beside it where it has a folder."""
    results = [
        collect_category(
            table.get(n),
            output_root / table.get(n).output_dirname,
            requested=not joint,
            labels=labels,
            problems=problems,
            finished=finished,
            now=now,
            job_probe=job_probe,
            run=run,
        )
        for n in names
        if not joint or (output_root / table.get(n).output_dirname).is_dir()
    ]
    if joint or (output_root / f"blip2_{JOINT}").is_dir():
        results.append(
            collect_category(
                joint_row_category([table.get(n).display_name for n in names]),
                output_root / f"blip2_{JOINT}",
                requested=joint,
                labels=None,
                problems=problems,
                finished=finished,
                now=now,
                job_probe=job_probe,
                run=run,
            )
        )
    return results


def joint_row_category(shown: list[str]) -> Category:
    """The joint adapter's row (`blip2_joint/`), named `joint`, shown as "Joint (A, B)"."""
    return Category(JOINT, folder="", sheet="", display=f"Joint ({', '.join(shown)})")


def _the_job(
    output_root: Path,
    categories: list[str] | None,
    data_root: Path | None,
    labels: LabelSource | None,
    table: CategoryTable | None,
    problems: list[str],
) -> tuple[list[str], LabelSource | None, CategoryTable, str]:
    """The categories to collect (canonical names), where their labels are, the job's table,
    and where the names came from: `collect`'s arguments, else the tasks' config.yaml."""
    if labels is None and data_root is not None:
        labels = LabelSource(Path(data_root), cache_dir=_cache_dir(output_root))
    if categories is None:
        names, inferred, source, found_table = _infer_job(output_root, problems)
        labels, table = labels or inferred, table or found_table
    else:
        table = table or DEFAULT_TABLE
        names, source = list(dict.fromkeys(table.get(n).name for n in categories)), "the job"
    if labels is not None:
        labels.expect([table.get(n) for n in names])
    return names, labels, table, source


def _check_root(output_root: Path, *, has_categories: bool) -> list[str]:
    """The problems of a missing output root, or raises when there is nothing to go on.

    With the job's categories, a root that no task has created yet is a run where nothing
    started; without them there is nothing to go on.
    """
    if output_root.is_dir():
        return []
    if not has_categories or output_root.exists():
        raise FileNotFoundError(
            f"output root {output_root} is not a folder: pass the job's output.root "
            "(--job JOB or --outputs DIR)"
        )
    return [f"output root {output_root} does not exist yet: no task has started"]


def _folders_left_out(output_root: Path, names: list[str], table: CategoryTable) -> list[str]:
    """A problem for each `blip2_*` folder that is no category, or not one asked for."""
    problems = []
    for p in sorted(output_root.glob("blip2_*")):
        if not p.is_dir() or p.name == f"blip2_{JOINT}":  # the joint adapter: a row of its own
            continue
        cat = table.for_folder(p.name)
        if cat is None:
            problems.append(f"{p} does not belong to any category; ignored")
        elif cat.name not in names:
            problems.append(f"{p} ({cat.name}) is not one of the categories asked for; left out")
    return problems


# ------------------------------------------------------------------------------- comparison

COMPARE_FIELDS = ("final_train_loss", "final_val_loss", "train_time_s", "wall_time_s", "samples_per_s")


def _overall(c: CategoryResult, model: str = "adapter") -> dict[str, float]:
    return ((c.eval or {}).get(model) or {}).get("overall") or {}


def _change(new: float | None, old: float | None) -> dict[str, float | None]:
    if new is None or old is None:
        return {"this": new, "other": old, "change": None, "change_pct": None}
    pct = (new - old) / abs(old) * 100 if old else None
    return {
        "this": new,
        "other": old,
        "change": round(new - old, 6),
        "change_pct": round(pct, 1) if pct is not None else None,
    }


def compare_runs(this: CollectResult, other: CollectResult) -> dict[str, Any]:
    """Side by side: per category, this run's value, the other's and the change (this - other)."""
    mine = {c.category: c for c in this.categories}
    theirs = {c.category: c for c in other.categories}
    seen = list(dict.fromkeys([*mine, *theirs]))
    defaults = DEFAULT_TABLE.names  # the defaults in their order, then the jobs' own
    order = sorted(seen, key=lambda n: (defaults.index(n) if n in defaults else len(defaults), seen.index(n)))
    rows = []
    for name in order:
        a, b = mine.get(name), theirs.get(name)
        row: dict[str, Any] = {
            "category": name,
            "state": a.state if a else None,
            "other_state": b.state if b else None,
        }
        for f in COMPARE_FIELDS:
            row[f] = _change(getattr(a, f) if a else None, getattr(b, f) if b else None)
        metrics = sorted(set(_overall(a) if a else {}) | set(_overall(b) if b else {}))
        for m in metrics:
            if m == "n":
                continue
            row[f"eval_{m}"] = _change(_overall(a).get(m) if a else None, _overall(b).get(m) if b else None)
        rows.append(row)
    t, o = this.totals, other.totals
    totals = {
        k: _change(_num(t.get(k)), _num(o.get(k)))
        for k in ("done", "failed", "gpu_train_time_s", "cpu_train_time_s", "run_wall_time_s")
    }
    return {
        "other_root": other.output_root,
        "other_generated": other.generated,
        "rows": rows,
        "totals": totals,
        # per category and question: the adapter's exact match and main figure, and the change
        "questions": compare_questions(
            question_rows([c.to_dict() for c in this.categories]),
            question_rows([c.to_dict() for c in other.categories]),
        ),
    }
