"""The chat's Redis side: hot data with TTLs, the callback consumer, and the pub/sub fan-out
that lets whichever API replica holds a client's socket forward its frames.

Streams (consumer group CALLBACK_GROUP):
    chat:callbacks:<consumer_id>        callbacks from the execution service, field `data` (durable)
    chat:callbacks:<consumer_id>:dead   entries that failed to store too often, with `reason`
Channels:
    callback:<consumer_id>     callbacks from the execution service (JSON, see docs/chat.md)
    chat:stream:<session_id>   frames committed to a session's stream, for the sockets
Keys (all with a TTL, refreshed while alive):
    chat:recent:<session_id>   the session's latest task ids
    chat:sockets:<process>     {session_id: open sockets} held by one API process
    chat:consumers:<process>:<n>   one per live callback consumer
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterable

import redis
from prometheus_client import Counter, Gauge
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as SATimeoutError

from orchestrator import runtime as runtime_module

from . import ChatSettings
from .settings import CALLBACK_GROUP
from .store import NESTED_TOO_DEEPLY, ChatStore, Rejected, parse_callback

log = logging.getLogger(__name__)

STREAM_PREFIX = "chat:stream:"
PROCESS_ID = f"{socket.gethostname()}:{os.getpid()}"
PRESENCE_TTL = 30
STALE_CONSUMER_MS = 3_600_000  # a consumer name unused this long (its process gone) is deleted

CALLBACKS = Counter("orchestrator_chat_callbacks_total", "Execution callbacks by outcome", ["outcome"])
FRAMES = Counter("orchestrator_chat_frames_sent_total", "Frames sent to chat clients", ["type"])
SOCKETS = Gauge("orchestrator_chat_websockets", "Open chat sockets", multiprocess_mode="livesum")
CONSUMERS = Gauge("orchestrator_chat_callback_consumers", "Running callback consumers",
                  multiprocess_mode="livesum")

_lock = threading.Lock()
_clients: dict[tuple[int, str], redis.Redis] = {}


def chat_settings() -> ChatSettings:
    return ChatSettings.from_settings(runtime_module.current().settings)


def client(url: str | None = None) -> redis.Redis:
    """One Redis client (a connection pool) per process and URL; bounded waits."""
    url = url or chat_settings().redis_url
    key = (os.getpid(), url)
    with _lock:
        found = _clients.get(key)
        if found is None:
            # Bytes that are not UTF-8 decode to lone surrogates instead of raising inside the
            # callback consumer's read: parse_callback then rejects that callback alone.
            found = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=3,
                                         health_check_interval=15, decode_responses=True,
                                         encoding_errors="surrogateescape")
            _clients[key] = found
        return found


def store() -> ChatStore:
    return ChatStore(runtime_module.current().engine, chat_settings())


def publish(session_id: str, frames: Iterable[dict[str, Any]]) -> None:
    """Fan frames out to every replica. A lost publish is caught up by the sockets from the
    database (on a gap, and at every heartbeat)."""
    frames = list(frames)
    if not frames:
        return
    try:
        pipe = client().pipeline(transaction=False)
        for f in frames:
            pipe.publish(STREAM_PREFIX + session_id, json.dumps(f))
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("frames of session %s not published (%s); sockets catch up from the database",
                    session_id, exc)


def publish_control(session_id: str, kind: str) -> None:
    try:
        client().publish(STREAM_PREFIX + session_id, json.dumps({"type": f"_{kind}"}))
    except redis.RedisError as exc:
        log.warning("control %s for session %s not published: %s", kind, session_id, exc)


def remember_task(session_id: str, task_id: str) -> None:
    chat = chat_settings()
    try:
        pipe = client().pipeline(transaction=False)
        key = f"chat:recent:{session_id}"
        pipe.lpush(key, task_id)
        pipe.ltrim(key, 0, 19)
        pipe.expire(key, chat.hot_ttl_seconds)
        pipe.execute()
    except redis.RedisError as exc:
        log.warning("recent tasks of %s not cached: %s", session_id, exc)


def recent_tasks(session_id: str) -> list[str] | None:
    try:
        return list(client().lrange(f"chat:recent:{session_id}", 0, 19))
    except redis.RedisError:
        return None


def forget_session(session_id: str) -> None:
    try:
        client().delete(f"chat:recent:{session_id}")
    except redis.RedisError:
        pass


def presence() -> dict[str, Any]:
    """Live sockets and consumers across every replica, from the presence keys."""
    r = client()
    sockets: dict[str, int] = {}
    for key in r.scan_iter("chat:sockets:*", count=500):
        raw = r.get(key)
        for sid, n in (json.loads(raw) if raw else {}).items():
            sockets[sid] = sockets.get(sid, 0) + int(n)
    consumers = sum(1 for _ in r.scan_iter("chat:consumers:*", count=500))
    return {"sockets": sockets, "consumers": consumers}


def connections(session_id: str) -> int | None:
    try:
        return presence()["sockets"].get(session_id, 0)
    except redis.RedisError:
        return None


# -- callbacks ---------------------------------------------------------------------------------
#: Database errors that pass: the connection refused, dropped or timed out.
UNAVAILABLE = (OperationalError, InterfaceError, DisconnectionError, SATimeoutError, OSError)
#: Outcomes after which a callback is never tried again (the stream entry is acknowledged).
SETTLED = frozenset({"delivered", "buffered", "duplicate", "malformed", "too_large", "unknown_session",
                     "unknown_task", "task_finished"})


def handle_callback(raw: Any, chat_store: ChatStore | None = None) -> str:
    """Store one callback, move the task's lifecycle, fan the new frames out. Never raises:
    a bad callback is logged with its reason and counted. Returns the outcome: one of SETTLED;
    "unavailable" when the database could not be reached, or "error" when storing or applying
    failed otherwise (a redelivery may succeed)."""
    chat_store = chat_store or store()
    try:
        cb = parse_callback(raw, chat_store.chat.max_callback_bytes)
        accepted = chat_store.accept_callback(cb)
    except RecursionError:  # data nested too deeply to store: it never will be
        exc = Rejected("malformed", NESTED_TOO_DEEPLY)
        log.warning("callback rejected (%s): %s; payload %.300r", exc.reason, exc.problem, raw)
        CALLBACKS.labels(exc.reason).inc()
        return exc.reason
    except Rejected as exc:
        log.warning("callback rejected (%s): %s; payload %.300r", exc.reason, exc.problem, raw)
        CALLBACKS.labels(exc.reason).inc()
        return exc.reason
    except UNAVAILABLE as exc:
        log.warning("callback not stored, the database is unavailable (%s); payload %.300r", exc, raw)
        CALLBACKS.labels("unavailable").inc()
        return "unavailable"
    except Exception:
        log.exception("callback not stored; payload %.300r", raw)
        CALLBACKS.labels("error").inc()
        return "error"
    try:
        chat_store.fire(cb["task_id"], accepted.events)
    except UNAVAILABLE as exc:  # the frames are stored; a redelivery (a duplicate then) fires it again
        log.warning("task %s: lifecycle events %s not applied, the database is unavailable (%s)",
                    cb["task_id"], [e for e, _ in accepted.events], exc)
        CALLBACKS.labels("unavailable").inc()
        return "unavailable"
    except Exception:
        log.exception("task %s: lifecycle events %s not applied", cb["task_id"], [e for e, _ in accepted.events])
        CALLBACKS.labels("error").inc()
        return "error"
    if accepted.duplicate:
        CALLBACKS.labels("duplicate").inc()
        return "duplicate"
    publish(cb["session_id"], accepted.frames)
    outcome = "delivered" if any(f["type"] == cb["type"] for f in accepted.frames) else "buffered"
    CALLBACKS.labels(outcome).inc()
    return outcome


class CallbackConsumer(threading.Thread):
    """Subscribes to `callback:<consumer_id>` and handles each message.

    Every consumer of the same id receives every callback (Redis pub/sub fans out); storing is
    idempotent by (task, seq), so exactly one of them delivers it and the others count a
    duplicate. Runs as a thread in each API process (CHAT_CALLBACK_CONSUMERS per process)."""

    def __init__(self, index: int = 0) -> None:
        super().__init__(name=f"chat-callbacks-{index}", daemon=True)
        self.index = index
        self.stop = threading.Event()

    def run(self) -> None:
        chat = chat_settings()
        presence_key = f"chat:consumers:{PROCESS_ID}:{self.index}"
        r = client(chat.redis_url)
        CONSUMERS.inc()
        try:
            listen(self.stop, "callback consumer", lambda p: p.subscribe(chat.callback_channel),
                   lambda msg: handle_callback(msg["data"]),
                   idle=lambda: r.set(presence_key, "1", ex=PRESENCE_TTL), idle_every=PRESENCE_TTL / 3,
                   redis_client=r)
        finally:
            CONSUMERS.dec()


class StreamConsumer(threading.Thread):
    """Reads the stream `chat:callbacks:<consumer_id>` as a member of the consumer group
    CALLBACK_GROUP (named `<host>:<pid>:<n>`) and handles each entry's `data` field.

    An entry is acknowledged (XACK) once its outcome is settled: stored and its lifecycle event
    applied, or rejected for good. One that failed stays pending and this consumer reads it again
    (its own pending entries, backing off from 0.5 s to 5 s) before any new entry: while the
    database is unreachable (`unavailable`) for as long as that lasts; after any other failure
    (`error`) up to CHAT_CALLBACK_MAX_DELIVERIES deliveries, then it moves to the dead-letter
    stream `<stream>:dead` with its reason. Entries pending on a consumer that died between
    reading and acknowledging are claimed (XAUTOCLAIM) once idle CHAT_CALLBACK_CLAIM_IDLE_SECONDS.
    Entries added while no API process ran are read when one starts: the group keeps its position."""

    def __init__(self, index: int = 0) -> None:
        super().__init__(name=f"chat-callback-stream-{index}", daemon=True)
        self.index = index
        self.name_in_group = f"{PROCESS_ID}:{index}"
        self.stop = threading.Event()

    def run(self) -> None:
        chat = chat_settings()
        presence_key = f"chat:consumers:{PROCESS_ID}:stream-{self.index}"
        r = client(chat.redis_url)
        CONSUMERS.inc()
        backoff = 0.5
        try:
            while not self.stop.is_set():
                try:
                    ensure_group(r, chat)
                    backoff = 0.5
                    self._consume(r, chat, presence_key)
                except redis.RedisError as exc:  # NOGROUP after a Redis restart lands here too
                    log.warning("callback stream consumer: Redis unavailable (%s); retrying in %.1fs", exc, backoff)
                    self.stop.wait(backoff)
                    backoff = min(10.0, backoff * 2)
                except Exception:
                    log.exception("callback stream consumer error; restarting its loop")
                    self.stop.wait(1.0)
        finally:
            CONSUMERS.dec()

    def _consume(self, r: redis.Redis, chat: ChatSettings, presence_key: str) -> None:
        claim_every = max(0.5, chat.callback_claim_idle_seconds / 2)
        claimed = idled = 0.0
        retry = 0.0  # > 0: seconds to wait before reading this consumer's failed entries again
        while not self.stop.is_set():
            now = time.monotonic()
            if now - idled >= PRESENCE_TTL / 3:
                r.set(presence_key, "1", ex=PRESENCE_TTL)
                idled = now
            if now - claimed >= claim_every:
                if not self._claim(r, chat):  # a claimed entry failed: it is ours to retry now
                    retry = retry or 0.5
                claimed = time.monotonic()
            if retry:
                self.stop.wait(retry)
                read = r.xreadgroup(CALLBACK_GROUP, self.name_in_group, {chat.callback_stream: "0"}, count=50)
            else:
                read = r.xreadgroup(CALLBACK_GROUP, self.name_in_group, {chat.callback_stream: ">"}, count=50,
                                    block=1000)
            failed = False
            for _stream, entries in read or []:
                for entry_id, fields in entries:
                    failed |= not self._handle(r, chat, entry_id, fields, again=bool(retry))
            retry = min(5.0, retry * 2 or 0.5) if failed else 0.0

    def _claim(self, r: redis.Redis, chat: ChatSettings) -> bool:
        """Take over the entries pending longer than the claim idle time on other consumers, and
        forget consumers (of processes gone) that hold nothing and were idle for an hour. False
        when a claimed entry is not settled."""
        start, settled = "0-0", True
        while not self.stop.is_set():
            answer = r.xautoclaim(chat.callback_stream, CALLBACK_GROUP, self.name_in_group,
                                  min_idle_time=int(chat.callback_claim_idle_seconds * 1000), start_id=start,
                                  count=50)
            start, entries = answer[0], answer[1]
            for entry_id, fields in entries:
                settled &= self._handle(r, chat, entry_id, fields, again=True)
            if start in ("0-0", b"0-0"):
                break
        for consumer in r.xinfo_consumers(chat.callback_stream, CALLBACK_GROUP):
            if consumer["pending"] == 0 and consumer["idle"] > STALE_CONSUMER_MS \
                    and consumer["name"] != self.name_in_group:
                r.xgroup_delconsumer(chat.callback_stream, CALLBACK_GROUP, consumer["name"])
        return settled

    def _handle(self, r: redis.Redis, chat: ChatSettings, entry_id: str, fields: dict[str, Any] | None,
                again: bool) -> bool:
        """Handle one entry; True when it is settled (acknowledged or dead-lettered)."""
        raw = (fields or {}).get("data")
        if raw is None:
            log.warning("callback rejected (malformed): stream entry %s has no 'data' field; fields %.300r",
                        entry_id, fields)
            CALLBACKS.labels("malformed").inc()
            outcome = "malformed"
        else:
            outcome = handle_callback(raw)
        if outcome in SETTLED:
            r.xack(chat.callback_stream, CALLBACK_GROUP, entry_id)
            return True
        if outcome != "error" or not again:  # the database away: kept for as long as that lasts
            return False
        pending = r.xpending_range(chat.callback_stream, CALLBACK_GROUP, min=entry_id, max=entry_id, count=1)
        deliveries = pending[0]["times_delivered"] if pending else 0
        if deliveries < chat.callback_max_deliveries:
            return False
        r.xadd(chat.callback_dead_letters, {"data": raw if raw is not None else "", "entry": entry_id,
                                            "reason": f"{outcome} after {deliveries} deliveries"},
               maxlen=100_000, approximate=True)
        r.xack(chat.callback_stream, CALLBACK_GROUP, entry_id)
        CALLBACKS.labels("dead_lettered").inc()
        log.error("callback stream entry %s dead-lettered after %d deliveries", entry_id, deliveries)
        return True


def ensure_group(r: redis.Redis, chat: ChatSettings) -> None:
    """Create the stream and its consumer group if missing. The group starts at the stream's
    first entry, so callbacks added before any API process ever ran are read too."""
    try:
        r.xgroup_create(chat.callback_stream, CALLBACK_GROUP, id="0", mkstream=True)
    except redis.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def listen(stop: threading.Event, name: str, subscribe: Callable[[Any], None],
           on_message: Callable[[dict[str, Any]], None], *, idle: Callable[[], None] | None = None,
           idle_every: float = 10.0, on_connected: Callable[[bool], None] | None = None,
           redis_client: redis.Redis | None = None) -> None:
    """Keep a Redis pub/sub subscription alive until `stop` is set.

    `subscribe(pubsub)` subscribes a new PubSub; every message (not the subscribe
    confirmations) goes to `on_message`; `idle()` runs at most every `idle_every` seconds and
    right after subscribing (presence keys). On a Redis error the subscription is closed,
    `on_connected(False)` is called, and it subscribes again after 0.5 s, doubling to 10 s; any
    other error restarts the loop after 1 s. Used by the callback consumers and the stream hub."""
    backoff = 0.5
    while not stop.is_set():
        pubsub = None
        try:
            pubsub = (redis_client or client()).pubsub(ignore_subscribe_messages=True)
            subscribe(pubsub)
            if on_connected is not None:
                on_connected(True)
            backoff = 0.5
            idled = 0.0
            while not stop.is_set():
                if idle is not None and time.monotonic() - idled >= idle_every:
                    idle()
                    idled = time.monotonic()
                msg = pubsub.get_message(timeout=1.0)
                if msg is not None and msg.get("type") in ("message", "pmessage"):
                    on_message(msg)
        except redis.RedisError as exc:
            if on_connected is not None:
                on_connected(False)
            log.warning("%s: Redis unavailable (%s); retrying in %.1fs", name, exc, backoff)
            stop.wait(backoff)
            backoff = min(10.0, backoff * 2)
        except Exception:
            if on_connected is not None:
                on_connected(False)
            log.exception("%s error; restarting its loop", name)
            stop.wait(1.0)
        finally:
            if pubsub is not None:
                try:
                    pubsub.close()
                except Exception:  # closing a broken connection: nothing left to do
                    pass


_consumers: list[threading.Thread] = []
_consumers_pid = 0


def start_consumers() -> list[threading.Thread]:
    """Start this process's callback consumers once (after a fork, again): CHAT_CALLBACK_CONSUMERS
    on the pub/sub channel and as many on the stream."""
    global _consumers, _consumers_pid
    with _lock:
        if _consumers_pid == os.getpid():
            return _consumers
        _consumers_pid = os.getpid()
        n = chat_settings().callback_consumers
        _consumers = [*(CallbackConsumer(i) for i in range(n)), *(StreamConsumer(i) for i in range(n))]
        for c in _consumers:
            c.start()
        return _consumers


def live_consumers() -> int:
    return sum(1 for c in _consumers if c.is_alive()) if _consumers_pid == os.getpid() else 0
