"""Fan-out through submitit against a REAL local SLURM (slurm/testcluster), and on a workstation.

Array + dependent collector, pre-flight skipping, a failure mid-run, requeue after a real time
limit, --dry-run, and the plain-sbatch path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clusterjobs import wait_for
from safetensors.torch import load_file

from fada_batch import killpoints
from fada_batch.config import dump_yaml
from fada_batch.data.validate import preflight
from fada_batch.run.launch import make_plan, submit
from fada_batch.training.recipe import train_category

REPO = Path(__file__).resolve().parent.parent
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED"}

# small, fast tasks that fit two at a time on the 2-CPU test node
CLUSTER = {
    "cluster.gpus_per_task": 0,
    "cluster.cpus_per_task": 1,
    "cluster.mem_gb": 2,
    "cluster.time_min": 10,
    "cluster.signal_delay_s": 10,
    "train.num_epochs": 1,
    "data.num_images": 12,
}


def sacct(job_id: str) -> dict[str, dict[str, str]]:
    """JobID -> {State, Start, End, ExitCode} for the job's allocations (no steps)."""
    out = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", job_id, "--format=JobID,State,Start,End,ExitCode"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    rows = {}
    for line in out.strip().splitlines():
        jid, state, start, end, code = line.split("|")
        rows[jid] = {"State": state.split()[0], "Start": start, "End": end, "ExitCode": code}
    return rows


def wait_done(job_id: str, timeout_s: float = 400, *, expected: int = 1) -> dict[str, dict[str, str]]:
    """Poll sacct until `expected` allocations of the job are listed and all are over."""
    deadline = time.monotonic() + timeout_s
    rows: dict[str, dict[str, str]] = {}
    while time.monotonic() < deadline:
        rows = sacct(job_id)
        if len(rows) >= expected and all(r["State"] in TERMINAL for r in rows.values()):
            return rows
        time.sleep(2)
    pytest.fail(f"job {job_id} did not finish in {timeout_s} s: {rows}")


def jobs_in_queue() -> int:
    out = subprocess.run(["squeue", "-h"], capture_output=True, text=True, check=True).stdout
    return len(out.strip().splitlines())


def copy_data(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------------------- no cluster


def test_order_largest_first_by_default_smallest_with_sort_by_size(job_factory, demo_root, tmp_path):
    data = copy_data(demo_root, tmp_path / "data")
    # drop half of Femur's rows so categories differ in size
    import openpyxl

    sheet = data / "Fetal Ultrasound Labeled" / "Femur_image_list.xlsx"
    wb = openpyxl.load_workbook(sheet)
    ws = wb.worksheets[0]
    ws.delete_rows(2, 40)
    wb.save(sheet)
    cfg = job_factory({"data.num_images": None}, data_root=data)
    pf = preflight(cfg)
    largest = make_plan(cfg, pf, executor="slurm")
    smallest = make_plan(cfg, pf, executor="slurm", smallest_first=True)
    assert largest.submit[-1] == "Femur" and smallest.submit[0] == "Femur"
    assert largest.awaiting == ["Cervix"] and "Cervix" not in largest.submit
    assert largest.slurm["timeout_min"] == cfg.cluster.time_min


def test_plan_counts_the_images_a_task_will_train_on(job_factory):
    cfg = job_factory({"data.num_images": 5})  # the seed's validation run
    plan = make_plan(cfg, preflight(cfg), executor="slurm")
    assert {plan.sizes[c] for c in plan.submit} == {5}
    assert "Abdomen (5 images)" in plan.describe()


def test_demo_jobs_slurm_plan_is_a_cpu_task(demo_root, tiny_model_dir, tmp_path, capsys):
    """`submit --job job/demo.yaml --dry-run`: no GPU, one CPU, 2 GB (a demo task peaked at
    0.47 GB), a short limit; the collector asks for no more."""
    from fada_batch.cli import main
    from fada_batch.config import load_job
    from fada_batch.run.launch import slurm_parameters

    params = slurm_parameters(load_job(REPO / "job" / "demo.yaml"))
    assert "gpus_per_node" not in params
    assert (params["cpus_per_task"], params["mem_gb"], params["timeout_min"]) == (1, 2, 15)
    paths = [f"data.root={demo_root}", f"model.name_or_path={tiny_model_dir}", f"output.root={tmp_path}"]
    args = ["submit", "--job", str(REPO / "job" / "demo.yaml"), "--dry-run"]
    assert main([*args, *(x for p in paths for x in ("-p", p))]) == 0
    out = capsys.readouterr().out
    slurm = next(line for line in out.splitlines() if line.startswith("slurm: "))
    assert "cpus_per_task=1" in slurm and "mem_gb=2" in slurm and "gpu" not in slurm


def test_local_executor_runs_all_categories_in_turn_then_collects(job_factory, capsys, monkeypatch):
    # submitit's local executor would hand its tasks CUDA_VISIBLE_DEVICES="" (no GPU)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,0")
    cfg = job_factory(CLUSTER)
    record = submit(cfg, executor="local")
    out = capsys.readouterr().out
    assert record["results"] == {"Abdomen": "completed", "Femur": "completed", "Thorax": "completed"}
    assert record["collect_exit_code"] == 0
    root = Path(cfg.output.root)
    for cat in ("abdomen", "femur", "thorax"):
        assert (root / f"blip2_{cat}" / "final_model" / "adapter_model.safetensors").is_file()
    assert (
        json.loads((root / "blip2_cervix" / "training_summary.json").read_text())["status"]
        == "awaiting_labels"
    )
    assert (root / "report.md").is_file() and "Cervix" in (root / "report.md").read_text()
    assert "Cervix" in out and "Thorax" in out  # the collector's output ends the run
    assert json.loads((root / "submission.json").read_text())["executor"] == "local"
    summary = json.loads((root / "blip2_femur" / "training_summary.json").read_text())
    assert summary["device"]["cuda_visible_devices"] == "1,0"  # the workstation's GPUs, as given


def test_threads_follow_the_slurm_allocation_unless_told(monkeypatch):
    import torch

    from fada_batch.run.launch import match_threads_to_allocation

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
        assert match_threads_to_allocation() == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's word wins
        torch.set_num_threads(before)
        assert match_threads_to_allocation() is None and torch.get_num_threads() == before
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.delenv("SLURM_CPUS_PER_TASK")  # not under SLURM: torch's own choice
        assert match_threads_to_allocation() is None and torch.get_num_threads() == before
    finally:
        torch.set_num_threads(before)


def test_local_tasks_get_this_process_gpus(monkeypatch):
    from fada_batch.config import config_from_dict
    from fada_batch.run.launch import _same_gpus_line, local_parameters

    cfg = config_from_dict({"cluster": {"time_min": 30}})
    params = local_parameters(cfg)  # a workstation has no SLURM limit to meet
    assert params["timeout_min"] >= 7 * 24 * 60 and params["local_setup"] == [_same_gpus_line()]

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _same_gpus_line() == "unset CUDA_VISIBLE_DEVICES"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f2a; x")
    assert _same_gpus_line() == "export CUDA_VISIBLE_DEVICES='GPU-8f2a; x'"


# ------------------------------------------------------------------------ real SLURM cluster

pytestmark_slurm = pytest.mark.slurm


@pytest.mark.slurm
def test_dry_run_submits_nothing(slurm_conf, job_factory, capsys):
    cfg = job_factory(CLUSTER)
    before = jobs_in_queue()
    record = submit(cfg, executor="slurm", dry_run=True)
    assert record == {"dry_run": True, "plan": ["Abdomen", "Femur", "Thorax"], "completed": []}
    assert jobs_in_queue() == before
    assert not (Path(cfg.output.root) / "submission.json").exists()
    out = capsys.readouterr().out
    assert "dry run: nothing submitted" in out and "awaiting labels (skipped): Cervix" in out


@pytest.mark.slurm
def test_submit_array_and_collector_on_slurm(slurm_conf, job_factory):
    cfg = job_factory(CLUSTER)
    record = submit(cfg, executor="slurm")
    array_id, coll_id = record["array_job_id"], record["collector_job_id"]
    assert len(record["tasks"]) == 3
    rows = wait_done(array_id, expected=3)
    coll = wait_done(coll_id)
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    assert coll[coll_id]["State"] == "COMPLETED", coll
    # the collector started only after every array task ended
    assert coll[coll_id]["Start"] >= max(r["End"] for r in rows.values())
    root = Path(cfg.output.root)
    for cat in ("Abdomen", "Femur", "Thorax"):
        s = json.loads((root / f"blip2_{cat.lower()}" / "training_summary.json").read_text())
        assert s["status"] == "completed"
        assert s["slurm"]["array_job_id"] == array_id
        assert (root / f"blip2_{cat.lower()}" / "final_model" / "adapter_model.safetensors").is_file()
    report = (root / "report.md").read_text()
    for cat in ("Abdomen", "Femur", "Thorax", "Cervix"):
        assert cat in report
    sub = json.loads((root / "submission.json").read_text())
    assert sub["array_job_id"] == array_id and sub["collector_job_id"] == coll_id


@pytest.mark.slurm
def test_failures_do_not_stop_others_and_are_named(slurm_conf, job_factory, demo_root, tmp_path):
    data = copy_data(demo_root, tmp_path / "data copy")
    labels = data / "Fetal Ultrasound Labeled"
    (labels / "Thorax_image_list.xlsx").write_bytes(b"not a spreadsheet")  # fails pre-flight
    cfg = job_factory({**CLUSTER, "cluster.extra_sbatch": {"hold": True}}, data_root=data)
    record = submit(cfg, executor="slurm")
    assert sorted(record["tasks"]) == ["Abdomen", "Femur"]
    assert "Thorax" in record["blocked"]
    # the array is held: break Femur's sheet after submission, then release
    (labels / "Femur_image_list.xlsx").write_bytes(b"\x00corrupted after submission")
    subprocess.run(["scontrol", "release", record["array_job_id"]], check=True)
    subprocess.run(["scontrol", "release", record["collector_job_id"]], check=True)
    rows = wait_done(record["array_job_id"], expected=2)
    coll = wait_done(record["collector_job_id"])
    states = {jid: r["State"] for jid, r in rows.items()}
    assert states[record["tasks"]["Abdomen"]] == "COMPLETED", states
    assert states[record["tasks"]["Femur"]] == "FAILED", states
    assert coll[record["collector_job_id"]]["State"] == "FAILED"  # non-zero: a category failed
    root = Path(cfg.output.root)
    femur = json.loads((root / "blip2_femur" / "training_summary.json").read_text())
    assert femur["status"] == "invalid_data" and "Femur_image_list.xlsx" in femur["error"]
    thorax = json.loads((root / "blip2_thorax" / "training_summary.json").read_text())
    assert thorax["status"] == "invalid_data" and "Thorax_image_list.xlsx" in thorax["error"]
    report = (root / "report.md").read_text()
    for cat in ("Abdomen", "Femur", "Thorax", "Cervix"):
        assert cat in report
    assert "Femur_image_list.xlsx" in report


@pytest.mark.slurm
def test_time_limit_signal_checkpoints_requeues_and_finishes(slurm_conf, job_factory, tmp_path, monkeypatch):
    """A 1-minute limit: 20 s before it (the job's clock, or SLURM's warning signal, whichever
    comes first) the task checkpoints, is requeued, and resumes from the step it saved at the
    stop (traced by fada_batch.killpoints in the SLURM tasks themselves), ending with the
    adapter of one uninterrupted run.

    The SLURM run pauses 0.1 s after each of its 420 steps (FADA_STEP_PAUSE_S), so it lasts
    over 42 s of training on any CPU: more than one attempt can hold (each trains for at most
    ~35 s between its start-up and the stop 20 s before the limit). Once the first stop is
    saved, the test lifts the limit to 10 minutes: the requeued attempt (or, when it started
    before the update and its clock still reads the old limit, the one after it) completes.
    Under load a 1-minute attempt trains for 10-20 s, and without the lift the run took 14
    attempts and 9.5 minutes here."""
    overrides = {
        **CLUSTER,
        "cluster.time_min": 1,
        "cluster.signal_delay_s": 20,
        "cluster.max_requeues": 20,
        "train.num_epochs": 10,
        "data.num_images": 60,
        "train.batch_size": 8,
        "train.checkpoint_every_steps": 0,
        "eval.after_training": False,
    }
    cfg = job_factory(overrides)
    trace = tmp_path / "points reached.txt"
    monkeypatch.setenv(killpoints.TRACE_ENV, str(trace))  # sbatch passes it to every attempt
    monkeypatch.setenv(killpoints.PAUSE_ENV, "0.1")
    record = submit(cfg, executor="slurm", categories=["Femur"])
    monkeypatch.delenv(killpoints.TRACE_ENV)
    monkeypatch.delenv(killpoints.PAUSE_ENV)
    # meanwhile, on the node's other CPU, the same training without interruption
    ref = train_category(job_factory(overrides, out=tmp_path / "uninterrupted"), "Femur")
    out = Path(cfg.output.root) / "blip2_femur"

    def summary_final() -> dict | None:
        # between a stop and its requeue, sacct can list the allocation as ended for a moment
        # (the batch script exits after `scontrol requeue`): wait for the summary instead
        path = out / "training_summary.json"
        s = json.loads(path.read_text()) if path.is_file() else {}
        return s if s.get("status") not in (None, "running", "interrupted") else None

    wait_for(
        "a stop saved at the time limit", lambda: "stop.saved@" in _text(trace), timeout_s=600, every_s=1
    )
    subprocess.run(
        ["scontrol", "update", f"JobId={record['tasks']['Femur']}", "TimeLimit=10"], check=True, timeout=30
    )
    s = wait_for("the task's summary to reach a final status", summary_final, timeout_s=900, every_s=2)
    wait_done(record["array_job_id"], timeout_s=120)
    assert s["status"] == "completed", s.get("error")
    points = trace.read_text().split()
    stopped = [int(p.split("@")[1]) for p in points if p.startswith("stop.saved@")]
    resumed = [int(p.split("@")[1]) for p in points if p.startswith("setup.resumed@")]
    assert stopped, "no stop was traced: the time-limit signal never reached training"
    assert resumed == stopped, points  # each requeued attempt resumed where the stopped one saved
    assert s["requeues"] == len(stopped) and s["resumes"] == len(stopped)
    assert s["steps"] == ref["steps"] == s["steps_per_epoch"] * 10
    split = json.loads((out / "split.json").read_text())
    assert len(split["train"]) == s["images"]["train"]
    got = load_file(str(out / "final_model" / "adapter_model.safetensors"))
    want = load_file(str(Path(ref["adapter_path"]) / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k


def _text(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


@pytest.mark.slurm
def test_plain_sbatch_array_trains_the_demo_categories(slurm_conf, job_factory, tmp_path):
    cfg = job_factory(CLUSTER)
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    n = len(cfg.data.categories)
    env = {**os.environ, "FADA_BATCH": str(Path(sys.executable).parent / "fada-batch")}
    sub = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--array=0-{n - 1}",
            "--cpus-per-task=1",
            "--mem=2G",
            f"--output={tmp_path}/train-%A_%a.out",
            str(REPO / "slurm" / "train_array.sbatch"),
            str(job),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    )
    array_id = sub.stdout.strip().split(";")[0]
    coll = subprocess.run(
        [
            "sbatch",
            "--parsable",
            f"--dependency=afterany:{array_id}",
            f"--output={tmp_path}/collect.out",
            str(REPO / "slurm" / "collect.sbatch"),
            str(job),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    rows = wait_done(array_id, expected=n)
    assert {r["State"] for r in rows.values()} == {"COMPLETED"}, rows
    assert wait_done(coll)[coll]["State"] == "COMPLETED"
    root = Path(cfg.output.root)
    statuses = {
        c: json.loads((root / f"blip2_{c.lower()}" / "training_summary.json").read_text())["status"]
        for c in ("Abdomen", "Femur", "Thorax", "Cervix")
    }
    assert statuses == {
        "Abdomen": "completed",
        "Femur": "completed",
        "Thorax": "completed",
        "Cervix": "awaiting_labels",
    }
    assert "Cervix" in (tmp_path / "collect.out").read_text()
