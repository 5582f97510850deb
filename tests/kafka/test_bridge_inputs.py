"""What the bridge does with duplicates, broken JSON, missing fields, wrong types and events it
cannot route: the right outcome each time, and a dead-letter entry with the reason and the
original bytes where the event cannot be applied. None of it stops the consumer."""
from __future__ import annotations

import json
import uuid

import pytest
from conftest import wait_for

from emulators.kafka_services import story_count

from .conftest import headers, metric
from .test_bridge_crash import counters, make_counters

pytestmark = pytest.mark.kafka


def dead_letter(kafka, topic, raw: bytes, timeout=20):
    """The DLQ entry of `raw` on `<topic>.dlq` (its headers), waiting for it to appear."""
    def find(msgs):
        return [m for m in msgs if m.value() == raw]
    found = find(kafka.read(f"{topic}.dlq", timeout=timeout, until=lambda ms: bool(find(ms))))
    assert found, f"no dead letter for {raw!r} on {topic}.dlq"
    return headers(found[0])


def completed_route(kclient, kafka, route_id):
    kafka.send("route.confirmed", {"route_id": route_id, "mode": "bike"}, key=route_id)
    return wait_for(lambda: (lambda r: r.json if r.status_code == 200 and r.json["status"] == "completed" else None)(
        kclient.get(f"/workflows/{route_id}")), timeout=40, what=f"route {route_id} completed")


@pytest.mark.parametrize("topic, raw, reason", [
    ("route.confirmed", b'{"route_id": "r-broken", "mode": ', "invalid JSON"),
    ("route.confirmed", b"\xff\xfe not utf-8", "invalid JSON"),
    # JSON between systems is UTF-8 (RFC 8259): a parser guessing UTF-16 started this route
    ("route.confirmed", json.dumps({"route_id": "r-utf16", "mode": "walk"}).encode("utf-16"),
     "invalid JSON: is not valid UTF-8"),
    ("route.confirmed", b"[1, 2, 3]", "payload must be a JSON object, got list"),
    # a parser keeps the last of a key sent twice: the route would start under the other id
    ("route.confirmed", b'{"route_id": "r-dup1", "mode": "walk", "route_id": "r-dup2"}',
     "invalid JSON: route_id: appears twice in an object"),
    ("route.confirmed", json.dumps({"route_id": "r-no-mode"}).encode(), "mode: is required"),
    ("route.confirmed", json.dumps({"route_id": 12345, "mode": "walk"}).encode(),
     "route_id: must be a string, got integer"),
    ("route.confirmed", json.dumps({"route_id": "", "mode": "walk"}).encode(), "route_id: must not be empty"),
    ("route.confirmed", json.dumps({"route_id": " r-padded ", "mode": "walk"}).encode(),
     "route_id: must not begin or end with whitespace"),
    ("route.confirmed", json.dumps({"route_id": "r-long-mode", "mode": "w" * 65}).encode(),
     "mode: must be at most 64 characters"),
    # taken by the parser, but its story replies failed to store it again (RecursionError)
    ("route.confirmed", b'{"route_id": "r-deep", "mode": "walk", "x": ' + b"[" * 150 + b"]" * 150 + b"}",
     "x: is nested deeper than 100 levels of arrays and objects"),
    # an id an operator reads in lists and logs: a direction mark reorders it, a separator breaks it
    ("route.confirmed", json.dumps({"route_id": "r-x11\u2028\u202e", "mode": "walk"}).encode(),
     "route_id: contains a control, format or line separator character (U+2028 at position 5)"),
    ("tts.completed", json.dumps({"route_id": "r-nowhere", "story_id": "s1", "status": "completed"}).encode(),
     "unroutable: unknown route_id 'r-nowhere'"),
    ("tts.completed", json.dumps({"route_id": "r-x", "story_id": "s1", "status": "done"}).encode(),
     "status: must be 'completed' or 'failed', got 'done'"),
    ("story.generate.completed", json.dumps({"route_id": "r-x", "lang": "ru", "stories": "many"}).encode(),
     "stories: must be an array, got string"),
    ("init_scenario", json.dumps({"scenario_uuid": "not-a-uuid", "camera_url": "rtsp://c/1"}).encode(),
     "scenario_uuid: must be a UUID, got 'not-a-uuid'"),
    ("init_scenario", json.dumps({"scenario_uuid": str(uuid.UUID(int=7)), "camera_url": "ftp://c/1"}).encode(),
     "camera_url: must be an rtsp/rtsps/rtmp/http/https URL with a host, got 'ftp://c/1'"),
    ("init_scenario", json.dumps({"scenario_uuid": str(uuid.UUID(int=8))}).encode(), "camera_url: is required"),
    # a camera URL the runner could not open is named with the reason, as /pipeline's youtube_url
    ("init_scenario", json.dumps({"scenario_uuid": str(uuid.UUID(int=13)), "camera_url": "rtsp://c/1\u2028"}).encode(),
     "camera_url: contains a whitespace or control character (U+2028 at position 10)"),
    ("init_scenario", json.dumps({"scenario_uuid": str(uuid.UUID(int=14)), "camera_url": "rtsp://c/" + "x" * 2048}).encode(),
     "camera_url: is too long: 2057 characters, at most 2048"),
    ("init_scenario", json.dumps({"scenario_uuid": str(uuid.UUID(int=15)), "camera_url": "rtsp://c:99999/1"}).encode(),
     "camera_url: has an invalid port: it must be a number from 1 to 65535"),
    ("worker.status", json.dumps({"worker_id": str(uuid.UUID(int=9)), "status": "running"}).encode(),
     "unroutable: unknown worker_id 00000000-0000-0000-0000-000000000009"),
    ("worker.status", json.dumps({"worker_id": str(uuid.UUID(int=9)), "status": "running",
                                  "process_pid": "12"}).encode(), "process_pid: must be an integer, got '12'"),
    # text the database cannot store: named at once, never retried as a handler error
    ("route.confirmed", json.dumps({"route_id": "r-sur", "mode": "\ud800"}).encode(),
     "mode: contains a lone UTF-16 surrogate"),
    ("tts.completed", json.dumps({"route_id": "r-x", "story_id": "s1", "status": "failed",
                                  "error": "a\u0000b"}).encode(), "error: contains a NUL character"),
    ("story.generate.completed", json.dumps({"route_id": "r-x", "lang": "ru",
                                             "stories": [{"story_id": "s1", "text": "\u0000"}]}).encode(),
     "stories.0.text: contains a NUL character"),
    ("init_scenario", json.dumps({"scenario_uuid": str(uuid.UUID(int=10)), "camera_url": "rtsp://c/1",
                                  "note\u0000": 1}).encode(), "note\\u0000: the object key contains a NUL"),
    ("worker.status", json.dumps({"worker_id": str(uuid.UUID(int=9)), "status": "failed",
                                  "reason": "\udfff"}).encode(), "reason: contains a lone UTF-16 surrogate"),
    # numbers that are not JSON (Python's parser takes them, the database does not): named at once
    ("route.confirmed", b'{"route_id": "r-nan", "mode": "walking", "distance_km": NaN}',
     "distance_km: is not a finite number"),
    ("route.confirmed", b'{"route_id": "r-big", "mode": "walking", "city": %s}' % (b"9" * 400),
     "city: is not a finite number"),
    ("worker.status", ('{"worker_id": "%s", "status": "running", "process_pid": 1e999}' % uuid.UUID(int=9)).encode(),
     "process_pid: is not a finite number"),
    ("init_scenario", ('{"scenario_uuid": "%s", "camera_url": "rtsp://c/1", "meta": {"fps": [25, -Infinity]}}'
                       % uuid.UUID(int=11)).encode(), "meta.fps.1: is not a finite number"),
])
def test_bad_events_are_dead_lettered_with_reason(kafka, bridge, topic, raw, reason):
    before = metric(bridge, "orchestrator_kafka_dead_letters_total", topic=topic)
    marker = f"m-{uuid.uuid4().hex[:8]}".encode()
    kafka.send(topic, None, raw=raw, key=marker.decode())
    h = dead_letter(kafka, topic, raw)
    assert h["dlq_reason"].startswith(reason), h["dlq_reason"]
    assert h["dlq_original_topic"] == topic and int(h["dlq_original_offset"]) >= 0
    wait_for(lambda: metric(bridge, "orchestrator_kafka_dead_letters_total", topic=topic) >= before + 1,
             timeout=10, what="dead-letter metric")
    assert bridge.proc.poll() is None  # the consumer goes on


def test_unstorable_text_is_dead_lettered_once_at_once_and_the_next_event_is_handled(kclient, kafka, bridge):
    key = f"r-{uuid.uuid4().hex[:8]}"
    retried = metric(bridge, "orchestrator_kafka_dead_letters_total", topic="route.confirmed", reason="handler_error")
    bad = json.dumps({"route_id": key, "mode": "walk\u0000ing"}).encode()
    kafka.send("route.confirmed", None, raw=bad, key=key)
    good = f"{key}-ok"  # the same key: the same partition, handled after the bad one
    kafka.send("route.confirmed", None, raw=json.dumps({"route_id": good, "mode": "walking"}).encode(), key=key)
    wait_for(lambda: kclient.get(f"/workflows/{good}").status_code == 200, timeout=30, what="the next event")
    h = dead_letter(kafka, "route.confirmed", bad)
    assert h["dlq_reason"] == "mode: contains a NUL character (\\u0000), which cannot be stored", h
    entries = kafka.read("route.confirmed.dlq", timeout=20, until=lambda ms: any(m.value() == bad for m in ms))
    assert [m.value() for m in entries].count(bad) == 1
    # dead-lettered as a bad field, not after retrying a handler error
    assert metric(bridge, "orchestrator_kafka_dead_letters_total", topic="route.confirmed",
                  reason="handler_error") == retried
    assert kclient.get(f"/workflows/{key}").status_code == 404


def test_same_route_confirmed_twice_has_one_effect(kclient, kafka, bridge, kafka_emulators):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
    kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
    completed_route(kclient, kafka, route_id)  # a third copy, then wait
    assert [m for m in kafka_emulators["story"].messages() if m["route_id"] == route_id] == \
        [{"route_id": route_id, "lang": "ru"}]
    wait_for(lambda: [m for m in kafka_emulators["delivery"].messages() if m["route_id"] == route_id],
             timeout=10, what="prefetch")
    assert len([m for m in kafka_emulators["delivery"].messages() if m["route_id"] == route_id]) == 1
    wait_for(lambda: metric(bridge, "orchestrator_kafka_events_total", topic="route.confirmed",
                            outcome="ignored") >= 2, timeout=10, what="the repeated starts counted")


def test_repeated_foreign_and_unknown_tts_results(kclient, kafka, bridge, kafka_emulators):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    view = completed_route(kclient, kafka, route_id)
    first = f"{route_id}-s1"
    ignored = metric(bridge, "orchestrator_kafka_events_total", topic="tts.completed", outcome="ignored")
    # a second tts.completed for a story already completed: ignored, nothing changes
    kafka.send("tts.completed", {"route_id": route_id, "story_id": first, "status": "failed", "error": "late"},
               key=route_id)
    wait_for(lambda: metric(bridge, "orchestrator_kafka_events_total", topic="tts.completed",
                            outcome="ignored") >= ignored + 1, timeout=15, what="ignored duplicate")
    again = kclient.get(f"/workflows/{route_id}").json
    assert again["status"] == "completed" and again["stories"] == view["stories"]
    assert again["steps"]["tts_batch"] == view["steps"]["tts_batch"]
    # a story that is not the route's: dead-lettered with the reason
    raw = json.dumps({"route_id": route_id, "story_id": "someone-elses", "status": "completed"}).encode()
    kafka.send("tts.completed", None, raw=raw, key=route_id)
    h = dead_letter(kafka, "tts.completed", raw)
    assert h["dlq_reason"] == f"story_id: story someone-elses does not belong to route {route_id}"
    assert len([m for m in kafka_emulators["delivery"].messages() if m["route_id"] == route_id]) == 1
    # the second story.generate.completed for a route that has its stories: ignored
    kafka.send("story.generate.completed", {"route_id": route_id, "lang": "ru",
                                            "stories": [{"story_id": "x", "text": "y"}]}, key=route_id)
    wait_for(lambda: metric(bridge, "orchestrator_kafka_events_total", topic="story.generate.completed",
                            outcome="ignored") >= 1, timeout=15, what="ignored stories")
    assert len(kclient.get(f"/workflows/{route_id}").json["stories"]) == story_count(route_id, 4)


def test_same_init_scenario_twice_makes_one_worker(kclient, kafka, bridge, kafka_emulators):
    scenario = str(uuid.uuid4())
    event = {"scenario_uuid": scenario, "camera_url": "rtsp://cam.example/dup"}
    kafka.send("init_scenario", event, key=scenario, event_id=f"init-{scenario}")
    kafka.send("init_scenario", event, key=scenario, event_id=f"init-{scenario}")

    def running(scenario_uuid):  # the runner has had its to_deploy (it reports running then)
        page = kclient.get(f"/workers?scenario_uuid={scenario_uuid}").json
        return any(w["status"] == "running" for w in page["items"])

    wait_for(lambda: running(scenario), timeout=40, what="a worker running")
    marker = str(uuid.uuid4())
    kafka.send("init_scenario", {"scenario_uuid": marker, "camera_url": "rtsp://m/1"}, key=scenario)
    wait_for(lambda: running(marker), timeout=40, what="the marker's worker running")
    assert kclient.get(f"/workers?scenario_uuid={scenario}").json["total"] == 1
    assert len([m for m in kafka_emulators["runner"].messages() if m["scenario_uuid"] == scenario]) == 1


def test_lag_gauge_is_exported_per_partition(bridge, kafka):
    """The value is approximate on the bundled broker; its presence per assigned partition is not."""
    import requests

    def partitions():
        text = requests.get(bridge.metrics_url, timeout=5).text
        return {line.split('partition="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("kafka_consumer_lag{") and 'topic="route.confirmed"' in line}

    assert wait_for(lambda: partitions() == {"0", "1", "2", "3"}, timeout=20, what="lag of every partition")


def test_same_event_id_twice_counts_once(kclient, kafka, krt, bridge):
    [key] = make_counters(kclient, 1)
    for _ in range(2):
        kafka.send("test.increments", {"counter": key, "n": 5, "seq": 0}, key=key, event_id=f"ev-{key}")
    kafka.send("test.increments", {"counter": key, "n": 1, "seq": 1}, key=key)  # same partition, after
    wait_for(lambda: len(counters(krt, [key])[key]["seen"]) >= 2, timeout=20, what="both events")
    assert counters(krt, [key])[key]["total"] == 6
    # the bridge counts a batch's outcomes once it has committed: just after its rows are seen
    wait_for(lambda: metric(bridge, "orchestrator_kafka_events_total", topic="test.increments",
                            outcome="duplicate") >= 1, timeout=10, what="the duplicate counted")


def test_orchestrator_produce_sets_the_event_id_header(kafka, tmp_path):
    """docs/kafka.md tells a producer that may send a request twice to set `event_id`, but
    `orchestrator produce` could not: both sends were new events to the bridge. Now --event-id
    sets the header on each, as the bridge reads it, and an id the bridge would dead-letter is a
    usage error, nothing sent."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    from orchestrator.kafka_bridge import EVENT_ID_MAX

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "KAFKA_"))}
    env.update(KAFKA_BROKERS=kafka.brokers, PYTHONPATH=str(ROOT))
    tag = uuid.uuid4().hex[:8]
    produce = [sys.executable, "-m", "orchestrator.entrypoints.cli", "produce", "test.increments"]

    def run(*args: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([*produce, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)

    for seq in range(2):
        sent = run(json.dumps({"counter": tag, "n": 1, "seq": seq}), "--key", tag, "--event-id", f"ev-{tag}",
                   "--header", "trace=t1")
        assert sent.returncode == 0, sent.stderr
    too_long = run(json.dumps({"counter": tag, "n": 1, "seq": 2}), "--key", tag, "--event-id", "x" * (EVENT_ID_MAX + 1))
    assert too_long.returncode == 2, too_long.stderr
    assert f"argument --event-id: must be at most {EVENT_ID_MAX} characters, got {EVENT_ID_MAX + 1}" in too_long.stderr
    blank = run(json.dumps({"counter": tag, "n": 1, "seq": 2}), "--key", tag, "--event-id", "   ")
    assert blank.returncode == 2 and "argument --event-id: must not be empty" in blank.stderr, blank.stderr
    # a topic no workflow knows (a typo) is sent, but said: it was a silent success
    typo = subprocess.run([*produce[:-1], "route.confirmd", json.dumps({"route_id": tag, "mode": "walk"})],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert typo.returncode == 0 and "note: no workflow consumes or produces topic 'route.confirmd'" in typo.stderr
    assert "route.confirmed" in typo.stderr, typo.stderr

    def ours(msgs):
        return [m for m in msgs if m.key() == tag.encode()]

    got = ours(kafka.read("test.increments", timeout=30, until=lambda ms: len(ours(ms)) >= 2))
    assert [json.loads(m.value())["seq"] for m in got] == [0, 1]
    assert [headers(m) for m in got] == [{"trace": "t1", "event_id": f"ev-{tag}"}] * 2


def test_a_redelivered_bad_event_is_dead_lettered_once(kafka, bridge):
    key = f"k-{uuid.uuid4().hex[:6]}"
    bad = json.dumps({"route_id": key}).encode()  # no mode
    for _ in range(2):
        kafka.send("route.confirmed", None, raw=bad, key=key, event_id=f"ev-{key}")
    marker = json.dumps({"route_id": key, "mode": 5}).encode()  # after them on the same partition
    kafka.send("route.confirmed", None, raw=marker, key=key)
    msgs = kafka.read("route.confirmed.dlq", timeout=30, until=lambda ms: any(m.value() == marker for m in ms))
    assert any(m.value() == marker for m in msgs)
    assert [m.value() for m in msgs].count(bad) == 1


# -- every consumed topic against its model (the payload schemas in /asyncapi.json) ---------------
INVALID = {  # topic -> (an event that breaks its model, the reason's start: the dotted path first)
    "route.confirmed": ({"route_id": "r-m", "mode": ["walk"]}, "mode: must be a string, got array"),
    "story.generate.completed": ({"route_id": "r-x", "lang": "ru", "stories": [{"story_id": "s1", "text": "t"},
                                                                              {"text": "no id"}]},
                                 "stories.1.story_id: is required"),
    "tts.completed": ({"route_id": "r-x", "story_id": "s1", "status": "completed", "attempt": "1"},
                      "attempt: must be an integer, got '1'"),
    "init_scenario": ({"scenario_uuid": str(uuid.UUID(int=11)), "camera_url": {"url": "rtsp://c/1"}},
                      "camera_url: must be a string, got object"),
    "worker.status": ({"worker_id": str(uuid.UUID(int=12)), "status": "paused"},
                      "status: must be 'running', 'failed' or 'stopped', got 'paused'"),
}


def test_every_consumed_topic_has_a_model_and_an_invalid_case():
    from orchestrator.kafka_bridge import discover
    from orchestrator.workflow import registry

    routes = {t: r for t, r in discover(registry).items() if r.workflow.__module__.startswith("sagas.")}
    assert set(INVALID) == set(routes)
    for topic, route in routes.items():
        assert topic in route.workflow.kafka_schemas, topic


@pytest.mark.parametrize("topic", sorted(INVALID))
def test_an_event_that_breaks_its_model_is_dead_lettered_naming_the_path(kafka, bridge, topic):
    payload, reason = INVALID[topic]
    raw = json.dumps({**payload, "nonce": uuid.uuid4().hex}).encode()  # unknown fields are ignored
    kafka.send(topic, None, raw=raw, key=f"k-{uuid.uuid4().hex[:6]}")
    h = dead_letter(kafka, topic, raw)
    assert h["dlq_reason"] == reason, h["dlq_reason"]


def test_a_valid_event_of_every_consumed_topic_is_accepted(kclient, kafka, bridge, kafka_emulators):
    """route.confirmed, then the emulated services' story.generate.completed and tts.completed
    (valid by their models), init_scenario and a worker.status report: each is accepted."""
    accepted = {t: metric(bridge, "orchestrator_kafka_events_total", topic=t, outcome="accepted") for t in INVALID}
    completed_route(kclient, kafka, f"r-{uuid.uuid4().hex[:8]}")
    scenario = str(uuid.uuid4())
    kafka.send("init_scenario", {"scenario_uuid": scenario, "camera_url": "rtsp://viewer:pw@cam.example/v"},
               key=scenario)  # a camera's own credentials are taken
    worker = wait_for(lambda: (kclient.get(f"/workers?scenario_uuid={scenario}").json["items"] or [None])[0],
                      timeout=20, what="the worker")
    kafka.send("worker.status", {"worker_id": worker["worker_id"], "status": "running", "process_pid": 7,
                                 "reason": None}, key=worker["worker_id"])
    wait_for(lambda: kclient.get(f"/workers/{worker['worker_id']}").json["status"] == "running", timeout=20,
             what="the worker running")
    wait_for(lambda: all(metric(bridge, "orchestrator_kafka_events_total", topic=t, outcome="accepted") > n
                         for t, n in accepted.items()), timeout=20, what="every topic accepted")


# -- hostile input on every consumed topic --------------------------------------------------------
#: A valid event (by its model) naming ids nobody knows, for the topics whose handler looks an
#: instance up; None for the topics that start one (nothing to be unknown).
UNKNOWN_IDS = {
    "route.confirmed": None,
    "init_scenario": None,
    "story.generate.completed": lambda: {"route_id": f"r-{uuid.uuid4().hex[:8]}", "lang": "ru",
                                         "stories": [{"story_id": "s1", "text": "t"}]},
    "tts.completed": lambda: {"route_id": f"r-{uuid.uuid4().hex[:8]}", "story_id": "s1", "status": "completed"},
    "worker.status": lambda: {"worker_id": str(uuid.uuid4()), "status": "running"},
    "test.increments": lambda: {"counter": f"c-{uuid.uuid4().hex[:8]}", "n": 1, "seq": 0},
}


def consumed_topics(krt):
    """Every topic the bridge consumes, found as the bridge finds them."""
    from orchestrator.kafka_bridge import discover

    return {topic: route for topic, route in discover(krt.engine.registry).items()}


def wrong_types(route, topic):
    """Every field of the topic's model set to an object: no field takes one."""
    return json.dumps({name: {"not": ["this"]} for name in route.workflow.kafka_schemas[topic].model_fields}).encode()


HOSTILE = {  # case -> (value for a topic's route, with a key?, the start of the reason)
    "non-json": (lambda route, topic: b"this is not json {", True, r"invalid JSON: "),
    "invalid-utf8": (lambda route, topic: b'{"a": "\xff\xfe\xfa"}', True, r"invalid JSON: "),
    "empty-value": (lambda route, topic: b"", True, r"empty value: zero bytes are not an event$"),
    "null-value": (lambda route, topic: None, True, r"empty value: a tombstone \(null value\) is not an event$"),
    "null-key": (lambda route, topic: b'"just a string"', False, r"payload must be a JSON object, got str$"),
    "1mb-value": (lambda route, topic: json.dumps({"padding": "x" * (1024 * 1024)}).encode(), True,
                  r"[\w.]+: is required$"),
    "wrong-shape": (lambda route, topic: b"[1, 2, 3]", True, r"payload must be a JSON object, got list$"),
    "huge-number": (lambda route, topic: b'{"n": ' + b"9" * 5000 + b"}", True,
                    r"invalid JSON: has a number of more than 4300 digits$"),
    "deep-nesting": (lambda route, topic: b"[" * 100_000, True, r"invalid JSON: is nested too deeply$"),
    "wrong-types": (wrong_types, True, r"[\w.]+: must be "),
    "unknown-ids": (lambda route, topic: json.dumps(UNKNOWN_IDS[topic]()).encode() if UNKNOWN_IDS[topic] else None,
                    True, r"unroutable: unknown "),
}


def produce_at(kafka, topic, value, key, partition=None):
    """Produce one message (big ones allowed); its (partition, offset)."""
    from confluent_kafka import Producer

    from orchestrator.kafka import producer_config

    producer = Producer(producer_config(kafka.brokers, **{"message.max.bytes": 4 * 1024 * 1024}))
    where = []
    extra = {"partition": partition} if partition is not None else {}
    producer.produce(topic, value, key=key.encode() if key else None,
                     on_delivery=lambda err, msg: where.append((err, msg.partition(), msg.offset())), **extra)
    assert producer.flush(30) == 0 and where and where[0][0] is None, where
    return where[0][1], where[0][2]


def read_dead_letters(kafka, topics, wanted, timeout=60.0):
    """The dead letters of `topics` by (original topic, partition, offset), read from the start
    until every one of `wanted` is there (and a moment more, to see any second copy)."""
    import time

    from confluent_kafka import Consumer

    from orchestrator.kafka import consumer_config

    consumer = Consumer(consumer_config(kafka.brokers, f"reader-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe(topics)
    found: dict = {}
    deadline, settled = time.monotonic() + timeout, None
    try:
        while time.monotonic() < (settled or deadline):
            for m in consumer.consume(500, 0.3):
                if m.error():
                    continue
                h = headers(m)
                where = (h.get("dlq_original_topic"), int(h.get("dlq_original_partition", -1)),
                         int(h.get("dlq_original_offset", -1)))
                found.setdefault(where, []).append(m)
            if settled is None and wanted <= set(found):
                settled = time.monotonic() + 2.0
    finally:
        consumer.close()
    return found


def test_every_consumed_topic_is_in_the_hostile_tables(krt):
    assert set(UNKNOWN_IDS) == set(consumed_topics(krt))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_input_on_every_consumed_topic(kclient, kafka, krt, bridge, case):
    """Each hostile event is dead-lettered once, at once (never retried as a handler error),
    with its reason and its original bytes; the next event on its partition is handled."""
    import re

    make, keyed, reason = HOSTILE[case]
    retried = metric(bridge, "orchestrator_kafka_dead_letters_total", reason="handler_error")
    sent, markers = {}, {}
    for topic, route in consumed_topics(krt).items():
        raw = make(route, topic)
        if case == "unknown-ids" and raw is None:
            continue  # a start topic: no id to be unknown
        key = f"h-{uuid.uuid4().hex[:8]}" if keyed else None
        sent[topic] = (raw, produce_at(kafka, topic, raw, key))
        # the next event on the same partition: a valid start, or a valid event naming nobody
        partition = sent[topic][1][0]
        if UNKNOWN_IDS[topic] is None:
            if topic == "route.confirmed":
                marker = {"route_id": f"r-{uuid.uuid4().hex[:8]}", "mode": "walking"}
            else:
                marker = {"scenario_uuid": str(uuid.uuid4()), "camera_url": "rtsp://cam.example/next"}
        else:
            marker = UNKNOWN_IDS[topic]()
        markers[topic] = (marker, produce_at(kafka, topic, json.dumps(marker).encode(), key, partition))
    wanted = {(t, p, o) for t, (_, (p, o)) in sent.items()}
    wanted |= {(t, p, o) for t, (_, (p, o)) in markers.items() if UNKNOWN_IDS[t] is not None}
    letters = read_dead_letters(kafka, sorted({f"{t}.dlq" for t, _, _ in wanted}), wanted)
    for topic, (raw, (partition, offset)) in sent.items():
        entries = letters.get((topic, partition, offset), [])
        assert len(entries) == 1, f"{topic}: {len(entries)} dead letters for the {case} event"
        h = headers(entries[0])
        assert re.match(reason, h["dlq_reason"]), (topic, h["dlq_reason"])
        assert h["dlq_original_topic"] == topic
        assert entries[0].value() == raw  # the original bytes (None for a tombstone)
    for topic, (marker, (partition, offset)) in markers.items():
        if topic == "route.confirmed":
            wait_for(lambda: kclient.get(f"/workflows/{marker['route_id']}").status_code == 200, timeout=30,
                     what=f"the next {topic} event")
        elif topic == "init_scenario":
            wait_for(lambda: kclient.get(f"/workers?scenario_uuid={marker['scenario_uuid']}").json["total"] == 1,
                     timeout=30, what=f"the next {topic} event")
        else:
            found = letters.get((topic, partition, offset), [])
            assert len(found) == 1 and headers(found[0])["dlq_reason"].startswith("unroutable: "), topic
    # dead-lettered for what they are, never after a retry loop
    assert metric(bridge, "orchestrator_kafka_dead_letters_total", reason="handler_error") == retried
    assert bridge.proc.poll() is None


def test_event_ids_and_keys_are_taken_exactly_or_dead_lettered(kclient, kafka, bridge, kafka_emulators):
    """Different events never collapse into one: an `event_id` header that is not UTF-8 or is
    longer than the bridge keeps, and a key that is not UTF-8, are dead-lettered naming the
    field, instead of being replaced or cut into an id another event already has (which skipped
    that event as a duplicate: its worker was never deployed)."""
    from confluent_kafka import Producer

    from orchestrator.kafka import producer_config
    from orchestrator.kafka_bridge import EVENT_ID_MAX

    producer = Producer(producer_config(kafka.brokers))
    cases = {  # scenario -> (key, event_id header, the reason's start)
        str(uuid.uuid4()): (b"k1", b"\xff", "headers.event_id: is not valid UTF-8"),
        str(uuid.uuid4()): (b"k2", b"\xfe", "headers.event_id: is not valid UTF-8"),
        str(uuid.uuid4()): (b"k3", b"x" * EVENT_ID_MAX + b"-C", "headers.event_id: must be at most"),
        str(uuid.uuid4()): (b"k4", b"x" * EVENT_ID_MAX + b"-D", "headers.event_id: must be at most"),
        str(uuid.uuid4()): (b"\xff\xfe", None, "key: is not valid UTF-8"),
        # two events whose ids look alike (or blank) in a log: one was skipped as the other's duplicate
        str(uuid.uuid4()): (b"k5", b"   ", "headers.event_id: must not be empty"),
        str(uuid.uuid4()): (b"k6", "ev-1\u202e".encode(), "headers.event_id: contains a control, format or line "
                                                          "separator character (U+202E at position 4)"),
        str(uuid.uuid4()): (b"k7", b"ev-1\x1b[2J", "headers.event_id: contains a control"),
    }
    raws = {}
    for scenario, (key, eid, _) in cases.items():
        raws[scenario] = json.dumps({"scenario_uuid": scenario, "camera_url": "rtsp://cam.example/id"}).encode()
        producer.produce("init_scenario", raws[scenario], key=key,
                         headers=[("event_id", eid)] if eid is not None else None)
    # two ids that agree on their first EVENT_ID_MAX characters but are both within it are two events
    ok = [str(uuid.uuid4()) for _ in range(2)]
    for n, scenario in enumerate(ok):
        producer.produce("init_scenario", json.dumps({"scenario_uuid": scenario, "camera_url": "rtsp://c/ok"}).encode(),
                         key=scenario.encode(), headers=[("event_id", (b"y" * (EVENT_ID_MAX - 1)) + str(n).encode())])
    assert producer.flush(30) == 0
    wanted = set(raws.values())
    letters = kafka.read("init_scenario.dlq", timeout=30,
                         until=lambda ms: wanted <= {m.value() for m in ms})
    for scenario, (_, _, reason) in cases.items():
        [letter] = [m for m in letters if m.value() == raws[scenario]]  # once each, original headers kept
        assert dict(letter.headers())["dlq_reason"].decode().startswith(reason)
    for scenario in ok:
        wait_for(lambda: kclient.get(f"/workers?scenario_uuid={scenario}").json["total"] == 1, timeout=30,
                 what=f"worker of {scenario}")
    assert all(kclient.get(f"/workers?scenario_uuid={s}").json["total"] == 0 for s in cases)


def test_a_correlation_id_header_is_taken_as_over_http(kclient, kafka, bridge, krt):
    """The correlation id header is stored with the instances an event starts, as HTTP's
    X-Correlation-ID is: one with a hidden character is dead-lettered naming it, a longer one is
    cut to 64 characters (PostgreSQL refused it whole: the event was retried, then dead-lettered
    as a handler error)."""
    from sqlalchemy import select

    from orchestrator.models import WorkflowInstance

    hidden, long = f"r-ch-{uuid.uuid4().hex[:6]}", f"r-cl-{uuid.uuid4().hex[:6]}"
    raw = {r: json.dumps({"route_id": r, "mode": "walk"}).encode() for r in (hidden, long)}
    sends = {hidden: "c-1\u202e".encode(), long: b"c" * 100}
    for route_id, correlation in sends.items():
        kafka.producer.produce("route.confirmed", raw[route_id], key=route_id.encode(),
                               headers=[("orchestrator_correlation_id", correlation)])
    kafka.flush()
    letter = dead_letter(kafka, "route.confirmed", raw[hidden])
    assert letter["dlq_reason"] == ("headers.orchestrator_correlation_id: contains a control, format or line "
                                    "separator character (U+202E at position 3)"), letter

    def correlation():
        with krt.sessions() as s:
            return s.execute(select(WorkflowInstance.correlation_id).where(
                WorkflowInstance.business_key == long)).scalar()

    assert wait_for(correlation, timeout=30, what="the route with a long correlation id") == "c" * 64
    assert kclient.get(f"/workflows/{hidden}").status_code == 404
