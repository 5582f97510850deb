"""A workflow whose Kafka effect is not idempotent by itself (it adds), so only the bridge's
de-duplication keeps a redelivered event from counting twice. Used by the crash and rebalance
tests."""
from __future__ import annotations

from typing import Any

from statemachine import State

from orchestrator.kafka_bridge import KafkaEvent
from orchestrator.schemas import Event, parse
from orchestrator.workflow import Workflow, register


class Increment(Event):
    counter: str
    n: int
    seq: int


@register
class Counter(Workflow):
    type = "test_counter"
    kafka_consumes = {"test.increments": "on_increment"}
    kafka_schemas = {"test.increments": Increment}

    counting = State(initial=True)
    add = counting.to.itself(internal=True)

    def on_enter_counting(self) -> None:
        self.model.context.setdefault("total", 0)
        self.model.context.setdefault("seen", [])

    def on_add(self, payload: dict[str, Any] | None = None) -> None:
        ctx = self.context
        ctx["total"] = ctx.get("total", 0) + payload["n"]  # type: ignore[index]
        ctx.setdefault("seen", []).append(payload["seq"])  # type: ignore[index]

    @classmethod
    def on_increment(cls, engine: Any, event: KafkaEvent) -> str:
        from sqlalchemy import select

        from orchestrator.errors import NotFound
        from orchestrator.models import WorkflowInstance

        p = parse(Increment, event.payload)
        counter, n, seq = p.counter, p.n, p.seq
        with engine.sessions() as s:
            instance_id = s.execute(select(WorkflowInstance.id).where(
                WorkflowInstance.type == cls.type, WorkflowInstance.business_key == counter)).scalar()
        if instance_id is None:
            raise NotFound(f"unknown counter {counter}")
        engine.fire(instance_id, "add", {"n": n, "seq": seq}, actor="kafka:test.increments")
        return "accepted"
