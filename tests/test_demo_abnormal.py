"""The demo's abnormal finding: drawn into a minority of scans, answered on Q7, and learned.

`make_demo_data(abnormal_fraction=...)` draws a large echogenic mass into that share of the
scans and answers Q7 "<Region> abnormality seen" for them. The learning test trains the demo
job's LoRA recipe (job/demo.yaml: r 8, lr 1e-2, batch 16, cosine) for 10 epochs on Femur with
15% abnormal scans (160 images, 50/10/40 split: 64 held out, 13 of them abnormal) for three
seeds, and asks for sensitivity and specificity for "abnormal" of at least 0.9 on Q7, where
the majority answer ("No abnormality seen") has sensitivity 0. Measured settings and
figures: docs/evaluation.md (the demo learns an abnormality).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fada_batch.cli import main
from fada_batch.config import config_from_dict, load_job
from fada_batch.data.categories import IMAGES_DIR, LABELS_DIR
from fada_batch.evaluation.question_scores import first_label, load_scoring_tables
from fada_batch.run.task import run_category
from fada_batch.text import clean_answer
from fada_batch.tools.demo import ABNORMAL_ANSWERS, DEMO_LAYOUT, make_demo_data

REPO = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)
FRACTION = 0.15  # a minority, as abnormal answers are in the real sheets
IMAGES = 160  # Femur scans: 24 abnormal
SPLIT = {"train_fraction": 0.5, "val_fraction": 0.1, "test_fraction": 0.4}  # 64 held out
EPOCHS = 10  # passed on seeds 0-2 at 8 epochs; one seed of three failed at 4
THRESHOLD = 0.9  # the bar; measured 1.0 for both on seeds 0-2 (docs/evaluation.md)
MIN_HELD_OUT_ABNORMAL = 10  # so that 0.9 means more than one scan right
Q7 = 6  # question index of the Normality Assessment

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _sheet(root: Path, stem: str) -> pd.DataFrame:
    return pd.read_excel(root / LABELS_DIR / f"{stem}_image_list.xlsx", dtype=str, keep_default_na=False)


def test_a_minority_is_abnormal_and_q7_says_so(tmp_path: Path) -> None:
    info = make_demo_data(tmp_path / "ab", images_per_category=40, abnormal_fraction=FRACTION)
    tables = load_scoring_tables()
    for name, _folder, stem in DEMO_LAYOUT:
        abnormal = set(info["abnormal"][name])
        assert len(abnormal) == 6, name  # round(0.15 * 40)
        if stem is None:
            continue
        sheet = _sheet(tmp_path / "ab", stem)
        names = sheet["Image Name"].map(lambda n: n if n.endswith(".png") else f"{n}.png")
        q7 = dict(zip(names, sheet.iloc[:, 1 + Q7].map(clean_answer), strict=True))  # as training cleans
        for file, answer in q7.items():
            if answer == "":  # the demo's empty-cell blemish
                continue
            want = "abnormal" if file in abnormal else "normal"
            assert first_label(answer, tables.normality) == want, (name, file, answer)
            if file in abnormal:
                assert answer == ABNORMAL_ANSWERS[name]
    assert json.loads((tmp_path / "ab" / "fada_demo_data.json").read_text())["abnormal_fraction"] == FRACTION


def test_the_finding_is_visible_and_leaves_the_other_scans_alone(tmp_path: Path) -> None:
    plain = make_demo_data(tmp_path / "plain", images_per_category=40)
    ab = make_demo_data(tmp_path / "ab", images_per_category=40, abnormal_fraction=FRACTION)
    assert plain["abnormal"] == {name: [] for name in ab["abnormal"]}
    for name, folder, _stem in DEMO_LAYOUT:
        for path in sorted((tmp_path / "plain" / IMAGES_DIR / folder).iterdir()):
            before = np.asarray(Image.open(path), dtype=np.float64)
            after = np.asarray(
                Image.open(tmp_path / "ab" / IMAGES_DIR / folder / path.name), dtype=np.float64
            )
            if path.name in ab["abnormal"][name]:
                # a bright disc of radius ~0.15: about 7% of the image turns near-white
                brighter = (after - before) > 100
                assert brighter.mean() > 0.03, (name, path.name, brighter.mean())
            else:
                assert np.array_equal(before, after), (name, path.name)


def test_fraction_outside_a_minority_is_refused(tmp_path: Path, capsys) -> None:
    with pytest.raises(ValueError, match=r"abnormal_fraction must be in \[0, 0.5\].*got 0.6"):
        make_demo_data(tmp_path, abnormal_fraction=0.6)
    assert main(["make-demo-data", str(tmp_path / "cli"), "--abnormal-fraction", "-0.1"]) == 2
    assert "abnormal_fraction must be in [0, 0.5]" in capsys.readouterr().err
    code = main(
        ["make-demo-data", str(tmp_path / "cli"), "--images-per-category", "20", "--abnormal-fraction", "0.2"]
    )
    assert code == 0
    assert json.loads((tmp_path / "cli" / "fada_demo_data.json").read_text())["abnormal_fraction"] == 0.2
    assert len(_sheet(tmp_path / "cli", "Femur")) == 20


@pytest.fixture(scope="module")
def abnormal_runs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict]:
    """Femur with 15% abnormal scans, trained with the demo recipe for seeds 0, 1, 2 (and
    evaluated at the end of training): seed -> eval/metrics.json."""
    root = tmp_path_factory.mktemp("abnormal data") / "scans"
    make_demo_data(root, images_per_category=IMAGES, abnormal_fraction=FRACTION)
    runs = {}
    for seed in SEEDS:
        raw = load_job(REPO / "job" / "demo.yaml").to_dict()
        raw["data"].update(root=str(root), categories=["Femur"], num_images=None, **SPLIT)
        raw["model"]["name_or_path"] = str(tiny_model_dir)
        raw["output"]["root"] = str(tmp_path_factory.mktemp("abnormal") / f"seed {seed}")
        raw["train"].update(seed=seed, num_epochs=EPOCHS, log_every_s=1000.0, checkpoint_every_steps=0)
        cfg = config_from_dict(raw)
        summary = run_category(cfg, "Femur")
        assert summary["status"] == "completed", summary
        out = Path(cfg.output.root) / "blip2_femur"
        runs[seed] = json.loads((out / "eval" / "metrics.json").read_text())
    return runs


@pytest.mark.parametrize("seed", SEEDS)
def test_the_adapter_detects_the_abnormality_the_majority_misses(abnormal_runs, seed) -> None:
    q7 = abnormal_runs[seed]["questions"]["Q7"]
    adapter, majority = q7["adapter"], q7["majority"]
    held_out_abnormal = sum(adapter["confusion"]["abnormal"].values())
    assert held_out_abnormal >= MIN_HELD_OUT_ABNORMAL, adapter["confusion"]
    assert majority["sensitivity"] == 0.0, majority  # "No abnormality seen" for every scan
    assert majority["specificity"] == 1.0, majority
    figures = {k: (adapter[k], adapter[f"{k}_ci"]) for k in ("sensitivity", "specificity")}
    assert adapter["sensitivity"] >= THRESHOLD, f"seed {seed}: {figures}, confusion {adapter['confusion']}"
    assert adapter["specificity"] >= THRESHOLD, f"seed {seed}: {figures}, confusion {adapter['confusion']}"
