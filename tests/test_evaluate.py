"""Evaluation on held-out images: files, metrics, baselines, generation, the CLI and errors.

The margin test trains the demo job's LoRA recipe (job/demo.yaml: dropout 0, final LayerNorm
trained, lr 5e-3, batch 16, cosine) for 16 epochs on one category of demo data with 200 images
(30 held out) for three seeds, and asks that the adapter beat both the majority answer and
the base model by at least 0.2 exact match on a question whose answer depends on the image.
Measured settings and numbers: docs/evaluation.md.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from pathlib import Path

import pytest

from fada_batch.cli import main
from fada_batch.config import config_from_dict, dump_yaml, load_job
from fada_batch.evaluation.evaluate import (
    MODELS,
    PREDICTION_COLUMNS,
    AdapterError,
    EvaluationError,
    GenerationSettings,
    evaluate_category,
    generate_answers,
    left_pad,
    load_adapter,
    make_encoder,
    read_adapter_info,
    same_base_model,
)
from fada_batch.evaluation.metrics import METRIC_NAMES, aggregate, majority_answers
from fada_batch.run.task import run_category
from fada_batch.training.features import FeatureSource
from fada_batch.training.model import load_base_model
from fada_batch.training.outputs import FINAL_MODEL

REPO = Path(__file__).resolve().parent.parent
SEEDS = (0, 1, 2)
IMAGE_QUESTIONS = ("Q2", "Q6")  # side of the structure, noise level: drawn into the scan
MARGIN = 0.2
MARGIN_IMAGES = 120  # demo images in the category (70/15/15 split: 18 held out)
MARGIN_EPOCHS = 20  # the demo job's epochs
QUESTIONS = [f"Q{i}" for i in range(1, 9)]


def _demo_cfg(data_root: Path, model_dir: Path, out: Path, **train):
    raw = load_job(REPO / "job" / "demo.yaml").to_dict()
    raw["data"].update(root=str(data_root), num_images=None)
    raw["model"]["name_or_path"] = str(model_dir)
    raw["output"]["root"] = str(out)
    raw["train"].update(log_every_s=1000.0, checkpoint_every_steps=0, **train)
    assert raw["eval"]["after_training"] is True  # the demo job evaluates at the end
    return config_from_dict(raw)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def margin_runs(tiny_model_dir, tmp_path_factory):
    """Femur trained with the demo recipe for seeds 0, 1, 2 (evaluated at the end of training)."""
    from fada_batch.tools.demo import make_demo_data

    root = tmp_path_factory.mktemp("eval data") / "it's 200 scans"
    make_demo_data(root, images_per_category=MARGIN_IMAGES)
    runs = {}
    for seed in SEEDS:
        out = tmp_path_factory.mktemp("eval") / f"seed {seed}"
        cfg = _demo_cfg(root, tiny_model_dir, out, seed=seed, num_epochs=MARGIN_EPOCHS)
        summary = run_category(cfg, "Femur")
        runs[seed] = (cfg, summary, Path(cfg.output.root) / "blip2_femur")
    return runs


def _metrics(out: Path) -> dict:
    return json.loads((out / "eval" / "metrics.json").read_text())


def _predictions(out: Path) -> list[dict[str, str]]:
    with (out / "eval" / "predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_eval_files_cover_every_question(margin_runs):
    _cfg, summary, out = margin_runs[0]
    metrics = _metrics(out)
    split = json.loads((out / "split.json").read_text())
    for model in MODELS:
        assert list(metrics[model]) == [*QUESTIONS, "overall"], model
        for block in metrics[model].values():
            assert set(block) == {"n", *METRIC_NAMES}
            assert all(0.0 <= block[m] <= 1.0 for m in METRIC_NAMES)
    assert metrics["n_images"] == len(split["test"]) == round(MARGIN_IMAGES * 0.15)
    assert metrics["n_pairs"] == sum(metrics["adapter"][q]["n"] for q in QUESTIONS)
    recorded = read_adapter_info(out / FINAL_MODEL).max_new_tokens  # from the training answers
    assert metrics["settings"] == {
        "max_new_tokens": recorded,
        "num_beams": 1,
        "batch_size": 16,
        "no_repeat_ngram_size": 0,
        "repetition_penalty": 1.0,
        "do_sample": False,
        "split": "test",
        "eos_token_id": 2,
    }
    # each question on its own terms, with intervals and paired tests
    clinical = metrics["questions"]
    assert list(clinical) == [*QUESTIONS, "overall"]
    assert clinical["Q5"]["name"] == "Gestational Age" and clinical["Q5"]["headline"][0] == "ga_within_2w"
    for q in QUESTIONS:
        for model in MODELS:
            block = clinical[q][model]
            assert block["exact_match"] == pytest.approx(metrics[model][q]["exact_match"])
            low, high = block["exact_match_ci"]
            assert low <= block["exact_match"] <= high
        assert set(clinical[q]["tests"]["exact_match"]) == {"base", "majority"}
    assert (
        sum(sum(row.values()) for row in clinical["Q7"]["adapter"]["confusion"].values())
        == metrics["adapter"]["Q7"]["n"]
    )
    assert clinical["overall"]["adapter"]["exact_match"] == pytest.approx(
        metrics["adapter"]["overall"]["exact_match"]
    )
    assert summary["eval"]["generation"] == {
        "num_beams": 1,
        "no_repeat_ngram_size": 0,
        "repetition_penalty": 1.0,
        "max_new_tokens": recorded,
    }
    rows = _predictions(out)
    assert tuple(rows[0]) == PREDICTION_COLUMNS
    assert len(rows) == metrics["n_pairs"]
    assert {r["image"] for r in rows} == set(split["test"])  # held-out images only
    # the summary carries the same numbers, and the collector reads metrics.json
    ev = summary["eval"]
    assert ev["overall"] == metrics["adapter"]["overall"]
    assert ev["base_overall"] == metrics["base"]["overall"]
    assert ev["majority_overall"] == metrics["majority"]["overall"]
    assert ev["per_question"]["Q6"]["majority"] == metrics["majority"]["Q6"]
    on_disk = json.loads((out / "training_summary.json").read_text())
    assert on_disk["status"] == "completed" and on_disk["eval"] == ev
    assert not [p for p in (out / "eval").iterdir() if ".tmp-" in p.name]


def test_predictions_reproduce_metrics_and_majority(margin_runs):
    """metrics.json is exactly `aggregate` over predictions.csv; the majority column is the
    most frequent training answer of each question."""
    from fada_batch.data.samples import prepare_data

    cfg, _summary, out = margin_runs[0]
    rows = _predictions(out)
    metrics = _metrics(out)
    for model in MODELS:
        again = aggregate(
            {
                "question": int(r["question"][1:]) - 1,
                "reference": r["reference"],
                "prediction": r[f"{model}_prediction"],
            }
            for r in rows
        )
        assert again == metrics[model], model
    from fada_batch.data.categories import get_category

    cs = prepare_data(cfg, get_category("Femur"), out, resuming=True)
    majority = majority_answers((s.question_index, s.answer) for s in cs.train)
    for r in rows:
        assert r["majority_prediction"] == majority[int(r["question"][1:]) - 1]


@pytest.mark.parametrize("seed", SEEDS)
def test_adapter_beats_majority_and_base_on_an_image_question(margin_runs, seed):
    _cfg, _summary, out = margin_runs[seed]
    m = _metrics(out)
    em = {q: {model: m[model][q]["exact_match"] for model in MODELS} for q in IMAGE_QUESTIONS}
    margins = {q: em[q]["adapter"] - max(em[q]["majority"], em[q]["base"]) for q in IMAGE_QUESTIONS}
    assert max(margins.values()) >= MARGIN, f"seed {seed}: exact match {em}, margins {margins}"


def _loaded_with_adapter(model_dir: Path, out: Path):
    loaded = load_base_model(str(model_dir), device="cpu")
    load_adapter(loaded, out / FINAL_MODEL)
    return loaded


def _prompts_and_features(loaded, cfg, out, n_images=2):
    """Every question about a few held-out images: 8 prompt lengths, so batches are padded."""
    from fada_batch.data.categories import get_category
    from fada_batch.data.samples import prepare_data

    cs = prepare_data(cfg, get_category("Femur"), out, resuming=True)
    names = cs.split.test[:n_images]
    fs = FeatureSource(loaded, cs.image_paths, cache=True, max_pixels=cfg.data.max_image_pixels)
    fs.warm(names)
    t = cfg.data.prompt_template
    items = [(n, t.format(question=q)) for n in names for q in cs.questions]
    return [p for _, p in items], [fs.cache[n] for n, _ in items]


def test_batched_generation_equals_one_by_one(margin_runs, tiny_model_dir):
    cfg, _summary, out = margin_runs[0]
    loaded = _loaded_with_adapter(tiny_model_dir, out)
    encoder = make_encoder(loaded, 2)
    prompts, feats = _prompts_and_features(loaded, cfg, out)
    assert len({len(encoder.prompt_ids(p)) for p in prompts}) > 1  # rows really get padded
    kw = {"eos_token_id": 2}
    for adapter_on in (True, False):
        model = loaded.model
        ctx = model.disable_adapter() if not adapter_on else contextlib.nullcontext()
        with ctx:
            batched = generate_answers(
                model, encoder, prompts, feats, settings=GenerationSettings(batch_size=16), **kw
            )
            single = generate_answers(
                model, encoder, prompts, feats, settings=GenerationSettings(batch_size=1), **kw
            )
        assert batched == single, adapter_on
        assert all(isinstance(a, str) for a in batched)
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=1)
    assert ids.tolist() == [[5, 6, 7], [1, 1, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_generation_settings_reach_generate(margin_runs, tiny_model_dir, monkeypatch):
    """Beams, no_repeat_ngram_size and repetition_penalty go to the language model's
    generate(), and no_repeat_ngram_size=1 really leaves no token twice in an answer."""
    cfg, _summary, out = margin_runs[0]
    plain = load_base_model(str(tiny_model_dir), device="cpu")
    encoder = make_encoder(plain, 2)
    prompts, feats = _prompts_and_features(plain, cfg, out, n_images=1)
    lm = plain.model.language_model
    real, seen = lm.generate, []

    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        new = result[:, kwargs["input_ids"].shape[1] :].tolist()
        seen.append(
            ({k: kwargs[k] for k in ("num_beams", "no_repeat_ngram_size", "repetition_penalty")}, new)
        )
        return result

    monkeypatch.setattr(lm, "generate", spy)
    settings = GenerationSettings(
        max_new_tokens=12, num_beams=2, no_repeat_ngram_size=1, repetition_penalty=1.3
    )
    generate_answers(plain.model, encoder, prompts, feats, eos_token_id=2, settings=settings)
    assert seen
    for kwargs, rows in seen:
        assert kwargs == {"num_beams": 2, "no_repeat_ngram_size": 1, "repetition_penalty": 1.3}
        for ids in rows:
            ids = [i for i in ids if i not in (2, encoder.pad_token_id)]
            assert len(ids) == len(set(ids)), ids
    with pytest.raises(
        ValueError, match=r"no_repeat_ngram_size must be >= 0.*repetition_penalty must be > 0"
    ):
        GenerationSettings(no_repeat_ngram_size=-1, repetition_penalty=0).check()


def test_disabled_adapter_answers_like_the_plain_base_model(margin_runs, tiny_model_dir):
    """`disable_adapter()` (how base-model answers are made) == a base model without peft,
    including the LayerNorm trained through modules_to_save."""
    cfg, _summary, out = margin_runs[1]
    loaded = _loaded_with_adapter(tiny_model_dir, out)
    plain = load_base_model(str(tiny_model_dir), device="cpu")
    encoder = make_encoder(loaded, 2)
    prompts, feats = _prompts_and_features(loaded, cfg, out)
    with loaded.model.disable_adapter():
        off = generate_answers(loaded.model, encoder, prompts, feats, eos_token_id=2)
    on = generate_answers(loaded.model, encoder, prompts, feats, eos_token_id=2)
    base = generate_answers(plain.model, encoder, prompts, feats, eos_token_id=2)
    assert off == base
    assert on != base


def test_evaluate_cli_reproduces_the_training_evaluation(margin_runs, tmp_path, capsys):
    """`fada-batch evaluate` (every trained category by default) loads base + adapter from
    disk and gets exactly the numbers of the evaluation at the end of training."""
    cfg, _summary, out = margin_runs[2]
    before = _metrics(out)
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    assert main(["evaluate", "--job", str(job)]) == 0
    printed = capsys.readouterr().out
    assert "Femur" in printed and "Q6" in printed and "majority EM" in printed
    after = _metrics(out)
    for model in MODELS:
        assert after[model] == before[model], model
    # each question on its own terms too, by name, as metrics.json has it
    q2 = after["questions"]["Q2"]
    line = next(x for x in printed.splitlines() if "orientation accuracy" in x)
    assert line.lstrip().startswith(f"Q2 {q2['name']}"), line
    assert f"adapter {q2['adapter']['orientation_accuracy']:.3f} (" in line and "vs majority p" in line, line
    assert "sensitivity (abnormal)" in printed and "structure F1" in printed
    assert main(["evaluate", "--job", str(job), "--category", "thorax"]) == 1  # not trained
    assert "Thorax has no complete trained adapter" in capsys.readouterr().err


def test_evaluate_errors(margin_runs, tmp_path, tiny_model_dir, capsys):
    cfg, _summary, _out = margin_runs[0]
    with pytest.raises(EvaluationError, match=r"Thorax has no complete trained adapter.*fada-batch train"):
        evaluate_category(cfg, "Thorax")
    # the same tiny model copied elsewhere is, for all the check knows, another base model
    other = tmp_path / "other model"
    shutil.copytree(tiny_model_dir, other)
    moved = config_from_dict(
        {**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "name_or_path": str(other)}}
    )
    with pytest.raises(AdapterError) as e:
        evaluate_category(moved, "Femur")
    assert str(tiny_model_dir) in str(e.value) and str(other) in str(e.value)
    assert "model.name_or_path" in str(e.value)
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    empty = tmp_path / "no outputs"
    assert main(["evaluate", "--job", str(job), "-p", f"output.root={empty}"]) == 1
    assert "no trained category" in capsys.readouterr().err
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        evaluate_category(config_from_dict({**cfg.to_dict(), "eval": {"batch_size": 0}}), "Femur")


def test_evaluation_and_training_of_one_category_exclude_each_other(margin_runs):
    """An evaluation must not read an adapter that a --force retraining is deleting, nor a
    retraining start under an evaluation: both take the category's lock, and say who holds it."""
    from fada_batch.fsutil import LockedError, category_lock

    cfg, _summary, out = margin_runs[0]
    before = _metrics(out)
    with category_lock(out), pytest.raises(LockedError, match="is being trained by another task"):
        evaluate_category(cfg, "Femur")
    with category_lock(out, purpose="evaluated"), pytest.raises(LockedError) as e:
        run_category(cfg, "Femur", force=True)
    assert "is being evaluated by another task" in str(e.value)
    assert (out / "final_model" / "adapter_model.safetensors").is_file()  # nothing removed
    assert _metrics(out) == before and not (out / ".lock").exists()


def test_adapter_info_and_base_model_names(margin_runs, tmp_path, tiny_model_dir):
    _cfg, _summary, out = margin_runs[0]
    info = read_adapter_info(out / FINAL_MODEL)
    assert same_base_model(info.base_model, str(tiny_model_dir))
    assert info.eos_token_id == 2 and len(info.questions) == 8 and info.category == "Femur"
    staged = tmp_path / "models" / "blip2-opt-2.7b"
    cached = tmp_path / "hub" / "models--Salesforce--blip2-opt-2.7b" / "snapshots" / "abc123"
    for folder in (staged, cached):
        folder.mkdir(parents=True)
        assert same_base_model("Salesforce/blip2-opt-2.7b", str(folder))
    assert not same_base_model("Salesforce/blip2-opt-2.7b", "Salesforce/blip2-opt-6.7b")
    assert not same_base_model(str(staged), str(cached))  # two folders: only the same folder
    assert same_base_model(str(staged), str(staged / ".." / "blip2-opt-2.7b"))
    with pytest.raises(AdapterError, match="does not exist"):
        read_adapter_info(tmp_path / "nope")
    with pytest.raises(AdapterError, match=r"did you mean .*final_model"):
        read_adapter_info(out)


def test_failed_evaluation_keeps_training_completed(job_factory, monkeypatch):
    import fada_batch.evaluation.evaluate as ev

    def boom(*_a, **_k):
        raise RuntimeError("simulated evaluation failure")

    monkeypatch.setattr(ev, "evaluate_loaded", boom)
    cfg = job_factory({"train.num_epochs": 1, "data.num_images": 12})
    summary = run_category(cfg, "Thorax")
    assert summary["status"] == "completed"
    assert "simulated evaluation failure" in summary["eval"]["error"]


def test_demo_and_full_jobs_evaluate_after_training():
    for name in ("demo", "full"):
        cfg = load_job(REPO / "job" / f"{name}.yaml")
        assert cfg.eval.after_training is True and cfg.eval.num_beams == 1
