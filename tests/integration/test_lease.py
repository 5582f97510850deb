"""The sweeper delivers again a step not heard from within its lease, once, and leaves alone an
instance another transaction holds (it would otherwise wait for it while holding the step row)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update

from conftest import engine_on, fresh_database
from orchestrator.engine import Engine
from orchestrator.models import OutboxMessage, StepRun, WorkflowInstance, utcnow


@pytest.fixture(scope="module")
def engine(rt):
    """A database of its own: the session's sweeper would re-dispatch these leases first."""
    with fresh_database() as url, engine_on(rt.settings, url) as engine:
        yield engine


def outbox_rows(engine: Engine, instance_id: str) -> int:
    with engine.sessions() as s:
        return s.execute(select(func.count()).select_from(OutboxMessage)
                         .where(OutboxMessage.instance_id == instance_id)).scalar_one()


def version(engine: Engine, instance_id: str) -> int:
    with engine.sessions() as s:
        return s.execute(select(WorkflowInstance.version).where(WorkflowInstance.id == instance_id)).scalar_one()


def expire_lease(engine: Engine, instance_id: str) -> None:
    with engine.sessions() as s, s.begin():
        s.execute(update(StepRun).where(StepRun.instance_id == instance_id)
                  .values(lease_until=utcnow() - timedelta(seconds=1)))


def test_an_expired_lease_is_dispatched_again_once(engine):
    inst, _ = engine.start("order", {"parcels": []})
    expire_lease(engine, inst["id"])
    before, v = outbox_rows(engine, inst["id"]), version(engine, inst["id"])
    assert engine.redispatch_expired_leases() >= 1
    assert outbox_rows(engine, inst["id"]) == before + 1
    assert version(engine, inst["id"]) == v + 1  # a report read before this must not write over it
    reserve = next(s for s in engine.snapshot(inst["id"])["steps"] if s["name"] == "reserve")
    assert reserve["status"] == "queued"
    engine.redispatch_expired_leases()
    assert outbox_rows(engine, inst["id"]) == before + 1  # the new lease holds


def test_an_instance_held_by_another_transaction_is_skipped(engine):
    inst, _ = engine.start("order", {"parcels": []})
    expire_lease(engine, inst["id"])
    before = outbox_rows(engine, inst["id"])
    with engine.sessions() as holder, holder.begin():
        holder.execute(select(WorkflowInstance.id).where(WorkflowInstance.id == inst["id"]).with_for_update())
        pool = ThreadPoolExecutor(1)
        try:  # a sweep that waited for the holder would time out here
            pool.submit(engine.redispatch_expired_leases).result(timeout=10)
        finally:
            pool.shutdown(wait=False)
        assert outbox_rows(engine, inst["id"]) == before
    engine.redispatch_expired_leases()
    assert outbox_rows(engine, inst["id"]) == before + 1
