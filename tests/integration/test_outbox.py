"""The outbox on both configurations (PostgreSQL + RabbitMQ, and the embedded SQLite + kombu
`sqla+sqlite` broker that `make run` uses), with real worker and sweeper processes: every row is
published once and marked sent, a restart on the same files sends nothing again, and a step
message delivered twice runs its step once."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import redis
from sqlalchemy import create_engine, func, select, text

from conftest import (AMQP, REDIS, ROOT, Process, _rabbitmqctl, embedded, emulator_stats, engine_on,
                      fresh_database, wait_for)
from orchestrator.migrate import upgrade
from orchestrator.models import OutboxMessage

#: Stands in for an API process: starts instances through the runtime (kick after commit, the
#: kicker's marks at exit). With "twice", every step message is published twice, as after a
#: crash between publish and the sent-mark. With "slow", each publish takes 30 ms more (a
#: broker slow to confirm: the process falls behind what it writes); "slow-hang" also waits,
#: after printing the ids, to be killed.
STARTER = textwrap.dedent("""
    import json, sys, time
    from orchestrator import runtime
    from orchestrator.config import load_settings
    rt = runtime.build(load_settings())
    publish = rt.relay.publishers["celery"]
    if sys.argv[1] == "twice":
        def twice(row):
            publish(row)
            publish(row)
        rt.relay.publishers["celery"] = twice
    elif sys.argv[1].startswith("slow"):
        def slow(row):
            time.sleep(0.03)
            publish(row)
        rt.relay.publishers["celery"] = slow
    ids = [rt.engine.start(kind, data)[0]["id"] for kind, data in json.loads(sys.argv[2])]
    print(json.dumps(ids), flush=True)
    if sys.argv[1] == "slow-hang":
        time.sleep(600)
""")


@contextmanager
def vhost() -> Iterator[str]:
    name = f"orch-outbox-{uuid.uuid4().hex[:8]}"
    assert _rabbitmqctl("add_vhost", name) and _rabbitmqctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    try:
        yield f"{AMQP}/{name}"
    finally:
        _rabbitmqctl("delete_vhost", name)


@pytest.fixture(params=["postgresql", "sqlite"])
def stack(request, env, tmp_path) -> Iterator[dict[str, Any]]:
    """An environment of its own (database, broker, media emulators) on one configuration."""
    from emulators.media import SERVICES, EmulatorServer

    servers = {name: EmulatorServer(name, job_seconds=0.3, hang_seconds=3.0).start() for name in SERVICES}
    urls = {"VIDEO_DOWNLOADER_URL": servers["video-downloader"].url,
            "AUDIO_NORMALIZATION_URL": servers["audio-normalization"].url,
            "AUDIO_TRANSCRIBER_URL": servers["audio-transcriber"].url}
    try:
        if request.param == "sqlite":
            files = embedded(tmp_path)
            upgrade(files["DATABASE_URL"])
            yield {"kind": "sqlite", "url": files["DATABASE_URL"], "broker": files["CELERY_BROKER_URL"],
                   "emulators": servers, "env": {**env, **urls, **files}}
        else:
            with fresh_database() as url, vhost() as broker:
                yield {"kind": "postgresql", "url": url, "broker": broker, "emulators": servers,
                       "env": {**env, **urls, "DATABASE_URL": url, "CELERY_BROKER_URL": broker}}
    finally:
        for server in servers.values():
            server.stop()


def start(stack: dict[str, Any], items: list[tuple[str, dict[str, Any]]], mode: str = "once") -> list[str]:
    out = subprocess.run([sys.executable, "-c", STARTER, mode, json.dumps(items)], env=stack["env"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def orders(n: int) -> list[tuple[str, dict[str, Any]]]:
    return [("order", {"parcels": [], "n": uuid.uuid4().hex})] * n


def effects(instance_id: str) -> dict[str, int]:
    raw = redis.Redis.from_url(REDIS).hgetall(f"effects:{instance_id}")
    return {k.decode(): int(v) for k, v in raw.items()}


def outbox(stack: dict[str, Any]) -> dict[str, Any]:
    """Rows by fate (sent, unsent: still to go), and the step tasks their Celery rows carry."""
    from collections import Counter

    db = create_engine(stack["url"])
    try:
        with db.connect() as conn:
            o = OutboxMessage.__table__.c
            tasks: Counter[str] = Counter()
            for (payload,) in conn.execute(select(o.payload).where(o.channel == "celery")):
                p = payload if isinstance(payload, dict) else json.loads(payload)
                tasks.update(n for n, _ in ([p["task"]] if "task" in p else p.get("chain") or p.get("group")))
            return {
                "sent": conn.execute(select(func.count()).where(o.sent_at.is_not(None))).scalar_one(),
                "unsent": conn.execute(select(func.count()).where(o.sent_at.is_(None), o.failed_at.is_(None)))
                .scalar_one(),
                "tasks": tasks,
            }
    finally:
        db.dispose()


def queued_messages(stack: dict[str, Any]) -> int:
    """Messages waiting in the broker's queues (no worker consumes them): on RabbitMQ from the
    queues' counts (`declare_queues` first: RabbitMQ drops a message no queue is bound for), on
    the embedded broker every message it was given."""
    if stack["kind"] == "sqlite":
        return sum(broker_messages(stack).values())
    from celery import Celery

    app = Celery(broker=stack["broker"], config_source="celeryconfig")
    try:
        with app.connection_for_write() as conn:
            return sum(conn.default_channel.queue_declare(queue=q.name, passive=True).message_count
                       for q in app.amqp.queues.values())
    finally:
        app.close()


def declare_queues(stack: dict[str, Any]) -> None:
    if stack["kind"] == "sqlite":
        return
    from celery import Celery

    app = Celery(broker=stack["broker"], config_source="celeryconfig")
    try:
        with app.connection_for_write() as conn:
            for q in app.amqp.queues.values():
                q(conn.default_channel).declare()
    finally:
        app.close()


def leased(stack: dict[str, Any]) -> int:
    """Outbox rows that have had a publish lease."""
    db = create_engine(stack["url"])
    try:
        with db.connect() as conn:
            o = OutboxMessage.__table__.c
            return conn.execute(select(func.count()).where(o.lease_until.is_not(None))).scalar_one()
    finally:
        db.dispose()


def broker_messages(stack: dict[str, Any]) -> Any:
    """The tasks of every message ever put on the embedded broker (kombu's sqla transport keeps
    consumed rows, invisible); None on RabbitMQ."""
    from collections import Counter

    if stack["kind"] != "sqlite":
        return None
    db = create_engine(stack["broker"].removeprefix("sqla+"))
    try:
        with db.connect() as conn:
            payloads = conn.execute(text("SELECT payload FROM kombu_message")).scalars()
            return Counter(json.loads(p)["headers"]["task"] for p in payloads)
    finally:
        db.dispose()


def start_worker(stack: dict[str, Any], concurrency: int) -> Process:
    """A worker process; on RabbitMQ, answering ping first (a message published before its queue
    exists would be dropped). kombu's sqla queues are tables: they keep messages meanwhile."""
    from celery import Celery

    name = f"ow{uuid.uuid4().hex[:6]}"
    worker = Process(name, ["worker", "--concurrency", str(concurrency), "--name", f"{name}@%h"],
                     stack["env"]).start()
    if stack["kind"] == "postgresql":
        app = Celery(broker=stack["broker"])
        try:
            wait_for(lambda: any(k.startswith(f"{name}@") for r in app.control.ping(timeout=0.5) for k in r),
                     timeout=60, what=f"worker {name} to answer ping")
        finally:
            app.close()
    return worker


def states(stack: dict[str, Any], rt: Any, ids: list[str]) -> list[str]:
    with engine_on(rt.settings, stack["url"]) as engine:
        return [engine.snapshot(i, history=False)["state"] for i in ids]


def stalled(stack: dict[str, Any], rt: Any, ids: list[str], *processes: Process) -> str:
    """What a timed-out run was waiting on: each instance's steps, the outbox, the processes' logs."""
    lines = []
    with engine_on(rt.settings, stack["url"]) as engine:
        for i in ids:
            snap = engine.snapshot(i, history=False)
            steps = ", ".join(f"{s['name']}={s['status']}#{s['attempt']}" for s in snap.get("steps", []))
            lines.append(f"{i} {snap['state']}: {steps}")
    lines.append(f"outbox: {outbox(stack)}")
    for p in processes:
        lines.append(f"--- {p.name} (last 60 lines)\n" + "\n".join(p.output().splitlines()[-60:]))
    return "\n".join(lines)


def test_each_row_is_sent_once_and_a_restart_sends_nothing_again(stack, rt):
    # First run: a worker only, and the processes stop as soon as the work is done.
    worker = start_worker(stack, 2)
    try:
        first = start(stack, orders(3))
        wait_for(lambda: set(states(stack, rt, first)) == {"awaiting_approval"}
                 and all(effects(i).get("notify") for i in first), timeout=60, what="orders to await approval")
        wait_for(lambda: outbox(stack)["unsent"] == 0, timeout=20, what="every row marked sent")
    finally:
        worker.stop()
    # Second run on the same database and broker, now with a sweeper: it finds nothing to send.
    worker = start_worker(stack, 2)
    sweeper = Process("osweeper", ["sweeper"], stack["env"]).start()
    try:
        second = start(stack, orders(1) + [("media", {"youtube_url": f"https://youtu.be/o{uuid.uuid4().hex[:8]}"})])
        wait_for(lambda: states(stack, rt, second) == ["awaiting_approval", "completed"]
                 and effects(second[0]).get("notify"), timeout=90, what="the second run's order and media job")
        wait_for(lambda: outbox(stack)["unsent"] == 0, timeout=20, what="every row marked sent")
    finally:
        sweeper.stop()
        worker.stop()
    rows = outbox(stack)
    # one broker message per task of each row (a chain's next link is sent when the one before ends)
    assert broker_messages(stack) in (None, rows["tasks"]), rows
    for instance_id in first + second[:1]:
        assert effects(instance_id) == {"reserve": 1, "authorize": 1, "capture": 1, "notify": 1}
    for service in stack["emulators"]:
        assert emulator_stats(stack["emulators"], service)["submit_requests"] == 1, service


def test_a_step_message_delivered_twice_runs_its_step_once(stack, rt):
    worker = start_worker(stack, 4)
    try:
        ids = start(stack, orders(4) + [("media", {"youtube_url": f"https://youtu.be/d{uuid.uuid4().hex[:8]}"})],
                    mode="twice")
        sweeper = Process("dsweeper", ["sweeper"], stack["env"]).start()
        try:
            try:
                wait_for(lambda: states(stack, rt, ids) == ["awaiting_approval"] * 4 + ["completed"], timeout=90,
                         what="orders to await approval and the media job to complete")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n{stalled(stack, rt, ids, worker, sweeper)}") from None
        finally:
            sweeper.stop()
    finally:
        worker.stop()
    for instance_id in ids[:4]:
        e = effects(instance_id)
        assert (e["reserve"], e["authorize"], e["capture"]) == (1, 1, 1), e
    for service in stack["emulators"]:
        assert emulator_stats(stack["emulators"], service)["submit_requests"] == 1, service


def test_a_process_that_falls_behind_keeps_its_rows_from_the_sweepers(stack):
    # Each publish 30 ms: 150 starts written in about a second take 4.5 s to publish, so most
    # rows are past the sweepers' 2 s grace period before their writer sends them. Their lease
    # keeps the sweeper (every 0.2 s here) off them: without it, 264-278 messages reached the
    # broker. A row whose lease or mark the writer's threads write late (a machine whose CPU is
    # taken by other processes, as when tests run side by side) can still go twice, as the
    # README says, and its consumer ignores the copy: 1 to 3 of 150 in 4 of 20 runs side by side.
    declare_queues(stack)
    sweeper = Process("lsweeper", ["sweeper"], {**stack["env"], "SWEEP_INTERVAL": "0.2"}).start()
    try:
        ids = start(stack, orders(150), mode="slow")  # returns once its kicker has sent and marked all
        wait_for(lambda: outbox(stack)["unsent"] == 0, timeout=30, what="every row marked sent")
        rows = outbox(stack)
    finally:
        sweeper.stop()
    assert len(ids) == 150 and rows["sent"] == 150, rows
    assert leased(stack) > 0  # the writer fell behind, as meant
    assert 150 <= queued_messages(stack) <= 160


def test_the_rows_a_dead_process_had_leased_go_out_once_the_lease_runs_out(stack):
    import signal

    from orchestrator.outbox_relay import LEASE_SECONDS

    declare_queues(stack)
    sweeper = Process("ksweeper", ["sweeper"], {**stack["env"], "SWEEP_INTERVAL": "0.2"}).start()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, "slow-hang", json.dumps(orders(150))],
                               env=stack["env"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        ids = json.loads(starter.stdout.readline())  # type: ignore[union-attr]
        wait_for(lambda: leased(stack) > 0, timeout=30, what="the starter to lease the rows it lags on")
        os.killpg(starter.pid, signal.SIGKILL)
        starter.wait(10)
        killed_with = outbox(stack)["unsent"]
        wait_for(lambda: outbox(stack)["unsent"] == 0, timeout=LEASE_SECONDS + 30,
                 what="the sweeper to send the dead starter's rows")
    finally:
        if starter.poll() is None:
            os.killpg(starter.pid, signal.SIGKILL)
        sweeper.stop()
    assert len(ids) == 150 and killed_with > 0 and outbox(stack)["sent"] == 150
    assert queued_messages(stack) >= 150  # a row sent and not yet marked when killed goes twice


@pytest.fixture(params=["postgresql", "sqlite"])
def engine(request, rt, tmp_path):
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/claims.db"
        upgrade(url)
        with engine_on(rt.settings, url) as engine:
            yield engine
    else:
        with fresh_database() as url, engine_on(rt.settings, url) as engine:
            yield engine


def test_of_copies_of_one_dispatch_claimed_at_once_exactly_one_runs(engine):
    inst, _ = engine.start("order", {"parcels": [{"id": "a"}, {"id": "b"}]})
    copies = [engine.claim_step(inst["id"], "reserve", 1) for _ in range(8)]
    assert all(c is not None for c in copies)  # the read alone lets every copy through
    with ThreadPoolExecutor(8) as pool:
        taken = list(pool.map(lambda c: engine.take_claim(c, "order.reserve"), copies))
    assert taken.count(True) == 1, taken
    # A broker redelivery (its consumer died) takes the claim over; a plain copy still cannot.
    assert engine.take_claim(copies[0], "order.reserve", redelivered=True)
    assert not engine.take_claim(copies[1], "order.reserve")
    # Each link of a chain claims for itself.
    assert engine.take_claim(copies[2], "order.other") and not engine.take_claim(copies[3], "order.other")


def test_a_new_dispatch_of_the_same_attempt_is_claimed_again(engine):
    """A poll dispatches the same attempt again: that dispatch runs, its copies do not."""
    from orchestrator.engine import Done, Poll

    inst, _ = engine.start("order", {"parcels": []})
    first = engine.claim_step(inst["id"], "reserve", 1)
    assert engine.take_claim(first, "order.reserve")
    engine.step_progress(inst["id"], "reserve", 1, Poll(after=0), basis=first.basis)
    wait_for(lambda: (engine.fire_due_timers(), engine.snapshot(inst["id"], history=False)["steps"][0])[1]
             ["status"] == "queued", timeout=10, what="the poll to dispatch the step again")
    again = engine.claim_step(inst["id"], "reserve", 1)
    assert again is not None and again.dispatch == first.dispatch + 1
    assert engine.take_claim(again, "order.reserve")
    assert not engine.take_claim(engine.claim_step(inst["id"], "reserve", 1), "order.reserve")
    engine.step_succeeded(inst["id"], "reserve", 1, Done("reserved", {}), basis=again.basis)
    assert engine.snapshot(inst["id"], history=False)["state"] == "charging"


def test_a_delivery_claims_and_reads_its_step_at_once(engine):
    """`Engine.claim`, what a delivery does before its work (on PostgreSQL one statement that
    claims the dispatch its step row holds and reads the basis): of copies of one dispatch
    delivered at once one gets the step, a redelivery takes it over, an attempt that is not the
    step's gets nothing, and a new dispatch of the same attempt is claimed again."""
    from orchestrator.engine import Poll

    inst, _ = engine.start("order", {"parcels": []})
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda _: engine.claim("order.reserve", inst["id"], "reserve", 1), range(8)))
    taken = [c for c in got if c is not None]
    assert len(taken) == 1, got
    first = taken[0]
    assert first.basis is not None and first.basis[0]["id"] == inst["id"] and first.input == {"parcels": []}
    assert engine.claim("order.reserve", inst["id"], "reserve", 1) is None
    assert engine.claim("order.reserve", inst["id"], "reserve", 1, redelivered=True) is not None
    assert engine.claim("order.reserve", inst["id"], "reserve", 2) is None
    assert engine.claim("order.other", inst["id"], "reserve", 1) is not None  # each chain link claims
    engine.step_progress(inst["id"], "reserve", 1, Poll(after=0), basis=first.basis)
    wait_for(lambda: (engine.fire_due_timers(), engine.snapshot(inst["id"], history=False)["steps"][0])[1]
             ["status"] == "queued", timeout=10, what="the poll to dispatch the step again")
    again = engine.claim("order.reserve", inst["id"], "reserve", 1)
    assert again is not None and again.dispatch == first.dispatch + 1
    assert engine.claim("order.reserve", inst["id"], "reserve", 1) is None
