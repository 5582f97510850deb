"""No I/O: payload validation and the bridge's retry policy."""
from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from orchestrator.errors import InvalidInput
from orchestrator.kafka_bridge import Bridge, discover, require
from orchestrator.workflow import registry
from sagas.route_content import RouteContent
from sagas.worker_deployment import WorkerDeployment, parse_camera_url, parse_uuid


# The route content machine's fan-out and fan-in are the engine's external step now: they are
# tested with the engine in process (tests/engine/test_route_content.py).


def test_require_names_the_field_and_the_problem():
    with pytest.raises(InvalidInput) as e:
        require({}, "route_id", str)
    assert (e.value.field, e.value.problem) == ("route_id", "is required")
    with pytest.raises(InvalidInput) as e:
        require({"n": True}, "n", int)
    assert e.value.problem == "must be a integer, got bool"
    with pytest.raises(InvalidInput) as e:
        require({"s": "  "}, "s", str)
    assert e.value.problem == "must not be empty"
    assert require({}, "x", str, optional=True) is None


def test_worker_inputs():
    u = str(uuid.uuid4())
    assert parse_uuid(u.upper(), "scenario_uuid") == u
    for bad in ("nope", 5, None, ""):
        with pytest.raises(InvalidInput):
            parse_uuid(bad, "scenario_uuid")
    assert parse_camera_url("rtsp://cam/1") == "rtsp://cam/1"
    for bad in ("ftp://x/1", "rtsp://", "rtsp://a b", 7, ""):
        with pytest.raises(InvalidInput) as e:
            parse_camera_url(bad)
        assert e.value.field == "camera_url"


def test_workflows_declare_their_topics():
    routes = discover(registry)
    assert routes["route.confirmed"].workflow is RouteContent
    assert routes["worker.status"].workflow is WorkerDeployment
    assert {"tts.completed", "story.generate.completed", "init_scenario"} <= set(routes)


def _bridge(handle, max_attempts=3):
    b = Bridge.__new__(Bridge)
    b.max_attempts = max_attempts
    b.handle = handle
    b.dead_letters = []
    b.dead_letter = lambda msg, reason, kind: b.dead_letters.append((reason, kind)) or "dead_letter"
    return b


MSG = SimpleNamespace(topic=lambda: "t", partition=lambda: 0, offset=lambda: 9)


def test_database_outage_is_waited_out_never_dead_lettered():
    calls = []

    def handle(msg):
        calls.append(1)
        if len(calls) < 6:
            raise OperationalError("SELECT 1", {}, Exception("connection refused"))
        return "accepted"

    b = _bridge(handle, max_attempts=3)
    stop = threading.Event()
    stop.wait = lambda delay: False  # no real sleeping in a unit test
    assert b.handle_with_retry(MSG, stop) == "accepted" and len(calls) == 6 and b.dead_letters == []


def test_a_handler_bug_dead_letters_after_the_attempts_and_stop_leaves_it_uncommitted():
    b = _bridge(lambda msg: (_ for _ in ()).throw(KeyError("boom")), max_attempts=3)
    stop = threading.Event()
    stop.wait = lambda delay: False
    assert b.handle_with_retry(MSG, stop) == "dead_letter"
    assert b.dead_letters[0][1] == "handler_error" and "KeyError" in b.dead_letters[0][0]
    b = _bridge(lambda msg: (_ for _ in ()).throw(OperationalError("x", {}, Exception("down"))))
    stop = threading.Event()
    stop.set()
    assert b.handle_with_retry(MSG, stop) is None
