"""The engine's guarantees through the generic API, with a test workflow (tests/engine_workflows.py)."""
from __future__ import annotations

import uuid

import redis
from conftest import REDIS, drained, wait_for

FINISHED = ("done", "failed", "cancelled")


def effects(instance_id: str) -> dict[str, int]:
    raw = redis.Redis.from_url(REDIS).hgetall(f"effects:{instance_id}")
    return {k.decode(): int(v) for k, v in raw.items()}


def compensations(instance_id: str) -> list[str]:
    return [x.decode() for x in redis.Redis.from_url(REDIS).lrange(f"compensations:{instance_id}", 0, -1)]


def wait_state(client, instance_id: str, *states: str, timeout: float = 20) -> dict:
    def check():
        body = client.get(f"/sagas/{instance_id}").json
        return body if body["state"] in states else None

    return wait_for(check, timeout=timeout, what=f"{instance_id} to reach {states}")


def start(client, parcels=None, **extra) -> dict:
    r = client.post("/saga", json={"type": "order", "input": {"parcels": parcels or [], **extra}})
    assert r.status_code == 201, r.json
    return r.json


def step(snapshot: dict, name: str) -> dict:
    return next(s for s in snapshot["steps"] if s["name"] == name)


def test_full_saga_with_chain_human_input_and_fanout(client, worker, sweeper):
    parcels = [{"id": "p1"}, {"id": "p2"}, {"id": "p3", "mode": "fail_once"}]
    inst = start(client, parcels, limit=50)
    snap = wait_state(client, inst["id"], "awaiting_approval")
    # the chain ran in order and reported once
    assert effects(inst["id"])["authorize"] == 1 and effects(inst["id"])["capture"] == 1
    assert step(snap, "charge")["status"] == "completed"
    # the guard refuses an amount over the limit: 409 with the current state
    r = client.post(f"/sagas/{inst['id']}/events/approve", json={"amount": 80})
    assert r.status_code == 409 and r.json["state"] == "awaiting_approval"
    r = client.post(f"/sagas/{inst['id']}/events/approve", json={"amount": 20})
    assert r.status_code == 200 and r.json["state"] in ("shipping", "done")
    snap = wait_state(client, inst["id"], *FINISHED)
    assert snap["state"] == "done"
    ship = step(snap, "ship")
    assert (ship["total"], ship["done"], ship["failed"]) == (3, 3, 0)
    assert [b["output"]["parcel"] for b in ship["data"]["branches"]] == ["p1", "p2", "p3"]
    e = effects(inst["id"])
    # the failing branch was retried alone
    assert (e["ship:0"], e["ship:1"], e["ship:2"]) == (1, 1, 2)
    assert e["notify"] == 1  # a message emitted by a state callback went out through the outbox
    events = [h["event"] for h in snap["history"]]
    assert events == ["create", "start", "reserved", "charged", "approve", "shipped"]
    assert all(len(h["payload_digest"]) == 64 and h["actor"] for h in snap["history"])


def test_failed_branch_is_restarted_alone(client, worker, sweeper):
    r = redis.Redis.from_url(REDIS)
    inst = start(client, [{"id": "a"}, {"id": "b", "mode": "fail"}], limit=10)
    wait_state(client, inst["id"], "awaiting_approval")
    client.post(f"/sagas/{inst['id']}/events/approve", json={"amount": 1})
    snap = wait_state(client, inst["id"], "failed")
    ship = step(snap, "ship")
    assert ship["status"] == "failed" and (ship["done"], ship["failed"]) == (1, 1)
    assert "address rejected" in ship["error"] or "some branches" in ship["error"]
    # restart before the cause is fixed is allowed; fix it, restart, only branch 1 runs again
    r.set(f"fixed:{inst['id']}", 1)
    resp = client.post(f"/sagas/{inst['id']}/restart?step=ship")
    assert resp.status_code == 200, resp.json
    snap = wait_state(client, inst["id"], "done")
    e = effects(inst["id"])
    assert e["ship:0"] == 1 and e["ship:1"] == 2
    assert step(snap, "ship")["restarts"] == 1


def test_non_retryable_error_fails_at_once_and_restart_reruns(client, worker, sweeper):
    inst = start(client, reserve_fails=True)
    snap = wait_state(client, inst["id"], "failed")
    assert effects(inst["id"])["reserve"] == 1  # a 4xx is not retried
    assert "out of stock" in step(snap, "reserve")["error"]
    assert client.post(f"/sagas/{inst['id']}/restart?step=charge").status_code == 409
    assert client.post(f"/sagas/{inst['id']}/restart?step=nope").json["field"] == "step"
    assert client.post(f"/sagas/{inst['id']}/restart").status_code == 400
    r = client.post(f"/sagas/{inst['id']}/restart?step=reserve")
    assert r.status_code == 200 and r.json["state"] == "reserving"
    snap = wait_state(client, inst["id"], "failed")
    assert step(snap, "reserve")["attempt"] == 2 and effects(inst["id"])["reserve"] == 2


def test_restart_of_a_cancelled_workflows_failed_step_says_why_in_the_operations_terms(client, worker, sweeper):
    inst = start(client, reserve_fails=True)
    wait_state(client, inst["id"], "failed")
    assert client.post(f"/sagas/{inst['id']}/cancel").status_code == 200
    wait_state(client, inst["id"], "cancelled")

    r = client.post(f"/sagas/{inst['id']}/restart?step=reserve")
    assert r.status_code == 409, r.json
    assert r.json["message"] == "step 'reserve' is failed, but workflow 'order' cannot restart it in state 'cancelled'"
    assert r.json["error"] == "conflict"  # as a restart of a step that is not failed (one code for one endpoint)
    assert r.json["state"] == "cancelled" and r.json["step"] == "reserve" and r.json["step_status"] == "failed"
    snap = client.get(f"/sagas/{inst['id']}").json
    assert snap["state"] == "cancelled" and step(snap, "reserve")["status"] == "failed"  # nothing written


def test_cancel_runs_compensations_in_reverse_order(client, worker, sweeper):
    inst = start(client, [{"id": "x"}])
    wait_state(client, inst["id"], "awaiting_approval")
    r = client.post(f"/sagas/{inst['id']}/cancel")
    assert r.status_code == 200 and r.json["state"] == "cancelled"
    wait_for(lambda: len(compensations(inst["id"])) == 2, timeout=15, what="compensations")
    assert compensations(inst["id"]) == ["refund", "release"]
    # a compensation's effect is recorded before its report commits the step as compensated
    statuses = lambda: {s["name"]: s["status"] for s in client.get(f"/sagas/{inst['id']}").json["steps"]}  # noqa: E731
    wait_for(lambda: statuses() == {"reserve": "compensated", "charge": "compensated"}, timeout=15,
             what="both steps compensated")
    # cancelling again is refused in the operation's terms (it said "event 'cancel' is not allowed")
    r = client.post(f"/sagas/{inst['id']}/cancel")
    assert r.status_code == 409 and r.json["state"] == "cancelled" and r.json["error"] == "conflict", r.json
    assert r.json["message"] == "workflow 'order' cannot be cancelled in state 'cancelled'", r.json


def test_duplicate_step_delivery_has_one_effect(client, rt, worker, sweeper):
    inst = start(client, [])
    snap = wait_state(client, inst["id"], "awaiting_approval")
    # entering awaiting_approval sends order.notify: its effect is counted before, not during, the check
    wait_for(lambda: effects(inst["id"]).get("notify") == 1, timeout=30, what="the approval notice")
    before = effects(inst["id"])
    for s in ("reserve", "charge"):
        run = step(snap, s)
        name = "order.reserve" if s == "reserve" else "order.authorize"
        rt.celery.send_task(name, args=[inst["id"], s, run["attempt"]])
        rt.celery.send_task(name, args=[inst["id"], s, run["attempt"] + 1])  # a future attempt
    # Step tasks acknowledge after running (acks late): an empty queue means all four ran.
    wait_for(lambda: drained(rt.settings.broker_url, "default"), timeout=30, interval=0.3,
             what="the stale deliveries to be consumed")
    assert effects(inst["id"]) == before
    assert len(client.get(f"/sagas/{inst['id']}").json["history"]) == len(snap["history"])


def test_idempotent_start_by_key_and_header(client):
    body = {"type": "order", "key": "order-42", "input": {}}
    first = client.post("/saga", json=body)
    again = client.post("/saga", json=body)
    assert first.status_code == 201 and again.status_code == 200
    assert first.json["id"] == again.json["id"]
    h = {"Idempotency-Key": "k-order-43"}
    a = client.post("/saga/order", json={"input": {"n": 1}}, headers=h)
    b = client.post("/saga/order", json={"input": {"n": 1}}, headers=h)
    assert a.json["id"] == b.json["id"] and b.status_code == 200
    c = client.post("/saga/order", json={"input": {"n": 2}}, headers=h)
    assert c.status_code == 409 and c.json["field"] == "Idempotency-Key"
    # the business key is part of the request: another key under a used header made no instance
    h = {"Idempotency-Key": f"k-order-{uuid.uuid4().hex[:6]}"}
    d = client.post("/saga", json={"type": "order", "key": "kC-" + h["Idempotency-Key"], "input": {}}, headers=h)
    assert d.status_code == 201, d.json
    for other in ({"key": "kD-" + h["Idempotency-Key"]}, {}):
        e = client.post("/saga", json={"type": "order", **other, "input": {}}, headers=h)
        assert e.status_code == 409 and e.json["field"] == "Idempotency-Key", e.json
    assert client.get(f"/sagas?key=kD-{h['Idempotency-Key']}").json["total"] == 0
    same = client.post("/saga", json={"type": "order", "key": "kC-" + h["Idempotency-Key"], "input": {}}, headers=h)
    assert same.status_code == 200 and same.json["id"] == d.json["id"]


def test_generic_api_errors(client):
    assert client.post("/saga", json={"input": {}}).json["field"] == "type"
    assert client.post("/saga", json={"type": "nope"}).json["field"] == "type"
    assert client.post("/saga", json={"type": "order", "input": []}).json["field"] == "input"
    assert client.post("/saga", json={"type": "order", "key": 5}).json["field"] == "key"
    assert client.post("/saga", json={"type": "order", "extra": 1}).json["field"] == "extra"
    r = client.post("/saga", data="{not json", content_type="application/json")
    assert r.status_code == 400 and r.json["field"] == "body"
    assert client.post("/saga/nope", json={}).status_code == 404
    assert client.get("/sagas/00000000-0000-0000-0000-000000000000").status_code == 404
    assert client.post("/sagas/00000000-0000-0000-0000-000000000000/events/approve").status_code == 404
    assert client.get("/sagas?limit=0").json["field"] == "limit"
    assert client.get("/sagas?limit=abc").json["field"] == "limit"
    inst = start(client)
    r = client.post(f"/sagas/{inst['id']}/events/no_such_event")
    assert r.status_code == 400 and r.json["field"] == "event"
    r = client.post(f"/sagas/{inst['id']}/events/shipped")  # the engine's own event, not a signal
    assert r.status_code == 400 and r.json["field"] == "event"
    client.post(f"/sagas/{inst['id']}/cancel")
    r = client.post(f"/sagas/{inst['id']}/events/approve", json={"amount": 1})
    assert r.status_code == 409 and r.json["state"] == "cancelled"


def test_list_filters_and_pagination(client):
    ids = [start(client)["id"] for _ in range(3)]
    page = client.get("/sagas?type=order&limit=2&offset=0").json
    assert page["limit"] == 2 and len(page["items"]) == 2 and page["total"] >= 3
    nxt = client.get("/sagas?type=order&limit=2&offset=2").json
    assert not {i["id"] for i in page["items"]} & {i["id"] for i in nxt["items"]}
    client.post(f"/sagas/{ids[0]}/cancel")  # a state that stays put while the worker runs
    filtered = client.get("/sagas?type=order&state=cancelled&limit=500").json
    assert all(i["state"] == "cancelled" for i in filtered["items"])
    assert ids[0] in {i["id"] for i in filtered["items"]}
    assert ids[1] not in {i["id"] for i in filtered["items"]}
