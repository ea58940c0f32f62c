"""Test selection: `gpu` tests run exactly where CUDA is, under both make targets.

Each target's pytest command line is taken from `make -n` and run, with the repository's
pytest settings and a copy of tests/conftest.py, on a probe folder holding one `gpu` test
and one plain test: once as this machine is (with CUDA hidden), once with CUDA reported
present.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import pytest

@pytest.mark.gpu
def test_needs_cuda():
    pass

def test_plain():
    pass
"""


def make_pytest_args(target: str) -> list[str]:
    """The arguments that `make <target>` passes to pytest (from `make -n`, nothing run)."""
    dry = subprocess.run(
        ["make", "-n", "-C", str(REPO), target], capture_output=True, text=True, check=True, timeout=60
    ).stdout
    lines = [line for line in dry.splitlines() if re.search(r"python -m pytest\b", line)]
    assert len(lines) == 1, dry
    return shlex.split(lines[0].split("-m pytest", 1)[1])


@pytest.mark.parametrize("target", ["test", "test-fast"])
@pytest.mark.parametrize("cuda", [False, True], ids=["no CUDA", "CUDA"])
def test_gpu_tests_run_where_cuda_is_and_skip_where_not(target, cuda, tmp_path):
    probe = tmp_path / "probe"
    probe.mkdir()
    fake = "\nimport torch\ntorch.cuda.is_available = lambda: True  # as on a GPU machine\n"
    conftest = (REPO / "tests" / "conftest.py").read_text()
    (probe / "conftest.py").write_text(conftest + (fake if cuda else ""))
    (probe / "test_probe.py").write_text(PROBE)
    args = [*make_pytest_args(target), "-c", str(REPO / "pyproject.toml"), "-p", "no:cacheprovider"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU unless the fake says so
    run = subprocess.run(
        [sys.executable, "-m", "pytest", *args, "-rA", str(probe)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]

    # the short summary (-rA) reads the same with and without pytest-xdist's workers
    def passed(name: str) -> bool:
        return re.search(rf"^PASSED \S*test_probe\.py::{name}$", run.stdout, re.M) is not None

    assert passed("test_plain"), run.stdout
    if cuda:
        assert passed("test_needs_cuda"), run.stdout
    else:
        assert not passed("test_needs_cuda"), run.stdout
        assert re.search(r"SKIPPED \[1\] \S*test_probe\.py:\d+: needs a CUDA GPU", run.stdout), run.stdout
