"""Headless Chromium driven over the DevTools protocol on a pipe (no extra packages, no network port).

`render(path)` opens a local HTML file in a fresh browser profile and returns what a person and a
network monitor would see: a full-page PNG screenshot, every request the page made (from the page's
own Network events, so the browser's background traffic does not count), and a few layout facts.
Host-name resolution is mapped to nothing, so even a page that tried could not reach the outside.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

WIDTH, HEIGHT = 1366, 900  # a common laptop viewport


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class Rendered:
    png: bytes
    requests: list[str]  # URLs the page requested, the document itself included
    layout: dict


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int) -> None:
        self.proc, self.w, self.r = proc, write_fd, read_fd
        self.buf, self.next_id, self.events = b"", 0, []

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout_s: float = 60) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        while True:
            reply = self._read(timeout_s)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_event(self, method: str, session: str, timeout_s: float = 60) -> dict:
        for i, e in enumerate(self.events):
            if e.get("method") == method and e.get("sessionId") == session:
                return self.events.pop(i)
        while True:
            e = self._read(timeout_s)
            if e.get("method") == method and e.get("sessionId") == session:
                return e
            self.events.append(e)

    def _read(self, timeout_s: float) -> dict:
        deadline = time.monotonic() + timeout_s
        while b"\0" not in self.buf:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError("no answer from chromium")
            try:
                chunk = os.read(self.r, 1 << 20)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buf += chunk
        raw, _, self.buf = self.buf.partition(b"\0")
        return json.loads(raw)


def render(path: Path, width: int = WIDTH, height: int = HEIGHT, timeout_s: float = 90) -> Rendered:
    """Open `path` in headless Chromium; screenshot the whole page and list the page's requests."""
    exe = chromium()
    assert exe, "chromium is not installed"
    to_child_r, to_child_w = os.pipe()
    from_child_r, from_child_w = os.pipe()
    to_child_r, from_child_w = _above_4(to_child_r), _above_4(from_child_w)  # moving them to 3 and 4 then overwrites neither
    profile = tempfile.mkdtemp(prefix="finetrack-chromium-")
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-default-apps",
        "--no-pings",
        "--host-resolver-rules=MAP * ~NOTFOUND",
        f"--user-data-dir={profile}",
        "--remote-debugging-pipe",
        "about:blank",
    ]
    # the DevTools pipe is the browser's fds 3 (commands in) and 4 (replies out): bash puts ours there
    redirect = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w} {to_child_r}<&- {from_child_w}>&-'
    proc = subprocess.Popen(
        ["bash", "-c", redirect, exe, *flags],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(to_child_r, from_child_w),
    )
    os.close(to_child_r)
    os.close(from_child_w)
    os.set_blocking(from_child_r, False)
    pipe = _Pipe(proc, to_child_w, from_child_r)
    try:
        target = pipe.call("Target.createTarget", {"url": "about:blank"}, timeout_s=timeout_s)["targetId"]
        session = pipe.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for method in ("Network.enable", "Page.enable", "Runtime.enable"):
            pipe.call(method, session=session)
        pipe.call(
            "Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session
        )
        pipe.call("Page.navigate", {"url": Path(path).resolve().as_uri()}, session)
        pipe.wait_event("Page.loadEventFired", session, timeout_s)
        time.sleep(0.5)  # a page that fetched after load would show it here
        layout = pipe.call("Runtime.evaluate", {"expression": LAYOUT_JS, "returnByValue": True}, session)["result"]["value"]
        size = pipe.call("Page.getLayoutMetrics", session=session)["cssContentSize"]
        shot = pipe.call(
            "Page.captureScreenshot",
            {
                "format": "png",
                "captureBeyondViewport": True,
                "clip": {"x": 0, "y": 0, "width": width, "height": size["height"], "scale": 1},
            },
            session,
        )
        requests = [
            e["params"]["request"]["url"]
            for e in pipe.events
            if e.get("method") == "Network.requestWillBeSent" and e.get("sessionId") == session
        ]
        try:
            pipe.call("Browser.close", timeout_s=10)
        except (RuntimeError, TimeoutError):
            pass
        return Rendered(base64.b64decode(shot["data"]), requests, layout)
    finally:
        os.close(to_child_w)
        os.close(from_child_r)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


def _above_4(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


# What "readable on a laptop screen" means, measured in the page: no sideways scrolling, charts wide
# enough to read, text not tiny.
LAYOUT_JS = """(() => {
  const charts = [...document.querySelectorAll('svg.chart')].map(s => s.getBoundingClientRect());
  const body = getComputedStyle(document.body);
  return {
    scroll_width: document.documentElement.scrollWidth, inner_width: window.innerWidth,
    num_charts: charts.length, min_chart_width: Math.min(...charts.map(r => r.width)),
    font_px: parseFloat(body.fontSize), num_details: document.querySelectorAll('details').length,
    num_open_details: document.querySelectorAll('details[open]').length,
  };
})()"""
