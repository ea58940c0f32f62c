"""`fada-batch export`: a clean adapter folder, and the adapter merged into a plain transformers
model that answers as the adapter does (the tiny model, the demo's held-out images)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from fada_batch.cli import main
from fada_batch.data.images import load_image_rgb
from fada_batch.evaluation.ask import Asker
from fada_batch.run.task import run_category
from fada_batch.tools.export import EXPORTS_FILE
from fada_batch.training.card import front_matter
from fada_batch.training.outputs import FINAL_MODEL

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def femur(tiny_model_dir, demo_root, tmp_path_factory):
    """(final_model folder, [(image file, question, prompt, adapter answer)] of the held-out
    pairs from training's own evaluation, the job config)."""
    from fada_batch.config import config_from_dict, load_job
    from fada_batch.data.categories import get_category
    from fada_batch.data.samples import prepare_data

    raw = load_job(Path(__file__).resolve().parent.parent / "job" / "demo.yaml").to_dict()
    raw["data"].update(root=str(demo_root), num_images=24)
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["output"]["root"] = str(tmp_path_factory.mktemp("export") / "out puts")
    raw["train"].update(num_epochs=4, checkpoint_every_steps=0, log_every_s=1000.0)
    cfg = config_from_dict(raw)
    summary = run_category(cfg, "Femur")
    out = Path(summary["output_dir"])
    files = prepare_data(cfg, get_category("Femur"), out, resuming=True).image_paths
    with (out / "eval" / "predictions.csv").open(newline="") as f:
        rows = [
            (
                files[r["image"]],
                r["question"],
                cfg.data.prompt_template.format(question=r["question_text"]),
                r["adapter_prediction"],
            )
            for r in csv.DictReader(f)
        ]
    return out / FINAL_MODEL, rows, cfg


def _plain_answers(folder: Path, rows: list) -> list[str]:
    """Answers of the folder loaded with plain transformers only (no peft, no fada_batch model code)."""
    from transformers import Blip2ForConditionalGeneration, Blip2Processor, GenerationConfig

    model = Blip2ForConditionalGeneration.from_pretrained(folder).eval()
    processor = Blip2Processor.from_pretrained(folder)
    limit = GenerationConfig.from_pretrained(folder).max_new_tokens  # the adapter's answer limit
    assert limit is not None
    answers = []
    with torch.no_grad():
        for image, _q, prompt, _a in rows:
            inputs = processor(images=load_image_rgb(image), text=prompt, return_tensors="pt")
            out = model.generate(**inputs, do_sample=False, max_new_tokens=limit)  # EOS: the text config
            new = out[0, inputs["input_ids"].shape[1] :]
            answers.append(processor.decode(new, skip_special_tokens=True).strip())
    return answers


def test_merged_fp32_export_loads_with_plain_transformers_and_answers_as_the_adapter(femur, tmp_path, capsys):
    adapter, rows, _cfg = femur
    out = tmp_path / "merged fp32"
    assert main(["export", "--adapter", str(adapter), "--to", str(out), "--merge", "--dtype", "fp32"]) == 0
    assert "Blip2ForConditionalGeneration.from_pretrained" in capsys.readouterr().out
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md"} <= names
    assert "adapter_config.json" not in names and "adapter_model.safetensors" not in names
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert not [k for k in keys if "lora_" in k or "modules_to_save" in k or "base_layer" in k]
        assert f.get_tensor(keys[0]).dtype == torch.float32
    got = _plain_answers(out, rows)
    want = [a for *_, a in rows]
    assert len(rows) >= 16 and got == want
    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["library_name"] == "transformers" and "merged-lora" in meta["tags"]
    assert "merged into a float32 copy" in card
    # recorded for the collector
    recorded = json.loads((adapter.parent / EXPORTS_FILE).read_text())
    assert [(e["path"], e["merged"], e["dtype"]) for e in recorded] == [(str(out.resolve()), True, "float32")]


def test_merged_bf16_export_is_bf16_and_loads(femur, tmp_path):
    adapter, rows, _cfg = femur
    out = tmp_path / "merged"
    assert main(["export", "--adapter", str(adapter), "--to", str(out), "--merge"]) == 0
    from transformers import Blip2ForConditionalGeneration

    model = Blip2ForConditionalGeneration.from_pretrained(out)
    assert model.language_model.model.decoder.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    answers = _plain_answers(out, rows[:8])
    assert all(isinstance(a, str) for a in answers) and any(answers)
    # an existing OUT is kept unless --force
    assert main(["export", "--adapter", str(adapter), "--to", str(out), "--merge"]) == 1
    assert main(["export", "--adapter", str(adapter), "--to", str(out), "--merge", "--force"]) == 0


def test_adapter_export_is_a_clean_folder_that_answers_the_same(femur, tmp_path):
    adapter, rows, _cfg = femur
    out = tmp_path / "publish"
    assert main(["export", "--adapter", str(adapter), "--to", str(out)]) == 0
    names = {p.name for p in out.iterdir()}
    for f in ("adapter_config.json", "adapter_model.safetensors", "README.md", "fada_batch.json"):
        assert f in names, f
    assert "config.yaml" not in names  # the job's site paths stay home
    assert front_matter((out / "README.md").read_text())["library_name"] == "peft"
    image, question, _prompt, answer = rows[0]
    asked = Asker(out, device="cpu").ask([image], [question])
    assert asked[0]["answer"] == answer


def test_merge_into_a_quantized_base_is_refused_with_the_way_that_works(
    femur, tmp_path, tiny_model_dir, capsys
):
    adapter, _rows, _cfg = femur
    for dtype in ("8bit", "4bit"):
        assert (
            main(
                [
                    "export",
                    "--adapter",
                    str(adapter),
                    "--to",
                    str(tmp_path / "q"),
                    "--merge",
                    "--dtype",
                    dtype,
                ]
            )
            == 1
        )
        err = capsys.readouterr().err
        assert "cannot merge" in err and "--dtype bfloat16" in err and "--dtype float32" in err
    assert not (tmp_path / "q").exists()
    # a base model folder saved with 8-bit weights
    quantized = tmp_path / "tiny 8bit"
    shutil.copytree(tiny_model_dir, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"load_in_8bit": True, "quant_method": "bitsandbytes"}
    (quantized / "config.json").write_text(json.dumps(config))
    argv = ["export", "--adapter", str(adapter), "--to", str(tmp_path / "q"), "--merge"]
    assert main([*argv, "--base-model", str(quantized)]) == 1
    err = capsys.readouterr().err
    assert "8-bit weights" in err and "original bf16/fp32 model" in err
    assert main(["export", "--adapter", str(tmp_path / "nothing"), "--to", str(tmp_path / "q")]) == 1
    assert "does not exist" in capsys.readouterr().err
