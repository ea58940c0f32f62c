"""One category end to end on the tiny model and demo data: the production path on a CPU.

from_pretrained -> LoRA -> train -> checkpoints -> save -> reload (resume after SIGKILL: test_reliability),
skip/force, awaiting labels, cached vs uncached features.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fada_batch.training.checkpoint import list_checkpoints
from fada_batch.training.outputs import FINAL_MODEL
from fada_batch.training.recipe import train_category

SMALL = {"train.num_epochs": 3, "data.num_images": 24, "train.checkpoint_every_steps": 2}


@pytest.fixture(scope="module")
def femur_run(tiny_model_dir, demo_root, tmp_path_factory):
    """A short Femur training run shared by the read-only checks below."""
    from fada_batch.config import config_from_dict, load_job

    raw = load_job(Path("job/demo.yaml")).to_dict()
    raw["data"].update(root=str(demo_root), num_images=24)
    raw["model"]["name_or_path"] = str(tiny_model_dir)
    raw["output"]["root"] = str(tmp_path_factory.mktemp("out") / "run one")
    raw["train"].update(num_epochs=3, checkpoint_every_steps=2, log_every_s=0.0)
    cfg = config_from_dict(raw)
    summary = train_category(cfg, "Femur")
    return cfg, summary, Path(cfg.output.root) / "blip2_femur"


def test_output_tree(femur_run):
    _cfg, _summary, out = femur_run
    for f in ("training_summary.json", "split.json", "config.yaml"):
        assert (out / f).is_file(), f
    fm = out / FINAL_MODEL
    for f in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "fada_batch.json",
    ):
        assert (fm / f).is_file(), f
    ckpts = list_checkpoints(out)
    assert 1 <= len(ckpts) <= 2  # keep_checkpoints default 2
    assert ckpts[-1][0] == json.loads((out / "training_summary.json").read_text())["steps"]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]  # no temp leftovers
    # readable by the group on shared storage (safetensors alone writes 0600 files)
    mask = os.umask(0)
    os.umask(mask)
    for f in (fm / "adapter_model.safetensors", ckpts[-1][1] / "optimizer.pt", out / "training_summary.json"):
        assert f.stat().st_mode & 0o777 == 0o666 & ~mask, f


def test_summary_content(femur_run):
    cfg, summary, out = femur_run
    on_disk = json.loads((out / "training_summary.json").read_text())
    assert on_disk["status"] == "completed" == summary["status"]
    for key in (
        "category",
        "start_time",
        "end_time",
        "wall_time_s",
        "images",
        "qa_pairs",
        "epochs",
        "steps",
        "batch_size",
        "learning_rate",
        "loss_curve",
        "val_loss",
        "samples_per_s",
        "peak_memory",
        "device",
        "versions",
        "config_hash",
        "seed",
        "adapter_path",
        "slurm",
    ):
        assert key in on_disk, key
    assert on_disk["category"] == "Femur"
    split = json.loads((out / "split.json").read_text())
    assert on_disk["images"] == {k: len(split[k]) for k in ("train", "val", "test")}
    assert sum(on_disk["images"].values()) == 24
    assert on_disk["qa_pairs"]["train"] > on_disk["images"]["train"]  # up to 8 per image
    assert on_disk["epochs"] == 3 and len(on_disk["val_loss"]) == 3
    assert on_disk["steps"] == len(on_disk["loss_curve"])
    assert on_disk["samples_per_s"] > 0 and on_disk["peak_memory"]["gb"] > 0
    assert on_disk["device"]["type"] == "cpu"
    assert on_disk["config_hash"] == cfg.config_hash()
    assert on_disk["versions"]["torch"].startswith("2.")
    assert Path(on_disk["adapter_path"]) == out / FINAL_MODEL


def test_training_loss_goes_down(femur_run):
    _cfg, summary, _out = femur_run
    epochs = [loss for _e, loss in summary["epoch_train_loss"]]
    assert epochs[-1] < epochs[0] * 0.6, epochs
    vals = [loss for _e, loss in summary["val_loss"]]
    assert vals[-1] < vals[0], vals


def test_saved_adapter_reloads_with_same_logits(femur_run, tiny_model_dir):
    """base + PeftModel.from_pretrained(final_model) == the trained weights in the last checkpoint."""
    from peft import PeftModel
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from fada_batch.training.model import apply_lora_section, load_base_model

    cfg, _summary, out = femur_run
    trained = load_base_model(str(tiny_model_dir), device="cpu")
    apply_lora_section(trained, cfg.lora)
    weights = load_file(str(list_checkpoints(out)[-1][1] / "adapter_model.safetensors"))
    params = dict(trained.model.named_parameters())
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t)
    trained.model.eval()

    base = Blip2ForConditionalGeneration.from_pretrained(str(tiny_model_dir))
    reloaded = PeftModel.from_pretrained(base, str(out / FINAL_MODEL)).eval()
    processor = Blip2Processor.from_pretrained(str(out / FINAL_MODEL))

    from PIL import Image

    image = Image.open(next((Path(cfg.data.root) / "Fetal Ultrasound" / "Femur").glob("*.png")))
    inputs = processor(
        images=image.convert("RGB"), text="Question: Image Quality? Answer:", return_tensors="pt"
    )
    plain = Blip2ForConditionalGeneration.from_pretrained(str(tiny_model_dir)).eval()
    with torch.no_grad():
        a = trained.model(**inputs).logits
        b = reloaded(**inputs).logits
        c = plain(**inputs).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert not torch.allclose(b, c, atol=1e-3)  # the adapter changes the model


def test_completed_category_is_skipped_unless_forced(femur_run, caplog):
    caplog.set_level(logging.INFO, logger="fada_batch")
    cfg, summary, out = femur_run
    mtime = (out / "training_summary.json").stat().st_mtime_ns
    again = train_category(cfg, "Femur")
    assert again["end_time"] == summary["end_time"]
    assert (out / "training_summary.json").stat().st_mtime_ns == mtime
    assert "already completed" in caplog.text and "--force" in caplog.text


def test_force_retrains_from_scratch(job_factory):
    cfg = job_factory({"train.num_epochs": 1, "data.num_images": 12})
    first = train_category(cfg, "Thorax")
    forced = train_category(cfg, "Thorax", force=True)
    assert forced["status"] == "completed" and forced["resumes"] == 0
    assert forced["start_time"] >= first["end_time"]


def test_bf16_training_the_gpu_precision_path(job_factory):
    """bf16 weights, as `dtype: auto` picks on a GPU, run here on the CPU: training, the saved
    adapter, and evaluation of it loaded apart from training."""
    from fada_batch.evaluation.evaluate import evaluate_category

    cfg = job_factory({**SMALL, "model.dtype": "bfloat16", "eval.after_training": False})
    summary = train_category(cfg, "Femur")
    assert summary["status"] == "completed" and summary["dtype"] == "bfloat16"
    epochs = [loss for _e, loss in summary["epoch_train_loss"]]
    assert epochs[-1] < epochs[0] * 0.8, epochs
    out = Path(cfg.output.root) / "blip2_femur"
    weights = load_file(str(out / FINAL_MODEL / "adapter_model.safetensors"))
    # peft keeps the adapter's own weights in fp32 over bf16 base weights: small updates survive
    assert {t.dtype for n, t in weights.items() if "lora_" in n} == {torch.float32}
    metrics = evaluate_category(cfg, "Femur")
    assert metrics["adapter"]["overall"]["n"] > 0


def test_wall_time_adds_up_over_attempts(job_factory):
    """A category stopped for a requeue, then resumed: the summary gives each attempt's wall
    time and their total (what the category cost), also across a summary left by a dead task."""
    from fada_batch.training.recipe import StopRequested, _earlier_wall_time

    cfg = job_factory(SMALL)
    polls = iter(range(1000))
    with pytest.raises(StopRequested):
        train_category(cfg, "Femur", should_stop=lambda: next(polls) >= 3)
    path = Path(cfg.output.root) / "blip2_femur" / "training_summary.json"
    first = json.loads(path.read_text())
    assert first["status"] == "interrupted" and first["total_wall_time_s"] == first["wall_time_s"] > 0
    done = train_category(cfg, "Femur")
    assert (
        done["status"] == "completed" and done["earlier_attempts_wall_time_s"] == first["total_wall_time_s"]
    )
    assert done["total_wall_time_s"] == pytest.approx(
        first["total_wall_time_s"] + done["wall_time_s"], abs=0.02
    )
    assert done["first_start_time"] == first["start_time"]
    # an attempt that died without a word counts up to its last summary write (a checkpoint)
    dead = {
        "status": "running",
        "earlier_attempts_wall_time_s": 50.0,
        "total_wall_time_s": 50.0,
        "start_time": "2026-01-01T10:00:00+00:00",
        "updated": "2026-01-01T10:02:00+00:00",
    }
    assert _earlier_wall_time(dead) == 170.0
    assert _earlier_wall_time({**dead, "status": "interrupted"}) == 50.0  # it said what it took
    assert _earlier_wall_time({"status": "running", "start_time": "garbage"}) == 0.0


def test_ctrl_c_marks_the_category_interrupted_and_a_rerun_resumes(
    job_factory, tmp_path, monkeypatch, capsys
):
    """Ctrl-C (KeyboardInterrupt) is the user's stop, not the category's failure: the summary
    says interrupted and how to resume; the CLI exits 130 with the same advice."""
    from fada_batch.cli import main

    cfg = job_factory(SMALL)
    polls = iter(range(1000))

    def ctrl_c_at_the_fifth_poll() -> bool:
        if next(polls) == 4:
            raise KeyboardInterrupt
        return False

    with pytest.raises(KeyboardInterrupt):
        train_category(cfg, "Femur", should_stop=ctrl_c_at_the_fifth_poll)
    out = Path(cfg.output.root) / "blip2_femur"
    stopped = json.loads((out / "training_summary.json").read_text())
    assert stopped["status"] == "interrupted" and "run the same command again" in stopped["message"]
    assert stopped["checkpoint"] and Path(stopped["checkpoint"]).is_dir()  # checkpoint_every_steps=2
    resumed = train_category(cfg, "Femur")
    assert resumed["status"] == "completed" and resumed["resumes"] == 1

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr("fada_batch.run.task.train_category", interrupted)
    job = tmp_path / "job.yaml"
    from fada_batch.config import dump_yaml

    job.write_text(dump_yaml(cfg))
    assert main(["train", "--job", str(job), "--category", "Thorax"]) == 130
    assert "interrupted: what was saved stays" in capsys.readouterr().err


def test_oom_backoff_halves_until_it_fits_and_gives_up_at_one():
    """The back-off itself: each retry starts without the failed try's partial gradients,
    halves the micro-batch and says so; at a micro-batch of 1 it stops with what to change."""
    from fada_batch.training.step import run_with_oom_backoff

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    tried, told, grads_at_entry = [], [], []

    def step(micro):
        tried.append(micro)
        grads_at_entry.append(p.grad)
        p.grad = torch.ones(2)  # a failed try leaves gradients of its first micro-batches
        if micro > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return "loss"

    cpu = torch.device("cpu")
    assert run_with_oom_backoff(step, 16, optimizer=opt, device=cpu, on_backoff=told.append) == ("loss", 2)
    assert tried == [16, 8, 4, 2] and told == [8, 4, 2]
    assert all(g is None for g in grads_at_entry)

    def never_fits(micro):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    with pytest.raises(RuntimeError, match=r"micro-batch of 1: set model\.quantization=8bit") as e:
        run_with_oom_backoff(never_fits, 4, optimizer=opt, device=cpu, on_backoff=told.append)
    assert isinstance(e.value.__cause__, torch.OutOfMemoryError) and told[-2:] == [2, 1]


def test_awaiting_labels_is_not_an_error(job_factory):
    cfg = job_factory()
    summary = train_category(cfg, "Cervix")
    assert summary["status"] == "awaiting_labels"
    on_disk = json.loads((Path(cfg.output.root) / "blip2_cervix" / "training_summary.json").read_text())
    assert on_disk["status"] == "awaiting_labels"


def test_cached_and_uncached_features_give_same_loss_and_grads(job_factory):
    """The frozen-feature cache changes only the speed: same loss, same LoRA gradients."""
    from fada_batch.data.samples import prepare_data
    from fada_batch.training.collate import Encoder
    from fada_batch.training.features import FeatureSource
    from fada_batch.training.model import apply_lora, eos_token_id, load_base_model
    from fada_batch.training.step import batch_loss_sum, set_train_mode

    cfg = job_factory({"data.num_images": 10})
    from fada_batch.data.categories import get_category

    out = Path(cfg.output.root) / "blip2_abdomen"
    out.mkdir(parents=True)
    cs = prepare_data(cfg, get_category("Abdomen"), out, resuming=False)
    torch.manual_seed(0)
    loaded = load_base_model(cfg.model.name_or_path, device="cpu")
    model = apply_lora(
        loaded,
        r=8,
        alpha=16,
        dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=cfg.lora.modules_to_save,
    )
    # perturb LoRA B (zero at init) so gradients reach A too
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    set_train_mode(model)
    bc = model.get_base_model().config
    enc = Encoder(
        loaded.processor,
        num_query_tokens=bc.num_query_tokens,
        image_token_id=bc.image_token_id,
        eos_token_id=eos_token_id(model, loaded.processor),
    )
    samples = cs.train[:12]
    encoded = [enc.encode(s) for s in samples]
    results = []
    for cache in (True, False):
        fs = FeatureSource(loaded, cs.image_paths, cache=cache, max_pixels=cfg.data.max_image_pixels)
        fs.warm([s.image for s in samples])
        model.zero_grad()
        loss, n = batch_loss_sum(model, fs, samples, encoded, enc, loaded.device)
        (loss / n).backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((float(loss.detach() / n), grads))
    (l1, g1), (l2, g2) = results
    assert l1 == pytest.approx(l2, rel=1e-6)
    assert g1.keys() == g2.keys() and any("lora_A" in k for k in g1)
    for k in g1:
        assert torch.allclose(g1[k], g2[k], atol=1e-7, rtol=1e-5), k


def test_out_of_memory_backoff_halves_micro_batch_same_result(job_factory, tmp_path, monkeypatch, capsys):
    """A simulated CUDA OOM on micro-batches above 4 rows: the step is retried with half the
    micro-batch and twice the accumulation, logged, and the result equals a run without OOM."""
    import fada_batch.training.step as step_mod

    overrides = {"train.num_epochs": 1, "data.num_images": 12, "train.batch_size": 16}
    ref = train_category(job_factory(overrides, out=tmp_path / "ref"), "Abdomen")

    real = step_mod.batch_loss_sum
    calls = {"oom": 0}

    def oom_above_4(model, features, samples, *args, **kwargs):
        if len(samples) > 4:
            calls["oom"] += 1
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(model, features, samples, *args, **kwargs)

    monkeypatch.setattr(step_mod, "batch_loss_sum", oom_above_4)
    cfg = job_factory(overrides, out=tmp_path / "oom")
    got = train_category(cfg, "Abdomen", progress_stream=sys.stderr)
    assert calls["oom"] == 2  # 16 -> 8 -> 4, then no more
    assert got["micro_batch_size"] == 4 and got["effective_batch_size"] == 16
    assert got["steps"] == ref["steps"]
    assert "CUDA out of memory: micro-batch halved to 8" in capsys.readouterr().err
    a = load_file(str(Path(ref["adapter_path"]) / "adapter_model.safetensors"))
    b = load_file(str(Path(got["adapter_path"]) / "adapter_model.safetensors"))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k
