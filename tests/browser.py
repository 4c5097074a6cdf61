"""Render a local HTML file in headless Chromium and report what a reader would see.

Chromium is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON
messages on file descriptors 3 and 4, each ending with a NUL byte), so no driver, websocket
library or network port is needed. The flags keep Chromium off the network entirely.
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-default-apps", "--disable-extensions", "--mute-audio", "--remote-debugging-pipe")


def find_chromium() -> str | None:
    """Path of Debian's chromium (or another Chrome) on this machine, or None."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@dataclass
class PageResult:
    """What the page did: images (src prefix, complete, natural size), errors, a screenshot."""

    images: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    title: str = ""
    screenshot: bytes = b""


class _Pipe:
    def __init__(self, proc: subprocess.Popen, write_fd: int, read_fd: int):
        self.proc, self.write_fd, self.read_fd = proc, write_fd, read_fd
        self.next_id = 0
        self.buffer = b""
        self.events: list[dict] = []

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0) -> dict:
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self.write_fd, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read_one(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)
        raise TimeoutError(f"no reply to {method} within {timeout} s")

    def wait_event(self, method: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for i, ev in enumerate(self.events):
                if ev.get("method") == method:
                    return self.events.pop(i)
            self.events.append(self._read_one(deadline))
        raise TimeoutError(f"no {method} within {timeout} s")

    def _read_one(self, deadline: float) -> dict:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TimeoutError(f"chromium stopped answering (exit code {self.proc.poll()})")
            chunk = os.read(self.read_fd, 1 << 20)
            if not chunk:
                raise RuntimeError(f"chromium closed the pipe (exit code {self.proc.poll()})")
            self.buffer += chunk
        raw, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(raw)


IMAGES_JS = ("JSON.stringify({title: document.title, images: Array.from(document.images).map(i => "
             "({src: i.src.slice(0, 40), complete: i.complete, width: i.naturalWidth, height: i.naturalHeight, "
             "titles: JSON.parse(i.dataset.titlePx || 'null')}))})")


def render(html_file: Path, profile_dir: Path, chromium: str, width: int = 1300, timeout: float = 90.0) -> PageResult:
    """Open ``html_file`` in headless Chromium; collect images, script errors, requests, a screenshot."""
    profile_dir.mkdir(parents=True, exist_ok=True)
    to_chrome_r, to_chrome_w = os.pipe()
    from_chrome_r, from_chrome_w = os.pipe()
    # Chromium reads commands on fd 3 and writes replies on fd 4
    proc = subprocess.Popen(
        [chromium, *FLAGS, f"--user-data-dir={profile_dir}", f"--window-size={width},1000", "about:blank"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(profile_dir / "chromium.log").open("wb"),
        pass_fds=(3, 4), preexec_fn=_wire_fds(to_chrome_r, from_chrome_w),
    )
    os.close(to_chrome_r)
    os.close(from_chrome_w)
    pipe = _Pipe(proc, to_chrome_w, from_chrome_r)
    result = PageResult()
    try:
        target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
        session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            pipe.send(f"{domain}.enable", session=session)
        pipe.send("Page.navigate", {"url": html_file.resolve().as_uri()}, session=session)
        pipe.wait_event("Page.loadEventFired", timeout=timeout)
        info = json.loads(pipe.send("Runtime.evaluate", {"expression": IMAGES_JS, "returnByValue": True},
                                    session=session)["result"]["value"])
        result.images, result.title = info["images"], info["title"]
        height = int(pipe.send("Runtime.evaluate", {"expression": "document.documentElement.scrollHeight",
                                                   "returnByValue": True}, session=session)["result"]["value"])
        shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                    "clip": {"x": 0, "y": 0, "width": width, "height": min(height, 16000),
                                                             "scale": 0.5}}, session=session, timeout=timeout)
        result.screenshot = base64.b64decode(shot["data"])
        for ev in pipe.events:
            method, params = ev.get("method"), ev.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                result.errors.append(f"{details.get('text', 'exception')} "
                                     f"{details.get('exception', {}).get('description', '')}".strip())
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                result.errors.append(params["entry"].get("text", ""))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                result.errors.append(" ".join(str(a.get("value")) for a in params.get("args", [])))
            elif method == "Network.requestWillBeSent":
                url = params["request"]["url"]
                result.requests.append(url[:60] if url.startswith("data:") else url)
        try:
            pipe.send("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError):
            pass  # Chromium may close the pipe before answering; it is killed below anyway
    finally:
        os.close(to_chrome_w)
        os.close(from_chrome_r)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
    return result


def _wire_fds(read_end: int, write_end: int):
    """A preexec function putting the pipe ends on fds 3 (commands) and 4 (replies) in the child."""
    def wire():
        # move both ends above 4 first, so placing one cannot overwrite the other
        high_read = fcntl.fcntl(read_end, fcntl.F_DUPFD, 10)
        high_write = fcntl.fcntl(write_end, fcntl.F_DUPFD, 10)
        os.dup2(high_read, 3)
        os.dup2(high_write, 4)
    return wire
