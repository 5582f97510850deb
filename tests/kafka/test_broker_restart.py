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


def left_for_the_sweeper(engine: Any, route_id: str) -> None:
    """A route started by a process that died before its kick: its story.generate row waits in
    the outbox for a sweeper."""
    engine.start("route_content", {"route_id": route_id, "mode": "walking"}, key=route_id)


def story_request(kafka: Kafka, route_id: str) -> Any:
    def found(ms: list[Any]) -> list[Any]:
        return [json.loads(m.value()) for m in ms if m.key() == route_id.encode()]

    return wait_for(lambda: found(kafka.read("story.generate", timeout=5, until=found)), timeout=90,
                    interval=0.5, what=f"story.generate for {route_id}")


def test_the_sweeper_sends_to_a_broker_that_restarted_empty(kenv, krt, tmp_path):
    """On a database of its own: the session's sweeper, on the session's broker, must not take
    the rows meant for this one."""
    from conftest import engine_on, fresh_database

    broker = BundledBroker(log_path=tmp_path / "tansu.log").start()
    ensure_topics(broker.bootstrap, TOPICS)
    with fresh_database() as db, engine_on(krt.settings, db) as engine:
        env = {**kenv, "KAFKA_BROKERS": broker.bootstrap, "DATABASE_URL": db}
        sweeper = Process("restart-sweeper", ["sweeper"], env).start()
        try:
            before = f"before-{uuid.uuid4().hex[:8]}"
            left_for_the_sweeper(engine, before)
            assert story_request(Kafka(broker.bootstrap), before) == [{"route_id": before, "lang": "ru"}]

            broker.stop()  # everything it held is gone
            broker = BundledBroker(port=broker.port, log_path=tmp_path / "tansu-2.log").start()
            ensure_topics(broker.bootstrap, TOPICS)
            after = f"after-{uuid.uuid4().hex[:8]}"
            left_for_the_sweeper(engine, after)
            assert story_request(Kafka(broker.bootstrap), after) == [{"route_id": after, "lang": "ru"}], \
                sweeper.output()[-3000:]
        finally:
            sweeper.stop()
            broker.stop()


def test_timers_of_every_workflow_fire_while_the_kafka_broker_is_down(kenv, emulators, tmp_path):
    """Rows for a Kafka broker that does not answer each wait out the delivery timeout (30 s);
    the sweeper publishes them apart from its timers, so a media pipeline, which needs a timer for
    every poll, still completes meanwhile. Its own database and vhost: no other sweeper helps."""
    from conftest import AMQP, _rabbitmqctl, fresh_database

    from orchestrator import runtime
    from orchestrator.config import load_settings
    from orchestrator.engine import Engine
    from orchestrator.entrypoints.ports import free_port
    from orchestrator.workflow import registry
    from web import create_app

    vhost = f"orch-kdown-{uuid.uuid4().hex[:8]}"
    assert _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    with fresh_database() as db:
        env = {**kenv, "DATABASE_URL": db, "CELERY_BROKER_URL": f"{AMQP}/{vhost}",
               "KAFKA_BROKERS": f"127.0.0.1:{free_port()}"}  # nothing listens there
        rt = runtime.build(load_settings(environ=env, dotenv="/nonexistent"))
        procs = [Process("kdown-sweeper", ["sweeper"], env).start(),
                 Process("kdown-worker", ["worker", "--concurrency", "2", "--name", f"kdown{uuid.uuid4().hex[:6]}@%h"],
                         env).start()]
        try:
            no_kick = Engine(rt.settings, rt.sessions, registry, relay=None)
            for n in range(3):  # three routes' story.generate rows, left for the sweeper
                no_kick.start("route_content", {"route_id": f"down-{n}-{uuid.uuid4().hex[:6]}", "mode": "car"},
                              key=f"down-{n}-{uuid.uuid4().hex[:6]}")
            client = create_app(rt).test_client()
            r = client.post("/pipeline", json={"youtube_url": f"https://youtu.be/kdown{uuid.uuid4().hex[:8]}"})
            assert r.status_code == 200, r.get_json()
            job_id = r.get_json()["job_id"]
            job = wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
                client.get(f"/jobs/{job_id}").get_json()), timeout=60, interval=0.5, what="the pipeline")
            assert job["status"] == "completed", job
        finally:
            for p in procs:
                p.stop()
            rt.db.dispose()
            _rabbitmqctl("delete_vhost", vhost)
