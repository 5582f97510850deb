"""The engine's statements are prepared once per PostgreSQL connection: a new connection (after
the server dropped the old one) prepares them again, and a full cache starts over."""
from __future__ import annotations


import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from conftest import _admin_engine, engine_on, fresh_database
from orchestrator import rows
from orchestrator.engine import Done, Engine


@pytest.fixture(scope="module")
def database(rt):
    with fresh_database() as url:
        yield url


@pytest.fixture
def engine(rt, database):
    with engine_on(rt.settings, database) as engine:
        yield engine


def run_order(engine: Engine) -> dict:
    """An order through reserve and charge to the approval, on reports written as a step does."""
    inst, _ = engine.start("order", {"parcels": []})
    for step, event in (("reserve", "reserved"), ("charge", "charged")):
        ctx = engine.claim_step(inst["id"], step, 1)
        assert ctx is not None, engine.snapshot(inst["id"])
        engine.step_succeeded(inst["id"], step, 1, Done(event, {}), basis=ctx.basis)
    return engine.snapshot(inst["id"])


def prepared_here(engine: Engine) -> int:
    with engine.reads.connect() as conn:
        return conn.execute(text("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'orch_%'")).scalar()


def test_statements_are_prepared_and_reused(engine):
    assert engine.prepare
    assert run_order(engine)["state"] == "awaiting_approval"
    assert prepared_here(engine) > 0
    before = prepared_here(engine)
    assert run_order(engine)["state"] == "awaiting_approval"
    assert prepared_here(engine) == before  # the same shapes: nothing prepared twice


def test_a_new_connection_prepares_again(engine, database):
    assert run_order(engine)["state"] == "awaiting_approval"
    admin = _admin_engine()
    with admin.connect() as conn:  # the server drops every session of this database
        conn.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                          "WHERE datname = :d AND pid <> pg_backend_pid()"), {"d": database.rsplit("/", 1)[1]})
    admin.dispose()
    for _ in range(engine.sessions.kw["bind"].pool.size() + 1):  # each dead pooled connection fails once
        try:
            snap = run_order(engine)
            break
        except OperationalError:
            continue
    assert snap["state"] == "awaiting_approval"


def test_a_full_cache_starts_over(engine, monkeypatch):
    monkeypatch.setattr(rows, "MAX_PREPARED", 2)
    for _ in range(3):
        assert run_order(engine)["state"] == "awaiting_approval"
    assert prepared_here(engine) <= 2
