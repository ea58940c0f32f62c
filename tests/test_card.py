"""The model card written with the adapter: `README.md` in `final_model/`, front matter the hub and
peft read, and the facts of the run (data, normalisation, settings, shipped step, scores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fada_batch.evaluation.evaluate import card_scores, publish_scores
from fada_batch.run.task import run_category
from fada_batch.training.card import EVAL_SECTION, front_matter, hub_base_model, replace_section
from fada_batch.training.outputs import FINAL_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture()
def femur(job_factory):
    cfg = job_factory(
        {
            "data.num_images": 16,
            "data.normalize": "spelling",
            "train.num_epochs": 2,
            "train.batch_size": 8,
            "eval.after_training": True,
        }
    )
    summary = run_category(cfg, "Femur")
    return cfg, summary, Path(summary["output_dir"])


def test_card_front_matter_and_content(femur, tiny_model_dir):
    _cfg, summary, out = femur
    text = (out / FINAL_MODEL / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    assert meta["base_model"] == str(tiny_model_dir)
    assert meta["library_name"] == "peft"
    assert {"lora", "peft", "blip-2", "fetal-ultrasound", "fada-batch"} <= set(meta["tags"])
    assert front_matter(text) == meta
    # the hub's own reader agrees
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / FINAL_MODEL / "README.md")
    assert card.data.library_name == "peft" and card.data.base_model == str(tiny_model_dir)
    body = text.split("\n---\n", 1)[1]
    images, pairs = summary["images"], summary["qa_pairs"]
    for split in ("train", "val", "test"):
        assert f"| {split} | {images[split]} | {pairs[split]} |" in body
    shipped = summary["shipped"]
    assert f"the adapter of step {shipped['step']} ({shipped['kind']}): {shipped['reason']}" in body
    assert "`data.normalize: spelling`" in body and "Femur" in body
    assert "LoRA r=8, alpha=16, dropout=0.0 on q_proj, v_proj" in body
    assert "first 16 usable images" in body and "Femur_image_list.xlsx" in body
    for heading in ("## How to use", "## Training data", "## Training", "## Intended use", "## Limitations"):
        assert heading in body, heading
    assert "not a medical device" in body
    # held-out scores per question against the baselines, from eval/metrics.json
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    scores = body.split(f"<!-- fada-batch:{EVAL_SECTION} -->", 1)[1].split("<!-- /fada-batch", 1)[0]
    assert "Not evaluated yet" not in scores
    for q, block in metrics["adapter"].items():
        if q == "overall":
            continue
        row = next(line for line in scores.splitlines() if line.startswith(f"| {q} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == str(block["n"])
        assert cells[2:] == [
            f"{metrics[m][q]['exact_match']:.3f}|{metrics[m][q]['token_f1']:.3f}".split("|")[i]
            for m in ("adapter", "base", "majority")
            for i in (0, 1)
        ]
    # evaluation run again: the section is replaced, not repeated
    publish_scores(out, metrics, tensorboard=False)
    again = (out / FINAL_MODEL / "README.md").read_text()
    assert again.count(f"<!-- fada-batch:{EVAL_SECTION} -->") == 1 and again == text


def test_replace_section_appends_to_a_card_without_one():
    text = "---\nbase_model: x\n---\n# hand-written\n"
    out = replace_section(text, EVAL_SECTION, "scores")
    assert out.endswith(f"<!-- fada-batch:{EVAL_SECTION} -->\nscores\n<!-- /fada-batch:{EVAL_SECTION} -->\n")
    assert replace_section(out, EVAL_SECTION, "new").count("scores") == 0


def test_hub_base_model_of_a_staged_folder(tmp_path):
    folder = tmp_path / "blip2-opt-2.7b"
    folder.mkdir()
    assert hub_base_model(str(folder)) == str(folder)
    (folder / "fada_staged.json").write_text(json.dumps({"source": "Salesforce/blip2-opt-2.7b"}))
    assert hub_base_model(str(folder)) == "Salesforce/blip2-opt-2.7b"
    assert hub_base_model("Salesforce/blip2-opt-2.7b") == "Salesforce/blip2-opt-2.7b"


def test_card_scores_table():
    block = {"n": 2, "exact_match": 0.5, "token_f1": 0.75}
    metrics = {m: {"Q1": block, "overall": block} for m in ("adapter", "base", "majority")} | {
        "settings": {"split": "test", "max_new_tokens": 9},
        "n_pairs": 2,
        "n_images": 1,
    }
    text = card_scores(metrics)
    assert "| Q1 | 2 | 0.500 | 0.750 | 0.500 | 0.750 | 0.500 | 0.750 |" in text
    assert "| **overall** |" in text and "1 held-out image" in text
