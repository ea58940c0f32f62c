"""Training progress: a bar on a terminal, plain timestamped lines at an interval otherwise.

SLURM logs are files, not terminals; a bar's carriage returns make them unreadable, so batch
jobs get one flushed line every `interval_s` seconds with step, loss, speed and ETA.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from typing import TextIO


def _fmt_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """Reports optimizer steps of one category's training."""

    def __init__(
        self,
        *,
        label: str,
        total_steps: int,
        start_step: int,
        interval_s: float,
        stream: TextIO | None = None,
        force_plain: bool = False,
    ) -> None:
        self.label = label
        self.total = total_steps
        self.start_step = start_step
        self.interval = interval_s
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.last = self.t0
        self.samples = 0
        self.bar = None
        if not force_plain and self.stream.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total_steps, initial=start_step, desc=label, file=self.stream, dynamic_ncols=True
            )

    def line(self, text: str) -> None:
        """A timestamped, flushed line (kept apart from the bar)."""
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
        msg = f"[{stamp}] {self.label}: {text}"
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)  # tqdm.write alone prints to stdout
        else:
            print(msg, file=self.stream, flush=True)

    def update(self, step: int, loss: float, samples: int, epoch: int) -> None:
        self.samples += samples
        now = time.monotonic()
        elapsed = now - self.t0
        done = step - self.start_step
        rate = self.samples / elapsed if elapsed > 0 else 0.0
        eta = (self.total - step) * elapsed / done if done > 0 else 0.0
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4f}", sps=f"{rate:.1f}", epoch=epoch + 1)
            return
        if now - self.last >= self.interval or step == self.total:
            self.last = now
            self.line(
                f"step {step}/{self.total} epoch {epoch + 1} loss {loss:.4f} "
                f"{rate:.2f} samples/s ETA {_fmt_eta(eta)}"
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
