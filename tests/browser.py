"""A real headless Chromium, driven over the DevTools protocol, for tests that look at a page as a person would.

Only Debian's `chromium` and tornado's websocket client (tornado comes with dask.distributed) are needed: no
browser download, no driver. `chromium_path()` is None where Chromium is not installed (tests skip, saying so).
"""
from __future__ import annotations

import asyncio
import base64
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--remote-debugging-port=0",
         "--remote-allow-origins=*"]


def chromium_path() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageVisit:
    errors: list[str] = field(default_factory=list)   # console errors, uncaught exceptions, failed loads
    values: dict[str, Any] = field(default_factory=dict)  # the expressions evaluated after load, by name


def visit(url: str, expressions: dict[str, str], screenshot: Path | None = None, *, width: int = 1280,
          timeout: float = 60.0) -> PageVisit:
    """Open `url` in a fresh headless Chromium profile, wait for the load event, evaluate `expressions` (name ->
    JavaScript), optionally save a full-page PNG screenshot, and report every console error on the way."""
    binary = chromium_path()
    if binary is None:
        raise RuntimeError("chromium is not installed")
    profile = tempfile.mkdtemp(prefix="affectprep-chromium-")
    process = subprocess.Popen([binary, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},900",
                                "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port = _devtools_port(process, timeout)
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        page = next(t for t in targets if t["type"] == "page")
        return asyncio.run(asyncio.wait_for(_drive(page["webSocketDebuggerUrl"], url, expressions, screenshot,
                                                   width), timeout))
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(profile, ignore_errors=True)


def _devtools_port(process: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                break
            continue
        lines.append(line)
        found = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
        if found:
            return int(found.group(1))
    raise RuntimeError("chromium did not start its DevTools endpoint:\n" + "".join(lines[-20:]))


async def _drive(ws_url: str, url: str, expressions: dict[str, str], screenshot: Path | None,
                 width: int) -> PageVisit:
    from tornado.websocket import websocket_connect

    connection = await websocket_connect(ws_url, max_message_size=256 << 20)
    visit_result = PageVisit()
    pending: dict[int, asyncio.Future] = {}
    loaded = asyncio.get_running_loop().create_future()
    counter = iter(range(1, 1 << 30))

    async def reader() -> None:
        while True:
            message = await connection.read_message()
            if message is None:
                return
            event = json.loads(message)
            if "id" in event and event["id"] in pending:
                pending.pop(event["id"]).set_result(event)
            method, params = event.get("method"), event.get("params", {})
            if method == "Runtime.exceptionThrown":
                details = params["exceptionDetails"]
                visit_result.errors.append(details.get("exception", {}).get("description") or details["text"])
            elif method == "Runtime.consoleAPICalled" and params["type"] in ("error", "assert"):
                visit_result.errors.append(" ".join(str(a.get("value", a.get("description"))) for a in params["args"]))
            elif method == "Log.entryAdded" and params["entry"]["level"] == "error":
                visit_result.errors.append(params["entry"]["text"])
            elif method == "Page.loadEventFired" and not loaded.done():
                loaded.set_result(True)

    async def call(method: str, **params: Any) -> dict[str, Any]:
        ident = next(counter)
        pending[ident] = asyncio.get_running_loop().create_future()
        await connection.write_message(json.dumps({"id": ident, "method": method, "params": params}))
        answer = await pending[ident]
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    task = asyncio.create_task(reader())
    try:
        for domain in ("Page", "Runtime", "Log"):
            await call(f"{domain}.enable")
        await call("Page.navigate", url=url)
        await loaded
        for name, expression in expressions.items():
            result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            if "exceptionDetails" in result:
                visit_result.errors.append(f"{name}: {result['exceptionDetails']['text']}")
            visit_result.values[name] = result["result"].get("value")
        if screenshot is not None:
            metrics = await call("Page.getLayoutMetrics")
            height = int(metrics["cssContentSize"]["height"])
            shot = await call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                              clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        await asyncio.sleep(0.2)  # errors logged just after load still arrive
    finally:
        connection.close()
        task.cancel()
    return visit_result
