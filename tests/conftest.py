"""Shared fixtures: the tiny pretrained BLIP-2 (built once, cached) and demo data on disk.

The tiny model is built by production's own `fada-batch make-tiny-model` code and cached in
`.cache/` of the repository (or $FADA_TEST_CACHE), so repeated local runs reuse it; a fresh CI
checkout builds it once. Fixture paths carry spaces and quotes, like the real data folder.
"""

from __future__ import annotations

import fcntl
import functools
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One BLAS/OpenMP thread per process: tests start several processes at once (SLURM tasks,
# kill/resume runs) and oversubscribed cores made tiny-model steps 20-40x slower here.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@functools.cache
def _uses_slurm(test_file: Path) -> bool:
    """Whether a test file has tests on the SLURM cluster (its source asks for it)."""
    try:
        text = test_file.read_text(errors="replace")
    except OSError:
        return False
    return "slurm_conf" in text or "mark.slurm" in text


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist: unknown under `-p no:xdist`
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs two pytest-xdist workers with `--dist loadfile`, here with one change:
    every file with SLURM tests is one unit of work, so one worker runs them one after another
    (the one test node has 2 CPUs, and some tests assert on its queue) while the other runs the
    rest file by file (a module's fixtures, a trained adapter say, are built once).
    (`--dist loadgroup` would do it with marks, but pytest-xdist 3.8 cannot rename pytest
    9.2's node ids, so its groups are ignored.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class FileOrSlurm(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            test_file = nodeid.split("::", 1)[0]
            return "SLURM tests" if _uses_slurm(self.config.rootpath / test_file) else test_file

    return FileOrSlurm(config, log)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run where CUDA is available and are skipped (with the reason) where
    it is not, whatever `-m` selects: `make test` runs them on a GPU machine, and neither
    `make test` nor `make test-fast` starts the full-size GPU benchmark on a CPU."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False here)")
    for item in gpu:
        item.add_marker(skip)


def _cache_root() -> Path:
    return Path(os.environ.get("FADA_TEST_CACHE", REPO / ".cache"))


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """A saved tiny pretrained BLIP-2 (model + processor) folder."""
    from fada_batch.tools.tiny import make_tiny_model

    root = _cache_root()
    root.mkdir(parents=True, exist_ok=True)
    # Each xdist worker has its own session: the first builds, the other waits and reuses it.
    with open(root / ".tiny-blip2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return make_tiny_model(root / "tiny-blip2")


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One torch thread for a module (`pytestmark = pytest.mark.usefixtures(...)`): the tiny
    model's matrices are too small to split across threads, and on the shared 2-CPU test
    machine training with torch's default 2 threads took 250-350 s per seed against 13-23 s
    with one (tests/test_evaluate.py's seeds)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo data in the real layout, under a folder whose name has spaces and a quote."""
    from fada_batch.tools.demo import make_demo_data

    root = tmp_path_factory.mktemp("demo data") / "it's data"
    make_demo_data(root)
    return root


@pytest.fixture()
def job_factory(tiny_model_dir: Path, demo_root: Path, tmp_path: Path):
    """Build a JobConfig on the tiny model and demo data with overrides (dotted keys)."""
    from fada_batch.config import config_from_dict, load_job

    def make(overrides: dict | None = None, *, data_root: Path | None = None, out: Path | None = None):
        base = load_job(REPO / "job" / "demo.yaml").to_dict()
        base["data"]["root"] = str(data_root or demo_root)
        base["model"]["name_or_path"] = str(tiny_model_dir)
        base["output"]["root"] = str(out or (tmp_path / "out puts"))
        base["train"]["log_every_s"] = 0.0
        flat = dict(overrides or {})
        raw = {**base}
        for k, v in flat.items():
            section, key = k.split(".", 1)
            raw[section] = {**raw[section], key: v}
        return config_from_dict(raw)

    return make


@pytest.fixture()
def wait_stopped():
    """`wait_stopped(proc)`: wait until the child process `proc` is frozen by SIGSTOP (state T
    in /proc; see fada_batch.killpoints' FADA_STOP_AT), failing if it ends first."""

    def wait(proc: subprocess.Popen, timeout_s: float = 300) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the process ended (exit {proc.returncode}) before its stop point"
            if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
                return
            time.sleep(0.1)
        raise AssertionError(f"the process did not reach its stop point in {timeout_s} s")

    return wait


TESTCLUSTER = REPO / "slurm" / "testcluster"


@pytest.fixture(scope="session")
def slurm_conf() -> Iterator[str]:
    """A real single-node SLURM (slurm/testcluster/start.sh); sets SLURM_CONF for children.

    Started unless up (a cold start installs Debian's packages); stopped afterwards only if
    this fixture started it. FADA_SKIP_SLURM=1 skips the tests that need it.
    """
    if os.environ.get("FADA_SKIP_SLURM") == "1":
        pytest.skip("FADA_SKIP_SLURM=1: not starting the local SLURM cluster")

    def run(*cmd: str, timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)

    was_up = run("bash", str(TESTCLUSTER / "status.sh"), "--quiet", timeout=60).returncode == 0
    start = run("bash", str(TESTCLUSTER / "start.sh"), timeout=900)
    if start.returncode != 0:
        pytest.fail(f"slurm/testcluster/start.sh exited {start.returncode}:\n{start.stderr}")
    export = start.stdout.strip().splitlines()[-1]
    assert export.startswith("export SLURM_CONF="), start.stdout
    conf = export.removeprefix("export SLURM_CONF=")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", conf)
        yield conf
    if not was_up:
        run("bash", str(TESTCLUSTER / "stop.sh"), timeout=120)


@pytest.fixture(autouse=True)
def _slurm_jobs_cancelled_after(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[None]:
    """A SLURM test leaves none of its jobs in the queue: those it left behind (a requeued task
    still looping, a collector still pending) are cancelled and named on stderr, so they never
    hold the 2-CPU node while the next test waits for its own. Only jobs submitted during the
    test from this session (their logs lie under its temporary folder) are touched; a module
    fixture's jobs, there before the test, are left to the module's other tests."""
    if "slurm_conf" not in request.fixturenames:
        yield
        return
    import sys

    from clusterjobs import cancel_new, queued_jobs

    request.getfixturevalue("slurm_conf")  # started, and SLURM_CONF set, before asking it
    mine = tmp_path_factory.getbasetemp()
    known = queued_jobs(mine)
    yield
    if left := cancel_new(mine, known):
        print(f"SLURM jobs {request.node.nodeid} left in the queue, cancelled: {left}", file=sys.stderr)
