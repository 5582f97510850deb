"""The chat page in a real browser: Debian's headless Chromium, driven over the DevTools
protocol. Sends a message, sees the streamed answer, keeps a screenshot in test-artifacts/."""
from __future__ import annotations

import base64
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
from chat_support import chat_api, chat_env, execution, expected_answer, free_port, save_artifact  # noqa: F401
from conftest import wait_for

pytestmark = pytest.mark.e2e
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


class DevTools:
    """The smallest client of the Chrome DevTools Protocol that the test needs."""

    def __init__(self, ws_url: str) -> None:
        self.ws = websocket.create_connection(ws_url, timeout=20, suppress_origin=True)
        self.ids = itertools.count(1)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                if "error" in msg:
                    raise AssertionError(f"{method}: {msg['error']}")
                return msg["result"]

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
                             "--window-size=1000,700", "about:blank"],
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


def test_chat_page_streams_the_answer_in_chromium(chat_api, browser):
    assert requests.get(f"{chat_api}/chat", timeout=5).headers["Content-Type"].startswith("text/html")
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{chat_api}/chat")
    wait_for(lambda: browser.eval("document.getElementById('send') && !document.getElementById('send').disabled"),
             timeout=30, interval=0.2, what="the page to open a session and its socket")
    message = "hello from chromium"
    browser.eval(f"document.getElementById('input').value = {json.dumps(message)};"
                 "document.getElementById('send').click(); true")
    expected = expected_answer(message)
    got = wait_for(lambda: browser.eval("(document.querySelector('.answer.done') || {}).textContent || ''"),
                   timeout=30, interval=0.2, what="the streamed answer on the page")
    assert got == expected
    assert "you: " + message in browser.eval("document.getElementById('log').innerText")
    assert "completed" in browser.eval("document.getElementById('status').textContent")
    time.sleep(0.2)
    shot = browser.call("Page.captureScreenshot", format="png")
    path = save_artifact("chat-page.png", base64.b64decode(shot["data"]))
    assert path.stat().st_size > 1000
