"""A workflow that exercises every engine feature, for the tests: a step with a compensation,
a chain step, a human-input event with a guard, a fan-out with a join, cancel and restart.
And small ones for faults: a chain whose first link fails once (`payment`), a step that kills
its worker process (`crash`), compensations that fail (`trip`).

Every task counts its effects in Redis under (instance, task[, branch]) so tests can assert
"one effect" across duplicates, retries and restarts.
"""
from __future__ import annotations

import os
import time
from typing import Any

import redis
from statemachine import State

from orchestrator.engine import Done, StepContext
from orchestrator.errors import InvalidInput, UpstreamError
from orchestrator.steps import StepError, compensation_task, step_task
from orchestrator.workflow import Retry, Step, Workflow, register


def effects() -> redis.Redis:
    """Where the effects are counted: REDIS_URL in the processes a test starts; in the test
    process itself, the session's Redis database (TEST_REDIS_URL, set by conftest.py)."""
    return redis.Redis.from_url(os.environ.get("REDIS_URL") or os.environ["TEST_REDIS_URL"])


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


FAST = Retry(attempts=3, backoff=0.1)


@register
class Payment(Workflow):
    """A chain whose first link fails once with a retryable error."""

    type = "payment"
    start_event = "start"
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    paying = State()
    paid = State(final=True)
    failed = State()

    start = new.to(paying)
    charged = paying.to(paid)
    fail = paying.to(failed)
    restart = failed.to(paying, cond="is_restart_target")

    steps = {paying: Step(chain=("payment.authorize", "payment.capture"), name="pay", retry=FAST)}


@step_task("payment.authorize")
def pay_authorize(ctx: StepContext) -> None:
    if count(ctx.instance_id, "authorize") == 1:
        raise UpstreamError("bank", "bank busy", upstream_status=503)
    ctx.save(authorized=True)


@step_task("payment.capture")
def pay_capture(ctx: StepContext) -> Done:
    count(ctx.instance_id, "capture")
    return Done("charged", {"authorized": bool(ctx.data.get("authorized"))})


@register
class Crash(Workflow):
    """A step, or a fan-out branch, whose task kills its worker process when told to."""

    type = "crash"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    running = State()
    fanning = State()
    done = State(final=True)
    failed = State()

    start = new.to(fanning, cond="has_items") | new.to(running)
    ran = running.to(done) | fanning.to(done)
    fail = running.to(failed) | fanning.to(failed)
    restart = failed.to(running, fanning, cond="is_restart_target")

    steps = {
        running: Step("crash.run", name="run", retry=FAST),
        fanning: Step("crash.run", name="fan", fanout="items", join="ran", retry=FAST),
    }

    def has_items(self, payload: dict[str, Any] | None = None) -> bool:
        return "items" in self.context["input"]

    def items(self) -> list[dict[str, Any]]:
        return list(self.context["input"]["items"])


@step_task("crash.run")
def crash_run(ctx: StepContext) -> Done:
    spec = ctx.input if ctx.branch is None else ctx.data["branches"][ctx.branch]["input"]
    count(ctx.instance_id, "run" if ctx.branch is None else f"run:{ctx.branch}")
    if spec.get("mode") == "exit":
        os._exit(1)  # the pool process dies: no report, no exception
    return Done("ran")


@register
class Trip(Workflow):
    """Three bookings, each undone on cancel; `input.unbook` makes an undo fail ("once"/"always")."""

    type = "trip"
    start_event = "start"
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    hotel = State()
    flight = State()
    car = State()
    booked = State()
    failed = State()
    cancelled = State(final=True)

    start = new.to(hotel)
    hotel_booked = hotel.to(flight)
    flight_booked = flight.to(car)
    car_booked = car.to(booked)
    fail = hotel.to(failed) | flight.to(failed) | car.to(failed)  # a step that fails fires it
    cancel = (hotel.to(cancelled) | flight.to(cancelled) | car.to(cancelled) | booked.to(cancelled)
              | failed.to(cancelled))

    steps = {state: Step("trip.book", name=state.id, compensate="trip.unbook", compensate_retry=FAST)
             for state in (hotel, flight, car)}


@step_task("trip.book")
def trip_book(ctx: StepContext) -> Done:
    """`input.sleep`: {step: seconds} the booking takes, counted as begun (`book:<step>`) first."""
    seconds = (ctx.input.get("sleep") or {}).get(ctx.step)
    if seconds:
        count(ctx.instance_id, f"book:{ctx.step}")
        time.sleep(seconds)
    return Done(f"{ctx.step}_booked", {"booking": f"{ctx.step}-{ctx.instance_id[:8]}"})


@compensation_task("trip.unbook")
def trip_unbook(ctx: StepContext) -> None:
    n = count(ctx.instance_id, f"unbook:{ctx.step}")
    mode = (ctx.input.get("unbook") or {}).get(ctx.step)
    if mode == "once" and n == 1:
        raise RuntimeError("agency timed out")
    if mode == "always":
        raise UpstreamError("agency", "agency down", upstream_status=503)
    if mode == "refused":
        raise StepError("booking already used")
    effects().rpush(f"compensations:{ctx.instance_id}", ctx.step)


@register
class Repair(Workflow):
    """One step that fails for good until its batch is marked mended in Redis (`mend(batch)`):
    many failed instances to repair at once. The error names the batch, to filter on."""

    type = "repair"
    start_event = "start"
    success_states = frozenset({"mended"})
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    working = State()
    mended = State(final=True)
    failed = State()
    cancelled = State(final=True)

    start = new.to(working)
    worked = working.to(mended)
    fail = working.to(failed)
    restart = failed.to(working, cond="is_restart_target")
    cancel = working.to(cancelled) | failed.to(cancelled)

    steps = {working: Step("repair.work", name="work", retry=FAST)}


def mend(batch: str) -> None:
    effects().set(f"mended:{batch}", 1)


@step_task("repair.work")
def repair_work(ctx: StepContext) -> Done:
    batch = ctx.input.get("batch", "")
    if not effects().get(f"mended:{batch}"):
        raise UpstreamError("part", f"not mended yet (batch {batch})", upstream_status=422)
    return Done("worked")


@register
class Hops(Workflow):
    """near -> next -> far: two steps on the default queue, the last on `hops-far` (a queue only
    a worker started with `--queues hops-far` reads). Each step counts its effect and records the
    Celery delivery (task id, worker) it ran under, so a test sees which ran locally.
    `input.die_after` names a step whose worker is SIGKILLed, whole, right after that step's
    report commits (once per instance). `input.die_in` names a step during whose first run its
    pool process (`input.die_how` "process") or its whole worker ("worker") is SIGKILLed.
    `input.slow_in` names a step whose first run takes 3 s."""

    type = "hops"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    near = State()
    next = State()
    far = State()
    done = State(final=True)
    failed = State(final=True)

    start = new.to(near)
    neared = near.to(next)
    nexted = next.to(far)
    fared = far.to(done)
    fail = near.to(failed) | next.to(failed) | far.to(failed)

    steps = {near: Step("hops.step", name="near"), next: Step("hops.step", name="next", retry=FAST),
             far: Step("hops.far", name="far")}


HOP_EVENTS = {"near": "neared", "next": "nexted", "far": "fared"}


def _hop(ctx: StepContext) -> Done:
    from celery import current_task

    first = count(ctx.instance_id, ctx.step) == 1
    if first and ctx.input.get("slow_in") == ctx.step:
        time.sleep(3)
    if first and ctx.input.get("die_in") == ctx.step:
        import signal

        if ctx.input.get("die_how") == "worker":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    if first and ctx.input.get("die_after") == ctx.step:
        import signal

        from sqlalchemy import event

        # The next commit of this process's engine sessions is this step's report.
        event.listen(ctx.engine.sessions, "after_commit",
                     lambda _session: os.killpg(os.getpgrp(), signal.SIGKILL), once=True)
    request = current_task.request
    return Done(HOP_EVENTS[ctx.step], {"delivery": request.id, "worker": request.hostname})


hop_step = step_task("hops.step")(_hop)
hop_far = step_task("hops.far", queue="hops-far")(_hop)


@register
class Trio(Workflow):
    """one -> two -> three, one task on the default queue, each step returning what it was
    given: for the tests of a local continuation's claim and basis, run in-process."""

    type = "trio"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})

    new = State(initial=True)
    one = State()
    two = State()
    three = State()
    done = State(final=True)
    failed = State(final=True)

    start = new.to(one)
    oned = one.to(two)
    twod = two.to(three)
    threed = three.to(done)
    fail = one.to(failed) | two.to(failed) | three.to(failed)

    steps = {one: Step("trio.step", name="one"), two: Step("trio.step", name="two"),
             three: Step("trio.step", name="three")}


@step_task("trio.step")
def trio_step(ctx: StepContext) -> Done:
    return Done(f"{ctx.step}d", {"input": ctx.input, "data": ctx.data, "dispatch": ctx.dispatch})
