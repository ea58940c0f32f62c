"""Measure the demo's per-question figures (docs/evaluation.md): Femur of the demo data, the
demo job's recipe, the tiny model, for a few seeds; print each seed's headline table.

    FADA_TEST_CACHE=.cache python scripts/demo_eval_figures.py --images 120 --seeds 0 1 2
    FADA_TEST_CACHE=.cache python scripts/demo_eval_figures.py --images 160 --epochs 10 \
        --abnormal-fraction 0.15 --split 0.5 0.1 0.4     # the abnormal finding's figures

The tiny model is built (or reused) in $FADA_TEST_CACHE/tiny-blip2 like the tests do.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fada_batch.config import config_from_dict, load_job  # noqa: E402
from fada_batch.run.report_questions import md_confusion, md_headline  # noqa: E402
from fada_batch.run.task import run_category  # noqa: E402
from fada_batch.tools.demo import make_demo_data  # noqa: E402
from fada_batch.tools.tiny import make_tiny_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--category", default="Femur")
    parser.add_argument("--abnormal-fraction", type=float, default=0.0, help="make_demo_data's")
    parser.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=None,
        help="train, val and test fractions (default: the job's)",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(os.environ.get("FADA_TEST_CACHE", REPO / ".cache"))
    model_dir = cache / "tiny-blip2"
    if not model_dir.is_dir():
        make_tiny_model(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_demo_data(root, images_per_category=args.images, abnormal_fraction=args.abnormal_fraction)
        for seed in args.seeds:
            raw = load_job(REPO / "job" / "demo.yaml").to_dict()
            raw["data"].update(root=str(root), num_images=None)
            if args.split:
                raw["data"].update(
                    zip(("train_fraction", "val_fraction", "test_fraction"), args.split, strict=True)
                )
            raw["model"]["name_or_path"] = str(model_dir)
            raw["output"]["root"] = str(Path(tmp) / f"seed{seed}")
            raw["train"].update(
                seed=seed, num_epochs=args.epochs, log_every_s=1000.0, checkpoint_every_steps=0
            )
            t0 = time.time()
            run_category(config_from_dict(raw), args.category)
            folder = Path(raw["output"]["root"]) / f"blip2_{args.category.lower()}"
            metrics = json.loads((folder / "eval" / "metrics.json").read_text())
            category = {"category": args.category, "questions": metrics["questions"]}
            print(f"\n## seed {seed}: {metrics['n_images']} held-out images, {time.time() - t0:.0f} s\n")
            print("\n".join(md_headline(category) + md_confusion(category)), flush=True)


if __name__ == "__main__":
    main()
