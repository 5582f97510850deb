"""The engine on its own, in one process: a temporary SQLite database migrated to head, a
capturing outbox, and a synchronous step runner that runs captured Celery step and compensation
messages by calling their step functions (the same body a worker runs: orchestrator.steps).

Timers and leases are fired directly (`fire_timers`, `expire_leases`) instead of waiting for them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy import update

from orchestrator import migrate
from orchestrator.config import Settings
from orchestrator.db import make_engine, make_session_factory
from orchestrator.engine import RUNS, TIMERS, Engine
from orchestrator.models import OutboxMessage, utcnow
from orchestrator.rows import Record
from orchestrator.runtime import make_celery
from orchestrator.steps import execute_compensation, execute_step
from orchestrator.workflow import registry


@dataclass
class Captured:
    """Outbox rows the engine handed to its relay, in order; `celery` ones wait to be run."""

    rows: list[Record] = field(default_factory=list)
    pending: list[Record] = field(default_factory=list)

    def __call__(self, rows: list[Record]) -> None:
        self.rows.extend(rows)
        self.pending.extend(r for r in rows if r.channel == "celery")

    def sent(self, channel: str, target: str | None = None) -> list[dict[str, Any]]:
        return [r.payload for r in self.rows if r.channel == channel and (target is None or r.target == target)]


class InProcess:
    """An Engine on SQLite with a runner for its step messages."""

    def __init__(self, path: str) -> None:
        url = f"sqlite:///{path}"
        migrate.upgrade(url)
        self.settings = Settings(database_url=url, step_lease_seconds=60)
        self.db = make_engine(url)
        self.outbox = Captured()
        self.engine = Engine(self.settings, make_session_factory(self.db), registry, relay=self.outbox)
        self.tasks = make_celery(self.settings).tasks
        self.outcomes: list[tuple[str, str]] = []

    # -- running captured messages ---------------------------------------------------------------
    def run(self, limit: int = 200) -> list[tuple[str, str]]:
        """Run captured step/compensation messages (and those they cause) until none is left.
        Returns [(task, outcome)] of this call."""
        ran: list[tuple[str, str]] = []
        while self.outbox.pending and len(ran) < limit:
            row = self.outbox.pending.pop(0)
            for name, args in _calls(row.payload):
                outcome = self.call(name, args)
                ran.append((name, outcome))
                if outcome != "continued" and "chain" in row.payload:
                    break  # a link that did not go on stops its chain, as in a worker
        self.outcomes.extend(ran)
        return ran

    def call(self, name: str, args: list[Any]) -> str:
        task = self.tasks[name]
        if getattr(task, "reports_to", None) == "step":
            return execute_step(self.engine, name, task.step_function, *args)
        if getattr(task, "reports_to", None) == "compensation":
            return execute_compensation(self.engine, task.compensation_function, *args)
        task.run(*args)
        return "called"

    def drop_pending(self) -> list[Record]:
        """Lose every captured step message (a broker or worker that lost them)."""
        lost, self.outbox.pending = self.outbox.pending, []
        return lost

    # -- time ------------------------------------------------------------------------------------
    def fire_timers(self, kind: str | None = None) -> int:
        """Make the unfired timers (of `kind`) due now and fire them: a fake clock's jump."""
        with self.db.begin() as conn:
            q = update(TIMERS).where(TIMERS.c.fired_at.is_(None))
            if kind is not None:
                q = q.where(TIMERS.c.kind == kind)
            conn.execute(q.values(due_at=utcnow() - timedelta(seconds=1)))
        return self.engine.fire_due_timers()

    def timers(self, instance_id: str) -> list[Any]:
        with self.db.connect() as conn:
            return conn.execute(TIMERS.select().where(TIMERS.c.instance_id == instance_id)).all()

    def expire_leases(self) -> int:
        with self.db.begin() as conn:
            conn.execute(update(RUNS).where(RUNS.c.lease_until.is_not(None))
                         .values(lease_until=utcnow() - timedelta(seconds=1)))
        return self.engine.redispatch_expired_leases()

    def step(self, instance_id: str, name: str) -> dict[str, Any]:
        return next(s for s in self.engine.snapshot(instance_id)["steps"] if s["name"] == name)

    def outbox_rows(self) -> list[Any]:
        with self.db.connect() as conn:
            return conn.execute(OutboxMessage.__table__.select()).all()


def _calls(payload: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    if "task" in payload:
        return [tuple(payload["task"])]  # type: ignore[list-item]
    return [tuple(c) for c in payload.get("chain") or payload.get("group") or []]  # type: ignore[misc]
