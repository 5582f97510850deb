"""Chat end to end over real processes: the API under gunicorn, the execution emulator as a
Celery worker, callbacks through Redis, a real WebSocket client."""
from __future__ import annotations

import json
import time

import pytest
import requests
import websocket
from chat_support import (chat_api, chat_env, execution, expected_answer, new_session, read_frames,  # noqa: F401
                          result_of, send_task, start_api, ws_url)
from conftest import wait_for

pytestmark = pytest.mark.e2e


def stream_of(frames: list[dict], task_id: str) -> list[dict]:
    return [f for f in frames if f["task_id"] == task_id]


def test_init_task_ordered_chunks_and_final_result(chat_api):
    r = requests.post(f"{chat_api}/api/v1/chat/init", json={"config": {"model": "m1"}, "user_id": "u-1"}, timeout=10)
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"session_id", "status", "created_at"} and body["status"] == "active"
    sid = body["session_id"]
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        task = send_task(chat_api, sid, "hello there")
        frames = read_frames(ws, result_of(task))
    finally:
        ws.close()
    seqs = [f["seq"] for f in frames]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # the session's stream: no gap, no repeat
    mine = stream_of(frames, task)
    assert [f["data"]["status"] for f in mine if f["type"] == "status"] == ["queued", "running", "streaming"]
    chunks = [f for f in mine if f["type"] == "chunk"]
    assert [c["data"]["index"] for c in chunks] == [0, 1, 2]
    assert "".join(c["data"]["text"] for c in chunks) == expected_answer("hello there")
    assert mine[-1]["type"] == "result" and mine[-1]["data"]["text"] == expected_answer("hello there")

    def completed():
        t = requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()
        return t if t["status"] == "completed" else None

    t = wait_for(completed, timeout=10, what="task completed")
    assert t["chunks_received"] == 3 and [c["seq"] for c in t["chunks"]] == [1, 2, 3]
    assert t["result"]["text"] == expected_answer("hello there") and t["message"] == "hello there"
    listing = requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks", timeout=5).json()
    assert listing["total"] == 1 and listing["tasks"][0]["task_id"] == task
    assert listing["tasks"][0]["chunks_received"] == 3 and listing["tasks"][0]["status"] == "completed"
    # the list shows the result the single read shows (it was null there)
    assert listing["tasks"][0]["result"] == t["result"] and listing["tasks"][0]["error"] is None
    status = requests.get(f"{chat_api}/api/v1/chat/{sid}/status", timeout=5).json()
    assert status["status"] == "active" and status["config"] == {"model": "m1"} and status["user_id"] == "u-1"
    assert status["tasks"] == 1 and status["recent_tasks"] == [task]
    saga = requests.get(f"{chat_api}/sagas/{task}", timeout=5).json()
    assert [h["to"] for h in saga["history"]] == ["queued", "running", "streaming", "completed"]


def test_reconnect_midway_resumes_without_gaps_or_duplicates(chat_api):
    sid = new_session(chat_api, {"emulator": {"chunks": 8, "delay": 0.25}})
    first = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    task = send_task(chat_api, sid, "a long answer please")
    got = read_frames(first, lambda f: f["type"] == "chunk" and f["data"]["index"] == 2)
    first.close()  # drop in the middle of the answer
    last = got[-1]["seq"]
    time.sleep(0.8)  # chunks keep coming while nobody listens
    again = websocket.create_connection(ws_url(chat_api, sid, after=last), timeout=10)
    try:
        rest = read_frames(again, result_of(task))
    finally:
        again.close()
    seqs = [f["seq"] for f in got + rest]
    assert seqs == list(range(1, len(seqs) + 1)), seqs
    chunks = [f["data"]["index"] for f in got + rest if f["type"] == "chunk"]
    assert chunks == list(range(8))
    assert rest[-1]["data"]["text"] == expected_answer("a long answer please", 8)


def test_resume_frame_replays_what_the_client_asks_for(chat_api):
    sid = new_session(chat_api)
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        send_task(chat_api, sid, "replay me")
        done = lambda f: f["type"] == "status" and f["data"]["status"] == "completed"  # noqa: E731
        frames = read_frames(ws, done)
        ws.send(json.dumps({"type": "resume", "after_seq": 2}))
        replay = read_frames(ws, done)
    finally:
        ws.close()
    assert replay == frames[2:]


def test_socket_on_one_api_task_through_another(chat_env, chat_api, execution):
    other, base2 = start_api(chat_env, name="chat-api-2", workers=1)
    try:
        sid = new_session(base2)
        ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
        try:
            task = send_task(base2, sid, "across replicas")
            frames = read_frames(ws, result_of(task))
        finally:
            ws.close()
        assert "".join(f["data"]["text"] for f in frames if f["type"] == "chunk") == expected_answer("across replicas")
        detailed = requests.get(f"{base2}/health/detailed", timeout=10).json()
        assert detailed["callback_consumers"]["all_replicas"] >= 2
    finally:
        other.stop()


def test_out_of_order_and_duplicated_callbacks_are_delivered_once_in_order(chat_api):
    sid = new_session(chat_api, {"emulator": {"chunks": 4, "shuffle": True, "delay": 0.02}})
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        task = send_task(chat_api, sid, "shuffled")
        frames = read_frames(ws, result_of(task))
        extra = []  # the duplicate must not come through
        quiet_until = time.monotonic() + 1.5
        while time.monotonic() < quiet_until:
            ws.settimeout(max(0.05, quiet_until - time.monotonic()))
            try:
                f = json.loads(ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            if f["type"] not in ("heartbeat", "status"):
                extra.append(f)
    finally:
        ws.close()
    assert [f["data"]["index"] for f in frames if f["type"] == "chunk"] == [0, 1, 2, 3]
    assert extra == []
    t = requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()
    assert t["chunks_received"] == 4 and t["status"] == "completed"


def test_server_sent_events_fallback(chat_api):
    sid = new_session(chat_api)
    task = send_task(chat_api, sid, "over sse")
    events = []
    with requests.get(f"{chat_api}/api/v1/chat/{sid}/events?after_seq=0", stream=True, timeout=20) as r:
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: "):
                f = json.loads(line[6:])
                events.append(f)
                if f["type"] == "result":
                    break
    assert [f["seq"] for f in events if f["type"] != "heartbeat"] == list(range(1, 8))
    assert events[-1]["task_id"] == task


def test_a_client_leaving_an_event_stream_leaves_no_error(chat_env, execution, sweeper):
    """The server finds the client gone at the next heartbeat and tears the request down once,
    without a traceback (it used to log BrokenPipeError and a context variable reset twice)."""
    proc, base = start_api(chat_env, name="chat-sse-leave", workers=1)

    def streams() -> int:
        return requests.get(f"{base}/health/detailed", timeout=5).json()["websockets"]["this_process"]

    try:
        sid = new_session(base)
        with requests.get(f"{base}/api/v1/chat/{sid}/events", stream=True, timeout=20) as r:
            assert r.status_code == 200
            wait_for(lambda: streams() == 1, timeout=20, what="the stream to attach")
        wait_for(lambda: streams() == 0, timeout=30, what="the server to notice the client left")
        out = proc.output()
        assert "Traceback" not in out and "already been used" not in out, out[-3000:]
    finally:
        proc.stop()


def test_health_endpoints(chat_api):
    basic = requests.get(f"{chat_api}/health/", timeout=5)
    assert basic.status_code == 200 and basic.json()["status"] == "healthy"
    assert requests.get(f"{chat_api}/health", timeout=10).json()["microservices"]  # the media one is kept
    sid = new_session(chat_api)
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        d = wait_for(lambda: (lambda j: j if j["websockets"]["all_replicas"] >= 1 else None)(
            requests.get(f"{chat_api}/health/detailed", timeout=10).json()), timeout=10, what="socket counted")
        assert d["status"] == "healthy", d
        assert {k: v["status"] for k, v in d["dependencies"].items()} == {
            "redis": "ok", "database": "ok", "broker": "ok", "result_backend": "ok"}
        assert d["callback_consumers"]["this_process"] >= 1 and d["uptime_seconds"] >= 0
        metrics = requests.get(f"{chat_api}/health/metrics", timeout=10).text
        assert metrics == requests.get(f"{chat_api}/metrics", timeout=10).text or "orchestrator_chat" in metrics
        assert "orchestrator_chat_websockets" in metrics and "orchestrator_chat_callbacks_total" in metrics
    finally:
        ws.close()


def test_a_retried_task_post_with_the_same_idempotency_key_is_one_task(chat_api):
    sid = new_session(chat_api)
    url = f"{chat_api}/api/v1/chat/{sid}/task"
    first = requests.post(url, json={"message": "once"}, headers={"Idempotency-Key": "k-1"}, timeout=10)
    again = requests.post(url, json={"message": "once"}, headers={"Idempotency-Key": "k-1"}, timeout=10)
    assert first.status_code == again.status_code == 202
    assert first.json()["task_id"] == again.json()["task_id"]
    other = new_session(chat_api)  # the key is scoped to its session
    third = requests.post(f"{chat_api}/api/v1/chat/{other}/task", json={"message": "once"},
                          headers={"Idempotency-Key": "k-1"}, timeout=10)
    assert third.status_code == 202 and third.json()["task_id"] != first.json()["task_id"]
    assert requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks", timeout=5).json()["total"] == 1


def test_an_execution_error_reaches_the_client_and_fails_the_task(chat_api):
    sid = new_session(chat_api, {"emulator": {"failure_rate": 1.0, "chunks": 2}})
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        task = send_task(chat_api, sid, "please fail")
        frames = read_frames(ws, lambda f: f["type"] == "status" and f["data"]["status"] == "failed")
    finally:
        ws.close()
    assert [f["type"] for f in frames] == ["status", "status", "status", "chunk", "chunk", "error", "status"]
    error = frames[-2]
    assert error["task_id"] == task and error["seq"] == 6 and error["data"]["code"] == "execution_failed"
    t = wait_for(lambda: (lambda j: j if j["status"] == "failed" else None)(
        requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()), timeout=10, what="failed")
    assert t["error"]["code"] == "execution_failed" and t["result"] is None and t["chunks_received"] == 2
    listed = requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks", timeout=5).json()["tasks"]
    assert [(x["task_id"], x["error"], x["result"]) for x in listed] == [(task, t["error"], None)]
