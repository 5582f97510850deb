"""Bulk operations (`POST /sagas/bulk`): restart a step of, cancel, or send a signal to every
instance a filter matched, at a set rate, durably.

    create  -> one bulk_jobs row + one bulk_items row per matched instance, in one transaction
    drive   -> (a sweeper pass) lease a running job, act on its next pending items at its rate

Each action goes through the engine's own `restart` / `cancel` / `signal`, so the instance is
re-checked under its lock (one that is no longer eligible is *skipped*, with the reason), its
history row names the actor `bulk:<bulk_id>`, and its item is marked done in the same
transaction as the action: a sweeper killed at any point leaves either both or neither, and
the next sweeper to take the lease goes on with the items still pending. Never twice: the mark
is a conditional update (`pending` -> `done`) that rolls the action back if it finds the item
already taken.
"""
from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Table, exists, func, insert, or_, select, update
from sqlalchemy.exc import DBAPIError

from .engine import Engine, InstanceFilter, UnitOfWork, _not_a_signal, unknown_step
from .errors import Conflict, IllegalTransition, InvalidInput, NotFound
from .jsonutil import as_utc
from .models import BulkItem, BulkJob, utcnow

log = logging.getLogger(__name__)

JOBS: Table = BulkJob.__table__  # type: ignore[assignment]
ITEMS: Table = BulkItem.__table__  # type: ignore[assignment]
RUNNING, COMPLETED, CANCELLED = "running", "completed", "cancelled"
PENDING, DONE, SKIPPED, FAILED = "pending", "done", "skipped", "failed"
DEFAULT_RATE = 10.0
#: The bulk_items rows written per INSERT when a job is created.
CHUNK = 1000
#: How many skipped or failed items `view` lists in `errors`.
ERRORS_SHOWN = 50
#: This process, as the holder of a job's lease.
OWNER = f"{socket.gethostname()[:30]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def match_ids(engine: Engine, flt: InstanceFilter) -> list[str]:
    """The ids of the instances matching `flt` (the filters of GET /sagas), oldest first: a bulk
    run acts in the order the instances were created."""
    return list(reversed(engine.match_ids(flt)))


@dataclass
class Spec:
    """What a bulk operation does to each instance (the body of POST /sagas/bulk)."""

    action: str
    step: str | None = None
    event: str | None = None
    payload: dict[str, Any] | None = None
    rate_per_second: float = DEFAULT_RATE


def check(engine: Engine, spec: Spec, type_name: str | None) -> None:
    """Refuse, before anything is matched, what could not apply to any instance: a restart
    without a step or of a step no workflow (of the filter's type) has; an event that is not a
    user's signal (the same refusal as POST /sagas/<id>/events/<event>); a cancel of a type
    that cannot be cancelled; a field the action does not take (`step` on a cancel was silently
    ignored). InvalidInput (400)."""
    if type_name and engine.registry.get(type_name) is None:
        raise InvalidInput("filter.type", f"unknown workflow type '{type_name}'; known: "
                           + ", ".join(engine.registry.names()))
    for name, value, takes in (("step", spec.step, "restart"), ("event", spec.event, "event"),
                               ("payload", spec.payload, "event")):
        if value is not None and spec.action != takes:
            raise InvalidInput(name, f"only an action '{takes}' takes it, not '{spec.action}'")
    classes = [engine.registry.get(n) for n in ([type_name] if type_name else engine.registry.names())]
    if spec.action == "cancel" and type_name and classes[0] is not None \
            and classes[0].cancel_event not in classes[0].event_names():
        raise InvalidInput("action", f"a '{type_name}' workflow cannot be cancelled")
    if spec.action == "restart":
        if not spec.step:
            raise InvalidInput("step", "a restart needs the step to restart")
        names = sorted({s.name for cls in classes if cls for s in cls.step_table().values()})
        if spec.step not in names:
            raise InvalidInput("step", unknown_step(spec.step, names))
    elif spec.action == "event":
        if not spec.event:
            raise InvalidInput("event", "an event action needs the event (a signal) to send")
        if not any(cls and spec.event in cls.signals for cls in classes):
            if type_name:
                raise InvalidInput("event", _not_a_signal(classes[0], spec.event))  # type: ignore[arg-type]
            raise InvalidInput("event", f"'{spec.event}' is not a signal of any workflow")


def create(engine: Engine, spec: Spec, ids: list[str], filter_doc: dict[str, Any]) -> dict[str, Any]:
    """Store a running job over `ids` (the instances matched now); the sweepers drive it.
    Returns its view (see `view`)."""
    bulk_id = str(uuid.uuid4())
    now = utcnow()
    with engine.sessions() as session, session.begin():
        conn = session.connection()
        conn.execute(insert(JOBS).values(
            id=bulk_id, action=spec.action, step=spec.step, event=spec.event, payload=spec.payload or {},
            filter=filter_doc, rate_per_second=spec.rate_per_second, status=RUNNING if ids else COMPLETED,
            matched=len(ids), created_at=now, finished_at=None if ids else now, next_at=now))
        for start in range(0, len(ids), CHUNK):
            conn.execute(insert(ITEMS), [{"bulk_id": bulk_id, "instance_id": iid, "position": start + n,
                                          "status": PENDING} for n, iid in enumerate(ids[start:start + CHUNK])])
    return view(engine, bulk_id)


def view(engine: Engine, bulk_id: str) -> dict[str, Any]:
    """`{"bulk_id", "action", "status", "matched", "done", "skipped", "failed", "errors":
    [{"instance_id", "status", "error"}]}` (the skipped and failed items, first ERRORS_SHOWN).
    NotFound for an unknown id."""
    with engine.reads.connect() as conn:
        job = conn.execute(select(JOBS).where(JOBS.c.id == bulk_id)).first()
        if job is None:
            raise NotFound(f"bulk operation {bulk_id} not found", bulk_id=bulk_id)
        counts = dict(conn.execute(select(ITEMS.c.status, func.count()).where(ITEMS.c.bulk_id == bulk_id)
                                   .group_by(ITEMS.c.status)).all())
        errors = conn.execute(select(ITEMS.c.instance_id, ITEMS.c.status, ITEMS.c.error)
                              .where(ITEMS.c.bulk_id == bulk_id, ITEMS.c.status.in_((SKIPPED, FAILED)))
                              .order_by(ITEMS.c.position).limit(ERRORS_SHOWN)).all()
    return {"bulk_id": job.id, "action": job.action, "status": job.status, "matched": job.matched,
            "done": counts.get(DONE, 0), "skipped": counts.get(SKIPPED, 0), "failed": counts.get(FAILED, 0),
            "pending": counts.get(PENDING, 0), "rate_per_second": job.rate_per_second,
            "errors": [{"instance_id": e.instance_id, "status": e.status, "error": e.error} for e in errors]}


def cancel(engine: Engine, bulk_id: str) -> dict[str, Any]:
    """Stop a running job: no item is acted on after this commits (the item's mark checks the
    job is running, in the action's transaction). Cancelling a cancelled job is a no-op;
    a completed one is a Conflict (409); NotFound for an unknown id."""
    with engine.sessions() as session, session.begin():
        conn = session.connection()
        job = conn.execute(select(JOBS.c.status).where(JOBS.c.id == bulk_id).with_for_update()).first()
        if job is None:
            raise NotFound(f"bulk operation {bulk_id} not found", bulk_id=bulk_id)
        if job.status == COMPLETED:
            raise Conflict(f"bulk operation {bulk_id} has completed", status=job.status)
        if job.status == RUNNING:
            conn.execute(update(JOBS).where(JOBS.c.id == bulk_id)
                         .values(status=CANCELLED, finished_at=utcnow(), owner=None, lease_until=None))
    return view(engine, bulk_id)


class _Taken(Exception):
    """The item was no longer pending, or its job no longer running: undo the action."""


def drive(engine: Engine, budget: float = 1.0, lease: float = 30.0) -> int:
    """One sweeper pass: take the lease of the running job due first (not leased, or leased by
    this process) and act on its pending items, one every 1/rate seconds, for about `budget`
    seconds. Returns how many items it settled. Safe with several sweepers: a job is driven by
    the holder of its lease, and an item is settled once whoever drives it."""
    now = utcnow()
    with engine.reads.connect() as conn:
        candidates = conn.execute(
            select(JOBS.c.id).where(JOBS.c.status == RUNNING,
                                    or_(JOBS.c.owner == OWNER, JOBS.c.lease_until.is_(None), JOBS.c.lease_until < now))
            .order_by(JOBS.c.next_at).limit(5)).scalars().all()
    for bulk_id in candidates:
        if _lease(engine, bulk_id, lease):
            return _run(engine, bulk_id, budget, lease)
    return 0


def _lease(engine: Engine, bulk_id: str, lease: float) -> bool:
    now = utcnow()
    with engine.sessions() as session, session.begin():
        # A conditional update, not SELECT ... SKIP LOCKED: it works the same on SQLite.
        return session.connection().execute(  # type: ignore[no-any-return]
            update(JOBS).where(JOBS.c.id == bulk_id, JOBS.c.status == RUNNING,
                               or_(JOBS.c.owner == OWNER, JOBS.c.lease_until.is_(None), JOBS.c.lease_until < now))
            .values(owner=OWNER, lease_until=now + timedelta(seconds=lease))).rowcount == 1


def _run(engine: Engine, bulk_id: str, budget: float, lease: float) -> int:
    end = time.monotonic() + budget
    settled = 0
    with engine.reads.connect() as conn:
        job = conn.execute(select(JOBS).where(JOBS.c.id == bulk_id)).first()
    assert job is not None
    interval = 1.0 / job.rate_per_second
    next_at = as_utc(job.next_at)
    while True:
        wait = (next_at - utcnow()).total_seconds()
        if wait > 0:
            if time.monotonic() + wait > end:
                break
            time.sleep(wait)
        with engine.reads.connect() as conn:
            item = conn.execute(select(ITEMS.c.instance_id).where(ITEMS.c.bulk_id == bulk_id, ITEMS.c.status == PENDING)
                                .order_by(ITEMS.c.position).limit(1)).scalar()
        if item is None:
            _finish(engine, bulk_id)
            break
        started = utcnow()
        if not _act(engine, job, item):
            break  # cancelled meanwhile
        settled += 1
        # The next item is due 1/rate after this one started, never earlier: no catching up in a
        # burst after a pause (a sweeper that was down, a slow action).
        next_at = max(next_at, started) + timedelta(seconds=interval)
        if not _renew(engine, bulk_id, next_at, lease) or time.monotonic() >= end:
            break
    return settled


def _act(engine: Engine, job: Any, instance_id: str) -> bool:
    """Act on one item; False if the job is no longer running."""
    actor = f"bulk:{job.id}"

    def mark(uow: UnitOfWork) -> None:
        # FOR SHARE on the job: a cancel (FOR UPDATE) waits for this item or this item sees it.
        status = uow.execute(select(JOBS.c.status).where(JOBS.c.id == job.id).with_for_update(read=True)).scalar()
        taken = uow.execute(update(ITEMS).where(
            ITEMS.c.bulk_id == job.id, ITEMS.c.instance_id == instance_id, ITEMS.c.status == PENDING,
        ).values(status=DONE, finished_at=utcnow()))
        if status != RUNNING or taken.rowcount != 1:
            raise _Taken()

    try:
        if job.action == "restart":
            engine.restart(instance_id, job.step, actor=actor, within=mark)
        elif job.action == "cancel":
            engine.cancel(instance_id, actor=actor, within=mark)
        else:
            engine.signal(instance_id, job.event, job.payload, actor=actor, within=mark)
        return True
    except _Taken:
        return _still_running(engine, job.id)
    except (NotFound, Conflict, IllegalTransition) as exc:
        outcome, error = SKIPPED, str(exc)  # no longer eligible: re-checked under the instance's lock
    except InvalidInput as exc:
        # Not this instance's step or signal (a filter spanning types): skipped; a payload its
        # signal check refuses: failed, even when the payload's field is called `step` too (the
        # balance saga's submit_input), which a check on the field's name alone counted skipped.
        own = "step" if job.action == "restart" else "event" if job.action == "event" else None
        outcome, error = (SKIPPED if exc.field == own else FAILED), str(exc)
    except DBAPIError:
        raise  # the database is down: the sweeper tries again later, the item stays pending
    except Exception as exc:  # noqa: BLE001 - one instance's fault must not stop the others
        log.exception("bulk %s: %s on %s failed", job.id, job.action, instance_id)
        outcome, error = FAILED, f"{type(exc).__name__}: {exc}"
    with engine.sessions() as session, session.begin():
        session.connection().execute(update(ITEMS).where(
            ITEMS.c.bulk_id == job.id, ITEMS.c.instance_id == instance_id, ITEMS.c.status == PENDING,
        ).values(status=outcome, error=error[:2000], finished_at=utcnow()))
    return _still_running(engine, job.id)


def _still_running(engine: Engine, bulk_id: str) -> bool:
    with engine.reads.connect() as conn:
        return conn.execute(select(JOBS.c.status).where(JOBS.c.id == bulk_id)).scalar() == RUNNING


def _renew(engine: Engine, bulk_id: str, next_at: datetime, lease: float) -> bool:
    with engine.sessions() as session, session.begin():
        return session.connection().execute(  # type: ignore[no-any-return]
            update(JOBS).where(JOBS.c.id == bulk_id, JOBS.c.owner == OWNER, JOBS.c.status == RUNNING)
            .values(next_at=next_at, lease_until=utcnow() + timedelta(seconds=lease))).rowcount == 1


def _finish(engine: Engine, bulk_id: str) -> None:
    with engine.sessions() as session, session.begin():
        session.connection().execute(
            update(JOBS).where(JOBS.c.id == bulk_id, JOBS.c.status == RUNNING,
                               ~exists(select(ITEMS.c.instance_id).where(ITEMS.c.bulk_id == bulk_id,
                                                                         ITEMS.c.status == PENDING)))
            .values(status=COMPLETED, finished_at=utcnow(), owner=None, lease_until=None))

