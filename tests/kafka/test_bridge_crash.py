"""Exactly one effect per event when a bridge is SIGKILLed in the middle of a burst, and when
one of two bridges in a group stops mid-stream and its partitions move to the other. No other
bridge runs in this module: the bridges under test are the only consumers of the burst."""
from __future__ import annotations

import signal
import uuid
from collections import Counter as Tally

import pytest
from conftest import wait_for
from sqlalchemy import func, select

from orchestrator.models import ProcessedMessage

from .conftest import metric, start_bridge

pytestmark = pytest.mark.kafka


def make_counters(kclient, n):
    keys = [f"c-{uuid.uuid4().hex[:8]}" for _ in range(n)]
    for k in keys:
        assert kclient.post("/saga/test_counter", json={"key": k}).status_code == 201
    return keys


def burst(kafka, keys, count):
    """`count` events for `keys`, each with the event id `<tag>-<seq>`: (expected totals, tag)."""
    expected, tag = Tally(), f"burst-{uuid.uuid4().hex[:8]}"
    for seq in range(count):
        key = keys[seq % len(keys)]
        kafka.send("test.increments", {"counter": key, "n": 1, "seq": seq}, key=key, event_id=f"{tag}-{seq}",
                   flush=False)
        expected[key] += 1
    kafka.flush()
    return expected, tag


def counters(krt, keys):
    from orchestrator.models import WorkflowInstance

    with krt.sessions() as s:
        rows = s.execute(select(WorkflowInstance.business_key, WorkflowInstance.context).where(
            WorkflowInstance.type == "test_counter", WorkflowInstance.business_key.in_(keys))).all()
    return {k: ctx for k, ctx in rows}


def applied(krt, keys):
    return sum(ctx["total"] for ctx in counters(krt, keys).values())


def processed(krt, tag):
    """De-duplication records of one burst's events. A new consumer group reads the topic from
    its start, so events other tests of the session sent and nobody consumed are processed too:
    counting every record of the topic counted those (1025 for a burst of 1000)."""
    with krt.sessions() as s:
        return s.execute(select(func.count()).where(ProcessedMessage.consumer == "kafka:test.increments",
                                                    ProcessedMessage.message_id.like(f"{tag}-%"))).scalar_one()


def check_exactly_once(krt, keys, expected, count):
    state = counters(krt, keys)
    for key in keys:
        seen = state[key]["seen"]
        assert len(seen) == len(set(seen)), f"{key}: an event counted twice"
        assert state[key]["total"] == expected[key] == len(seen), key
    assert sorted(s for ctx in state.values() for s in ctx["seen"]) == list(range(count))


def test_bridge_killed_during_a_burst_then_restarted(kclient, kafka, krt, kenv):
    keys = make_counters(kclient, 40)
    expected, tag = burst(kafka, keys, 1000)
    group = {**kenv, "CONSUMER_GROUP": f"crash-{uuid.uuid4().hex[:6]}"}
    first = start_bridge(group, "bridge-crash-1")
    try:
        wait_for(lambda: applied(krt, keys) >= 150, timeout=60, what="the burst under way")
    finally:
        first.kill(signal.SIGKILL)
    done_at_kill = applied(krt, keys)
    assert done_at_kill < 1000, "the bridge finished before it could be killed; the test proves nothing"
    second = start_bridge(group, "bridge-crash-2")
    try:
        wait_for(lambda: len({s for c in counters(krt, keys).values() for s in c["seen"]}) >= 1000, timeout=120,
                 what="all 1000 events applied after the restart")
        second.stop()  # drained: nothing more can arrive
        check_exactly_once(krt, keys, expected, 1000)
        assert processed(krt, tag) == 1000
    finally:
        second.stop()


def test_two_bridges_one_stops_mid_stream(kclient, kafka, krt, kenv):
    keys = make_counters(kclient, 40)
    group = {**kenv, "CONSUMER_GROUP": f"pair-{uuid.uuid4().hex[:6]}"}
    a = start_bridge(group, "bridge-pair-a")
    b = start_bridge(group, "bridge-pair-b")
    try:
        wait_for(lambda: "revoked" in a.output() or "assigned" in b.output(), timeout=30, what="both in the group")
        expected, tag = burst(kafka, keys, 1000)
        wait_for(lambda: applied(krt, keys) >= 200, timeout=60, what="the stream under way")
        wait_for(lambda: all(metric(p, "orchestrator_kafka_events_total", topic="test.increments") > 0
                             for p in (a, b)), timeout=30, what="both bridges consuming the stream")
        a.stop()  # SIGTERM: commit, leave the group; b takes its partitions
        assert a.proc.returncode == 0, a.output()[-2000:]
        assert "bridge stopped after" in a.output()
        wait_for(lambda: len({s for c in counters(krt, keys).values() for s in c["seen"]}) >= 1000, timeout=120,
                 what="all events applied by the survivor")
        assert metric(b, "orchestrator_kafka_events_total", topic="test.increments") > 0
        b.stop()  # drained
        check_exactly_once(krt, keys, expected, 1000)
        assert processed(krt, tag) == 1000
    finally:
        a.stop()
        b.stop()
