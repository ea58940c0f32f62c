"""`fada-batch bench`: throughput on the production path, the seed's recipe, time estimates, and
the `quantization: auto` rule. Speed is measured and printed, never asserted."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fada_batch import cli
from fada_batch.config import config_from_dict, load_job
from fada_batch.tools.bench import (
    BLIP2_OPT_27B,
    BenchModelRecipe,
    blip2_config,
    build_bench_model,
    estimate,
    make_bench_model,
    per_sample_flops,
    sbatch_time,
)
from fada_batch.tools.bench.scaling import allreduce_seconds, gpu_counts, ring_allreduce_bytes, scale_estimate
from fada_batch.training.model import (
    GiB,
    apply_lora,
    apply_lora_section,
    load_base_model,
    pick_quantization,
    weight_bytes,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bench_model_dir(tmp_path_factory):
    """A small random-weight bench model (widths x 0.25), saved for production's load path."""
    return make_bench_model(tmp_path_factory.mktemp("bench") / "bench model", scale=0.25)


def blip2_opt_27b_config():
    """Salesforce/blip2-opt-2.7b's architecture: the published values in `tools.bench.model`."""
    return blip2_config(BLIP2_OPT_27B)


# ------------------------------------------------------------------------------- estimate


def test_sbatch_time_adds_margin_and_rounds_up_to_five_minutes():
    assert sbatch_time(0) == "00:10:00"  # 0 x 1.3 + 600 s
    assert sbatch_time(100) == "00:15:00"  # 730 s -> 900 s
    assert sbatch_time(3600) == "01:30:00"  # 5,280 s -> 5,400 s
    assert sbatch_time(30 * 3600) == "39:10:00"  # exactly 141,000 s; SLURM takes HH > 24


def test_estimate_arithmetic_by_hand():
    cfg = config_from_dict({"train": {"num_epochs": 3}, "cluster": {"time_min": 4, "signal_delay_s": 60}})
    counts = {"Abdomen": ("given", 100, 800), "Cervix": ("awaiting_labels", 0, 0)}
    abdomen, cervix = estimate(cfg, 10.0, 0.5, load_s=20.0, counts=counts)
    # 800 pairs: 640 train, 80 val (0.8 / 0.1); features of 90 train+val images at 0.5 s
    assert (abdomen.train_pairs, abdomen.val_pairs) == (640, 80)
    assert abdomen.feature_s == pytest.approx(45.0)
    assert abdomen.train_s == pytest.approx(3 * 640 / 10)  # 192 s
    assert abdomen.eval_s == pytest.approx(3 * 80 / 10 / 3)  # 8 s: forward only
    assert abdomen.total_s == pytest.approx(20 + 45 + 192 + 8)  # 265 s
    assert abdomen.sbatch_time == "00:20:00"  # 265 x 1.3 + 600 = 944.5 -> 1,200 s
    assert abdomen.time_min == 20
    assert not abdomen.within_time_min  # 265 s > cluster.time_min of 4 min
    assert cervix.status == "awaiting_labels" and cervix.total_s == 0 and cervix.sbatch_time == ""


def test_estimate_caps_at_num_images():
    cfg = config_from_dict({"data": {"num_images": 50}, "train": {"num_epochs": 1}})
    (e,) = estimate(cfg, 8.0, 0.0, counts={"Femur": ("given", 100, 780)})
    assert (e.images, e.qa_pairs, e.train_pairs) == (50, 390, 312)
    assert e.total_s == pytest.approx(312 / 8 + 39 / 8 / 3, abs=0.05)


# ------------------------------------------------------------- data-parallel estimate


LORA_27B = 32 * 2 * (2560 * 8 + 8 * 2560)  # blip2-opt-2.7b, r=8 on q_proj+v_proj: 2,621,440


def test_ring_allreduce_volume_and_time_by_hand():
    grads = LORA_27B * 4  # fp32 gradients: 10,485,760 bytes
    assert ring_allreduce_bytes(grads, 1) == 0
    assert ring_allreduce_bytes(grads, 2) == grads  # 2 x 1/2
    assert ring_allreduce_bytes(grads, 4) == 15_728_640  # 2 x 3/4 = 1.5 x
    assert ring_allreduce_bytes(grads, 8) == 18_350_080  # 2 x 7/8 = 1.75 x
    # 18,350,080 B at 100 GB/s = 183.5008 us, + 2 x 7 messages x 10 us = 323.5008 us
    assert allreduce_seconds(18_350_080, 8, 100.0, 10.0) == pytest.approx(323.5008e-6)
    assert allreduce_seconds(0, 1, 100.0, 10.0) == 0.0


def test_scale_estimate_by_hand_within_a_node_and_across_nodes():
    rows = scale_estimate(step_s=0.8, batch=16, grad_numel=LORA_27B, grad_bytes=4,
                          gpus=[1, 3, 4, 16, 32], gpus_per_node=8, intra_gbps=100.0,
                          inter_gbps=10.0, latency_us=10.0)  # fmt: skip
    one, three, four, sixteen, many = rows
    assert (one.step_s, one.speedup, one.allreduce_bytes, one.link) == (0.8, 1.0, 0, "none")
    assert (three.per_rank_batch, three.compute_s) == (6, pytest.approx(0.3))  # ceil(16/3) = 6
    # 4 GPUs, one node: 0.2 s of compute + 15,728,640 B / 100 GB/s + 6 x 10 us = 217.2864 us
    assert four.compute_s == pytest.approx(0.2) and four.link == "intra-node"
    assert four.allreduce_s == pytest.approx(217.2864e-6)
    assert four.step_s == pytest.approx(0.2002172864)
    assert four.speedup == pytest.approx(0.8 / 0.2002172864)
    assert four.efficiency == pytest.approx(four.speedup / 4)
    assert four.samples_per_s == pytest.approx(16 / 0.2002172864)
    # 16 GPUs: 2 nodes, the ring at the network's 10 GB/s: 2 x 15/16 x 10,485,760 = 19,660,800 B
    assert (sixteen.nodes, sixteen.link, sixteen.allreduce_bytes) == (2, "network", 19_660_800)
    assert sixteen.allreduce_s == pytest.approx(19_660_800 / 10e9 + 30 * 10e-6)  # 2.26608 ms
    assert sixteen.step_s == pytest.approx(0.05 + 2.26608e-3)
    assert (many.nodes, many.per_rank_batch) == (4, 1)  # more GPUs than samples: 1 each
    with pytest.raises(ValueError, match="step_s must be > 0"):
        scale_estimate(step_s=0, batch=16, grad_numel=1, grad_bytes=4)
    assert gpu_counts(8) == (1, 2, 4, 8, 16, 32) and gpu_counts(4) == (1, 2, 4, 8, 16)


# --------------------------------------------------------------------------- quantization


@pytest.fixture(scope="module")
def real_weights():
    return weight_bytes(blip2_opt_27b_config(), torch.bfloat16)


def test_weight_bytes_of_blip2_opt_27b(real_weights):
    # 3.74B parameters: ~7.0 GiB in bf16 (Q-Former kept fp32), ~4.8 GiB with an int8 language model
    assert 6.9 < real_weights["none"] / GiB < 7.3
    assert 4.6 < real_weights["8bit"] / GiB < 5.0
    assert real_weights["4bit"] < real_weights["8bit"] < real_weights["none"]


@pytest.mark.parametrize(
    ("total_gb", "free_gb", "quant", "ckpt"),
    [
        (80, 79, "none", False),  # H100: bf16 with lots of room
        (24, 23.5, "none", False),  # a 24 GB workstation card trains in bf16
        (80, 10, "8bit", False),  # a busy big card: only what is free counts
        (16, 15.5, "8bit", False),
        (12, 11.5, "4bit", True),  # small card: 4-bit and gradient checkpointing
        (8, 7.5, "4bit", True),
    ],
)
def test_pick_quantization_by_gpu_memory(real_weights, total_gb, free_gb, quant, ckpt):
    choice = pick_quantization(
        device_type="cuda", weights=real_weights, free_bytes=int(free_gb * GiB), total_bytes=total_gb * GiB
    )
    assert (choice.quantization, choice.gradient_checkpointing) == (quant, ckpt)
    assert "GiB" in choice.reason


def test_pick_quantization_on_cpu_is_none():
    choice = pick_quantization(device_type="cpu", weights={}, free_bytes=0, total_bytes=0)
    assert (choice.quantization, choice.gradient_checkpointing) == ("none", False)


def test_auto_loads_unquantised_on_cpu_and_4bit_advice_turns_on_checkpointing(bench_model_dir):
    loaded = load_base_model(str(bench_model_dir), device="cpu", quantization="auto")
    assert loaded.quantization == "none" and "cpu" in loaded.quantization_reason
    loaded.gradient_checkpointing = True  # what `auto` sets when it picks 4bit
    model = apply_lora(
        loaded, r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"], modules_to_save=[]
    )
    assert model.get_base_model().language_model.is_gradient_checkpointing


# ---------------------------------------------------------------------------- bench model


def test_bench_model_vision_outweighs_language_model_like_blip2_opt_27b(bench_model_dir):
    real = per_sample_flops(blip2_opt_27b_config(), 70)
    loaded = load_base_model(str(bench_model_dir), device="cpu", quantization="none")  # production's path
    small = per_sample_flops(loaded.model.config, 70)
    assert 1.2 < real["vision_over_lm"] < 1.6
    assert small["vision_over_lm"] > 1
    assert small["vision_over_lm"] == pytest.approx(real["vision_over_lm"], rel=0.25)
    mtime = (bench_model_dir / "model.safetensors").stat().st_mtime
    assert make_bench_model(bench_model_dir, scale=0.25) == bench_model_dir  # complete: reused
    assert (bench_model_dir / "model.safetensors").stat().st_mtime == mtime


def test_bench_model_recipe_ratio_at_full_scale():
    model, _processor = build_bench_model(BenchModelRecipe())
    real = per_sample_flops(blip2_opt_27b_config(), 70)["vision_over_lm"]
    assert per_sample_flops(model.config, 70)["vision_over_lm"] == pytest.approx(real, rel=0.15)


# ------------------------------------------------------------------------------------ CLI


def bench_args(model_dir, demo_root, *extra):
    return [
        "bench", "--job", str(REPO / "job" / "demo.yaml"),
        "-p", f"model.name_or_path={model_dir}", "-p", f"data.root={demo_root}",
        "-p", "train.num_epochs=3", "--threads", "1", *extra,
    ]  # fmt: skip


def test_bench_baseline_prints_figures_estimates_and_ratio(bench_model_dir, demo_root, tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    code = cli.main(
        bench_args(bench_model_dir, demo_root, "--steps", "2", "--baseline", "--json", str(out_json))
    )
    out = capsys.readouterr().out
    print(out)  # the figures, for whoever reads the test log
    assert code == 0
    for text in ("samples/s", "tokens/s", "peak mem", "ratio (samples/s, ours / seed):", "--time"):
        assert text in out, text
    result = json.loads(out_json.read_text())
    ours, seed = result["ours"], result["seed"]
    assert ours["samples"] == seed["samples"] == 2 * 16  # the same number of samples each
    assert (ours["micro_batch"], seed["micro_batch"]) == (16, 1)
    assert ours["quantization"] == "none" and seed["quantization"] == "8bit"
    assert seed["gradient_checkpointing"] and not ours["gradient_checkpointing"]
    assert ours["samples_per_s"] > 0 and ours["peak_memory_gb"] > 0 and ours["feature_s_per_image"] > 0
    assert result["ratio"] == pytest.approx(ours["samples_per_s"] / seed["samples_per_s"], rel=0.01)
    assert not any("did not change" in n for n in seed["notes"])  # the seed really trained LoRA
    by_cat = {e["category"]: e for e in result["estimates"]}
    assert by_cat["Cervix"]["status"] == "awaiting_labels"  # the demo's category without a sheet
    femur = by_cat["Femur"]
    assert femur["images"] == 60 and femur["train_pairs"] > 0
    assert femur["total_s"] > femur["train_s"] > 0 and femur["seed_total_s"] > 0
    assert f"{'Femur':<18}" in out and femur["sbatch_time"] in out
    longest = max(e["time_min"] for e in result["estimates"])
    configured = load_job(REPO / "job" / "demo.yaml").cluster.time_min
    assert f"-p cluster.time_min={longest} (configured: {configured})" in out


def test_bench_on_a_category_with_given_image_count(bench_model_dir, demo_root, tmp_path, capsys):
    out_json = tmp_path / "b.json"
    args = bench_args(bench_model_dir, demo_root, "--steps", "1", "--category", "Femur", "--images", "2424")
    dp = ["--gpus", "1,2,16", "--gpus-per-node", "8", "--network-gbps", "5"]
    assert cli.main([*args, *dp, "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    result = json.loads(out_json.read_text())
    # the data-parallel estimate: from the measured step and the LoRA gradients, said to be one
    sc = result["scaling"]
    assert sc["estimate"] and sc["batch"] == 16 and sc["inter_node_gbps"] == 5.0
    loaded = load_base_model(str(bench_model_dir), device="cpu", quantization="none")
    model = apply_lora_section(loaded, load_job(REPO / "job" / "demo.yaml").lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (sc["trainable_parameters"], sc["bytes_per_gradient"]) == (trainable, 4)  # fp32 on the CPU
    assert sc["measured_step_s"] == pytest.approx(result["ours"]["seconds"], rel=1e-3)  # one step
    one, two, sixteen = sc["rows"]
    assert (one["gpus"], one["speedup"], two["allreduce_bytes"]) == (1, 1.0, trainable * 4)
    assert (sixteen["nodes"], sixteen["link"]) == (2, "network")
    assert sixteen["allreduce_s"] == pytest.approx(trainable * 4 * 30 / 16 / 5e9 + 30 * 10e-6, rel=1e-3)
    assert "data-parallel ESTIMATE for N GPUs (arithmetic, not measured on N GPUs):" in out
    assert f"{trainable:,} trainable parameters x 4 bytes" in out
    assert any(line.split()[:3] == ["16", "2", "1"] and "network" in line for line in out.splitlines())
    assert "assumes: the effective batch stays 16 samples per step" in out
    assert result["inputs"]["source"] == "category Femur"
    assert "seed" not in result and "ratio" not in result
    assert {e["status"] for e in result["estimates"]} == {"given"}
    assert all(e["qa_pairs"] == 2424 * 8 for e in result["estimates"])


def test_bench_refuses_bad_estimate_flags_before_measuring(bench_model_dir, demo_root, capsys):
    for flag, value, said in (
        ("--nvlink-gbps", "0", "--nvlink-gbps must be > 0, got 0.0"),
        ("--gpus", "1,two", "--gpus '1,two': give GPU counts separated by commas"),
        ("--gpus", "0,2", "--gpus: a GPU count must be >= 1, got 0"),
    ):
        assert cli.main(bench_args(bench_model_dir, demo_root, flag, value)) == 2
        captured = capsys.readouterr()
        assert said in captured.err and "samples/s" not in captured.out


def test_bench_refuses_a_category_without_data(bench_model_dir, demo_root, capsys):
    assert cli.main(bench_args(bench_model_dir, demo_root, "--steps", "1", "--category", "Cervix")) == 2
    assert "Cervix" in capsys.readouterr().err


def test_bench_without_its_model_names_make_bench_model(tmp_path, capsys):
    """A fresh clone has no models/bench-blip2: the error names --make-bench-model (the fix for
    job/bench-cpu.yaml) and stage-model for a real model, not a hub download of a path."""
    absent = tmp_path / "models" / "bench-blip2"
    args = ["bench", "--job", str(REPO / "job" / "bench-cpu.yaml"), "-p", f"model.name_or_path={absent}"]
    assert cli.main(args) == 1
    err = capsys.readouterr().err
    assert f"the model folder {absent} (model.name_or_path) does not exist" in err
    assert "run the same command with --make-bench-model" in err
    assert f"fada-batch stage-model --model Salesforce/blip2-opt-2.7b --to {absent}" in err
    assert "HF_HUB_OFFLINE" not in err and not absent.exists()
