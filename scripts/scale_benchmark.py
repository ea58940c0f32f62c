#!/usr/bin/env python
"""The pre-flight check and the split at the size of the seed's largest category (Abdomen).

    python scripts/scale_benchmark.py                          # 2,424 scans of 256 px
    python scripts/scale_benchmark.py --size 720 --json s.json # larger scans; figures as JSON too

Writes one category of N generated scans and a label sheet of N rows (the demo's answers and
blemishes: names without extension, double spaces, trailing periods, empty cells) into a
temporary data root, then times, through production's code:

- the pre-flight check, `validate.preflight` (what `fada-batch validate` and `submit` run):
  the sheet parsed, every listed image resolved inside the folder, verified and decoded;
- training's data step, `samples.prepare_data`: the same load, the split by image,
  `split.json`, and the question/answer samples.

It also prints the memory of the frozen-feature cache for that category with
blip2-opt-2.7b's shapes (32 query tokens x 2,560 hidden per image), computed from the split's
image counts: the cache holds one such tensor per train and validation image, on the
training device, in the model's dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from fada_batch.config import config_from_dict
from fada_batch.data.categories import IMAGES_DIR, LABELS_DIR, SHEET_SUFFIX, get_category
from fada_batch.data.samples import prepare_data
from fada_batch.data.validate import preflight
from fada_batch.tools.bench.model import BLIP2_OPT_27B
from fada_batch.tools.demo import _sheet_frame, render_scan

SEED_ABDOMEN_IMAGES = 2424  # the seed data set's largest category
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


def feature_cache_bytes(images: int, dtype: str = "bfloat16") -> int:
    """Bytes of cached features for `images` images at blip2-opt-2.7b's shapes."""
    return images * QUERY_TOKENS * TEXT_HIDDEN * DTYPE_BYTES[dtype]


def measure(root: Path, out: Path) -> dict[str, Any]:
    """Time the pre-flight check and `prepare_data` on the category under `root`."""
    cfg = config_from_dict({"data": {"root": str(root), "categories": ["Abdomen"]}})
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
    args = parser.parse_args(argv)
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


if __name__ == "__main__":
    sys.exit(main())
