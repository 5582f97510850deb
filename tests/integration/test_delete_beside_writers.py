"""Deleting instances (POST /admin/factory-reset, /admin/cleanup, a chat session's DELETE) while
another transaction holds some of their rows, on PostgreSQL, where rows are locked one by one.

A transition locks its instance, then writes its step rows; the timer sweeper takes a due timer,
then its instance. The delete took the step rows before the instance, so beside a busy worker
PostgreSQL broke the deadlock by failing the delete: the factory reset answered 500."""
from __future__ import annotations

import threading

import pytest
from conftest import wait_for
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

ADMIN = {"X-Admin-Token": "test-admin-token"}


def _waiting_on(conn, blocker: int) -> bool:
    """Some backend waits for a lock `blocker` (a backend pid) holds."""
    waiting = conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE :pid = ANY(pg_blocking_pids(pid))"),
                           {"pid": blocker}).scalar()
    conn.rollback()  # pg_stat_activity is read once per transaction
    return bool(waiting)


@pytest.mark.parametrize("order", ["transition", "timer sweeper"])
def test_factory_reset_beside_a_transaction_holding_the_job_answers_200(client, rt, order):
    r = client.post("/pipeline", json={"youtube_url": "https://www.youtube.com/watch?v=dlk00000001"})
    assert r.status_code == 200, r.json
    job_id = r.json["job_id"]
    first, then = (("SELECT id FROM workflow_instances WHERE id = :id FOR UPDATE",
                    "UPDATE step_runs SET progress = progress WHERE instance_id = :id")
                   if order == "transition" else
                   ("SELECT id FROM timers WHERE instance_id = :id FOR UPDATE",
                    "SELECT id FROM workflow_instances WHERE id = :id FOR UPDATE"))
    answer: dict = {}
    with rt.db.connect() as holder, rt.db.connect() as watcher:
        assert holder.execute(text(first), {"id": job_id}).all(), "the job has no row to hold"
        pid = holder.execute(text("SELECT pg_backend_pid()")).scalar()
        reset = threading.Thread(target=lambda: answer.update(r=client.post("/admin/factory-reset", headers=ADMIN)))
        reset.start()
        wait_for(lambda: _waiting_on(watcher, pid), timeout=20, what="the reset to wait for the held row")
        try:
            holder.execute(text(then), {"id": job_id})  # the writer's second lock: a deadlock before
            holder.commit()
        except DBAPIError as exc:  # PostgreSQL may fail either side of a deadlock; this one's is fine
            assert getattr(exc.orig, "pgcode", None) == "40P01", exc
            holder.rollback()
        reset.join(60)
    assert answer["r"].status_code == 200, answer["r"].json
    assert answer["r"].json["orchestrator"]["jobs_removed"] >= 1
    assert client.get(f"/jobs/{job_id}").status_code == 404
