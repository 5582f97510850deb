"""100 concurrent sessions, each with its own socket and task: every client gets exactly its own
chunks, in order, within a bounded time."""
from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import websocket
from chat_support import (chat_env, execution, expected_answer, new_session, read_frames, result_of,  # noqa: F401
                          send_task, start_api, ws_url)

pytestmark = pytest.mark.e2e
SESSIONS = 100


def test_100_concurrent_sessions_each_get_exactly_their_own_chunks(chat_env, execution, sweeper):
    # Room for every socket in each worker: which worker accepts a socket is a race, a worker
    # queues what its threads cannot take, and streams may hold 3/4 of its threads (docs/chat.md,
    # "Production server"): so 4/3 of the sockets, and a little more.
    proc, base = start_api(chat_env, name="chat-api-load", workers=2, API_THREADS=str(SESSIONS * 4 // 3 + 2))
    ready = threading.Barrier(SESSIONS, timeout=60)

    def client(i: int) -> tuple[str, str, list[dict]]:
        message = f"client {i} {uuid.uuid4().hex[:8]}"
        sid = new_session(base)
        ws = websocket.create_connection(ws_url(base, sid), timeout=30)
        try:
            ready.wait()  # every socket is open before any task is sent
            task = send_task(base, sid, message)
            return message, task, read_frames(ws, result_of(task), timeout=90)
        finally:
            ws.close()

    try:
        started = time.monotonic()
        with ThreadPoolExecutor(SESSIONS) as pool:
            results = list(pool.map(client, range(SESSIONS)))
        elapsed = time.monotonic() - started
    finally:
        proc.stop()
    assert len({task for _, task, _ in results}) == SESSIONS
    for message, task, frames in results:
        assert {f["task_id"] for f in frames} == {task}, frames
        assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
        chunks = [f for f in frames if f["type"] == "chunk"]
        assert [c["data"]["index"] for c in chunks] == [0, 1, 2]
        assert "".join(c["data"]["text"] for c in chunks) == expected_answer(message)
        assert frames[-1]["type"] == "result" and frames[-1]["data"]["text"] == expected_answer(message)
    assert elapsed < 120, f"100 sessions took {elapsed:.1f}s"
    print(f"100 sessions answered in {elapsed:.1f}s")
