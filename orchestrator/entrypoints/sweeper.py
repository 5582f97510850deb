"""The relay / sweeper process: publishes unsent outbox rows, fires due timers (retries, polls,
deadlines, job timeouts), re-dispatches steps whose lease ran out and drives bulk operations
(orchestrator/bulk.py). Several may run at once."""
from __future__ import annotations

import logging
import threading
from typing import Callable

from orchestrator import bulk
from orchestrator.runtime import Runtime

log = logging.getLogger(__name__)

#: Timers fired per pass; a pass that fired this many goes again at once (more are due).
TIMERS_PER_PASS = 1000


def publish_once(rt: Runtime) -> dict[str, int]:
    return {"published": rt.relay.publish()}


def sweep_once(rt: Runtime) -> dict[str, int]:
    return {
        "timers": rt.engine.fire_due_timers(limit=TIMERS_PER_PASS),
        "leases": rt.engine.redispatch_expired_leases(),
        # At most about one sweep interval of a bulk operation's items per pass, at its rate.
        "bulk": bulk.drive(rt.engine, budget=max(rt.settings.sweep_interval, 0.5),
                           lease=rt.settings.bulk_lease_seconds),
    }


def _loop(rt: Runtime, stop: threading.Event, what: str, once: Callable[[Runtime], dict[str, int]]) -> None:
    while not stop.is_set():
        try:
            counts = once(rt)
            if any(counts.values()):
                log.debug("%s: %s", what, counts)
        except Exception:  # a database or broker outage: keep sweeping, it will come back
            log.exception("%s failed", what)
            stop.wait(min(5.0, rt.settings.sweep_interval * 5))
            continue
        if counts.get("timers", 0) < TIMERS_PER_PASS:  # a full pass: more timers are due, go again
            stop.wait(rt.settings.sweep_interval)


def run(rt: Runtime, stop: threading.Event) -> None:
    """Unsent outbox rows are published by a thread of their own: a broker that is down makes
    each row wait for its delivery timeout, and timers, leases and bulk operations (every other
    workflow's progress) must not wait behind it."""
    log.info("sweeper running every %.2fs", rt.settings.sweep_interval)
    if rt.settings.broker_url.startswith("sqla+"):
        # The embedded broker lost what a process killed with kill -9 had fetched: requests
        # waited on go again now rather than when their lease runs out (10 minutes by default).
        try:
            resent = rt.engine.resend_awaited_requests()
        except Exception:  # the database is not there yet: their leases will run out instead
            log.warning("could not send the requests waited on again at start", exc_info=True)
        else:
            if resent:
                log.info("embedded broker: %d request(s) waited on sent again at start", resent)
    relay = threading.Thread(target=_loop, args=(rt, stop, "outbox sweep", publish_once), name="outbox-sweep",
                             daemon=True)
    relay.start()
    _loop(rt, stop, "sweep", sweep_once)
    relay.join(60)
