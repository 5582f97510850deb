"""Clients that stall while sending a request, against a real `orchestrator api` process with
two threads: more of them than the API has threads must not stop it answering others. A stalled
body gets a 408 naming `body`, a stalled request line or headers a 408 naming `headers`, within
API_READ_TIMEOUT_SECONDS, and the connection is closed."""
from __future__ import annotations

import json
import os
import socket
import time
from typing import Iterator

import pytest
import requests

from conftest import FAST, embedded, serve_api

pytestmark = pytest.mark.e2e
THREADS = 2
READ_TIMEOUT = 1.0
STALLED = 3 * THREADS


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    from orchestrator.migrate import upgrade

    files = embedded(tmp_path_factory.mktemp("slow-clients"))
    upgrade(files["DATABASE_URL"])
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "API_"))}
    env = {**base, **FAST, **files, "API_THREADS": str(THREADS), "API_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT),
           "CHAT_HEARTBEAT_SECONDS": "0.5"}  # a stream learns soon that its client left
    yield from serve_api("slow-clients-api", env)


def stall(api: tuple[str, int], sent: bytes) -> socket.socket:
    """A connection that sends `sent` and then nothing more (it stays open)."""
    s = socket.create_connection(api, timeout=10)
    s.sendall(sent)
    return s


def answer(s: socket.socket, within: float) -> tuple[int | None, dict[str, object]]:
    """(status, JSON body) of what the server sends before it closes `s`: (None, {}) if it closes
    without a word; a read past `within` seconds fails the test."""
    s.settimeout(within)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except socket.timeout:
        pytest.fail(f"no answer and no close within {within} s; got {out[:200]!r}")
    except ConnectionResetError:
        pass
    finally:
        s.close()
    if not out:
        return None, {}
    head, _, body = out.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


BODY = (b"POST /pipeline HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{}")


def test_stalled_bodies_get_a_408_naming_the_body_and_do_not_block_other_requests(api):
    started = time.monotonic()
    stalled = [stall(api, BODY) for _ in range(STALLED)]
    time.sleep(0.3)  # every thread of the API is now reading a body that does not come
    healthz = requests.get(f"http://{api[0]}:{api[1]}/healthz", timeout=READ_TIMEOUT * 4 + 2)
    assert healthz.status_code < 500, healthz.text
    for s in stalled:
        status, body = answer(s, within=READ_TIMEOUT * STALLED / THREADS + 3)
        assert status == 408, (status, body)
        assert body["error"] == "invalid_input" and body["field"] == "body", body
        assert "API_READ_TIMEOUT_SECONDS" in str(body["message"]), body
    assert time.monotonic() - started < READ_TIMEOUT * STALLED / THREADS + 5


@pytest.mark.parametrize("sent", [b"POST /pipel", b"POST /pipeline HTTP/1.1\r\nHost: te"],
                         ids=["request line", "headers"])
def test_a_stalled_request_line_or_headers_get_a_408_and_do_not_block_other_requests(api, sent):
    stalled = [stall(api, sent) for _ in range(STALLED)]
    time.sleep(0.3)
    healthz = requests.get(f"http://{api[0]}:{api[1]}/healthz", timeout=READ_TIMEOUT * 4 + 2)
    assert healthz.status_code < 500, healthz.text
    for s in stalled:
        status, body = answer(s, within=READ_TIMEOUT * STALLED / THREADS + 3)
        assert status == 408 and body["field"] == "headers", (status, body)


def test_a_slow_body_that_keeps_coming_is_served(api):
    """The limit is on a pause, not on the whole body: bytes that keep arriving are read."""
    head = BODY[:-2].replace(b"Host: test\r\n", b"Host: test\r\nConnection: close\r\n")
    payload = json.dumps({"youtube_url": "not a url"}).encode().ljust(100)  # JSON, padded to 100 bytes
    s = stall(api, head)
    for i in range(0, len(payload), 25):
        time.sleep(READ_TIMEOUT * 0.6)
        s.sendall(payload[i:i + 25])
    status, body = answer(s, within=10)
    assert status is not None and status != 408, (status, body)


def test_open_streams_leave_threads_for_other_requests(api):
    """A chat event stream or WebSocket holds a thread while it is open: as many as the API has
    threads kept it from answering anything else (70 of them, /healthz too, for as long as they
    stayed). At most 3/4 of the threads serve streams (1 of 2 here); one more is a 503 with
    Retry-After, or a WebSocket closed with 1013, and its place is free again when it closes."""
    import struct

    import websocket

    base = f"http://{api[0]}:{api[1]}"
    session = requests.post(f"{base}/api/v1/chat/init", json={}, timeout=10).json()["session_id"]
    events = f"{base}/api/v1/chat/{session}/events"
    first = requests.get(events, stream=True, timeout=10)
    try:
        assert first.status_code == 200, first.text
        refused = requests.get(events, stream=True, timeout=10)
        assert refused.status_code == 503 and refused.headers["Retry-After"] == "5", refused.text
        assert refused.json()["error"] == "unavailable" and refused.json()["dependency"] == "streams"
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200  # a thread was left for it
        ws = websocket.create_connection(f"ws://{api[0]}:{api[1]}/ws/chat/{session}", timeout=10)
        try:
            opcode, frame = ws.recv_data_frame(True)
            assert opcode == websocket.ABNF.OPCODE_TEXT and json.loads(frame.data)["type"] == "error"
            assert json.loads(frame.data)["data"]["code"] == "busy", frame.data
            opcode, frame = ws.recv_data_frame(True)
            assert opcode == websocket.ABNF.OPCODE_CLOSE and struct.unpack("!H", frame.data[:2])[0] == 1013
        finally:
            ws.close()
    finally:
        first.close()

    def reopened() -> bool:
        r = requests.get(events, stream=True, timeout=10)
        r.close()
        return r.status_code == 200

    from conftest import wait_for

    wait_for(reopened, timeout=15, interval=0.5, what="the closed stream's place to be free again")
