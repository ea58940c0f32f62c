"""The category lock across nodes: a SLURM job's lock is judged by what SLURM says of the job.

Against the real local cluster (slurm/testcluster): a lock written as if on another node by a
running job is respected and the refusal names the job; one from a cancelled or completed job
(squeue, then sacct once the controller has forgotten it) is taken over; a job requeued by
`scontrol requeue` takes over the lock that its own first run left "on another node" (an array
task, so its own SLURM_JOB_ID is used). Without SLURM (or when it cannot tell), the old rules:
the pid on this host, the lock's age elsewhere. The rules themselves are also checked with a
probe that answers what each case needs.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
from clusterjobs import cluster_state

from fada_batch import fsutil
from fada_batch.fsutil import JobPhase, LockedError, category_lock, judge_holder, lock_identity
from fada_batch.run import slurmjobs
from fada_batch.run.slurmjobs import job_phase

OTHER_NODE = {"host": "gpu-node-a.invalid", "pid": 4242, "pid_ns": None, "purpose": "trained"}


def _lock(folder: Path, **holder) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    lock.write_text(json.dumps({**OTHER_NODE, "since": time.time(), **holder}))
    return lock


def _probe(answers: dict[str, JobPhase], asked: list[str] | None = None):
    def probe(job_id: str) -> JobPhase:
        if asked is not None:
            asked.append(job_id)
        return answers.get(job_id, JobPhase(None, "never heard of it"))

    return probe


@pytest.fixture(autouse=True)
def _fresh_cache():
    slurmjobs._cache.clear()
    yield
    slurmjobs._cache.clear()


# ------------------------------------------------------------------- the rules, no cluster


def test_running_job_on_another_node_is_respected_and_named(tmp_path):
    lock = _lock(tmp_path / "blip2_femur", slurm_job_id="812", slurm_array="800_3")
    probe = _probe({"812": JobPhase("running", "RUNNING (squeue)")})
    with pytest.raises(LockedError) as e, category_lock(tmp_path / "blip2_femur", job_probe=probe):
        pass
    msg = str(e.value)
    assert "SLURM job 812 (array task 800_3)" in msg and "SLURM job 812 is RUNNING (squeue)" in msg
    assert "scancel 812" in msg and "delete" not in msg  # a live job: never "delete the lock"
    assert json.loads(lock.read_text())["pid"] == 4242  # left as it was


@pytest.mark.parametrize("phase", ["ended", "pending"])
def test_job_no_longer_running_on_another_node_is_taken_over(tmp_path, phase):
    folder = tmp_path / "blip2_femur"
    lock = _lock(folder, slurm_job_id="812")
    with category_lock(folder, job_probe=_probe({"812": JobPhase(phase, "X (sacct)")})):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_own_requeued_job_takes_its_lock_without_asking(tmp_path, monkeypatch):
    """Requeued, the same job id runs again with a higher SLURM_RESTART_COUNT: its first run's
    lock (another node, and SLURM says the job is RUNNING: it is this very run) is stale."""
    monkeypatch.setenv("SLURM_JOB_ID", "812")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    folder = tmp_path / "blip2_femur"
    _lock(folder, slurm_job_id="812")  # first run: SLURM_RESTART_COUNT unset, recorded as 0
    asked: list[str] = []
    with category_lock(folder, job_probe=_probe({"812": JobPhase("running")}, asked)) as lock:
        held = json.loads(lock.read_text())
        assert (held["slurm_job_id"], held["slurm_restart_count"]) == ("812", 1)
    assert asked == []
    # the same run (same restart count) elsewhere is another process of this job: respected
    _lock(folder, slurm_job_id="812", slurm_restart_count=1)
    running = _probe({"812": JobPhase("running", "RUNNING")})
    with (
        pytest.raises(LockedError, match="SLURM job 812 is RUNNING"),
        category_lock(folder, job_probe=running),
    ):
        pass


def test_without_an_answer_the_old_rules_hold(tmp_path):
    folder = tmp_path / "blip2_femur"
    lock = _lock(folder, slurm_job_id="812")
    unknown = _probe({})
    with pytest.raises(LockedError) as e, category_lock(folder, job_probe=unknown):
        pass
    assert "unknown (never heard of it)" in str(e.value) and f"delete {lock}" in str(e.value)
    old = time.time() - fsutil.STALE_AFTER_S - 60
    os.utime(lock, (old, old))
    with category_lock(folder, job_probe=unknown):
        pass

    def broken(job_id: str) -> JobPhase:
        raise RuntimeError("no scheduler")

    _lock(folder, slurm_job_id="812")
    with pytest.raises(LockedError, match="could not be asked"), category_lock(folder, job_probe=broken):
        pass


def test_pid_is_judged_only_in_its_own_namespace(tmp_path):
    """Containers on one host share its name but not their pids: a holder in another pid
    namespace is judged like one on another host (its pid means nothing here)."""
    me = lock_identity()
    holder = {**me, "pid": os.getpid() + 10_000_000, "pid_ns": "pid:[1]"}  # no such pid here
    verdict = judge_holder(holder, age_s=10, me=me)
    assert verdict.alive and verdict.by_age
    verdict = judge_holder({**holder, "pid_ns": me["pid_ns"]}, age_s=10, me=me)
    assert not verdict.alive and "is gone" in verdict.why
    # a dead pid on this host is dead, whatever its job (an sbatch script may start another)
    dead = {**holder, "pid_ns": me["pid_ns"], "slurm_job_id": "5"}
    assert not judge_holder(dead, age_s=1, me=me, job_probe=_probe({"5": JobPhase("running")})).alive
    # a pid that lives here, reused after its job ended, does not keep the lock
    reused = {**me, "slurm_job_id": "5", "since": 0}
    assert not judge_holder(reused, age_s=1, me=me, job_probe=_probe({"5": JobPhase("ended")})).alive


def test_probe_degrades_without_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no squeue, no sacct
    monkeypatch.delenv("SLURM_CONF", raising=False)
    assert job_phase("812") == JobPhase(None, "squeue: squeue is not on PATH; sacct: sacct is not on PATH")
    monkeypatch.setenv("SLURM_CONF", str(tmp_path / "nowhere.conf"))
    slurmjobs._cache.clear()
    t0 = time.monotonic()
    phase = job_phase("812")
    assert phase.phase is None and "is not a file" in phase.detail
    assert time.monotonic() - t0 < 1  # SLURM's clients would retry a missing file for 60 s
    assert job_phase("812; rm -rf /").detail.endswith("is not a SLURM job id")


# ------------------------------------------------------------------------ the real cluster


def _sbatch(*args: str) -> str:
    out = subprocess.run(
        ["sbatch", "--parsable", "--mem=64M", "--cpus-per-task=1", *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return out.stdout.strip().split(";")[0]


def _squeue_state(job_id: str) -> str:
    out = subprocess.run(
        ["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%A|%T"], capture_output=True, text=True, timeout=30
    ).stdout
    states = [s for a, s in (ln.split("|") for ln in out.split()) if a == job_id]
    return states[0] if states else ""


def _wait(what: str, ok, timeout_s: float = 300, every: float = 1.0, logs: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := ok():
            return value
        time.sleep(every)
    texts = (
        [f"--- {p.name}\n{p.read_text(errors='replace')}" for p in sorted(logs.glob("*.out"))] if logs else []
    )
    pytest.fail("\n".join([f"{what}: not after {timeout_s} s", cluster_state(), *texts]))


@pytest.mark.slurm
def test_real_running_cancelled_and_forgotten_jobs(slurm_conf, tmp_path):
    done = _sbatch("--wrap", "true")  # completes at once; the controller forgets it after MinJobAge
    live = _sbatch("--wrap", "sleep 600")
    try:
        _wait(f"job {live} running", lambda: _squeue_state(live) == "RUNNING")
        folder = tmp_path / "blip2_femur"
        lock = _lock(folder, slurm_job_id=live)
        with pytest.raises(LockedError) as e, category_lock(folder, job_probe=job_phase):
            pass
        assert f"SLURM job {live} is RUNNING (squeue)" in str(e.value)
        assert f"scancel {live}" in str(e.value)
    finally:
        subprocess.run(["scancel", live], timeout=30, check=False)
    _wait(f"job {live} cancelled", lambda: _squeue_state(live) in ("CANCELLED", ""))
    slurmjobs._cache.clear()
    assert job_phase(live).phase == "ended"
    with category_lock(folder, job_probe=job_phase):
        assert json.loads(lock.read_text())["pid"] == os.getpid()

    # a job the controller no longer lists (MinJobAge): sacct tells
    _wait(f"job {done} forgotten by squeue", lambda: _squeue_state(done) == "", timeout_s=180, every=2)
    slurmjobs._cache.clear()
    assert job_phase(done) == JobPhase("ended", "COMPLETED (sacct)")
    _lock(folder, slurm_job_id=done)
    with category_lock(folder, job_probe=job_phase):
        pass
    assert job_phase("999999999").phase is None  # a job SLURM never had: unknown, not ended


_REQUEUE_ME = """
import json, os, subprocess, sys, time
from pathlib import Path
from fada_batch.fsutil import LockedError, category_lock
from fada_batch.run.slurmjobs import job_phase

folder = Path(sys.argv[1]) / os.environ["SLURM_ARRAY_TASK_ID"]
lock = folder / ".lock"
if not os.environ.get("SLURM_RESTART_COUNT"):
    with category_lock(folder, job_probe=job_phase):
        held = json.loads(lock.read_text())
        held.update(host="gpu-node-a.invalid", pid=4242, pid_ns=None)  # as if on another node
        lock.write_text(json.dumps(held))
        # this task only: the id of an array's task that SLURM numbers with the array's own id
        # would requeue every task of the array (seen: the other one, requeued before it took
        # its lock, found none)
        me = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        for attempt in range(30):  # a loaded controller may answer "try again later"
            done = subprocess.run(["scontrol", "requeue", me], capture_output=True, text=True)
            print(f"scontrol requeue: exit {done.returncode} {done.stderr.strip()}", flush=True)
            if done.returncode == 0:
                break
            time.sleep(2)
        time.sleep(600)  # killed by the requeue while it holds the lock
else:
    before = json.loads(lock.read_text())
    env = {k: os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT")}
    try:
        with category_lock(folder, job_probe=job_phase):
            result = {"before": before, "held": json.loads(lock.read_text()), "env": env}
    except LockedError as e:
        result = {"before": before, "error": str(e), "env": env}
    (folder / "result.json").write_text(json.dumps(result))
"""


@pytest.mark.slurm
def test_requeued_array_task_takes_over_its_own_lock(slurm_conf, tmp_path):
    script = tmp_path / "requeue_me.py"
    script.write_text(_REQUEUE_ME)
    cmd = f"{shlex.quote(sys.executable)} {shlex.quote(str(script))} {shlex.quote(str(tmp_path))}"
    array = _sbatch("--array=0-1", f"--output={tmp_path}/task-%a.out", "--open-mode=append", "--wrap", cmd)
    results = [tmp_path / str(i) / "result.json" for i in (0, 1)]
    _wait(
        "both tasks requeued and finished",
        lambda: all(p.exists() for p in results),
        timeout_s=400,
        every=2,
        logs=tmp_path,
    )
    job_ids = set()
    for i, path in enumerate(results):
        r = json.loads(path.read_text())
        log = (tmp_path / f"task-{i}.out").read_text()
        assert "error" not in r, f"{r.get('error')}\n{log}"
        before, held, env = r["before"], r["held"], r["env"]
        # the first run's lock: this very job, written "on another node", run 0
        assert before["host"] == "gpu-node-a.invalid" and before["slurm_restart_count"] == 0
        assert before["slurm_job_id"] == env["SLURM_JOB_ID"] == held["slurm_job_id"]
        assert before["slurm_array"] == held["slurm_array"] == f"{array}_{i}"
        assert env["SLURM_ARRAY_JOB_ID"] == array and env["SLURM_RESTART_COUNT"] == "1"
        assert held["slurm_restart_count"] == 1 and held["pid"] != 4242
        job_ids.add(env["SLURM_JOB_ID"])
    assert len(job_ids) == 2  # each array task has its own job id, kept across its requeue


@pytest.mark.slurm
def test_training_asks_slurm_about_the_lock_holder(slurm_conf, job_factory):
    """The task (`run_category`) hands training the real probe: a running job's lock (another
    node) stops it, naming the job; once that job is cancelled the category trains."""
    from fada_batch.run.task import run_category

    cfg = job_factory({"train.num_epochs": 1, "data.num_images": 6})
    folder = Path(cfg.output.root) / "blip2_femur"
    live = _sbatch("--wrap", "sleep 600")
    try:
        _wait(f"job {live} running", lambda: _squeue_state(live) == "RUNNING")
        _lock(folder, slurm_job_id=live)
        with pytest.raises(LockedError, match=f"SLURM job {live} is RUNNING"):
            run_category(cfg, "Femur")
    finally:
        subprocess.run(["scancel", live], timeout=30, check=False)
    _wait(f"job {live} cancelled", lambda: _squeue_state(live) in ("CANCELLED", ""))
    slurmjobs._cache.clear()
    assert run_category(cfg, "Femur")["status"] == "completed"
    assert not (folder / ".lock").exists()
