"""Train ONE category: label sheet -> split -> LoRA training -> `final_model/` + summary.

    summary = train_category(cfg, "Abdomen")
    summary = train_joint(cfg)      # train.mode=joint: one adapter on all of data.categories

Setup, train, save, clean up, top to bottom: `_setup` (model, LoRA, tokens, optimizer),
`_resume`, then `_loop` over `_train_epoch` (each step `_optimizer_step`, the step itself in
`training.step`), `_validate` and `_checkpoint`, and at the end `_ship` (which adapter becomes
`final_model/`) and `_finish` (save it, complete the summary). Running it again resumes from
the latest complete checkpoint in the category's output folder (found at run time), and a
completed category is skipped unless `force=True`; both only under the same training
fingerprint (`training.outputs`), else `FingerprintMismatch` says which keys differ. The
adapter that ships is the step with the lowest validation loss (`train.final_model: best`)
or the last one.

Training knows neither evaluation nor SLURM: the task (`run.task`) passes `after_save` to
evaluate the adapter in memory, `job_probe` to ask the scheduler about a lock's holder, and a
launcher that wants a checkpoint-and-stop passes `should_stop`, polled after every step.

Data parallel (`training.distributed`, started by the launcher): every rank runs this recipe
on its shard of each step; rank 0 alone takes the lock, readies the folder and writes, the
others follow its word (`_follow`) and its checkpoints. One process runs it as it always did.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from fada_batch.config import JobConfig, dump_yaml, training_fingerprint
from fada_batch.data.categories import DEMO_DATA_MARKER, TINY_MODEL_MARKER, Category
from fada_batch.data.dataset import has_labels
from fada_batch.data.samples import (
    CategorySamples,
    DataError,
    prepare_data,
    prepare_joint_data,
    workbook_cache_dir,
)
from fada_batch.fsutil import (
    JobProbe,
    atomic_dir,
    atomic_write_text,
    category_lock,
    ensure_writable,
    remove_dir,
    remove_stale_tmp,
    touch,
)
from fada_batch.killpoints import reached
from fada_batch.text import plural
from fada_batch.training import checkpoint as ckpt
from fada_batch.training.card import CARD_FILE, hub_base_model, render_card
from fada_batch.training.collate import Encoded, Encoder, answer_length_stats
from fada_batch.training.distributed import Ranks, current
from fada_batch.training.features import FeatureSource
from fada_batch.training.model import (
    LoadedModel,
    apply_lora_section,
    eos_token_id,
    load_base_model,
    trainable_parameters,
)
from fada_batch.training.outputs import (
    CONFIG_FILE,
    FINAL_MARKER,
    FINAL_MODEL,
    category_output_dir,
    check_checkpoint,
    completed_summary,
    completed_under,
    fingerprint_mismatch,
    joint_category,
)
from fada_batch.training.progress import Progress
from fada_batch.training.step import (
    accumulate_step,
    epoch_steps,
    evaluate_loss_sum,
    get_lr,
    run_with_oom_backoff,
    set_train_mode,
)
from fada_batch.training.summary import (
    device_info,
    library_versions,
    now_iso,
    peak_memory,
    read_summary,
    slurm_ids,
    write_summary,
)
from fada_batch.training.tblog import TENSORBOARD_DIR, EventLog

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinalModel:
    """The adapter just saved as `final_model/`, still in memory: what `after_save` is given."""

    cfg: JobConfig
    loaded: LoadedModel  # the base model with the trained adapter on it
    samples: CategorySamples
    out_dir: Path
    eos_token_id: int
    max_new_tokens: int  # what the training answers need: the default generation limit


# Called once `final_model/` is saved; returns entries for the summary (e.g. {"eval": ...}).
AfterSave = Callable[[FinalModel], dict[str, Any]]


class StopRequested(Exception):
    """Training stopped on request after saving a checkpoint (time limit, preemption)."""

    def __init__(self, checkpoint: Path | None) -> None:
        super().__init__(f"stopped on request; checkpoint {checkpoint}")
        self.checkpoint = checkpoint


# --------------------------------------------------------------------------------- training


def save_final_model(
    out_dir: Path,
    loaded: LoadedModel,
    cfg: JobConfig,
    category: Category,
    questions: list[str],
    eos: int,
    *,
    record: dict[str, Any] | None = None,
    card: str | None = None,
) -> Path:
    """Write `final_model/` atomically: adapter, tokenizer + processor files, the model card
    (`card`, as README.md, in place of peft's template), then the marker.

    The marker (`fada_batch.json`) holds what `evaluate` and `ask` need to answer as training's
    own evaluation does: questions, prompt, EOS, how the base model was loaded (quantization and
    dtype), and `record` (the generation limit the training answers call for, which step
    shipped, the training fingerprint).
    """
    from fada_batch.fsutil import atomic_write_json

    target = out_dir / FINAL_MODEL
    with atomic_dir(target) as tmp:
        loaded.model.save_pretrained(str(tmp))
        loaded.processor.save_pretrained(str(tmp))
        (tmp / CONFIG_FILE).write_text(dump_yaml(cfg))
        if card is not None:
            (tmp / CARD_FILE).write_text(card)
        atomic_write_json(
            tmp / FINAL_MARKER,
            {
                "category": category.name,
                "base_model": cfg.model.name_or_path,
                "config_hash": cfg.config_hash(),
                "questions": questions,
                "prompt_template": cfg.data.prompt_template,
                "eos_token_id": eos,
                "quantization": loaded.quantization,  # as resolved (never "auto")
                "dtype": str(loaded.dtype).removeprefix("torch."),
                **(record or {}),
                "created": now_iso(),
            },
        )
    return target


def _base_summary(cfg: JobConfig, category: Category, out_dir: Path) -> dict[str, Any]:
    return {
        "category": category.name,
        "display": category.display_name,  # the job's display name (data.category_table)
        "output_dir": str(out_dir),
        "config_hash": cfg.config_hash(),
        # the config keys that change the adapter: a rerun skips this category only under the same
        "fingerprint": training_fingerprint(cfg),
        "seed": cfg.train.seed,
        "job_name": cfg.name,
        "base_model": cfg.model.name_or_path,
        # stand-ins, not the real thing: the report puts a banner over figures made with them
        "synthetic": {
            "tiny_model": (Path(cfg.model.name_or_path).expanduser() / TINY_MODEL_MARKER).is_file(),
            "demo_data": (Path(cfg.data.root).expanduser() / DEMO_DATA_MARKER).is_file(),
        },
        "slurm": slurm_ids(),
        "versions": library_versions(),
    }


def _data_counts(cs: CategorySamples) -> dict[str, Any]:
    if cs.parts:  # joint: the union's counts, and each category's own under "per_category"
        return {
            "images": {"train": len(cs.split.train), "val": len(cs.split.val), "test": len(cs.split.test)},
            "qa_pairs": {"train": len(cs.train), "val": len(cs.val), "test": len(cs.test)},
            "per_category": {name: _data_counts(part) for name, part in cs.parts.items()},
        }
    data = cs.data
    warnings = [p for p in data.problems if p.severity == "warning"]
    return {
        "images": {"train": len(cs.split.train), "val": len(cs.split.val), "test": len(cs.split.test)},
        "qa_pairs": {"train": len(cs.train), "val": len(cs.val), "test": len(cs.test)},
        "sheet": str(data.sheet_path) if data.sheet_path else None,
        "empty_answers_skipped": sum(data.stats.empty_answers_per_question),
        "empty_answers_per_question": data.stats.empty_answers_per_question,
        # rows skipped and why: counts by problem code, and the first messages in full
        "warnings": dict(Counter(p.code for p in warnings)),
        "warning_examples": [p.message for p in warnings[:20]],
        # data.normalize: unique answers per question before/after, cells changed, top fixes
        "normalization": data.normalization.to_dict() if data.normalization is not None else None,
    }


def train_category(
    cfg: JobConfig,
    category_name: str,
    *,
    force: bool = False,
    should_stop: Callable[[], bool] | None = None,
    requeues: int = 0,
    progress_stream: Any = None,
    job_probe: JobProbe | None = None,
    after_save: AfterSave | None = None,
) -> dict[str, Any]:
    """Train one category end to end and return its summary.

    A completed category is returned as it is (skipped) when it was trained under the same
    training fingerprint (`config.training_fingerprint`); checkpoints are resumed likewise.
    Nothing replaces a completed category's summary except a completed retraining (--force).

    Args:
        cfg: the resolved job config.
        category_name: canonical name or alias.
        force: retrain a completed category from scratch (old checkpoints removed once the
            data is known to be usable).
        should_stop: polled after each optimizer step; when it returns True a checkpoint is
            saved and StopRequested is raised (the launcher requeues).
        requeues: how many times this task was requeued so far (for the summary).
        job_probe: asks the scheduler whether the holder of a lock found in the folder still
            runs (`run.slurmjobs.job_phase`); None: judge by its pid and age alone.
        after_save: called with the adapter just saved, still in memory (`FinalModel`); the
            entries it returns go into the summary before it is written as completed (the
            task's evaluation after training, `run.task`).

    Raises:
        DataError: the data root does not exist (validate's message; nothing written),
            blocking data problems (summary status `invalid_data`), or the sheet of a completed
            category is gone.
        FingerprintMismatch: the folder holds a completed adapter or checkpoints trained under
            another training config (nothing written; the message lists the keys and the way on).
        StopRequested: stopped on request after a checkpoint (summary status `interrupted`).
        LockedError: another live task trains this category into the same folder.
    """
    category = cfg.data.category(category_name)
    _check_data_root(cfg, category)
    out_dir = ensure_writable(category_output_dir(cfg, category))
    summary = _base_summary(cfg, category, out_dir)

    d = cfg.data
    if not has_labels(
        Path(d.root),
        category,
        labels=d.labels,
        workbook=d.workbook,
        cache_dir=workbook_cache_dir(cfg),
    ):
        return _awaiting_labels(cfg, category, out_dir, summary)
    return _train_unless_completed(
        cfg,
        category,
        out_dir,
        summary,
        force=force,
        should_stop=should_stop,
        requeues=requeues,
        progress_stream=progress_stream,
        job_probe=job_probe,
        after_save=after_save,
    )


def train_joint(
    cfg: JobConfig,
    *,
    force: bool = False,
    should_stop: Callable[[], bool] | None = None,
    requeues: int = 0,
    progress_stream: Any = None,
    job_probe: JobProbe | None = None,
    after_save: AfterSave | None = None,
) -> dict[str, Any]:
    """Joint mode (train.mode=joint): ONE adapter trained on all of `data.categories` together,
    in `{output.root}/blip2_joint/`; each category split by image as its own run would be
    (`data.samples.prepare_joint_data`). The same recipe as `train_category` (resume, lock,
    skip when completed, best checkpoint, atomic writes), with the same arguments.

    Raises:
        DataError: the data root holds no data, or a category has no labels yet (a joint
            adapter is trained on every category it names).
        as `train_category` otherwise.
    """
    categories = [cfg.data.category(c) for c in cfg.data.categories]
    joint = joint_category(cfg)
    _check_data_root(cfg, *categories)
    out_dir = ensure_writable(category_output_dir(cfg, joint))
    summary = _base_summary(cfg, joint, out_dir)
    summary.update(mode="joint", categories=[c.name for c in categories])
    d = cfg.data
    cache = workbook_cache_dir(cfg)
    waiting = [
        c.name
        for c in categories
        if not has_labels(Path(d.root), c, labels=d.labels, workbook=d.workbook, cache_dir=cache)
    ]
    if waiting:
        raise DataError(
            f"joint training: no labels yet for {', '.join(waiting)}; a joint adapter is trained "
            "on every category in data.categories. Leave them out (-p data.categories=[...]) or "
            "add their labels."
        )
    return _train_unless_completed(
        cfg,
        joint,
        out_dir,
        summary,
        force=force,
        should_stop=should_stop,
        requeues=requeues,
        progress_stream=progress_stream,
        job_probe=job_probe,
        after_save=after_save,
        joint_of=categories,
    )


def _train_unless_completed(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    *,
    job_probe: JobProbe | None,
    **train: Any,
) -> dict[str, Any]:
    """The completed adapter's summary when it was trained under this config (unless
    `force`); else training under the folder's lock (`_train_locked`, with `train`)."""
    force = train["force"]
    if not force and (previous := completed_under(out_dir, category, cfg)) is not None:
        return previous
    ranks = current()
    if not ranks.is_main:  # data parallel: rank 0 alone takes the lock and readies the folder
        return _follow(cfg, category, out_dir, summary, ranks, **train)
    leader = _Leader(ranks)
    try:
        # a lock left by a requeued or ended SLURM job is taken over, whichever node wrote it
        with category_lock(out_dir, job_probe=job_probe):
            # another task may have completed it while this one waited for the lock
            if not force and (previous := completed_under(out_dir, category, cfg)) is not None:
                leader.tell("done")
                return previous
            return _train_locked(cfg, category, out_dir, summary, leader=leader, **train)
    except BaseException as e:
        leader.tell("error", f"{type(e).__name__}: {e}")
        raise


class _Leader:
    """Rank 0's word to the other ranks, said once per training: `go` (the folder is ready),
    `done` (completed meanwhile) or `error` (it failed before training; the detail says why)."""

    def __init__(self, ranks: Ranks) -> None:
        self.ranks, self.told = ranks, False

    def tell(self, verdict: str, detail: str = "") -> None:
        if self.ranks.parallel and not self.told:
            self.told = True
            self.ranks.from_main((verdict, detail))


def _follow(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    ranks: Ranks,
    *,
    force: bool,
    should_stop: Callable[[], bool] | None,
    requeues: int,
    progress_stream: Any,
    after_save: AfterSave | None,
    joint_of: list[Category] | None = None,
) -> dict[str, Any]:
    """A rank other than 0: wait for rank 0's folder (split.json, config.yaml), read the same
    samples, then train its shards in step with it. It writes nothing; it returns a short
    summary of its own (the category's is rank 0's).

    Raises:
        RuntimeError: rank 0 failed before training (its error, named).
        StopRequested: as rank 0, at the same step.
    """
    verdict, detail = ranks.from_main()
    if verdict == "done":
        return completed_summary(out_dir) or summary
    if verdict == "error":
        raise RuntimeError(f"{category.name}: rank 0 stopped before training ({detail}); see its log")
    if joint_of is not None:
        cs = prepare_joint_data(cfg, joint_of, out_dir, resuming=True)
    else:
        cs = prepare_data(cfg, category, out_dir, resuming=True)
    run_summary = {"category": category.name, "rank": ranks.rank, "world_size": ranks.world}
    return _run_training(
        cfg,
        category,
        out_dir,
        run_summary,
        cs,
        None,
        dump_yaml(cfg),
        time.time(),
        should_stop=should_stop,
        progress_stream=progress_stream,
        after_save=None,
    )


def _check_data_root(cfg: JobConfig, *categories: Category) -> None:
    """A data root that holds no data at all (missing, empty, not mounted, a mistyped
    `data.root`) is the command's mistake, not the category's state: refuse before anything is
    written, with validate's message.

    Raises:
        DataError: with `fada-batch validate`'s "no data found" message.
    """
    from fada_batch.data.validate import find_no_data

    if (why := find_no_data(Path(cfg.data.root), list(categories))) is not None:
        raise DataError(why)


def _write_unless_completed(out_dir: Path, summary: dict[str, Any]) -> None:
    """Write a summary that did not complete, unless a completed one is there (it stays)."""
    if completed_summary(out_dir) is not None:
        log.warning(
            "%s: %s; the completed summary and adapter in %s are kept",
            summary.get("category"),
            summary.get("status"),
            out_dir,
        )
        return
    write_summary(out_dir, summary)


def _awaiting_labels(
    cfg: JobConfig, category: Category, out_dir: Path, summary: dict[str, Any]
) -> dict[str, Any]:
    """No sheet: record `awaiting_labels`, unless the category was completed from a sheet.

    Raises:
        DataError: the category is completed, so its sheet went missing (or data.root is wrong).
    """
    from fada_batch.data.categories import LABELS_DIR
    from fada_batch.data.workbook import resolve_labels_form

    book = resolve_labels_form(Path(cfg.data.root), cfg.data.labels, cfg.data.workbook)
    labels = book if book is not None else Path(cfg.data.root) / LABELS_DIR
    what = "no row in the master workbook" if book is not None else "no label sheet"
    previous = completed_summary(out_dir)
    if previous is not None:
        raise DataError(
            f"{category.name}: {what} in {labels}, but {out_dir} holds a completed adapter "
            f"trained from {previous.get('sheet') or 'a sheet'}. Check data.root (now "
            f"{cfg.data.root}); the completed category is left as it is."
        )
    summary.update(status="awaiting_labels", message=f"{what} for {category.name} yet (in {labels})")
    write_summary(out_dir, summary)
    log.info("%s (%s): awaiting labels (%s); nothing to train", category.name, category.display_name, what)
    return summary


def _train_locked(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    *,
    force: bool,
    should_stop: Callable[[], bool] | None,
    requeues: int,
    progress_stream: Any,
    after_save: AfterSave | None,
    joint_of: list[Category] | None = None,
    leader: _Leader | None = None,
) -> dict[str, Any]:
    """Under the category's lock: the folder made ready, then the training; however it ends
    (completed, stopped, interrupted, failed), the summary says so. `joint_of`: the categories
    of a joint run (`category` is then `outputs.joint_category`); `leader`: data parallel, how
    rank 0 tells the others the folder is ready."""
    t_start = time.time()
    remove_stale_tmp(out_dir)
    reached("setup.locked")
    latest = None if force else ckpt.find_latest(out_dir)
    if latest is not None:
        check_checkpoint(cfg, category, out_dir, latest)
    first_start, earlier_wall = _earlier_attempts(out_dir) if latest is not None else (now_iso(), 0.0)
    summary.update(
        status="running",
        start_time=now_iso(),
        first_start_time=first_start,
        requeues=requeues,
        earlier_attempts_wall_time_s=round(earlier_wall, 2),
    )
    cs, config_yaml = _prepare_folder(
        cfg, category, out_dir, summary, force=force, resuming=latest is not None, joint_of=joint_of
    )
    if leader is not None:
        leader.tell("go")
    try:
        return _run_training(
            cfg,
            category,
            out_dir,
            summary,
            cs,
            latest,
            config_yaml,
            t_start,
            should_stop=should_stop,
            progress_stream=progress_stream,
            after_save=after_save,
        )
    except StopRequested as e:
        summary.update(status="interrupted", end_time=now_iso(), checkpoint=str(e.checkpoint))
        summary.update(_wall_times(t_start, earlier_wall))
        write_summary(out_dir, summary)
        raise
    except KeyboardInterrupt:  # the user stopped it (Ctrl-C): not a failure of the category
        latest_now = ckpt.find_latest(out_dir)
        summary.update(
            status="interrupted",
            stop_reason="user",
            end_time=now_iso(),
            checkpoint=str(latest_now) if latest_now else None,
            message="stopped by the user (SIGINT); run the same command again to resume",
        )
        summary.update(_wall_times(t_start, earlier_wall))
        write_summary(out_dir, summary)
        raise
    except BaseException as e:
        summary.update(
            status="failed",
            end_time=now_iso(),
            error=f"{type(e).__name__}: {e}"[-4000:],
        )
        summary.update(_wall_times(t_start, earlier_wall))
        write_summary(out_dir, summary)
        raise


def _prepare_folder(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    *,
    force: bool,
    resuming: bool,
    joint_of: list[Category] | None = None,
) -> tuple[CategorySamples, str]:
    """The samples (split.json written or reused; a joint run's per category, `joint_of`) and
    the folder made ready for training:
    with `force` the old checkpoints and adapter removed, `config.yaml` and the summary
    written. Returns the samples and the config as written.

    Raises:
        DataError: the data cannot be used (recorded as `invalid_data`, unless a completed
            summary is there: it stays).
    """
    try:
        if joint_of is not None:
            cs = prepare_joint_data(cfg, joint_of, out_dir, resuming=resuming, replace_split=force)
        else:
            cs = prepare_data(cfg, category, out_dir, resuming=resuming, replace_split=force)
    except DataError as e:
        summary.update(status="invalid_data", error=str(e), end_time=now_iso())
        _write_unless_completed(out_dir, summary)
        raise
    summary.update(_data_counts(cs))
    if not cs.train:
        summary.update(status="invalid_data", error="no training QA pairs after the split")
        _write_unless_completed(out_dir, summary)
        raise DataError(f"{category.name}: no training question/answer pairs (all answers empty?)")
    if force:  # only now that the data is usable: a --force on bad data keeps the old adapter
        ckpt.remove_all(out_dir)
        remove_dir(out_dir / FINAL_MODEL)
        remove_dir(out_dir / TENSORBOARD_DIR)
    config_yaml = dump_yaml(cfg)
    atomic_write_text(out_dir / CONFIG_FILE, config_yaml)
    write_summary(out_dir, summary)
    reached("setup.data")
    return cs, config_yaml


def _earlier_attempts(out_dir: Path) -> tuple[str, float]:
    """A resumed or requeued run: the first attempt's start time and the earlier attempts' wall time."""
    try:
        prev = read_summary(out_dir) or {}
    except ValueError:
        prev = {}
    return prev.get("first_start_time") or prev.get("start_time") or now_iso(), _earlier_wall_time(prev)


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _earlier_wall_time(prev: dict[str, Any]) -> float:
    """Wall time of the attempts before this one, from the last summary they left."""
    total = _number(prev.get("total_wall_time_s"))
    if prev.get("status") != "running" and total is not None:  # it ended and said so
        return total
    # it died without a word: its time up to its last summary write (its last checkpoint)
    earlier = _number(prev.get("earlier_attempts_wall_time_s")) or 0.0
    try:
        start = datetime.fromisoformat(prev["start_time"])
        last = datetime.fromisoformat(prev["updated"])
    except (KeyError, TypeError, ValueError):
        return earlier
    return earlier + max(0.0, (last - start).total_seconds())


def _wall_times(t_start: float, earlier_wall: float) -> dict[str, float]:
    """This attempt's wall time and the total over every attempt that led here (requeues,
    resumes after a crash): what the category has cost, start to end."""
    wall = time.time() - t_start
    return {"wall_time_s": round(wall, 2), "total_wall_time_s": round(earlier_wall + wall, 2)}


@dataclass
class _Run:
    """One category's training in progress: what the loop reads and updates."""

    cfg: JobConfig
    category: Category
    out_dir: Path
    summary: dict[str, Any]
    cs: CategorySamples
    loaded: LoadedModel
    encoder: Encoder
    train_enc: list[Encoded]
    val_enc: list[Encoded]
    optimizer: torch.optim.Optimizer
    params: list[torch.nn.Parameter]
    state: ckpt.TrainerState
    config_yaml: str
    micro: int
    steps_per_epoch: int
    total_steps: int
    warmup: int
    features: FeatureSource | None = None
    progress: Progress | None = None
    last_ckpt: Path | None = None
    after_save: AfterSave | None = None
    events: EventLog | None = None  # TensorBoard event file of this attempt (train.tensorboard)
    ranks: Ranks = field(default_factory=current)  # data parallel: this process's rank and world

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def device(self) -> torch.device:
        return self.loaded.device


def _setup(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    cs: CategorySamples,
    config_yaml: str,
) -> _Run:
    """Load the base model, put LoRA on it, tokenise the samples, make the optimizer."""
    tc, mc = cfg.train, cfg.model
    torch.manual_seed(tc.seed)  # LoRA init; dropout RNG continues from here (or the checkpoint)
    loaded = load_base_model(mc.name_or_path, device=mc.device, dtype=mc.dtype, quantization=mc.quantization)
    model = apply_lora_section(loaded, cfg.lora, gradient_checkpointing=mc.gradient_checkpointing)
    base_config = model.get_base_model().config
    encoder = Encoder(
        loaded.processor,
        num_query_tokens=base_config.num_query_tokens,
        image_token_id=base_config.image_token_id,
        eos_token_id=eos_token_id(model, loaded.processor),
    )
    params = [p for p in model.parameters() if p.requires_grad]
    micro, accum = tc.batch_size, tc.grad_accum_steps
    steps_per_epoch = math.ceil(len(cs.train) / (micro * accum))
    total_steps = steps_per_epoch * tc.num_epochs
    if tc.max_steps is not None:
        total_steps = min(total_steps, tc.max_steps)
    return _Run(
        cfg=cfg,
        category=category,
        out_dir=out_dir,
        summary=summary,
        cs=cs,
        loaded=loaded,
        encoder=encoder,
        train_enc=[encoder.encode(s) for s in cs.train],
        val_enc=[encoder.encode(s) for s in cs.val],
        optimizer=torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.weight_decay),
        params=params,
        state=ckpt.TrainerState(
            config_hash=cfg.config_hash(),
            fingerprint=training_fingerprint(cfg),
            micro_batch_size=micro,
            grad_accum_steps=accum,
        ),
        config_yaml=config_yaml,
        micro=micro,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        warmup=int(tc.warmup_ratio * total_steps),
    )


def _resume(run: _Run, latest: Path | None) -> Path | None:
    """Load the latest loadable checkpoint (unusable ones are quarantined); returns it.

    Data parallel: rank 0 chooses (and quarantines); every rank loads the one it chose."""
    if not run.ranks.is_main:
        chosen = run.ranks.from_main()
        return _load_chosen(run, Path(chosen) if chosen else None)
    while latest is not None:
        try:
            state = ckpt.load_checkpoint(latest, model=run.model, optimizer=run.optimizer)
            break
        except ckpt.CheckpointLoadError as e:
            moved = ckpt.quarantine(latest)
            log.warning(
                "%s: %s; moved it to %s and trying the previous one", run.category.name, e, moved.name
            )
            latest = ckpt.find_latest(run.out_dir)
    run.ranks.from_main(str(latest) if latest is not None else None)
    if latest is None:
        reached("setup.model")
        return None
    return _load_chosen(run, latest, state)


def _load_chosen(run: _Run, latest: Path | None, state: ckpt.TrainerState | None = None) -> Path | None:
    """Take over the state of checkpoint `latest` (loaded already as `state`, or loaded here:
    the ranks other than 0) and check its fingerprint."""
    if latest is not None and state is None:
        state = ckpt.load_checkpoint(latest, model=run.model, optimizer=run.optimizer)
    reached("setup.model")
    if latest is None or state is None:
        return None
    now = training_fingerprint(run.cfg)
    if state.fingerprint and state.fingerprint != now:  # an older checkpoint than the one checked
        raise fingerprint_mismatch(
            run.category, run.out_dir, f"checkpoint {latest.name}", state.fingerprint, now
        )
    state.resumes += 1
    state.config_hash, state.fingerprint = run.cfg.config_hash(), now
    run.micro = state.micro_batch_size or run.micro  # keep an earlier out-of-memory back-off
    run.state = state
    run.last_ckpt = latest
    reached("setup.resumed", state.global_step)
    return latest


def _checkpoint(run: _Run) -> Path:
    """Save a checkpoint (rank 0; the other ranks wait until it is on disk) and return it."""
    if not run.ranks.is_main:
        run.ranks.barrier()
        run.last_ckpt = ckpt.checkpoint_dir(run.out_dir, run.state.global_step)
        return run.last_ckpt
    touch(run.out_dir / ".lock")  # a live task keeps its lock fresh (see fsutil.category_lock)
    run.last_ckpt = ckpt.save_checkpoint(
        run.out_dir,
        model=run.model,
        optimizer=run.optimizer,
        state=run.state,
        config_yaml=run.config_yaml,
        keep=run.cfg.train.keep_checkpoints,
    )
    # the summary's `updated` time now marks this checkpoint: if this attempt dies without a
    # word (SIGKILL, a node lost), the next one counts its time up to here
    write_summary(run.out_dir, run.summary)
    run.ranks.barrier()
    return run.last_ckpt


def _validate(run: _Run, *, epoch_end: int | None = None) -> float | None:
    """Validation loss at the current step (once per step), the best so far, early stopping.

    A new best is written to `best_checkpoint/` before the next checkpoint records it, so a
    resumed run that replays to this step writes the same best again.
    """
    state, tc = run.state, run.cfg.train
    step = state.global_step
    if state.val_history and state.val_history[-1][0] == step:
        val: float | None = state.val_history[-1][1]
    else:
        assert run.features is not None
        mine = run.ranks.shard(range(len(run.cs.val)))  # data parallel: this rank's val pairs
        total, count = run.ranks.sum(
            *evaluate_loss_sum(
                run.model,
                run.features,
                [run.cs.val[i] for i in mine],
                [run.val_enc[i] for i in mine],
                run.encoder,
                run.device,
                run.micro,
            )
        )
        if count == 0:
            return None
        val = total / count
        state.val_history.append([step, round(val, 6)])
        if run.events is not None:
            run.events.scalars({"val/loss": val}, step)
        if state.best_val_loss is None or val < state.best_val_loss - tc.early_stopping_min_delta:
            if tc.final_model == "best" and run.ranks.is_main:
                ckpt.save_best(run.out_dir, model=run.model, step=step, val_loss=val)
            state.best_step, state.best_val_loss, state.bad_validations = step, val, 0
        else:
            state.bad_validations += 1
            patience = tc.early_stopping_patience
            if patience and state.bad_validations >= patience:
                state.early_stopped = True
                assert run.progress is not None
                run.progress.line(
                    f"early stopping at step {step}: validation loss {val:.4f}, no better than the "
                    f"best {state.best_val_loss:.4f} (step {state.best_step}) for {plural(patience, 'validation')}"
                )
    if epoch_end is not None and val is not None:
        state.val_loss.append([epoch_end, round(val, 6)])
    return val


def _optimizer_step(run: _Run, step: list[int], epoch: int) -> float:
    """One optimizer step over `step`'s samples (out-of-memory back-off included)."""
    tc, state, progress = run.cfg.train, run.state, run.progress
    assert progress is not None and run.features is not None
    lr = get_lr(
        state.global_step,
        total=run.total_steps,
        base_lr=tc.learning_rate,
        warmup=run.warmup,
        schedule=tc.lr_schedule,
    )
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    accum = tc.grad_accum_steps

    def halved(new_micro: int) -> None:
        progress.line(
            f"CUDA out of memory: micro-batch halved to {new_micro}, "
            f"{math.ceil(tc.batch_size * accum / new_micro)} micro-batches per optimizer "
            f"step (same effective batch of {tc.batch_size * accum}); retrying the step"
        )
        state.micro_batch_size = new_micro

    features = run.features
    t0 = time.perf_counter()
    shard = None
    if run.ranks.parallel:
        shard = run.ranks.shard(step)
        # dropout masks: one stream per (step, rank), so the ranks draw independent masks and
        # a resumed run draws the ones it would have (one process keeps its saved RNG state)
        torch.manual_seed(tc.seed * 1_000_003 + state.global_step * 4_099 + run.ranks.rank)
    step_loss, run.micro = run_with_oom_backoff(
        lambda m: accumulate_step(
            run.model, features, run.cs.train, run.train_enc, run.encoder, run.device, step, m, shard=shard
        ),
        run.micro,
        optimizer=run.optimizer,
        device=run.device,
        on_backoff=halved,
    )
    run.ranks.all_reduce_grads(run.params)  # data parallel: the whole step's gradient
    (step_loss,) = run.ranks.sum(step_loss)
    reached("step.grads", state.global_step + 1)  # gradients in, optimizer not stepped
    if tc.max_grad_norm > 0:
        torch.nn.utils.clip_grad_norm_(run.params, tc.max_grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    state.global_step += 1
    state.samples_seen += len(step)
    state.loss_curve.append([state.global_step, round(step_loss, 6)])
    if run.events is not None:
        seconds = time.perf_counter() - t0
        run.events.scalars(
            {
                "train/loss": step_loss,
                "train/learning_rate": lr,
                "train/samples_per_s": len(step) / seconds if seconds > 0 else None,
                "train/epoch": state.global_step / run.steps_per_epoch,
            },
            state.global_step,
        )
    progress.update(state.global_step, step_loss, len(step), epoch)
    reached("step.done", state.global_step)
    return step_loss


def _train_epoch(
    run: _Run, epoch: int, should_stop: Callable[[], bool] | None, clock: Callable[[], float]
) -> int:
    """The rest of epoch `epoch` (from `state.step_in_epoch`); returns its number of steps.

    Stops early at `total_steps` (max_steps) and at early stopping; on a stop request saves a
    checkpoint and raises StopRequested.
    """
    tc, state = run.cfg.train, run.state
    steps = _epoch_steps(run, epoch)
    for s_index in range(state.step_in_epoch, len(steps)):
        _optimizer_step(run, steps[s_index], epoch)
        state.step_in_epoch = s_index + 1
        state.train_time_s = clock()
        if s_index == len(steps) - 1 or state.global_step >= run.total_steps:
            break  # the epoch's end: validation and checkpoint follow in `_end_epoch`
        if tc.eval_every_steps and state.global_step % tc.eval_every_steps == 0:
            _validate(run)
            if state.early_stopped:
                break
        if _stop_now(run, should_stop):
            saved = _checkpoint(run)
            reached("stop.saved", state.global_step)
            assert run.progress is not None
            run.progress.line(f"stop requested: saved {saved.name}; exiting for requeue")
            run.progress.close()
            raise StopRequested(saved)
        if tc.checkpoint_every_steps and state.global_step % tc.checkpoint_every_steps == 0:
            _checkpoint(run)
    return len(steps)


def _stop_now(run: _Run, should_stop: Callable[[], bool] | None) -> bool:
    """Whether to checkpoint and stop now; data parallel: when any rank was asked (a signal
    reaches the ranks at different times), so all of them save the same step."""
    return run.ranks.any(should_stop is not None and should_stop())


def _end_epoch(run: _Run, epoch: int, n_steps: int, clock: Callable[[], float]) -> None:
    """Validation loss, the epoch's mean training loss, then a checkpoint at the boundary."""
    state, tc = run.state, run.cfg.train
    val = _validate(run, epoch_end=epoch + 1)
    reached("epoch.validated", epoch + 1)
    epoch_losses = [loss for st, loss in state.loss_curve if st > epoch * run.steps_per_epoch]
    if epoch_losses:
        state.epoch_train_loss.append([epoch + 1, round(sum(epoch_losses) / len(epoch_losses), 6)])
    if state.step_in_epoch >= n_steps:
        state.epoch = epoch + 1
        state.step_in_epoch = 0
    assert run.progress is not None
    run.progress.line(
        f"epoch {epoch + 1}/{tc.num_epochs} done at step {state.global_step}: "
        f"train loss {state.epoch_train_loss[-1][1] if state.epoch_train_loss else float('nan'):.4f}"
        + (f", val loss {val:.4f}" if val is not None else "")
    )
    state.train_time_s = clock()
    _checkpoint(run)


def _loop(run: _Run, should_stop: Callable[[], bool] | None) -> None:
    """Epochs from where the state stands to the end (all epochs, max_steps or early stopping)."""
    state, tc = run.state, run.cfg.train
    t_loop, before = time.time(), state.train_time_s

    def clock() -> float:
        return before + (time.time() - t_loop)

    epoch = state.epoch
    while state.global_step < run.total_steps and not state.early_stopped and epoch < tc.num_epochs:
        n_steps = _train_epoch(run, epoch, should_stop, clock)
        _end_epoch(run, epoch, n_steps, clock)
        epoch += 1
        more = state.global_step < run.total_steps and not state.early_stopped and epoch < tc.num_epochs
        if _stop_now(run, should_stop) and more:
            reached("stop.saved", state.global_step)
            assert run.progress is not None
            assert run.last_ckpt is not None  # _end_epoch saved one
            run.progress.line(f"stop requested: saved {run.last_ckpt.name}; exiting for requeue")
            run.progress.close()
            raise StopRequested(run.last_ckpt)


def _ship(run: _Run) -> dict[str, Any]:
    """Choose the adapter that becomes `final_model/` (loading the best weights when that is
    the best one) and say why: the summary's `shipped` block."""
    state, tc = run.state, run.cfg.train
    last_val = state.val_history[-1][1] if state.val_history else None
    if state.early_stopped:
        ended = f"early stopping: {plural(tc.early_stopping_patience, 'validation')} without improvement"
    elif (
        state.global_step >= run.total_steps and tc.max_steps is not None and run.total_steps == tc.max_steps
    ):
        ended = f"train.max_steps={tc.max_steps} reached"
    else:
        ended = f"all {plural(tc.num_epochs, 'epoch')}" if tc.num_epochs != 1 else "1 epoch"
    shipped: dict[str, Any] = {
        "kind": "last",
        "step": state.global_step,
        "val_loss": last_val,
        "best_step": state.best_step,
        "best_val_loss": round(state.best_val_loss, 6) if state.best_val_loss is not None else None,
        "last_step": state.global_step,
        "training_ended": ended,
    }
    if tc.final_model == "last":
        reason = "train.final_model=last: the last step's adapter"
    elif state.best_step is None:
        reason = "no validation loss (no validation pairs): the last step's adapter"
    elif state.best_step == state.global_step:
        shipped.update(kind="best", val_loss=shipped["best_val_loss"])
        reason = f"lowest validation loss ({state.best_val_loss:.4f}) at the last step"
    else:
        ckpt.load_best(run.out_dir, model=run.model, step=state.best_step)
        shipped.update(kind="best", step=state.best_step, val_loss=shipped["best_val_loss"])
        reason = (
            f"lowest validation loss ({state.best_val_loss:.4f}) at step {state.best_step} of "
            f"{state.global_step}; the last step's was {last_val:.4f}"
        )
    shipped["reason"] = reason
    return shipped


def _run_training(
    cfg: JobConfig,
    category: Category,
    out_dir: Path,
    summary: dict[str, Any],
    cs: CategorySamples,
    latest: Path | None,
    config_yaml: str,
    t_start: float,
    *,
    should_stop: Callable[[], bool] | None,
    progress_stream: Any,
    after_save: AfterSave | None,
) -> dict[str, Any]:
    run = _setup(cfg, category, out_dir, summary, cs, config_yaml)
    run.after_save = after_save
    latest = _resume(run, latest)
    trainable, total_params = trainable_parameters(run.model)
    summary.update(
        device=device_info(run.device),
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        last_step=run.state.global_step,
    )
    if run.ranks.parallel:
        summary.update(world_size=run.ranks.world)
    if run.ranks.is_main:
        write_summary(out_dir, summary)  # the collector sees where a running task runs
    run.progress = _start_progress(run, latest, (trainable, total_params), progress_stream)
    run.features = FeatureSource(
        run.loaded, cs.image_paths, cache=cfg.train.feature_cache, max_pixels=cfg.data.max_image_pixels
    )
    t_feat = time.time()
    run.features.warm(_images_of_this_rank(run))
    feature_s = time.time() - t_feat
    reached("setup.features")
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    set_train_mode(run.model)
    if cfg.train.tensorboard and run.ranks.is_main:  # a resumed attempt drops the events past its checkpoint
        run.events = EventLog.open(out_dir / TENSORBOARD_DIR, resume_step=run.state.global_step)
    try:
        _loop(run, should_stop)
    finally:
        if run.events is not None:
            run.events.close()
    run.progress.close()
    if not run.ranks.is_main:  # rank 0 alone ships, evaluates and completes the summary
        return {**summary, "status": "completed", "steps": run.state.global_step}
    return _finish(run, t_start, feature_s, (trainable, total_params))


def _start_progress(run: _Run, latest: Path | None, counts: tuple[int, int], stream: Any) -> Progress:
    """The progress printer and its first line (what trains, where, fresh or resumed); the
    ranks other than 0 print nothing but that line."""
    cs, cfg = run.cs, run.cfg
    progress = Progress(
        label=run.category.name if run.ranks.is_main else f"{run.category.name} rank {run.ranks.rank}",
        total_steps=run.total_steps,
        start_step=run.state.global_step,
        interval_s=cfg.train.log_every_s if run.ranks.is_main else float("inf"),
        stream=stream,
    )
    trainable, total_params = counts
    world = f"; data parallel: rank {run.ranks.rank} of {run.ranks.world}" if run.ranks.parallel else ""
    progress.line(
        f"{len(cs.train)} train / {len(cs.val)} val QA pairs on {len(cs.split.train)}/"
        f"{plural(len(cs.split.val), 'image')}; {trainable:,} of {total_params:,} parameters train; "
        f"device {run.device.type} {str(run.loaded.dtype).removeprefix('torch.')}"
        + (f" {run.loaded.quantization}" if run.loaded.quantization != "none" else "")
        + "; "
        + (f"resuming from {latest.name} (step {run.state.global_step})" if latest else "fresh start")
        + world
    )
    return progress


def _images_of_this_rank(run: _Run) -> list[str]:
    """The images whose features this process needs: all of train and val alone; data
    parallel, those of its shards of the remaining epochs' steps and of validation."""
    cs, ranks = run.cs, run.ranks
    if not ranks.parallel:
        return cs.split.train + cs.split.val
    names = [cs.val[i].image for i in ranks.shard(range(len(cs.val)))]
    for epoch in range(run.state.epoch, run.cfg.train.num_epochs):
        names.extend(cs.train[i].image for step in _epoch_steps(run, epoch) for i in ranks.shard(step))
    return list(dict.fromkeys(names))


def _epoch_steps(run: _Run, epoch: int) -> list[list[int]]:
    """Epoch `epoch`'s optimizer steps (sample indices), the same on every rank."""
    tc = run.cfg.train
    return epoch_steps(
        [len(e.input_ids) for e in run.train_enc],
        seed=tc.seed,
        epoch=epoch,
        step_size=tc.batch_size * tc.grad_accum_steps,  # the effective batch, whatever the micro-batch
        group_by_length=tc.group_by_length,
    )


def _finish(run: _Run, t_start: float, feature_s: float, counts: tuple[int, int]) -> dict[str, Any]:
    """Ship the chosen adapter (final_model/), hand it to `after_save`, and complete the summary."""
    cfg, state, summary, cs = run.cfg, run.state, run.summary, run.cs
    tc, mc = cfg.train, cfg.model
    shipped = _ship(run)
    answers = answer_length_stats(run.train_enc)
    eos = run.encoder.eos_token_id
    record = {
        "fingerprint": training_fingerprint(cfg),
        "answer_tokens": answers,  # training answers' lengths in tokens, EOS included
        "max_new_tokens": answers["max_new_tokens"],  # evaluation's and ask's default limit
        "shipped": {k: shipped[k] for k in ("kind", "step", "val_loss", "reason")},
    }
    if cs.parts:  # joint: which categories, and whether prompts start with the category's name
        record.update(mode="joint", categories=list(cs.parts), category_in_prompt=tc.category_in_prompt)
        record["prompt_prefixes"] = cs.prompt_prefixes  # what evaluate and ask start prompts with
    card = render_card(_card_facts(run, shipped, answers["max_new_tokens"], eos))
    final = save_final_model(
        run.out_dir, run.loaded, cfg, run.category, cs.questions, eos, record=record, card=card
    )
    reached("final.saved")
    if run.after_save is not None:  # e.g. the task's evaluation: answers from the model in memory
        final_model = FinalModel(cfg, run.loaded, cs, run.out_dir, eos, answers["max_new_tokens"])
        summary.update(run.after_save(final_model))
    walls = _wall_times(t_start, float(summary.get("earlier_attempts_wall_time_s") or 0.0))
    trainable, total_params = counts
    summary.update(
        status="completed",
        end_time=now_iso(),
        **walls,
        train_time_s=round(state.train_time_s, 2),
        feature_cache_s=round(feature_s, 2),
        epochs=tc.num_epochs,
        epochs_completed=state.epoch,
        steps=state.global_step,
        steps_per_epoch=run.steps_per_epoch,
        total_steps=run.total_steps,
        batch_size=tc.batch_size,
        grad_accum_steps=tc.grad_accum_steps,
        effective_batch_size=tc.batch_size * tc.grad_accum_steps,
        micro_batch_size=run.micro,  # smaller than batch_size after an out-of-memory back-off
        learning_rate=tc.learning_rate,
        lr_schedule=tc.lr_schedule,
        warmup_steps=run.warmup,
        samples_seen=state.samples_seen,
        samples_per_s=round(state.samples_seen / state.train_time_s, 3) if state.train_time_s > 0 else None,
        loss_curve=_thin(state.loss_curve, 1000),
        epoch_train_loss=state.epoch_train_loss,
        val_loss=state.val_loss,
        val_loss_steps=state.val_history,
        final_train_loss=state.epoch_train_loss[-1][1] if state.epoch_train_loss else None,
        final_val_loss=state.val_history[-1][1] if state.val_history else None,
        best_step=state.best_step,
        best_val_loss=shipped["best_val_loss"],
        early_stopped=state.early_stopped,
        shipped=shipped,
        answer_tokens=answers,
        peak_memory=peak_memory(run.device),
        device=device_info(run.device),
        dtype=str(run.loaded.dtype).removeprefix("torch."),
        quantization=run.loaded.quantization,
        base_model=mc.name_or_path,
        feature_cache=tc.feature_cache,
        trainable_parameters=trainable,
        total_parameters=total_params,
        resumes=state.resumes,
        adapter_path=str(final),
        adapter_bytes=(final / "adapter_model.safetensors").stat().st_size,
        last_checkpoint=str(run.last_ckpt) if run.last_ckpt else None,
    )
    write_summary(run.out_dir, summary)
    reached("final.summary")
    run.progress.line(  # type: ignore[union-attr]
        f"done in {walls['wall_time_s']:.1f} s; adapter of step {shipped['step']} ({shipped['reason']}) in {final}"
    )
    return summary


def _card_facts(run: _Run, shipped: dict[str, Any], max_new_tokens: int, eos: int) -> dict[str, Any]:
    """What the model card says (`training.card.render_card`), from the run and its summary."""
    import fada_batch
    from fada_batch.config import fingerprint_hash, normalize_level

    cfg, cat, summary, tc = run.cfg, run.category, run.summary, run.cfg.train
    split = run.cs.split
    return {
        "category": cat.name,
        "category_display": cat.display or cat.name,
        "folder": cat.folder,
        "base_model": hub_base_model(cfg.model.name_or_path),
        "questions": list(run.cs.questions),
        "prompt_template": cfg.data.prompt_template,
        "prompt_prefixes": run.cs.prompt_prefixes,  # joint: what each category's prompts start with
        "eos_token_id": eos,
        "max_new_tokens": max_new_tokens,
        "images": summary.get("images") or {},
        "qa_pairs": summary.get("qa_pairs") or {},
        "labels": Path(summary["sheet"]).name if summary.get("sheet") else "the label sheet",
        "num_images": cfg.data.num_images,
        "split_source": f"taken from `{Path(split.source).name}`" if split.source else None,
        "split_seed": split.seed,
        "split_fractions": list(split.fractions),
        "normalize": normalize_level(cfg.data),
        "normalization": summary.get("normalization"),
        "empty_answers": summary.get("empty_answers_skipped", 0),
        "warnings": summary.get("warnings") or {},
        "dtype": str(run.loaded.dtype).removeprefix("torch."),
        "quantization": run.loaded.quantization,
        "lora": {
            k: getattr(cfg.lora, k) for k in ("r", "alpha", "dropout", "target_modules", "modules_to_save")
        },
        "train": {
            "epochs": tc.num_epochs,
            "steps": run.state.global_step,
            "effective_batch_size": tc.batch_size * tc.grad_accum_steps,
            "learning_rate": tc.learning_rate,
            "lr_schedule": tc.lr_schedule,
            "warmup_steps": run.warmup,
            "weight_decay": tc.weight_decay,
            "max_grad_norm": tc.max_grad_norm,
            "seed": tc.seed,
        },
        "shipped": shipped,
        "fada_batch_version": fada_batch.__version__,
        "created": now_iso(),
        "fingerprint_hash": fingerprint_hash(training_fingerprint(cfg)),
    }


def _thin(curve: list[list[float]], max_points: int) -> list[list[float]]:
    """At most `max_points` points: means over equal windows of steps (keeps long runs small)."""
    if len(curve) <= max_points:
        return curve
    w = math.ceil(len(curve) / max_points)
    out = []
    for i in range(0, len(curve), w):
        chunk = curve[i : i + w]
        out.append([chunk[-1][0], round(sum(c[1] for c in chunk) / len(chunk), 6)])
    return out
