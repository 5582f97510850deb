"""Small workflows for the in-process engine tests, each exercising one engine feature. Their
tasks record calls in `CALLS` and take their behaviour from `SCRIPT` (per test)."""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from statemachine import State

from orchestrator.engine import Await, Done, StepContext
from orchestrator.errors import UpstreamError
from orchestrator.steps import StepError, compensation_task, step_task
from orchestrator.workflow import External, ItemFailed, Retry, Step, Workflow, register

#: (task, instance, step, branch) for every call
CALLS: list[tuple[str, str, str, int | None]] = []
#: task name -> list of behaviours consumed one per call: "ok", "retryable", "fatal", "slow" (0.3 s,
#: then ok), "slow retryable"
SCRIPT: dict[str, list[str]] = {}


def _behave(name: str, ctx: StepContext) -> None:
    CALLS.append((name, ctx.instance_id, ctx.step, ctx.branch))
    todo = SCRIPT.get(name) or []
    what = todo.pop(0) if todo else "ok"
    if what == "retryable":
        raise UpstreamError("svc", "503 from the service", 503)
    if what == "fatal":
        raise StepError("the service refused")
    if what.startswith("slow"):  # "slow" then "ok", "retryable" or "fatal": the call takes 0.3 s first
        time.sleep(0.3)
        if what == "slow retryable":
            raise UpstreamError("svc", "503 from the service", 503)


@step_task("inproc.reserve")
def reserve(ctx: StepContext) -> Done:
    _behave("inproc.reserve", ctx)
    return Done("reserved", {"reservation": f"r-{ctx.instance_id[:4]}"})


@compensation_task("inproc.release")
def release(ctx: StepContext) -> None:
    _behave("inproc.release", ctx)


@step_task("inproc.pack")
def pack(ctx: StepContext) -> Done:
    _behave("inproc.pack", ctx)
    return Done(output={"parcel": ctx.data.get("input") or ctx.branch})


@step_task("inproc.ask")
def ask(ctx: StepContext) -> Await:
    """Sends the request for an external step (here: records the token it would send)."""
    _behave("inproc.ask", ctx)
    ctx.save(sent_token=ctx.token)
    return Await()


@register
class Shop(Workflow):
    """reserve (task object, compensated, retried) -> pack (fan-out over parcels) -> done."""

    type = "inproc-shop"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    reserving = State()
    packing = State()
    done = State(final=True)
    failed = State()
    cancelled = State(final=True)

    start = new.to(reserving)
    reserved = reserving.to(packing)
    packed = packing.to(done)
    fail = reserving.to(failed) | packing.to(failed)
    restart = failed.to(reserving, packing, cond="is_restart_target")
    cancel = reserving.to(cancelled) | packing.to(cancelled) | failed.to(cancelled)

    steps = {
        reserving: Step(reserve, name="reserve", compensate=release, retry=Retry(attempts=3, backoff=1)),
        packing: Step(pack, name="pack", fanout="parcels", join="packed", retry=Retry(attempts=1)),
    }

    def parcels(self) -> list[Any]:
        return list(self.context["input"].get("parcels", ["a", "b", "c"]))


@register
class Survey(Workflow):
    """An external fan-out: one question per item, sent through the outbox by the workflow
    itself, answered by events carrying the engine's tokens; then a single external step whose
    request a task sends, keyed by a business id (like the balance correlationId)."""

    type = "inproc-survey"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    asking = State()
    confirming = State()
    done = State(final=True)
    failed = State()

    start = new.to(asking)
    answered = asking.to(confirming)
    confirmed = confirming.to(done)
    give_up = asking.to(failed) | confirming.to(failed)
    restart = failed.to(asking, confirming, cond="is_restart_target")

    steps = {
        asking: Step(name="ask_all", external=External(items="people", send="send_question"),
                     join="answered", on_failure="give_up", retry=Retry(attempts=2, backoff=1),
                     timeout=timedelta(minutes=5)),
        confirming: Step(ask, name="confirm", external=External(token="confirmation_id"), join="confirmed",
                         on_failure="give_up"),
    }

    def people(self) -> list[str]:
        return list(self.context["input"]["people"])

    def send_question(self, person: str, token: str, attempt: int) -> None:
        self.emit("kafka", "questions", {"to": person, "reply_token": token, "attempt": attempt}, key=person)

    def confirmation_id(self, step: str, index: int, item: Any, restarts: int) -> str:
        return f"confirm-{self.model.id}-{restarts}"

    def on_enter_confirming(self, payload: dict[str, Any] | None = None) -> None:
        self.context["answers"] = (payload or {}).get("items")

    def on_enter_failed(self, payload: dict[str, Any] | None = None) -> None:
        self.context["error"] = (payload or {}).get("error")
        self.context["failed_items"] = [f["input"] for f in (payload or {}).get("failed") or []]

    @classmethod
    def message_failed(cls, context: dict[str, Any], target: str, payload: dict[str, Any],
                       error: str) -> ItemFailed | None:
        return ItemFailed(payload["reply_token"], f"not asked: {error}") if target == "questions" else None


@register
class Approval(Workflow):
    """A wait for a person's `approve` signal with a deadline on the whole instance, and no
    callback of its own: what the engine records when the deadline fails it."""

    type = "inproc-approval"
    start_event = "start"
    success_states = frozenset({"approved"})
    failure_states = frozenset({"expired"})
    signals = {"approve": lambda payload, _instance: payload}

    new = State(initial=True)
    awaiting = State()
    approved = State(final=True)
    expired = State(final=True)

    start = new.to(awaiting)
    approve = awaiting.to(approved)
    fail = awaiting.to(expired)

    @classmethod
    def timeout(cls, settings: Any) -> timedelta | None:
        return timedelta(minutes=2)
