"""No lost or half-written work: kills at random instants, duplicate tasks, full disks,
unsafe or corrupt checkpoints, unwritable outputs, missing models, and the pre-flight CLI."""

from __future__ import annotations

import errno
import itertools
import json
import os
import pickle
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fada_batch.training.checkpoint as ckpt_mod
from fada_batch import killpoints
from fada_batch.cli import main as cli_main
from fada_batch.config import dump_yaml
from fada_batch.fsutil import LockedError, NotWritableError, category_lock
from fada_batch.training.checkpoint import CheckpointWriteError, list_checkpoints
from fada_batch.training.model import ModelLoadError, load_base_model
from fada_batch.training.outputs import FINAL_MARKER, FINAL_MODEL
from fada_batch.training.recipe import train_category

QUICK = {"train.num_epochs": 2, "data.num_images": 12, "train.checkpoint_every_steps": 1}


def _train_cmd(job: Path, category: str) -> list[str]:
    return [sys.executable, "-m", "fada_batch", "train", "--job", str(job), "--category", category]


# A warm interpreter that forks one training process per request: each attempt is a real,
# separate process that SIGKILL ends, but none pays the 10-20 s import of torch and
# transformers (on 2 busy cores), so the 25 attempts below cost seconds each, not minutes.
_FORKER = """
import json, os, sys
import fada_batch.cli, fada_batch.training.recipe, fada_batch.evaluation.evaluate
from transformers import Blip2ForConditionalGeneration
print("ready", flush=True)
for line in sys.stdin:
    req = json.loads(line)
    pid = os.fork()
    if pid == 0:
        os.environ.update(req["env"])
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2)
        code = 1
        try:
            code = fada_batch.cli.main(req["argv"])
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), flush=True)
"""


class _Forker:
    """Runs `fada-batch train` attempts in processes forked from one warm interpreter."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def train(self, job: Path, *, trace: Path, kill_at: str | None = None) -> int:
        """Exit status of one attempt (-9 when SIGKILL ended it) tracing its points to `trace`."""
        env = {killpoints.TRACE_ENV: str(trace), **({killpoints.KILL_ENV: kill_at} if kill_at else {})}
        argv = ["train", "--job", str(job), "--category", "Femur"]
        request = {"argv": argv, "env": env, "log": str(self.log)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _kill_plan(reference: list[str], rng: random.Random, spread: int = 20) -> list[str]:
    """Where to kill, attempt after attempt: one random point in each of `spread` equal slices
    of an uninterrupted run's points (start-up, steps, checkpoint writes, validation), three
    start-ups of later attempts at random places, then the `final_model/` swap: just after
    the new folder is renamed in, between moving that one aside and renaming the next one in
    (no folder under the name), and after the completed summary."""
    run = reference[: reference.index("swap.fsynced@final_model")]
    bounds = [len(run) * i // spread for i in range(spread + 1)]
    plan = [run[rng.randrange(lo, hi)] for lo, hi in itertools.pairwise(bounds)]
    for point in ("setup.locked", "setup.model", "setup.features"):
        plan.insert(rng.randrange(1, len(plan)), point)  # a bare name: whatever step it resumes
    return [*plan, "swap.renamed@final_model", "swap.aside@final_model", "final.summary"]


def _assert_whole(out: Path, final_files: list[str]) -> None:
    """Every `checkpoint-N` folder holds every file and each loads; `final_model/`, when
    there, holds what an uninterrupted run's holds."""
    for path in out.iterdir():
        if re.fullmatch(r"checkpoint-\d+", path.name):
            assert sorted(os.listdir(path)) == sorted([*ckpt_mod.REQUIRED, "config.yaml"]), path
            load_file(str(path / "adapter_model.safetensors"))
            torch.load(path / "optimizer.pt", weights_only=True)
            json.loads((path / "trainer_state.json").read_text())
    if (out / FINAL_MODEL).exists():
        assert sorted(os.listdir(out / FINAL_MODEL)) == final_files


@pytest.mark.slow
def test_sigkill_at_points_spread_over_the_run_then_resume_equals_uninterrupted(job_factory, tmp_path):
    """26 SIGKILLs at seeded points spread over a whole run (start-up, steps, checkpoint files
    written but not renamed, renamed, pruned, validation, the `final_model/` swap), each
    attempt resuming: every attempt resumes from the last checkpoint renamed into place, no
    kill leaves a half folder under a real name, and the adapter equals an uninterrupted
    run's bit for bit (same data order, RNG and optimizer state restored; one thread)."""
    overrides = {
        "train.num_epochs": 3,
        "data.num_images": 20,
        "train.checkpoint_every_steps": 1,
        "train.batch_size": 8,
        "lora.dropout": 0.1,  # the dropout RNG must be restored too
        "eval.after_training": False,
    }
    jobs = {}
    for name in ("reference", "killed run"):
        jobs[name] = tmp_path / f"{name}.yaml"
        jobs[name].write_text(dump_yaml(job_factory(overrides, out=tmp_path / name)))
    ref_out, out = tmp_path / "reference" / "blip2_femur", tmp_path / "killed run" / "blip2_femur"
    t0 = time.monotonic()
    forker = _Forker(tmp_path / "attempts.log")
    try:
        assert forker.train(jobs["reference"], trace=tmp_path / "trace-ref") == 0
        reference = (tmp_path / "trace-ref").read_text().split()
        final_files = sorted(os.listdir(ref_out / FINAL_MODEL))
        plan = _kill_plan(reference, random.Random(20261129))
        traces = []
        for i, point in enumerate([*plan, None]):
            traces.append(tmp_path / f"trace-{i}")
            status = forker.train(jobs["killed run"], trace=traces[-1], kill_at=point)
            reached = traces[-1].read_text().split() if traces[-1].exists() else []
            if point is None:
                assert status == 0, (tmp_path / "attempts.log").read_text()[-3000:]
            else:  # it died where planned, and left nothing half-written under a real name
                assert status == -signal.SIGKILL and point in (reached[-1], reached[-1].split("@")[0]), (
                    point,
                    status,
                    reached[-3:],
                )
            _assert_whole(out, final_files)
    finally:
        forker.close()
    attempts = [t.read_text().split() if t.exists() else [] for t in traces]
    # each attempt resumed from the last checkpoint that an earlier one renamed into place
    saved: int | None = None
    resumed_from, persisted = [], 0
    for labels in attempts:
        got = [int(x.split("@")[1]) for x in labels if x.startswith("setup.resumed@")]
        if "setup.model" in labels[:-1]:  # it went past loading the model (and a checkpoint)
            assert got == ([saved] if saved else []), (labels[:6], saved)
            resumed_from.append(got[0] if got else None)
        wrote = [int(x.split("-")[1]) for x in labels if x.startswith("swap.renamed@checkpoint-")]
        persisted += bool(got) and (bool(wrote) or "final.summary" in labels)
        saved = max([saved or 0, *wrote]) or None
    resumes = [s for s in resumed_from if s is not None]
    print(
        f"\n{len(plan)} kills, {len(attempts)} attempts, {len(resumes)} resumed, from steps {resumes}; "
        f"{time.monotonic() - t0:.0f} s"
    )
    assert len(resumes) >= 20 and len(set(resumes)) >= 15  # kills all over the run, not at its start
    summary = json.loads((out / "training_summary.json").read_text())
    ref_summary = json.loads((ref_out / "training_summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == ref_summary["steps"]
    assert summary["resumes"] == persisted  # counted in the checkpoints, so resumes that died uncounted
    assert "already completed" in (tmp_path / "attempts.log").read_text()  # the kill after the summary
    ref_adapter = load_file(str(ref_out / FINAL_MODEL / "adapter_model.safetensors"))
    got = load_file(str(out / FINAL_MODEL / "adapter_model.safetensors"))
    assert got.keys() == ref_adapter.keys()
    for k in ref_adapter:
        assert torch.equal(got[k], ref_adapter[k]), k


def test_sigterm_checkpoints_after_the_step_and_the_rerun_resumes_there(job_factory, tmp_path, wait_stopped):
    """Preemption under plain sbatch: SLURM sends SIGTERM (SIGKILL after its grace time).
    `fada-batch train`, frozen at step 3 when the signal comes, saves checkpoint-3 after that
    step, exits 3 (stopped, resumes when run again); the rerun resumes at step 3 and ends
    with the adapter of an uninterrupted run, bit for bit."""
    from fada_batch.cli import EXIT_REQUEUED

    overrides = {"train.num_epochs": 2, "data.num_images": 12, "eval.after_training": False}
    ref = train_category(job_factory(overrides, out=tmp_path / "reference"), "Femur")
    cfg = job_factory(overrides, out=tmp_path / "preempted")
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    env = {**os.environ, killpoints.STOP_ENV: "step.done@3"}
    proc = subprocess.Popen(
        _train_cmd(job, "Femur"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        wait_stopped(proc)
        os.kill(proc.pid, signal.SIGTERM)  # pending while frozen, handled once it runs again
        os.kill(proc.pid, signal.SIGCONT)
        err = proc.communicate(timeout=300)[1].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = Path(cfg.output.root) / "blip2_femur"
    assert proc.returncode == EXIT_REQUEUED, err[-3000:]
    assert "stopped after saving" in err and [s for s, _ in list_checkpoints(out)] == [3]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["checkpoint"].endswith("checkpoint-3")
    again = train_category(cfg, "Femur")
    assert again["status"] == "completed" and again["resumes"] == 1 and again["steps"] == ref["steps"]
    want = load_file(str(Path(ref["adapter_path"]) / "adapter_model.safetensors"))
    got = load_file(str(Path(again["adapter_path"]) / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_second_task_on_same_category_is_refused(job_factory):
    cfg = job_factory(QUICK)
    folder = Path(cfg.output.root) / "blip2_femur"
    with category_lock(folder), pytest.raises(LockedError) as e:
        train_category(cfg, "Femur")
    msg = str(e.value)
    assert "is being trained by another task" in msg and f"pid {os.getpid()}" in msg
    assert "another output.root" in msg
    assert not (folder / "final_model").exists()  # nothing written by the refused task


def test_stale_lock_of_a_dead_task_does_not_block(job_factory):
    cfg = job_factory(QUICK)
    folder = Path(cfg.output.root) / "blip2_femur"
    folder.mkdir(parents=True)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    assert train_category(cfg, "Femur")["status"] == "completed"
    assert not (folder / ".lock").exists()


def test_lock_races(tmp_path):
    """The lock's two races: a lock file seen before its holder is written in it (an empty
    file is live while young), and two tasks taking over one stale lock (the second must not
    remove the lock the first has just taken)."""
    from fada_batch import fsutil

    folder = tmp_path / "blip2_femur"
    folder.mkdir()
    lock = folder / ".lock"
    lock.write_text("")  # a holder between create and write (an older fada-batch, or no links)
    with pytest.raises(LockedError, match="is being trained by another task"), category_lock(folder):
        pass
    old = time.time() - fsutil.EMPTY_LOCK_GRACE_S - 5
    os.utime(lock, (old, old))  # ... and one that died there
    with category_lock(folder):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    stale = fsutil._read_lock(lock)
    lock.unlink()  # the first contender took it over ...
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "purpose": "trained"}))
    fsutil._remove_if_same(lock, stale)  # ... and the second, judging the old one, must keep it
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing left aside


_CONTENDER = """
import json, sys, time
from pathlib import Path
from fada_batch.fsutil import LockedError, category_lock
folder, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))  # all contenders at one instant
try:
    with category_lock(folder):
        t0 = time.time(); time.sleep(0.3); t1 = time.time()
        print(json.dumps([t0, t1]))
except LockedError:
    print("null")
"""


def test_contenders_for_a_stale_lock_hold_it_one_at_a_time(tmp_path):
    """Six real processes start at one instant on a folder whose lock a dead task left: the
    stale lock is taken over, and no two of them ever hold the lock at the same time."""
    folder = tmp_path / "blip2_femur"
    folder.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (folder / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    start = time.time() + 3.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CONTENDER, str(folder), str(start)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(6)
    ]
    spans = [json.loads(p.communicate(timeout=60)[0]) for p in procs]
    held = sorted(s for s in spans if s)
    assert held, "nobody took over the stale lock"
    for (_a0, a1), (b0, _b1) in itertools.pairwise(held):
        assert b0 >= a1, f"two holders at once: {held}"
    assert not (folder / ".lock").exists()
    assert sorted(p.name for p in folder.iterdir()) == []


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO], ids=["ENOSPC", "EIO"])
def test_disk_error_while_checkpointing_keeps_previous_and_fails(job_factory, monkeypatch, capsys, code):
    cfg = job_factory(QUICK)
    real = ckpt_mod.save_file
    calls = {"n": 0}

    def failing(tensors, filename, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(code, os.strerror(code), filename)
        return real(tensors, filename, *a, **k)

    monkeypatch.setattr(ckpt_mod, "save_file", failing)
    with pytest.raises(CheckpointWriteError) as e:
        train_category(cfg, "Femur")
    out = Path(cfg.output.root) / "blip2_femur"
    assert os.strerror(code) in str(e.value)
    assert "checkpoint-2 is kept" in str(e.value) and "run the same command again" in str(e.value)
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["status"] == "failed" and os.strerror(code) in summary["error"]
    # the CLI reports it and exits non-zero
    job = Path(cfg.output.root) / "job.yaml"
    job.write_text(dump_yaml(cfg))
    calls["n"] = 0
    assert cli_main(["train", "--job", str(job), "--category", "Femur"]) == 1
    assert "could not write checkpoint-" in capsys.readouterr().err
    # with the disk fixed, the same command resumes and completes
    monkeypatch.setattr(ckpt_mod, "save_file", real)
    assert train_category(cfg, "Femur")["status"] == "completed"


def test_unsafe_checkpoint_is_never_unpickled_and_is_skipped(job_factory, tmp_path):
    cfg = job_factory({**QUICK, "train.keep_checkpoints": 3})
    first = train_category(cfg, "Femur")
    out = Path(cfg.output.root) / "blip2_femur"
    latest = list_checkpoints(out)[-1][1]
    payload = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {payload}",))

    (latest / "optimizer.pt").write_bytes(pickle.dumps(Evil()))
    shutil.rmtree(out / FINAL_MODEL)
    (out / "training_summary.json").unlink()
    again = train_category(cfg, "Femur")
    assert not payload.exists(), "a pickle from the output folder was executed"
    assert again["status"] == "completed" and again["steps"] == first["steps"]
    assert list(out.glob(f"{latest.name}.unusable-*")), "the unsafe checkpoint is set aside"


def test_final_model_without_marker_is_not_taken_as_complete(job_factory):
    cfg = job_factory(QUICK)
    train_category(cfg, "Femur")
    out = Path(cfg.output.root) / "blip2_femur"
    (out / FINAL_MODEL / FINAL_MARKER).unlink()  # as if killed mid-copy by another tool
    again = train_category(cfg, "Femur")
    assert again["status"] == "completed" and (out / FINAL_MODEL / FINAL_MARKER).is_file()


def test_unwritable_output_root_is_a_clear_error(job_factory, tmp_path):
    blocker = tmp_path / "a file"
    blocker.write_text("x")
    cfg = job_factory(QUICK, out=blocker / "outputs")
    with pytest.raises(NotWritableError) as e:
        train_category(cfg, "Femur")
    assert str(blocker / "outputs") in str(e.value) and "output.root" in str(e.value)


def test_missing_and_incomplete_model_folder(tmp_path, monkeypatch, tiny_model_dir):
    incomplete = tmp_path / "model"
    incomplete.mkdir()
    shutil.copy(tiny_model_dir / "config.json", incomplete / "config.json")
    with pytest.raises(ModelLoadError) as e:
        load_base_model(str(incomplete), device="cpu")
    assert "is incomplete" in str(e.value) and "model weights" in str(e.value)
    assert "stage-model" in str(e.value)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_base_model("nobody/no-such-blip2", device="cpu")
    assert "HF_HUB_OFFLINE=1" in str(e.value) and "fada-batch stage-model" in str(e.value)


def test_a_missing_model_folder_says_so_and_how_to_make_one(tmp_path):
    from fada_batch.training.model import ModelFolderMissing

    absent = tmp_path / "no model"
    with pytest.raises(ModelFolderMissing) as e:
        load_base_model(str(absent), device="cpu")
    assert f"the model folder {absent} (model.name_or_path) does not exist" in str(e.value)
    assert f"`fada-batch make-tiny-model {absent}`" in str(e.value)


def test_validate_cli_reports_every_problem_and_exit_status(job_factory, demo_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(demo_root, data)
    cfg = job_factory(data_root=data)
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    assert cli_main(["validate", "--job", str(job)]) == 0
    out = capsys.readouterr().out
    assert "3 ready, 1 awaiting labels, 0 blocked" in out
    (data / "Fetal Ultrasound Labeled" / "Thorax_image_list.xlsx").write_bytes(b"garbage")
    next((data / "Fetal Ultrasound" / "Femur").glob("*.png")).unlink()
    assert cli_main(["validate", "--job", str(job), "--json"]) == 1
    report = {d["category"]: d for d in json.loads(capsys.readouterr().out)["categories"]}
    assert report["Thorax"]["status"] == "error"
    assert report["Femur"]["status"] == "ok"  # a missing image is a warning: row skipped
    codes = {p["code"] for p in report["Femur"]["problems"]}
    assert "image_missing" in codes
    assert cli_main(["validate", "--job", str(job), "--categories", "Abdomen,Femur"]) == 0


def test_write_probe_swept_by_the_lock_holder_is_not_an_error(tmp_path, monkeypatch):
    """A task holding a category's lock sweeps temp files (a killed writer's) at its start; a
    second task's write probe in that instant must not read as "not writable"."""
    import tempfile

    from fada_batch import fsutil

    real = tempfile.mkstemp

    def mkstemp_then_swept(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        fsutil.remove_stale_tmp(Path(path).parent)  # the lock holder, in between
        return fd, path

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_swept)
    assert fsutil.ensure_writable(tmp_path / "blip2_femur") == tmp_path / "blip2_femur"


def test_category_completed_while_waiting_for_the_lock_is_not_retrained(job_factory, monkeypatch):
    """Checked before and again under the lock: a task that found the category running, then
    got the lock after the other task completed it, returns the completed summary untouched."""
    import fada_batch.training.recipe as train_mod

    cfg = job_factory(QUICK)
    done = train_category(cfg, "Femur")
    out = Path(cfg.output.root) / "blip2_femur"
    adapter = out / FINAL_MODEL / "adapter_model.safetensors"
    stamp = (adapter.stat().st_mtime_ns, (out / "training_summary.json").read_text())
    real, calls = train_mod.completed_under, []

    def still_running_at_first(*args):
        calls.append(args)
        return None if len(calls) == 1 else real(*args)  # the first look saw it running

    monkeypatch.setattr(train_mod, "completed_under", still_running_at_first)
    again = train_category(cfg, "Femur")
    assert len(calls) == 2 and again["status"] == "completed" and again["end_time"] == done["end_time"]
    assert (adapter.stat().st_mtime_ns, (out / "training_summary.json").read_text()) == stamp


def test_duplicate_submission_two_processes_one_trains(job_factory, tmp_path):
    """Two real processes start the same category at once: one trains, the other is refused
    with the lock message, and the result is complete and uncorrupted."""
    cfg = job_factory({**QUICK, "train.num_epochs": 3})
    job = tmp_path / "job.yaml"
    job.write_text(dump_yaml(cfg))
    procs = [
        subprocess.Popen(_train_cmd(job, "Femur"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    errors = " ".join(err for _out, err in results)
    if codes == [0, 0]:  # the second started after the first finished: it skipped
        assert "already completed" in errors
    else:
        assert codes == [0, 1], errors
        assert "is being trained by another task" in errors, errors[-3000:]
    out = Path(cfg.output.root) / "blip2_femur"
    assert json.loads((out / "training_summary.json").read_text())["status"] == "completed"
    load_file(str(out / FINAL_MODEL / "adapter_model.safetensors"))
