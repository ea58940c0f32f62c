"""Build the CPU test image of container/Dockerfile with podman, on a Debian base made here.

No image registry is reachable from CI, so the base is made from Debian's packages:

1. a Debian 12 root file system (mmdebstrap: python3, python3-venv, ca-certificates),
   imported into podman;
2. on it, container/test/base-cpu.Containerfile: a venv `python` holding the CPU build of
   torch at the lock's version (the stand-in for pytorch/pytorch:<torch>-...-runtime);
3. on that, container/Dockerfile itself with `--build-arg TORCH_BUILD=cpu`.

Steps 1 and 2 are cached under tags keyed by a hash of their inputs (podman's own image
store, /var/lib/containers); step 3 reuses podman's layer cache (the dependency layer is
rebuilt only when requirements.lock or pyproject.toml change); what earlier builds left
untagged is pruned. Each step prints its time, and the image sizes are printed at the end.
The last line is `FADA_TEST_IMAGE=<tag>`; with `--env-file F` the variables the container
tests need (FADA_TEST_IMAGE, CONTAINERS_CONF) are written to F as `export` lines.

This machine's ways stay here, never in the Dockerfile:
- podman's config: runc where the cgroup hierarchy is not unified (crun fails there), and
  default ulimits within this machine's hard limits (podman's own exceed them);
- pip inside a build uses the host's pip configuration (`pip config list`: CA bundle,
  find-links, extra indexes, constraints) and the local files and folders it names, mounted
  read-only at the same paths. podman's layer cache keys on a RUN's text, not on its mounts:
  the base's tag carries a hash of that configuration.

    python scripts/build_test_image.py [--tag localhost/fada-batch:cpu-test] [--env-file F]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("FADA_CONTAINER_CACHE", "/var/tmp/fada-container"))
DEBIAN = {"suite": "bookworm", "variant": "minbase", "include": "python3,python3-venv,ca-certificates"}
BASE_FILE = REPO / "container" / "test" / "base-cpu.Containerfile"
TOOLS = {"podman": "podman", "mmdebstrap": "mmdebstrap", "runc": "runc"}


def step(name: str):
    """Print a step's name now and its wall time when it ends."""

    class _Timer:
        def __enter__(self) -> None:
            self.t0 = time.time()
            print(f"[build] {name} ...", flush=True)

        def __exit__(self, *exc: object) -> None:
            print(f"[build] {name}: {time.time() - self.t0:.1f} s", flush=True)

    return _Timer()


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess[str]:
    """Run a command, its output to ours; fail with the command line when it fails."""
    r = subprocess.run(cmd, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"error: `{' '.join(cmd)}` exited {r.returncode}")
    return r


def podman(*args: str, capture: bool = False) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], capture_output=capture)


def image_exists(tag: str) -> bool:
    return subprocess.run(["podman", "image", "exists", tag], check=False).returncode == 0


def key(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def containers_conf() -> Path:
    """podman's configuration for this machine (CONTAINERS_CONF), unless one is given."""
    given = os.environ.get("CONTAINERS_CONF")
    if given:
        return Path(given)
    lines = ["# written by scripts/build_test_image.py for this machine", "[containers]"]
    # podman's default ulimits exceed this machine's hard limits ("setrlimit: operation not
    # permitted"); an nproc above 32768 was refused even below the shell's hard limit.
    ulimits = []
    for name, res, cap in (
        ("nofile", resource.RLIMIT_NOFILE, 65536),
        ("nproc", resource.RLIMIT_NPROC, 32768),
    ):
        hard = resource.getrlimit(res)[1]
        value = cap if hard == resource.RLIM_INFINITY else min(hard, cap)
        ulimits.append(f'"{name}={value}:{value}"')
    lines.append(f"default_ulimits = [{', '.join(ulimits)}]")
    cgroup = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True, text=True)
    if cgroup.stdout.strip() != "cgroup2fs":  # crun: "cgroups in hybrid mode not supported"
        lines += ["[engine]", 'runtime = "runc"']
    path = CACHE / "containers.conf"
    path.write_text("\n".join(lines) + "\n")
    return path


def pip_config() -> tuple[str, list[str]]:
    """The host's effective pip configuration as a pip.conf, and the read-only mounts
    (`-v SRC:SRC:ro`) of the local files and folders it names."""
    r = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    )
    rank = {":env:": 3, "site": 2, "user": 1, "global": 0}
    chosen: dict[str, tuple[int, str]] = {}
    for line in r.stdout.splitlines():
        m = re.match(r"^(:env:|[\w-]+)\.([\w-]+)='(.*)'$", line.strip())
        if not m:
            continue
        scope, name, value = m.groups()
        prio = rank.get(scope, 0)
        if name not in chosen or prio >= chosen[name][0]:
            chosen[name] = (prio, value)
    conf = "[global]\n" + "".join(f"{k} = {v}\n" for k, (_p, v) in sorted(chosen.items()))
    mounts: list[str] = []
    for _prio, value in chosen.values():
        for token in value.split():
            path = token.removeprefix("file://")
            if not path.startswith("/"):
                continue
            if path.rstrip("/").endswith("/simple"):  # a PEP 503 index links to ../../files
                path = str(Path(path).parent)
            if Path(path).exists() and f"{path}:{path}:ro" not in mounts:
                mounts.append(f"{path}:{path}:ro")
    return conf, mounts


def build_args(mounts: list[str], pip_conf: Path) -> list[str]:
    args = ["--format", "docker", "-v", f"{pip_conf}:/etc/pip.conf:ro"]
    for m in mounts:
        args += ["-v", m]
    return args


def debian_base() -> str:
    """A Debian 12 root file system from Debian's packages, imported into podman (cached)."""
    version = run(["mmdebstrap", "--version"], capture_output=True).stdout.strip()
    tag = f"localhost/fada-test-debian:{key(json.dumps(DEBIAN, sort_keys=True), version)}"
    if image_exists(tag):
        print(f"[build] Debian base: cached ({tag})", flush=True)
        return tag
    with step(f"Debian base with mmdebstrap ({tag})"):
        tar = CACHE / f"{tag.rsplit(':', 1)[1]}.tar"
        variant, include = f"--variant={DEBIAN['variant']}", f"--include={DEBIAN['include']}"
        run(["mmdebstrap", "--quiet", variant, include, DEBIAN["suite"], str(tar)])
        podman("import", "--quiet", str(tar), tag)
        tar.unlink()
    return tag


def torch_base(debian: str, torch_version: str, pip_conf_text: str, common: list[str]) -> str:
    """The venv + CPU torch layer on the Debian base (cached by its inputs)."""
    tag = "localhost/fada-test-torch:" + key(debian, BASE_FILE.read_text(), torch_version, pip_conf_text)
    if image_exists(tag):
        print(f"[build] torch base: cached ({tag})", flush=True)
        return tag
    with step(f"torch {torch_version} base ({tag})"):
        podman(
            "build",
            *common,
            "--build-arg",
            f"DEBIAN_IMAGE={debian}",
            "--build-arg",
            f"TORCH_VERSION={torch_version}",
            "-f",
            str(BASE_FILE),
            "-t",
            tag,
            str(BASE_FILE.parent),
        )
    return tag


def lock_version(name: str) -> str:
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.startswith(f"{name}=="):
            return line.split("==", 1)[1].strip()
    sys.exit(f"error: {name} is not pinned in requirements.lock")


def image_size(tag: str) -> str:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout.strip())
    return f"{size / 1e9:.2f} GB"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="localhost/fada-batch:cpu-test")
    parser.add_argument("--env-file", type=Path)
    args = parser.parse_args()
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        sys.exit(
            f"error: {', '.join(missing)} not found. On Debian: apt-get install -y podman buildah "
            "mmdebstrap runc (.ci/run does this)"
        )
    t0 = time.time()
    CACHE.mkdir(parents=True, exist_ok=True)
    os.environ["CONTAINERS_CONF"] = str(containers_conf())
    conf_text, mounts = pip_config()
    pip_conf = CACHE / "pip.conf"
    pip_conf.write_text(conf_text)
    common = build_args(mounts, pip_conf)
    debian = debian_base()
    base = torch_base(debian, lock_version("torch"), conf_text, common)
    with step(f"fada-batch image {args.tag} (container/Dockerfile, TORCH_BUILD=cpu)"):
        podman(
            "build",
            *common,
            "--build-arg",
            f"BASE_IMAGE={base}",
            "--build-arg",
            "TORCH_BUILD=cpu",
            "-f",
            str(REPO / "container" / "Dockerfile"),
            "-t",
            args.tag,
            str(REPO),
        )
    # Untagged leftovers of earlier builds (the image this build replaced and its own layers);
    # the layers this image is made of stay, and with them the cache for the next build.
    subprocess.run(["podman", "image", "prune", "--force"], capture_output=True, check=False)
    for tag in (debian, base, args.tag):
        print(f"[build] size {tag}: {image_size(tag)}", flush=True)
    print(f"[build] total {time.time() - t0:.1f} s", flush=True)
    if args.env_file:
        args.env_file.write_text(
            f"export FADA_TEST_IMAGE={args.tag}\nexport CONTAINERS_CONF={os.environ['CONTAINERS_CONF']}\n"
        )
    print(f"FADA_TEST_IMAGE={args.tag}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
