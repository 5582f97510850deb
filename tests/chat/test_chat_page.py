"""The chat page in a real browser: Debian's headless Chromium, driven over the DevTools
protocol. Sends a message, sees the streamed answer, keeps a screenshot in test-artifacts/."""
from __future__ import annotations

import base64
import json
import time

import pytest
import requests
from browser import browser  # noqa: F401 - the fixture
from chat_support import chat_api, chat_env, execution, expected_answer, save_artifact  # noqa: F401
from conftest import wait_for

pytestmark = pytest.mark.e2e


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
