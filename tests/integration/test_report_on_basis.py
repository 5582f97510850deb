"""A step reports success on what it read when it was claimed, without the instance's lock; the
write goes through only if the instance's version has not moved, else it is done again under the
lock. These tests drive the engine in-process (no relay, no worker) against real PostgreSQL, and
against SQLite as the dev runner uses it."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from conftest import engine_on, fresh_database
from orchestrator.engine import Done, Engine, StepContext
from orchestrator.migrate import upgrade
from orchestrator.models import HistoryEntry, OutboxMessage
from orchestrator.rows import StaleBasis


@pytest.fixture(scope="module")
def postgres_url():
    """A database of its own: nothing else of the test session (a sweeper) touches its rows."""
    with fresh_database() as url:
        yield url


@pytest.fixture(params=["postgresql", "postgresql-unprepared", "sqlite"])
def engine(request, rt, postgres_url, tmp_path):
    """On PostgreSQL the writes are one statement, prepared or not; on SQLite (the dev runner's)
    plain statements."""
    url = f"sqlite:///{tmp_path}/engine.db" if request.param == "sqlite" else postgres_url
    if request.param == "sqlite":
        upgrade(url)
    with engine_on(rt.settings, url,
                   database_prepared_statements=request.param != "postgresql-unprepared") as engine:
        yield engine


def claim(engine: Engine, instance_id: str, step: str, branch: int | None = None) -> StepContext:
    attempt = next(s["attempt"] for s in engine.snapshot(instance_id)["steps"] if s["name"] == step)
    ctx = engine.claim_step(instance_id, step, attempt, branch)
    assert ctx is not None and ctx.basis is not None
    return ctx


def events(engine: Engine, instance_id: str) -> list[str]:
    return [h["event"] for h in engine.snapshot(instance_id)["history"]]


def dispatches(engine: Engine, instance_id: str) -> int:
    with engine.sessions() as s:
        return s.execute(select(func.count()).select_from(OutboxMessage)
                         .where(OutboxMessage.instance_id == instance_id)).scalar_one()


def step_of(engine: Engine, instance_id: str, name: str) -> dict:
    return next(s for s in engine.snapshot(instance_id)["steps"] if s["name"] == name)


def test_a_write_on_a_moved_version_writes_nothing(engine):
    inst, _ = engine.start("order", {"parcels": []})
    ctx = claim(engine, inst["id"], "reserve")
    engine.save_step_data(inst["id"], "reserve", ctx.attempt, {"note": "written meanwhile"})
    with engine.sessions() as s:
        history_before = s.execute(select(func.count()).select_from(HistoryEntry)).scalar_one()
    with pytest.raises(StaleBasis):
        with engine.unit_of_work(ctx.basis) as uow:
            engine._succeed(uow, inst["id"], "reserve", ctx.attempt, Done("reserved", {}), None, "worker")
    with engine.sessions() as s:
        assert s.execute(select(func.count()).select_from(HistoryEntry)).scalar_one() == history_before
    assert engine.snapshot(inst["id"])["state"] == "reserving"


def test_a_report_on_a_stale_basis_keeps_what_was_written_meanwhile(engine):
    inst, _ = engine.start("order", {"parcels": []})
    ctx = claim(engine, inst["id"], "reserve")
    engine.save_step_data(inst["id"], "reserve", ctx.attempt, {"note": "written meanwhile"})
    engine.step_succeeded(inst["id"], "reserve", ctx.attempt, Done("reserved", {"reservation": "r-1"}),
                          basis=ctx.basis)
    snap = engine.snapshot(inst["id"])
    assert snap["state"] == "charging"
    assert step_of(engine, inst["id"], "reserve")["data"] == {"note": "written meanwhile",
                                                              "output": {"reservation": "r-1"}}
    assert events(engine, inst["id"]) == ["create", "start", "reserved"]
    assert dispatches(engine, inst["id"]) == 2  # reserve, then the charge chain, once each


def test_two_reports_on_one_basis_have_one_effect(engine):
    inst, _ = engine.start("order", {"parcels": []})
    first = claim(engine, inst["id"], "reserve")
    second = claim(engine, inst["id"], "reserve")  # a duplicated delivery, claimed alongside
    for ctx in (first, second):
        engine.step_succeeded(inst["id"], "reserve", ctx.attempt, Done("reserved", {}), basis=ctx.basis)
    assert events(engine, inst["id"]) == ["create", "start", "reserved"]
    assert dispatches(engine, inst["id"]) == 2
    assert step_of(engine, inst["id"], "charge")["attempt"] == 1


def test_branches_reporting_at_once_on_one_basis_are_all_counted(engine):
    n = 24
    inst, _ = engine.start("order", {"parcels": [{"id": f"p{i}"} for i in range(n)]})
    iid = inst["id"]
    engine.step_succeeded(iid, "reserve", 1, Done("reserved", {}), basis=claim(engine, iid, "reserve").basis)
    engine.step_succeeded(iid, "charge", 1, Done("charged", {}), basis=claim(engine, iid, "charge").basis)
    engine.fire(iid, "approve", {"amount": 1})
    claimed = [claim(engine, iid, "ship", branch=i) for i in range(n)]  # all read the same version

    def report(ctx: StepContext) -> None:
        engine.step_succeeded(iid, "ship", ctx.attempt, Done(output={"parcel": ctx.branch}),
                              branch=ctx.branch, basis=ctx.basis)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(report, claimed))
    snap = engine.snapshot(iid)
    ship = step_of(engine, iid, "ship")
    assert snap["state"] == "done"
    assert (ship["total"], ship["done"], ship["failed"]) == (n, n, 0)
    assert [b["output"] for b in ship["data"]["branches"]] == [{"parcel": i} for i in range(n)]
    assert events(engine, iid).count("shipped") == 1
