"""The master workbook's cell values, read once and reused by every task of a run.

Loading a 19,019-row workbook with openpyxl takes seconds, and every array task reads it
(whether the category has labels, then its rows). `first_worksheet` reads the first
worksheet once and keeps its cell values in a cache folder (the job's
`{output.root}/.cache/workbook/`, shared by the array's tasks), one JSON file per workbook
*content*: the file name is the SHA-256 of the .xlsx bytes, so an edited, replaced or
copied-back workbook never matches a stale entry, whatever its size or modification time
say. A cache file is written whole or not at all (temp file, then rename); one that cannot
be read, or that does not hold what its name says, is ignored and rewritten. A cache folder
that cannot be written (a read-only output root) only costs the speed. The three newest
entries are kept (earlier versions of an edited workbook go).

JSON, not pickle: the cache lives in a shared folder, and loading a pickle someone else
wrote there would run their code.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from fada_batch.data.sheets import Cell, load_worksheets
from fada_batch.fsutil import atomic_write_text

logger = logging.getLogger(__name__)

CACHE_VERSION = 1  # bump when the stored shape or the reading of cells changes
KEEP_ENTRIES = 3  # entries kept per cache folder (the newest): a workbook edited N times leaves 3
CACHE_DIRNAME = ".cache/workbook"  # under output.root

_TIME_TYPES: dict[str, Any] = {
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
}


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes (a 2 MB workbook: a few milliseconds)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_first_worksheet(path: Path) -> tuple[str, list[tuple[Cell, ...]]]:
    """(title, rows of cell values) of the first worksheet, read now (`sheets.load_worksheets`).

    Raises:
        Exception: whatever openpyxl or zipfile raise for a file that is not a valid xlsx.
    """
    worksheets = load_worksheets(path, first_only=True)
    return worksheets[0] if worksheets else ("(none)", [])


def _encode(value: Cell) -> Any:
    """A cell value as JSON: dates and times tagged, so they come back as dates (a date
    answer is a problem of its own, `date_answer`)."""
    for tag in ("datetime", "date", "time"):  # datetime first: it is also a date
        if isinstance(value, getattr(dt, tag)):
            return {"$": tag, "v": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"$": "timedelta", "v": value.total_seconds()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    raise TypeError(f"cell value of type {type(value).__name__} is not cached")


def _decode(obj: dict[str, Any]) -> Any:
    tag = obj.get("$")
    if tag == "timedelta":
        return dt.timedelta(seconds=obj["v"])
    if tag in _TIME_TYPES:
        return _TIME_TYPES[tag](obj["v"])
    return obj


def _load_cached(cache_file: Path, sha: str) -> tuple[str, list[tuple[Cell, ...]]] | None:
    """The cached worksheet, or None when there is none or it is not what it should be."""
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"), object_hook=_decode)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or data.get("sha256") != sha:
        logger.debug("%s: not a cache entry of this version for %s; ignored", cache_file, sha)
        return None
    return str(data["title"]), [tuple(r) for r in data["rows"]]


def first_worksheet(path: Path, cache_dir: Path | None = None) -> tuple[str, list[tuple[Cell, ...]]]:
    """(title, rows of cell values) of the workbook's first worksheet, from `cache_dir` when
    it holds this content, else read (and stored there when `cache_dir` is given).

    Raises:
        OSError: the workbook cannot be read.
        Exception: whatever openpyxl or zipfile raise for a file that is not a valid xlsx.
    """
    if cache_dir is None:
        return read_first_worksheet(path)
    sha = file_sha256(path)
    cache_file = Path(cache_dir) / f"{sha}.json"
    cached = _load_cached(cache_file, sha)
    if cached is not None:
        logger.debug("%s: cell values from the cache %s", path, cache_file)
        return cached
    title, rows = read_first_worksheet(path)
    try:
        payload = {
            "version": CACHE_VERSION,
            "sha256": sha,
            "source": str(path),
            "title": title,
            "rows": [[_encode(v) for v in r] for r in rows],
        }
        atomic_write_text(cache_file, json.dumps(payload, ensure_ascii=False, separators=(",", ":")))
    except (OSError, TypeError) as e:  # a read-only output root, an odd cell: only slower
        logger.info("%s: not cached in %s (%s)", path, cache_dir, e)
    else:
        _prune(Path(cache_dir))
    return title, rows


def _prune(cache_dir: Path) -> None:
    """Keep the `KEEP_ENTRIES` newest entries (earlier versions of the workbook). A task
    reading an entry removed meanwhile still reads it (POSIX), or else reads the workbook."""
    try:
        entries = sorted(cache_dir.glob("*.json"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    except OSError:  # an entry removed while listed: next time
        return
    for old in entries[KEEP_ENTRIES:]:
        with contextlib.suppress(OSError):
            old.unlink()
