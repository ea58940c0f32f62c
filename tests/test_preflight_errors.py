"""What a user sees when the data is not there, or SLURM is not: one clear error, no traceback.

`validate` (and `submit`) with a data root that is missing (a forgotten bind mount), empty (a
share not mounted), or holds something else say that no data was found and where they looked;
present data where every category awaits labels is told apart. `submit` without a reachable
SLURM (SLURM_CONF pointing nowhere, no sbatch on PATH, a controller that is down, or sbatch
refusing the job) prints one line with the fix and exits 1, having written nothing.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from fada_batch.cli import main
from fada_batch.config import dump_yaml


def _job(job_factory, tmp_path: Path, data_root: Path, **over) -> Path:
    cfg = job_factory({"cluster.gpus_per_task": 0, "cluster.cpus_per_task": 1, "cluster.mem_gb": 1, **over})
    cfg.data.root = str(data_root)
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    return job


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture()
def cli(capsys):
    """`fada-batch ARGS` in this process (main returns the exit status; nothing may escape it)."""

    def run(*args: str) -> Ran:
        code = main(list(args))
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


@pytest.mark.parametrize("kind", ["missing", "empty", "other things"])
def test_validate_without_data_says_where_it_looked(job_factory, tmp_path, kind, cli):
    root = tmp_path / "mnt" / "data"
    if kind != "missing":
        root.mkdir(parents=True)
    if kind == "other things":
        (root / "scans-2024").mkdir()
    job = _job(job_factory, tmp_path, root)
    p = cli("validate", "--job", str(job))
    assert p.returncode == 1, p.stdout + p.stderr
    out = p.stdout
    assert out.startswith("error: no data found: the data root") and "Traceback" not in p.stderr
    assert {
        "missing": "does not exist here (not mounted, or not bound into the container?)",
        "empty": "is empty (is the share, or the container's bind, mounted?)",
        "other things": "holds neither 'Fetal Ultrasound/' nor 'Fetal Ultrasound Labeled/' (it holds scans-2024)",
    }[kind] in out
    # the folders it expected, for the job's categories
    assert f"{root}/Fetal Ultrasound/{{Abdomen,Femur,Thorax,Cervix}}/" in out
    assert f"{root}/Fetal Ultrasound Labeled/<Category>_image_list.xlsx" in out
    assert "-p data.root=DIR" in out and "--bind" in out
    assert len(out.strip().splitlines()) == 1  # not one "data root not found" per category
    js = cli("validate", "--job", str(job), "--json")
    assert (
        js.returncode == 1
        and "no data found" in js.stderr
        and json.loads(js.stdout)["nothing_ready"].startswith("no data found")
    )


def test_data_present_but_every_category_awaits_labels(job_factory, demo_root, tmp_path, cli):
    root = tmp_path / "data"
    shutil.copytree(demo_root / "Fetal Ultrasound", root / "Fetal Ultrasound")
    job = _job(job_factory, tmp_path, root)
    p = cli("validate", "--job", str(job))
    assert p.returncode == 1
    assert "0 ready, 4 awaiting labels, 0 blocked by data problems" in p.stdout
    assert "nothing is ready: the data root is there (4 of 4 category image folders found)" in p.stdout
    assert f"looked in {root}/Fetal Ultrasound Labeled for Abdomen_image_list.xlsx" in p.stdout
    # one labelled category is enough
    ok = cli("validate", "--job", str(job), "-p", f"data.root={demo_root}")
    assert ok.returncode == 0, ok.stdout


def test_submit_without_data_submits_nothing(job_factory, tmp_path, cli):
    job = _job(job_factory, tmp_path, tmp_path / "not mounted")
    p = cli("submit", "--job", str(job), "--executor", "local")
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert p.stderr.startswith("error: no data found: the data root") and len(p.stderr.splitlines()) == 1


def _no_slurm(monkeypatch, tmp_path: Path, how: str) -> None:
    monkeypatch.delenv("SLURM_CONF", raising=False)
    if how == "SLURM_CONF nowhere":
        monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere" / "slurm.conf"))
    elif how == "no sbatch on PATH":
        monkeypatch.setenv("PATH", str(Path(sys.executable).parent))  # the venv's commands only
    # else: SLURM's commands, but no configuration at all (no SLURM_CONF, no /etc/slurm)


@pytest.mark.parametrize("how", ["SLURM_CONF nowhere", "no sbatch on PATH", "no configuration"])
def test_submit_without_slurm_is_one_line_with_the_fix(
    job_factory, demo_root, tmp_path, how, cli, monkeypatch
):
    if how == "no configuration" and (
        shutil.which("sbatch") is None or Path("/etc/slurm/slurm.conf").exists()
    ):
        pytest.skip("needs SLURM's client commands and no /etc/slurm/slurm.conf")
    job = _job(job_factory, tmp_path, demo_root)
    out_root = Path(job_factory().output.root)
    t0 = time.monotonic()
    _no_slurm(monkeypatch, tmp_path, how)
    p = cli("submit", "--job", str(job))
    took = time.monotonic() - t0
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    err = p.stderr.strip()
    assert err.startswith("error: ") and "--executor local" in err
    assert {
        "SLURM_CONF nowhere": "SLURM is not configured here: SLURM_CONF=",
        "no sbatch on PATH": "no SLURM here: sbatch and srun not on PATH",
        "no configuration": "SLURM cannot be reached from here (scontrol ping: ",
    }[how] in err
    assert took < 60  # SLURM's clients retry a missing SLURM_CONF for 60 s; we do not wait
    # nothing written: no skipped-category summaries, no submission record
    assert not (out_root / "submission.json").exists() and not list(out_root.glob("blip2_*"))


@pytest.mark.slurm
def test_sbatch_refusal_is_one_line(slurm_conf, job_factory, demo_root, tmp_path, cli):
    job = _job(job_factory, tmp_path, demo_root, **{"cluster.partition": "no-such-partition"})
    p = cli("submit", "--job", str(job))
    assert p.returncode == 1 and "Traceback" not in p.stderr
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith(
        "error: sbatch refused the job: sbatch: error: Batch job submission failed: Invalid partition"
    )
    assert "cluster: section" in last and "--executor local" in last
