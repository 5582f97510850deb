"""Many timers due at once, two sweeper processes firing them in batches: each fires exactly once.

Every `order` instance here has its `reserve` step parked on a poll timer (dispatched once, then
polled as a worker would). All timers are made due at the same instant, then two sweepers start
from the CLI. A timer fired twice would dispatch the step twice: exactly one more dispatch per
instance, and every timer fired, is what must come out, on PostgreSQL and on SQLite.
"""
from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest
from sqlalchemy import text

from conftest import Process, engine_on, fresh_database, wait_for
from orchestrator.engine import Poll
from orchestrator.migrate import upgrade

pytestmark = pytest.mark.integration

N = 400  # four batches of 100, so the two sweepers meet on the same due rows


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: Any, tmp_path: Any) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/orchestrator.db"
        upgrade(url)
        yield url
    else:
        with fresh_database() as url:
            yield url


def holds_database(pid: int, url: str) -> bool:
    """The process has the database open: the SQLite file, or a TCP connection to PostgreSQL's
    port (/proc/<pid>/fd against /proc/net/tcp). Its first sweep has begun."""
    fds = os.listdir(f"/proc/{pid}/fd")
    links = []
    for fd in fds:
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            continue
    if url.startswith("sqlite"):
        return any(link == url.split(":///", 1)[1] for link in links)
    sockets = {link[8:-1] for link in links if link.startswith("socket:[")}
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[2].endswith(":1538") and r[9] in sockets for r in rows)  # 0x1538 = 5432


def park(engine: Any, _: int) -> str:
    inst, _created = engine.start("order", {"parcels": []})
    ctx = engine.claim_step(inst["id"], "reserve", 1)
    assert engine.take_claim(ctx, "order.reserve")
    engine.step_progress(inst["id"], "reserve", 1, Poll(after=3600), basis=ctx.basis)
    return str(inst["id"])


def test_many_due_timers_fire_exactly_once_with_two_sweepers(rt, env, database, tmp_path):
    with engine_on(rt.settings, database) as engine:
        with ThreadPoolExecutor(4) as pool:
            ids = list(pool.map(lambda i: park(engine, i), range(N)))

        def scalar(sql: str) -> Any:
            with engine.sessions() as s:
                return s.execute(text(sql)).scalar()

        assert scalar("SELECT count(*) FROM outbox WHERE target = 'order.reserve'") == N

        # Nobody consumes the dispatched steps: a broker of their own that no worker reads, and
        # a lease long enough that no dispatch is made again for want of a worker.
        sweeper_env = {**env, "DATABASE_URL": database, "CELERY_BROKER_URL": f"sqla+sqlite:///{tmp_path}/broker.db",
                       "CELERY_RESULT_BACKEND": "cache+memory://", "SWEEP_INTERVAL": "0.1",
                       "STEP_LEASE_SECONDS": "3600"}
        sweepers = [Process(f"sweeper-{uuid.uuid4().hex[:4]}", ["sweeper"], sweeper_env).start() for _ in range(2)]
        try:
            # Both sweeping before any timer is due, so that they meet on the same due rows.
            wait_for(lambda: all(holds_database(p.proc.pid, database) for p in sweepers), timeout=60,
                     interval=0.1, what="both sweepers to open the database")
            with engine.sessions() as s, s.begin():
                s.execute(text("UPDATE timers SET due_at = CURRENT_TIMESTAMP WHERE fired_at IS NULL"))
            t0 = time.monotonic()
            wait_for(lambda: scalar("SELECT count(*) FROM timers WHERE fired_at IS NULL") == 0, timeout=120,
                     interval=0.2, what=f"two sweepers to fire {N} timers")
            print(f"{N} timers fired in {time.monotonic() - t0:.1f}s")  # shown with -s
        finally:
            for proc in sweepers:
                proc.stop()

        with engine.sessions() as s:
            per_instance = dict(s.execute(text(
                "SELECT instance_id, count(*) FROM outbox WHERE target = 'order.reserve' GROUP BY instance_id")).all())
            timers = s.execute(text("SELECT count(*), count(fired_at) FROM timers")).one()
        assert per_instance == {i: 2 for i in ids}  # the first dispatch, and one from its timer
        assert tuple(timers) == (N, N)
        assert all(engine.snapshot(i, history=False)["steps"][0]["status"] == "queued" for i in ids[:20])
