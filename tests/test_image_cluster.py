"""The batch job in the image, on the REAL local SLURM: `fada-batch submit` with a `cluster:`
section whose Python runs in the built image (podman here; Apptainer on sites).

- Array and collector run in the image and complete; the task given a 1-minute limit
  (`scontrol update TimeLimit=1` while the array is held) reaches it, asks for its requeue,
  the batch script requeues it on the host (the image has no SLURM client), and the requeued
  task resumes inside the image from the checkpoint it saved, until it completes.
- The tasks run the image's fada_batch, not the checkout they were submitted from (the
  container's working directory is this checkout).
- Without the request variable in the container (no `--env 'FADA_*'`), the requeue cannot
  happen: an error in the task's log and summary, not a quiet FAILED.

`make test-container` runs these (FADA_TEST_IMAGE, CONTAINERS_CONF); they need the cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import openpyxl
import pytest
from clusterjobs import SMALL, TERMINAL, sacct, summary, task_log, wait_done, wait_for

from fada_batch import __version__
from fada_batch.data.categories import find_sheet, get_category
from fada_batch.run.launch import submit

pytestmark = [pytest.mark.container, pytest.mark.slurm]

REPO = Path(__file__).resolve().parent.parent
IMAGE_MODEL = "/opt/fada-batch/models/tiny-blip2"  # built into the image


def podman_python(image: str, mounts: list[Path], *, env: tuple[str, ...]) -> str:
    """A `cluster.python` that runs the task's Python in the image, as documented in
    container/README.md (mounts at the same paths inside as outside)."""
    words = ["podman", "run", "--rm", "--network", "host", "--pid", "host"]
    words += ["--user", f"{os.getuid()}:{os.getgid()}"]
    for m in mounts:
        words += ["-v", f"{m}:{m}"]
    words += ["-v", f"{REPO}:{REPO}:ro", "-w", str(REPO)]  # a checkout as working folder
    for pattern in env:
        words += ["--env", pattern]
    return shlex.join([*words, "--entrypoint", "python", image])


def small_abdomen(demo_root: Path, dst: Path, rows: int = 6) -> Path:
    """The demo data with Abdomen's sheet cut to `rows` images: that task ends in seconds."""
    shutil.copytree(demo_root, dst)
    sheet = find_sheet(dst, get_category("Abdomen"))
    book = openpyxl.load_workbook(sheet)
    ws = book.active
    ws.delete_rows(rows + 2, ws.max_row)
    book.save(sheet)
    return dst


@pytest.fixture(scope="module")
def image() -> str:
    tag = os.environ.get("FADA_TEST_IMAGE")
    if not tag:
        pytest.skip("FADA_TEST_IMAGE is not set: `make test-container` builds the image and runs these")
    return tag


@pytest.fixture(scope="module")
def runs(image, slurm_conf, demo_root, tmp_path_factory):
    """Two submissions at once: the demo job in the image, and one without FADA_* inside."""
    from fada_batch.config import config_from_dict, load_job

    def job(name: str, overrides: dict, env: tuple[str, ...]):
        top = tmp_path_factory.mktemp(name)
        raw = load_job(REPO / "job" / "demo.yaml").to_dict()
        raw["data"]["root"] = str(small_abdomen(demo_root, top / "data copy"))
        raw["output"]["root"] = str(top / "out puts")
        raw["model"]["name_or_path"] = IMAGE_MODEL
        raw["train"]["log_every_s"] = 0.0
        settings = {**SMALL, "train.batch_size": 8, **overrides}
        settings["cluster.python"] = podman_python(image, [top], env=env)
        for k, v in settings.items():
            section, key = k.split(".", 1)
            raw[section][key] = v
        cfg = config_from_dict(raw)
        return cfg, submit(cfg, executor="slurm")

    demo = job(
        "in-image",
        {
            "data.categories": ["Abdomen", "Femur", "Cervix"],
            # Femur: ~1,100 steps, more than its first run can do before the warning (25 steps/s
            # on an idle CPU; the warning comes 10-40 s into a run with a 1-minute limit, see
            # tests/test_preemption.py's ENDLESS)
            "data.num_images": 40,
            "train.num_epochs": 40,
            "cluster.time_min": 10,
            "cluster.signal_delay_s": 20,
            "cluster.max_requeues": 3,
            "cluster.extra_sbatch": {"hold": True},
        },
        ("SLURM*", "SUBMITIT_*", "FADA_*"),
    )
    # Only Femur's task gets a 1-minute limit (the test lifts it once Femur was requeued, so
    # that its next run completes whatever the CPU's speed); Abdomen (6 images) keeps 10.
    _cfg, record = demo
    run(["scontrol", "update", f"JobId={record['tasks']['Femur']}", "TimeLimit=1"])
    run(["scontrol", "release", record["array_job_id"]])
    run(["scontrol", "release", record["collector_job_id"]])
    no_request = job(
        "no-request",
        {
            "data.categories": ["Femur"],
            "data.num_images": 60,
            "train.num_epochs": 400,
            "cluster.time_min": 1,
            "cluster.signal_delay_s": 20,  # see tests/test_preemption.py's ENDLESS
        },
        ("SLURM*", "SUBMITIT_*"),
    )
    return {"demo": demo, "no_request": no_request}


def run(cmd: list[str]) -> None:
    subprocess.run(cmd, check=True, timeout=30, capture_output=True, text=True)


def requeued(job_id: str) -> bool:
    return any(r["State"] == "REQUEUED" for r in sacct(job_id, duplicates=True))


# SLURM sends SIGCONT and then the warning to every process of the job step. podman forwards
# each signal with a short-lived `runc kill` child, which is a process of the step too: when
# the warning reaches that child (still forwarding SIGCONT), the child dies of it, podman logs
# this line and the task never sees the warning (Apptainer's tasks get signals directly).
# The task's own clock (FADA_JOB_END_EPOCH, passed in with `--env 'FADA_*'`) then stops it.
PODMAN_LOST_SIGNAL = re.compile(
    r"forwarding signal 18 to container \w+: .*failed: signal: user defined signal 2"
)
CLOCK_STOP = re.compile(r"\d+ s left before the job's time limit")


def skip_if_podman_lost_the_warning(log: str, stop_reason: str | None) -> None:
    """For a task WITHOUT FADA_* in the container (no clock either): a lost warning leaves it
    nothing to act on, so what the test checks cannot happen in that run."""
    m = PODMAN_LOST_SIGNAL.search(log)
    if m and stop_reason != "requeue_failed":
        pytest.skip(f"podman lost SLURM's warning signal on its way into the container: {m.group(0)}")


def requeued_or_over(job_id: str) -> bool:
    """Requeued once (what the test waits for), or ended without it (it never will be)."""
    rows = sacct(job_id, duplicates=True)
    return any(r["State"] in ("REQUEUED", *TERMINAL) for r in rows)


def image_code_line(log: str) -> str:
    m = re.search(r"\[fada-batch\] fada_batch (\S+) from (\S+) \(python", log)
    assert m, "the task logs which fada_batch it runs"
    assert m.group(1) == __version__
    return m.group(2)


def test_demo_job_runs_in_the_image_and_a_requeued_task_resumes_there(runs):
    cfg, record = runs["demo"]
    root, logs, tasks = Path(cfg.output.root), Path(cfg.output.root) / "logs", record["tasks"]
    assert sorted(tasks) == ["Abdomen", "Femur"]
    wait_for(
        "Femur requeued at its time limit, or over",
        lambda: requeued_or_over(tasks["Femur"]),
        600,
        every_s=1,
        detail=lambda: task_log(logs, tasks["Femur"]),
    )
    first = task_log(logs, tasks["Femur"])
    assert requeued(tasks["Femur"]), f"Femur ended without a requeue: {sacct(tasks['Femur'])}\n{first}"
    if PODMAN_LOST_SIGNAL.search(first):  # the warning never reached the task: its clock acted
        assert CLOCK_STOP.search(first), f"the warning was lost and the job's clock did not act:\n{first}"
    run(["scontrol", "update", f"JobId={tasks['Femur']}", "TimeLimit=10"])
    rows = wait_done(record["array_job_id"], 1500, expected=2)
    coll = wait_done(record["collector_job_id"], 300)
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    assert coll[record["collector_job_id"]]["State"] == "COMPLETED", coll

    femur_runs = [r["State"] for r in sacct(tasks["Femur"], duplicates=True)]
    assert femur_runs == ["REQUEUED", "COMPLETED"], femur_runs
    femur, abdomen = summary(root, "Femur"), summary(root, "Abdomen")
    assert femur["status"] == "completed" and femur["requeues"] == 1
    assert femur["resumes"] >= 1
    assert abdomen["status"] == "completed" and abdomen["requeues"] == 0
    assert summary(root, "Cervix")["status"] == "awaiting_labels"

    log = task_log(logs, tasks["Femur"])
    saved = [int(s) for s in re.findall(r"stop requested: saved checkpoint-(\d+)", log)]
    resumed = [int(s) for s in re.findall(r"resuming from checkpoint-(\d+) \(step \d+\)", log)]
    assert len(saved) == 1 and resumed == saved, (saved, resumed)  # resumed where it stopped
    assert "Femur: reached its time limit; requeued by the batch script on the host" in log
    assert "the task asked for a requeue: scontrol requeue" in log
    assert "No such file or directory: 'scontrol'" not in log
    # the image's code ran, not the checkout that was the working directory
    for text in (log, task_log(logs, tasks["Abdomen"]), task_log(logs, record["collector_job_id"])):
        where = image_code_line(text)
        assert where.startswith("/opt/") and not where.startswith(str(REPO)), where
    report = (root / "report.md").read_text()
    for category in ("Abdomen", "Femur", "Cervix"):
        assert category in report


def test_without_the_request_variable_the_requeue_is_an_error_not_a_quiet_failure(runs):
    cfg, record = runs["no_request"]
    root, task = Path(cfg.output.root), record["tasks"]["Femur"]
    wait_done(record["array_job_id"], 600)
    s = summary(root, "Femur")
    skip_if_podman_lost_the_warning(task_log(root / "logs", task), s.get("stop_reason"))
    assert [r["State"] for r in sacct(task, duplicates=True)] == ["FAILED"]
    assert s["status"] == "failed" and s["stop_reason"] == "requeue_failed", s
    assert "there is no `scontrol` here" in s["error"] and "--env 'FADA_*'" in s["error"]
    assert "The checkpoint is kept" in s["message"] and "--categories Femur" in s["message"]
    log = task_log(root / "logs", task)
    assert "[fada-batch] ERROR: Femur: " in log and "there is no `scontrol` here" in log
