"""What a workflow's Kafka handler receives and may raise, apart from the bridge that calls it.

Workflow modules import these names from here, not from `orchestrator.kafka_bridge`: a worker
loads every workflow module but never runs a handler, and the bridge module would bring its
consumer machinery and `prometheus_client` into every worker process (docs/performance.md,
"Memory"). `orchestrator.kafka_bridge` re-exports both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The longest `event_id` header taken (characters); a longer one is dead-lettered, never cut:
#: two ids sharing their first characters would otherwise be taken for one event.
EVENT_ID_MAX = 200


def event_id_problem(text: str) -> str | None:
    """Why `text` cannot be an `event_id` header (the bridge dead-letters the event, `orchestrator
    produce --event-id` refuses it), or None: longer than EVENT_ID_MAX characters, or not an
    identifier (blank, or a control, format or line separator character inside: two ids that
    look the same would be two events)."""
    from .schemas import identifier_problem

    if len(text) > EVENT_ID_MAX:
        return f"must be at most {EVENT_ID_MAX} characters, got {len(text)}"
    return identifier_problem(text)


class Ignored(Exception):
    """The workflow refuses the event on purpose (late, repeated, already applied). Logged, counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass
class KafkaEvent:
    """One consumed event as a handler sees it: where it came from, its parsed JSON payload (a
    dict), its id for exactly-once (see `kafka_bridge.event_id`) and its headers (str to str)."""

    topic: str
    partition: int
    offset: int
    key: str | None
    payload: dict[str, Any]
    event_id: str
    headers: dict[str, str] = field(default_factory=dict)
