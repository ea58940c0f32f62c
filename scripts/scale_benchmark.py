#!/usr/bin/env python
"""The pre-flight check and the split at the size of the seed's largest category (Abdomen).

    python scripts/scale_benchmark.py                          # 2,424 scans of 256 px
    python scripts/scale_benchmark.py --size 720 --json s.json # larger scans; figures as JSON too
    python scripts/scale_benchmark.py --workbook               # the FADA master workbook's size

Writes one category of N generated scans and a label sheet of N rows (the demo's answers and
blemishes: names without extension, double spaces, trailing periods, empty cells) into a
temporary data root, then times, through production's code:

- the pre-flight check, `validate.preflight` (what `fada-batch validate` and `submit` run):
  the sheet parsed, every listed image resolved inside the folder, verified and decoded;
- training's data step, `samples.prepare_data`: the same load, the split by image,
  `split.json`, and the question/answer samples.

`--workbook` writes instead a master workbook of 19,019 rows (the FADA team's count; `--images`
changes it) over the 14 categories, with the demo workbook's misspellings and variants, and
as many scans, and times reading the workbook alone (`data.workbook.read_workbook`) and the
whole pre-flight check of the 14 categories with `data.normalize: canonical`, with and
without decoding every image (`check_images`).

It also prints the memory of the frozen-feature cache for that category with
blip2-opt-2.7b's shapes (32 query tokens x 2,560 hidden per image), computed from the split's
image counts: the cache holds one such tensor per train and validation image, on the
training device, in the model's dtype.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fada_batch.config import config_from_dict
from fada_batch.data.categories import (
    CATEGORY_NAMES,
    DEFAULT_WORKBOOK,
    IMAGES_DIR,
    LABELS_DIR,
    SHEET_SUFFIX,
    get_category,
)
from fada_batch.data.dataset import has_labels
from fada_batch.data.samples import prepare_data, workbook_cache_dir
from fada_batch.data.validate import preflight
from fada_batch.data.workbook import read_workbook
from fada_batch.tools.bench.model import BLIP2_OPT_27B
from fada_batch.tools.demo import WORKBOOK_QUESTION_HEADERS, _sheet_frame, render_scan

DEMO4 = ("Abdomen", "Femur", "Thorax", "Cervix")  # the categories the demo has answers for

SEED_ABDOMEN_IMAGES = 2424  # the seed data set's largest category
FADA_WORKBOOK_ROWS = 19019  # the FADA team's master workbook: 19,019 images in 14 categories
# blip2-opt-2.7b: what one image's cached features hold (num_query_tokens x text hidden size)
QUERY_TOKENS, TEXT_HIDDEN = BLIP2_OPT_27B["num_query_tokens"], BLIP2_OPT_27B["text"]["hidden_size"]
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
DISTINCT_SCANS = 24  # rendered once, written many times: decoding, not drawing, is timed


def make_category(root: Path, n: int, *, size: int, seed: int = 0) -> None:
    """Abdomen with `n` scans (`size` px PNGs) and a label sheet of `n` rows under `root`."""
    rng = np.random.default_rng(seed)
    folder = root / IMAGES_DIR / "Abdomen"
    folder.mkdir(parents=True)
    scans = []
    for i in range(DISTINCT_SCANS):
        side = ("left", "right")[i % 2]
        image = render_scan(rng, side=side, noisy=bool(i // 2 % 2), size=size, category="Abdomen")
        path = folder / f"scan_{i:05d}.png"
        image.save(path)
        scans.append((path.read_bytes(), side, bool(i // 2 % 2)))
    rows = []
    for i in range(n):
        data, side, noisy = scans[i % DISTINCT_SCANS]
        name = f"scan_{i:05d}.png"
        (folder / name).write_bytes(data)
        rows.append({"file": name, "side": side, "noisy": noisy, "category": "Abdomen"})
    labels = root / LABELS_DIR
    labels.mkdir(parents=True)
    _sheet_frame(rng, rows).to_excel(labels / f"Abdomen{SHEET_SUFFIX}", index=False, engine="openpyxl")


def make_workbook(root: Path, n: int, *, size: int, seed: int = 0) -> None:
    """A master workbook of `n` rows over the 14 categories (the demo workbook's noise) and
    one scan per row under `root`."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    scans = []
    for i in range(DISTINCT_SCANS):
        image = render_scan(
            rng, side=("left", "right")[i % 2], noisy=bool(i // 2 % 2), size=size, category="Abdomen"
        )
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        scans.append((buf.getvalue(), ("left", "right")[i % 2], bool(i // 2 % 2)))
    frames = []
    for c, name in enumerate(CATEGORY_NAMES):
        folder = root / IMAGES_DIR / name
        folder.mkdir(parents=True)
        rows = []
        for i in range(c, n, len(CATEGORY_NAMES)):
            data, side, noisy = scans[i % DISTINCT_SCANS]
            (folder / f"scan_{i:05d}.png").write_bytes(data)
            # the demo's answers are per category for four of them: borrow them round-robin
            rows.append({"file": f"scan_{i:05d}.png", "side": side, "noisy": noisy, "category": DEMO4[c % 4]})
        frame = _sheet_frame(rng, rows, misspell=True)
        frame.insert(0, "Folder Name", name)
        frames.append(frame)
    book = pd.concat(frames, ignore_index=True)
    book.columns = ["Folder Name", "Image Name", *WORKBOOK_QUESTION_HEADERS]
    book.to_excel(root / DEFAULT_WORKBOOK, index=False, engine="openpyxl")


def measure_workbook(root: Path, out: Path) -> dict[str, Any]:
    """Time reading the master workbook, the pre-flight of its 14 categories, and one
    array task's data step, without and with the workbook cache (`{out}/.cache/workbook`)."""
    cfg = config_from_dict(
        {"data": {"root": str(root), "normalize": "canonical"}, "output": {"root": str(out)}}
    )
    cats = [get_category(n) for n in CATEGORY_NAMES]
    t0 = time.perf_counter()
    book = read_workbook(root / DEFAULT_WORKBOOK, cats, normalize="canonical")
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    pf_quick = preflight(cfg, check_images=False)  # no output root yet: no cache
    t_quick = time.perf_counter() - t0
    t0 = time.perf_counter()
    pf = preflight(cfg)
    t_full = time.perf_counter() - t0
    out.mkdir(parents=True)  # as submit does: its pre-flight fills the cache
    t0 = time.perf_counter()
    preflight(cfg, check_images=False)
    t_fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    pf_cached = preflight(cfg, check_images=False)
    t_cached = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached = read_workbook(
        root / DEFAULT_WORKBOOK, cats, normalize="canonical", cache_dir=workbook_cache_dir(cfg)
    )
    t_read_cached = time.perf_counter() - t0
    t0 = time.perf_counter()  # one array task: has it labels, then its rows, split and samples
    cat = get_category("Trans-thalamic")
    assert has_labels(root, cat, cache_dir=workbook_cache_dir(cfg))
    prepare_data(cfg, cat, out / cat.output_dirname, resuming=False)
    t_task = time.perf_counter() - t0
    norm = pf.normalization()
    assert norm is not None
    ok = all(len(p.ready) == len(CATEGORY_NAMES) for p in (pf, pf_quick, pf_cached))
    return {
        "status": "ok" if ok and cached.rows_read == book.rows_read else "error",
        "rows": book.rows_read,
        "categories_ready": len(pf.ready),
        "images": sum(d.stats.images_usable for d in pf.results),
        "read_workbook_s": round(t_read, 2),
        "read_workbook_cached_s": round(t_read_cached, 2),
        "validate_no_image_decode_s": round(t_quick, 2),
        "validate_s": round(t_full, 2),
        "validate_no_image_decode_filling_cache_s": round(t_fill, 2),
        "validate_no_image_decode_cached_s": round(t_cached, 2),
        "task_data_step_cached_s": round(t_task, 2),
        "unique_answers_before": sum(norm.unique_before()),
        "unique_answers_after": sum(norm.unique_after()),
        "cells_changed": dict(norm.cells_changed),
    }


def describe_workbook(r: dict[str, Any], size: int) -> str:
    return "\n".join(
        [
            f"master workbook: {r['rows']} rows, {r['categories_ready']} of 14 categories ready, "
            f"{r['images']} images ({size} px PNG), status {r['status']}",
            f"read + split by category + normalise (canonical): {r['read_workbook_s']:.2f} s",
            f"  the same from the workbook cache:               {r['read_workbook_cached_s']:.2f} s",
            f"pre-flight check, images found but not decoded:   {r['validate_no_image_decode_s']:.2f} s",
            f"pre-flight check, every image decoded (validate): {r['validate_s']:.2f} s",
            f"pre-flight, not decoded, filling the cache:       {r['validate_no_image_decode_filling_cache_s']:.2f} s",
            f"pre-flight, not decoded, from the cache:          {r['validate_no_image_decode_cached_s']:.2f} s",
            f"one array task's data step from the cache:        {r['task_data_step_cached_s']:.2f} s",
            f"unique answers {r['unique_answers_before']} -> {r['unique_answers_after']}; cells changed {r['cells_changed']}",
        ]
    )


def feature_cache_bytes(images: int, dtype: str = "bfloat16") -> int:
    """Bytes of cached features for `images` images at blip2-opt-2.7b's shapes."""
    return images * QUERY_TOKENS * TEXT_HIDDEN * DTYPE_BYTES[dtype]


def measure(root: Path, out: Path) -> dict[str, Any]:
    """Time the pre-flight check and `prepare_data` on the category under `root`."""
    cfg = config_from_dict(
        {"data": {"root": str(root), "categories": ["Abdomen"]}, "output": {"root": str(out.parent)}}
    )
    t0 = time.perf_counter()
    pf = preflight(cfg)
    t_validate = time.perf_counter() - t0
    (data,) = pf.results
    t0 = time.perf_counter()
    cs = prepare_data(cfg, get_category("Abdomen"), out, resuming=False)
    t_split = time.perf_counter() - t0
    cached = len(cs.split.train) + len(cs.split.val)
    return {
        "status": data.status,
        "images": data.stats.images_usable,
        "qa_pairs": data.stats.qa_pairs,
        "warnings": len(data.warnings),
        "validate_s": round(t_validate, 2),
        "prepare_data_s": round(t_split, 2),
        "split_images": {"train": len(cs.split.train), "val": len(cs.split.val), "test": len(cs.split.test)},
        "qa_pairs_split": {"train": len(cs.train), "val": len(cs.val), "test": len(cs.test)},
        "feature_cache_images": cached,
        "feature_cache_mb": {
            d: round(feature_cache_bytes(cached, d) / 1e6, 1) for d in ("bfloat16", "float32")
        },
    }


def describe(r: dict[str, Any], size: int) -> str:
    s = r["split_images"]
    mb = r["feature_cache_mb"]
    return "\n".join(
        [
            f"Abdomen: {r['images']} images ({size} px PNG), {r['qa_pairs']} QA pairs, status {r['status']}, "
            f"{r['warnings']} warning(s)",
            f"pre-flight check (validate):  {r['validate_s']:.2f} s",
            f"data step (prepare_data):     {r['prepare_data_s']:.2f} s -> split "
            f"{s['train']}/{s['val']}/{s['test']} images",
            f"feature cache, {QUERY_TOKENS} x {TEXT_HIDDEN} per image, {r['feature_cache_images']} train+val "
            f"images: {mb['bfloat16']:.1f} MB in bf16, {mb['float32']:.1f} MB in fp32 (computed)",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=SEED_ABDOMEN_IMAGES, help="images and sheet rows")
    parser.add_argument("--size", type=int, default=256, help="pixels per side of each scan")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--workbook", action="store_true", help="a 14-category master workbook instead")
    args = parser.parse_args(argv)
    if args.workbook:
        return _main_workbook(args)
    with tempfile.TemporaryDirectory(prefix="fada-scale-") as tmp:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        make_category(root, args.images, size=args.size)
        print(f"generated {args.images} scans and sheet rows in {time.perf_counter() - t0:.1f} s", flush=True)
        result = measure(root, Path(tmp) / "blip2_abdomen")
    result["image_size"] = args.size
    print(describe(result, args.size))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == "ok" else 1


def _main_workbook(args: argparse.Namespace) -> int:
    n = FADA_WORKBOOK_ROWS if args.images == SEED_ABDOMEN_IMAGES else args.images
    with tempfile.TemporaryDirectory(prefix="fada-scale-") as tmp:
        root = Path(tmp) / "data"
        t0 = time.perf_counter()
        make_workbook(root, n, size=args.size)
        print(f"generated a {n}-row workbook and {n} scans in {time.perf_counter() - t0:.1f} s", flush=True)
        result = measure_workbook(root, Path(tmp) / "outputs")
    result["image_size"] = args.size
    print(describe_workbook(result, args.size))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["status"] == "ok" else 1


if __name__ == "__main__":
    sys.exit(main())
