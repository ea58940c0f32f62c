"""Progress output: a bar on a terminal, timestamped lines (step, loss, samples/s, ETA) in
batch logs, which are files, at the configured interval and always at the last step."""

from __future__ import annotations

import io
import re

from fada_batch.training.progress import Progress


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_batch_log_gets_timestamped_lines_at_the_interval_and_at_the_end():
    log = io.StringIO()  # a SLURM log: not a terminal
    p = Progress(label="Femur", total_steps=5, start_step=0, interval_s=3600, stream=log)
    p.line("fresh start")
    for step in range(1, 6):
        p.update(step, loss=1.0 / step, samples=16, epoch=0)
    p.close()
    lines = log.getvalue().splitlines()
    stamp = r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] Femur: "
    assert all(re.match(stamp, line) for line in lines), lines
    assert "\r" not in log.getvalue()
    # an hour's interval: no line for steps 1-4, one for the last step
    assert len(lines) == 2 and re.search(
        r"step 5/5 epoch 1 loss 0\.2000 [\d.]+ samples/s ETA 0:00$", lines[1]
    )

    every = io.StringIO()
    p = Progress(label="Femur", total_steps=3, start_step=1, interval_s=0.0, stream=every)
    for step in (2, 3):
        p.update(step, loss=0.5, samples=8, epoch=1)
    assert [re.search(r"step (\d)/3 epoch 2", x).group(1) for x in every.getvalue().splitlines()] == [
        "2",
        "3",
    ]


def test_terminal_gets_a_bar_and_lines_above_it():
    tty = _Terminal()
    p = Progress(label="Femur", total_steps=4, start_step=1, interval_s=0.0, stream=tty)
    p.line("resuming from checkpoint-1 (step 1)")
    for step in (2, 3, 4):
        p.update(step, loss=0.5, samples=8, epoch=0)
    p.close()
    out = tty.getvalue()
    assert "\r" in out and "4/4" in out and "Femur" in out  # tqdm's bar, redrawn in place
    assert "resuming from checkpoint-1 (step 1)" in out
    assert "samples/s ETA" not in out  # no plain lines on a terminal
