"""Named instants of a training run, where tests trace, kill or freeze it; inert otherwise.

Training calls `reached(point, where)` at the instants a kill could hurt most: a checkpoint's
files written but not yet renamed into place, the old `final_model/` moved aside and the new
one not yet in, an old checkpoint renamed away but not yet deleted, and so on. Nothing
happens unless one of these environment variables is set, which only the tests do:

    FADA_KILL_AT=<point>[@<where>]   SIGKILL this process on reaching that point
    FADA_STOP_AT=<point>[@<where>]   SIGSTOP it there (frozen mid-write until SIGCONT)
    FADA_TRACE_POINTS=<file>         append every point reached to <file>, one label a line
    FADA_STEP_PAUSE_S=<seconds>      sleep that long after each optimizer step (`step.done`), so
                                     a run lasts a known time on any CPU (time-limit tests)

A label is the point's name, plus `@<where>` when it has one (an optimizer step, or the name
of the folder being swapped): `step.done@12`, `swap.aside@final_model`. A bare name in
`FADA_KILL_AT` or `FADA_STOP_AT` matches every point of that name, whatever its `where`.

Cost when none is set: four dictionary look-ups per call, a few calls per step.
"""

from __future__ import annotations

import os
import signal
import time

KILL_ENV = "FADA_KILL_AT"
STOP_ENV = "FADA_STOP_AT"
TRACE_ENV = "FADA_TRACE_POINTS"
PAUSE_ENV = "FADA_STEP_PAUSE_S"


def label(point: str, where: object = None) -> str:
    """`point` or `point@where`: how a point reached is written and matched."""
    return point if where is None else f"{point}@{where}"


def reached(point: str, where: object = None) -> None:
    """Trace this point (FADA_TRACE_POINTS); die (FADA_KILL_AT) or freeze (FADA_STOP_AT) here
    when named."""
    kill_at = os.environ.get(KILL_ENV)
    stop_at = os.environ.get(STOP_ENV)
    trace = os.environ.get(TRACE_ENV)
    pause = os.environ.get(PAUSE_ENV)
    if not kill_at and not stop_at and not trace and not pause:
        return
    text = label(point, where)
    if trace:
        # written before the kill, so the trace shows where the process died; a SIGKILL
        # loses nothing already written to the file (the kernel holds it, not the process)
        with open(trace, "a", encoding="utf-8") as f:
            f.write(text + "\n")
    if kill_at in (text, point):
        os.kill(os.getpid(), signal.SIGKILL)
    if stop_at in (text, point):
        os.kill(os.getpid(), signal.SIGSTOP)
    if pause and point == "step.done":
        time.sleep(float(pause))
