"""scripts/gpu_benchmark.py: a scaled-down run on the CPU (so the script cannot rot), the full
architecture's parameter counts, and the real run on a GPU (skipped without CUDA)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fada_batch.tools.bench import model as bench_model
from fada_batch.tools.bench import seed as bench_seed
from fada_batch.tools.bench.model import BLIP2_OPT_27B, blip2_config, build_random_model, parameter_counts

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_benchmark.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared CPU: no thread oversubscription
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def test_full_config_is_blip2_opt_27b():
    config = blip2_config(BLIP2_OPT_27B)
    counts = parameter_counts(config)
    model = build_random_model(config, torch.device("meta"), torch.bfloat16)
    assert sum(p.numel() for p in model.parameters()) == 3_744_679_936  # blip2-opt-2.7b: 3.74B
    assert counts["vision"] == 985_952_256 and counts["lm"] > 2.6e9
    assert next(model.parameters()).dtype == torch.bfloat16
    assert (config.vision_config.image_size // config.vision_config.patch_size) ** 2 + 1 == 257


def test_the_script_builds_and_times_with_the_package_code_not_a_copy():
    """The model, its configuration, the FLOP counts and the seed's timed `Trainer` loop are the
    package's own objects (what `fada-batch bench` runs); the script defines none of them."""
    gb = load_script()
    assert gb.FULL is BLIP2_OPT_27B
    for name in ("blip2_config", "build_random_model", "parameter_counts", "vision_forward_flops"):
        assert getattr(gb, name) is getattr(bench_model, name), name
    assert gb.time_trainer is bench_seed.time_trainer and gb.SEED_PROMPT_LEN == bench_seed.SEED_PROMPT_LEN
    source = SCRIPT.read_text()
    for copy in ("Blip2Config(", "Blip2VisionConfig(", "OPTConfig(", "def build_", "def time_trainer"):
        assert copy not in source, copy


def test_tiny_run_on_cpu_writes_figures(tmp_path):
    out = tmp_path / "gpu bench.json"
    proc = run_script("--scale", "tiny", "--device", "cpu", "--out", str(out), timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    print(proc.stdout)
    ours, seed = result["ours"], result["seed"]
    assert ours["batch"] == 16 and seed["batch"] == 1
    assert ours["samples"] == 3 * 16 and seed["samples"] == 6
    assert seed["quantization"] == "none" and seed["gradient_checkpointing"]  # no bitsandbytes CUDA here
    assert ours["samples_per_s"] > 0 and seed["samples_per_s"] > 0 and ours["feature_cache_s"] > 0
    assert result["ratio"] == pytest.approx(ours["samples_per_s"] / seed["samples_per_s"], rel=0.01)
    assert ours["mfu"] is None and result["peak_bf16_tflops"] is None  # no GPU peak to divide by
    assert seed["tokens_per_s"] > seed["real_tokens_per_s"]  # the seed's padding to 256
    assert "4*N_lm*T" in result["mfu_formula"]


def test_ours_only_in_bf16_gives_our_figures_and_process_memory(tmp_path):
    """`--ours-only --dtype bfloat16` on the CPU: the memory check of docs/performance.md."""
    out = tmp_path / "ours.json"
    proc = run_script(
        "--scale",
        "tiny",
        "--device",
        "cpu",
        "--dtype",
        "bfloat16",
        "--ours-only",
        "--out",
        str(out),
        timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["seed"] is None and not result["partial"] and "ratio" not in result
    assert result["ours"]["dtype"] == "bfloat16" and result["ours"]["process_peak_rss_gb"] > 0


@pytest.mark.gpu  # skipped without CUDA by conftest.py
def test_full_run_on_gpu(tmp_path):
    out = tmp_path / "gpu_benchmark.json"
    proc = run_script("--out", str(out), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    print(json.dumps(result, indent=2))
    assert result["scale"] == "full" and result["ours"]["peak_memory_gb"] > 7
    assert result["ratio"] > 0 and result["seed"]["quantization"] in ("8bit", "none")


def test_gpu_checks_script_runs_scaled_down_on_cpu(tmp_path, tiny_model_dir, demo_root):
    """scripts/gpu_checks.sh (the one command a lent GPU machine runs) with DEVICE=cpu: the
    benchmark at tiny scale and a short demo through the CLI, figures and logs in $OUT."""
    out = tmp_path / "gpu out"
    repo = SCRIPT.parent.parent
    env = {
        **os.environ,
        "OUT": str(out),
        "DEVICE": "cpu",
        "PY": sys.executable,
        "OMP_NUM_THREADS": "1",
        "FADA_GPU_CHECKS_OUTPUTS": str(tmp_path / "outputs"),
        "FADA_GPU_CHECKS_MODEL": str(tiny_model_dir),
        "FADA_GPU_CHECKS_DATA": str(demo_root),
    }
    proc = subprocess.run(
        ["bash", str(repo / "scripts" / "gpu_checks.sh")],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        check=False,
    )
    checks = (out / "checks.txt").read_text()
    assert proc.returncode == 0, checks + proc.stderr[-2000:]
    assert "ok: gpu_benchmark" in checks and "ok: demo auto" in checks and "done, status 0" in checks
    assert json.loads((out / "gpu_benchmark.json").read_text())["ratio"] > 0
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["status"] == "completed" and summary["category"] == "Femur"
    assert "torch" in (out / "env.txt").read_text()
    assert not (repo / "outputs" / "gpu-demo-auto").exists()  # kept out of the checkout
