"""Kafka intake benchmark: `python -m bench.kafka_intake [--n 2000]` (also printed by `make bench`).

On one bundled broker (Tansu) and a fresh PostgreSQL database, in one run:

  (a) raw produce: max(20 N, 20000) route.confirmed-style events produced (acks=all, idempotent)
      and flushed;
  (b) raw consume: the same events read by a fresh consumer group, from partition assignment to
      the last message;
  (c) bridge intake: N new events accepted by one `orchestrator bridge` process, each one a
      committed engine transaction (instance, history, outbox row) and its story.generate
      produced through the outbox; first to last instance created;
  (d) relay produce: those N story.generate messages, first to last produced (their CreateTime),
      and how long after the last event was accepted the last one went out.

It prints events per second for each and the ratio bridge / raw consume. BENCH_PROFILE=<path>
runs the bridge under cProfile (its profile written there); BENCH_LOG_LEVEL sets its log level.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("BENCH_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def _events(n: int, tag: str) -> list[tuple[str, bytes]]:
    return [(f"{tag}-{i}", json.dumps({"route_id": f"{tag}-{i}", "mode": "walking", "city": "Kazan"}).encode())
            for i in range(n)]


def produce(brokers: str, topic: str, events: list[tuple[str, bytes]]) -> float:
    from confluent_kafka import Producer

    from orchestrator.kafka import producer_config

    producer = Producer(producer_config(brokers))
    started = time.perf_counter()
    for key, value in events:
        while True:
            try:
                producer.produce(topic, value, key=key.encode())
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(60):
        raise RuntimeError("raw produce: not every event was acknowledged")
    return time.perf_counter() - started


def consume(brokers: str, topic: str, n: int) -> float:
    from confluent_kafka import Consumer

    from orchestrator.kafka import consumer_config

    consumer = Consumer(consumer_config(brokers, f"bench-raw-{uuid.uuid4().hex[:6]}"))
    assigned: list[float] = []  # the clock starts when the group hands us the partitions
    consumer.subscribe([topic], on_assign=lambda *_: assigned.append(time.perf_counter()))
    seen = 0
    deadline = time.monotonic() + 120
    try:
        while seen < n and time.monotonic() < deadline:
            seen += sum(1 for msg in consumer.consume(1000, 0.5) if not msg.error())
    finally:
        consumer.close()
    if seen < n or not assigned:
        raise RuntimeError(f"raw consume: {seen} of {n} events read")
    return time.perf_counter() - assigned[0]


def relay_produce(brokers: str, tag: str, n: int, last_created: Any) -> tuple[float, float]:
    """The relay's side: the story.generate messages of these routes, read back. (seconds from
    the first to the last one produced, by their CreateTime; seconds the last one came after
    the last instance was created)."""
    from confluent_kafka import Consumer

    from orchestrator.kafka import consumer_config

    consumer = Consumer(consumer_config(brokers, f"bench-relay-{uuid.uuid4().hex[:6]}"))
    consumer.subscribe(["story.generate"])
    stamps: dict[str, int] = {}
    deadline = time.monotonic() + 300
    try:
        while len(stamps) < n and time.monotonic() < deadline:
            for msg in consumer.consume(1000, 0.5):
                if msg.error():
                    continue
                route_id = json.loads(msg.value())["route_id"]
                if route_id.startswith(f"{tag}-"):
                    stamps.setdefault(route_id, msg.timestamp()[1])
    finally:
        consumer.close()
    if len(stamps) < n:
        raise RuntimeError(f"relay: {len(stamps)} of {n} story.generate messages produced")
    first, last = min(stamps.values()), max(stamps.values())
    return max(last - first, 1) / 1000 * n / max(1, n - 1), last / 1000 - last_created.timestamp()


def bridge_intake(env: dict[str, str], brokers: str, n: int, tag: str, log: Path) -> tuple[float, float, float]:
    """(seconds to accept n events, seconds for the relay to produce their n messages, how far
    the last message came after the last event was accepted)."""
    from sqlalchemy import create_engine, func, select

    from orchestrator.models import WorkflowInstance

    db = create_engine(env["DATABASE_URL"])
    produce(brokers, "route.confirmed", _events(n, tag))
    with open(log, "ab") as out:
        profile = os.environ.get("BENCH_PROFILE")  # a cProfile output path: profile the bridge
        prefix = ["-m", "cProfile", "-o", profile] if profile else []
        proc = subprocess.Popen([sys.executable, *prefix, "-m", "orchestrator.entrypoints.cli", "bridge"], env=env,
                                cwd=ROOT,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        q = select(func.count(), func.min(WorkflowInstance.created_at), func.max(WorkflowInstance.created_at)) \
            .where(WorkflowInstance.type == "route_content", WorkflowInstance.business_key.like(f"{tag}-%"))
        deadline = time.monotonic() + 300
        while True:
            with db.connect() as conn:
                count, first, last = conn.execute(q).one()
            if count >= n:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"bridge intake: {count} of {n} events accepted (log: {log})")
            time.sleep(0.2)
        intake_s = max((last - first).total_seconds(), 1e-6) * n / max(1, n - 1)
        relay_s, behind_s = relay_produce(brokers, tag, n, last)
        return intake_s, relay_s, behind_s
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        db.dispose()


def measure(n: int) -> dict[str, float]:
    from sqlalchemy import create_engine, text

    from orchestrator.entrypoints.kafka_broker import BundledBroker
    from orchestrator.kafka import ensure_topics
    from orchestrator.migrate import upgrade

    logdir = Path(tempfile.mkdtemp(prefix="orch-bench-kafka-"))
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    name = f"orch_bench_kafka_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
        upgrade(url)
        with BundledBroker(log_path=logdir / "tansu.log") as broker:
            ensure_topics(broker.bootstrap, ["bench.raw", "route.confirmed", "route.confirmed.dlq", "story.generate"])
            raw_n = max(20 * n, 20000)  # the raw client is fast: enough events to time it
            produce_s = produce(broker.bootstrap, "bench.raw", _events(raw_n, "raw"))
            consume_s = consume(broker.bootstrap, "bench.raw", raw_n)
            base = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_"))}
            env = {**base, "DATABASE_URL": url, "KAFKA_BROKERS": broker.bootstrap,
                   "CONSUMER_GROUP": f"bench-{uuid.uuid4().hex[:6]}", "WORKFLOW_MODULES": "sagas,tasks",
                   "PYTHONPATH": str(ROOT),
                   "LOG_LEVEL": os.environ.get("BENCH_LOG_LEVEL", "WARNING")}
            bridge_s, relay_s, behind_s = bridge_intake(env, broker.bootstrap, n, f"b{uuid.uuid4().hex[:6]}",
                                                        logdir / "bridge.log")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
    shutil.rmtree(logdir, ignore_errors=True)  # kept when the run failed: its errors name the logs
    return {"produce": raw_n / produce_s, "consume": raw_n / consume_s, "bridge": n / bridge_s, "raw_n": raw_n,
            "relay_produce_per_s": n / relay_s, "relay_behind_s": behind_s}


def report(n: int) -> None:
    r = measure(n)
    print(f"kafka    raw produce events/s     {r['produce']:9.0f}   ({r['raw_n']:.0f} events, acks=all, bundled broker)")
    print(f"kafka    raw consume events/s     {r['consume']:9.0f}")
    print(f"kafka    bridge intake events/s   {r['bridge']:9.1f}   ({n} route.confirmed -> instance + story.generate)")
    print(f"kafka    relay produce msgs/s     {r['relay_produce_per_s']:9.1f}   (their story.generate; the last "
          f"{r['relay_behind_s']:.2f}s after the last event)")
    print(f"ratio    bridge/raw consume       {r['bridge'] / r['consume']:9.4f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.kafka_intake", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="events per measurement (2000)")
    args = p.parse_args(argv)
    if args.n < 2:
        p.error("--n must be at least 2")
    report(args.n)


if __name__ == "__main__":
    main()
