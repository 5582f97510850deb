"""The durable callback path: callbacks the execution service adds to the Redis Stream
`chat:callbacks:<consumer_id>` while no API process reads it are delivered, once each, when one
starts again; an entry read by a consumer that died before acknowledging it is claimed by another;
a duplicated entry is applied once."""
from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
import redis
import requests
import websocket
from sqlalchemy.engine import make_url
from chat_support import (chat_env, execution, expected_answer, new_session, read_frames, send_task,  # noqa: F401
                          start_api, ws_url)
from conftest import REDIS, wait_for
from tcp_proxy import Proxy

pytestmark = pytest.mark.e2e
GROUP = "orchestrator-api"


@pytest.fixture
def durable_env(chat_env: dict[str, str]) -> dict[str, str]:
    """A consumer id of its own: no other test's API process reads this stream."""
    return {**chat_env, "CHAT_CONSUMER_ID": f"durable-{uuid.uuid4().hex[:8]}"}


def stream_of(env: dict[str, str]) -> str:
    return f"chat:callbacks:{env['CHAT_CONSUMER_ID']}"


def entries_of(r: redis.Redis, stream: str, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(eid, json.loads(f[b"data"])) for eid, f in r.xrange(stream)
            if b"data" in f and json.loads(f[b"data"]).get("task_id") == task_id]


def task_view(base: str, sid: str, task: str) -> dict[str, Any]:
    return requests.get(f"{base}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()


def whole_stream(base: str, sid: str) -> list[dict[str, Any]]:
    """Every frame of the session's stream, replayed from the database over the WebSocket."""
    last = requests.get(f"{base}/api/v1/chat/{sid}/status", timeout=5).json()["last_seq"]
    ws = websocket.create_connection(ws_url(base, sid, 0), timeout=10)
    try:
        return read_frames(ws, lambda f: f["seq"] == last)
    finally:
        ws.close()


def assert_answered_once(base: str, sid: str, task: str, message: str) -> None:
    t = task_view(base, sid, task)
    assert t["status"] == "completed" and t["chunks_received"] == 3, t
    assert t["result"]["text"] == expected_answer(message)
    frames = whole_stream(base, sid)
    assert [f["seq"] for f in frames] == list(range(1, len(frames) + 1))
    mine = [(f["type"], f["data"]["status"] if f["type"] == "status" else None) for f in frames
            if f["task_id"] == task]
    assert mine == [("status", "queued"), ("status", "running"), ("status", "streaming"), ("chunk", None),
                    ("chunk", None), ("chunk", None), ("result", None), ("status", "completed")], mine


def no_pending(r: redis.Redis, stream: str) -> bool:
    return r.xpending(stream, GROUP)["pending"] == 0


def test_callbacks_sent_while_no_api_process_listens_are_delivered_when_one_starts(
        durable_env, execution, sweeper, worker):
    env = durable_env
    r = redis.Redis.from_url(REDIS)
    stream = stream_of(env)
    # This process answers HTTP but runs no callback consumer: nothing reads the callbacks.
    front, base = start_api(env, name="chat-api-front", workers=1, CHAT_CALLBACK_CONSUMERS="0")
    listener = None
    try:
        sid = new_session(base)
        first = send_task(base, sid, "anyone home?")
        wait_for(lambda: len(entries_of(r, stream, first)) == 4, timeout=30, what="four callbacks on the stream")
        assert task_view(base, sid, first)["status"] == "queued"  # kept, not consumed

        listener, _ = start_api(env, name="chat-api-listener", workers=1, CHAT_CALLBACK_CLAIM_IDLE_SECONDS="1")
        wait_for(lambda: task_view(base, sid, first)["status"] == "completed", timeout=30,
                 what="the first task completed")
        wait_for(lambda: no_pending(r, stream), timeout=10, what="every entry acknowledged")
        assert_answered_once(base, sid, first, "anyone home?")

        # The listener dies (SIGKILL); its callbacks wait on the stream. One entry is read by a
        # consumer that then dies too before acknowledging it: it stays pending on that consumer.
        listener.kill()
        listener = None
        second = send_task(base, sid, "still there?")
        wait_for(lambda: len(entries_of(r, stream, second)) == 4, timeout=30, what="callbacks of the second task")
        read = r.xreadgroup(GROUP, "dead-consumer", {stream: ">"}, count=1)
        taken = json.loads(read[0][1][0][1][b"data"])
        assert (taken["task_id"], taken["seq"]) == (second, 1)
        assert r.xpending(stream, GROUP)["consumers"] == [{"name": b"dead-consumer", "pending": 1}]

        listener, _ = start_api(env, name="chat-api-listener-2", workers=1, CHAT_CALLBACK_CLAIM_IDLE_SECONDS="1")
        wait_for(lambda: task_view(base, sid, second)["status"] == "completed", timeout=30,
                 what="the second task completed, its first callback claimed from the dead consumer")
        wait_for(lambda: no_pending(r, stream), timeout=10, what="every entry acknowledged")
        assert_answered_once(base, sid, second, "still there?")
    finally:
        if listener is not None:
            listener.stop()
        front.stop()
        r.delete(stream)


def test_a_duplicated_stream_entry_is_applied_once(durable_env, execution, sweeper, worker):
    env = durable_env
    r = redis.Redis.from_url(REDIS)
    stream = stream_of(env)
    proc, base = start_api(env, name="chat-api-dup", workers=2)
    try:
        sid = new_session(base, {"emulator": {"silent": True}})  # we send the callbacks
        task = send_task(base, sid, "hello")

        def add(seq: int, type_: str, result: Any) -> None:
            r.xadd(stream, {"data": json.dumps({"session_id": sid, "task_id": task, "seq": seq, "type": type_,
                                                "result": result})})

        add(1, "chunk", {"text": "a"})
        add(1, "chunk", {"text": "a"})
        add(2, "result", {"text": "a"})
        add(2, "result", {"text": "a"})
        wait_for(lambda: task_view(base, sid, task)["status"] == "completed", timeout=20, what="completed")
        wait_for(lambda: no_pending(r, stream), timeout=10, what="every entry acknowledged")
        t = task_view(base, sid, task)
        assert t["chunks_received"] == 1 and t["result"] == {"text": "a"}
        kinds = [f["type"] for f in whole_stream(base, sid) if f["task_id"] == task and f["type"] != "status"]
        assert kinds == ["chunk", "result"]
    finally:
        proc.stop()
        r.delete(stream)


def test_callbacks_read_while_the_database_is_unreachable_are_kept_and_applied_once_it_is_back(
        durable_env, execution, sweeper, worker):
    env = durable_env
    r = redis.Redis.from_url(REDIS)
    stream = stream_of(env)
    url = make_url(env["DATABASE_URL"])
    gate = Proxy(url.host or "127.0.0.1", url.port or 5432).start()  # closed: an outage, reopened: back
    through_gate = url.set(host="127.0.0.1", port=gate.port).render_as_string(hide_password=False)
    front, base = start_api(env, name="chat-api-front-db", workers=1, CHAT_CALLBACK_CONSUMERS="0")
    listener, _ = start_api({**env, "DATABASE_URL": through_gate}, name="chat-api-gated", workers=1)
    try:
        wait_for(lambda: r.exists(stream) and r.xinfo_groups(stream), timeout=20, what="the consumer group")
        sid = new_session(base)
        gate.stop()  # the listener's database is unreachable from here on
        task = send_task(base, sid, "is the database there?")
        wait_for(lambda: len(entries_of(r, stream, task)) == 4, timeout=30, what="the callbacks on the stream")
        # the listener read them, could not store them, and keeps them pending
        wait_for(lambda: r.xpending(stream, GROUP)["pending"] >= 1, timeout=20, what="entries pending")
        wait_for(lambda: "the database is unavailable" in listener.output(), timeout=20, what="a failed store")
        assert task_view(base, sid, task)["status"] == "queued"
        gate.start()
        wait_for(lambda: task_view(base, sid, task)["status"] == "completed", timeout=60,
                 what="the task completed once the database is back")
        wait_for(lambda: no_pending(r, stream), timeout=20, what="every entry acknowledged")
        assert_answered_once(base, sid, task, "is the database there?")
        assert r.xlen(f"{stream}:dead") == 0
    finally:
        gate.stop()
        listener.stop()
        front.stop()
        r.delete(stream, f"{stream}:dead")


def test_a_final_callback_stored_by_a_process_that_died_before_completing_the_task_completes_it_on_redelivery(
        durable_env, execution, sweeper, worker, rt):
    from sagas.chat.settings import ChatSettings
    from sagas.chat.store import ChatStore, parse_callback

    env = durable_env
    r = redis.Redis.from_url(REDIS)
    stream = stream_of(env)
    proc, base = start_api(env, name="chat-api-redeliver", workers=1)
    try:
        sid = new_session(base, {"emulator": {"silent": True}})  # we send the callback
        task = send_task(base, sid, "hello")
        callback = json.dumps({"session_id": sid, "task_id": task, "seq": 1, "type": "result",
                               "result": {"text": "done"}})
        # What a consumer commits before it fires the task's events; it is killed right here, so
        # the events are never fired and the entry never acknowledged.
        stored = ChatStore(rt.engine, ChatSettings.from_settings(rt.settings)).accept_callback(
            parse_callback(callback))
        assert [e for e, _ in stored.events] == ["start", "complete"]
        assert task_view(base, sid, task)["status"] == "queued"
        r.xadd(stream, {"data": callback})  # the same entry, delivered again
        wait_for(lambda: task_view(base, sid, task)["status"] == "completed", timeout=20,
                 what="the redelivered duplicate completed the task")
        wait_for(lambda: no_pending(r, stream), timeout=10, what="the entry acknowledged")
        t = task_view(base, sid, task)
        assert t["result"] == {"text": "done"} and t["chunks_received"] == 0
        assert [f["type"] for f in whole_stream(base, sid) if f["type"] == "result"] == ["result"]
    finally:
        proc.stop()
        r.delete(stream)
