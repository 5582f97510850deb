"""Workflows that wait, for the benchmark's parked figures (bench/parked.py).

Imported through WORKFLOW_MODULES by every process of a run. `bench_approval` waits for a
person's `approve` signal with a deadline (a timer row); `bench_poll` runs one step that asks to
be called again in an hour (a poll timer row) and finishes when it is. Neither holds a worker
slot while it waits.
"""
from __future__ import annotations

from datetime import timedelta
from typing import Any

from statemachine import State

from orchestrator.engine import Done, Poll, StepContext
from orchestrator.steps import step_task
from orchestrator.workflow import Step, Workflow, register

QUEUE = "bench"


@register
class ApprovalWorkflow(Workflow):
    """queued -> awaiting (no step: a person's `approve` signal, or the deadline) -> approved | expired."""

    type = "bench_approval"
    start_event = "start"
    success_states = frozenset({"approved"})
    signals = {"approve": lambda payload, _instance: payload}

    queued = State(initial=True)
    awaiting = State()
    approved = State(final=True)
    expired = State(final=True)

    start = queued.to(awaiting)
    approve = awaiting.to(approved)
    fail = awaiting.to(expired)  # the deadline passed

    @classmethod
    def timeout(cls, settings: Any) -> timedelta | None:
        return timedelta(hours=1)


@register
class PollWorkflow(Workflow):
    """queued -> checking (polls once, an hour later) -> done."""

    type = "bench_poll"
    start_event = "start"
    success_states = frozenset({"done"})
    failure_states = frozenset({"failed"})

    queued = State(initial=True)
    checking = State()
    done = State(final=True)
    failed = State(final=True)

    start = queued.to(checking)
    checked = checking.to(done)
    fail = checking.to(failed)

    steps = {checking: Step("bench.check")}


@step_task("bench.check", queue=QUEUE)
def check(ctx: StepContext) -> Done | Poll:
    return Done("checked") if ctx.polls else Poll(after=3600)
