"""The relay's Kafka producer outlives a broker that restarts empty (the bundled broker keeps
nothing, so its restart loses every topic and the producers' idempotence state): a sweeper started
before the restart still sends the rows written after it. Found by the fault-injection run
(bench/chaos): the sweeper's long-lived producer timed out on every row, for ever."""
from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from conftest import Process, wait_for

from orchestrator.entrypoints.kafka_broker import BundledBroker
from orchestrator.kafka import ensure_topics

from .conftest import TOPICS, Kafka

pytestmark = pytest.mark.kafka


def left_for_the_sweeper(krt: Any, route_id: str) -> None:
    """A route started by a process that died before its kick: its story.generate row waits in
    the outbox for a sweeper."""
    from orchestrator.engine import Engine
    from orchestrator.workflow import registry

    Engine(krt.settings, krt.sessions, registry, relay=None).start(
        "route_content", {"route_id": route_id, "mode": "walking"}, key=route_id)


def story_request(kafka: Kafka, route_id: str) -> Any:
    def found(ms: list[Any]) -> list[Any]:
        return [json.loads(m.value()) for m in ms if m.key() == route_id.encode()]

    return wait_for(lambda: found(kafka.read("story.generate", timeout=5, until=found)), timeout=90,
                    interval=0.5, what=f"story.generate for {route_id}")


def test_the_sweeper_sends_to_a_broker_that_restarted_empty(kenv, krt, tmp_path):
    broker = BundledBroker(log_path=tmp_path / "tansu.log").start()
    ensure_topics(broker.bootstrap, TOPICS)
    env = {**kenv, "KAFKA_BROKERS": broker.bootstrap}
    sweeper = Process("restart-sweeper", ["sweeper"], env).start()
    try:
        before = f"before-{uuid.uuid4().hex[:8]}"
        left_for_the_sweeper(krt, before)
        assert story_request(Kafka(broker.bootstrap), before) == [{"route_id": before, "lang": "ru"}]

        broker.stop()  # everything it held is gone
        broker = BundledBroker(port=broker.port, log_path=tmp_path / "tansu-2.log").start()
        ensure_topics(broker.bootstrap, TOPICS)
        after = f"after-{uuid.uuid4().hex[:8]}"
        left_for_the_sweeper(krt, after)
        assert story_request(Kafka(broker.bootstrap), after) == [{"route_id": after, "lang": "ru"}], \
            sweeper.output()[-3000:]
    finally:
        sweeper.stop()
        broker.stop()
