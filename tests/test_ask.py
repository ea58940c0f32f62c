"""`fada-batch ask`: a trained adapter answers questions about demo scans on the CPU.

One short Femur run (evaluated at the end of training) provides the adapter; `ask` must give
the same answers as the evaluation for the same held-out image, and clear errors for a
missing adapter, an adapter on another base model, an unreadable image and an uncached base
model while offline.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from fada_batch.cli import main
from fada_batch.data.categories import STANDARD_QUESTIONS
from fada_batch.evaluation.ask import Asker, AskError
from fada_batch.run.task import run_category
from fada_batch.training.outputs import FINAL_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def femur_adapter(tiny_model_dir, demo_root, tmp_path_factory):
    """(final_model folder, {image name: {Q: adapter prediction}}, {image name: file})."""
    from fada_batch.config import config_from_dict, load_job
    from fada_batch.data.categories import get_category
    from fada_batch.data.samples import prepare_data

    raw = load_job(Path(__file__).resolve().parent.parent / "job" / "demo.yaml").to_dict()
    raw["data"].update(root=str(demo_root), num_images=24)
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["output"]["root"] = str(tmp_path_factory.mktemp("ask") / "out puts")
    raw["train"].update(num_epochs=4, checkpoint_every_steps=0, log_every_s=1000.0)
    cfg = config_from_dict(raw)
    summary = run_category(cfg, "Femur")
    out = Path(summary["output_dir"])
    predictions: dict[str, dict[str, str]] = {}
    with (out / "eval" / "predictions.csv").open(newline="") as f:
        for row in csv.DictReader(f):
            predictions.setdefault(row["image"], {})[row["question"]] = row["adapter_prediction"]
    files = prepare_data(cfg, get_category("Femur"), out, resuming=True).image_paths
    return out / FINAL_MODEL, predictions, files


def test_ask_a_demo_image_on_cpu_matches_evaluation(femur_adapter):
    adapter, predictions, images = femur_adapter
    asker = Asker(adapter, device="cpu")
    assert asker.loaded.device.type == "cpu"
    name = sorted(predictions)[0]  # a held-out image
    rows = asker.ask([images[name]])
    assert [r["question_id"] for r in rows] == [f"Q{i}" for i in range(1, 9)]
    assert [r["question"] for r in rows] == list(STANDARD_QUESTIONS)
    for r in rows:
        if r["question_id"] in predictions[name]:  # empty reference cells are not evaluated
            assert r["answer"] == predictions[name][r["question_id"]], r
    both = asker.ask([images[name], images[name]], ["Q6", "Estimate the gestational age"], with_base=True)
    assert len(both) == 4 and both[0]["answer"] == both[2]["answer"] == rows[5]["answer"]
    assert both[1]["question_id"] is None and all("base_answer" in r for r in both)
    with pytest.raises(AskError, match=r"only Q1\.\.Q8"):
        asker.ask([images[name]], ["Q9"])


def test_ask_cli_folder_json(femur_adapter, tmp_path, capsys):
    adapter, predictions, images = femur_adapter
    folder = tmp_path / "two scans"
    folder.mkdir()
    names = sorted(predictions)[:2]
    for n in names:
        shutil.copy(images[n], folder / images[n].name)
    (folder / "notes.txt").write_text("not an image")
    code = main(
        [
            "ask",
            "--adapter",
            str(adapter),
            "--image",
            str(folder),
            "--question",
            "Q2",
            "--json",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    rows = json.loads(capsys.readouterr().out)
    assert [Path(r["image"]).name for r in rows] == [images[n].name for n in names]
    assert [r["answer"] for r in rows] == [predictions[n]["Q2"] for n in names]
    code = main(
        ["ask", "--adapter", str(adapter), "--image", str(folder / images[names[0]].name), "--device", "cpu"]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert str(folder / images[names[0]].name) in text and "Q8 " in text and "->" in text


def _ask(capsys, *argv: str) -> tuple[int, str]:
    code = main(["ask", *argv, "--device", "cpu"])
    return code, capsys.readouterr().err


def test_ask_missing_adapter(femur_adapter, tmp_path, capsys):
    adapter, predictions, images = femur_adapter
    image = str(images[sorted(predictions)[0]])
    code, err = _ask(capsys, "--adapter", str(tmp_path / "nowhere"), "--image", image)
    assert code == 1 and "does not exist" in err and "final_model" in err
    code, err = _ask(capsys, "--adapter", str(adapter.parent), "--image", image)  # category folder
    assert code == 1 and "no adapter_config.json" in err and f"did you mean {adapter}" in err
    broken = tmp_path / "final_model"
    shutil.copytree(adapter, broken)
    (broken / "adapter_model.safetensors").unlink()
    code, err = _ask(capsys, "--adapter", str(broken), "--image", image)
    assert code == 1 and "no adapter_model.safetensors" in err


def test_ask_refuses_another_base_model(femur_adapter, tiny_model_dir, tmp_path, capsys):
    adapter, predictions, images = femur_adapter
    image = str(images[sorted(predictions)[0]])
    other = tmp_path / "other base"
    shutil.copytree(tiny_model_dir, other)
    code, err = _ask(capsys, "--adapter", str(adapter), "--image", image, "--base-model", str(other))
    assert code == 1
    assert "trained on the base model" in err and str(other) in err and "--allow-base-mismatch" in err
    code, _err = _ask(
        capsys,
        "--adapter",
        str(adapter),
        "--image",
        image,
        "--base-model",
        str(other),
        "--allow-base-mismatch",
    )
    assert code == 0  # the same weights under another path: accepted when asked for


def test_ask_unreadable_image(femur_adapter, tmp_path, capsys):
    adapter, _predictions, _images = femur_adapter
    bad = tmp_path / "scan.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    code, err = _ask(capsys, "--adapter", str(adapter), "--image", str(bad))
    assert code == 1 and "cannot be read" in err and str(bad) in err
    code, err = _ask(capsys, "--adapter", str(adapter), "--image", str(tmp_path / "missing.png"))
    assert code == 1 and "does not exist" in err
    empty = tmp_path / "empty folder"
    empty.mkdir()
    code, err = _ask(capsys, "--adapter", str(adapter), "--image", str(empty))
    assert code == 1 and "holds no images" in err


def test_ask_offline_uncached_base_model(femur_adapter, tmp_path, capsys, monkeypatch):
    """An adapter whose base model is a hub id that is not in the cache, with HF_HUB_OFFLINE=1."""
    adapter, predictions, images = femur_adapter
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / "final_model"
    shutil.copytree(adapter, copy)
    config = json.loads((copy / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "fada-test/blip2-not-cached"
    (copy / "adapter_config.json").write_text(json.dumps(config))
    code, err = _ask(capsys, "--adapter", str(copy), "--image", str(images[sorted(predictions)[0]]))
    assert code == 1 and "HF_HUB_OFFLINE=1" in err and "fada-test/blip2-not-cached" in err


def test_ask_generation_flags(femur_adapter, capsys):
    """--num-beams, --no-repeat-ngram-size and --repetition-penalty are checked and used."""
    adapter, predictions, images = femur_adapter
    name = sorted(predictions)[0]
    code, err = _ask(
        capsys, "--adapter", str(adapter), "--image", str(images[name]), "--no-repeat-ngram-size", "-2"
    )
    assert code != 0 and "no_repeat_ngram_size must be >= 0, got -2" in err
    code, err = _ask(
        capsys, "--adapter", str(adapter), "--image", str(images[name]), "--repetition-penalty", "0"
    )
    assert code != 0 and "repetition_penalty must be > 0" in err
    argv = ["--adapter", str(adapter), "--image", str(images[name]), "--question", "Q2", "--json"]
    assert main(["ask", *argv, "--device", "cpu", "--num-beams", "2", "--no-repeat-ngram-size", "2"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1 and isinstance(rows[0]["answer"], str)
