"""Bad input never gets a 5xx nor crashes a consumer: unknown sessions, bad messages, malformed
callbacks, sockets for deleted sessions, tasks the execution service never answers."""
from __future__ import annotations

import json
import struct
import time

import pytest
import redis
import requests
import websocket
from chat_support import (chat_api, chat_env, execution, expected_answer, new_session, read_frames,  # noqa: F401
                          result_of, send_task, start_api, ws_url)
from conftest import REDIS, wait_for

pytestmark = pytest.mark.e2e
UNKNOWN = "00000000-0000-0000-0000-000000000000"


def frames_until_close(ws: websocket.WebSocket, timeout: float = 10) -> tuple[list[dict], int | None]:
    """Data frames up to the server's close frame, and its close code."""
    frames: list[dict] = []
    ws.settimeout(timeout)
    while True:
        opcode, frame = ws.recv_data_frame(True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            code = struct.unpack("!H", frame.data[:2])[0] if len(frame.data) >= 2 else None
            return frames, code
        if opcode == websocket.ABNF.OPCODE_TEXT:
            f = json.loads(frame.data)
            if f["type"] != "heartbeat":
                frames.append(f)


def test_unknown_session_is_404_everywhere(chat_api):
    for method, path, body in (("get", f"/api/v1/chat/{UNKNOWN}/status", None),
                               ("delete", f"/api/v1/chat/{UNKNOWN}", None),
                               ("post", f"/api/v1/chat/{UNKNOWN}/task", {"message": "hi"}),
                               ("get", f"/api/v1/chat/{UNKNOWN}/tasks", None),
                               ("get", f"/api/v1/chat/{UNKNOWN}/tasks/{UNKNOWN}", None),
                               ("get", f"/api/v1/chat/{UNKNOWN}/events", None)):
        r = requests.request(method, f"{chat_api}{path}", json=body, timeout=10)
        assert r.status_code == 404, (method, path, r.text)
        assert r.json()["error"] == "not_found" and UNKNOWN in r.json()["message"]
    sid = new_session(chat_api)
    r = requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{UNKNOWN}", timeout=10)
    assert r.status_code == 404 and "task" in r.json()["message"]


@pytest.mark.parametrize("body, status, field, words", [
    ({"message": ""}, 400, "message", "must not be empty"),
    ({"message": "   \n "}, 400, "message", "must not be empty"),
    ({}, 400, "message", "is required"),
    ({"message": 42}, 400, "message", "must be a string"),
    ({"message": "x" * 4001}, 413, "message", "at most 4000 characters"),
    ({"message": "hi", "extra": 1}, 400, "extra", "unknown field"),
    ([1, 2], 400, "body", "JSON object"),
])
def test_bad_task_bodies_name_the_field_and_the_limit(chat_api, body, status, field, words):
    sid = new_session(chat_api)
    r = requests.post(f"{chat_api}/api/v1/chat/{sid}/task", json=body, timeout=10)
    assert r.status_code == status, r.text
    assert r.json()["field"] == field and words in r.json()["message"]


def test_the_longest_allowed_message_is_accepted(chat_api):
    sid = new_session(chat_api)
    send_task(chat_api, sid, "y" * 4000)


@pytest.mark.parametrize("raw, field", [
    ('{"config": [1]}', "config"),
    ('{"user_id": 7}', "user_id"),
    ('{"colour": "red"}', "colour"),
    ('{"config": {"big": "' + "z" * 17000 + '"}}', "config"),
    ("not json", "body"),
])
def test_bad_session_requests(chat_api, raw, field):
    r = requests.post(f"{chat_api}/api/v1/chat/init", data=raw, headers={"Content-Type": "application/json"},
                      timeout=10)
    assert 400 <= r.status_code < 500 and r.json()["field"] == field, r.text


def test_init_without_a_body_opens_a_session(chat_api):
    r = requests.post(f"{chat_api}/api/v1/chat/init", timeout=10)
    assert r.status_code == 201 and r.json()["status"] == "active"


def _outcomes(base: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in requests.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith("orchestrator_chat_callbacks_total{"):
            label = line.split('outcome="')[1].split('"')[0]
            out[label] = out.get(label, 0) + float(line.rsplit(" ", 1)[1])
    return out


def test_malformed_and_unknown_callbacks_are_rejected_and_the_consumer_keeps_going(chat_api, chat_env):
    sid = new_session(chat_api)
    r = redis.Redis.from_url(REDIS)
    channel = f"callback:{chat_env['CHAT_CONSUMER_ID']}"
    before = _outcomes(chat_api)
    for raw in ("not json", "[1, 2]", json.dumps({"session_id": sid, "task_id": "t", "seq": "one",
                                                    "type": "chunk", "result": {}}),
                json.dumps({"session_id": sid, "task_id": "t", "seq": 1, "type": "banana", "result": {}}),
                json.dumps({"session_id": sid, "task_id": "t", "seq": 1, "type": "chunk"})):
        assert r.publish(channel, raw) >= 1
    r.publish(channel, json.dumps({"session_id": UNKNOWN, "task_id": UNKNOWN, "seq": 1, "type": "chunk",
                                   "result": {"text": "x"}}))
    r.publish(channel, json.dumps({"session_id": sid, "task_id": UNKNOWN, "seq": 1, "type": "chunk",
                                   "result": {"text": "x"}}))

    def counted():
        now = _outcomes(chat_api)
        grown = {k: now.get(k, 0) - before.get(k, 0) for k in ("malformed", "unknown_session", "unknown_task")}
        return grown if grown["malformed"] >= 5 and grown["unknown_session"] >= 1 and grown["unknown_task"] >= 1 \
            else None

    wait_for(counted, timeout=10, what="rejections counted")
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:  # the consumer still works, and nothing of the rejected callbacks reached the stream
        task = send_task(chat_api, sid, "still alive")
        frames = read_frames(ws, result_of(task))
    finally:
        ws.close()
    assert {f["task_id"] for f in frames} == {task}
    assert frames[-1]["data"]["text"] == expected_answer("still alive")
    # a late callback for a finished task is refused too
    r.publish(channel, json.dumps({"session_id": sid, "task_id": task, "seq": 9, "type": "chunk", "result": {}}))
    wait_for(lambda: _outcomes(chat_api).get("task_finished", 0) >= 1, timeout=10, what="late callback refused")
    assert requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()["chunks_received"] == 3


def test_unstorable_text_in_requests_and_callbacks_is_refused_naming_the_field(chat_api, chat_env):
    sid = new_session(chat_api, {"emulator": {"silent": True}})  # the task waits for our callbacks
    for body, field in (({"config": {"persona": "a\u0000b"}}, "config.persona"),
                        ({"user_id": "\ud800"}, "user_id")):
        r = requests.post(f"{chat_api}/api/v1/chat/init", json=body, timeout=10)
        assert r.status_code == 400 and r.json()["field"] == field, r.text
    for message in ("a\u0000b", "\ud800"):
        r = requests.post(f"{chat_api}/api/v1/chat/{sid}/task", json={"message": message}, timeout=10)
        assert r.status_code == 400 and r.json()["field"] == "message", r.text
    task = send_task(chat_api, sid, "hello")
    r = redis.Redis.from_url(REDIS)
    channel = f"callback:{chat_env['CHAT_CONSUMER_ID']}"
    before = _outcomes(chat_api)

    def callback(result):
        return json.dumps({"session_id": sid, "task_id": task, "seq": 1, "type": "chunk", "result": result})

    for raw in (callback({"text": "a\u0000b"}), callback({"text": "\udfff"}), callback({"bad\u0000": 1}),
                callback({"text": "x"}).replace('"x"', '"\xff"').encode("latin-1")):  # not UTF-8
        assert r.publish(channel, raw) >= 1
    r.publish(channel, callback({"text": "fine"}))
    wait_for(lambda: _outcomes(chat_api).get("malformed", 0) - before.get("malformed", 0) >= 4, timeout=10,
             what="four malformed callbacks counted")
    t = wait_for(lambda: (lambda b: b if b["chunks_received"] == 1 else None)(
        requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()), timeout=10,
        what="the good callback stored")
    assert _outcomes(chat_api).get("error", 0) == before.get("error", 0)
    assert "fine" in json.dumps(t)


def test_socket_of_a_deleted_session_gets_an_error_frame_and_is_closed(chat_api):
    sid = new_session(chat_api)
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    time.sleep(0.3)
    r = requests.delete(f"{chat_api}/api/v1/chat/{sid}", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "deleted"
    frames, code = frames_until_close(ws)
    assert code == 4410 and frames[-1]["type"] == "error" and frames[-1]["data"]["code"] == "session_deleted"
    ws.close()
    again = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    frames, code = frames_until_close(again)
    again.close()
    assert code == 4404 and frames == [{"type": "error", "task_id": None, "seq": None,
                                        "data": {"code": "session_not_found",
                                                 "message": f"chat session {sid} not found"}}]
    assert requests.get(f"{chat_api}/api/v1/chat/{sid}/status", timeout=10).status_code == 404
    assert requests.post(f"{chat_api}/api/v1/chat/{sid}/task", json={"message": "hi"}, timeout=10).status_code == 404
    assert requests.delete(f"{chat_api}/api/v1/chat/{sid}", timeout=10).status_code == 404


def test_delete_refuses_an_x_actor_over_128_characters_and_keeps_the_session(chat_api):
    sid = new_session(chat_api)
    r = requests.delete(f"{chat_api}/api/v1/chat/{sid}", headers={"X-Actor": "x" * 129}, timeout=10)
    assert r.status_code == 400 and r.json()["field"] == "X-Actor", r.text
    assert requests.get(f"{chat_api}/api/v1/chat/{sid}/status", timeout=10).status_code == 200
    r = requests.delete(f"{chat_api}/api/v1/chat/{sid}", headers={"X-Actor": "x" * 128}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "deleted", r.text


@pytest.mark.parametrize("tail, field", [
    ("?after_seq=%FF", "after_seq"),  # not UTF-8: the handshake was refused with an HTTP 400
    ("?after_seq=0&after_seq=1", "after_seq"),  # given twice
    ("?after_seq=1%00", "after_seq"),  # a NUL
])
def test_a_bad_socket_url_is_an_error_frame_naming_the_field(chat_api, tail, field):
    """A browser cannot read the body of a refused handshake: the socket opens and says why."""
    ws = websocket.create_connection(ws_url(chat_api, new_session(chat_api)) + tail, timeout=10)
    frames, code = frames_until_close(ws)
    ws.close()
    assert code == 4400 and frames[0]["type"] == "error", (code, frames)
    assert frames[0]["data"]["code"] == "bad_request" and frames[0]["data"]["field"] == field, frames


def test_bad_socket_query_and_bad_client_frames(chat_api):
    sid = new_session(chat_api)
    ws = websocket.create_connection(ws_url(chat_api, sid) + "?after_seq=-3", timeout=10)
    frames, code = frames_until_close(ws)
    ws.close()
    assert code == 4400 and frames[0]["data"]["field"] == "after_seq"
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        for raw, words in (("nonsense", "JSON objects"), ('{"type": "dance"}', "unknown client frame"),
                           ('{"type": "resume", "after_seq": "x"}', "after_seq"),
                           ("[" * 100, "JSON objects"),  # parses: not an object
                           ("[" * 1000, "JSON objects"), ("[" * 50_000, "JSON objects"),  # past the parser's depth
                           ('{"a": ' + "[" * 1000 + "]" * 1000 + "}", "JSON objects")):
            ws.send(raw)
            f = read_frames(ws, lambda f: True)[0]
            assert f["type"] == "error" and f["data"]["code"] == "bad_frame" and words in f["data"]["message"]
        ws.send('{"type": "ping"}')  # still open and answering
        ws.settimeout(5)
        assert json.loads(ws.recv())["type"] == "heartbeat"
    finally:
        ws.close()


@pytest.mark.parametrize("size", [64 * 1024 + 1, 200 * 1024, 1024 * 1024 - 100])
def test_a_client_frame_over_64_kib_is_closed_with_1009_and_a_reason(chat_api, size):
    """The limit is the whole message's: a client frame of exactly 64 KiB is read, one byte more
    closes the socket with 1009 (message too big) and a reason, not a reset connection."""
    sid = new_session(chat_api)
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        ws.send('{"type": "ping", "pad": "' + "x" * (64 * 1024 - 30) + '"}')  # 64 KiB: accepted
        ws.settimeout(5)
        assert json.loads(ws.recv())["type"] == "heartbeat"
        ws.send('{"type": "ping", "pad": "' + "x" * size + '"}')
        frames, code = frames_until_close(ws)
        assert code == 1009, (code, frames)
        assert frames[-1]["type"] == "error" and frames[-1]["data"]["code"] == "frame_too_big", frames
        assert "65536" in frames[-1]["data"]["message"], frames
    finally:
        ws.close()
    assert requests.get(f"{chat_api}/api/v1/chat/{sid}/status", timeout=10).status_code == 200


def test_a_client_frame_over_the_socket_librarys_1_mib_cap_is_dropped_with_1009_or_a_reset(chat_api):
    """Above 1 MiB simple-websocket stops reading: it sends its own close 1009 and drops the
    connection with the rest unread, so the client sees the close or a reset (docs/chat.md);
    the session and the server are unharmed."""
    sid = new_session(chat_api)
    ws = websocket.create_connection(ws_url(chat_api, sid), timeout=10)
    try:
        ws.send('{"type": "ping", "pad": "' + "x" * (4 * 1024 * 1024) + '"}')
        frames, code = frames_until_close(ws)
        assert code == 1009 and frames == [], (code, frames)
    except (ConnectionResetError, BrokenPipeError, websocket.WebSocketConnectionClosedException):
        pass
    finally:
        ws.close()
    assert requests.get(f"{chat_api}/api/v1/chat/{sid}/status", timeout=10).status_code == 200


def test_a_task_the_execution_service_never_answers_times_out(chat_env, execution, sweeper, worker):
    proc, base = start_api(chat_env, name="chat-api-timeout", workers=1, CHAT_TASK_TIMEOUT_SECONDS="1.5")
    try:
        sid = new_session(base, {"emulator": {"silent": True}})
        ws = websocket.create_connection(ws_url(base, sid), timeout=10)
        try:
            task = send_task(base, sid, "anyone there?")
            frames = read_frames(ws, lambda f: f["type"] == "status" and f["data"]["status"] == "timed_out",
                                 timeout=30)
        finally:
            ws.close()
        assert [f["data"]["status"] for f in frames] == ["queued", "timed_out"]
        t = requests.get(f"{base}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()
        assert t["status"] == "timed_out" and "timed out" in t["error"]
    finally:
        proc.stop()


def test_hostile_stream_entries_are_rejected_acknowledged_and_the_next_valid_one_delivered(chat_api, chat_env):
    sid = new_session(chat_api, {"emulator": {"silent": True}})  # the task waits for our callbacks
    task = send_task(chat_api, sid, "hello")
    r = redis.Redis.from_url(REDIS)
    stream = f"chat:callbacks:{chat_env['CHAT_CONSUMER_ID']}"
    before = _outcomes(chat_api)

    def callback(**over):
        return json.dumps({"session_id": sid, "task_id": task, "seq": 1, "type": "chunk", "result": {"t": 1}, **over})

    hostile = [
        {"other": "no data field"}, {"data": ""}, {"data": "not json"}, {"data": b"\xff\xfe{"},  # not UTF-8
        {"data": "null"}, {"data": "[1, 2]"}, {"data": callback(seq="one")}, {"data": callback(seq=0)},
        {"data": callback(type="banana")}, {"data": callback(task_id=None)}, {"data": callback(session_id=7)},
        {"data": callback(seq=2 ** 40)}, {"data": "[" * 100_000},  # nested deeper than any parser goes
        {"data": callback(result="deep").replace('"deep"', "[" * 990 + "]" * 990)},  # parses, too deep to store
        {"data": callback(result={"text": "x" * (1024 * 1024)})},  # over CHAT_MAX_CALLBACK_BYTES
    ]
    for fields in hostile:
        r.xadd(stream, fields)
    r.xadd(stream, {"data": callback(session_id=UNKNOWN)})
    r.xadd(stream, {"data": callback(task_id=UNKNOWN)})
    r.xadd(stream, {"data": callback(result={"text": "fine"})})

    def counted():
        now = _outcomes(chat_api)
        grown = {k: now.get(k, 0) - before.get(k, 0) for k in ("malformed", "too_large", "unknown_session",
                                                               "unknown_task", "error")}
        return grown if grown["malformed"] >= 14 and grown["too_large"] >= 1 and grown["unknown_session"] >= 1 \
            and grown["unknown_task"] >= 1 else None

    grown = wait_for(counted, timeout=20, what="every hostile entry rejected and counted")
    assert grown["error"] == 0, grown
    # rejected for good: acknowledged, never redelivered
    wait_for(lambda: r.xpending(stream, "orchestrator-api")["pending"] == 0, timeout=10, what="nothing pending")
    t = wait_for(lambda: (lambda b: b if b["chunks_received"] == 1 else None)(
        requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()), timeout=10,
        what="the valid callback after them stored")
    assert t["chunks"] == [{"seq": 1, "data": {"text": "fine"}}]
    # the pub/sub path refuses a huge message too, and carries on
    channel = f"callback:{chat_env['CHAT_CONSUMER_ID']}"
    r.publish(channel, callback(seq=2, result={"text": "y" * (1024 * 1024)}))
    r.publish(channel, callback(seq=2, type="result", result={"text": "done"}))
    wait_for(lambda: requests.get(f"{chat_api}/api/v1/chat/{sid}/tasks/{task}", timeout=5).json()["status"]
             == "completed", timeout=10, what="the task completed by the valid callback")
    assert _outcomes(chat_api).get("too_large", 0) - before.get("too_large", 0) >= 2
