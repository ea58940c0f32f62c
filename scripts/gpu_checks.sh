#!/usr/bin/env bash
# Every GPU check of this project in one command, for a machine lent for a few minutes.
#
#   bash scripts/device_wheels.sh                  # first, where pip reaches PyPI: fills .whl/
#   OUT=/some/dir bash scripts/gpu_checks.sh       # on the GPU machine, from the repo root
#
# Figures and logs land in $OUT (at most 8 files: env.txt, gpu_benchmark.json, gpu_benchmark.log,
# demo_auto.log, demo_8bit.log, demo_summary.json, checks.txt):
#   1. scripts/gpu_benchmark.py: the full blip2-opt-2.7b architecture, ours against the seed's
#      recipe (samples/s, peak memory, ratio, MFU). Its JSON holds ours alone if the seed's part
#      is cut short.
#   2. the demo trained through the production CLI on the GPU with `model.quantization: auto`
#      (bf16 expected on a large card), evaluated and collected;
#   3. the same with 8-bit weights (bitsandbytes' CUDA path in our training loop).
# Each step has its own time limit (GPU_BENCH_S, DEMO_S seconds) so a slow one cannot take the
# others' time; the exit status is non-zero when any step failed.
#
# DEVICE=cpu runs the same steps scaled down on a CPU (the benchmark at --scale tiny, a short
# demo, no 8-bit step): tests/test_gpu_benchmark.py does that so this script cannot rot.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-checks}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
GPU_BENCH_S=${GPU_BENCH_S:-360}
DEMO_S=${DEMO_S:-120}
if [ "$DEVICE" = cpu ]; then
  bench_args=(--scale tiny --device cpu)
  demo_args=(-p train.num_epochs=1 -p data.num_images=12 -p "data.categories=[Femur]")
else
  bench_args=()
  demo_args=(-p train.num_epochs=4)  # the CUDA path, not the demo's accuracy
fi
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
t0=$(date +%s)
checks="$OUT/checks.txt"
: >"$checks"
say() { echo "[$(($(date +%s) - t0)) s] $*" | tee -a "$checks"; }

if compgen -G ".whl/*.whl" >/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { say "FAILED: installing .whl/"; exit 1; }
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
{
  nvidia-smi 2>&1 || echo "nvidia-smi: not found"
  $PY - <<'EOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
for pkg in ("transformers", "peft", "bitsandbytes", "accelerate", "safetensors", "tokenizers", "submitit"):
    try:
        print(pkg, md.version(pkg))
    except md.PackageNotFoundError:
        print(pkg, "MISSING")
EOF
} >"$OUT/env.txt" 2>&1
say "environment: $(grep -E '^(python|gpu) ' "$OUT/env.txt" | tr '\n' ' ')"
status=0

# 1. the benchmark
if timeout "$GPU_BENCH_S" $PY scripts/gpu_benchmark.py "${bench_args[@]}" --out "$OUT/gpu_benchmark.json" >"$OUT/gpu_benchmark.log" 2>&1; then
  say "ok: gpu_benchmark: $(tail -1 "$OUT/gpu_benchmark.log")"
else
  say "FAILED ($?): gpu_benchmark; last lines:"; tail -5 "$OUT/gpu_benchmark.log" | tee -a "$checks"; status=1
fi

# 2-3. the demo through the CLI, on the GPU (a fresh output root each, so nothing is skipped)
OUTPUTS=${FADA_GPU_CHECKS_OUTPUTS:-outputs}
MODEL=${FADA_GPU_CHECKS_MODEL:-./models/tiny-blip2}  # both made by the demo when absent
DATA=${FADA_GPU_CHECKS_DATA:-./data/demo}
describe_summaries() {  # one line per trained category of an output root
  $PY - "$1" <<'EOF'
import json, sys
from pathlib import Path

for f in sorted(Path(sys.argv[1]).glob("blip2_*/training_summary.json")):
    s = json.loads(f.read_text())
    if s.get("status") != "completed":
        continue
    d, m = s.get("device", {}), s.get("peak_memory", {})
    em = (s.get("eval") or {}).get("overall", {}).get("exact_match")
    print(f"  {s['category']}: {d.get('type')} {d.get('name')} {s.get('dtype')} quantization {s.get('quantization')}; "
          f"{s.get('samples_per_s')} samples/s; peak {m.get('gb')} GB ({m.get('kind')}); "
          f"CUDA_VISIBLE_DEVICES={d.get('cuda_visible_devices')}; held-out exact match {em}")
EOF
}
demo() {  # name, extra -p overrides...
  local name=$1; shift
  local out="$OUTPUTS/gpu-demo-$name"
  rm -rf "$out"
  if timeout "$DEMO_S" $PY -m fada_batch demo --job job/demo.yaml -p "model.device=$DEVICE" -p "output.root=$out" \
    -p "model.name_or_path=$MODEL" -p "data.root=$DATA" "${demo_args[@]}" "$@" \
    >"$OUT/demo_$name.log" 2>&1; then
    say "ok: demo $name"
    describe_summaries "$out" | tee -a "$checks"
  else
    say "FAILED ($?): demo $name; last lines:"; tail -5 "$OUT/demo_$name.log" | tee -a "$checks"; status=1
  fi
}
demo auto -p model.quantization=auto
summary=$(find "$OUTPUTS/gpu-demo-auto" -name training_summary.json 2>/dev/null | sort | head -1)
[ -n "$summary" ] && cp "$summary" "$OUT/demo_summary.json"
[ "$DEVICE" = cpu ] || demo 8bit -p model.quantization=8bit -p "data.categories=[Femur]"
say "done, status $status"
exit $status
