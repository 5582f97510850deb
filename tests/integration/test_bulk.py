"""Bulk operations (POST /sagas/bulk) over real services: a worker fails 200 instances, a sweeper
process restarts them at a set rate, is SIGKILLed midway and started again."""
from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import pytest
from sqlalchemy import select

from conftest import Process, wait_for
from engine_workflows import mend
from orchestrator import bulk
from orchestrator.models import BulkItem, BulkJob

ADMIN = {"X-Admin-Token": "test-admin-token"}


def start_failed(client: Any, n: int) -> tuple[str, list[str]]:
    """`n` repair instances of a new batch, each failed (its step's error names the batch)."""
    batch = uuid.uuid4().hex[:12]
    ids = [client.post("/saga", json={"type": "repair", "input": {"batch": batch}}).json["id"] for _ in range(n)]
    wait_for(lambda: client.get("/sagas", query_string={"type": "repair", "state": "failed", "limit": 500})
             .json["total"] >= n and all(client.get(f"/sagas/{i}").json["state"] == "failed" for i in ids[-5:]),
             timeout=60, what="every instance to fail")
    wait_for(lambda: all(client.get(f"/sagas/{i}").json["state"] == "failed" for i in ids), timeout=60,
             what="every instance to fail")
    return batch, ids


def bulk_status(client: Any, bulk_id: str) -> dict[str, Any]:
    resp = client.get(f"/sagas/bulk/{bulk_id}", headers=ADMIN)
    assert resp.status_code == 200, resp.json
    return resp.json  # type: ignore[no-any-return]


def restarts_by(snapshot: dict[str, Any], actor: str) -> int:
    return sum(1 for h in snapshot["history"] if h["event"] == "restart" and h["actor"] == actor)


def test_bulk_restart_survives_a_killed_sweeper_and_acts_once_per_instance(client, rt, env, worker):
    batch, ids = start_failed(client, 200)
    flt = {"type": "repair", "step": "work", "step_status": "failed", "error": batch}
    dry = client.post("/sagas/bulk", headers=ADMIN, json={"action": "restart", "step": "work", "filter": flt,
                                                          "dry_run": True})
    assert dry.status_code == 200, dry.json
    assert dry.json["matched"] == 200 and len(dry.json["sample"]) == 20 and set(dry.json["sample"]) <= set(ids)
    assert all(client.get(f"/sagas/{i}").json["state"] == "failed" for i in ids)  # the dry run changed nothing

    mend(batch)  # the cause is fixed: a restart now completes
    rate = 40.0
    resp = client.post("/sagas/bulk", headers=ADMIN, json={"action": "restart", "step": "work", "filter": flt,
                                                           "rate_per_second": rate})
    assert resp.status_code == 202, resp.json
    bulk_id = resp.json["bulk_id"]
    assert resp.json == {"bulk_id": bulk_id, "matched": 200, "status": "running"}
    # The instance whose turn comes last is repaired by hand meanwhile: no longer failed when
    # the bulk run reaches it, it is skipped.
    with rt.engine.reads.connect() as conn:
        last = conn.execute(select(BulkItem.instance_id).where(BulkItem.bulk_id == bulk_id)
                            .order_by(BulkItem.position.desc()).limit(1)).scalar_one()
    assert client.post(f"/sagas/{last}/restart", query_string={"step": "work"}).status_code == 200

    sweep_env = {**env, "BULK_LEASE_SECONDS": "2"}
    first = Process("bulk-sweeper", ["sweeper"], sweep_env).start()
    try:
        wait_for(lambda: bulk_status(client, bulk_id)["done"] >= 40, timeout=60, what="a part of the run")
    finally:
        first.kill()  # SIGKILL, mid-run: maybe mid-transaction
    midway = bulk_status(client, bulk_id)
    assert midway["status"] == "running" and midway["done"] < 199, midway
    second = Process("bulk-sweeper", ["sweeper"], sweep_env).start()
    try:
        final = wait_for(lambda: (lambda s: s if s["status"] == "completed" else None)(bulk_status(client, bulk_id)),
                         timeout=90, what="the bulk run to complete")
    finally:
        second.stop()
    assert (final["matched"], final["done"], final["skipped"], final["failed"]) == (200, 199, 1, 0), final
    assert [e["instance_id"] for e in final["errors"]] == [last] and final["errors"][0]["status"] == "skipped"

    actor = f"bulk:{bulk_id}"
    snapshots = {i: wait_for(lambda i=i: (lambda s: s if s["state"] == "mended" else None)(
        client.get(f"/sagas/{i}").json), timeout=60, what=f"{i} to be mended") for i in ids}
    counts = {i: restarts_by(s, actor) for i, s in snapshots.items()}
    assert counts.pop(last) == 0 and restarts_by(snapshots[last], "api") == 1
    assert set(counts.values()) == {1}, {i: c for i, c in counts.items() if c != 1}
    # The rate held: 199 actions, each at least 1/rate after the one before.
    times = sorted(datetime.fromisoformat(h["at"]) for s in snapshots.values() for h in s["history"]
                   if h["actor"] == actor)
    assert (times[-1] - times[0]).total_seconds() >= 198 / rate * 0.95


def test_bulk_needs_the_admin_token(client):
    body = {"action": "cancel", "filter": {"type": "repair"}, "dry_run": True}
    assert client.post("/sagas/bulk", json=body).status_code == 401
    wrong = client.post("/sagas/bulk", json=body, headers={"X-Admin-Token": "wrong"})
    assert wrong.status_code == 403 and wrong.json["error"] == "forbidden"
    assert client.post("/sagas/bulk", json=body, headers={"Authorization": "Bearer test-admin-token"}).status_code == 200
    assert client.get(f"/sagas/bulk/{uuid.uuid4()}").status_code == 401
    assert client.post(f"/sagas/bulk/{uuid.uuid4()}/cancel", headers={"Authorization": "Bearer nope"}).status_code == 403
    assert client.get(f"/sagas/bulk/{uuid.uuid4()}", headers=ADMIN).status_code == 404


@pytest.mark.parametrize("body, field", [
    ({"action": "restart", "filter": {"type": "repair"}}, "step"),
    ({"action": "restart", "step": "nope", "filter": {"type": "repair"}}, "step"),
    ({"action": "event", "event": "restart", "filter": {"type": "order"}}, "event"),
    ({"action": "event", "event": "approve", "filter": {"type": "repair"}}, "event"),
    ({"action": "cancel", "filter": {"stat": "failed"}}, "filter.stat"),
    ({"action": "cancel", "filter": {"created_after": "yesterday"}}, "filter.created_after"),
    ({"action": "cancel", "filter": {"type": "no-such-type"}}, "filter.type"),
    ({"action": "cancel", "filter": {"step_status": "broken"}}, "filter.step_status"),
    ({"action": "cancel", "filter": {"state": "nope"}}, "filter.state"),
    ({"action": "cancel", "filter": {"type": "repair", "state": "tts_failed"}}, "filter.state"),
    ({"action": "cancel", "filter": {}, "rate_per_second": 0}, "rate_per_second"),
    ({"action": "cancel", "filter": {}, "rate_per_second": 1e-7}, "rate_per_second"),  # accepted: a bulk never ending
    ({"action": "fix"}, "action"),
    # a field the action does not take was ignored silently; a type that cannot be cancelled matched
    ({"action": "cancel", "step": "download", "filter": {"type": "media"}}, "step"),
    ({"action": "restart", "step": "work", "event": "approve", "filter": {"type": "repair"}}, "event"),
    ({"action": "cancel", "payload": {"a": 1}, "filter": {"type": "media"}}, "payload"),
    ({"action": "cancel", "filter": {"type": "route_content"}}, "action"),
])
def test_bulk_refuses_what_cannot_apply_naming_the_field(client, body, field):
    resp = client.post("/sagas/bulk", json=body, headers=ADMIN)
    assert resp.status_code == 400, resp.json
    assert resp.json["field"] == field, resp.json


def test_bulk_without_a_filter_is_refused_and_touches_nothing(client, rt):
    def jobs() -> int:
        with rt.db.connect() as conn:
            return len(conn.execute(select(BulkJob.id)).all())

    running = client.post("/saga", json={"type": "order", "input": {"limit": 50, "parcels": [{"id": "p1"}]}}).json["id"]
    before = jobs()
    for body in ({"action": "cancel"}, {"action": "cancel", "dry_run": True}, {"action": "cancel", "filter": None}):
        resp = client.post("/sagas/bulk", json=body, headers=ADMIN)
        assert resp.status_code == 400, resp.json
        assert resp.json["error"] == "invalid_input" and resp.json["field"] == "filter", resp.json
        assert resp.json["problem"] in ("is required", "must be an object, got null"), resp.json
    assert not client.get(f"/sagas/{running}").json["finished"]
    assert jobs() == before
    # everything, said explicitly, is still allowed
    dry = client.post("/sagas/bulk", json={"action": "cancel", "filter": {}, "dry_run": True}, headers=ADMIN)
    assert dry.status_code == 200 and dry.json["matched"] >= 1, dry.json
    schema = client.get("/openapi.json").json["components"]["schemas"]["BulkRequest"]
    assert "filter" in schema["required"], schema


@pytest.mark.parametrize("name", ["type", "state", "key", "error", "step"])
def test_an_empty_filter_value_is_refused_not_read_as_every_instance(client, rt, name):
    """`{"type": ""}` (a template whose variable was empty) matched every instance of every type,
    as only `{}` may: it is refused naming the field, and nothing is started."""
    def jobs() -> int:
        with rt.db.connect() as conn:
            return len(conn.execute(select(BulkJob.id)).all())

    client.post("/saga", json={"type": "order", "input": {"limit": 50, "parcels": [{"id": "p1"}]}})
    before = jobs()
    for dry_run in (True, False):
        resp = client.post("/sagas/bulk", json={"action": "cancel", "filter": {name: ""}, "dry_run": dry_run},
                           headers=ADMIN)
        assert resp.status_code == 400, resp.json
        assert resp.json["field"] == f"filter.{name}", resp.json
    assert jobs() == before


def test_cancel_stops_a_bulk_run_and_skips_what_is_no_longer_eligible(client, rt, worker):
    batch, ids = start_failed(client, 4)
    flt = {"type": "repair", "error": batch}
    bulk_id = client.post("/sagas/bulk", headers=ADMIN, json={"action": "cancel", "filter": flt,
                                                              "rate_per_second": 2}).json["bulk_id"]
    wait_for(lambda: bulk.drive(rt.engine, budget=0.2) or bulk_status(client, bulk_id)["done"] >= 1,
             timeout=30, what="the first cancel")
    cancelled = client.post(f"/sagas/bulk/{bulk_id}/cancel", headers=ADMIN)
    assert cancelled.status_code == 200 and cancelled.json["status"] == "cancelled", cancelled.json
    done = cancelled.json["done"]
    assert bulk.drive(rt.engine, budget=1.0) == 0  # nothing more is acted on
    after = bulk_status(client, bulk_id)
    assert (after["status"], after["done"]) == ("cancelled", done) and done < 4
    states = [client.get(f"/sagas/{i}").json["state"] for i in ids]
    assert states.count("cancelled") == done and states.count("failed") == 4 - done
    assert client.post(f"/sagas/bulk/{bulk_id}/cancel", headers=ADMIN).status_code == 200  # again: no-op


def test_bulk_event_signals_each_waiting_instance_once_and_skips_one_that_moved_on(client, worker, sweeper):
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    ids = [client.post("/saga", json={"type": "order", "input": {"limit": 50, "parcels": [{"id": f"p{n}"}]}}).json["id"]
           for n in range(20)]
    wait_for(lambda: all(client.get(f"/sagas/{i}").json["state"] == "awaiting_approval" for i in ids), timeout=60,
             what="every order to wait for its approval")
    # One order is cancelled by hand first: the filter still matches it, but approve no longer
    # applies to it, so the run skips it and says why.
    last = ids[-1]
    assert client.post(f"/sagas/{last}/cancel").status_code == 200
    wait_for(lambda: client.get(f"/sagas/{last}").json["state"] == "cancelled", what="the cancel")
    flt = {"type": "order", "created_after": since}
    body = {"action": "event", "event": "approve", "payload": {"amount": 20}, "filter": flt, "rate_per_second": 20}
    dry = client.post("/sagas/bulk", headers=ADMIN, json={**body, "dry_run": True})
    assert dry.status_code == 200 and dry.json["matched"] == 20, dry.json
    resp = client.post("/sagas/bulk", headers=ADMIN, json=body)
    assert resp.status_code == 202 and resp.json["matched"] == 20, resp.json
    bulk_id = resp.json["bulk_id"]

    final = wait_for(lambda: (lambda s: s if s["status"] == "completed" else None)(bulk_status(client, bulk_id)),
                     timeout=60, what="the bulk event to complete")
    assert (final["matched"], final["done"], final["skipped"], final["failed"]) == (20, 19, 1, 0), final
    assert [e["instance_id"] for e in final["errors"]] == [last] and final["errors"][0]["status"] == "skipped"

    actor = f"bulk:{bulk_id}"
    for i in ids[:-1]:
        snap = wait_for(lambda i=i: (lambda s: s if s["state"] == "done" else None)(client.get(f"/sagas/{i}").json),
                        timeout=60, what=f"order {i} to ship")
        by_bulk = [(h["event"], h["from"], h["to"]) for h in snap["history"] if h["actor"] == actor]
        assert by_bulk == [("approve", "awaiting_approval", "shipping")], snap["history"]
    snap = client.get(f"/sagas/{last}").json
    assert snap["state"] == "cancelled" and not any(h["actor"] == actor for h in snap["history"])


def test_a_payload_the_signal_check_refuses_is_failed_even_on_a_field_called_step(client, worker, sweeper):
    """The bulk run told "not this instance's step" (skipped) from a refused payload (failed) by
    the field's name alone: a payload field called `step` (as the balance saga's submit_input
    has) was counted skipped, as if the filter had matched the wrong instances."""
    since = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")
    ids = [client.post("/saga", json={"type": "order", "input": {"limit": 50, "parcels": [{"id": f"q{n}"}]}}).json["id"]
           for n in range(3)]
    wait_for(lambda: all(client.get(f"/sagas/{i}").json["state"] == "awaiting_approval" for i in ids), timeout=60,
             what="every order to wait for its approval")
    body = {"action": "event", "event": "approve", "payload": {"step": 5}, "rate_per_second": 20,
            "filter": {"type": "order", "created_after": since}}
    resp = client.post("/sagas/bulk", headers=ADMIN, json=body)
    assert resp.status_code == 202 and resp.json["matched"] == 3, resp.json
    final = wait_for(lambda: (lambda s: s if s["status"] == "completed" else None)(
        bulk_status(client, resp.json["bulk_id"])), timeout=60, what="the bulk event to complete")
    assert (final["done"], final["skipped"], final["failed"]) == (0, 0, 3), final
    assert all(e["status"] == "failed" and "step: unknown field" in e["error"] for e in final["errors"]), final
