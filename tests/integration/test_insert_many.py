"""`rows.insert_many`, the batch's multi-row INSERT: on PostgreSQL the rows go as one JSON
parameter (json_populate_recordset), so what it stores must be exactly what a plain SQLAlchemy
INSERT of the same rows stores, on PostgreSQL and on SQLite alike."""
from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone
from typing import Any, Iterator

import pytest
from sqlalchemy import select

from conftest import fresh_database
from orchestrator import migrate
from orchestrator.db import make_engine
from orchestrator.models import HistoryEntry, OutboxMessage, ProcessedMessage, StepRun, StepToken, Timer
from orchestrator.rows import INSTANCES, insert_many

HISTORY = HistoryEntry.__table__
AT = datetime(2026, 3, 1, 12, 30, 45, 123456, tzinfo=timezone.utc)


@pytest.fixture(params=["postgresql", "sqlite"])
def db(request, tmp_path) -> Iterator[Any]:
    if request.param == "postgresql":
        with fresh_database() as url:
            engine = make_engine(url)
            yield engine
            engine.dispose()
    else:
        url = f"sqlite:///{tmp_path / 'rows.db'}"
        migrate.upgrade(url)
        engine = make_engine(url)
        yield engine
        engine.dispose()


def instance(key: str, **values: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "type": "t", "business_key": key, "idempotency_key": None,
            "fingerprint": "f" * 64, "state": "s", "finished": False, "created_at": AT,
            "updated_at": AT + timedelta(microseconds=1), "finished_at": None, "version": 0,
            "correlation_id": "c", "trace_context": None,
            # text a JSON parameter must carry exactly: quotes, backslashes, control characters,
            # non-ASCII, numbers, nesting, null
            "context": {"input": {"text": 'é "q" \\ \n\t ✓', "n": 1.5, "big": 2 ** 53 + 1, "ok": True,
                                  "none": None, "list": [1, {"a": []}]}}, **values}


def stored(db: Any, table: Any, *order: Any) -> list[dict[str, Any]]:
    """The table's rows, timestamps aware (SQLite hands them back naive: they are UTC)."""
    with db.connect() as conn:
        return [{k: v.replace(tzinfo=timezone.utc) if isinstance(v, datetime) and v.tzinfo is None else v
                 for k, v in r._mapping.items()} for r in conn.execute(select(table).order_by(*order))]


def test_it_stores_what_a_plain_insert_stores_and_skips_existing_keys(db):
    plain = [instance("plain-a"), instance("plain-b", context={}, finished=True, finished_at=AT)]
    many = [{**r, "id": str(uuid.uuid4()), "business_key": r["business_key"].replace("plain", "many")} for r in plain]
    with db.begin() as conn:
        conn.execute(INSTANCES.insert(), plain)
        assert insert_many(conn, INSTANCES, many, skip_existing=True) == [r["id"] for r in many]
    rows = {r["business_key"]: r for r in stored(db, INSTANCES, INSTANCES.c.business_key)}
    for p, m in zip(plain, many):
        a, b = rows[p["business_key"]], rows[m["business_key"]]
        assert {k: v for k, v in a.items() if k not in ("id", "business_key")} == \
               {k: v for k, v in b.items() if k not in ("id", "business_key")}
        assert b["created_at"] == AT and b["context"] == m["context"]

    again = instance("many-a")  # its key exists: skipped, and not among the ids returned
    fresh = instance("many-c")
    with db.begin() as conn:
        assert insert_many(conn, INSTANCES, [again, fresh], skip_existing=True) == [fresh["id"]]
    assert len(stored(db, INSTANCES, INSTANCES.c.id)) == 5



def test_what_the_fast_encoder_refuses_gets_the_standard_encoders_verdict(db):
    """The JSON parameter is written by orjson, which holds no integer beyond 64 bits and would
    write a datetime inside a JSON value as text: such rows go through the standard encoder, so
    a big integer is stored exactly and a datetime inside a context fails as a plain INSERT's
    does, with the same error."""
    big = instance("big", context={"n": 2 ** 70, "m": -(2 ** 64), "list": [2 ** 63]})
    with db.begin() as conn:
        insert_many(conn, INSTANCES, [big], skip_existing=True)
    assert stored(db, INSTANCES, INSTANCES.c.id)[0]["context"] == big["context"]

    dated = instance("dated", context={"at": AT})
    with pytest.raises(Exception) as plain, db.begin() as conn:
        conn.execute(INSTANCES.insert(), [dated])
    with pytest.raises(Exception) as many, db.begin() as conn:
        insert_many(conn, INSTANCES, [dated], skip_existing=True)
    assert "datetime is not JSON serializable" in str(plain.value) and \
        "datetime is not JSON serializable" in str(many.value)
    assert [r["business_key"] for r in stored(db, INSTANCES, INSTANCES.c.id)] == ["big"]

def test_serial_ids_follow_the_list_and_left_out_defaults_are_filled(db):
    parent = instance("parent")
    events = [f"e{i}" for i in range(30)]
    with db.begin() as conn:
        insert_many(conn, INSTANCES, [parent], skip_existing=True)
        insert_many(conn, HISTORY, [{"instance_id": parent["id"], "from_state": None, "to_state": "s", "event": e,
                                     "payload_digest": "d", "actor": "a", "created_at": AT} for e in events])
        # no created_at: a column with a Python-side default, which SQLAlchemy fills in
        insert_many(conn, HISTORY, [{"instance_id": parent["id"], "from_state": "s", "to_state": "s",
                                     "event": "late", "payload_digest": "d", "actor": "a"}])
    rows = stored(db, HISTORY, HISTORY.c.id)
    assert [r["event"] for r in rows] == events + ["late"]
    assert rows[0]["created_at"] == AT and rows[-1]["created_at"] is not None


def test_every_table_a_start_writes_gets_the_same_rows_as_from_a_plain_insert(db):
    parent = instance("owner")
    rows = {  # one row per table, as the engine writes them; `tag` varies what must be unique
        StepRun.__table__: lambda tag: {
            "instance_id": parent["id"], "name": f"step-{tag}", "task": "t", "status": "queued", "attempt": 1,
            "restarts": 0, "failures": 0, "progress": 0.25, "polls": 0, "total": 2, "done": 0, "failed": 0,
            "data": {"branches": [{"input": "é", "status": "queued"}]}, "error": None, "queued_at": AT,
            "started_at": None, "finished_at": None, "lease_until": AT, "dispatches": 1},
        Timer.__table__: lambda tag: {
            "instance_id": parent["id"], "kind": "deadline", "step": f"step-{tag}", "attempt": 1, "branch": None,
            "event": None, "due_at": AT, "fired_at": None},
        OutboxMessage.__table__: lambda tag: {
            "message_id": f"m-{tag}", "instance_id": parent["id"], "channel": "kafka", "target": "story.generate",
            "key": "k", "payload": {"route_id": "r", "n": [1, 2.5]}, "created_at": AT, "sent_at": None,
            "publish_attempts": 0, "last_error": None, "correlation_id": "c", "trace_context": {"traceparent": "x"}},
        StepToken.__table__: lambda tag: {
            "token": f"tok-{tag}", "instance_id": parent["id"], "step": "s", "branch": -1, "attempt": 1,
            "created_at": AT},
        ProcessedMessage.__table__: lambda tag: {"consumer": "kafka:t", "message_id": f"0:{tag}@1", "created_at": AT},
    }
    with db.begin() as conn:
        insert_many(conn, INSTANCES, [parent], skip_existing=True)
        for table, row in rows.items():
            conn.execute(table.insert(), [row("1")])  # tags in the primary key's order
            insert_many(conn, table, [row("2")])
    for table, row in rows.items():
        plain, many = stored(db, table, *table.primary_key)
        assert {k: many[k] for k in row("2")} == row("2"), table.name
        varied = {k for k in row("a") if row("a")[k] != row("b")[k]}
        assert {k for k in plain if plain[k] != many[k]} <= {"id", *varied}, table.name


@pytest.mark.parametrize("backend", ["postgresql", "sqlite"])
def test_a_batch_of_route_starts_writes_with_as_many_statements_for_five_as_for_forty(backend, tmp_path):
    """The Kafka bridge's batch (Engine.batch) holds every start's rows back and writes them as
    one INSERT per table: a start that read or wrote on its own (a statement per start, such as
    clearing a step token that a new instance cannot have yet) would flush the batch once per
    event and take the intake from thousands of events a second to a few hundred."""
    from contextlib import ExitStack

    from sqlalchemy import event

    import sagas  # noqa: F401  (registers route_content)
    from conftest import engine_on
    from orchestrator.config import Settings

    def statements(n: int) -> int:
        with ExitStack() as stack:
            if backend == "postgresql":
                url = stack.enter_context(fresh_database())
            else:
                url = f"sqlite:///{tmp_path / f'batch-{n}.db'}"
                migrate.upgrade(url)
            engine = stack.enter_context(engine_on(Settings(), url))
            db = engine.sessions.kw["bind"]
            seen: list[str] = []
            event.listen(db, "before_cursor_execute", lambda *a: seen.append(a[2]))
            with engine.batch():
                for i in range(n):
                    route = f"r-{uuid.uuid4().hex[:8]}-{i}"
                    _, created = engine.start("route_content", {"route_id": route, "mode": "walking"}, key=route,
                                              actor="kafka:route.confirmed", answer=False)
                    assert created
            return len(seen)

    assert statements(40) == statements(5)
