"""Stand-ins for the Kafka services we do not own: the story service, TTS, delivery prefetch and
the worker runner. Each is a consumer (its own group) that records what it received and answers
on the contract's topic.

    python -m emulators.kafka_services --brokers 127.0.0.1:9092 [--tts-failure-rate 0.1]

(defaults also from EMULATOR_TTS_FAILURE_RATE, EMULATOR_TTS_LATENCY, EMULATOR_RUNNER_FAILURE_RATE)

In tests they run in-process: `start_all(brokers, ...)` returns them; `.received` holds every
message each one consumed, in order.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import random
import signal
import threading
import time
from typing import Any, Callable

from emulators import effects

log = logging.getLogger(__name__)

Reply = tuple[str, str | None, dict[str, Any]]  # topic, key, payload


class KafkaService:
    """One emulated service: consume `topic`, call `handle(payload)`, produce its replies."""

    def __init__(self, name: str, brokers: str, topic: str, handle: Callable[[dict[str, Any]], list[Reply]]) -> None:
        self.name = name
        self.brokers = brokers
        self.topic = topic
        self.handle = handle
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"emulator-{name}", daemon=True)
        self._ready = threading.Event()
        self.seen_ids: set[str] = set()  # message_id headers handled (kept in memory only)
        self.message_id: str | None = None  # of the message being handled

    def start(self) -> "KafkaService":
        self._thread.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        from confluent_kafka import Consumer, Producer

        from orchestrator.kafka import consumer_config, encode, producer_config

        consumer = Consumer(consumer_config(self.brokers, f"emulator-{self.name}"))
        producer = Producer(producer_config(self.brokers))
        consumer.subscribe([self.topic], on_assign=lambda *_: self._ready.set())
        try:
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None or msg.error():
                    continue
                try:
                    payload = json.loads(msg.value())
                except ValueError:
                    log.warning("%s: undecodable message at offset %s", self.name, msg.offset())
                    continue
                # the outbox sends a message again after a crash between publish and mark; a
                # consumer de-duplicates by its message_id header (docs/kafka.md)
                message_id = next((v.decode() for k, v in (msg.headers() or []) if k == "message_id" and v), None)
                if message_id is not None and message_id in self.seen_ids:
                    consumer.commit(message=msg, asynchronous=False)
                    continue
                with self.lock:
                    self.received.append(payload)
                self.message_id = message_id
                for topic, key, reply in self.handle(payload):
                    producer.produce(topic, encode(reply), key=key.encode() if key else None)
                producer.flush(30)
                consumer.commit(message=msg, asynchronous=False)
                if message_id is not None:
                    self.seen_ids.add(message_id)
        finally:
            consumer.close()
            producer.flush(10)

    def messages(self) -> list[dict[str, Any]]:
        with self.lock:
            return list(self.received)


def story_count(route_id: str, most: int) -> int:
    """A stable number of stories per route, 1..most (varied across routes)."""
    return 1 + int(hashlib.sha256(route_id.encode()).hexdigest(), 16) % max(1, most)


def story_service(brokers: str, most_stories: int = 3) -> KafkaService:
    def handle(p: dict[str, Any]) -> list[Reply]:
        route_id = p["route_id"]
        stories = [{"story_id": f"{route_id}-s{i + 1}", "title": f"Story {i + 1}",
                    "text": f"История {i + 1} для маршрута {route_id}."}
                   for i in range(story_count(route_id, most_stories))]
        return [("story.generate.completed", route_id,
                 {"route_id": route_id, "lang": p.get("lang", "ru"), "stories": stories})]

    return KafkaService("story", brokers, "story.generate", handle)


class TTSService(KafkaService):
    """Synthesises after `latency` seconds; fails a request with probability `failure_rate`, and
    never fails the same story twice unless `fail_always` (so a restart completes it)."""

    def __init__(self, brokers: str, failure_rate: float = 0.0, latency: float = 0.0, seed: int = 7,
                 fail_always: bool = False) -> None:
        super().__init__("tts", brokers, "tts.requested", self._synthesise)
        self.failure_rate = failure_rate
        self.latency = latency
        self.rng = random.Random(seed)
        self.fail_always = fail_always
        self.failed_once: set[tuple[str, str]] = set()
        self.succeeded: dict[tuple[str, str], int] = {}

    def _synthesise(self, p: dict[str, Any]) -> list[Reply]:
        if self.latency:
            time.sleep(self.latency)
        key = (p["route_id"], str(p["story_id"]))
        effects.record("tts_request", f"{key[0]}:{key[1]}:{p.get('attempt')}", self.message_id or "?")
        fail = self.rng.random() < self.failure_rate and (self.fail_always or key not in self.failed_once)
        reply: dict[str, Any] = {"route_id": p["route_id"], "story_id": p["story_id"],
                                 "attempt": p.get("attempt")}
        if fail:
            self.failed_once.add(key)
            reply.update(status="failed", error="synthesis engine overloaded")
        else:
            with self.lock:
                self.succeeded[key] = self.succeeded.get(key, 0) + 1
            reply.update(status="completed", audio_url=f"https://cdn.example/audio/{key[0]}/{key[1]}.mp3",
                         duration_seconds=round(len(p.get("text", "")) / 15, 1))
        return [("tts.completed", p["route_id"], reply)]


def delivery_prefetch(brokers: str) -> KafkaService:
    return KafkaService("delivery", brokers, "delivery.prefetch", lambda p: [])


class RunnerService(KafkaService):
    """Deploys: reports `running` with a pid, or `failed` with a reason at `failure_rate`."""

    def __init__(self, brokers: str, failure_rate: float = 0.0, seed: int = 11) -> None:
        super().__init__("runner", brokers, "to_deploy", self._deploy)
        self.failure_rate = failure_rate
        self.rng = random.Random(seed)
        self.next_pid = 40000

    def _deploy(self, p: dict[str, Any]) -> list[Reply]:
        effects.record("deploy_order", str(p["worker_id"]), self.message_id or "?")
        self.next_pid += 1
        if self.rng.random() < self.failure_rate:
            status = {"worker_id": p["worker_id"], "status": "failed", "process_pid": None,
                      "reason": f"cannot open stream {p['camera_url']}"}
        else:
            status = {"worker_id": p["worker_id"], "status": "running", "process_pid": self.next_pid,
                      "reason": None}
        return [("worker.status", p["worker_id"], status)]


def start_all(brokers: str, tts_failure_rate: float = 0.0, tts_latency: float = 0.0,
              runner_failure_rate: float = 0.0, most_stories: int = 3) -> dict[str, KafkaService]:
    services: dict[str, KafkaService] = {
        "story": story_service(brokers, most_stories),
        "tts": TTSService(brokers, tts_failure_rate, tts_latency),
        "delivery": delivery_prefetch(brokers),
        "runner": RunnerService(brokers, runner_failure_rate),
    }
    for s in services.values():
        s.start()
    return services


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--brokers", required=True)
    env = os.environ.get
    p.add_argument("--tts-failure-rate", type=float, default=float(env("EMULATOR_TTS_FAILURE_RATE", "0.1")))
    p.add_argument("--tts-latency", type=float, default=float(env("EMULATOR_TTS_LATENCY", "0.5")),
                   help="seconds per synthesis")
    p.add_argument("--runner-failure-rate", type=float, default=float(env("EMULATOR_RUNNER_FAILURE_RATE", "0.1")))
    p.add_argument("--most-stories", type=int, default=3)
    args = p.parse_args()
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s emulators %(message)s")
    from orchestrator.kafka import ensure_topics

    ensure_topics(args.brokers, ["story.generate", "story.generate.completed", "tts.requested", "tts.completed",
                                 "delivery.prefetch", "to_deploy", "worker.status", "init_scenario",
                                 "route.confirmed"])
    services = start_all(args.brokers, args.tts_failure_rate, args.tts_latency, args.runner_failure_rate,
                         args.most_stories)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    log.info("story, tts, delivery and runner emulators on %s", args.brokers)
    while not stop.wait(10):
        log.info("received: %s", {n: len(s.received) for n, s in services.items()})
    for s in services.values():
        s.stop()


if __name__ == "__main__":
    main()
