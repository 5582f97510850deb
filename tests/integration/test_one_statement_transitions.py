"""A transition whose writes are one statement runs on PostgreSQL as a transaction of its own,
on the autocommit pool, without BEGIN and COMMIT around it (orchestrator/db.py,
`make_autocommit_engine`). Only when the workflow's own code used the transaction too (a read
through its session, an ORM row to write) does the statement stay in the session's transaction,
so that what the workflow wrote commits, or fails, with the transition."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.exc import IntegrityError
from statemachine import State

from orchestrator.models import utcnow
from orchestrator.rows import INSTANCES
from orchestrator.workflow import Workflow, register
from sagas.worker_deployment import Worker


@register
class WorkerRow(Workflow):
    """Opens with one row of the `workers` table, added through the transition's session."""

    type = "test-worker-row"
    start_event = "open"

    new = State(initial=True)
    opened = State(final=True)

    open = new.to(opened)

    def on_enter_opened(self) -> None:
        assert self.session is not None
        self.session.add(Worker(worker_id=self.model.context["input"]["worker_id"], scenario_uuid="s",
                                camera_url="rtsp://camera", status="pending", created_at=utcnow(),
                                updated_at=utcnow()))


def test_a_start_is_one_statement_and_a_transaction_of_its_own_on_postgresql(own_engine):
    engine = own_engine
    bind = engine.sessions.kw["bind"]
    begins: list[Any] = []
    statements: list[str] = []
    event.listen(bind, "begin", lambda conn: begins.append(conn))
    for e in {bind, engine.reads}:
        event.listen(e, "before_cursor_execute",
                     lambda _c, _cur, statement, *_: statements.append(statement)
                     if not statement.startswith("PREPARE ") else None)
    snapshot, created = engine.start("trio", {"n": 1})
    assert created and snapshot["state"] == "one"
    if bind.dialect.name == "postgresql":
        assert begins == [], statements
        assert len([s for s in statements if not s.lstrip().upper().startswith("SELECT")]) == 1, statements
    else:
        assert len(begins) == 1, statements


def test_a_row_the_workflow_adds_commits_or_fails_with_its_transition(own_engine):
    """The second start adds a `workers` row whose worker_id exists: its commit fails, and with
    it the whole start. Had the engine written the instance on a connection of its own, the
    instance would stand without its row."""
    engine = own_engine
    worker_id = str(uuid.uuid4())
    first, created = engine.start("test-worker-row", {"worker_id": worker_id}, key="first")
    assert created and first["state"] == "opened"
    with pytest.raises(IntegrityError):
        engine.start("test-worker-row", {"worker_id": worker_id}, key="second")
    with engine.reads.connect() as conn:
        keys = conn.execute(select(INSTANCES.c.business_key).where(INSTANCES.c.type == "test-worker-row")).scalars().all()
        rows = conn.execute(select(func.count()).select_from(Worker.__table__)
                            .where(Worker.__table__.c.worker_id == worker_id)).scalar()
    assert keys == ["first"] and rows == 1
