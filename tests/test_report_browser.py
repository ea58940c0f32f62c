"""report.html in a real browser: Debian's headless Chromium, driven over the DevTools protocol.

The protocol runs over `--remote-debugging-pipe` (JSON messages separated by NUL bytes on file
descriptors 3 and 4), so no websocket client or other Python package is needed. The page is
loaded from a file:// URL; every console message, uncaught exception, browser log entry and
network request is recorded, the DOM is queried, and a full-page screenshot is checked for
plots that really rendered (many colours where each plot sits, not a blank box).

Chromium comes from Debian: `apt-get install -y --no-install-recommends chromium`. Without
it the browser tests skip, saying so; with FADA_REQUIRE_BROWSER=1 (CI) they fail instead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fada_batch.run.collect import collect
from fada_batch.run.report import write_report

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser")
INSTALL = "apt-get install -y --no-install-recommends chromium"


def _chromium() -> str | None:
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _usable(exe: str) -> str | None:
    """None when `exe --version` works, else why not."""
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{exe} --version failed: {e}"
    return None if out.returncode == 0 else f"{exe} --version exited {out.returncode}: {out.stderr[-300:]}"


class Browser:
    """Headless Chromium with the DevTools protocol over a pipe (fds 3 and 4 in the child)."""

    def __init__(self, exe: str, profile: Path, *, width: int = 1400, height: int = 1000) -> None:
        cmd_r, cmd_w = os.pipe()  # we write commands, Chromium reads them on fd 3
        res_r, res_w = os.pipe()  # Chromium writes replies and events on fd 4
        # keep the child's ends clear of 3 and 4 so the redirections below cannot clobber them
        cmd_r2, res_w2 = (fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, res_w))
        os.close(cmd_r)
        os.close(res_w)
        flags = [
            "--headless",
            "--no-sandbox",  # CI and this machine run as root
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-extensions",
            "--disable-default-apps",
            "--no-first-run",
            "--no-default-browser-check",
            "--hide-scrollbars",
            "--mute-audio",
            f"--window-size={width},{height}",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
        ]
        self.log_path = profile.parent / "chromium-stderr.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{cmd_r2} 4>&{res_w2}', exe, *flags],
            pass_fds=(cmd_r2, res_w2),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        os.close(cmd_r2)
        os.close(res_w2)
        self._w, self._r = cmd_w, res_r
        self._buf = b""
        self._id = 0
        self.events: list[dict[str, Any]] = []
        self.session: str | None = None

    def _read(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no reply from Chromium (log: {self.log_path})")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"Chromium closed the pipe: {self.log_path.read_text()[-2000:]}")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, *, timeout: float = 30.0) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session and not method.startswith(("Target.", "Browser.")):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, *, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for e in self.events:
            if e.get("method") == method:
                return e
        while True:
            e = self._read(deadline)
            self.events.append(e)
            if e.get("method") == method:
                return e

    def open(self, url: str, *, width: int, height: int) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Runtime", "Log", "Network", "Page"):
            self.send(f"{domain}.enable")
        self.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )
        self.send("Page.navigate", {"url": url})
        self.wait_for("Page.loadEventFired")

    def eval(self, expression: str) -> Any:
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True})
        if "exceptionDetails" in out:
            raise RuntimeError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")

    def screenshot(self) -> bytes:
        """The whole page, not only the window."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1}
        shot = self.send(
            "Page.captureScreenshot",
            {"format": "png", "captureBeyondViewport": True, "clip": clip},
            timeout=60,
        )
        return base64.b64decode(shot["data"])

    def problems(self, page_url: str) -> list[str]:
        """Console errors/warnings, exceptions, error log entries and any request off the page."""
        out = []
        for e in self.events:
            m, p = e.get("method"), e.get("params", {})
            if m == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
                out.append(f"console.{p['type']}: {[a.get('value') for a in p.get('args', [])]}")
            elif m == "Runtime.exceptionThrown":
                out.append(f"exception: {p.get('exceptionDetails', {}).get('text')}")
            elif m == "Log.entryAdded" and p["entry"].get("level") in ("error", "warning"):
                out.append(
                    f"log {p['entry']['level']} ({p['entry'].get('source')}): {p['entry'].get('text')}"
                )
            elif m == "Network.requestWillBeSent":
                url = p["request"]["url"]
                if not (url == page_url or url.startswith(("data:", "about:"))):
                    out.append(f"request: {url}")
            elif m == "Network.loadingFailed":
                out.append(f"load failed: {p.get('errorText')}")
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.send("Browser.close", timeout=10)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._w, self._r):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._log.close()


@pytest.fixture(scope="module")
def chromium() -> str:
    exe = _chromium()
    why = f"Chromium is not installed (Debian: {INSTALL})" if exe is None else _usable(exe)
    if why:
        if os.environ.get("FADA_REQUIRE_BROWSER") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return exe


@pytest.fixture()
def browser(chromium, tmp_path):
    b = Browser(chromium, tmp_path / "profile")
    yield b
    b.close()


@pytest.fixture(scope="module")
def report(tmp_path_factory, tiny_model_dir, demo_root) -> tuple[Path, list[str], dict[str, str]]:
    """report.html of the real tiny-model run from test_collect, written into a copy of it."""
    from test_collect import ALL, EXPECTED, build_real_run

    run = build_real_run(tmp_path_factory, tiny_model_dir, demo_root)
    root = tmp_path_factory.mktemp("browser") / "report 'root'"
    shutil.copytree(run["root"], root)
    result = collect(root, categories=ALL, data_root=run["data_root"], compare=run["other"])
    paths = write_report(result.to_dict(), root)
    return paths["html"], ALL, EXPECTED


def _distinct_colours(png: bytes, box: tuple[int, int, int, int]) -> tuple[int, float]:
    """(distinct colours, fraction of non-white pixels) inside `box` of a screenshot."""
    from PIL import Image

    img = Image.open(io.BytesIO(png)).convert("RGB").crop(box)
    colours = img.getcolors(maxcolors=1 << 20) or []
    pixels = img.width * img.height
    white = sum(n for n, c in colours if min(c) >= 250)
    return len(colours), 1 - white / max(1, pixels)


def test_report_renders_in_chromium(browser, report, tmp_path):
    html_path, names, expected = report
    url = html_path.resolve().as_uri()
    browser.open(url, width=1400, height=1000)

    assert browser.problems(url) == []
    assert browser.eval("document.title").startswith("fada-batch report")

    rows = browser.eval(
        "[...document.querySelectorAll('#results tbody tr')]"
        ".map(r => [r.dataset.category, r.dataset.state, r.cells.length])"
    )
    assert [r[0] for r in rows] == names  # one row per category, in the job's order
    assert {r[0]: r[1] for r in rows} == expected
    assert len({r[2] for r in rows}) == 1  # every row has every column
    assert browser.eval("document.querySelectorAll('#compare-table tbody tr').length") == len(names)
    text = browser.eval("document.body.innerText")
    assert "CUDA out of memory" in text and "not valid JSON" in text

    plots = browser.eval(
        "[...document.querySelectorAll('img.plot')].map(i => {const r = i.getBoundingClientRect();"
        " return {id: i.id, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth,"
        " x: r.left + scrollX, y: r.top + scrollY, width: r.width, height: r.height};})"
    )
    assert [p["id"] for p in plots] == ["plot-loss", "plot-eval_per_question", "plot-eval_vs_baselines"]
    assert all(p["ok"] and p["width"] > 300 and p["height"] > 150 for p in plots), plots

    png = browser.screenshot()
    shot = tmp_path / "report.png"
    shot.write_bytes(png)
    if os.environ.get("FADA_SCREENSHOT_DIR"):  # to look at it: FADA_SCREENSHOT_DIR=/tmp pytest ...
        shutil.copy(shot, Path(os.environ["FADA_SCREENSHOT_DIR"]) / "report.png")
    for p in plots:
        box = (int(p["x"]), int(p["y"]), int(p["x"] + p["width"]), int(p["y"] + p["height"]))
        colours, ink = _distinct_colours(png, box)
        assert colours > 100 and ink > 0.03, (p["id"], colours, ink)
    assert browser.problems(url) == []


def test_report_fits_1200_px_names_questions_and_shows_the_q7_matrix(browser, report):
    """At 1200 px nothing scrolls sideways; questions carry their names; each evaluated
    category has its headline table and Q7 confusion matrices; the banner names the stand-ins."""
    from fada_batch.evaluation.question_scores import QUESTION_NAMES

    html_path, _names, _expected = report
    url = html_path.resolve().as_uri()
    browser.open(url, width=1200, height=900)
    assert browser.problems(url) == []
    assert browser.eval("document.documentElement.scrollWidth") <= 1200
    wide = browser.eval(
        "[...document.querySelectorAll('table, .scroll, img, pre')].filter(e => e.scrollWidth > e.clientWidth + 1"
        " || e.getBoundingClientRect().right > window.innerWidth).map(e => e.id || e.tagName)"
    )
    assert wide == []  # no table, plot or block wider than the window, nor cut off inside its box
    text = browser.eval("document.body.innerText")
    for i, name in enumerate(QUESTION_NAMES, start=1):
        assert f"Q{i} {name}" in text
    banner = browser.eval("document.getElementById('synthetic-banner').innerText")
    assert "tiny test model" in banner and "synthetic demo scans" in banner
    for category in ("Femur", "Abdomen"):
        questions = browser.eval(
            f"[...document.querySelectorAll('#headline-{category} tbody tr[data-question]')].map(r => r.dataset.question)"
        )
        assert [q for q in dict.fromkeys(questions)] == [*(f"Q{i}" for i in range(1, 9)), "overall"]
        q7_rows = browser.eval(
            f"[...document.querySelectorAll('#headline-{category} tr[data-question=Q7]')].map(r => r.innerText)"
        )
        assert "sensitivity (abnormal)" in q7_rows[1] and "specificity" in q7_rows[2]
        n_q7 = int(
            browser.eval(
                f"document.querySelector('#headline-{category} tr[data-question=Q7] td.num').innerText"
            )
        )
        matrices = browser.eval(
            f"[...document.querySelectorAll('#q7-confusion-{category} table.matrix')].map(t => [t.dataset.model,"
            " [...t.querySelectorAll('td')].reduce((s, td) => s + Number(td.innerText), 0)])"
        )
        assert matrices == [["adapter", n_q7], ["base", n_q7], ["majority", n_q7]]
    assert browser.eval("document.querySelectorAll('#data-table tbody tr').length") >= 2


def test_harness_catches_errors_and_requests(browser, tmp_path):
    """The checks above can fail: a page with a console error, an exception and a remote image."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        "<!doctype html><html><body><h1>bad</h1>"
        '<img src="http://127.0.0.1:9/x.png">'
        "<script>console.error('boom'); undefinedFunction();</script></body></html>"
    )
    url = bad.as_uri()
    browser.open(url, width=800, height=600)
    found = "\n".join(browser.problems(url))
    assert "console.error: ['boom']" in found
    assert "exception:" in found
    assert "request: http://127.0.0.1:9/x.png" in found
