"""File-system helpers: atomic writes, atomic folder swaps, and a per-category lock.

A reader (the collector, a resumed task) must never see half a file or half a folder. Files
are written to a temporary sibling, flushed and fsynced, then renamed over the target (an
atomic step on POSIX file systems). Folders are built under a temporary name and renamed into
place; replacing an existing folder moves the old one aside first and deletes it last.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fada_batch.killpoints import reached

log = logging.getLogger(__name__)

TMP_MARK = ".tmp-"  # temporary siblings carry this in their name; resume ignores/cleans them


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` so a reader sees the old file or the new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}{TMP_MARK}", dir=path.parent)
    try:
        # mkstemp makes 0600 files; results on shared storage must be readable like any other
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under `root` (before it is renamed into place).

    Also gives every file the umask's permissions: some writers (safetensors, mkstemp) make
    0600 files, which colleagues and the collector could not read on shared storage.
    """
    mask = _umask()
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                os.chmod(Path(dirpath) / name, 0o666 & ~mask)
            with contextlib.suppress(OSError):
                fd = os.open(Path(dirpath) / name, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(Path(dirpath))


@contextlib.contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `target` in one rename.

    On an exception the temporary folder is removed and `target` is left as it was. If
    `target` exists, it is moved aside first and removed after the new one is in place, so at
    every instant either the old or the new complete folder (or, between two renames, neither)
    exists under the target name, never a partial one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f"{target.name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
    tmp.mkdir(mode=0o777 & ~_umask())
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(finished: Path, target: Path) -> None:
    """Rename the complete folder `finished` to `target`, replacing what is there: the old
    folder is moved aside first (a temp name that a resume sweeps) and deleted last."""
    fsync_tree(finished)
    reached("swap.fsynced", target.name)
    old = None
    if target.exists():
        old = target.parent / f"{target.name}{TMP_MARK}old-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
        reached("swap.aside", target.name)  # neither folder under the target name here
    os.replace(finished, target)
    _fsync_dir(target.parent)
    reached("swap.renamed", target.name)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete the folder `path` so that it never exists half-deleted under its name: it is
    renamed to a temporary sibling first (which `remove_stale_tmp` sweeps if a kill stops the
    deletion), then deleted. A `checkpoint-N` or `final_model` folder is whole or absent."""
    aside = path.parent / f"{path.name}{TMP_MARK}del-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    reached("remove.aside", path.name)
    shutil.rmtree(aside, ignore_errors=True)


def remove_stale_tmp(folder: Path) -> list[Path]:
    """Delete temporary siblings left by a killed writer (names containing TMP_MARK)."""
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    for p in folder.iterdir():
        if TMP_MARK in p.name:
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
            removed.append(p)
    return removed


class LockedError(RuntimeError):
    """Another live process holds the category's lock."""


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


EMPTY_LOCK_GRACE_S = 60.0  # a lock file without content younger than this is being written
STALE_AFTER_S = 6 * 3600.0  # a holder nobody can vouch for is dead after this long without a write


@dataclass(frozen=True)
class JobPhase:
    """What a scheduler says of a batch job, in the lock's words.

    `phase`: "running" (its processes may be writing), "pending" (queued, or requeued and
    waiting: none of its processes runs), "ended", or None when it cannot tell. `detail` says
    what was seen, for messages (e.g. "RUNNING (squeue)").
    """

    phase: str | None
    detail: str = ""


# Asks the scheduler about a job id; `fada_batch.run.slurmjobs.job_phase` asks SLURM. The lock and
# the collector take one as an argument, so that this module never runs a scheduler command.
JobProbe = Callable[[str], JobPhase]


class Verdict(NamedTuple):
    """`judge_holder`'s answer: is the holder alive, why (one phrase), and what decided:
    "empty" (no holder written), "requeue" (this job's earlier run), "pid" (its process on
    this host), "job" (the scheduler's word) or "age" (nobody could vouch for it)."""

    alive: bool
    why: str
    basis: str

    @property
    def by_age(self) -> bool:
        return self.basis == "age"


def _pid_namespace() -> str | None:
    """This process's pid namespace (containers have their own): pids compare only within one."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def lock_identity(purpose: str = "trained") -> dict[str, Any]:
    """What a lock file records about its holder: host, pid (and its namespace), SLURM job."""
    env = os.environ
    me: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_ns": _pid_namespace(),
        "slurm_job_id": env.get("SLURM_JOB_ID"),
        "since": time.time(),
        "purpose": purpose,
    }
    if env.get("SLURM_JOB_ID"):
        me["slurm_restart_count"] = _count(env.get("SLURM_RESTART_COUNT"))
        me["slurm_cluster"] = env.get("SLURM_CLUSTER_NAME")
        if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
            me["slurm_array"] = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    return me


def _count(v: Any) -> int:
    """SLURM_RESTART_COUNT as a number (SLURM leaves it unset before the first requeue)."""
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return int(v) if isinstance(v, str) and v.isdigit() else 0


def describe_holder(holder: dict[str, Any]) -> str:
    """'host h, pid p, SLURM job j (array a_t)' from a lock's content."""
    job, array = holder.get("slurm_job_id"), holder.get("slurm_array")
    text = f"host {holder.get('host', '?')}, pid {holder.get('pid')}"
    if job:
        text += f", SLURM job {job}" + (f" (array task {array})" if array else "")
    return text


def judge_holder(
    holder: dict[str, Any],
    *,
    age_s: float,
    me: dict[str, Any] | None = None,
    job_probe: JobProbe | None = None,
    stale_after_s: float = STALE_AFTER_S,
) -> Verdict:
    """Whether the process that wrote a lock is still alive, and why.

    In order: a lock without a holder is alive while younger than EMPTY_LOCK_GRACE_S; a lock
    left by an earlier run of this very SLURM job (same job id and cluster, a lower restart
    count: it was requeued) is dead wherever it was written; a holder on this host (and pid
    namespace) whose pid is gone is dead; a holder whose SLURM job the scheduler reports as
    no longer running (pending after a requeue, or ended) is dead, one it reports running is
    alive, whichever host wrote the lock; without a scheduler's answer, a holder on this
    host is alive while its pid is, and one elsewhere until nothing was written for
    `stale_after_s`.

    Args:
        holder: the lock's content (`lock_identity` of its writer; {} when unreadable).
        age_s: seconds since the holder last wrote (the lock, or its folder).
        me: the judging process's `lock_identity` (None: this process, outside any job).
        job_probe: asks the scheduler about a job id; None: do not ask.
    """
    me = me if me is not None else lock_identity()
    if not holder:
        alive = age_s <= EMPTY_LOCK_GRACE_S
        why = "a lock without a holder, " + ("being written" if alive else "left by a crash")
        return Verdict(alive, why, "empty")
    job, pid = holder.get("slurm_job_id"), holder.get("pid")
    same_cluster = None in (holder.get("slurm_cluster"), me.get("slurm_cluster")) or (
        holder.get("slurm_cluster") == me.get("slurm_cluster")
    )
    if job and job == me.get("slurm_job_id") and same_cluster:
        theirs, mine = _count(holder.get("slurm_restart_count")), _count(me.get("slurm_restart_count"))
        if theirs < mine:
            why = f"left by this same SLURM job {job} before it was requeued (run {theirs}, now {mine})"
            return Verdict(False, why, "requeue")
    same_pids = holder.get("host") == me.get("host") and (
        None in (holder.get("pid_ns"), me.get("pid_ns")) or holder.get("pid_ns") == me.get("pid_ns")
    )
    if same_pids and isinstance(pid, int) and not pid_alive(pid):
        return Verdict(False, f"its process (pid {pid} on {holder.get('host')}) is gone", "pid")
    unknown = ""
    if job and job_probe is not None and same_cluster:
        try:
            seen = job_probe(str(job))
        except Exception as e:  # a broken probe must not break the lock: judge without it
            seen = JobPhase(None, f"the scheduler could not be asked ({type(e).__name__}: {e})")
        if seen.phase == "running":
            return Verdict(True, f"SLURM job {job} is {seen.detail or 'running'}", "job")
        if seen.phase in ("pending", "ended"):
            return Verdict(False, f"SLURM job {job} is no longer running: {seen.detail or seen.phase}", "job")
        unknown = f"; whether SLURM job {job} still runs is unknown ({seen.detail or 'no answer'})"
    if same_pids and isinstance(pid, int):
        return Verdict(True, f"its process (pid {pid} on {holder.get('host')}) is alive{unknown}", "pid")
    if age_s > stale_after_s:
        why = f"nothing written for {age_s / 3600:.1f} h by a holder on another host{unknown}"
        return Verdict(False, why, "age")
    why = (
        f"on another host, last write {age_s / 60:.0f} min ago (taken for dead after "
        f"{stale_after_s / 3600:g} h without a write){unknown}"
    )
    return Verdict(True, why, "age")


def _publish_lock(lock: Path, content: dict[str, Any]) -> bool:
    """Create `lock` holding `content`, atomically and only if it does not exist.

    The content is written to a private file first and hard-linked into place, so no reader
    ever sees a lock without its holder (with create-then-write, a contender reading in
    between took the empty file for stale and removed a live lock). Where the file system
    has no hard links, an exclusive create followed by the write.
    """
    private = lock.with_name(f"{lock.name}.new-{uuid.uuid4().hex[:12]}")
    private.write_text(json.dumps(content))
    try:
        os.link(private, lock)
        return True
    except FileExistsError:
        return False
    except OSError:  # no hard links here (some FUSE and object-store mounts)
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(content, f)
        return True
    finally:
        with contextlib.suppress(OSError):
            private.unlink()


@dataclass(frozen=True)
class _LockFile:
    holder: dict[str, Any]  # {} when unreadable or empty
    raw: bytes  # the content as read: holder + `since` make it unique to one taking
    inode: tuple[int, int]
    mtime: float


def _read_lock(lock: Path) -> _LockFile | None:
    """The lock file as it is now (None when there is none)."""
    try:
        with open(lock, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        holder = json.loads(raw or b"{}")
    except ValueError:
        holder = {}
    return _LockFile(holder if isinstance(holder, dict) else {}, raw, (st.st_dev, st.st_ino), st.st_mtime)


def _remove_if_same(lock: Path, seen: _LockFile) -> None:
    """Remove `lock` only if it is still the stale file `seen`.

    It is first renamed aside (atomic); if what was moved is a lock that a contender took
    meanwhile (other content, or another inode), it is linked back, so a live lock is never
    lost. Content counts too because a new file may get the inode number of a removed one.
    """
    aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:12]}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    try:
        moved = _read_lock(aside)
        if moved is not None and (moved.raw, moved.inode) != (seen.raw, seen.inode):
            with contextlib.suppress(OSError):
                os.link(aside, lock)
    finally:
        with contextlib.suppress(OSError):
            aside.unlink()


@contextlib.contextmanager
def category_lock(
    folder: Path,
    *,
    stale_after_s: float = STALE_AFTER_S,
    purpose: str = "trained",
    job_probe: JobProbe | None = None,
) -> Iterator[Path]:
    """Hold `folder/.lock` while training (or evaluating, `purpose="evaluated"`) into `folder`:
    keeps duplicate submissions, and an evaluation and a retraining, apart.

    The lock file records `lock_identity()` (host, pid, SLURM job, time, purpose) and appears
    whole (see `_publish_lock`). Whether a lock found there is stale (and taken over) is
    `judge_holder`'s call: a requeued SLURM job takes over its own earlier lock, a lock whose
    SLURM job `job_probe` reports as no longer running is stale from any host, and without
    an answer from the scheduler the holder's pid (this host) or the lock's age (another
    host; the holder touches it at every checkpoint) decides.

    Args:
        job_probe: asks the scheduler whether a holder's job still runs
            (`fada_batch.run.slurmjobs.job_phase`); None: never ask.

    Raises:
        LockedError: naming the holder (its SLURM job), why it counts as alive, and what to do.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = lock_identity(purpose)
    for _attempt in range(5):
        if _publish_lock(lock, me):
            break
        found = _read_lock(lock)
        if found is None:  # released in between: try again
            continue
        holder = found.holder
        verdict = judge_holder(
            holder, age_s=time.time() - found.mtime, me=me, job_probe=job_probe, stale_after_s=stale_after_s
        )
        if not verdict.alive:
            log.info("taking over the stale lock %s (%s): %s", lock, describe_holder(holder), verdict.why)
            _remove_if_same(lock, found)
            continue
        raise LockedError(_locked_message(folder, lock, holder, verdict))
    else:
        raise LockedError(f"could not take the lock {lock} after removing a stale one; retry")
    try:
        yield lock
    finally:
        found = _read_lock(lock)
        if found is not None and found.holder == me:
            with contextlib.suppress(OSError):
                lock.unlink()


def _locked_message(folder: Path, lock: Path, holder: dict[str, Any], verdict: Verdict) -> str:
    job = holder.get("slurm_job_id")
    cancel = f"cancel it (scancel {job})" if job else "stop it"
    text = (
        f"{folder} is being {holder.get('purpose', 'trained')} by another task "
        f"({describe_holder(holder) if holder else 'holder not yet written'}, lock {lock}): {verdict.why}. "
        f"Two tasks must not write the same category at once: wait for it to finish, {cancel}, "
        "or use another output.root."
    )
    if verdict.by_age:
        text += f" If that task is dead on another host, delete {lock}."
    return text


def touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


class NotWritableError(RuntimeError):
    """A folder that must receive results cannot be written."""


def ensure_writable(folder: Path, *, what: str = "output folder", key: str = "output.root") -> Path:
    """Create `folder` if needed and prove it writable with a probe file.

    Raises:
        NotWritableError: naming the folder, the OS reason and the config key to change.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".write-probe{TMP_MARK}", dir=folder)
        os.close(fd)
        # a task that holds this folder's lock may already have swept it away as a stale temp
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe)
    except OSError as e:
        raise NotWritableError(
            f"the {what} {folder} is not writable: {e.strerror or e}. Point {key} at a folder "
            "you can write (on shared storage for SLURM jobs), or fix its permissions."
        ) from e
    return folder
