"""A trivial three-step workflow for the benchmark, and the same three steps as raw Celery tasks.

Imported through WORKFLOW_MODULES (`sagas,tasks,bench.workflow`) by every process of a run.
All tasks here go to the `bench` queue, which only the benchmark's worker consumes.
"""
from __future__ import annotations

from typing import Any

from celery import shared_task
from statemachine import State

from orchestrator.engine import Done, StepContext
from orchestrator.steps import step_task
from orchestrator.workflow import Step, Workflow, register

QUEUE = "bench"


@register
class BenchWorkflow(Workflow):
    """queued -> one -> two -> three -> done, one trivial step task per state."""

    type = "bench"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})

    queued = State(initial=True)
    one = State()
    two = State()
    three = State()
    done = State(final=True)
    failed = State(final=True)

    start = queued.to(one)
    first = one.to(two)
    second = two.to(three)
    third = three.to(done)
    fail = one.to(failed) | two.to(failed) | three.to(failed)

    steps = {
        one: Step("bench.one"),
        two: Step("bench.two"),
        three: Step("bench.three"),
    }


@step_task("bench.one", queue=QUEUE)
def step_one(ctx: StepContext) -> Done:
    return Done("first", {"n": 1})


@step_task("bench.two", queue=QUEUE)
def step_two(ctx: StepContext) -> Done:
    return Done("second", {"n": 2})


@step_task("bench.three", queue=QUEUE)
def step_three(ctx: StepContext) -> Done:
    return Done("third", {"n": 3})


# The baseline: the same three links as a plain Celery chain, with the same task options.
@shared_task(name="bench.raw_one", acks_late=True, reject_on_worker_lost=True, queue=QUEUE)
def raw_one() -> dict[str, Any]:
    return {"n": 1}


@shared_task(name="bench.raw_two", acks_late=True, reject_on_worker_lost=True, queue=QUEUE)
def raw_two() -> dict[str, Any]:
    return {"n": 2}


@shared_task(name="bench.raw_three", acks_late=True, reject_on_worker_lost=True, queue=QUEUE)
def raw_three() -> dict[str, Any]:
    return {"n": 3}
