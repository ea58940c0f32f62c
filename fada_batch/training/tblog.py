"""TensorBoard event files, written by hand: live curves that need no network and no extra package.

    log = EventLog.open(out_dir / "tensorboard", resume_step=0)   # a new file for this attempt
    log.scalars({"train/loss": 0.91, "train/learning_rate": 1e-4}, step=1)
    log.close()

`tensorboard --logdir outputs/<run>` then shows every category of the run side by side (one
run per `blip2_*/tensorboard/` folder). An event file is a sequence of TFRecords (uint64
length, masked CRC32C of the length, the bytes, masked CRC32C of the bytes), each holding one
`Event` protobuf: the first says `file_version: "brain.Event:2"`, the others carry
`wall_time`, `step` and `summary.value {tag, simple_value}`. Only these few fields are
written, so they are encoded here (about 100 lines) instead of pulling in the `tensorboard`
package and its grpcio/protobuf/werkzeug stack at run time (the tests read the files back with
that package's own reader).

A resumed or requeued attempt continues the same curves without duplicates: before it writes,
every older file of the folder is rewritten (atomically) without the events past the step it
resumes from, which the attempt will write again (a torn record at the end of a killed
attempt's file goes too), and its own file starts with a `SessionLog START` at the next step,
TensorBoard's own purge mark for anything it had already loaded from those files.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

from fada_batch.fsutil import atomic_write_bytes, remove_stale_tmp

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"  # in the category's output folder
FILE_VERSION = b"brain.Event:2"
_NAME = re.compile(r"^events\.out\.tfevents\.(\d+)\.")

# ---------------------------------------------------------------------------- CRC32C, framing


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """TFRecord's masked CRC32C: rotated right by 15 bits plus a constant."""
    c = crc32c(data)
    return ((((c >> 15) | (c << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def frame(record: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the record, its masked CRC."""
    length = struct.pack("<Q", len(record))
    return length + struct.pack("<I", masked_crc(length)) + record + struct.pack("<I", masked_crc(record))


def read_records(data: bytes) -> Iterator[bytes]:
    """The whole records of an event file's bytes; stops at a torn or corrupt one (a killed
    writer's last record)."""
    pos = 0
    while pos + 12 <= len(data):
        header = data[pos : pos + 8]
        (n,) = struct.unpack("<Q", header)
        end = pos + 12 + n + 4
        if end > len(data) or struct.unpack("<I", data[pos + 8 : pos + 12])[0] != masked_crc(header):
            return
        record = data[pos + 12 : pos + 12 + n]
        if struct.unpack("<I", data[end - 4 : end])[0] != masked_crc(record):
            return
        yield record
        pos = end


# ------------------------------------------------------------------------------- protobuf


def _varint(n: int) -> bytes:
    n &= 0xFFFFFFFFFFFFFFFF  # int64: negative numbers as two's complement
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire)
    return key + (_varint(len(payload)) + payload if wire == 2 else payload)


def encode_event(
    step: int, wall_time: float, values: dict[str, float] | None = None, *, file_version: bool = False
) -> bytes:
    """An `Event` (event.proto): wall_time=1 (double), step=2 (int64), file_version=3,
    summary=5 holding `Summary.Value`s (tag=1, simple_value=2 as float32)."""
    out = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version:
        out += _field(3, 2, FILE_VERSION)
    if values:
        summary = b"".join(
            _field(1, 2, _field(1, 2, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
            for tag, v in values.items()
        )
        out += _field(5, 2, summary)
    return out


def session_start(step: int, wall_time: float) -> bytes:
    """`Event{step, session_log{status: START}}` (session_log=6, status=1, START=1): TensorBoard
    drops what it loaded at steps >= `step` from earlier files (a restart)."""
    return (
        _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + _field(6, 2, b"\x08\x01")
    )


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if not b & 0x80:
            return n, pos
        shift += 7


def fields(buf: bytes) -> list[tuple[int, int, bytes]]:
    """(number, wire type, raw payload) of each field of a protobuf message."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            start = pos
            _, pos = _read_varint(buf, pos)
            out.append((number, wire, buf[start:pos]))
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            out.append((number, wire, buf[pos : pos + size]))
            pos += size
        elif wire == 2:
            n, pos = _read_varint(buf, pos)
            out.append((number, wire, buf[pos : pos + n]))
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
    return out


def event_step(record: bytes) -> int:
    for number, wire, raw in fields(record):
        if number == 2 and wire == 0:
            n = _read_varint(raw, 0)[0]
            return n - (1 << 64) if n >= 1 << 63 else n
    return 0


def event_tags(record: bytes) -> list[str]:
    """The tags of an event's summary values."""
    tags = []
    for number, _, raw in fields(record):
        if number == 5:
            for vn, _, value in fields(raw):
                if vn == 1:
                    tags += [t.decode() for tn, _, t in fields(value) if tn == 1]
    return tags


def _without_tags(record: bytes, drop: Callable[[str], bool]) -> bytes | None:
    """The event without the summary values whose tag `drop` names; None when none is left."""
    out, had_values, kept_values = b"", False, False
    for number, wire, raw in fields(record):
        if number != 5:
            out += _field(number, wire, raw)
            continue
        summary = b""
        for vn, vw, value in fields(raw):
            tags = [t.decode() for tn, _, t in fields(value) if tn == 1] if vn == 1 else []
            had_values |= vn == 1
            if vn == 1 and any(drop(t) for t in tags):
                continue
            kept_values |= vn == 1
            summary += _field(vn, vw, value)
        out += _field(5, 2, summary)
    return None if had_values and not kept_values else out


# ------------------------------------------------------------------------------ the folder


def event_files(folder: Path) -> list[Path]:
    """The event files of a folder, in TensorBoard's reading order (by name)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _NAME.match(p.name) and p.is_file())


def rewrite(folder: Path, keep: Callable[[bytes], bytes | None]) -> int:
    """Rewrite each event file of `folder` with `keep(record)` for each whole record (None
    drops it); a file left with nothing but its header is removed. Returns records dropped."""
    dropped = 0
    for path in event_files(folder):
        records = list(read_records(path.read_bytes()))
        kept = [r for r in (keep(rec) for rec in records) if r is not None]
        torn = path.stat().st_size != sum(len(frame(r)) for r in records)
        if len(kept) == len(records) and kept == records and not torn:
            continue
        dropped += len(records) - len(kept)
        if all(event_step(r) == 0 and not event_tags(r) for r in kept):
            path.unlink()
        else:
            atomic_write_bytes(path, b"".join(frame(r) for r in kept))
    return dropped


def drop_after(folder: Path, step: int) -> int:
    """Remove the events past `step` from the folder's files (a resume redoes those steps)."""
    return rewrite(folder, lambda r: r if event_step(r) <= step else None)


def drop_tags(folder: Path, prefix: str) -> int:
    """Remove every value whose tag starts with `prefix` (an evaluation run again replaces them)."""
    return rewrite(folder, lambda r: _without_tags(r, lambda t: t.startswith(prefix)))


def _new_file_name(folder: Path) -> str:
    """`events.out.tfevents.<seconds>.<host>.<pid>.0`, after every existing one in name order
    (TensorBoard reads a folder's files in that order)."""
    stamps = [int(m.group(1)) for p in event_files(folder) if (m := _NAME.match(p.name))]
    stamp = max([int(time.time()), *(s + 1 for s in stamps)])
    return f"events.out.tfevents.{stamp:010d}.{socket.gethostname()}.{os.getpid()}.0"


class EventLog:
    """One attempt's event file, appended and flushed record by record (TensorBoard sees each
    step as it is written)."""

    def __init__(self, path: Path, stream: BinaryIO) -> None:
        self.path = path
        self._stream = stream

    @classmethod
    def open(cls, folder: Path, *, resume_step: int = 0) -> EventLog:
        """A new event file in `folder`, after removing from older files every event past
        `resume_step` (the steps this attempt writes again; 0 for a fresh start)."""
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(folder)  # a rewrite killed half-way (its name holds "tfevents" too)
        if (n := drop_after(folder, resume_step)) > 0:
            log.info("%s: dropped %d events past step %d (written again now)", folder, n, resume_step)
        path = folder / _new_file_name(folder)
        stream = path.open("ab")
        out = cls(path, stream)
        now = time.time()
        out._write(encode_event(0, now, file_version=True))
        if resume_step > 0:
            out._write(session_start(resume_step + 1, now))
        return out

    def _write(self, record: bytes) -> None:
        self._stream.write(frame(record))
        self._stream.flush()

    def scalars(self, values: dict[str, float | None], step: int) -> None:
        """One event with these values (None and non-finite values are left out)."""
        clean = {k: float(v) for k, v in values.items() if v is not None and float(v) == float(v)}
        if clean:
            self._write(encode_event(step, time.time(), clean))

    def close(self) -> None:
        if not self._stream.closed:
            self._stream.close()


def append_scalars(folder: Path, values: dict[str, float | None], step: int, *, replace: str = "") -> Path:
    """Write `values` at `step` into a new event file of `folder`, after removing every earlier
    value whose tag starts with `replace` (when given): an evaluation's scores."""
    folder.mkdir(parents=True, exist_ok=True)
    if replace:
        drop_tags(folder, replace)
    path = folder / _new_file_name(folder)
    clean = {k: float(v) for k, v in values.items() if v is not None and float(v) == float(v)}
    records = [encode_event(0, time.time(), file_version=True), encode_event(step, time.time(), clean)]
    atomic_write_bytes(path, b"".join(frame(r) for r in records))
    return path
