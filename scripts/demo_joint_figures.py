"""Measure the joint adapter beside the per-category adapters on the demo (docs/evaluation.md):
the demo job's recipe on the tiny model, each labelled demo category trained on its own, then
one joint adapter on all of them (train.mode=joint, with the category prefix and, with
--no-prefix too, without it); print per category the held-out scores of each.

    FADA_TEST_CACHE=.cache python scripts/demo_joint_figures.py --seeds 0 1 2 --no-prefix
    FADA_TEST_CACHE=.cache python scripts/demo_joint_figures.py --joint-epochs 60 --misses

The tiny model is built (or reused) in $FADA_TEST_CACHE/tiny-blip2 like the tests do. Every
adapter is evaluated after its training, as `fada-batch train` does (eval.after_training).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from fada_batch.config import config_from_dict, load_job  # noqa: E402
from fada_batch.run.task import run_category  # noqa: E402
from fada_batch.tools.demo import make_demo_data  # noqa: E402
from fada_batch.tools.tiny import make_tiny_model  # noqa: E402
from fada_batch.training.outputs import JOINT  # noqa: E402

CATEGORIES = ["Abdomen", "Femur", "Thorax"]  # the demo's labelled categories


def _raw(root: Path, model_dir: Path, out: Path, seed: int, epochs: int) -> dict[str, Any]:
    raw = load_job(REPO / "job" / "demo.yaml").to_dict()
    raw["data"].update(root=str(root), num_images=None, categories=CATEGORIES)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["output"]["root"] = str(out)
    raw["train"].update(seed=seed, num_epochs=epochs, log_every_s=1000.0, checkpoint_every_steps=0)
    return raw


def _scores(metrics_file: Path) -> dict[str, float]:
    """Exact match overall, on Q2 and Q6, and token F1 overall, of adapter, base and majority."""
    m = json.loads(metrics_file.read_text())
    out = {}
    for model in ("adapter", "base", "majority"):
        for q in ("overall", "Q2", "Q6"):
            out[f"{model} {q} EM"] = m[model].get(q, {}).get("exact_match", float("nan"))
        out[f"{model} F1"] = m[model]["overall"]["token_f1"]
    out["pairs"] = m["n_pairs"]
    out["per question"] = " ".join(
        f"{m['adapter'][q]['exact_match']:.2f}" for q in m["adapter"] if q != "overall"
    )
    return out


def _answers(eval_dir: Path) -> dict[str, Counter[tuple[str, str]]]:
    """Per question, how often each (reference, adapter answer) pair came out."""
    out: dict[str, Counter[tuple[str, str]]] = {}
    with (eval_dir / "predictions.csv").open(newline="") as f:
        for r in csv.DictReader(f):
            out.setdefault(r["question"], Counter())[(r["reference"], r["adapter_prediction"])] += 1
    return out


def _print_misses(folder: Path, label: str) -> None:
    """The joint adapter's most frequent wrong answer per category and question."""
    print(f"\n{label}: most frequent wrong answer per question (reference -> answer, times):")
    for name in CATEGORIES:
        for q, counts in _answers(folder / "categories" / name.lower() / "eval").items():
            wrong = [(n, ref, ans) for (ref, ans), n in counts.items() if ref.lower() != ans.lower()]
            if wrong:
                n, ref, ans = max(wrong)
                print(f"  {name} {q}: {ref!r} -> {ans!r}, {n} of {sum(counts.values())}")


def _run_seed(root: Path, model_dir: Path, tmp: Path, seed: int, args: argparse.Namespace) -> None:
    out = tmp / f"seed{seed}"
    timings = {}
    for name in CATEGORIES:
        t0 = time.time()
        run_category(config_from_dict(_raw(root, model_dir, out, seed, args.epochs)), name)
        timings[name] = time.time() - t0
    variants = [("joint", True)] + ([("joint, no prefix", False)] if args.no_prefix else [])
    joint_scores = {}
    for label, prefix in variants:
        raw = _raw(root, model_dir, tmp / f"seed{seed}-{prefix}", seed, args.joint_epochs or args.epochs)
        raw["train"].update(mode="joint", category_in_prompt=prefix)
        t0 = time.time()
        run_category(config_from_dict(raw), JOINT)
        timings[label] = time.time() - t0
        folder = Path(raw["output"]["root"]) / f"blip2_{JOINT}"
        joint_scores[label] = {
            name: _scores(folder / "categories" / name.lower() / "eval" / "metrics.json")
            for name in CATEGORIES
        }
        joint_scores[label]["overall"] = _scores(folder / "eval" / "metrics.json")
        if args.misses:
            _print_misses(folder, label)
    print(f"\n## seed {seed}: wall " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + "\n")
    head = ["category", "pairs", "own adapter EM / F1"]
    head += [f"{label} EM / F1" for label, _ in variants]
    head += ["base EM", "majority EM", "Q2 own / " + " / ".join(v for v, _ in variants)]
    head += ["Q6 own / " + " / ".join(v for v, _ in variants)]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for name in [*CATEGORIES, "overall"]:
        own = _scores(out / f"blip2_{name.lower()}" / "eval" / "metrics.json") if name != "overall" else None
        j = [joint_scores[label][name] for label, _ in variants]
        ref = own or j[0]
        cells = [name, str(ref["pairs"])]
        cells.append(f"{own['adapter overall EM']:.3f} / {own['adapter F1']:.3f}" if own else "–")
        cells += [f"{s['adapter overall EM']:.3f} / {s['adapter F1']:.3f}" for s in j]
        cells += [f"{ref['base overall EM']:.3f}", f"{ref['majority overall EM']:.3f}"]
        for q in ("Q2", "Q6"):
            own_q = f"{own[f'adapter {q} EM']:.2f}" if own else "–"
            cells.append(" / ".join([own_q] + [f"{s[f'adapter {q} EM']:.2f}" for s in j]))
        print("| " + " | ".join(cells) + " |", flush=True)
    print("\nadapter exact match per question, Q1..Q8 (own; " + "; ".join(v for v, _ in variants) + "):")
    for name in CATEGORIES:
        own = _scores(out / f"blip2_{name.lower()}" / "eval" / "metrics.json")
        joint = " | ".join(joint_scores[label][name]["per question"] for label, _ in variants)
        print(f"  {name}: {own['per question']} | {joint}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=60, help="images per category (demo default 60)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-prefix", action="store_true", help="also a joint run without the prefix")
    parser.add_argument("--joint-epochs", type=int, help="epochs of the joint runs (default: --epochs)")
    parser.add_argument("--misses", action="store_true", help="print the joint adapter's wrong answers")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cache = Path(os.environ.get("FADA_TEST_CACHE", REPO / ".cache"))
    model_dir = cache / "tiny-blip2"
    if not model_dir.is_dir():
        make_tiny_model(model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "data"
        make_demo_data(root, images_per_category=args.images)
        for seed in args.seeds:
            _run_seed(root, model_dir, Path(tmp), seed, args)


if __name__ == "__main__":
    main()
