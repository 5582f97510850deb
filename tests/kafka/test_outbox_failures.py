"""An outbox row Kafka can never take (a story text over the producer's message.max.bytes) is
failed with its error and fails its story and step; the relay goes on with the same route's
other story and with other instances' rows (the kick after commit and the sweeper alike)."""
from __future__ import annotations

import json
import uuid

import pytest
from conftest import wait_for
from sqlalchemy import select

from orchestrator.models import OutboxMessage

pytestmark = pytest.mark.kafka


def on_topic(kafka, topic: str, key: str, match=lambda p: True) -> list[dict]:
    def found(ms):
        return [json.loads(m.value()) for m in ms if m.key() == key.encode() and match(json.loads(m.value()))]

    return wait_for(lambda: found(kafka.read(topic, timeout=5, until=found)), timeout=40,
                    what=f"{topic} for {key}")


def test_a_message_too_large_fails_its_story_and_the_rest_still_go(kclient, kafka, krt, bridge, ksweeper):
    from orchestrator.engine import Engine
    from orchestrator.workflow import registry

    route_id = f"big-{uuid.uuid4().hex[:8]}"
    # Started without a kick: its story.generate waits for the sweeper's grace period, so the
    # story service (when its emulator runs) cannot answer before the answer fired below.
    no_kick = Engine(krt.settings, krt.sessions, registry, relay=None)
    instance_id = no_kick.start("route_content", {"route_id": route_id, "mode": "walking"}, key=route_id)[0]["id"]
    big, small = f"{route_id}-s1", f"{route_id}-s2"
    # The story service's answer, fired here: this process's relay sends the tts.requested rows.
    krt.engine.fire(instance_id, "stories_ready", {"lang": "ru", "stories": [
        {"story_id": big, "text": "a" * 1_200_000}, {"story_id": small, "text": "short"}]})
    # Another instance's row, left for the sweeper (its process committed and died before the kick).
    other = f"other-{uuid.uuid4().hex[:8]}"
    no_kick.start("route_content", {"route_id": other, "mode": "car"}, key=other)

    assert [m["story_id"] for m in on_topic(kafka, "tts.requested", route_id)] == [small]
    assert on_topic(kafka, "story.generate", other) == [{"route_id": other, "lang": "ru"}]
    with krt.sessions() as s:
        rows = s.execute(select(OutboxMessage).where(OutboxMessage.instance_id == instance_id,
                                                     OutboxMessage.target == "tts.requested")).scalars().all()
    failed = [r for r in rows if r.payload["story_id"] == big]
    assert failed[0].failed_at is not None and failed[0].sent_at is None
    assert "MSG_SIZE_TOO_LARGE" in failed[0].last_error

    kafka.send("tts.completed", {"route_id": route_id, "story_id": small, "status": "completed",
                                 "audio_url": "https://cdn.example/a.mp3", "attempt": 1}, key=route_id)
    view = wait_for(lambda: (lambda r: r.json if r.json["status"] == "failed" else None)(
        kclient.get(f"/workflows/{route_id}")), timeout=30, what="the route to fail")
    tts = view["steps"]["tts_batch"]
    assert tts["status"] == "failed" and big in tts["error"] and "MSG_SIZE_TOO_LARGE" in tts["error"]
    stories = {s["story_id"]: s for s in view["stories"]}
    assert stories[big]["tts_status"] == "failed" and "MSG_SIZE_TOO_LARGE" in stories[big]["error"]
    assert stories[small]["tts_status"] == "completed"

