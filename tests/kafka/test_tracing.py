"""A route that enters through Kafka is one trace: the bridge's consume span, the engine's start
and transition, the outbox publish (by the bridge or a sweeper) with the confluent-kafka
instrumentation's send span under it, and the message it produces, whose W3C `traceparent` header
carries the trace on."""
from __future__ import annotations

import uuid

import pytest
from conftest import Process, wait_for
from otlp import Receiver

from .conftest import headers, start_bridge

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced_bridge(kenv, receiver):
    tenv = {**kenv, **receiver.env()}
    sweeper = Process("tksweeper", ["sweeper"], tenv).start()
    bridge = start_bridge(tenv, "tbridge")
    yield bridge
    bridge.stop()
    sweeper.stop()


def test_a_consumed_event_is_one_trace(traced_bridge, kafka, receiver):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking", "city": "Kazan"}, key=route_id)

    def consumed():
        with receiver.lock:
            return [s for s in receiver.spans if s.name == "route.confirmed process"
                    and s.attributes.get("workflow.key") == route_id]

    consume = wait_for(consumed, timeout=40, what="the bridge's consume span")[0]
    assert consume.service == "orchestrator-bridge"
    trace = consume.trace_id

    def in_trace(prefix):
        with receiver.lock:
            return [s for s in receiver.spans if s.trace_id == trace and s.name.startswith(prefix)]

    start = wait_for(lambda: in_trace("workflow start"), timeout=20, what="the start span")[0]
    instance_id = start.attributes["workflow.id"]
    assert start.attributes["workflow.type"] == "route_content" and start.attributes["workflow.key"] == route_id
    publish = wait_for(lambda: [s for s in in_trace("outbox publish") if s.attributes.get("workflow.id") == instance_id],
                       timeout=20, what="the outbox publish in the event's trace")
    assert {s.service for s in publish} <= {"orchestrator-bridge", "orchestrator-sweeper"}
    assert all(s.attributes["workflow.id"] == instance_id for s in in_trace("transition"))
    # the message produced goes on with the same trace
    sent = kafka.read("story.generate", until=lambda ms: any(m.key() == route_id.encode() for m in ms))
    mine = [m for m in sent if m.key() == route_id.encode()]
    assert mine and headers(mine[0]).get("traceparent", "").split("-")[1] == trace
    # ... from the confluent-kafka instrumentation's send span, a child of the outbox publish span,
    # which carries the workflow's attributes
    span_id = headers(mine[0])["traceparent"].split("-")[2]
    send = wait_for(lambda: [s for s in in_trace("story.generate send") if s.span_id == span_id], timeout=20,
                    what="the send span the message's traceparent names")[0]
    assert send.attributes.get("messaging.system") == "kafka"
    parent = wait_for(lambda: [s for s in in_trace("outbox publish") if s.span_id == send.parent_id], timeout=20,
                      what="the send span's parent")[0]
    assert parent.name == "outbox publish story.generate" and parent.attributes.get("workflow.key") == route_id
