"""The route content workflow on the in-process engine: its TTS batch is an external step (one
item per story, counted on the step row). No Kafka: the outbox rows are captured and the
services' answers are the bridge handlers called directly."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from orchestrator.kafka_bridge import Ignored
from sagas.route_content import RouteContent, restart_step, route_view


def event(topic, payload):
    return SimpleNamespace(topic=topic, payload=payload, key=payload.get("route_id"), headers={})


def through_stories(inproc, n=3, route_id="r1"):
    RouteContent.on_route_confirmed(inproc.engine, event("route.confirmed", {"route_id": route_id, "mode": "walking"}))
    assert inproc.outbox.sent("kafka", "story.generate") == [{"route_id": route_id, "lang": "ru"}]
    stories = [{"story_id": f"s{i}", "text": f"t{i}"} for i in range(1, n + 1)]
    RouteContent.on_stories_generated(inproc.engine, event("story.generate.completed",
                                                           {"route_id": route_id, "lang": "ru", "stories": stories}))
    return inproc.engine.find("route_content", route_id)


def tts(inproc, story, status="completed", route_id="r1", **extra):
    return RouteContent.on_tts_completed(inproc.engine, event("tts.completed", {
        "route_id": route_id, "story_id": story, "status": status, **extra}))


def view(inproc, route_id="r1"):
    return route_view(inproc.engine.snapshot(RouteContent.find(inproc.engine, route_id), history=False))


def test_fan_out_one_tts_request_per_story_keyed_by_route(inproc):
    through_stories(inproc, 3)
    rows = [r for r in inproc.outbox.rows if r.target == "tts.requested"]
    assert [r.key for r in rows] == ["r1"] * 3
    assert rows[0].payload == {"route_id": "r1", "story_id": "s1", "text": "t1", "lang": "ru", "attempt": 1}
    tb = view(inproc)["steps"]["tts_batch"]
    assert (tb["status"], tb["attempt"], tb["total"], tb["done"], tb["failed"]) == ("pending", 1, 3, 0, 0)


def test_fan_in_waits_for_every_story_then_prefetches(inproc):
    through_stories(inproc, 2)
    tts(inproc, "s1", audio_url="a1")
    v = view(inproc)
    assert v["state"] == "synthesizing" and v["steps"]["tts_batch"]["status"] == "running"
    assert inproc.outbox.sent("kafka", "delivery.prefetch") == []
    tts(inproc, "s2", audio_url="a2")
    assert view(inproc)["status"] == "completed"
    assert inproc.outbox.sent("kafka", "delivery.prefetch") == [{"route_id": "r1", "next_audio": [
        {"story_id": "s1", "audio_url": "a1"}, {"story_id": "s2", "audio_url": "a2"}]}]


def test_failed_story_fails_batch_after_all_report_and_restart_requests_only_the_rest(inproc):
    through_stories(inproc, 3)
    tts(inproc, "s1", "failed", error="x")
    assert view(inproc)["state"] == "synthesizing"  # s2 and s3 are still in flight
    tts(inproc, "s2")
    tts(inproc, "s3")
    v = view(inproc)
    tb = v["steps"]["tts_batch"]
    assert v["state"] == "tts_failed"
    assert (tb["status"], tb["done"], tb["failed"]) == ("failed", 2, 1) and "s1" in tb["error"]
    assert v["stories"][0] == {"story_id": "s1", "tts_status": "failed", "error": "x"}
    sent = len(inproc.outbox.sent("kafka", "tts.requested"))
    after = route_view(restart_step(inproc.engine, "r1", "tts_batch"))
    again = inproc.outbox.sent("kafka", "tts.requested")[sent:]
    assert [p["story_id"] for p in again] == ["s1"] and again[0]["attempt"] == 2
    assert (after["steps"]["tts_batch"]["status"], after["steps"]["tts_batch"]["attempt"]) == ("pending", 2)
    assert [s["tts_status"] for s in after["stories"]] == ["requested", "completed", "completed"]
    with pytest.raises(Ignored, match="stale"):
        tts(inproc, "s1", attempt=1)
    tts(inproc, "s1", attempt=2)
    assert view(inproc)["status"] == "completed"


def test_second_result_for_a_story_is_ignored_and_a_stranger_refused(inproc):
    through_stories(inproc, 2)
    tts(inproc, "s1")
    with pytest.raises(Ignored, match="second"):
        tts(inproc, "s1", "failed")
    from orchestrator.errors import InvalidInput

    with pytest.raises(InvalidInput) as err:
        tts(inproc, "not-mine")
    assert err.value.field == "story_id"


def test_zero_stories_complete_at_once_with_an_empty_prefetch(inproc):
    through_stories(inproc, 0)
    assert view(inproc)["status"] == "completed"
    assert inproc.outbox.sent("kafka", "delivery.prefetch") == [{"route_id": "r1", "next_audio": []}]
    tb = view(inproc)["steps"]["tts_batch"]
    assert (tb["status"], tb["total"], tb["done"], tb["failed"]) == ("completed", 0, 0, 0)
