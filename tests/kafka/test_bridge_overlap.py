"""A batch commits in the bridge's committer thread while the next one is filled (PostgreSQL; on
SQLite one batch at a time). The next batch must not act on what it cannot see yet: an event
repeated from the batch committing is a duplicate, a second start of a route started there
finds that route, and a handler that reads (a route's completion) waits for the commit rather
than find nothing. The batches are handed to `Bridge.handle_batch` in the test's process, one
right after the other, so the second is always filled while the first may still be committing."""
from __future__ import annotations

import gc
import json
import logging
import threading
import uuid
from typing import Any

import pytest
from sqlalchemy import func, select

from orchestrator.models import ProcessedMessage, WorkflowInstance

from .test_bridge_batch import store  # noqa: F401 - the fixture (PostgreSQL and SQLite)

pytestmark = pytest.mark.kafka


class Message:
    """What the bridge reads of a confluent_kafka Message."""

    def __init__(self, topic: str, payload: dict[str, Any], key: str, event_id: str, offset: int) -> None:
        self._topic, self._value, self._key, self._offset = topic, json.dumps(payload).encode(), key.encode(), offset
        self._headers = [("event_id", event_id.encode())]

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key

    def value(self) -> bytes:
        return self._value

    def headers(self) -> list[tuple[str, bytes]]:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return 1, 1_700_000_000_000 + self._offset

    def error(self) -> None:
        return None


@pytest.fixture
def bridge(store):  # noqa: F811 - the fixture imported above
    from orchestrator import runtime
    from orchestrator.config import load_settings
    from orchestrator.kafka_bridge import Bridge

    url, env, _ = store
    rt = runtime.build(load_settings(environ={**env, "CONSUMER_GROUP": f"overlap-{uuid.uuid4().hex[:6]}"},
                                     dotenv="/nonexistent"))
    b = Bridge(rt)
    yield b, rt
    b._drain()
    if b._committer is not None:
        b._committer.shutdown()
    b.consumer.close()
    # librdkafka producers live until freed: free them before this test's broker stops, or
    # they retry connecting to it for the rest of the session
    b.dlq = None
    rt.relay.kicker().flush()
    rt.relay.publishers.clear()
    rt.db.dispose()
    gc.collect()


def test_the_next_batch_acts_on_what_the_batch_committing_wrote(bridge, caplog):
    b, rt = bridge
    assert b.overlap is (rt.db.dialect.name == "postgresql")
    tag = uuid.uuid4().hex[:6]
    route = [f"ov-{tag}-{i}" for i in range(6)]
    offsets = iter(range(1000))

    def confirmed(rid: str, eid: str) -> Message:
        return Message("route.confirmed", {"route_id": rid, "mode": "walking"}, rid, eid, next(offsets))

    def stories(rid: str, eid: str) -> Message:
        return Message("story.generate.completed", {"route_id": rid, "lang": "ru", "stories": [
            {"story_id": f"{rid}-s1", "text": "Once"}]}, rid, eid, next(offsets))

    stop = threading.Event()
    caplog.set_level(logging.DEBUG, logger="orchestrator.kafka_bridge")
    first = [confirmed(r, f"start-{r}") for r in route[:5]]
    # while the first batch commits: a repeat of one of its events, a second start of one of its
    # routes under a new event id, and a route of its own
    second = [confirmed(route[2], f"start-{route[2]}"), confirmed(route[1], f"again-{route[1]}"),
              confirmed(route[5], f"start-{route[5]}")]
    # then the stories of a route of each: the handler reads the route, so it waits for the
    # second batch to commit, where it would have found no route of that id
    third = [stories(route[0], f"stories-{route[0]}"), stories(route[5], f"stories-{route[5]}")]
    for batch in (first, second, third):
        assert b.handle_batch(batch, stop)
    assert b._drain()

    with rt.sessions() as s:
        counts = dict(s.execute(select(WorkflowInstance.business_key, func.count()).where(
            WorkflowInstance.business_key.in_(route)).group_by(WorkflowInstance.business_key)).all())
        handled = set(s.execute(select(ProcessedMessage.message_id).where(
            ProcessedMessage.consumer.in_(["kafka:route.confirmed", "kafka:story.generate.completed"]),
            ProcessedMessage.message_id.like(f"%{tag}%"))).scalars())
    assert counts == {r: 1 for r in route}, counts
    # (a second start that finds its route writes nothing, so neither its de-duplication row)
    assert handled == {f"start-{r}" for r in route} | {f"stories-{route[0]}", f"stories-{route[5]}"}, handled
    for rid in (route[0], route[5]):
        state = rt.engine.snapshot(rt.engine.find("route_content", rid), history=False)["state"]
        assert state == "synthesizing", (rid, state)
    assert b.pending == {("route.confirmed", 0): second[-1].offset() + 1,
                         ("story.generate.completed", 0): third[-1].offset() + 1}
    log = caplog.text
    assert "rolled back" not in log, log
    # the stories were applied together in their batch, not set aside as unknown routes
    assert "batch of 2 events: 2 applied together, 0 alone" in log, log
    if b.overlap:  # the repeat was seen for what it is once the first batch had committed
        assert "filled again" in log, log
