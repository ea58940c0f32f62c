"""`fada-batch`: the command line. Parses arguments and calls the library; no logic of its own.

fada-batch train --job job/validation.yaml --category Abdomen -p num_epochs=3
fada-batch submit --job job/full.yaml [--dry-run] [--executor slurm|local|debug]
fada-batch collect --job job/full.yaml [--compare OTHER]
fada-batch validate --job job/full.yaml [--json]
fada-batch evaluate --job job/full.yaml [--category Femur]
fada-batch ask --adapter outputs/blip2_femur/final_model --image scan.png
fada-batch export --adapter outputs/blip2_femur/final_model --to OUT [--merge [--dtype float32]]
fada-batch bench --job job/full.yaml [--baseline]
fada-batch stage-model --model Salesforce/blip2-opt-2.7b --to /shared/models/blip2-opt-2.7b
fada-batch demo                      # tiny model + demo data + the demo job, on a CPU
fada-batch make-tiny-model DIR | make-demo-data DIR | show-config --job J
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from fada_batch import __version__
from fada_batch.text import plural

log = logging.getLogger("fada_batch")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_REQUEUED = 3  # stopped on a signal after a checkpoint; resumes when run again
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, as shells report it)


def _add_job_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    p.add_argument("--job", required=required, help="job YAML file, e.g. job/full.yaml")
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key (dotted, e.g. train.num_epochs=3; aliases num_images, "
        "num_epochs, batch_size, learning_rate); repeatable",
    )


def build_parser() -> argparse.ArgumentParser:
    """The parser of every subcommand, each added by its `_add_<command>`, in `--help`'s order."""
    parser = argparse.ArgumentParser(
        prog="fada-batch",
        description="LoRA fine-tuning of BLIP-2 on fetal ultrasound VQA, one adapter per category.",
    )
    parser.add_argument("--version", action="version", version=f"fada-batch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (
        _add_train,
        _add_submit,
        _add_demo,
        _add_validate,
        _add_collect,
        _add_evaluate,
        _add_ask,
        _add_export,
        _add_make_tiny_model,
        _add_make_demo_data,
        _add_stage_model,
        _add_bench,
        _add_requeue_failed,
        _add_show_config,
    ):
        add(sub)
    return parser


def _add_train(sub: Any) -> None:
    p = sub.add_parser(
        "train", help="train one category, or the joint adapter (train.mode=joint); resumes automatically"
    )
    _add_job_args(p)
    who = p.add_mutually_exclusive_group()  # one of them, unless train.mode=joint
    who.add_argument("--category", help="category name or alias, e.g. Abdomen")
    who.add_argument(
        "--task-index",
        type=int,
        help="index into the job's categories (for SLURM arrays: $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument("--force", action="store_true", help="retrain a completed category from scratch")
    p.set_defaults(func=cmd_train)


def _add_submit(sub: Any) -> None:
    p = sub.add_parser(
        "submit", help="pre-flight, then one SLURM array task per category and a collector job"
    )
    _add_job_args(p)
    p.add_argument("--categories", help="comma-separated subset (default: the job's)")
    p.add_argument(
        "--executor",
        choices=("slurm", "local", "debug"),
        default="slurm",
        help="slurm: array + dependent collector; local: one after another on this machine "
        "(subprocesses); debug: in this process",
    )
    p.add_argument("--dry-run", action="store_true", help="show what would be submitted; submit nothing")
    p.add_argument(
        "--sort-by-size",
        action="store_true",
        help="smallest categories first (default: largest first, for the shortest array wall time)",
    )
    p.add_argument("--force", action="store_true", help="retrain completed categories from scratch")
    p.set_defaults(func=cmd_submit)


def _add_demo(sub: Any) -> None:
    p = sub.add_parser("demo", help="make the tiny model and demo data if absent, then train them")
    _add_job_args(p, required=False)
    p.add_argument("--executor", choices=("local", "debug"), default="local", help="how to run the tasks")
    p.set_defaults(func=cmd_demo, job="job/demo.yaml")


def _add_validate(sub: Any) -> None:
    p = sub.add_parser("validate", help="pre-flight check of every category's sheet and images")
    _add_job_args(p)
    p.add_argument("--categories", help="comma-separated subset (default: the job's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_validate)


def _add_collect(sub: Any) -> None:
    p = sub.add_parser(
        "collect", help="report on a run: report.md/.html, results.csv, collected.json in the output root"
    )
    _add_job_args(p, required=False)
    p.add_argument("--outputs", metavar="DIR", help="output root to read (default: the job's output.root)")
    p.add_argument("--compare", metavar="OTHER", help="another run's output root to compare with")
    p.add_argument(
        "--finished",
        action="store_true",
        help="the tasks are over (the collector after the array): a category that has not "
        "completed is reported as stopped (exit status 1) with the command that resumes it",
    )
    p.set_defaults(func=cmd_collect)


def _add_evaluate(sub: Any) -> None:
    p = sub.add_parser(
        "evaluate", help="answer held-out images with adapter and base model; eval/metrics.json"
    )
    _add_job_args(p)
    p.add_argument(
        "--category",
        help="one category, or `joint` for the joint adapter (default: the joint adapter under "
        "train.mode=joint, else every category with a trained final_model, and the joint adapter "
        "when there is one)",
    )
    p.set_defaults(func=cmd_evaluate)


def _add_ask(sub: Any) -> None:
    p = sub.add_parser("ask", help="ask a trained adapter about a scan or a folder of scans")
    p.add_argument("--adapter", required=True, metavar="DIR", help="a category's final_model/ folder")
    p.add_argument("--image", required=True, metavar="FILE_OR_DIR", help="an image, or a folder of images")
    p.add_argument(
        "--question",
        action="append",
        default=[],
        help="question text, or Q1..Q8; repeatable (default: the 8 questions the adapter was trained on)",
    )
    p.add_argument(
        "--category",
        help="the scans' category, for a joint adapter (train.mode=joint): its prompts start "
        "with the category's name, as in training; needed when it was trained so",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--base-model", help="base model id or folder (default: the adapter's own)")
    p.add_argument(
        "--allow-base-mismatch",
        action="store_true",
        help="accept a --base-model other than the adapter's (the same model staged elsewhere)",
    )
    p.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="where to run the model (default auto: the GPU when CUDA has one, else the CPU)",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int,
        help="answer length limit (default: what the adapter's training answers need, as recorded with it)",
    )
    p.add_argument("--num-beams", type=int, default=1, help="beam search width (default 1: greedy)")
    p.add_argument(
        "--no-repeat-ngram-size",
        type=int,
        default=0,
        help="forbid any n-gram of this size to repeat within an answer (default 0: off)",
    )
    p.add_argument(
        "--repetition-penalty",
        type=float,
        default=1.0,
        help="> 1 makes repeated tokens less likely (default 1.0: off)",
    )
    p.add_argument("--with-base", action="store_true", help="also answer with the base model alone")
    p.set_defaults(func=cmd_ask)


def _add_export(sub: Any) -> None:
    p = sub.add_parser(
        "export", help="copy an adapter into a clean folder to publish, or merge it into the base model"
    )
    p.add_argument("--adapter", required=True, metavar="DIR", help="a category's final_model/ folder")
    p.add_argument("--to", required=True, metavar="OUT", help="folder to create")
    p.add_argument(
        "--merge",
        action="store_true",
        help="merge the LoRA into a copy of the base model: a plain transformers model "
        "(Blip2ForConditionalGeneration.from_pretrained(OUT))",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        help="the merged model's dtype: bfloat16 (default, bf16) or float32 (fp32); 8-bit/4-bit is refused",
    )
    p.add_argument(
        "--base-model",
        help="with --merge: the base to merge into (default: the adapter's own); without: the name "
        "the adapter gives as its base (default: the hub id of a staged folder)",
    )
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_export)


def _add_make_tiny_model(sub: Any) -> None:
    p = sub.add_parser("make-tiny-model", help="save a small pretrained BLIP-2 for tests and the demo")
    p.add_argument("dir", help="output folder")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the weights, the tokenizer's corpus order and the pretraining scans (default 0, "
        "what the tests and the demo use)",
    )
    p.set_defaults(func=cmd_make_tiny_model)


def _add_make_demo_data(sub: Any) -> None:
    p = sub.add_parser("make-demo-data", help="write a synthetic data set in the real layout")
    p.add_argument("dir", help="data root to create (holds 'Fetal Ultrasound/' ...)")
    p.add_argument("--seed", type=int, default=0, help="seed of the scans and their answers (default 0)")
    p.add_argument(
        "--form",
        choices=("per_category", "workbook"),
        default="per_category",
        help="labels as one sheet per category (default) or one master workbook with misspellings",
    )
    p.add_argument("--images-per-category", type=int, default=None, help="scans per category (default 60)")
    p.add_argument(
        "--abnormal-fraction",
        type=float,
        default=0.0,
        help="share of scans (0 to 0.5) drawn with an abnormal finding, a bright mass that Q7 "
        "names (default 0: none); e.g. 0.15: a minority, as in real sheets",
    )
    p.set_defaults(func=cmd_make_demo_data)


def _add_stage_model(sub: Any) -> None:
    p = sub.add_parser(
        "stage-model",
        help="download a model + processor for offline compute nodes, verify it, print model.name_or_path",
    )
    p.add_argument(
        "--model", required=True, help="hub id (e.g. Salesforce/blip2-opt-2.7b) or a local model folder"
    )
    p.add_argument("--to", required=True, help="folder to create, e.g. /shared/models/blip2-opt-2.7b")
    p.add_argument(
        "--revision", help="hub branch, tag or commit (default: main; the commit staged is recorded)"
    )
    p.add_argument("--force", action="store_true", help="replace the folder at --to if it exists")
    p.add_argument(
        "--full-load",
        action="store_true",
        help="also load every weight on the CPU in bf16 (~2 bytes of RAM per parameter: ~8 GB for blip2-opt-2.7b)",
    )
    p.set_defaults(func=cmd_stage_model)


def _add_bench(sub: Any) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training speed and memory; estimate each category's wall time and sbatch --time",
    )
    _add_job_args(p)
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps (default 10)")
    p.add_argument(
        "--baseline",
        action="store_true",
        help="also run the seed's recipe (8-bit, batch 1, padding 256/128, vision per sample, "
        "Trainer + gradient checkpointing) on the same samples and print the ratio",
    )
    p.add_argument(
        "--baseline-quantization",
        choices=("8bit", "none"),
        default="8bit",
        help="the seed's weights (default 8bit, its setting)",
    )
    p.add_argument("--category", help="bench on this category's real data (default: synthetic inputs)")
    p.add_argument(
        "--images",
        type=int,
        help="estimate for categories of N images x 8 questions (default: the data's counts)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument(
        "--make-bench-model",
        action="store_true",
        help="first save the random-weight CPU benchmark model at model.name_or_path if absent",
    )
    p.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    dp = p.add_argument_group("data-parallel estimate (arithmetic on the measured step, not measured)")
    dp.add_argument(
        "--gpus",
        help="comma-separated GPU counts to estimate for (default: 1,2,4,8 within a node, then 2 "
        "and 4 full nodes)",
    )
    dp.add_argument("--gpus-per-node", type=int, default=8, help="GPUs in one node (default 8)")
    dp.add_argument(
        "--nvlink-gbps",
        type=float,
        default=100.0,
        help="all-reduce bandwidth within a node, GB/s (default 100: NVLink, rounded down)",
    )
    dp.add_argument(
        "--network-gbps",
        type=float,
        default=10.0,
        help="all-reduce bandwidth across nodes, GB/s (default 10: a 100 Gb/s link)",
    )
    dp.add_argument(
        "--latency-us", type=float, default=10.0, help="time per ring message, microseconds (default 10)"
    )
    p.set_defaults(func=cmd_bench)


def _add_requeue_failed(sub: Any) -> None:
    p = sub.add_parser(
        "requeue-failed",
        help="record in a task's summary that its batch script could not requeue it (the "
        "batch scripts call this; see fada_batch/run/requeue.py)",
    )
    p.add_argument("request", help="the task's requeue request file ($FADA_REQUEUE_REQUEST)")
    p.add_argument("--error", required=True, help="what failed (scontrol's output)")
    p.set_defaults(func=cmd_requeue_failed)


def _add_show_config(sub: Any) -> None:
    p = sub.add_parser("show-config", help="print the resolved job config (after overrides)")
    _add_job_args(p)
    p.set_defaults(func=cmd_show_config)


def _load(args: argparse.Namespace):
    from fada_batch.config import load_job

    return load_job(args.job, overrides=args.param)


def _job_categories(cfg) -> list[str]:
    return [cfg.data.category(c).name for c in cfg.data.categories]


def cmd_train(args: argparse.Namespace) -> int:
    """Train one category (`run.task.run_category_on_signals`): under plain sbatch, SIGUSR1
    (the `--signal` warning before the time limit) or SIGTERM (preemption) saves a checkpoint
    at the next step; after USR1 the task is requeued and resumes there (exit status 3)."""
    from fada_batch.run.task import Stopped, run_category_on_signals

    cfg = _load(args)
    category = _train_target(cfg, args)
    if category is None:
        return EXIT_USAGE
    result = run_category_on_signals(cfg, category, force=args.force)
    if isinstance(result, Stopped):
        return EXIT_FAILED if result.failed else EXIT_REQUEUED
    _print_result(result)
    return EXIT_OK


def _train_target(cfg, args: argparse.Namespace) -> str | None:
    """What `train` trains: the joint adapter (train.mode=joint; `--task-index 0` allowed, the
    joint job's only task), the category of --category, or that of --task-index; None after
    printing why the arguments do not fit."""
    from fada_batch.training.outputs import JOINT

    if cfg.train.mode == "joint":
        if args.category is not None or args.task_index not in (None, 0):
            print(
                "error: train.mode=joint trains one adapter on all of data.categories: drop "
                "--category/--task-index, or set -p train.mode=per_category to train one category",
                file=sys.stderr,
            )
            return None
        return JOINT
    if args.task_index is not None:
        cats = _job_categories(cfg)
        if not 0 <= args.task_index < len(cats):
            print(
                f"error: --task-index {args.task_index} is out of range: the job has "
                f"{plural(len(cats), 'category', 'categories')} ({', '.join(cats)})",
                file=sys.stderr,
            )
            return None
        return cats[args.task_index]
    if args.category is None:
        print("error: train needs --category or --task-index (or train.mode=joint)", file=sys.stderr)
        return None
    return args.category


def cmd_requeue_failed(args: argparse.Namespace) -> int:
    """A batch script's `scontrol requeue` failed: the task's summary says so (failed)."""
    from fada_batch.run.requeue import record_host_failure

    try:
        summary = record_host_failure(Path(args.request), args.error)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{summary.get('category')}: {summary.get('message')}", file=sys.stderr)
    return EXIT_OK


def cmd_submit(args: argparse.Namespace) -> int:
    from fada_batch.data.validate import NoDataError
    from fada_batch.run.launch import SubmitError, submit
    from fada_batch.run.slurmjobs import SlurmUnavailable

    cfg = _load(args)
    cats = [c.strip() for c in args.categories.split(",")] if args.categories else None
    try:
        record = submit(
            cfg,
            categories=cats,
            executor=args.executor,
            dry_run=args.dry_run,
            smallest_first=args.sort_by_size,
            force=args.force,
        )
    except (NoDataError, SlurmUnavailable, SubmitError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    if record.get("dry_run"):
        return EXIT_OK
    if args.executor != "slurm":
        return EXIT_FAILED if record.get("collect_exit_code") else EXIT_OK
    return EXIT_OK


def _print_result(summary: dict) -> None:
    status = summary.get("status")
    cat = summary.get("category")
    if status == "completed":
        print(
            f"{cat}: completed, {plural(summary.get('steps'), 'step')}, final train loss "
            f"{summary.get('final_train_loss')}, val loss {summary.get('final_val_loss')}; "
            f"adapter: {summary.get('adapter_path')}"
        )
    else:
        print(f"{cat}: {status}" + (f" ({summary.get('message')})" if summary.get("message") else ""))


def cmd_demo(args: argparse.Namespace) -> int:
    """Make the tiny model and the demo data when absent, then run the job the way a
    workstation does (`submit --executor local`), ending with the collector's report."""
    from fada_batch.run.launch import submit
    from fada_batch.tools.demo import make_demo_data
    from fada_batch.tools.tiny import make_tiny_model

    cfg = _load(args)
    model_dir = Path(cfg.model.name_or_path)
    print(f"tiny model: {model_dir}", flush=True)
    make_tiny_model(model_dir)
    data_root = Path(cfg.data.root)
    if not (data_root / "Fetal Ultrasound").is_dir():
        print(f"demo data: writing {data_root}", flush=True)
        make_demo_data(data_root)
    else:
        print(f"demo data: {data_root} (exists)", flush=True)
    record = submit(cfg, executor=args.executor)
    print(f"\noutputs: {cfg.output.root}/blip2_<category>/ (report: {cfg.output.root}/report.md)")
    return EXIT_FAILED if record.get("collect_exit_code") else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from fada_batch.data.validate import format_table, preflight

    cfg = _load(args)
    names = [c.strip() for c in args.categories.split(",")] if args.categories else None
    pf = preflight(cfg, names)
    if args.json:
        print(json.dumps(pf.to_dict(), indent=2, default=str))
        if (why := pf.nothing_ready()) is not None:
            print(f"error: {why}", file=sys.stderr)
    else:
        print(format_table(pf))
    if cfg.train.mode == "joint" and not args.json:
        from fada_batch.run.launch import joint_description, make_plan

        print(joint_description(cfg, make_plan(cfg, pf, executor="slurm")))
    # non-zero when a category is blocked, or when nothing at all can train
    return EXIT_FAILED if pf.blocked or pf.nothing_ready() else EXIT_OK


def cmd_collect(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from fada_batch.run.collect import LabelSource, collect
    from fada_batch.run.report import text_table, write_report
    from fada_batch.run.slurmjobs import job_phase

    if not args.job and not args.outputs:
        print("error: collect needs --job JOB or --outputs DIR", file=sys.stderr)
        return EXIT_USAGE
    cats, labels, table, root = None, None, None, Path(args.outputs) if args.outputs else None
    joint = False
    if args.job:
        cfg = _load(args)
        root = root or Path(cfg.output.root)
        cats, labels = _job_categories(cfg), LabelSource.from_data(asdict(cfg.data), root)
        table, joint = cfg.data.table(), cfg.train.mode == "joint"
    try:
        result = collect(
            root,
            categories=cats,
            labels=labels,
            table=table,
            compare=Path(args.compare) if args.compare else None,
            finished=args.finished,
            job_probe=job_phase,  # running / queued / ended, as SLURM says (unknown without it)
            joint=joint,
        )
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    collected = result.to_dict()
    print(text_table(collected))
    for problem in result.problems:
        print(f"warning: {problem}", file=sys.stderr)
    paths = write_report(collected, root)
    print("written:\n" + "\n".join(f"  {p}" for p in paths.values()))
    return result.exit_code()


def cmd_evaluate(args: argparse.Namespace) -> int:
    from fada_batch.data.images import ImageError
    from fada_batch.data.samples import DataError
    from fada_batch.evaluation.evaluate import (
        AdapterError,
        EvaluationError,
        evaluate_category,
        evaluate_joint,
        format_metrics,
        settings_from,
    )
    from fada_batch.fsutil import LockedError
    from fada_batch.run.report_questions import text_headline
    from fada_batch.run.slurmjobs import job_phase
    from fada_batch.training.outputs import JOINT

    cfg = _load(args)
    try:
        settings_from(cfg.eval).check()
    except ValueError as e:
        print(f"error: eval: {e}", file=sys.stderr)
        return EXIT_USAGE
    cats = _evaluate_targets(cfg, args.category)
    if not cats:
        print(f"error: no trained category (final_model/) under {cfg.output.root}", file=sys.stderr)
        return EXIT_FAILED
    failed = 0
    for cat in cats:
        try:
            if cat == JOINT:
                metrics = evaluate_joint(cfg, job_probe=job_phase)
            else:
                metrics = evaluate_category(cfg, cat, job_probe=job_phase)
        except (EvaluationError, AdapterError, ImageError, LockedError, DataError) as e:
            print(f"error: {cat}: {e}", file=sys.stderr)
            failed += 1
            continue
        own = text_headline({"questions": metrics.get("questions")})
        print("\n".join([format_metrics(cat, metrics), *own]), flush=True)
    return EXIT_FAILED if failed else EXIT_OK


def _evaluate_targets(cfg: Any, category: str | None) -> list[str]:
    """What `evaluate` evaluates: --category (`joint`: the joint adapter); without it, the
    joint adapter under train.mode=joint, else every trained category and the joint adapter
    when its folder holds one."""
    from fada_batch.evaluation.evaluate import trained_categories
    from fada_batch.training.outputs import JOINT, final_model_complete, joint_output_dir

    if category:
        return [JOINT if category.strip().lower() == JOINT else category]
    if cfg.train.mode == "joint":
        return [JOINT]
    return trained_categories(cfg) + ([JOINT] if final_model_complete(joint_output_dir(cfg)) else [])


def cmd_ask(args: argparse.Namespace) -> int:
    from fada_batch.evaluation.ask import Asker, AskError, format_answers, image_files
    from fada_batch.evaluation.evaluate import AdapterError, GenerationSettings

    try:
        images = image_files(Path(args.image))
        asker = Asker(
            Path(args.adapter),
            base_model=args.base_model,
            allow_base_mismatch=args.allow_base_mismatch,
            device=args.device,
            category=args.category,
            settings=GenerationSettings(
                max_new_tokens=args.max_new_tokens,
                num_beams=args.num_beams,
                no_repeat_ngram_size=args.no_repeat_ngram_size,
                repetition_penalty=args.repetition_penalty,
            ),
        )
        rows = asker.ask(images, args.question or None, with_base=args.with_base)
    except (AskError, AdapterError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(rows, indent=2, ensure_ascii=False) if args.json else format_answers(rows))
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    from fada_batch.evaluation.evaluate import AdapterError
    from fada_batch.tools.export import ExportError, export_adapter, format_result

    try:
        result = export_adapter(
            Path(args.adapter),
            Path(args.to),
            merge=args.merge,
            dtype=args.dtype,
            base_model=args.base_model,
            force=args.force,
        )
    except (AdapterError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(format_result(result))
    return EXIT_OK


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from fada_batch.tools.tiny import make_tiny_model

    path = make_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny model saved in {path} (use model.name_or_path: {path})")
    return EXIT_OK


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from fada_batch.tools.demo import DEFAULT_IMAGES_PER_CATEGORY, make_demo_data

    images = DEFAULT_IMAGES_PER_CATEGORY if args.images_per_category is None else args.images_per_category
    try:
        info = make_demo_data(
            Path(args.dir),
            seed=args.seed,
            form=args.form,
            images_per_category=images,
            abnormal_fraction=args.abnormal_fraction,
        )
    except ValueError as e:
        print(f"make-demo-data: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(f"demo data written to {args.dir}: {info}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    from fada_batch.tools.bench import format_report, make_bench_model, run_bench
    from fada_batch.training.model import ModelFolderMissing

    cfg = _load(args)
    if args.make_bench_model:
        make_bench_model(Path(cfg.model.name_or_path))
    try:
        result = run_bench(
            cfg,
            steps=args.steps,
            baseline=args.baseline,
            baseline_quantization=args.baseline_quantization,
            category=args.category,
            images=args.images,
            threads=args.threads,
            scaling=_scaling_settings(args),
        )
    except ModelFolderMissing:  # the CPU bench job's model is one the bench builds itself
        name = cfg.model.name_or_path
        print(
            f"error: the model folder {name} (model.name_or_path) does not exist. If it is to be "
            "the random-weight CPU benchmark model (as in job/bench-cpu.yaml), run the same command "
            "with --make-bench-model: the bench builds it there first (~30 MB). For a real model, "
            f"stage it there: `fada-batch stage-model --model Salesforce/blip2-opt-2.7b --to {name}`.",
            file=sys.stderr,
        )
        return EXIT_FAILED
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(format_report(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"written: {args.json}")
    return EXIT_OK


def _scaling_settings(args: argparse.Namespace) -> Any:
    """The data-parallel estimate's settings from bench's flags.

    Raises:
        ValueError: --gpus is not a comma-separated list of positive whole numbers.
    """
    from fada_batch.tools.bench.scaling import ScalingSettings

    gpus = None
    if args.gpus:
        try:
            gpus = tuple(int(x) for x in args.gpus.split(",") if x.strip())
        except ValueError:
            raise ValueError(
                f"--gpus {args.gpus!r}: give GPU counts separated by commas, e.g. --gpus 1,2,4,8"
            ) from None
    return ScalingSettings(
        gpus=gpus,
        gpus_per_node=args.gpus_per_node,
        intra_gbps=args.nvlink_gbps,
        inter_gbps=args.network_gbps,
        latency_us=args.latency_us,
    )


def cmd_show_config(args: argparse.Namespace) -> int:
    from fada_batch.config import dump_yaml

    print(dump_yaml(_load(args)), end="")
    return EXIT_OK


def cmd_stage_model(args: argparse.Namespace) -> int:
    from fada_batch.tools.stage import format_report, stage_model

    result = stage_model(
        args.model, Path(args.to), revision=args.revision, force=args.force, full_load=args.full_load
    )
    print(format_report(result))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from fada_batch.logsetup import setup_logging

    setup_logging(verbose=args.verbose)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from fada_batch.config import ConfigError
    from fada_batch.data.categories import UnknownCategoryError
    from fada_batch.data.samples import DataError
    from fada_batch.fsutil import LockedError, NotWritableError
    from fada_batch.training.checkpoint import CheckpointWriteError
    from fada_batch.training.model import ModelLoadError

    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(
            "\ninterrupted: what was saved stays (checkpoints, finished categories); "
            "run the same command again to resume",
            file=sys.stderr,
        )
        return EXIT_INTERRUPTED
    except (ConfigError, UnknownCategoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ModelLoadError, LockedError, NotWritableError, CheckpointWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"error: {e.strerror or e} ({getattr(e, 'filename', '')})", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
