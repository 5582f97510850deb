"""Parked workflows cost nothing: memory while N wait, and the sweeper firing N timers due at once.

Half of the N workflows wait for a person's signal with a deadline timer (`bench_approval`), the
other half are parked on a step's poll timer after their step ran once on the worker
(`bench_poll`); see bench/parked_workflow.py. Measured:

  - growth of the resident memory (VmRSS summed over each process tree) of the worker and of the
    sweeper from before the first is started to when all N are parked;
  - every parked timer is then made due at the same instant (one UPDATE of `due_at`), and the
    time from that instant to the last timer's `fired_at` gives timers fired per second.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from .procs import BenchError, note, tree_rss_mib, wait_for

TYPES = ("bench_approval", "bench_poll")
UNFIRED = ("SELECT count(*) FROM timers t JOIN workflow_instances i ON i.id = t.instance_id "
           "WHERE t.fired_at IS NULL AND i.type IN ('bench_approval', 'bench_poll')")


@dataclass
class Parked:
    """What `measure` found: MiB growth per process tree, and the firing of every timer."""

    n: int
    worker_mib: float
    sweeper_mib: float
    fire_seconds: float

    @property
    def timers_per_second(self) -> float:
        return self.n / max(1e-6, self.fire_seconds)


def _settled_rss(pid: int, seconds: float = 1.5) -> float:
    """The largest of a few samples over `seconds`, once the process is quiet."""
    samples = []
    for _ in range(5):
        samples.append(tree_rss_mib(pid))
        time.sleep(seconds / 5)
    return max(samples)


def measure(rt: Any, worker_pid: int, sweeper_pid: int, n: int, threads: int,
            check: Callable[[], None]) -> Parked:
    """Park n workflows, read the memory, make every timer due at once, time the firing."""
    from sqlalchemy import text

    def scalar(sql: str) -> Any:
        with rt.sessions() as s:
            return s.execute(text(sql)).scalar()

    worker_before, sweeper_before = _settled_rss(worker_pid), _settled_rss(sweeper_pid)
    polls = n // 2
    kinds = ["bench_poll"] * polls + ["bench_approval"] * (n - polls)
    note(f"(e) parking {n} workflows ({polls} on a poll timer, {n - polls} awaiting a signal) ...")
    started = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda kind: rt.engine.start(kind, {}), kinds))
    wait_for(lambda: int(scalar(UNFIRED)) >= n, timeout=max(120.0, n * 0.05), interval=0.5,
             what=f"{n} workflows to park on their timers", check=check)
    note(f"    all parked in {time.monotonic() - started:.1f}s")
    worker_after, sweeper_after = _settled_rss(worker_pid), _settled_rss(sweeper_pid)

    with rt.sessions() as s, s.begin():
        due = s.execute(text("SELECT now()")).scalar()
        made_due = s.execute(text(
            "UPDATE timers SET due_at = :due FROM workflow_instances i WHERE i.id = timers.instance_id "
            "AND timers.fired_at IS NULL AND i.type IN ('bench_approval', 'bench_poll')"), {"due": due}).rowcount
    if made_due != n:
        raise BenchError(f"{made_due} parked timers found, {n} expected")
    note(f"(e) {n} timers due at once; the sweeper fires them ...")
    wait_for(lambda: int(scalar(UNFIRED)) == 0, timeout=max(120.0, n * 0.1), interval=0.2,
             what=f"the sweeper to fire {n} timers", check=check)
    last = scalar("SELECT max(fired_at) FROM timers t JOIN workflow_instances i ON i.id = t.instance_id "
                  "WHERE i.type IN ('bench_approval', 'bench_poll')")
    return Parked(n, worker_after - worker_before, sweeper_after - sweeper_before,
                  (last - due).total_seconds())
