"""The built image, run as its users run it (podman here; Docker takes the same arguments).

`make test-container` builds the CPU test build of container/Dockerfile on a Debian base
made from Debian's packages (scripts/build_test_image.py) and runs these tests with its tag in
FADA_TEST_IMAGE: `--version`, the demo as the image's user and as any `--user` with outputs
owned by the caller, `validate` on a read-only data mount, a clear error for an unwritable
outputs mount, the image's code first whatever the working directory, and the torch check
that keeps the default build strict.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from fada_batch import __version__

pytestmark = pytest.mark.container

REPO = Path(__file__).resolve().parent.parent
TINY = "/opt/fada-batch/models/tiny-blip2"
# the demo, cut down to a minute of CPU: two labelled categories (evaluation, report, plots)
# and one awaiting labels
DEMO = [
    "demo",
    "--job",
    "job/demo.yaml",
    "-p",
    f"model.name_or_path={TINY}",
    "-p",
    "data.root=/tmp/demo-data",
    "-p",
    "output.root=/outputs/demo",
    "-p",
    "data.categories=[Abdomen,Femur,Cervix]",
    "-p",
    "data.num_images=8",
    "-p",
    "train.num_epochs=2",
]


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["podman", *args], capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="session")
def image() -> str:
    """The image's tag (FADA_TEST_IMAGE, set by `make test-container`)."""
    tag = os.environ.get("FADA_TEST_IMAGE")
    if not tag:
        pytest.skip("FADA_TEST_IMAGE is not set: `make test-container` builds the image and runs these")
    if shutil.which("podman") is None:
        pytest.fail("podman is not installed (apt-get install podman buildah mmdebstrap runc)")
    if podman("image", "exists", tag).returncode != 0:
        pytest.fail(f"image {tag} not found: build it with `python scripts/build_test_image.py --tag {tag}`")
    return tag


def owned_by(root: Path) -> set[tuple[int, int]]:
    return {(p.lstat().st_uid, p.lstat().st_gid) for p in [root, *root.rglob("*")]}


def outputs_dir(tmp_path: Path, uid: int, gid: int) -> Path:
    out = tmp_path / "outputs"
    out.mkdir()
    os.chown(out, uid, gid)
    return out


def check_demo(out: Path, r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    root = out / "demo"
    states = {
        c: json.loads((root / f"blip2_{c}" / "training_summary.json").read_text())["status"]
        for c in ("abdomen", "femur", "cervix")
    }
    assert states == {"abdomen": "completed", "femur": "completed", "cervix": "awaiting_labels"}
    assert (root / "blip2_femur" / "final_model" / "adapter_model.safetensors").is_file()
    assert (root / "report.md").is_file() and (root / "report.html").is_file()
    # matplotlib found a cache folder it may write (MPLCONFIGDIR): no warning about it
    assert "Matplotlib" not in r.stderr and "not a writable directory" not in r.stderr, r.stderr[-2000:]


def test_version_is_this_checkout(image: str):
    r = podman("run", "--rm", image, "--version", timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"fada-batch {__version__}"


def test_image_metadata_user_entrypoint_and_environment(image: str):
    r = podman("image", "inspect", image)
    assert r.returncode == 0, r.stderr
    config = json.loads(r.stdout)[0]["Config"]
    assert config["User"] == "1000" and config["Entrypoint"] == ["fada-batch"]
    env = dict(e.split("=", 1) for e in config["Env"])
    assert env["HF_HUB_OFFLINE"] == "1" and env["PYTHONSAFEPATH"] == "1"
    assert env["MPLCONFIGDIR"].startswith("/tmp/") and env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert config["Labels"]["org.opencontainers.image.base.name"].startswith("localhost/fada-test-torch:")


def test_demo_as_the_image_user(image: str, tmp_path: Path):
    out = outputs_dir(tmp_path, 1000, 1000)
    r = podman("run", "--rm", "-v", f"{out}:/outputs", image, *DEMO)
    check_demo(out, r)
    assert owned_by(out) == {(1000, 1000)}


def test_demo_as_any_user_writes_outputs_the_caller_owns(image: str, tmp_path: Path):
    out = outputs_dir(tmp_path, 4321, 4321)
    r = podman("run", "--rm", "--user", "4321:4321", "-v", f"{out}:/outputs", image, *DEMO)
    check_demo(out, r)
    assert owned_by(out) == {(4321, 4321)}


def test_validate_reads_a_read_only_data_mount(image: str, demo_root: Path):
    r = podman(
        "run", "--rm", "-v", f"{demo_root}:/data:ro", image,
        "validate", "--job", "job/demo.yaml", "-p", "data.root=/data", "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads(r.stdout)["categories"]
    statuses = {d["category"]: d["status"] for d in report}
    assert statuses == {"Abdomen": "ok", "Femur": "ok", "Thorax": "ok", "Cervix": "awaiting_labels"}
    assert all(d["image_dir"].startswith("/data/Fetal Ultrasound/") for d in report if d["status"] == "ok")
    assert report[0]["stats"]["images_usable"] == 60


def test_unwritable_outputs_mount_is_refused_clearly(image: str, tmp_path: Path):
    out = tmp_path / "root-owned"
    out.mkdir(mode=0o755)  # owned by root here: the image's user (uid 1000) cannot write it
    r = podman("run", "--rm", "-v", f"{out}:/outputs", image, *DEMO)
    assert r.returncode != 0
    assert "not writable" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert list(out.iterdir()) == []


def test_python_m_runs_the_image_code_not_the_working_directory(image: str, tmp_path: Path):
    """A SLURM task runs `python -m submitit.core._submit` in the submission folder, often a
    checkout: with PYTHONSAFEPATH=1 the image's fada_batch is imported, not the folder's."""
    decoy = tmp_path / "checkout" / "fada_batch"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text('__version__ = "decoy"\n')
    (decoy / "__main__.py").write_text('print("decoy checkout")\n')
    r = podman(
        "run", "--rm", "-v", f"{decoy.parent}:/work:ro", "-w", "/work", "--entrypoint", "python", image,
        "-c", "import fada_batch; print(fada_batch.__version__, fada_batch.__file__)",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    version, path = r.stdout.split()
    assert version == __version__ and path.startswith("/opt/venv/") and "/work/" not in path
    r = podman(
        "run",
        "--rm",
        "-v",
        f"{decoy.parent}:/work:ro",
        "-w",
        "/work",
        "--entrypoint",
        "python",
        image,
        "-m",
        "fada_batch",
        "--version",
    )
    assert r.stdout.strip() == f"fada-batch {__version__}", r.stdout + r.stderr


def torch_check_snippet() -> str:
    """The Dockerfile's check of the torch build (the `case` and `python -c` of its dependency
    layer), as a shell snippet that reads TORCH_BUILD from the environment."""
    text = (REPO / "container" / "Dockerfile").read_text().replace("\\\n", " ")
    case = re.search(r'case "\$\{TORCH_BUILD\}" in .*? esac', text)
    check = re.search(r"python -c 'import sys, torch;.*?' \"\$\{TORCH_BUILD\}\"", text)
    assert case and check, "the Dockerfile checks TORCH_BUILD and the torch build"
    return f"{case.group(0)} && {check.group(0)}"


@pytest.mark.parametrize(
    ("torch_build", "ok", "says"),
    [
        ("cpu", True, "torch 2.13.0+cpu cpu"),
        ("cuda", False, "is a cpu build, but TORCH_BUILD=cuda"),  # the default build stays strict
        ("gpu", False, "TORCH_BUILD=gpu: use cuda (the default) or cpu"),
    ],
)
def test_the_default_build_refuses_a_cpu_torch(image: str, torch_build: str, ok: bool, says: str):
    r = podman(
        "run", "--rm", "--env", f"TORCH_BUILD={torch_build}", "--entrypoint", "bash", image,
        "-o", "pipefail", "-c", torch_check_snippet(),
    )  # fmt: skip
    assert (r.returncode == 0) is ok, r.stdout + r.stderr
    assert says in r.stdout + r.stderr
