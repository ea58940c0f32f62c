"""Joint mode (train.mode=joint): one adapter trained on several categories together, on the
tiny model and the demo data: the folder it writes, resume after a stop, evaluation per
category and overall, the collector's side-by-side table, the CLI, and the prompt prefix."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fada_batch.config import ConfigError, dump_yaml, training_fingerprint
from fada_batch.data.samples import prepare_data, prepare_joint_data
from fada_batch.data.split import read_split
from fada_batch.training.outputs import FINAL_MODEL, JOINT
from fada_batch.training.recipe import StopRequested, train_joint

CATS = ["Abdomen", "Femur"]
JOINT_JOB = {
    "train.mode": "joint",
    "data.categories": CATS,
    "data.num_images": 12,
    "train.num_epochs": 2,
    "train.checkpoint_every_steps": 2,
    "train.tensorboard": False,
}


@pytest.fixture(scope="module")
def joint_run(tiny_model_dir, demo_root, tmp_path_factory):
    """A joint run on Abdomen and Femur through `fada-batch train --job J` (evaluated after
    training), and Femur's own adapter in the same output root: the read-only checks below."""
    from fada_batch.cli import main
    from fada_batch.config import config_from_dict, load_job

    raw = load_job(Path("job/demo.yaml")).to_dict()
    raw["data"].update(root=str(demo_root), num_images=12, categories=CATS)
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["output"]["root"] = str(tmp_path_factory.mktemp("joint") / "out puts")
    raw["train"].update(
        mode="joint", num_epochs=2, checkpoint_every_steps=2, log_every_s=0.0, tensorboard=False
    )
    cfg = config_from_dict(raw)
    job = Path(cfg.output.root).parent / "job.yaml"
    job.write_text(dump_yaml(cfg))
    assert main(["train", "--job", str(job)]) == 0
    from fada_batch.run.task import run_category

    own = config_from_dict({**raw, "train": {**raw["train"], "mode": "per_category"}})
    assert run_category(own, "Femur")["eval"]["n_pairs"] > 0  # evaluated, as the joint one
    return cfg, job, Path(cfg.output.root) / "blip2_joint"


def test_joint_run_writes_a_category_folders_layout(joint_run, tmp_path):
    cfg, _job, out = joint_run
    for f in ("training_summary.json", "split.json", "config.yaml"):
        assert (out / f).is_file(), f
    for f in ("adapter_config.json", "adapter_model.safetensors", "fada_batch.json", "README.md"):
        assert (out / FINAL_MODEL / f).is_file(), f
    assert sorted(p.name for p in out.glob("checkpoint-*"))
    summary = json.loads((out / "training_summary.json").read_text())
    assert (summary["status"], summary["category"], summary["mode"]) == ("completed", JOINT, "joint")
    assert summary["categories"] == CATS and sorted(summary["per_category"]) == CATS
    marker = json.loads((out / FINAL_MODEL / "fada_batch.json").read_text())
    assert (marker["mode"], marker["categories"], marker["category_in_prompt"]) == ("joint", CATS, True)
    # each category split by image exactly as its own run splits it; the union trains
    combined = read_split(out)
    for name in CATS:
        category = cfg.data.category(name)
        mine = read_split(out / "categories" / category.slug)
        alone = prepare_data(cfg, category, tmp_path / name, resuming=False).split
        assert mine is not None and mine.to_dict() == alone.to_dict()
        assert set(combined.train) >= {f"{category.slug}/{n}" for n in alone.train}
        assert summary["per_category"][name]["images"]["train"] == len(alone.train)
    assert (
        summary["images"]["train"]
        == len(combined.train)
        == sum(summary["per_category"][n]["images"]["train"] for n in CATS)
    )


def test_joint_adapter_is_evaluated_per_category_and_overall(joint_run):
    cfg, _job, out = joint_run
    overall = json.loads((out / "eval" / "metrics.json").read_text())
    assert {"adapter", "base", "majority", "questions"} <= set(overall)
    assert sorted(overall["categories"]) == CATS
    n_pairs = 0
    for name in CATS:
        part = out / "categories" / cfg.data.category(name).slug / "eval"
        metrics = json.loads((part / "metrics.json").read_text())
        assert {"adapter", "base", "majority"} <= set(metrics)  # the same blocks as a category's
        assert overall["categories"][name]["overall"] == metrics["adapter"]["overall"]
        n_pairs += metrics["n_pairs"]
        rows = (part / "predictions.csv").read_text().splitlines()[1:]
        assert rows and all(r.startswith(f"{cfg.data.category(name).slug}/") for r in rows)
    assert overall["n_pairs"] == n_pairs == overall["adapter"]["overall"]["n"]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["eval"]["categories"]["Femur"]["n_pairs"] > 0


def test_collector_shows_the_joint_adapter_beside_the_category_adapters(joint_run):
    from fada_batch.run.collect import collect

    cfg, _job, out = joint_run
    result = collect(out.parent, categories=CATS, table=cfg.data.table(), finished=True, joint=True)
    rows = {c.category: c for c in result.categories}
    assert set(rows) == {"Femur", JOINT}  # Abdomen has no adapter of its own here: no row
    joint = rows[JOINT]
    assert joint.state == "completed" and joint.requested and not rows["Femur"].requested
    assert joint.display.startswith("Joint (") and sorted(joint.joint_scores or {}) == CATS
    assert result.exit_code() == 0
    written = result.write_report()
    md = written["md"].read_text()
    section = md.split("## Joint adapter beside the per-category adapters", 1)[1].split("\n## ", 1)[0]
    femur_line = next(line for line in section.splitlines() if line.startswith("| Femur |"))
    cells = [c.strip() for c in femur_line.strip("|").split("|")]
    own_f1 = rows["Femur"].eval["adapter"]["overall"]["token_f1"]
    assert cells[2] == f"{own_f1:.3f}"
    assert cells[4] == f"{joint.joint_scores['Femur']['adapter']['token_f1']:.3f}"
    abdomen = next(line for line in section.splitlines() if line.startswith("| Abdomen |"))
    assert [c.strip() for c in abdomen.strip("|").split("|")][1] == "–"  # no own adapter
    assert 'id="joint-table"' in written["html"].read_text()


def test_joint_resume_after_a_stop_matches_an_uninterrupted_run(job_factory, tmp_path):
    """Stopped for a requeue after a checkpoint, then run again: it resumes there and ships
    the same adapter as a run that was never stopped."""
    job = {**JOINT_JOB, "eval.after_training": False}
    stopped = job_factory(job, out=tmp_path / "stopped")
    polls = iter(range(1000))
    with pytest.raises(StopRequested):
        train_joint(stopped, should_stop=lambda: next(polls) >= 3)
    out = Path(stopped.output.root) / "blip2_joint"
    assert json.loads((out / "training_summary.json").read_text())["status"] == "interrupted"
    resumed = train_joint(stopped)
    assert resumed["status"] == "completed" and resumed["resumes"] == 1
    assert train_joint(stopped)["end_time"] == resumed["end_time"]  # completed: skipped
    straight = train_joint(job_factory(job, out=tmp_path / "straight"))
    assert straight["resumes"] == 0 and straight["steps"] == resumed["steps"]
    a = load_file(str(out / FINAL_MODEL / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "straight" / "blip2_joint" / FINAL_MODEL / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_category_prefix_on_and_off_changes_the_prompt_at_the_collate_level(job_factory, tmp_path):
    from fada_batch.training.collate import Encoder
    from fada_batch.training.model import eos_token_id, load_base_model

    rows = {}
    for on in (True, False):
        cfg = job_factory({**JOINT_JOB, "train.category_in_prompt": on}, out=tmp_path / str(on))
        cats = [cfg.data.category(c) for c in CATS]
        rows[on] = prepare_joint_data(cfg, cats, tmp_path / str(on), resuming=False)
    with_prefix, without = rows[True].train[0], rows[False].train[0]
    assert with_prefix.prompt == f"Abdomen. {without.prompt}"
    assert without.prompt.startswith("Question: ") and with_prefix.category == "Abdomen"
    femur = next(s for s in rows[True].train if s.category == "Femur")
    assert femur.prompt.startswith("Femur. Question: ")
    loaded = load_base_model(str(job_factory().model.name_or_path), device="cpu")
    config = loaded.model.config
    encoder = Encoder(
        loaded.processor,
        num_query_tokens=config.num_query_tokens,
        image_token_id=config.image_token_id,
        eos_token_id=eos_token_id(loaded.model, loaded.processor),
    )
    a, b = encoder.encode(with_prefix), encoder.encode(without)
    assert a.prompt_len > b.prompt_len and a.input_ids != b.input_ids
    assert a.input_ids[a.prompt_len :] == b.input_ids[b.prompt_len :]  # the same answer tokens


def test_joint_config_rules_and_fingerprint(job_factory):
    per_category = job_factory()
    fp = training_fingerprint(per_category)
    assert "train.mode" not in fp and "train.category_in_prompt" not in fp  # as before the keys
    assert training_fingerprint(job_factory({"train.category_in_prompt": False})) == fp
    joint = training_fingerprint(job_factory(JOINT_JOB))
    assert joint["train.mode"] == "joint" and joint["joint.categories"] == CATS
    assert joint["train.category_in_prompt"] is True
    other = training_fingerprint(job_factory({**JOINT_JOB, "data.categories": ["Abdomen", "Thorax"]}))
    assert other["joint.categories"] != joint["joint.categories"]
    with pytest.raises(ConfigError, match=r"train\.mode"):
        job_factory({"train.mode": "together"})
    with pytest.raises(ConfigError, match="share the joint adapter's folder"):
        job_factory(
            {**JOINT_JOB, "data.categories": ["Femur", "Joint"], "data.category_table": {"Joint": {}}}
        )


def test_cli_validate_submit_and_train_in_joint_mode(joint_run, job_factory, tmp_path, capsys):
    """`validate`, `submit` and `train --job J` (the fixture's run) with train.mode=joint."""
    from fada_batch.cli import main
    from fada_batch.run.launch import submit

    _cfg, job, out = joint_run
    assert main(["validate", "--job", str(job)]) == 0
    said = capsys.readouterr().out
    assert "joint mode: ONE adapter on 2 categories (Abdomen 12 images, Femur 12 images" in said
    assert str(out) in said
    assert main(["submit", "--job", str(job), "--dry-run"]) == 0
    said = capsys.readouterr().out
    assert "completed under this training config (skipped; --force trains again): joint" in said
    assert submit(job_factory(JOINT_JOB), executor="slurm", dry_run=True)["plan"] == [JOINT]
    said = capsys.readouterr().out
    assert "1 task to run, in this order: joint (24 images)" in said  # not one per category
    assert main(["submit", "--job", str(job), "--categories", "Femur", "--dry-run"]) == 1
    assert "--categories does not apply to train.mode=joint" in capsys.readouterr().err
    assert main(["train", "--job", str(job), "--category", "Femur"]) == 2
    assert "train.mode=joint trains one adapter" in capsys.readouterr().err
    # a category awaiting labels cannot join: named, with the way on
    waiting = job_factory({**JOINT_JOB, "data.categories": ["Femur", "Cervix"]})
    with pytest.raises(Exception, match="Cervix"):
        submit(waiting, executor="slurm", dry_run=True)
    with pytest.raises(Exception, match="no labels yet for Cervix"):
        train_joint(waiting)


# ------------------------------------------------------- the saved joint adapter: evaluate, ask


def _predictions(eval_dir: Path) -> list[dict[str, str]]:
    with (eval_dir / "predictions.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _record_prompts(monkeypatch) -> list[str]:
    """The prompts every later generation is asked (evaluate and ask both generate through
    `evaluation.evaluate.generate`), in order."""
    from fada_batch.evaluation import evaluate

    asked: list[str] = []
    real_generate = evaluate.generate

    def spy(model, encoder, prompts, *args, **kwargs):
        asked.extend(prompts)
        return real_generate(model, encoder, prompts, *args, **kwargs)

    monkeypatch.setattr(evaluate, "generate", spy)
    return asked


def test_joint_evaluate_from_disk_equals_training(joint_run, tmp_path, capsys, monkeypatch):
    """`fada-batch evaluate` on the saved joint adapter (base model and adapter loaded with
    from_pretrained) answers every held-out question as the evaluation after training did, per
    category and overall, with the prompts of training: the category prefix comes from what
    the adapter recorded, even when the job now says train.category_in_prompt=false."""
    from fada_batch.cli import main

    cfg, job, out = joint_run
    root = tmp_path / "copy"
    shutil.copytree(out, root / "blip2_joint")
    asked = _record_prompts(monkeypatch)
    args = [
        "evaluate",
        "--job",
        str(job),
        "-p",
        f"output.root={root}",
        "-p",
        "train.category_in_prompt=false",
    ]
    assert main([*args, "--category", "joint"]) == 0  # the job's train.mode=joint makes it the default too
    said = capsys.readouterr().out
    trained, again = (
        json.loads((d / "eval" / "metrics.json").read_text()) for d in (out, root / "blip2_joint")
    )
    assert again["n_pairs"] == trained["n_pairs"] > 0 and sorted(again["categories"]) == CATS
    for model in ("adapter", "base", "majority", "questions"):  # same answers: same scores
        assert again[model] == trained[model], model
    assert again["categories"] == trained["categories"]
    assert _predictions(root / "blip2_joint" / "eval") == _predictions(out / "eval")
    for name in CATS:
        slug = cfg.data.category(name).slug
        assert _predictions(root / "blip2_joint" / "categories" / slug / "eval") == _predictions(
            out / "categories" / slug / "eval"
        )
    assert len(asked) == 2 * trained["n_pairs"]  # the adapter's and the base model's answers
    assert {p.split(". Question: ", 1)[0] for p in asked} == set(CATS)
    assert "joint: " in said and "  Femur: exact match adapter" in said


def test_evaluate_finds_the_joint_adapter_and_says_when_there_is_none(joint_run, tmp_path, capsys):
    from fada_batch.cli import _evaluate_targets, main

    cfg, job, _out = joint_run
    assert _evaluate_targets(cfg, None) == [JOINT]  # train.mode=joint
    per_category = replace(cfg, train=replace(cfg.train, mode="per_category"))
    assert _evaluate_targets(per_category, None) == ["Femur", JOINT]  # each one there, and joint
    assert _evaluate_targets(per_category, "Joint") == [JOINT]
    empty = tmp_path / "empty"
    assert main(["evaluate", "--job", str(job), "-p", f"output.root={empty}", "--category", "joint"]) == 1
    err = capsys.readouterr().err
    assert f"no complete joint adapter in {empty / 'blip2_joint' / FINAL_MODEL}" in err
    assert "fada-batch train --job JOB -p train.mode=joint" in err


def test_ask_a_joint_adapter_with_its_category_answers_as_evaluation_did(joint_run, capsys, monkeypatch):
    """`ask --category Femur` on the joint adapter puts "Femur. " before each question, as in
    training, and answers a held-out Femur image as the joint evaluation did."""
    from fada_batch.cli import main

    asked = _record_prompts(monkeypatch)

    cfg, _job, out = joint_run
    femur = cfg.data.category("Femur")
    rows = _predictions(out / "categories" / femur.slug / "eval")
    key = rows[0]["image"]  # femur/<name>
    expected = {r["question"]: r["adapter_prediction"] for r in rows if r["image"] == key}
    part = prepare_data(cfg, femur, out / "categories" / femur.slug, resuming=True)
    image = part.image_paths[key.split("/", 1)[1]]
    args = ["ask", "--adapter", str(out / FINAL_MODEL), "--image", str(image), "--json"]
    assert main([*args, "--category", "femur"]) == 0  # names match as category names do
    answers = json.loads(capsys.readouterr().out)
    assert len(answers) == 8 and {a["category"] for a in answers} == {"Femur"}
    assert len(asked) == 8 and all(p.startswith("Femur. Question: ") for p in asked), asked
    for a in answers:
        if a["question_id"] in expected:  # empty reference cells are not evaluated
            assert a["answer"] == expected[a["question_id"]], a
    assert main(args) == 1  # the category is needed: the prompts start with it
    err = capsys.readouterr().err
    assert "joint adapter" in err and "--category (one of: Abdomen, Femur)" in err
    assert main([*args, "--category", "Thorax"]) == 1
    assert "--category 'Thorax' is not one the joint adapter" in capsys.readouterr().err


def test_ask_category_rules_for_joint_and_category_adapters(tmp_path):
    from fada_batch.evaluation.ask import AskError, adapter_category
    from fada_batch.evaluation.evaluate import AdapterInfo

    def info(**kw):
        return AdapterInfo(tmp_path, None, None, None, None, **kw)

    joint = info(category=JOINT, mode="joint", categories=["Abdomen", "Trans-cerebellum"],
                 prompt_prefixes={"Abdomen": "Abdomen", "Trans-cerebellum": "Transcerebellar Plane"})  # fmt: skip
    assert adapter_category(joint, "Abodomen") == ("Abdomen", "Abdomen")  # a built-in alias
    assert adapter_category(joint, "transcerebellar plane") == ("Trans-cerebellum", "Transcerebellar Plane")
    with pytest.raises(AskError, match=r"--category \(one of: Abdomen, Trans-cerebellum\)"):
        adapter_category(joint, None)
    plain = info(category=JOINT, mode="joint", categories=CATS, prompt_prefixes=dict.fromkeys(CATS))
    assert adapter_category(plain, None) == (None, None)  # trained without the prefix
    assert adapter_category(plain, "Femur") == ("Femur", None)
    own = info(category="Femur")
    assert adapter_category(own, None) == (None, None)
    assert adapter_category(own, "femur") == ("Femur", None)
    with pytest.raises(AskError, match="is Femur's own"):
        adapter_category(own, "Abdomen")


def test_a_joint_adapter_records_its_prompt_prefixes(joint_run, tmp_path):
    """fada_batch.json says what each category's prompts start with; an adapter saved before
    that was recorded takes them from the job config saved beside it."""
    from fada_batch.evaluation.evaluate import read_adapter_info

    _cfg, _job, out = joint_run
    info = read_adapter_info(out / FINAL_MODEL)
    assert (info.joint, info.categories) == (True, CATS)
    assert info.prompt_prefixes == {"Abdomen": "Abdomen", "Femur": "Femur"}
    card = (out / FINAL_MODEL / "README.md").read_text()  # the model card says how to prompt it
    assert "text='Abdomen. Question: " in card and "--category <category>" in card
    assert "(Abdomen: `Abdomen. `, Femur: `Femur. `)" in card
    old = tmp_path / "old"
    shutil.copytree(out / FINAL_MODEL, old)
    marker = json.loads((old / "fada_batch.json").read_text())
    del marker["prompt_prefixes"]
    (old / "fada_batch.json").write_text(json.dumps(marker))
    assert read_adapter_info(old).prompt_prefixes == info.prompt_prefixes
