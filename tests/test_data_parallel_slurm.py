"""Data parallelism on the REAL local SLURM cluster (issue 19 item 3): `submit` with two tasks
on the one 2-CPU node (cluster.tasks_per_node=2, gpus_per_task=0: CPU processes, gloo)
trains the demo, one category and joint, to the loss curve and adapter of one process with
the same effective batch; SIGKILL of one rank ends the job, and the requeued job resumes every
rank from the last checkpoint.

lora.dropout is 0 (job/demo.yaml), so the ranks draw no random masks; the tolerances are
tests/test_data_parallel.py's (a few times the differences measured there).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from clusterjobs import SMALL, cluster_state, wait_done, wait_for
from safetensors.torch import load_file
from test_data_parallel import LOSS_TOL, WEIGHT_TOL

from fada_batch import killpoints
from fada_batch.run.launch import submit
from fada_batch.run.task import run_category
from fada_batch.training.outputs import FINAL_MODEL

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("one_torch_thread")]

TWO_TASKS = {
    **SMALL,
    "cluster.tasks_per_node": 2,  # two CPU processes on the node, one CPU each
    "cluster.time_min": 10,
    "cluster.dist_timeout_s": 120,
    "data.num_images": 12,
    "train.num_epochs": 2,
    "train.batch_size": 4,
    "train.checkpoint_every_steps": 3,
    "train.tensorboard": False,
}


def _logs(log_dir: Path, task_id: str) -> str:
    """Both ranks' logs of one array task (submitit names them <job>_<rank>_log.*)."""
    return "\n".join(p.read_text(errors="replace") for p in sorted(log_dir.glob(f"{task_id}_*_log.*")))


def _cancel_collector(record: dict) -> None:
    """The collector job waits on the array (afterany); these tests read the outputs
    themselves, so it is cancelled rather than left to hold the node's CPU."""
    subprocess.run(["scancel", record["collector_job_id"]], check=False, timeout=30)
    wait_done(record["collector_job_id"], timeout_s=60)


def _max_differences(one: Path, two: Path) -> tuple[float, float]:
    s1 = json.loads((one / "training_summary.json").read_text())
    s2 = json.loads((two / "training_summary.json").read_text())
    assert [st for st, _ in s1["loss_curve"]] == [st for st, _ in s2["loss_curve"]]
    loss = max(abs(a[1] - b[1]) for a, b in zip(s1["loss_curve"], s2["loss_curve"], strict=True))
    w1 = load_file(str(one / FINAL_MODEL / "adapter_model.safetensors"))
    w2 = load_file(str(two / FINAL_MODEL / "adapter_model.safetensors"))
    assert w1.keys() == w2.keys()
    return loss, max(float((w1[k].float() - w2[k].float()).abs().max()) for k in w1)


# One category through SLURM is compared with one process at the end of
# test_stop_on_one_rank_requeues_all_and_a_killed_rank_ends_the_job, and without SLURM in
# test_data_parallel.py; here the joint adapter (CI's time: each case is a minute or more).
@pytest.mark.parametrize("mode", ["joint"])
def test_two_slurm_tasks_train_what_one_process_trains(slurm_conf, job_factory, tmp_path, mode, capsys):
    joint = mode == "joint"
    over = {
        **TWO_TASKS,
        **({"train.mode": "joint", "data.categories": ["Abdomen", "Femur"]} if joint else {}),
    }
    name, folder = ("joint", "blip2_joint") if joint else ("Femur", "blip2_femur")
    reference = run_category(job_factory(over, out=tmp_path / "one"), name)  # before: the node's CPUs
    cfg = job_factory(over, out=tmp_path / "two")
    t0 = time.monotonic()
    record = submit(cfg, executor="slurm", categories=None if joint else ["Femur"])
    task = next(iter(record["tasks"].values()))
    log_dir = Path(record["log_dir"])
    rows = wait_done(record["array_job_id"], timeout_s=240)
    took = time.monotonic() - t0
    _cancel_collector(record)
    logs = _logs(log_dir, task)
    assert rows[task]["State"] == "COMPLETED", f"{rows}\n{logs[-6000:]}"
    assert "data parallel: rank 0 of 2" in logs and "data parallel: rank 1 of 2" in logs, logs[-4000:]
    two = Path(cfg.output.root) / folder
    s = json.loads((two / "training_summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["steps"] == reference["steps"]
    loss, weights = _max_differences(Path(reference["output_dir"]), two)
    with capsys.disabled():
        print(
            f"\n[SLURM 2 tasks, {mode}] {took:.0f} s; max |loss diff| {loss:.2e}, max |weight diff| {weights:.2e}"
        )
    assert loss <= LOSS_TOL and weights <= WEIGHT_TOL


def _rank_pid(task_id: str, rank: int) -> int | None:
    """The pid of one rank's python process of a running task (this node's /proc); `task_id`
    is `<array>_<index>`, or a plain job id (submitit submits an array of one as one job)."""
    array, _, index = task_id.partition("_")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            raw = (proc / "environ").read_text(errors="replace").split("\0")
            program = (proc / "cmdline").read_text(errors="replace").split("\0")
        except OSError:
            continue
        env = dict(kv.split("=", 1) for kv in raw if "=" in kv)
        if index:
            mine = (env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")) == (array, index)
        else:
            mine = env.get("SLURM_JOB_ID") == array
        if mine and env.get("SLURM_PROCID") == str(rank) and "submitit" in " ".join(program[1:]):
            return int(proc.name)
    return None


def _after(trace: str, marker: str, nth: int) -> list[str]:
    """The points traced after the `nth` (1-based) `marker`; [] before it."""
    points = trace.split()
    at = [i for i, p in enumerate(points) if p.startswith(marker)]
    return points[at[nth - 1] + 1 :] if len(at) >= nth else []


def test_stop_on_one_rank_requeues_all_and_a_killed_rank_ends_the_job(
    slurm_conf, job_factory, tmp_path, monkeypatch, capsys
):
    """One job, three runs: the time-limit warning (USR2) sent to rank 1 ALONE stops both
    ranks at the same step and rank 0 requeues the job; in the requeued run rank 1 is
    SIGKILLed, which ends the job; `scontrol requeue` then resumes both ranks from the last
    checkpoint, to the adapter of one uninterrupted process."""
    over = {**TWO_TASKS, "train.checkpoint_every_steps": 4, "cluster.max_requeues": 3}
    reference = run_category(job_factory(over, out=tmp_path / "one"), "Femur")
    cfg = job_factory(over, out=tmp_path / "two")
    trace = tmp_path / "points reached.txt"
    monkeypatch.setenv(killpoints.TRACE_ENV, str(trace))  # sbatch passes them to every run
    monkeypatch.setenv(killpoints.PAUSE_ENV, "0.3")  # 32 steps: ~10 s of training at least
    record = submit(cfg, executor="slurm", categories=["Femur"])
    monkeypatch.delenv(killpoints.TRACE_ENV)
    monkeypatch.delenv(killpoints.PAUSE_ENV)
    task, log_dir = record["tasks"]["Femur"], Path(record["log_dir"])
    out = Path(cfg.output.root) / "blip2_femur"
    _cancel_collector(record)  # it would start when the killed run ends

    def text() -> str:
        return trace.read_text() if trace.is_file() else ""

    def logs() -> str:
        return _logs(log_dir, task)[-8000:]

    wait_for("step 5 of the first run", lambda: "step.done@5" in text(), 240, detail=logs)
    os.kill(_rank_pid(task, 1) or 0, signal.SIGUSR2)
    wait_for("both ranks resuming", lambda: text().count("setup.resumed@") == 2, 240, detail=logs)
    stops = [p for p in text().split() if p.startswith("stop.saved@")]
    assert len(stops) == 2 and stops[0] == stops[1], stops  # the same step on both ranks
    first = int(stops[0].split("@")[1])
    assert [p for p in text().split() if p.startswith("setup.resumed@")] == [f"setup.resumed@{first}"] * 2
    assert "another rank was asked to stop: requeueing the job" in logs()

    wait_for(
        "5 steps of the requeued run",
        lambda: f"step.done@{first + 5}" in _after(text(), "setup.resumed@", 2),
        240,
        detail=logs,
    )
    pid = _rank_pid(task, 1)
    assert pid is not None, cluster_state()
    os.kill(pid, signal.SIGKILL)
    t_kill = time.monotonic()
    rows = wait_done(task, timeout_s=120)
    ended_s = time.monotonic() - t_kill
    assert rows[task]["State"] in ("FAILED", "CANCELLED"), rows
    assert "step.done@32" not in text()  # it did not run on without rank 1
    last = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    assert last > first, (first, last)  # the requeued run's own checkpoint
    subprocess.run(["scontrol", "requeue", task], check=True, timeout=30)
    wait_for("the third run to end", lambda: text().count("setup.resumed@") == 4, 240, detail=logs)
    rows = wait_done(task, timeout_s=240)
    assert rows[task]["State"] == "COMPLETED", f"{rows}\n{logs()}"
    resumed = [p for p in text().split() if p.startswith("setup.resumed@")]
    assert resumed == [f"setup.resumed@{first}"] * 2 + [f"setup.resumed@{last}"] * 2, resumed
    s = json.loads((out / "training_summary.json").read_text())
    assert s["status"] == "completed" and s["resumes"] == 2 and s["requeues"] == 2, s
    loss, weights = _max_differences(Path(reference["output_dir"]), out)
    with capsys.disabled():
        print(
            f"\n[SLURM stop on rank 1 at step {first}, kill of rank 1 at step {first + 5}] the job ended "
            f"{ended_s:.0f} s after the kill; resumed from {last}; max |loss diff| {loss:.2e}, "
            f"max |weight diff| {weights:.2e}"
        )
    assert loss <= LOSS_TOL and weights <= WEIGHT_TOL
