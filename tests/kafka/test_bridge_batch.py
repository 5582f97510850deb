"""The bridge applies a polled batch of events in one transaction: a poison event in the middle
of a batch is dead-lettered alone while every other event is applied; a bridge SIGKILLed in the
middle of batches leaves exactly one effect per event after a restart; the bridge's relay keeps
the outbox drained under a burst. No other bridge runs in this module (each test has a group of
its own, started after its events are on the topic, so they arrive in batches; the bursts of
starts go to a broker of their own)."""
from __future__ import annotations

import json
import re
import signal
import uuid
from collections import Counter as Tally

import pytest
from conftest import wait_for
from sqlalchemy import func, select

from orchestrator.models import OutboxMessage, ProcessedMessage, WorkflowInstance

from .conftest import headers, start_bridge
from .test_bridge_crash import check_exactly_once, counters, make_counters

pytestmark = pytest.mark.kafka


def own_group(kenv, name):
    return {**kenv, "CONSUMER_GROUP": f"{name}-{uuid.uuid4().hex[:6]}"}


def routes(krt, ids):
    with krt.sessions() as s:
        return s.execute(select(WorkflowInstance.business_key, func.count()).where(
            WorkflowInstance.type == "route_content", WorkflowInstance.business_key.in_(ids))
            .group_by(WorkflowInstance.business_key)).all()


def outbox_of(krt, ids):
    """(business key, target, sent?) of every outbox row of the routes `ids`."""
    with krt.sessions() as s:
        return s.execute(select(WorkflowInstance.business_key, OutboxMessage.target, OutboxMessage.sent_at.isnot(None))
                         .join(OutboxMessage, OutboxMessage.instance_id == WorkflowInstance.id)
                         .where(WorkflowInstance.type == "route_content",
                                WorkflowInstance.business_key.in_(ids))).all()


def published_routes(kafka, wanted, timeout=120.0):
    """The route ids of story.generate, read from the start until `wanted` are all there."""
    import time

    from confluent_kafka import Consumer

    from orchestrator.kafka import consumer_config

    consumer = Consumer(consumer_config(kafka.brokers, f"reader-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe(["story.generate"])
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while not wanted <= seen and time.monotonic() < deadline:
            seen |= {json.loads(m.value())["route_id"] for m in consumer.consume(1000, 0.5) if not m.error()}
    finally:
        consumer.close()
    return seen


def test_a_poison_event_in_the_middle_of_a_batch_is_dead_lettered_alone(kclient, kafka, krt, kenv):
    keys = make_counters(kclient, 10)
    poison = {  # each in the middle of the burst, on the partition of a counter
        json.dumps({"counter": keys[3], "n": "five", "seq": 1000}).encode(): "n: must be an integer, got 'five'",
        b"{not json": "invalid JSON: ",
        json.dumps({"counter": "c-nobody", "n": 1, "seq": 1001}).encode(): "unroutable: unknown counter c-nobody",
    }
    expected = Tally()
    dup = f"dup-{uuid.uuid4().hex[:8]}"  # one event delivered twice in the burst: applied once
    for seq in range(300):
        key = keys[seq % len(keys)]
        kafka.send("test.increments", {"counter": key, "n": 1, "seq": seq}, key=key, flush=False)
        expected[key] += 1
        if seq == 150:
            for i, raw in enumerate(poison):
                kafka.send("test.increments", None, raw=raw, key=keys[i], flush=False)
            for _ in range(2):
                kafka.send("test.increments", {"counter": keys[5], "n": 1, "seq": 300}, key=keys[5], event_id=dup,
                           flush=False)
            expected[keys[5]] += 1
    kafka.flush()
    bridge = start_bridge(own_group(kenv, "poison"), "bridge-poison")
    try:
        wait_for(lambda: len({s for c in counters(krt, keys).values() for s in c["seen"]}) >= 301, timeout=90,
                 what="every good event applied")
        found = kafka.read("test.increments.dlq", timeout=30,
                           until=lambda ms: all(any(m.value() == raw for m in ms) for raw in poison))
        for raw, reason in poison.items():
            entries = [m for m in found if m.value() == raw]
            assert len(entries) == 1, raw
            assert headers(entries[0])["dlq_reason"].startswith(reason), headers(entries[0])
        bridge.stop()
        check_exactly_once(krt, keys, expected, 301)
        # the second copy was skipped, and the warning says when the first was handled
        assert re.search(rf"duplicate test\.increments/\d+@\d+ \(event id {dup}, first handled [^)]+\): skipped",
                         bridge.output()), bridge.output()[-3000:]
        # the poison came in a batch with good events; they were applied together, it alone
        batches = [tuple(map(int, m)) for m in re.findall(r"batch of (\d+) events: (\d+) applied together, (\d+) alone",
                                                          bridge.output())]
        assert any(together > 0 and alone >= 1 for _, together, alone in batches), batches
    finally:
        bridge.stop()


def on_own_broker(kenv, own_broker):
    """(environment, producer) for a broker of the test's own: its thousands of story.generate
    messages stay away from the session broker's emulators."""
    from .conftest import Kafka

    return {**kenv, "KAFKA_BROKERS": own_broker.bootstrap}, Kafka(own_broker.bootstrap)


def test_bridge_killed_in_the_middle_of_batches_of_starts(krt, kenv, own_broker):
    """route.confirmed starts (instance, history, outbox row and de-duplication row, all held
    back and inserted together): after a SIGKILL and a restart each route has one instance, one
    story.generate row and one processed_messages row."""
    kenv, kafka = on_own_broker(kenv, own_broker)
    tag = uuid.uuid4().hex[:6]
    ids = [f"rk-{tag}-{i}" for i in range(3000)]
    for rid in ids:
        kafka.send("route.confirmed", {"route_id": rid, "mode": "walking"}, key=rid, flush=False)
    kafka.flush()
    group = own_group(kenv, "kill")
    with krt.sessions() as s:
        before = s.execute(select(func.count()).where(ProcessedMessage.consumer == "kafka:route.confirmed")).scalar()
    first = start_bridge(group, "bridge-kill-1")
    try:
        wait_for(lambda: len(routes(krt, ids)) > 0, timeout=90, what="the first batch committed")
    finally:
        first.kill(signal.SIGKILL)
    at_kill = len(routes(krt, ids))
    assert at_kill < len(ids), "every batch was done before the kill; the test proves nothing"
    second = start_bridge(group, "bridge-kill-2")
    try:
        wait_for(lambda: len(routes(krt, ids)) >= len(ids), timeout=180, what="every route after the restart")
        second.stop()
        assert all(n == 1 for _, n in routes(krt, ids))
        rows = outbox_of(krt, ids)
        assert sorted(k for k, t, _ in rows if t == "story.generate") == sorted(ids)
        with krt.sessions() as s:
            after = s.execute(select(func.count()).where(ProcessedMessage.consumer == "kafka:route.confirmed")).scalar()
        assert after - before == len(ids)
    finally:
        second.stop()


def test_the_relay_keeps_the_outbox_drained_under_a_burst(krt, kenv, own_broker):
    """No sweeper runs: every story.generate row the bridge writes is published by the bridge's
    own relay, marked sent, and on the topic."""
    kenv, kafka = on_own_broker(kenv, own_broker)
    tag = uuid.uuid4().hex[:6]
    ids = [f"rb-{tag}-{i}" for i in range(2000)]
    for rid in ids:
        kafka.send("route.confirmed", {"route_id": rid, "mode": "walking"}, key=rid, flush=False)
    kafka.flush()
    bridge = start_bridge(own_group(kenv, "relay"), "bridge-relay")
    try:
        wait_for(lambda: len(routes(krt, ids)) >= len(ids), timeout=120, what="every route")
        wait_for(lambda: all(sent for _, _, sent in outbox_of(krt, ids)), timeout=60, what="the outbox drained")
        assert set(ids) <= published_routes(kafka, set(ids))
    finally:
        bridge.stop()


@pytest.fixture(params=["postgresql", "sqlite"])
def store(request, kenv, own_broker, tmp_path):
    """(database URL, bridge environment) on one configuration, with a Kafka broker of its own."""
    from conftest import embedded, fresh_database

    from orchestrator.migrate import upgrade

    kenv, kafka = on_own_broker(kenv, own_broker)
    if request.param == "sqlite":
        files = embedded(tmp_path)
        upgrade(files["DATABASE_URL"])
        yield files["DATABASE_URL"], {**kenv, **files}, kafka
    else:
        with fresh_database() as url:
            yield url, {**kenv, "DATABASE_URL": url}, kafka


def test_a_handler_that_reads_its_own_table_reads_through_the_batch(krt, store):
    """worker.status looks up the worker's status before it fires. It used to read through a
    session of its own: on SQLite that session's BEGIN IMMEDIATE waited for the batch's own write
    lock until the 30 s busy timeout, every process writing the file stalled meanwhile, and the
    batch rolled back to be handled event by event."""
    from conftest import engine_on

    url, env, kafka = store
    with engine_on(krt.settings, url) as engine:
        ids = [engine.start("worker_deployment", {"scenario_uuid": str(uuid.uuid4()),
                                                  "camera_url": "rtsp://cam.example/s"})[0]["id"] for _ in range(3)]
        for wid in ids:  # on one partition before the bridge joins: they arrive in one fetch, one batch
            kafka.send("worker.status", {"worker_id": wid, "status": "running", "process_pid": 7}, key="one-partition",
                       flush=False)
        kafka.flush()
        bridge = start_bridge(own_group(env, "reads"), "bridge-reads", log_level="DEBUG")  # logs every batch
        try:
            wait_for(lambda: [engine.snapshot(i, history=False)["state"] for i in ids] == ["running"] * 3,
                     timeout=90, what="every worker running")
        finally:
            bridge.stop()
    log = bridge.output()
    assert "rolled back" not in log, log[-3000:]
    assert "batch of 3 events: 3 applied together, 0 alone" in log, log[-3000:]
