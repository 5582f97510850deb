"""Headless Chromium driven over the DevTools protocol, for the browser tests (the chat page,
the operator console): Debian's `chromium`, installed by `bash .ci/browser`."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from typing import Any

import pytest
import requests
import websocket
from conftest import wait_for
from orchestrator.entrypoints.ports import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class DevTools:
    """The smallest client of the Chrome DevTools Protocol that the test needs."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self.ids = itertools.count(1)
        #: The events (a domain enabled, e.g. Page.enable) received while waiting for answers.
        self.events: list[dict[str, Any]] = []

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if "method" in msg:
                self.events.append(msg)
            elif msg.get("id") == ident:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

    def event(self, method: str, timeout: float = 30.0) -> dict[str, Any]:
        """The params of the first event `method` not yet taken, waiting up to `timeout` seconds
        for it (AssertionError then)."""
        end = time.monotonic() + timeout
        while True:
            for n, msg in enumerate(self.events):
                if msg["method"] == method:
                    del self.events[n]
                    return msg.get("params", {})  # type: ignore[no-any-return]
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {method} event within {timeout} s")
            self.ws.settimeout(left)
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                continue
            finally:
                self.ws.settimeout(20)
            if "method" in msg:
                self.events.append(msg)

    def eval(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            raise AssertionError(f"{expression}: {out['exceptionDetails']}")
        return out["result"].get("value")


@pytest.fixture
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.fail("chromium is not installed: run `bash .ci/browser` (make test does)")
    port = free_port()
    profile = tempfile.mkdtemp(prefix="chat-chromium-")
    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking", "--disable-component-update",
                             "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                             f"--remote-debugging-port={port}", "--remote-allow-origins=*",
                             "--window-size=1200,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def page_target():
        try:
            targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
        except (requests.RequestException, ValueError):
            return None
        return next((t for t in targets if t.get("type") == "page"), None)

    try:
        target = wait_for(page_target, timeout=60, interval=0.3, what="chromium's DevTools endpoint")
        tools = DevTools(target["webSocketDebuggerUrl"])
        yield tools
        tools.ws.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(profile, ignore_errors=True)
