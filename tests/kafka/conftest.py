"""Fixtures for the Kafka tests: the bundled broker (Tansu) for the session, an environment and a
runtime that produce to it, bridge and sweeper processes, the Kafka emulators, and helpers to
produce events and read topics."""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Iterator

import pytest
from conftest import Process, wait_for

from orchestrator.entrypoints.kafka_broker import BundledBroker
from orchestrator.kafka import ensure_topics

TOPICS = ["route.confirmed", "story.generate", "story.generate.completed", "tts.requested", "tts.completed",
          "delivery.prefetch", "init_scenario", "to_deploy", "worker.status",
          "route.confirmed.dlq", "story.generate.completed.dlq", "tts.completed.dlq", "init_scenario.dlq",
          "worker.status.dlq", "test.increments", "test.increments.dlq"]


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: Any) -> Iterator[BundledBroker]:
    broker = BundledBroker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log").start()
    ensure_topics(broker.bootstrap, TOPICS)
    yield broker
    broker.stop()


@pytest.fixture
def own_broker(tmp_path: Any) -> Iterator[BundledBroker]:
    """A broker of this test's own, for tests that delete topics or run dev against a broker:
    the emulators of other tests consume on the session's broker."""
    broker = BundledBroker(log_path=tmp_path / "tansu.log").start()
    ensure_topics(broker.bootstrap, TOPICS)
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def kenv(env: dict[str, str], kafka_broker: BundledBroker) -> dict[str, str]:
    return {**env, "KAFKA_BROKERS": kafka_broker.bootstrap, "CONSUMER_GROUP": f"orch-{uuid.uuid4().hex[:6]}",
            "WORKFLOW_MODULES": env["WORKFLOW_MODULES"] + ",kafka_workflows"}


@pytest.fixture(scope="session")
def krt(kenv: dict[str, str]) -> Iterator[Any]:
    from orchestrator import runtime
    from orchestrator.config import load_settings

    built = runtime.build(load_settings(environ=kenv, dotenv="/nonexistent"))
    yield built
    built.db.dispose()


@pytest.fixture(scope="session")
def kapp(krt: Any) -> Any:
    from web import create_app

    return create_app(krt)


@pytest.fixture
def kclient(kapp: Any) -> Any:
    return kapp.test_client()


@pytest.fixture(scope="session")
def ksweeper(kenv: dict[str, str]) -> Iterator[Process]:
    proc = Process("ksweeper", ["sweeper"], kenv).start()
    yield proc
    proc.stop()


def start_bridge(kenv: dict[str, str], name: str = "bridge", log_level: str = "INFO") -> Process:
    """A bridge process serving its metrics on a free port (`proc.metrics_url`)."""
    from orchestrator.entrypoints.ports import free_port

    port = free_port()
    proc = Process(name, ["bridge", "--metrics-port", str(port)], {**kenv, "LOG_LEVEL": log_level}).start()
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    wait_for(lambda: "assigned" in proc.output() or proc.proc.poll() is not None, timeout=30,  # type: ignore[union-attr]
             what=f"{name} to join its group")
    return proc


def metric(proc: Process, name: str, **labels: str) -> float:
    """A sample's value from a bridge's /metrics (0 when absent)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(proc.metrics_url, timeout=5).text  # type: ignore[attr-defined]
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


@pytest.fixture(scope="module")
def bridge(kenv: dict[str, str], ksweeper: Process) -> Iterator[Process]:
    proc = start_bridge(kenv)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def kafka_emulators(kafka_broker: BundledBroker) -> Iterator[dict[str, Any]]:
    from emulators.kafka_services import start_all

    services = start_all(kafka_broker.bootstrap, most_stories=4)
    for s in services.values():
        assert s.wait_ready(), f"emulator {s.name} got no partitions"
    yield services
    for s in services.values():
        s.stop()


class Kafka:
    """Produce events the way an upstream service would, and read topics back."""

    def __init__(self, brokers: str) -> None:
        from confluent_kafka import Producer

        from orchestrator.kafka import producer_config

        self.brokers = brokers
        self.producer = Producer(producer_config(brokers))

    def send(self, topic: str, payload: Any, key: str | None = None, raw: bytes | None = None,
             event_id: str | None = None, flush: bool = True) -> None:
        value = raw if raw is not None else json.dumps(payload).encode()
        headers = [("event_id", event_id.encode())] if event_id else None
        self.producer.produce(topic, value, key=key.encode() if key else None, headers=headers)
        if flush:
            assert self.producer.flush(30) == 0

    def flush(self) -> None:
        assert self.producer.flush(60) == 0

    def read(self, topic: str, timeout: float = 10.0, until: Any = None) -> list[Any]:
        """Every message of `topic` from the beginning (a fresh group), until `until(messages)`."""
        from confluent_kafka import Consumer

        from orchestrator.kafka import consumer_config

        consumer = Consumer(consumer_config(self.brokers, f"reader-{uuid.uuid4().hex[:8]}"))
        consumer.subscribe([topic])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                msg = consumer.poll(0.3)
                if msg is not None and not msg.error():
                    out.append(msg)
                if until is not None and until(out):
                    break
        finally:
            consumer.close()
        return out


@pytest.fixture(scope="session")
def kafka(kafka_broker: BundledBroker) -> Kafka:
    return Kafka(kafka_broker.bootstrap)


def key_on_partition_of(key: str, prefix: str, partitions: int = 4) -> str:
    """A new id `<prefix>-<n>` whose key lands on the same partition as `key` with the default
    partitioner (librdkafka's consistent_random: CRC32 of the key), so both get the same offsets
    in two lives of a topic."""
    import zlib

    want, tag, n = zlib.crc32(key.encode()) % partitions, uuid.uuid4().hex[:6], 0
    while zlib.crc32(f"{prefix}-{tag}-{n}".encode()) % partitions != want:
        n += 1
    return f"{prefix}-{tag}-{n}"


def headers(msg: Any) -> dict[str, str]:
    return {k: (v or b"").decode() for k, v in (msg.headers() or [])}


__all__ = ["Kafka", "headers", "key_on_partition_of", "metric", "start_bridge", "wait_for"]
