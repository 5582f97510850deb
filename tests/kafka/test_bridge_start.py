"""The bridge started before its Kafka broker waits for it (with backoff, saying what it waits
for) instead of exiting, and handles events once the broker is up."""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from conftest import Process, wait_for

from orchestrator.entrypoints.kafka_broker import BundledBroker
from orchestrator.entrypoints.ports import free_port

pytestmark = pytest.mark.kafka


@contextmanager
def broker_and_bridge(kenv: dict[str, str], tmp_path: Path, name: str) -> Iterator[tuple[BundledBroker, Process]]:
    """A bundled broker of the test's own, started, and a bridge consuming from it in a group of
    its own (`<name>-…`); both are stopped on the way out."""
    broker = BundledBroker(port=free_port(), log_path=tmp_path / "tansu.log").start()
    env = {**kenv, "KAFKA_BROKERS": broker.bootstrap, "CONSUMER_GROUP": f"{name}-{uuid.uuid4().hex[:6]}",
           "LOG_LEVEL": "INFO"}
    bridge = Process(f"bridge-broker-{name}", ["bridge"], env).start()
    try:
        yield broker, bridge
    finally:
        bridge.stop()
        broker.stop()


def test_bridge_started_before_the_broker_waits_then_handles_an_event(kclient, kenv, tmp_path):
    from .conftest import Kafka

    broker = BundledBroker(port=free_port(), log_path=tmp_path / "tansu.log")
    env = {**kenv, "KAFKA_BROKERS": broker.bootstrap, "CONSUMER_GROUP": f"late-{uuid.uuid4().hex[:6]}",
           "LOG_LEVEL": "INFO"}
    bridge = Process("bridge-before-broker", ["bridge"], env).start()
    try:
        wait_for(lambda: "waiting for the Kafka broker at " + broker.bootstrap in bridge.output()
                 or bridge.proc.poll() is not None, timeout=60, what="the bridge waiting for its broker")
        assert bridge.proc.poll() is None, bridge.output()[-3000:]
        broker.start()
        wait_for(lambda: "assigned" in bridge.output(), timeout=60, what="the bridge joining its group")
        route_id = f"r-{uuid.uuid4().hex[:8]}"
        Kafka(broker.bootstrap).send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
        wait_for(lambda: kclient.get(f"/workflows/{route_id}").status_code == 200, timeout=60,
                 what="the event handled")
        assert bridge.proc.poll() is None
    finally:
        bridge.stop()
        broker.stop()


def test_bridge_resumes_when_its_broker_comes_back(kclient, kenv, tmp_path):
    """The bundled broker keeps nothing: after its restart the bridge finds its topics gone,
    creates them again and goes on with the next event."""
    from .conftest import Kafka

    with broker_and_bridge(kenv, tmp_path, "back") as (broker, bridge):
        wait_for(lambda: "assigned" in bridge.output(), timeout=60, what="the bridge joining its group")
        first = f"r-{uuid.uuid4().hex[:8]}"
        Kafka(broker.bootstrap).send("route.confirmed", {"route_id": first, "mode": "walking"}, key=first)
        wait_for(lambda: kclient.get(f"/workflows/{first}").status_code == 200, timeout=60, what="the first event")
        broker.stop()
        wait_for(lambda: "waiting for the Kafka broker" in bridge.output(), timeout=60,
                 what="the bridge noticing its broker is gone")
        broker.start()
        wait_for(lambda: "answer again" in bridge.output(), timeout=90, what="the bridge resuming")
        second = f"r-{uuid.uuid4().hex[:8]}"
        Kafka(broker.bootstrap).send("route.confirmed", {"route_id": second, "mode": "walking"}, key=second)
        wait_for(lambda: kclient.get(f"/workflows/{second}").status_code == 200, timeout=90,
                 what="an event after the broker came back")
        assert bridge.proc.poll() is None


@pytest.mark.parametrize("gone", ["after an event", "before its partitions were assigned"])
def test_bridge_stops_on_sigterm_while_its_broker_is_gone(kclient, kenv, tmp_path, gone):
    """SIGTERM while the broker is gone: the bridge stops (exit 0) within its bounded leave of
    the group, its last offsets uncommitted at worst (their events are redelivered and
    de-duplicated). librdkafka's consumer close waits up to its socket timeout for a broker to
    answer: a bridge that had waited an hour for its broker took 60 s to stop."""
    import signal
    import time

    from .conftest import Kafka

    with broker_and_bridge(kenv, tmp_path, "gone") as (broker, bridge):
        if gone == "after an event":
            wait_for(lambda: "assigned" in bridge.output(), timeout=60, what="the bridge joining its group")
            route_id = f"r-{uuid.uuid4().hex[:8]}"
            Kafka(broker.bootstrap).send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
            wait_for(lambda: kclient.get(f"/workflows/{route_id}").status_code == 200, timeout=60, what="the event")
            broker.stop()
            wait_for(lambda: "waiting for the Kafka broker" in bridge.output(), timeout=60,
                     what="the bridge noticing its broker is gone")
        else:  # killed while the group is forming
            wait_for(lambda: "bridge in group" in bridge.output(), timeout=60, what="the bridge subscribing")
            broker.proc.kill()
            wait_for(lambda: "brokers are down" in bridge.output(), timeout=60,
                     what="the bridge noticing its broker is gone")
        sent = time.monotonic()
        bridge.proc.send_signal(signal.SIGTERM)
        assert bridge.proc.wait(40) == 0, bridge.output()[-3000:]
        assert time.monotonic() - sent < 30
        assert "bridge stopped after" in bridge.output()
