"""Bulk operations on the embedded SQLite configuration (orchestrator/bulk.py): the same
guarantees as on PostgreSQL (tests/integration/test_bulk.py), driven in-process."""
from __future__ import annotations

from sqlalchemy import select

from engine.workflows import SCRIPT
from orchestrator import bulk
from orchestrator.engine import Filter
from orchestrator.models import BulkJob


def failed_shops(inproc, n):
    ids = []
    for _ in range(n):
        SCRIPT["inproc.reserve"] = ["fatal"]
        ids.append(inproc.engine.start("inproc-shop", {"parcels": ["a"]})[0]["id"])
        inproc.run()
    assert all(inproc.engine.snapshot(i)["state"] == "failed" for i in ids)
    return ids


def everything_of(type_name):
    return Filter(type=type_name, state="failed", step="reserve", step_status="failed")


def test_a_bulk_restart_acts_once_per_instance_and_skips_the_no_longer_failed(inproc):
    ids = failed_shops(inproc, 6)
    engine = inproc.engine
    matched = bulk.match_ids(engine, everything_of("inproc-shop"))
    assert sorted(matched) == sorted(ids)
    job = bulk.create(engine, bulk.Spec("restart", step="reserve", rate_per_second=1000), matched, {})
    engine.restart(matched[-1], "reserve")  # repaired by hand before its turn
    with engine.reads.connect() as conn:
        row = conn.execute(select(BulkJob.__table__).where(BulkJob.id == job["bulk_id"])).first()
    # A second driver acting on an item already done (a lease taken over): no second restart.
    assert bulk._act(engine, row, matched[0]) and bulk._act(engine, row, matched[0])
    while bulk.view(engine, job["bulk_id"])["status"] == "running":
        bulk.drive(engine, budget=0.5)
    final = bulk.view(engine, job["bulk_id"])
    assert (final["done"], final["skipped"], final["failed"]) == (5, 1, 0), final
    assert final["errors"][0]["instance_id"] == matched[-1] and "only a failed step" in final["errors"][0]["error"]
    actor = f"bulk:{job['bulk_id']}"
    restarts = {i: sum(h["actor"] == actor for h in engine.snapshot(i)["history"]) for i in ids}
    assert restarts.pop(matched[-1]) == 0 and set(restarts.values()) == {1}
    inproc.run()
    assert all(engine.snapshot(i)["state"] == "done" for i in ids)


def test_a_cancelled_bulk_run_acts_on_nothing_more(inproc):
    ids = failed_shops(inproc, 3)
    engine = inproc.engine
    job = bulk.create(engine, bulk.Spec("cancel", rate_per_second=1000), ids, {})
    assert bulk.cancel(engine, job["bulk_id"])["status"] == "cancelled"
    assert bulk.drive(engine, budget=0.5) == 0
    assert bulk.view(engine, job["bulk_id"])["done"] == 0
    assert all(engine.snapshot(i)["state"] == "failed" for i in ids)
