"""One subscriber per API process forwards the sessions' frames from Redis to the local sockets.

A socket (or SSE stream) attaches a queue for its session; the hub puts every frame published on
`chat:stream:<session_id>` into the queues of that session. Ordering and completeness are the
socket's job (see `StreamCursor`): frames carry the stream's gap-free seq, and anything missing
is read back from the database.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import threading
from collections import defaultdict
from typing import Any, Callable

import redis

from orchestrator.jsonutil import loads
from sagas.chat import live as chat_live
from sagas.chat.store import ChatStore

log = logging.getLogger(__name__)


class StreamHub(threading.Thread):
    def __init__(self) -> None:
        super().__init__(name="chat-stream-hub", daemon=True)
        self.lock = threading.Lock()
        self.queues: dict[str, set[queue.Queue[tuple[str, Any]]]] = defaultdict(set)
        self.stop = threading.Event()
        self.connected = threading.Event()

    # -- sockets -----------------------------------------------------------------------------
    def attach(self, session_id: str) -> queue.Queue[tuple[str, Any]]:
        q: queue.Queue[tuple[str, Any]] = queue.Queue()
        with self.lock:
            self.queues[session_id].add(q)
        chat_live.SOCKETS.inc()
        self.refresh_presence()
        return q

    def detach(self, session_id: str, q: queue.Queue[tuple[str, Any]]) -> None:
        with self.lock:
            found = self.queues.get(session_id)
            if found is not None:
                found.discard(q)
                if not found:
                    del self.queues[session_id]
        chat_live.SOCKETS.dec()
        self.refresh_presence()

    def count(self) -> int:
        with self.lock:
            return sum(len(v) for v in self.queues.values())

    def refresh_presence(self) -> None:
        with self.lock:
            counts = {sid: len(qs) for sid, qs in self.queues.items() if qs}
        try:
            key = f"chat:sockets:{chat_live.PROCESS_ID}"
            if counts:
                chat_live.client().set(key, json.dumps(counts), ex=chat_live.PRESENCE_TTL)
            else:
                chat_live.client().delete(key)
        except redis.RedisError as exc:
            log.debug("presence not refreshed: %s", exc)

    # -- the subscriber ----------------------------------------------------------------------
    def run(self) -> None:
        chat_live.listen(self.stop, "chat stream hub", lambda p: p.psubscribe(chat_live.STREAM_PREFIX + "*"),
                         lambda msg: self.dispatch(msg["channel"][len(chat_live.STREAM_PREFIX):], msg["data"]),
                         idle=self.refresh_presence, idle_every=10.0,
                         on_connected=lambda up: self.connected.set() if up else self.connected.clear())

    def dispatch(self, session_id: str, raw: str) -> None:
        with self.lock:
            targets = list(self.queues.get(session_id, ()))
        if not targets:
            return
        try:
            item = loads(raw)
        except ValueError:
            return
        if not isinstance(item, dict):
            return
        kind = item.get("type", "")
        entry = (kind[1:], None) if kind.startswith("_") else ("frame", item)
        for q in targets:
            q.put(entry)


_hub: StreamHub | None = None
_hub_pid = 0
_hub_lock = threading.Lock()


def hub() -> StreamHub:
    """This process's hub, started on first use (and again in a forked child)."""
    global _hub, _hub_pid
    with _hub_lock:
        if _hub is None or _hub_pid != os.getpid():
            _hub = StreamHub()
            _hub_pid = os.getpid()
            _hub.start()
            _hub.connected.wait(3.0)
        return _hub


def live_sockets() -> int:
    return _hub.count() if _hub is not None and _hub_pid == os.getpid() else 0


class StreamCursor:
    """Sends a session's frames exactly once and in seq order: from the database up to now,
    then live frames from the hub; a gap (a frame published out of order, or one lost) is
    filled from the database."""

    def __init__(self, store: ChatStore, session_id: str, after: int, send: Callable[[dict[str, Any]], None]) -> None:
        self.store = store
        self.session_id = session_id
        self.last = after
        self.send = send

    def catch_up(self) -> None:
        while True:
            frames = self.store.events_after(self.session_id, self.last, limit=500)
            for f in frames:
                self.emit(f)
            if len(frames) < 500:
                return

    def emit(self, f: dict[str, Any]) -> None:
        if f["seq"] is None or f["seq"] <= self.last:
            return  # already sent
        self.send(f)
        chat_live.FRAMES.labels(f["type"]).inc()
        self.last = f["seq"]

    def live(self, f: dict[str, Any]) -> None:
        if f.get("seq") is None or f["seq"] <= self.last:
            return
        if f["seq"] == self.last + 1:
            self.emit(f)
        else:
            self.catch_up()

    def resume(self, after: int) -> None:
        self.last = after
        self.catch_up()
