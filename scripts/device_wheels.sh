#!/usr/bin/env bash
# Wheels that a bare GPU machine lacks, for scripts/gpu_checks.sh, saved in .whl/ (git-ignored).
#
#   bash scripts/device_wheels.sh            # here, where pip reaches PyPI
#
# A GPU machine with its own PyTorch but no network gets this project's pinned transformers and
# peft (versions from requirements.lock; its own may differ) plus what it has none of:
# bitsandbytes (for the seed's 8-bit recipe and quantization: 8bit/4bit), submitit, openpyxl.
# Its torch, accelerate, safetensors, tokenizers, huggingface_hub, pandas, pillow and PyYAML are
# used as they are. bitsandbytes' wheel (43 MB) holds a library for every CUDA and ROCm version;
# only those for CUDA 13 (the machine's torch is cu130) and the CPU are kept, so everything
# that travels stays far under a 64 MiB transfer limit.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${DEST:-.whl}
PYVER=${PYVER:-3.12}
pin() { sed -n "s/^$1==//p" requirements.lock; }
rm -rf "$DEST" && mkdir -p "$DEST"
pkgs=()
for name in transformers peft bitsandbytes submitit openpyxl et_xmlfile; do
  v=$(pin "$name")
  [ -n "$v" ] || { echo "error: $name is not pinned in requirements.lock" >&2; exit 2; }
  pkgs+=("$name==$v")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  -d "$DEST" "${pkgs[@]}"

# Keep bitsandbytes' CUDA 13 and CPU libraries only; drop the others from the archive and RECORD.
python3 - "$DEST" <<'EOF'
import re, sys, zipfile
from pathlib import Path

(wheel,) = Path(sys.argv[1]).glob("bitsandbytes-*.whl")
keep = re.compile(r"libbitsandbytes_(cuda13\d|cpu)\.so$")
drop = lambda n: re.search(r"libbitsandbytes_\w+\.(so|dll|dylib)$", n) and not keep.search(n)
slim = wheel.with_suffix(".slim")
with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED) as dst:
    for info in src.infolist():
        if drop(info.filename):
            continue
        data = src.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines(keepends=True)
            data = "".join(ln for ln in lines if not drop(ln.split(",")[0])).encode()
        dst.writestr(info, data)
slim.replace(wheel)
print(f"{wheel.name}: kept {[n for n in zipfile.ZipFile(wheel).namelist() if keep.search(n)]}")
EOF
du -ch "$DEST"/*.whl
