"""Faults inside steps, with real worker processes: a chain link that fails, a task that kills
its worker process, compensations that fail (test workflows in tests/engine_workflows.py)."""
from __future__ import annotations

import uuid

import pytest
import redis

from conftest import REDIS, Process, embedded, engine_on, wait_for
from orchestrator.migrate import upgrade


def effects(instance_id: str) -> dict[str, int]:
    raw = redis.Redis.from_url(REDIS).hgetall(f"effects:{instance_id}")
    return {k.decode(): int(v) for k, v in raw.items()}


def compensations(instance_id: str) -> list[str]:
    return [x.decode() for x in redis.Redis.from_url(REDIS).lrange(f"compensations:{instance_id}", 0, -1)]


def start(client, type_name: str, **data) -> str:
    r = client.post(f"/saga/{type_name}", json={"input": data})
    assert r.status_code == 201, r.json
    return r.json["id"]


def wait_state(client, instance_id: str, *states: str, timeout: float = 30) -> dict:
    return wait_for(lambda: (lambda b: b if b["state"] in states else None)(client.get(f"/sagas/{instance_id}").json),
                    timeout=timeout, what=f"{instance_id} to reach {states}")


def steps(snapshot: dict) -> dict[str, dict]:
    return {s["name"]: s for s in snapshot["steps"]}


def test_a_failed_chain_link_stops_the_chain_and_the_step_is_retried(client, worker, sweeper):
    inst = start(client, "payment")
    snap = wait_state(client, inst, "paid", "failed")
    pay = steps(snap)["pay"]
    # the first link failed once: the second did not run then, and the retry ran the whole chain
    assert snap["state"] == "paid" and pay["data"]["output"] == {"authorized": True}
    assert effects(inst) == {"authorize": 2, "capture": 1}
    assert pay["attempt"] == 2 and pay["status"] == "completed"


def test_a_step_that_kills_its_worker_process_fails_after_its_attempts(client, worker, sweeper):
    poison = start(client, "crash", mode="exit")
    healthy = start(client, "crash", mode="ok")
    snap = wait_state(client, poison, "failed")
    run = steps(snap)["run"]
    assert run["status"] == "failed" and "worker process lost" in run["error"], run
    assert effects(poison) == {"run": 3}  # Retry(attempts=3): delivered once per attempt, no more
    assert wait_state(client, healthy, "done", "failed")["state"] == "done"


def test_a_fanout_branch_that_kills_its_worker_process_fails_alone(client, worker, sweeper):
    inst = start(client, "crash", items=[{"mode": "ok"}, {"mode": "exit"}, {"mode": "ok"}])
    snap = wait_state(client, inst, "failed")
    fan = steps(snap)["fan"]
    assert (fan["done"], fan["failed"]) == (2, 1)
    assert "worker process lost" in fan["data"]["branches"][1]["error"]
    assert effects(inst) == {"run:0": 1, "run:1": 3, "run:2": 1}


@pytest.fixture(scope="module")
def sqlite_processes(env, tmp_path_factory):
    """A worker and a sweeper on the embedded defaults: SQLite state and the kombu SQLite broker."""
    tmp = tmp_path_factory.mktemp("embedded")
    sqlite_env = {**env, **embedded(tmp)}
    url = sqlite_env["DATABASE_URL"]
    upgrade(url)
    procs = [Process(f"sqlite-worker{uuid.uuid4().hex[:4]}", ["worker", "--concurrency", "2"], sqlite_env).start(),
             Process("sqlite-sweeper", ["sweeper"], sqlite_env).start()]
    yield url
    for p in procs:
        p.stop()


def test_on_sqlite_a_step_that_kills_its_worker_process_fails_after_its_attempts(rt, sqlite_processes):
    with engine_on(rt.settings, sqlite_processes) as engine:
        poison, _ = engine.start("crash", {"mode": "exit"})
        healthy, _ = engine.start("crash", {"mode": "ok"})
        snap = wait_for(lambda: (lambda s: s if s["state"] == "failed" else None)(engine.snapshot(poison["id"])),
                        timeout=60, what="the poisoned step to fail")
        assert "worker process lost" in steps(snap)["run"]["error"]
        assert effects(poison["id"]) == {"run": 3}
        wait_for(lambda: engine.snapshot(healthy["id"])["state"] == "done", timeout=30, what="the healthy one")


def wait_compensations(client, instance_id: str) -> dict:
    """The instance once no step waits to be compensated any more."""
    def check():
        body = client.get(f"/sagas/{instance_id}").json
        return body if all(s["status"] not in ("completed", "compensating") for s in body["steps"]) else None

    return wait_for(check, timeout=30, what=f"the compensations of {instance_id}")


def test_a_compensation_that_fails_once_is_retried_and_the_others_run(client, worker, sweeper):
    inst = start(client, "trip", unbook={"flight": "once"})
    wait_state(client, inst, "booked")
    assert client.post(f"/sagas/{inst}/cancel").status_code == 200
    snap = wait_compensations(client, inst)
    assert compensations(inst) == ["car", "flight", "hotel"]  # newest first, each once
    assert effects(inst)["unbook:flight"] == 2
    assert {n: s["status"] for n, s in steps(snap).items()} == {
        "hotel": "compensated", "flight": "compensated", "car": "compensated"}
    assert snap["state"] == "cancelled" and snap["compensation"] == "completed"


@pytest.mark.parametrize("running", ["hotel", "flight"])
def test_a_step_still_running_when_cancelled_is_compensated_once_it_completes(client, worker, sweeper, running):
    """The cancel finds `running` under way: it cannot undo a booking not made yet, so the
    booking made after it is compensated when its step reports, after the others, each once."""
    inst = start(client, "trip", sleep={running: 3})
    wait_for(lambda: effects(inst).get(f"book:{running}") == 1, timeout=30, what=f"{running} to begin")
    assert client.post(f"/sagas/{inst}/cancel").status_code == 200
    snap = wait_for(lambda: (lambda b: b if steps(b)[running]["status"] == "compensated"
                             and b["compensation"] == "completed" else None)(client.get(f"/sagas/{inst}").json),
                    timeout=30, what=f"the late {running} booking to be compensated")
    assert compensations(inst) == ["hotel"] if running == "hotel" else ["hotel", "flight"], compensations(inst)
    assert {n: s["status"] for n, s in steps(snap).items()} == (
        {"hotel": "compensated"} if running == "hotel" else {"hotel": "compensated", "flight": "compensated"})
    assert snap["state"] == "cancelled"
    assert [h["event"] for h in snap["history"]][-1] == "cancel", snap["history"]  # no transition after it


@pytest.mark.parametrize("mode, tries", [("always", 3), ("refused", 1)])
def test_a_compensation_that_keeps_failing_shows_and_the_others_run(client, worker, sweeper, mode, tries):
    inst = start(client, "trip", unbook={"flight": mode})
    wait_state(client, inst, "booked")
    assert client.post(f"/sagas/{inst}/cancel").status_code == 200
    snap = wait_compensations(client, inst)
    assert compensations(inst) == ["car", "hotel"]
    assert effects(inst)["unbook:flight"] == tries  # Retry(attempts=3) for a retryable error, once otherwise
    s = steps(snap)
    assert (s["car"]["status"], s["hotel"]["status"]) == ("compensated", "compensated")
    assert s["flight"]["status"] == "compensation_failed"
    assert ("agency down" if mode == "always" else "booking already used") in s["flight"]["error"]
    assert snap["state"] == "cancelled" and snap["compensation"] == "failed"


def test_on_sqlite_compensations_retry_and_a_failed_one_shows(rt, sqlite_processes):
    with engine_on(rt.settings, sqlite_processes) as engine:
        inst, _ = engine.start("trip", {"unbook": {"flight": "always", "car": "once"}})
        wait_for(lambda: engine.snapshot(inst["id"])["state"] == "booked", timeout=60, what="the bookings")
        engine.cancel(inst["id"])
        snap = wait_for(lambda: (lambda s: s if s["compensation"] in ("completed", "failed") else None)(
            engine.snapshot(inst["id"])), timeout=60, what="the compensations")
        assert {n: s["status"] for n, s in steps(snap).items()} == {
            "hotel": "compensated", "flight": "compensation_failed", "car": "compensated"}
        assert compensations(inst["id"]) == ["car", "hotel"]
        assert effects(inst["id"]) == {"unbook:car": 2, "unbook:flight": 3, "unbook:hotel": 1}
        assert snap["compensation"] == "failed" and snap["state"] == "cancelled"
