"""How long an answer may be: by default what the training answers need (the longest in
tokens plus a margin, recorded with the adapter), and every answer cut off by the limit
(no EOS) is counted, per question, in the metrics and marked in the predictions."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fada_batch.config import config_from_dict, dump_yaml, load_job
from fada_batch.run.task import run_category
from fada_batch.training.outputs import FINAL_MODEL

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tiny_model_dir, demo_root, tmp_path_factory):
    raw = load_job(REPO / "job" / "demo.yaml").to_dict()
    raw["data"].update(root=str(demo_root), num_images=24)
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["output"]["root"] = str(tmp_path_factory.mktemp("limits") / "out")
    raw["train"].update(num_epochs=6, log_every_s=1000.0, checkpoint_every_steps=0)
    cfg = config_from_dict(raw)
    assert cfg.eval.max_new_tokens is None and cfg.eval.after_training
    summary = run_category(cfg, "Femur")
    return cfg, summary, Path(cfg.output.root) / "blip2_femur"


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "eval" / "predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_the_limit_is_what_the_training_answers_need_and_is_recorded(trained):
    from fada_batch.data.categories import get_category
    from fada_batch.data.samples import prepare_data
    from fada_batch.evaluation.evaluate import load_adapter, make_encoder, read_adapter_info
    from fada_batch.training.model import load_base_model

    cfg, summary, out = trained
    cs = prepare_data(cfg, get_category("Femur"), out, resuming=True)
    loaded = load_base_model(cfg.model.name_or_path, device="cpu")
    load_adapter(loaded, out / FINAL_MODEL)
    encoder = make_encoder(loaded, 2)
    lengths = [len(encoder.encode(s).input_ids) - encoder.encode(s).prompt_len for s in cs.train]
    longest = max(lengths)  # answer tokens + EOS
    info = read_adapter_info(out / FINAL_MODEL)
    assert (
        info.max_new_tokens
        == longest + max(8, -(-longest // 4))
        == summary["answer_tokens"]["max_new_tokens"]
    )
    assert summary["answer_tokens"]["max"] == longest
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["settings"]["max_new_tokens"] == info.max_new_tokens == summary["eval"]["max_new_tokens"]


def test_answers_cut_off_by_the_limit_are_counted(trained, tmp_path, capsys):
    """`-p eval.max_new_tokens=1`: every answer longer than one token ends without EOS; the
    counts per question match the predictions' no_eos column; the default limit cuts fewer."""
    from fada_batch.cli import main

    cfg, _summary, out = trained
    default = json.loads((out / "eval" / "metrics.json").read_text())["no_eos"]
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    assert main(["evaluate", "--job", str(job), "-p", "eval.max_new_tokens=1"]) == 0
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    rows = _rows(out)
    assert metrics["settings"]["max_new_tokens"] == 1
    cut = metrics["no_eos"]["adapter"]
    assert cut["overall"] == sum(r["adapter_no_eos"] == "1" for r in rows) > default["adapter"]["overall"]
    for q, n in cut.items():
        if q != "overall":
            assert n == sum(r["adapter_no_eos"] == "1" for r in rows if r["question"] == q), q
    assert cut["overall"] >= 0.9 * metrics["n_pairs"]  # the trained answers are longer than 1 token
    assert metrics["no_eos"]["base"]["overall"] == sum(r["base_no_eos"] == "1" for r in rows)


def test_ask_takes_the_recorded_limit_unless_told(trained, demo_root, capsys):
    from fada_batch.cli import main
    from fada_batch.evaluation.ask import Asker
    from fada_batch.evaluation.evaluate import GenerationSettings, read_adapter_info

    _cfg, _summary, out = trained
    recorded = read_adapter_info(out / FINAL_MODEL).max_new_tokens
    assert Asker(out / FINAL_MODEL, device="cpu").settings.max_new_tokens == recorded
    told = Asker(out / FINAL_MODEL, device="cpu", settings=GenerationSettings(max_new_tokens=1))
    image = next((demo_root / "Fetal Ultrasound" / "Femur").glob("*.png"))
    rows = told.ask([image], ["Q1"])
    assert rows[0]["cut_off"] is True
    assert main(["ask", "--adapter", str(out / FINAL_MODEL), "--image", str(image), "--question", "Q1",
                 "--max-new-tokens", "1"]) == 0  # fmt: skip
    assert "[cut off: no EOS within max_new_tokens]" in capsys.readouterr().out
