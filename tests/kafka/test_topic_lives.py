"""An event is never taken for a duplicate of one from an earlier life of its topic: the topic
deleted and re-created, or the broker replaced (a new bundled broker on a kept database). Each
test has a broker of its own, so deleting a topic touches no other test."""
from __future__ import annotations

import uuid
from typing import Any

import pytest
from conftest import wait_for

from orchestrator.entrypoints.kafka_broker import BundledBroker
from orchestrator.kafka import ensure_topics

from .conftest import TOPICS, Kafka, key_on_partition_of, start_bridge

pytestmark = pytest.mark.kafka



def route_started(kclient: Any, route_id: str) -> bool:
    return kclient.get(f"/workflows/{route_id}").status_code == 200


def recreate(brokers: str, topic: str) -> None:
    """Delete `topic` and create it again (4 partitions), as an operator would."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": brokers})
    for future in admin.delete_topics([topic], operation_timeout=15).values():
        future.result(15)
    wait_for(lambda: topic not in admin.list_topics(timeout=10).topics, timeout=30, what=f"{topic} deleted")
    ensure_topics(brokers, [topic])


def test_a_recreated_topic_starts_offsets_again_and_its_events_are_new(kclient, kenv, ksweeper, own_broker):
    env = {**kenv, "KAFKA_BROKERS": own_broker.bootstrap, "CONSUMER_GROUP": f"lives-{uuid.uuid4().hex[:6]}"}
    kafka = Kafka(own_broker.bootstrap)
    # the first life: an event at the offset new-1 will get in the second life (same partition)
    old = key_on_partition_of("new-1", "old")
    kafka.send("route.confirmed", {"route_id": old, "mode": "walking"}, key=old)
    scenario_old = str(uuid.uuid4())
    kafka.send("init_scenario", {"scenario_uuid": scenario_old, "camera_url": "rtsp://c/1"}, key="cam")
    bridge = start_bridge(env, "bridge-lives-1")
    try:
        wait_for(lambda: route_started(kclient, old), timeout=60, what="the first life's route")
        wait_for(lambda: kclient.get(f"/workers?scenario_uuid={scenario_old}").get_json()["total"] == 1,
                 timeout=60, what="the first life's worker")
        recreate(own_broker.bootstrap, "route.confirmed")
        recreate(own_broker.bootstrap, "init_scenario")
        # The input from the report: no event_id header, offset 0 again on the same partition.
        kafka.send("route.confirmed", {"route_id": "new-1", "mode": "walking"}, key="new-1")
        scenario_new = str(uuid.uuid4())
        kafka.send("init_scenario", {"scenario_uuid": scenario_new, "camera_url": "rtsp://c/2"}, key="cam")
        # librdkafka may crash when a topic it reads is deleted: a bridge that died is started
        # again, as `orchestrator dev` and the process supervisors of docs/kafka.md do.
        wait_for(lambda: route_started(kclient, "new-1") or bridge.proc.poll() is not None, timeout=60,
                 what="new-1 started or the bridge gone")
        if bridge.proc.poll() is not None:
            bridge = start_bridge(env, "bridge-lives-2")
        wait_for(lambda: route_started(kclient, "new-1"), timeout=60, what="new-1 started in the new topic")
        wait_for(lambda: kclient.get(f"/workers?scenario_uuid={scenario_new}").get_json()["total"] == 1,
                 timeout=60, what="a worker for the init_scenario of the new topic")
    finally:
        bridge.stop()


def test_a_new_broker_on_the_same_database_is_a_new_life(kclient, kenv, ksweeper, tmp_path):
    group = f"lives-{uuid.uuid4().hex[:6]}"
    first_id = key_on_partition_of("x", "first")
    second_id = key_on_partition_of("x", "second")
    for route_id in (first_id, second_id):
        with BundledBroker(log_path=tmp_path / "tansu.log") as broker:
            ensure_topics(broker.bootstrap, TOPICS)
            Kafka(broker.bootstrap).send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
            bridge = start_bridge({**kenv, "KAFKA_BROKERS": broker.bootstrap, "CONSUMER_GROUP": group},
                                  f"bridge-{route_id}")
            try:
                wait_for(lambda: route_started(kclient, route_id), timeout=60, what=f"{route_id} started")
            finally:
                bridge.stop()
        assert "duplicate" not in bridge.output()
