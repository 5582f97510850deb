"""No I/O: payload validation and the bridge's retry policy."""
from __future__ import annotations

import threading
import uuid
from types import SimpleNamespace

import pytest
from sqlalchemy.exc import OperationalError

from orchestrator.errors import InvalidInput
from orchestrator.kafka_bridge import Bridge, discover
from orchestrator.schemas import parse
from orchestrator.workflow import registry
from sagas.route_content import RouteContent
from sagas.route_content import RouteConfirmed, StoryGenerateCompleted, TtsCompleted
from sagas.worker_deployment import InitScenario, WorkerDeployment, WorkerStatusReport


# The route content machine's fan-out and fan-in are the engine's external step now: they are
# tested with the engine in process (tests/engine/test_route_content.py).


def test_event_models_name_the_field_and_the_problem():
    def problem(model, payload):
        with pytest.raises(InvalidInput) as e:
            parse(model, payload)
        return e.value.field, e.value.problem

    assert problem(RouteConfirmed, {"mode": "walk"}) == ("route_id", "is required")
    assert problem(RouteConfirmed, {"route_id": "  ", "mode": "walk"}) == ("route_id", "must not be empty")
    assert problem(RouteConfirmed, {"route_id": 5, "mode": "walk"}) == ("route_id", "must be a string, got integer")
    assert problem(WorkerStatusReport, {"worker_id": str(uuid.uuid4()), "status": "running", "process_pid": True}) \
        == ("process_pid", "must be an integer, got boolean")
    assert problem(TtsCompleted, {"route_id": "r", "story_id": True, "status": "failed"}) \
        == ("story_id", "must be a non-empty string or an integer")
    assert problem(StoryGenerateCompleted, {"route_id": "r", "lang": "ru", "stories": [{"story_id": 1, "text": ""}]}) \
        == ("stories.0.text", "must not be empty")
    assert parse(StoryGenerateCompleted, {"route_id": "r", "lang": "ru",
                                          "stories": [{"story_id": 7, "text": "t", "title": "kept out"}]}
                 ).stories[0].model_dump() == {"story_id": "7", "text": "t"}
    # the seed's extra fields of route.confirmed are kept in the workflow's input
    assert RouteContent.validate_input({"route_id": "r", "mode": "walk", "city": "Kazan"}, None)["city"] == "Kazan"


def test_worker_inputs():
    u = str(uuid.uuid4())
    assert parse(InitScenario, {"scenario_uuid": u.upper(), "camera_url": "rtsp://cam/1"}).scenario_uuid == u
    for bad in ("nope", 5, None, ""):
        with pytest.raises(InvalidInput) as e:
            parse(InitScenario, {"scenario_uuid": bad, "camera_url": "rtsp://cam/1"})
        assert e.value.field == "scenario_uuid"
    for bad in ("ftp://x/1", "rtsp://", "rtsp://a b", 7, ""):
        with pytest.raises(InvalidInput) as e:
            parse(InitScenario, {"scenario_uuid": u, "camera_url": bad})
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


def test_a_fatal_producer_error_is_the_producers_and_the_message_goes_again():
    """An idempotent producer whose broker restarted without its state gets fatal errors; the
    outbox row is not failed for it (its step would fail), the producer is replaced."""
    from confluent_kafka import KafkaError, KafkaException

    from orchestrator.kafka import is_permanent_error

    fatal = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "fenced", fatal=True)
    assert not is_permanent_error(fatal)
    assert not is_permanent_error(KafkaException(fatal))
    assert is_permanent_error(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
