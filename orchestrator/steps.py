"""Thin step tasks: claim the step, run one function, report one outcome to the engine.

    @step_task("media.download")
    def download(ctx: StepContext) -> Done | Poll:
        ...

The function gets a StepContext (ids, input, its saved data) and returns Done(event, output),
Poll(after=seconds) to be called again later, Await() when it sent an external step's request
(`ctx.token`) whose completion comes back through `Engine.complete_external`, or None for a
link in the middle of a chain.
Raising UpstreamError retries by the step's policy when the error is retryable (5xx,
connection); InvalidInput or StepError fail the step at once.

Only a link that returns None lets its chain go on: a link that failed, polls, or found nothing to
claim stops the chain, and the step's retry (or poll) dispatches the whole chain again.

A worker process that dies inside a step or compensation (os._exit, a segfault, the OOM killer)
is one failed attempt: these tasks do not ask for their message back (`reject_on_worker_lost`
off), and the worker's main process, which saw the child die, reports the failure under the
retry policy (`report_lost_worker`). A whole worker killed at once never acknowledged its message,
so the broker delivers it again and the step runs in the next worker.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from billiard.exceptions import WorkerLostError
from celery import shared_task
from celery.signals import task_failure
from sqlalchemy.exc import InterfaceError, OperationalError

from . import logs, runtime, tracing
from .engine import Await, Done, Poll, StepContext
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

        @shared_task(name=name, bind=True, acks_late=True, reject_on_worker_lost=False, **options)
        def run(self: Any, instance_id: str, step: str, attempt: int, branch: int | None = None) -> str:
            with logs.context(workflow_id=instance_id, correlation_id=getattr(self.request, logs.HEADER, None)):
                # A broker redelivery (its first consumer died) may take over that one's claim.
                redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
                outcome = run_step(instance_id, step, attempt, branch, redelivered)
                log.info("step %s (attempt %d%s): %s", step, attempt,
                         "" if branch is None else f", branch {branch}", outcome)
                if outcome != "continued" and self.request.chain:
                    # Celery sends the next link of a chain whenever a task returns; a link that
                    # failed or has to wait must not let the later links run without its effect.
                    self.request.chain = None
                return outcome

        def run_step(instance_id: str, step: str, attempt: int, branch: int | None,
                     redelivered: bool = False) -> str:
            return execute_step(runtime.current().engine, name, fn, instance_id, step, attempt, branch,
                                redelivered)

        run.step_function = fn  # what an in-process runner calls (execute_step), e.g. tests/engine
        run.reports_to = "step"
        return run

    return decorate


def execute_step(engine: Any, name: str, fn: StepFunction, instance_id: str, step: str, attempt: int,
                 branch: int | None = None, redelivered: bool = False) -> str:
    """Claim the step, run `fn` once, report its one outcome to `engine`: the body of every step
    task, also run in-process by the engine's own tests. Returns what happened ("done",
    "waiting", "awaiting", "continued", "failed: ...", "skipped: ...")."""
    # the Celery task's span (its instrumentation continues the trace from the message headers)
    tracing.annotate({**tracing.workflow_attributes(instance_id, step=step, attempt=attempt), "workflow.branch": branch})
    ctx = engine.claim_step(instance_id, step, attempt, branch)
    if ctx is None or not engine.take_claim(ctx, name, redelivered):
        return "skipped: stale or duplicate delivery"
    if ctx.basis is not None:
        tracing.annotate(tracing.workflow_attributes(instance_id, ctx.basis[0].get("type"),
                                                     ctx.basis[0].get("business_key")))
    try:
        outcome = fn(ctx)
    except UpstreamError as exc:
        engine.step_failed(instance_id, step, attempt, exc.message, exc.retryable, branch, ctx.basis)
        return f"failed: {exc.message}"
    except (InvalidInput, StepError) as exc:
        engine.step_failed(instance_id, step, attempt, str(exc), False, branch, ctx.basis)
        return f"failed: {exc}"
    except (OperationalError, InterfaceError) as exc:
        # the database went away under the step (a restart): not the step's fault, so retried
        log.warning("step %s of %s lost its database connection: %s", step, instance_id, exc)
        engine.step_failed(instance_id, step, attempt, f"database unavailable: {exc}", True, branch, ctx.basis)
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
    if isinstance(outcome, Await):  # an external step: its completion comes as an event
        engine.step_awaiting(instance_id, step, attempt, branch, ctx.basis)
        return "awaiting"
    return "continued"


def compensation_task(name: str, **options: Any) -> Callable[[Callable[[StepContext], None]], Any]:
    """A task that undoes a completed step on cancel. The engine sends one compensation at a time,
    newest step first, keyed by (instance, step, attempt) like a step. Any error is retried by
    the step's `compensate_retry` policy (an undo must happen if it can), except InvalidInput,
    StepError and a non-retryable UpstreamError (4xx), which fail it at once; a compensation that
    finally fails shows `compensation_failed` with its error, and the next one runs all the same."""

    def decorate(fn: Callable[[StepContext], None]) -> Any:
        @shared_task(name=name, bind=True, acks_late=True, reject_on_worker_lost=False, **options)
        def run(self: Any, instance_id: str, step: str, attempt: int) -> str:
            with logs.context(workflow_id=instance_id, correlation_id=getattr(self.request, logs.HEADER, None)):
                outcome = compensate(instance_id, step, attempt)
                log.info("compensation of step %s (attempt %d): %s", step, attempt, outcome)
                return outcome

        def compensate(instance_id: str, step: str, attempt: int) -> str:
            return execute_compensation(runtime.current().engine, fn, instance_id, step, attempt)

        run.compensation_function = fn
        run.reports_to = "compensation"
        return run

    return decorate


def execute_compensation(engine: Any, fn: Callable[[StepContext], None], instance_id: str, step: str,
                         attempt: int) -> str:
    """The body of every compensation task (see `compensation_task`), runnable in-process."""
    tracing.annotate(tracing.workflow_attributes(instance_id, step=step, attempt=attempt))
    ctx = engine.claim_compensation(instance_id, step, attempt)
    if ctx is None:
        return "skipped: stale or duplicate delivery"
    try:
        fn(ctx)
    except UpstreamError as exc:
        engine.compensation_failed(instance_id, step, attempt, exc.message, exc.retryable)
        return f"failed: {exc.message}"
    except (InvalidInput, StepError) as exc:
        engine.compensation_failed(instance_id, step, attempt, str(exc), False)
        return f"failed: {exc}"
    except Exception as exc:
        log.exception("compensation of step %s of %s raised", step, instance_id)
        engine.compensation_failed(instance_id, step, attempt, f"{type(exc).__name__}: {exc}", True)
        return f"failed: {exc}"
    engine.compensated(instance_id, step, attempt)
    return "compensated"


@task_failure.connect
def report_lost_worker(sender: Any = None, exception: BaseException | None = None,
                       args: tuple[Any, ...] | list[Any] | None = None, **_: Any) -> None:
    """In a worker's main process: a step or compensation task whose pool process died is a failed
    attempt of that step (retryable), so a task that kills its process runs at most as often as the
    step's retry policy allows instead of being delivered again for ever."""
    kind = getattr(sender, "reports_to", None)
    if kind is None or not isinstance(exception, WorkerLostError) or not args:
        return
    instance_id, step, attempt, *rest = args
    error = f"worker process lost while running the task: {exception}"
    with logs.context(workflow_id=instance_id):
        log.warning("%s %s of %s (attempt %s): %s", kind, step, instance_id, attempt, error)
        try:
            engine = runtime.current().engine
            if kind == "step":
                engine.step_failed(instance_id, step, attempt, error, True, rest[0] if rest else None)
            else:
                engine.compensation_failed(instance_id, step, attempt, error, True)
        except Exception:  # the lease delivers the step again when nobody reports it
            log.exception("could not report the lost worker of %s %s of %s", kind, step, instance_id)
