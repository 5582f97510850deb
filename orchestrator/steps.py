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

A step whose successor is a step task this worker consumes runs that successor itself, right
after its report commits (a local continuation, at most LOCAL_CONTINUATION_STEPS in a row): the
successor's outbox row is written in the report's transaction as always, but not published; the
successor's claim marks it sent. A crash before that claim leaves the row unsent, and the sweeper
publishes it; a crash after it is recovered by the step's lease, like a lost message.

A worker process that dies inside a step or compensation (os._exit, a segfault, the OOM killer)
is one failed attempt: these tasks do not ask for their message back (`reject_on_worker_lost`
off), and the worker's main process, which saw the child die, reports the failure under the
retry policy (`report_lost_worker`). A whole worker killed at once never acknowledged its message,
so the broker delivers it again and the step runs in the next worker.
"""
from __future__ import annotations

import logging
import mmap
from typing import Any, Callable, Mapping

from billiard.exceptions import WorkerLostError
from celery import shared_task
from celery.signals import task_failure, worker_shutting_down
from sqlalchemy.exc import InterfaceError, OperationalError

from . import logs, runtime, tracing
from .engine import Await, Done, Poll, StepContext, Successor
from .errors import InvalidInput, UpstreamError
from .models import utcnow

log = logging.getLogger(__name__)

StepFunction = Callable[[StepContext], "Done | Poll | None"]


class StepError(Exception):
    """The step failed for a reason a retry cannot fix (e.g. the remote job failed)."""


def step_task(name: str, **options: Any) -> Callable[[StepFunction], Any]:
    def decorate(fn: StepFunction) -> Any:
        # The outcome goes to PostgreSQL, the only truth; storing it in the result backend too
        # would cost a round trip per step that nobody reads.
        options.setdefault("ignore_result", True)

        # Class attributes of the task, so every Celery app's copy of it has them (a proxy's
        # attribute would land on one app's copy): what an in-process runner calls (execute_step,
        # e.g. tests/engine) and what local continuation looks for.
        @shared_task(name=name, bind=True, acks_late=True, reject_on_worker_lost=False,
                     step_function=staticmethod(fn), reports_to="step", **options)
        def run(self: Any, instance_id: str, step: str, attempt: int, branch: int | None = None) -> str:
            with logs.context(workflow_id=instance_id, correlation_id=getattr(self.request, logs.HEADER, None)):
                # A broker redelivery (its first consumer died) may take over that one's claim.
                redelivered = bool((self.request.delivery_info or {}).get("redelivered"))
                rt = runtime.current()
                # Only a worker's delivery continues locally (not an eager call or a test).
                local = None if self.request.is_eager or not self.request.delivery_info \
                    else Continuation.for_worker(self.app, rt.settings.local_continuation_steps)
                outcome = execute_step(rt.engine, name, fn, instance_id, step, attempt, branch, redelivered,
                                       continuation=local)
                log.info("step %s (attempt %d%s): %s", step, attempt,
                         "" if branch is None else f", branch {branch}", outcome)
                if outcome != "continued" and self.request.chain:
                    # Celery sends the next link of a chain whenever a task returns; a link that
                    # failed or has to wait must not let the later links run without its effect.
                    self.request.chain = None
                if local is not None:
                    local.run_successors(rt.engine)
                return outcome

        return run

    return decorate


#: One byte shared by a worker's main process and its pool processes (an anonymous shared mapping
#: made at import, before the pool forks): set when the worker's warm shutdown begins. A worker
#: that is stopping takes no new step, so its deliveries run no successor themselves; the
#: successor goes through the broker to a worker that is not stopping. Without it a SIGTERMed
#: worker went on running successors for up to LOCAL_CONTINUATION_STEPS steps, past the stop
#: timeout an operator sets from their longest step.
_STOPPING = mmap.mmap(-1, 1)


@worker_shutting_down.connect(weak=False)
def _worker_stopping(**_: Any) -> None:
    _STOPPING[0] = 1


class Continuation:
    """The successors one worker delivery runs itself (see the module's docstring).

    `tasks`: {task name: step function} of the step tasks routed to a queue this worker
    consumes; `steps`: how many more it may run. Passed to `Engine.step_succeeded` as its `keep`
    filter, it picks a successor's outbox row (one task, not a chain or a group) into `next`.
    """

    def __init__(self, tasks: Mapping[str, StepFunction], steps: int) -> None:
        self.tasks = tasks
        self.left = steps
        self.next: Successor | None = None  # the step to run next

    _per_app: dict[int, Mapping[str, StepFunction]] = {}

    @classmethod
    def for_worker(cls, app: Any, steps: int) -> "Continuation | None":
        """For a delivery in a worker of `app`; None when continuing locally is off (`steps` 0)."""
        if steps <= 0:
            return None
        tasks = cls._per_app.get(id(app))
        if tasks is None:
            tasks = cls._per_app[id(app)] = local_step_tasks(app)
        return cls(tasks, steps) if tasks else None

    def __call__(self, row: Any) -> bool:
        if _STOPPING[0]:
            return False
        call = row.payload.get("task") if self.left > 0 and row.channel == "celery" else None
        return call is not None and call[0] in self.tasks and len(call[1]) == 3

    def run_successors(self, engine: Any) -> None:
        """Run the kept successors one after the other, each in this process. An error leaves
        the rest to the sweeper (a row not claimed yet) or the step's lease (one claimed)."""
        while self.next is not None:
            successor, self.next = self.next, None
            self.left -= 1
            s = successor
            try:
                # a span of its own in the delivery's trace, as its own delivery would have had
                with tracing.span(f"step {s.task} (run locally)",
                                  tracing.workflow_attributes(s.instance_id, step=s.step, attempt=s.attempt)):
                    outcome = execute_step(engine, s.task, self.tasks[s.task], s.instance_id, s.step, s.attempt,
                                           successor=s, continuation=self)
            except Exception:
                log.exception("step %s of %s, run locally, failed; its message or lease delivers it again",
                              s.step, s.instance_id)
                return
            log.info("step %s (attempt %d, run locally): %s", s.step, s.attempt, outcome)


def _fail_over(engine: Any, instance_id: str, step: str) -> str:
    """A delivery the broker gave back (its worker died, whole) whose own step is done: the step
    it went on to run locally, if one is claimed and unreported, died with that worker. Report
    it as a failed attempt (retried by its policy) rather than leave it to its lease."""
    local = engine.running_locally(instance_id)
    if local is None:
        return "skipped: stale or duplicate delivery"
    lost, attempt = local
    error = f"its worker was lost while running it locally, in the delivery of step {step} (given back by the broker)"
    log.warning("step %s of %s (attempt %s): %s", lost, instance_id, attempt, error)
    engine.step_failed(instance_id, lost, attempt, error, True)
    return f"skipped: step {step} is done; step {lost} (attempt {attempt}) it ran locally failed with its worker"


def local_step_tasks(app: Any) -> dict[str, StepFunction]:
    """{name: step function} of the step tasks this worker process would receive itself: those
    routed (task options, then `task_routes`) to a queue its consumer reads."""
    consumed = {getattr(q, "name", q) for q in app.amqp.queues.consume_from}
    out: dict[str, StepFunction] = {}
    for name, task in list(app.tasks.items()):
        fn = getattr(task, "step_function", None)
        if fn is None:
            continue
        queue = getattr(task, "queue", None)
        route = app.amqp.router.route({"queue": queue} if queue else {}, name, (), {}, task)
        if getattr(route.get("queue"), "name", route.get("queue")) in consumed:
            out[name] = fn
    return out


def execute_step(engine: Any, name: str, fn: StepFunction, instance_id: str, step: str, attempt: int,
                 branch: int | None = None, redelivered: bool = False, *, successor: Successor | None = None,
                 continuation: Continuation | None = None) -> str:
    """Claim the step, run `fn` once, report its one outcome to `engine`: the body of every step
    task, also run in-process by the engine's own tests. Returns what happened ("done",
    "waiting", "awaiting", "continued", "failed: ...", "skipped: ...").

    `successor`: the step message this run takes the place of (a local continuation); its claim
    marks the outbox row sent. `continuation`: keeps the successor's message, if this worker
    runs it, in `continuation.next` instead of publishing it."""
    # the Celery task's span (its instrumentation continues the trace from the message headers)
    tracing.annotate({**tracing.workflow_attributes(instance_id, step=step, attempt=attempt), "workflow.branch": branch})
    if successor is not None:
        ctx = engine.claim_successor(successor)
    else:
        # a later try takes the claim over: the try whose connection broke may have committed it
        ctx = _while_unreachable(lambda first: engine.claim(name, instance_id, step, attempt, branch,
                                                            redelivered or not first),
                                 "the claim", instance_id, step)
    if ctx is None:
        if redelivered and successor is None:
            return _fail_over(engine, instance_id, step)
        return "skipped: stale or duplicate delivery"
    if ctx.basis is not None:
        tracing.annotate(tracing.workflow_attributes(instance_id, ctx.basis[0].get("type"),
                                                     ctx.basis[0].get("business_key")))
    started = utcnow()  # the step's start, kept by its report (a step done in one delivery had none)
    try:
        outcome = fn(ctx)
    except UpstreamError as exc:
        _reported(lambda basis: engine.step_failed(instance_id, step, attempt, exc.message, exc.retryable, branch,
                                                   basis, started), ctx.basis, instance_id, step)
        return f"failed: {exc.message}"
    except (InvalidInput, StepError) as exc:
        _reported(lambda basis: engine.step_failed(instance_id, step, attempt, str(exc), False, branch, basis,
                                                   started), ctx.basis, instance_id, step)
        return f"failed: {exc}"
    except (OperationalError, InterfaceError) as exc:
        # the database went away under the step (a restart): not the step's fault, so retried
        log.warning("step %s of %s lost its database connection: %s", step, instance_id, exc)
        _reported(lambda basis: engine.step_failed(instance_id, step, attempt, f"database unavailable: {exc}", True,
                                                   branch, basis, started), ctx.basis, instance_id, step)
        return f"failed: {exc}"
    except Exception as exc:
        log.exception("step %s of %s raised", step, instance_id)
        _reported(lambda basis: engine.step_failed(instance_id, step, attempt, f"{type(exc).__name__}: {exc}",
                                                   False, branch, basis, started), ctx.basis, instance_id, step)
        return f"failed: {exc}"
    if isinstance(outcome, Poll):
        _reported(lambda basis: engine.step_progress(instance_id, step, attempt, outcome, branch, basis, started),
                  ctx.basis, instance_id, step)
        return "waiting"
    if isinstance(outcome, Done):
        kept = _reported(lambda basis: engine.step_succeeded(instance_id, step, attempt, outcome, branch, basis=basis,
                                                             keep=continuation, started=started),
                         ctx.basis, instance_id, step)
        if continuation is not None and kept:
            continuation.next = kept[0]
        return "done"
    if isinstance(outcome, Await):  # an external step: its completion comes as an event
        _reported(lambda basis: engine.step_awaiting(instance_id, step, attempt, branch, basis, started),
                  ctx.basis, instance_id, step)
        return "awaiting"
    return "continued"


#: How long a step's (or a compensation's) claim and report wait for the database to answer
#: again. The outcome exists only in this process, and a delivery that gives up is acknowledged:
#: the step is run again when its lease runs out (STEP_LEASE_SECONDS, 10 minutes by default),
#: which is what a 20-second outage cost every step that ended in it.
REPORT_WAIT_SECONDS = 60.0


def _reported(call: Callable[[Any], Any], basis: Any, instance_id: str, step: str) -> Any:
    """`call(basis)`, a step's report to the engine, tried again while the database is
    unreachable (`_while_unreachable`). A report is one transaction: one that failed wrote
    nothing, and one whose commit went through before its connection broke finds the step no
    longer active when tried again, and does nothing. Only the first try writes on `basis` (what
    the step read when it was claimed): a try applies the report to it before it writes, so the
    next reads the rows afresh."""
    return _while_unreachable(lambda first: call(basis if first else None), "the report", instance_id, step)


def _while_unreachable(call: Callable[[bool], Any], what: str, instance_id: str, step: str) -> Any:
    """`call(first try?)`, tried again while the database is unreachable (OperationalError,
    InterfaceError), with backoff, for REPORT_WAIT_SECONDS. A pooled connection that a database
    restart broke fails its next statement once (SQLAlchemy then replaces the pool's
    connections): without a second try, a delivery's claim that met one was acknowledged with
    nothing done, and its step waited out its lease."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_exponential

    for attempt in Retrying(retry=retry_if_exception_type((OperationalError, InterfaceError)),
                            stop=stop_after_delay(REPORT_WAIT_SECONDS), wait=wait_exponential(0.5, max=5),
                            reraise=True, before_sleep=lambda state: log.warning(
                                "%s of step %s of %s waits for the database: %s", what, step, instance_id,
                                state.outcome.exception() if state.outcome else "")):
        with attempt:
            return call(attempt.retry_state.attempt_number == 1)
    return None  # not reached: the last attempt returns or raises


def compensation_task(name: str, **options: Any) -> Callable[[Callable[[StepContext], None]], Any]:
    """A task that undoes a completed step on cancel. The engine sends one compensation at a time,
    newest step first, keyed by (instance, step, attempt) like a step. Any error is retried by
    the step's `compensate_retry` policy (an undo must happen if it can), except InvalidInput,
    StepError and a non-retryable UpstreamError (4xx), which fail it at once; a compensation that
    finally fails shows `compensation_failed` with its error, and the next one runs all the same."""

    def decorate(fn: Callable[[StepContext], None]) -> Any:
        @shared_task(name=name, bind=True, acks_late=True, reject_on_worker_lost=False,
                     compensation_function=staticmethod(fn), reports_to="compensation", **options)
        def run(self: Any, instance_id: str, step: str, attempt: int) -> str:
            with logs.context(workflow_id=instance_id, correlation_id=getattr(self.request, logs.HEADER, None)):
                outcome = compensate(instance_id, step, attempt)
                log.info("compensation of step %s (attempt %d): %s", step, attempt, outcome)
                return outcome

        def compensate(instance_id: str, step: str, attempt: int) -> str:
            return execute_compensation(runtime.current().engine, fn, instance_id, step, attempt)

        return run

    return decorate


def execute_compensation(engine: Any, fn: Callable[[StepContext], None], instance_id: str, step: str,
                         attempt: int) -> str:
    """The body of every compensation task (see `compensation_task`), runnable in-process."""
    tracing.annotate(tracing.workflow_attributes(instance_id, step=step, attempt=attempt))

    def waiting(call: Callable[[], Any], what: str) -> Any:  # a claim is a read, a report one transaction
        return _while_unreachable(lambda _first: call(), what, instance_id, step)

    ctx = waiting(lambda: engine.claim_compensation(instance_id, step, attempt), "the compensation's claim")
    if ctx is None:
        return "skipped: stale or duplicate delivery"
    try:
        fn(ctx)
    except UpstreamError as exc:
        waiting(lambda: engine.compensation_failed(instance_id, step, attempt, exc.message, exc.retryable),
                "the compensation's report")
        return f"failed: {exc.message}"
    except (InvalidInput, StepError) as exc:
        waiting(lambda: engine.compensation_failed(instance_id, step, attempt, str(exc), False),
                "the compensation's report")
        return f"failed: {exc}"
    except Exception as exc:
        log.exception("compensation of step %s of %s raised", step, instance_id)
        waiting(lambda: engine.compensation_failed(instance_id, step, attempt, f"{type(exc).__name__}: {exc}",
                                                   True), "the compensation's report")
        return f"failed: {exc}"
    waiting(lambda: engine.compensated(instance_id, step, attempt), "the compensation's report")
    return "compensated"


@task_failure.connect
def report_lost_worker(sender: Any = None, exception: BaseException | None = None,
                       args: tuple[Any, ...] | list[Any] | None = None, **_: Any) -> None:
    """In a worker's main process: a step or compensation task whose pool process died is a failed
    attempt of that step (retryable), so a task that kills its process runs at most as often as the
    step's retry policy allows instead of being delivered again for ever. When the delivery's own
    step is done and the process died in a successor it ran locally (`Engine.running_locally`),
    that successor's attempt is the one failed: it would otherwise wait out its lease."""
    kind = getattr(sender, "reports_to", None)
    if kind is None or not isinstance(exception, WorkerLostError) or not args:
        return
    instance_id, step, attempt, *rest = args
    error = f"worker process lost while running the task: {exception}"
    with logs.context(workflow_id=instance_id):
        try:
            engine = runtime.current().engine
            branch = rest[0] if rest else None
            local = engine.running_locally(instance_id) if kind == "step" else None
            if local is not None and local != (step, attempt):  # it died in a successor it ran
                error = f"worker process lost while running it locally, in the delivery of step {step}: {exception}"
                (step, attempt), branch = local, None
            log.warning("%s %s of %s (attempt %s): %s", kind, step, instance_id, attempt, error)
            if kind == "step":
                engine.step_failed(instance_id, step, attempt, error, True, branch)
            else:
                engine.compensation_failed(instance_id, step, attempt, error, True)
        except Exception:  # the lease delivers the step again when nobody reports it
            log.exception("could not report the lost worker of %s %s of %s", kind, step, instance_id)
