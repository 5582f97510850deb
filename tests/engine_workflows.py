"""A workflow that exercises every engine feature, for the tests: a step with a compensation,
a chain step, a human-input event with a guard, a fan-out with a join, cancel and restart.

Every task counts its effects in Redis under (instance, task[, branch]) so tests can assert
"one effect" across duplicates, retries and restarts.
"""
from __future__ import annotations

import os
from typing import Any

import redis
from statemachine import State

from orchestrator.engine import Done, StepContext
from orchestrator.errors import InvalidInput, UpstreamError
from orchestrator.steps import compensation_task, step_task
from orchestrator.workflow import Retry, Step, Workflow, register


def effects() -> redis.Redis:
    return redis.Redis.from_url(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/1"))


def count(instance_id: str, what: str) -> int:
    return effects().hincrby(f"effects:{instance_id}", what, 1)


def check_approval(payload: dict[str, Any], instance: Any) -> dict[str, Any]:
    """The approver's signal: `{"amount": <number>}` (the guard compares it with the limit)."""
    unknown = sorted(set(payload) - {"amount"})
    if unknown:
        raise InvalidInput(unknown[0], "unknown field; accepted: amount")
    amount = payload.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, (int, float)) or amount < 0:
        raise InvalidInput("amount", "is required: a number >= 0")
    return {"amount": amount}


@register
class Order(Workflow):
    type = "order"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})
    signals = {"approve": check_approval}

    new = State(initial=True)
    reserving = State()
    charging = State()
    awaiting_approval = State()
    shipping = State()
    done = State(final=True)
    failed = State()
    cancelled = State(final=True)

    start = new.to(reserving)
    reserved = reserving.to(charging)
    charged = charging.to(awaiting_approval)
    approve = awaiting_approval.to(shipping, cond="within_limit")
    shipped = shipping.to(done)
    fail = reserving.to(failed) | charging.to(failed) | shipping.to(failed)
    restart = failed.to(reserving, charging, shipping, cond="is_restart_target")
    cancel = (reserving.to(cancelled) | charging.to(cancelled) | awaiting_approval.to(cancelled)
              | shipping.to(cancelled) | failed.to(cancelled))

    steps = {
        reserving: Step("order.reserve", name="reserve", compensate="order.release"),
        charging: Step(chain=("order.authorize", "order.capture"), name="charge", compensate="order.refund"),
        shipping: Step("order.ship", name="ship", fanout="parcels", join="shipped",
                       retry=Retry(attempts=2, backoff=0.1)),
    }

    def within_limit(self, payload: dict[str, Any] | None = None) -> bool:
        return float((payload or {}).get("amount", 0)) <= float(self.context["input"].get("limit", 100))

    def on_enter_awaiting_approval(self) -> None:
        self.emit("celery", "order.notify", {"task": ["order.notify", [self.model.id]]})

    def parcels(self) -> list[dict[str, Any]]:
        return list(self.context["input"].get("parcels", []))

    @classmethod
    def validate_input(cls, data: Any, settings: Any) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidInput("input", "must be a JSON object")
        if not isinstance(data.get("parcels", []), list):
            raise InvalidInput("input.parcels", "must be a list")
        limit = data.get("limit", 100)
        if isinstance(limit, bool) or not isinstance(limit, (int, float)):
            raise InvalidInput("input.limit", "must be a number")
        return data


@step_task("order.reserve")
def reserve(ctx: StepContext) -> Done:
    count(ctx.instance_id, "reserve")
    if ctx.input.get("reserve_fails"):
        raise UpstreamError("stock", "out of stock", upstream_status=409)
    return Done("reserved", {"reservation": f"r-{ctx.instance_id[:8]}"})


@step_task("order.authorize")
def authorize(ctx: StepContext) -> None:
    count(ctx.instance_id, "authorize")
    ctx.save(authorized=True)


@step_task("order.capture")
def capture(ctx: StepContext) -> Done:
    count(ctx.instance_id, "capture")
    assert ctx.data.get("authorized"), "capture ran before authorize"
    return Done("charged", {"charged": True})


@step_task("order.ship")
def ship(ctx: StepContext) -> Done:
    parcel = ctx.data["branches"][ctx.branch]["input"]
    n = count(ctx.instance_id, f"ship:{ctx.branch}")
    mode = parcel.get("mode")
    if mode == "fail_once" and n == 1:
        raise UpstreamError("carrier", "carrier busy", upstream_status=503)
    if mode == "fail" and not effects().get(f"fixed:{ctx.instance_id}"):
        raise UpstreamError("carrier", "address rejected", upstream_status=422)
    return Done(output={"parcel": parcel.get("id"), "tracking": f"t-{ctx.branch}"})


@compensation_task("order.release")
def release(ctx: StepContext) -> None:
    effects().rpush(f"compensations:{ctx.instance_id}", "release")


@compensation_task("order.refund")
def refund(ctx: StepContext) -> None:
    effects().rpush(f"compensations:{ctx.instance_id}", "refund")


from celery import shared_task  # noqa: E402


@shared_task(name="order.notify", acks_late=True)
def notify(instance_id: str) -> None:
    count(instance_id, "notify")
