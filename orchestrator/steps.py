"""Thin step tasks: claim the step, run one function, report one outcome to the engine.

    @step_task("media.download")
    def download(ctx: StepContext) -> Done | Poll:
        ...

The function gets a StepContext (ids, input, its saved data) and returns Done(event, output),
Poll(after=seconds) to be called again later, or None for a link in the middle of a chain.
Raising UpstreamError retries by the step's policy when the error is retryable (5xx,
connection); InvalidInput or StepError fail the step at once.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from celery import shared_task

from . import logs, runtime
from .engine import Done, Poll, StepContext
from .errors import InvalidInput, UpstreamError

log = logging.getLogger(__name__)

StepFunction = Callable[[StepContext], "Done | Poll | None"]


class StepError(Exception):
    """The step failed for a reason a retry cannot fix (e.g. the remote job failed)."""


def step_task(name: str, **options: Any) -> Callable[[StepFunction], Any]:
    def decorate(fn: StepFunction) -> Any:
        # The outcome goes to PostgreSQL, the only truth; storing it in the result backend too
        # would cost a round trip per step that nobody reads.
        options.setdefault("ignore_result", True)

        @shared_task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True, **options)
        def run(self: Any, instance_id: str, step: str, attempt: int, branch: int | None = None) -> str:
            with logs.context(workflow_id=instance_id, correlation_id=getattr(self.request, logs.HEADER, None)):
                # A broker redelivery (its first consumer died) may take over that one's claim.
                redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
                outcome = run_step(instance_id, step, attempt, branch, redelivered)
                log.info("step %s (attempt %d%s): %s", step, attempt,
                         "" if branch is None else f", branch {branch}", outcome)
                return outcome

        def run_step(instance_id: str, step: str, attempt: int, branch: int | None,
                     redelivered: bool = False) -> str:
            engine = runtime.current().engine
            ctx = engine.claim_step(instance_id, step, attempt, branch)
            if ctx is None or not engine.take_claim(ctx, name, redelivered):
                return "skipped: stale or duplicate delivery"
            try:
                outcome = fn(ctx)
            except UpstreamError as exc:
                engine.step_failed(instance_id, step, attempt, exc.message, exc.retryable, branch, ctx.basis)
                return f"failed: {exc.message}"
            except (InvalidInput, StepError) as exc:
                engine.step_failed(instance_id, step, attempt, str(exc), False, branch, ctx.basis)
                return f"failed: {exc}"
            except Exception as exc:
                log.exception("step %s of %s raised", step, instance_id)
                engine.step_failed(instance_id, step, attempt, f"{type(exc).__name__}: {exc}", False, branch,
                                   ctx.basis)
                return f"failed: {exc}"
            if isinstance(outcome, Poll):
                engine.step_progress(instance_id, step, attempt, outcome, branch, ctx.basis)
                return "waiting"
            if isinstance(outcome, Done):
                engine.step_succeeded(instance_id, step, attempt, outcome, branch, basis=ctx.basis)
                return "done"
            return "continued"

        run.step_function = fn
        return run

    return decorate


def compensation_task(name: str, **options: Any) -> Callable[[Callable[[StepContext], None]], Any]:
    """A task that undoes a completed step on cancel; runs once per (instance, step, attempt)."""

    def decorate(fn: Callable[[StepContext], None]) -> Any:
        @shared_task(name=name, bind=True, acks_late=True, reject_on_worker_lost=True, **options)
        def run(self: Any, instance_id: str, step: str, attempt: int) -> str:
            engine = runtime.current().engine
            snapshot = engine.snapshot(instance_id, history=False)
            run_row = next((s for s in snapshot["steps"] if s["name"] == step), None)
            if run_row is None or run_row["status"] != "completed":
                return "skipped"
            ctx = StepContext(instance_id=instance_id, step=step, attempt=attempt, branch=None,
                              input=snapshot["context"].get("input") or {}, data=run_row["data"],
                              polls=0, restarts=run_row["restarts"],
                              settings=engine.settings, engine=engine)
            fn(ctx)
            engine.compensated(instance_id, step, attempt)
            return "compensated"

        return run

    return decorate
