"""File-system helpers: atomic writes, atomic folder swaps, and a per-category lock.

A reader (the collector, a resumed task) must never see half a file or half a folder. Files
are written to a temporary sibling, flushed and fsynced, then renamed over the target (an
atomic step on POSIX file systems). Folders are built under a temporary name and renamed into
place; replacing an existing folder moves the old one aside first and deletes it last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fada_batch.killpoints import reached

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
    folder: Path, *, stale_after_s: float = 6 * 3600, purpose: str = "trained"
) -> Iterator[Path]:
    """Hold `folder/.lock` while training (or evaluating, `purpose="evaluated"`) into `folder`:
    keeps duplicate submissions, and an evaluation and a retraining, apart.

    The lock file records host, pid, SLURM job id, time and purpose, and appears whole (see
    `_publish_lock`). A lock is stale (and taken over) when its process is gone on this host,
    or, for another host, when it has not been refreshed for `stale_after_s` seconds (the
    holder touches it at every checkpoint); a lock without a readable holder is stale once it
    is older than EMPTY_LOCK_GRACE_S.

    Raises:
        LockedError: naming the holder and how to proceed.
    """
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / ".lock"
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "since": time.time(),
        "purpose": purpose,
    }
    for _attempt in range(5):
        if _publish_lock(lock, me):
            break
        found = _read_lock(lock)
        if found is None:  # released in between: try again
            continue
        holder = found.holder
        age = time.time() - found.mtime
        same_host = holder.get("host") == me["host"]
        pid = holder.get("pid")
        stale = (
            (not holder and age > EMPTY_LOCK_GRACE_S)
            or (same_host and isinstance(pid, int) and not pid_alive(pid))
            or (bool(holder) and not same_host and age > stale_after_s)
        )
        if stale:
            _remove_if_same(lock, found)
            continue
        raise LockedError(
            f"{folder} is being {holder.get('purpose', 'trained')} by another task "
            f"(host {holder.get('host', '?')}, pid {pid}, SLURM job {holder.get('slurm_job_id')}, "
            f"lock {lock}). Two tasks must not write the same category at once: wait for it to "
            f"finish, cancel it, or use another output.root. If that task is dead on another "
            f"host, delete {lock}."
        )
    else:
        raise LockedError(f"could not take the lock {lock} after removing a stale one; retry")
    try:
        yield lock
    finally:
        found = _read_lock(lock)
        if (
            found is not None
            and found.holder.get("pid") == me["pid"]
            and found.holder.get("host") == me["host"]
        ):
            with contextlib.suppress(OSError):
                lock.unlink()


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
