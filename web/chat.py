"""Chat sessions (seed 003): REST, the WebSocket `/ws/chat/<session_id>`, a server-sent-events
fallback, the seed's `/health/...` endpoints and a tiny chat page. Protocol: docs/chat.md."""
from __future__ import annotations

import json
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import redis
from flask import Blueprint, Flask, Response, g, request, send_file, stream_with_context
from flask_sock import ConnectionClosed, Sock
from simple_websocket import Server

from orchestrator.errors import InvalidInput
from orchestrator.jsonutil import NotJSON, iso, loads
from orchestrator.metrics import render
from orchestrator.models import utcnow
from orchestrator.schemas import INT64_MAX
from sagas.chat import live as chat_live
from sagas.chat import ChatInit, ChatMessage, validate_message, validate_session_request
from sagas.chat.store import bad_after_seq

from . import actor, health, json_body, query, runtime, streams
from .openapi import doc
from .schemas import (BasicHealth, ChatPaging, DetailedHealth, EventsQuery, IdempotencyHeader, SessionCreated,
                      SessionDeleted, SessionStatus, TaskPage, TaskQueued, TaskView)
from .chat_stream import StreamCursor, hub, live_sockets

log = logging.getLogger(__name__)
bp = Blueprint("chat", __name__)
sock = Sock()
PAGE = Path(__file__).with_name("static") / "chat.html"

# Close codes (4000-4999 are the application's): see docs/chat.md.
CLOSE_BAD_REQUEST = 4400
CLOSE_NOT_FOUND = 4404
CLOSE_DELETED = 4410
CLOSE_TOO_BIG = 1009  # RFC 6455: message too big
CLOSE_TRY_AGAIN_LATER = 1013  # IANA's registry: the server is overloaded (web.streams)
#: A client frame (its UTF-8 text) above this is refused: an error frame, then close 1009.
MAX_CLIENT_FRAME = 64 * 1024
#: simple-websocket's own cap, a backstop against memory use: the socket library reads a message
#: whole before the route sees it, and above this it stops reading, sends its own close 1009 and
#: drops the connection with the rest of the message unread (the client may see a reset first).
#: The route's check above is what a client meets: it answers once the message is read.
MAX_SOCKET_MESSAGE = 1024 * 1024


def init_app(app: Flask) -> None:
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"max_message_size": MAX_SOCKET_MESSAGE})
    if chat_live.chat_settings().callback_consumers > 0:
        chat_live.start_consumers()


def error_frame(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "task_id": extra.pop("task_id", None), "seq": None,
            "data": {"code": code, "message": message, **extra}}


def heartbeat_frame(last: int) -> dict[str, Any]:
    return {"type": "heartbeat", "task_id": None, "seq": last, "data": {"time": iso(utcnow())}}


# -- REST --------------------------------------------------------------------------------------
CHAT = ("chat",)


@bp.post("/api/v1/chat/init")
@doc(SessionCreated, status=201, errors=(400, 413), json=ChatInit, tags=CHAT)
def init_session() -> Any:
    chat = chat_live.chat_settings()
    user_id, config = validate_session_request(json_body(required=False), chat)
    created = chat_live.store().create_session(user_id, config)
    return {"session_id": created["session_id"], "status": created["status"],
            "created_at": created["created_at"]}, 201


@bp.get("/api/v1/chat/<session_id>/status")
@doc(SessionStatus, errors=(400, 404), tags=CHAT)
def session_status(session_id: str) -> Any:
    out = chat_live.store().session(session_id)
    out["recent_tasks"] = chat_live.recent_tasks(session_id)
    out["connections"] = chat_live.connections(session_id)
    return out


@bp.delete("/api/v1/chat/<session_id>")
@doc(SessionDeleted, errors=(400, 404), tags=CHAT)
def delete_session(session_id: str) -> Any:
    """Remove the session and its tasks, their history with them: who deleted it (X-Actor, 400
    over 128 characters, checked before anything is removed) is logged instead."""
    who = actor()
    tasks = chat_live.store().delete_session(session_id)
    log.info("chat session %s deleted by %s (%d tasks)", session_id, who, len(tasks))
    chat_live.forget_session(session_id)
    chat_live.publish_control(session_id, "deleted")
    return {"session_id": session_id, "status": "deleted", "tasks_deleted": len(tasks)}


@bp.post("/api/v1/chat/<session_id>/task")
@doc(TaskQueued, status=202, errors=(400, 404, 409, 413), json=ChatMessage, headers=IdempotencyHeader, tags=CHAT)
def submit_task(session_id: str) -> Any:
    """Send a message to the execution service."""
    message = validate_message(json_body(), chat_live.chat_settings())["message"]
    result, created = chat_live.store().submit(session_id, message, request.headers.get("Idempotency-Key"))
    task = result["task"]
    if created:
        chat_live.remember_task(session_id, task["id"])
        chat_live.publish(session_id, result["frames"])
    status = "queued" if created else task["state"]
    return {"task_id": task["id"], "session_id": session_id, "status": status}, 202


@bp.get("/api/v1/chat/<session_id>/tasks")
@doc(TaskPage, errors=(400, 404), query=ChatPaging, tags=CHAT)
def list_tasks(session_id: str) -> Any:
    page = query(ChatPaging)
    return chat_live.store().tasks(session_id, page.limit, page.offset)


@bp.get("/api/v1/chat/<session_id>/tasks/<task_id>")
@doc(TaskView, errors=(400, 404), tags=CHAT)
def get_task(session_id: str, task_id: str) -> Any:
    return chat_live.store().task(session_id, task_id)


# -- the stream --------------------------------------------------------------------------------
def _follow(session_id: str, after: int, send: Callable[[dict[str, Any]], None],
            on_attach: Callable[["queue.Queue[tuple[str, Any]]"], None] | None = None,
            on_client: Callable[[Any, StreamCursor], None] | None = None) -> str:
    """Send the session's stream from `after` on, then live, with heartbeats, until the client
    goes away ("closed") or the session is deleted ("deleted"). `on_attach` gets the queue the
    loop waits on, so a socket's reader can put ("client", frame) and ("closed", None) in it."""
    store = chat_live.store()
    beat = chat_live.chat_settings().heartbeat_seconds
    stream_hub = hub()
    q = stream_hub.attach(session_id)
    try:
        if on_attach is not None:
            on_attach(q)
        cursor = StreamCursor(store, session_id, after, send)
        cursor.catch_up()
        next_beat = time.monotonic() + beat
        while True:
            try:
                kind, payload = q.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                if not store.exists(session_id):
                    return "deleted"
                cursor.catch_up()  # whatever a lost publish left behind
                send(heartbeat_frame(cursor.last))
                next_beat = time.monotonic() + beat
                continue
            if kind == "frame":
                cursor.live(payload)
            elif kind == "client" and on_client is not None:
                on_client(payload, cursor)
            elif kind in ("deleted", "closed"):
                return kind
    finally:
        stream_hub.detach(session_id, q)


def _client_frame(raw: Any, cursor: StreamCursor, send: Callable[[dict[str, Any]], None]) -> None:
    try:
        msg = loads(raw) if isinstance(raw, (str, bytes)) else None
    except NotJSON as exc:  # too deep included: a RecursionError here killed the socket
        if exc.field:  # a key sent twice
            send(error_frame("bad_frame", str(exc)))
            return
        msg = None
    if not isinstance(msg, dict):
        send(error_frame("bad_frame", "frames must be JSON objects such as {\"type\": \"resume\", \"after_seq\": 0}"))
        return
    kind = msg.get("type")
    if kind == "resume":
        after = msg.get("after_seq")
        if not isinstance(after, int) or isinstance(after, bool) or not 0 <= after <= INT64_MAX:
            send(error_frame("bad_frame", f"after_seq: must be an integer from 0 to {INT64_MAX}"))
            return
        cursor.resume(after)
    elif kind == "ping":
        send(heartbeat_frame(cursor.last))
    else:
        send(error_frame("bad_frame", f"type: unknown client frame {kind!r}; accepted: resume, ping"))


@sock.route("/ws/chat/<session_id>", bp=bp)
def chat_socket(ws: Server, session_id: str) -> None:
    try:
        release = streams.open_stream()
    except streams.TooManyStreams as exc:
        ws.send(json.dumps(error_frame("busy", exc.message)))
        ws.close(CLOSE_TRY_AGAIN_LATER, "too many open streams; try again later")
        return
    try:
        _chat_socket(ws, session_id)
    finally:
        release()


def _chat_socket(ws: Server, session_id: str) -> None:
    lock = threading.Lock()

    def send(f: dict[str, Any]) -> None:
        with lock:
            ws.send(json.dumps(f))

    try:
        problem = g.pop("socket_problem", None)  # the URL's check (web.check_request_text)
        if problem is not None:
            raise problem
        after = bad_after_seq(request.args.get("after_seq", 0))
    except InvalidInput as exc:
        send(error_frame("bad_request", exc.message, field=exc.field))
        ws.close(CLOSE_BAD_REQUEST, exc.message[:120])
        return
    if not chat_live.store().exists(session_id):
        send(error_frame("session_not_found", f"chat session {session_id} not found"))
        ws.close(CLOSE_NOT_FOUND, "session not found")
        return

    def start_reader(incoming: "queue.Queue[tuple[str, Any]]") -> None:
        def reader() -> None:
            while True:
                try:
                    data = ws.receive(timeout=None)
                except Exception:  # closed, or broken under us: the same to the loop
                    break
                if data is None:
                    break
                size = len(data.encode() if isinstance(data, str) else data)
                if size > MAX_CLIENT_FRAME:
                    try:
                        send(error_frame("frame_too_big", f"a client frame is at most {MAX_CLIENT_FRAME} bytes, "
                                                          f"got {size}"))
                        with lock:
                            ws.close(CLOSE_TOO_BIG, f"message too big (at most {MAX_CLIENT_FRAME} bytes)")
                    except Exception:  # closed under us meanwhile
                        pass
                    break
                incoming.put(("client", data))
            incoming.put(("closed", None))

        threading.Thread(target=reader, daemon=True, name="chat-ws-reader").start()

    try:
        ended = _follow(session_id, after, send, start_reader, lambda raw, cur: _client_frame(raw, cur, send))
    except ConnectionClosed:
        return
    if ended == "deleted":
        try:
            send(error_frame("session_deleted", f"chat session {session_id} was deleted"))
            ws.close(CLOSE_DELETED, "session deleted")
        except ConnectionClosed:
            pass


@bp.get("/api/v1/chat/<session_id>/events")
@doc(None, errors=(400, 404, 503), query=EventsQuery, tags=CHAT)
def chat_events(session_id: str) -> Any:
    """Server-sent events: the same frames as the WebSocket, for clients that cannot open one.
    Resumes from `after_seq` or the Last-Event-ID header."""
    if "after_seq" in request.args:
        after = bad_after_seq(request.args["after_seq"])
    else:
        after = bad_after_seq(request.headers.get("Last-Event-ID", 0), "Last-Event-ID")
    chat_live.store().session(session_id)  # 404 before the stream starts
    release = streams.open_stream()  # 503 when this worker's stream threads are all taken

    def generate() -> Iterator[str]:
        out: queue.Queue[dict[str, Any]] = queue.Queue()
        attached: list["queue.Queue[tuple[str, Any]]"] = []

        def follow() -> None:
            try:
                ended = _follow(session_id, after, out.put, attached.append, None)
                if ended == "deleted":
                    out.put(error_frame("session_deleted", f"chat session {session_id} was deleted"))
            except Exception:
                log.exception("SSE stream of %s failed", session_id)
            finally:
                out.put({})

        threading.Thread(target=follow, daemon=True, name="chat-sse").start()
        try:
            yield "retry: 1000\n\n"
            while True:
                f = out.get()
                if not f:
                    return
                ident = f"id: {f['seq']}\n" if f["type"] not in ("heartbeat", "error") and f.get("seq") else ""
                yield f"{ident}event: {f['type']}\ndata: {json.dumps(f)}\n\n"
        finally:  # the client went away: end the follower too
            for q in attached:
                q.put(("closed", None))

    response = Response(stream_with_context(generate()), mimetype="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    response.call_on_close(release)  # the server closes every answer, started or not
    return response


# -- page and health ---------------------------------------------------------------------------
@bp.get("/chat")
@doc(None, errors=(), tags=CHAT)
def chat_page() -> Any:
    return send_file(PAGE, mimetype="text/html", max_age=0)


@bp.get("/health/")
@doc(BasicHealth, errors=(), tags=("operations",))
def health_basic() -> Any:
    return {"status": "healthy", "service": "orchestrator", "timestamp": iso(utcnow()),
            "uptime_seconds": round(time.time() - health.STARTED, 1)}


def _redis_check() -> dict[str, Any]:
    started = time.perf_counter()
    try:
        chat_live.client().ping()
        return {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
    except redis.RedisError as exc:
        return {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}


@bp.get("/health/detailed")
@doc(DetailedHealth, also={503: DetailedHealth}, errors=(), tags=("operations",))
def health_detailed() -> Any:
    deps = {"redis": _redis_check(), **health.dependencies()}
    cluster: dict[str, Any] = {}
    if deps["redis"]["status"] == "ok":
        seen = chat_live.presence()
        cluster = {"websockets": sum(seen["sockets"].values()), "callback_consumers": seen["consumers"]}
    healthy = all(d["status"] == "ok" for d in deps.values())
    body = {
        "status": "healthy" if healthy else "degraded",
        "timestamp": iso(utcnow()),
        "uptime_seconds": round(time.time() - health.STARTED, 1),
        "dependencies": deps,
        "websockets": {"this_process": live_sockets(), "all_replicas": cluster.get("websockets")},
        "callback_consumers": {"this_process": chat_live.live_consumers(),
                               "all_replicas": cluster.get("callback_consumers"),
                               "channel": chat_live.chat_settings().callback_channel},
        "sessions": chat_live.store().live_counts()["sessions"],
    }
    return body, (200 if healthy else 503)


@bp.get("/health/metrics")
@doc(None, errors=(), tags=("operations",))
def health_metrics() -> Response:
    return Response(render(runtime().sessions), mimetype="text/plain; version=0.0.4")
