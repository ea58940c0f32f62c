"""`fada-batch`: the command line. Parses arguments and calls the library; no logic of its own.

fada-batch train --job job/validation.yaml --category Abdomen -p num_epochs=3
fada-batch demo                      # tiny model + demo data + train, on a CPU
fada-batch validate --job job/full.yaml
fada-batch make-tiny-model DIR
fada-batch make-demo-data DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from fada_batch import __version__

log = logging.getLogger("fada_batch")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


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
    parser = argparse.ArgumentParser(
        prog="fada-batch",
        description="LoRA fine-tuning of BLIP-2 on fetal ultrasound VQA, one adapter per category.",
    )
    parser.add_argument("--version", action="version", version=f"fada-batch {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train one category (resumes automatically)")
    _add_job_args(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--category", help="category name or alias, e.g. Abdomen")
    who.add_argument(
        "--task-index",
        type=int,
        help="index into the job's categories (for SLURM arrays: $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument("--force", action="store_true", help="retrain a completed category from scratch")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="make the tiny model and demo data if absent, then train them")
    _add_job_args(p, required=False)
    p.set_defaults(func=cmd_demo, job="job/demo.yaml")

    p = sub.add_parser("validate", help="pre-flight check of every category's sheet and images")
    _add_job_args(p)
    p.add_argument("--categories", help="comma-separated subset (default: the job's)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("make-tiny-model", help="save a small pretrained BLIP-2 for tests and the demo")
    p.add_argument("dir", help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_tiny_model)

    p = sub.add_parser("make-demo-data", help="write a synthetic data set in the real layout")
    p.add_argument("dir", help="data root to create (holds 'Fetal Ultrasound/' ...)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_make_demo_data)

    p = sub.add_parser("show-config", help="print the resolved job config (after overrides)")
    _add_job_args(p)
    p.set_defaults(func=cmd_show_config)
    return parser


def _load(args: argparse.Namespace):
    from fada_batch.config import load_job

    return load_job(args.job, overrides=args.param)


def _job_categories(cfg) -> list[str]:
    from fada_batch.categories import get_category

    return [get_category(c).name for c in cfg.data.categories]


def cmd_train(args: argparse.Namespace) -> int:
    from fada_batch.train import train_category

    cfg = _load(args)
    if args.task_index is not None:
        cats = _job_categories(cfg)
        if not 0 <= args.task_index < len(cats):
            print(
                f"error: --task-index {args.task_index} is out of range: the job has "
                f"{len(cats)} categories ({', '.join(cats)})",
                file=sys.stderr,
            )
            return EXIT_USAGE
        category = cats[args.task_index]
    else:
        category = args.category
    summary = train_category(cfg, category, force=args.force)
    _print_result(summary)
    return EXIT_OK


def _print_result(summary: dict) -> None:
    status = summary.get("status")
    cat = summary.get("category")
    if status == "completed":
        print(
            f"{cat}: completed, {summary.get('steps')} steps, final train loss "
            f"{summary.get('final_train_loss')}, val loss {summary.get('final_val_loss')}; "
            f"adapter: {summary.get('adapter_path')}"
        )
    else:
        print(f"{cat}: {status}" + (f" ({summary.get('message')})" if summary.get("message") else ""))


def cmd_demo(args: argparse.Namespace) -> int:
    from fada_batch.categories import find_sheet, get_category
    from fada_batch.demo import make_demo_data
    from fada_batch.tiny import make_tiny_model
    from fada_batch.train import train_category

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
    failed = []
    results = []
    for name in _job_categories(cfg):
        cat = get_category(name)
        if find_sheet(data_root, cat) is None:
            results.append((name, "awaiting_labels", ""))
            train_category(cfg, name)  # records the awaiting_labels summary
            continue
        try:
            s = train_category(cfg, name)
            results.append((name, s.get("status"), s.get("adapter_path", "")))
        except Exception as e:
            failed.append(name)
            results.append((name, "failed", str(e).splitlines()[0]))
    print(f"\noutputs under {cfg.output.root}:")
    for name, status, where in results:
        print(f"  {name:<18} {status:<16} {where}")
    return EXIT_FAILED if failed else EXIT_OK


def cmd_validate(args: argparse.Namespace) -> int:
    from fada_batch.categories import get_category
    from fada_batch.dataset import load_category

    cfg = _load(args)
    names = args.categories.split(",") if args.categories else _job_categories(cfg)
    results = []
    blocking = False
    for name in names:
        cat = get_category(name.strip())
        data = load_category(
            Path(cfg.data.root),
            cat,
            clean_answers=cfg.data.clean_answers,
            max_image_pixels=cfg.data.max_image_pixels,
        )
        results.append(data)
        blocking |= data.status == "error"
    if args.json:
        print(json.dumps([d.to_dict() for d in results], indent=2, default=str))
    else:
        for d in results:
            d_dict = d.to_dict()
            stats = d_dict.get("stats", {})
            print(
                f"{d.category.name:<18} {d.status:<16} images {stats.get('images_usable', '-')}"
                f"  QA pairs {stats.get('qa_pairs', '-')}"
            )
            for p in d.problems:
                print(f"    [{p.severity}] {p.message}")
    return EXIT_FAILED if blocking else EXIT_OK


def cmd_make_tiny_model(args: argparse.Namespace) -> int:
    from fada_batch.tiny import make_tiny_model

    path = make_tiny_model(Path(args.dir), seed=args.seed)
    print(f"tiny model saved in {path} (use model.name_or_path: {path})")
    return EXIT_OK


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from fada_batch.demo import make_demo_data

    info = make_demo_data(Path(args.dir), seed=args.seed)
    print(f"demo data written to {args.dir}: {info}")
    return EXIT_OK


def cmd_show_config(args: argparse.Namespace) -> int:
    from fada_batch.config import dump_yaml

    print(dump_yaml(_load(args)), end="")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        for noisy in ("transformers", "peft", "accelerate", "urllib3", "httpx"):
            logging.getLogger(noisy).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    from fada_batch.categories import UnknownCategoryError
    from fada_batch.config import ConfigError
    from fada_batch.fsutil import LockedError
    from fada_batch.model import ModelLoadError
    from fada_batch.train import DataError

    try:
        return args.func(args)
    except (ConfigError, UnknownCategoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (DataError, ModelLoadError, LockedError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:
        print(f"error: {e.strerror or e} ({getattr(e, 'filename', '')})", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
