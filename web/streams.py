"""Room for long-lived answers in an API worker.

A chat WebSocket or server-sent event stream holds one of the worker's threads for as long as it
is open (gunicorn's threaded worker: API_THREADS each). Without a bound, as many open streams as
threads left no thread for anything else: 70 clients following chat events kept `/healthz`,
starts and reads from being answered at all. So at most three quarters of the threads
(`STREAM_SHARE`; 24 of the default 32) serve streams; one more is refused, an event stream with
a 503 and `Retry-After`, a WebSocket with close code 1013 (try again later), and the rest of the
threads stay for ordinary requests.

`web.server.ThreadWorker` sets the bound from its thread count when it starts; where no worker
set it (the Flask test client, a WSGI server of the operator's), streams are not bounded.
"""
from __future__ import annotations

import threading
from typing import Callable

from orchestrator.errors import OrchestratorError

#: The share of a worker's threads that open streams may hold.
STREAM_SHARE = 0.75

_slots: threading.BoundedSemaphore | None = None
_limit = 0


def bound(threads: int) -> None:
    """Allow at most STREAM_SHARE of `threads` open streams in this process (at least one)."""
    global _slots, _limit
    _limit = max(1, int(threads * STREAM_SHARE))
    _slots = threading.BoundedSemaphore(_limit)


class TooManyStreams(OrchestratorError):
    """Every thread this worker lets streams hold is held by one: 503, `Retry-After` seconds."""

    status = 503
    code = "unavailable"
    RETRY_AFTER_SECONDS = 5

    def __init__(self, limit: int) -> None:
        super().__init__(f"this server has {limit} event streams and WebSockets open, as many as it "
                         f"serves at once (3/4 of API_THREADS); retry later", dependency="streams")
        self.headers = {"Retry-After": str(self.RETRY_AFTER_SECONDS)}


def open_stream() -> Callable[[], None]:
    """Take a stream's place: its release, to call once when the stream ends. Raises
    TooManyStreams when every place is taken."""
    slots = _slots
    if slots is None:
        return lambda: None
    if not slots.acquire(blocking=False):
        raise TooManyStreams(_limit)
    once = threading.Lock()

    def release() -> None:
        if once.acquire(blocking=False):
            slots.release()

    return release
