"""The relay / sweeper process: publishes unsent outbox rows, fires due timers (retries, polls,
deadlines, job timeouts), re-dispatches steps whose lease ran out and drives bulk operations
(orchestrator/bulk.py). Several may run at once."""
from __future__ import annotations

import logging
import threading

from orchestrator import bulk
from orchestrator.runtime import Runtime

log = logging.getLogger(__name__)

#: Timers fired per pass; a pass that fired this many goes again at once (more are due).
TIMERS_PER_PASS = 1000


def sweep_once(rt: Runtime) -> dict[str, int]:
    return {
        "published": rt.relay.publish(),
        "timers": rt.engine.fire_due_timers(limit=TIMERS_PER_PASS),
        "leases": rt.engine.redispatch_expired_leases(),
        # At most about one sweep interval of a bulk operation's items per pass, at its rate.
        "bulk": bulk.drive(rt.engine, budget=max(rt.settings.sweep_interval, 0.5),
                           lease=rt.settings.bulk_lease_seconds),
    }


def run(rt: Runtime, stop: threading.Event) -> None:
    log.info("sweeper running every %.2fs", rt.settings.sweep_interval)
    while not stop.is_set():
        try:
            counts = sweep_once(rt)
            if any(counts.values()):
                log.debug("sweep: %s", counts)
        except Exception:  # a database or broker outage: keep sweeping, it will come back
            log.exception("sweep failed")
            stop.wait(min(5.0, rt.settings.sweep_interval * 5))
            continue
        if counts["timers"] < TIMERS_PER_PASS:
            stop.wait(rt.settings.sweep_interval)
