"""How a workflow is declared: a python-statemachine class plus a table of steps.

The machine decides every transition; the engine persists it. A state that has a `Step` runs
that step's Celery task(s) when the machine enters it.
"""
from __future__ import annotations

import inspect
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Collection, Literal, Mapping, get_args

from statemachine import State, StateMachine

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from .config import Settings


@dataclass(frozen=True)
class Retry:
    """How many consecutive failures a step survives, and how long it waits before each retry.

    delay(n) = min(max_delay, backoff * factor**(n-1)), spread by +/- jitter (a fraction).
    """

    attempts: int = 1
    backoff: float = 1.0
    factor: float = 2.0
    max_delay: float = 600.0
    jitter: float = 0.1

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        base = min(self.max_delay, self.backoff * self.factor ** max(0, failures - 1))
        spread = (rng or random).uniform(-self.jitter, self.jitter)
        return max(0.0, base * (1 + spread))

    def should_retry(self, failures: int, retryable: bool) -> bool:
        return retryable and failures < self.attempts


@dataclass(frozen=True)
class External:
    """A step whose work is done elsewhere (a Kafka service, an AMQP worker, a callback): the step
    waits for completion events keyed by a token the engine issues, one per item.

    items:  name of a workflow method returning one input per item (a fan-out, joined on the step
            row like `Step.fanout`); empty: one item, the step itself.
    send:   name of a workflow method `send(item, token, attempt)` that emits the request for one
            item (`self.emit(...)`, so it goes out through the outbox with the transition that
            issued the token); empty when the step's task sends it (it reads `ctx.token`).
    token:  name of a workflow method `token(step, index, item, restarts) -> str` giving the id
            a contract fixes (a correlationId, a story id within a route); empty: the engine's own
            `<instance>:<step>:<attempt>:<item>`. The same id may be issued again for a later
            attempt of the same item; it then points at that attempt only.

    resend: a request not answered within STEP_LEASE_SECONDS is sent again under the same token
            (the first may have been lost; the other side must treat a repeat as one request);
            otherwise a sent request holds no lease, and only `Step.timeout` bounds the wait.

    `Engine.complete_external(token, ok, output | error)` reports an item; a failed item is
    retried alone by the step's `retry`, `Step.timeout` bounds the wait (a timer row), and a
    restart sends again only the items that did not complete.
    """

    items: str = ""
    send: str = ""
    token: str = ""
    resend: bool = False


#: A compensation's default policy: an undo is worth a few tries over about half a minute.
COMPENSATION_RETRY = Retry(attempts=5, backoff=2.0, factor=2.0, max_delay=60.0)


@dataclass(frozen=True)
class Step:
    """Work run when the machine enters a state.

    task:     the Celery task `<workflow>.<step>`; or
    chain:    several tasks run in order as a Celery chain, the last one reports the outcome; a
              link that fails stops the chain, and a retry runs the whole chain again;
    fanout:   name of a workflow method returning one input per branch; the task runs once per
              branch as a Celery group and `join` fires when every branch has completed (the
              join is counted on the step row, never in a chord callback).
    external: the step waits for work done elsewhere (see `External`); its `join` fires when
              every item has completed. `task` is then optional: the task that sends the request.
    timeout:  how long one attempt may take (a timedelta, or a function of the settings giving
              one; None: unbounded); when it passes the attempt fails ("step timed out") and the
              step's `on_failure` event fires, so the step can be restarted.
    compensate: a task that undoes the completed step when the instance is cancelled, retried
              by `compensate_retry` (default COMPENSATION_RETRY).

    A task is named by its Celery name, or by the task object itself when the workflow's module
    may import it (`Step(my_task)`); either way registering the workflow checks it exists once
    the Celery app has loaded its tasks (`Registry.check_tasks`).
    """

    task: str = ""
    name: str = ""
    chain: tuple[str, ...] = ()
    fanout: str = ""
    join: str = ""
    retry: "Retry | Callable[[Settings], Retry]" = field(default_factory=Retry)
    timeout: "timedelta | None | Callable[[Settings], timedelta | None]" = None
    on_failure: str = "fail"
    compensate: str = ""
    compensate_retry: "Retry | Callable[[Settings], Retry]" = COMPENSATION_RETRY
    external: External | None = None

    def __post_init__(self) -> None:
        # A task object stands for its name: the step table and the task share one declaration.
        for attr in ("task", "compensate"):
            value = getattr(self, attr)
            if not isinstance(value, str):
                object.__setattr__(self, attr, _task_name(value))
        object.__setattr__(self, "chain", tuple(t if isinstance(t, str) else _task_name(t) for t in self.chain))

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.chain or ((self.task,) if self.task else ())

    @property
    def items_method(self) -> str:
        """The workflow method giving the step's items, when it fans out."""
        return self.fanout or (self.external.items if self.external else "")

    def deadline(self, settings: "Settings") -> timedelta | None:
        """How long one attempt may take (None: no bound); a workflow may derive it from
        configuration, as it may its retry policy."""
        return self.timeout(settings) if callable(self.timeout) else self.timeout

    def policy(self, settings: "Settings") -> Retry:
        """The retry policy; a workflow may derive it from configuration."""
        return self.retry(settings) if callable(self.retry) else self.retry

    def compensation_policy(self, settings: "Settings") -> Retry:
        """The compensation's retry policy; a workflow may derive it from configuration."""
        return self.compensate_retry(settings) if callable(self.compensate_retry) else self.compensate_retry


def _task_name(task: Any) -> str:
    name = getattr(task, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"a step's task must be a task name or a Celery task, got {task!r}")
    return name


class ItemFailed(tuple):  # type: ignore[type-arg]
    """What `Workflow.message_failed` returns when the message was one item's request of an
    external step: that item fails with `error` (its token names it), the others go on."""

    def __new__(cls, token: str, error: str) -> "ItemFailed":
        return super().__new__(cls, (token, error))

    @property
    def token(self) -> str:
        return self[0]  # type: ignore[no-any-return]

    @property
    def error(self) -> str:
        return self[1]  # type: ignore[no-any-return]


#: The check of a signal's payload: `check(payload, instance) -> payload to fire`. `payload` is
#: the request's JSON object; `instance` is the locked instance row (read `.state` and `.context`,
#: change nothing). Raise InvalidInput naming the field (400) or Conflict with `state` (409).
SignalCheck = Callable[[dict[str, Any], Any], dict[str, Any]]


#: An instance's status, from its state and what its workflow declares (GET /sagas?status=):
#: running (not finished), completed (a success state), failed (a failure state), cancelled
#: (finished in any other state; the built-in workflows reach one only by a cancel).
InstanceStatus = Literal["running", "completed", "failed", "cancelled"]
INSTANCE_STATUSES: tuple[str, ...] = get_args(InstanceStatus)


class Workflow(StateMachine):
    """Base of every workflow definition.

    Subclasses set `type`, declare states and events, and a `steps` table
    `{state: Step(...)}`. Callbacks may change `self.context` and call `self.emit(...)`;
    both are written in the same transaction as the transition. A callback by naming convention
    taking at most `payload` may run without a machine (`transition_table`): it must not use the
    machine itself (`send`, `configuration`, `current_state`).

    `signals` names the events a user may send through `POST /sagas/<id>/events/<event>`, each
    with the check of its payload (the same function the workflow's own endpoint or Kafka handler
    uses, so a payload has one rule). Every other event is the engine's own (a step's outcome, a
    join, restart, cancel, a failure) or arrives through the Kafka bridge, and is refused there.
    In the same way `started_by` keeps the generic start away from a workflow with its own start.
    """

    type: ClassVar[str] = ""
    steps: ClassVar[Mapping[State, Step]] = {}
    start_event: ClassVar[str] = ""  # fired in the creating transaction, if set
    success_states: ClassVar[frozenset[str]] = frozenset()
    #: The states in which the instance has failed (GET /sagas?status=failed); one that is not
    #: final (a restart leaves it) still counts as finished while the instance is there.
    failure_states: ClassVar[frozenset[str]] = frozenset()
    restart_event: ClassVar[str] = "restart"
    cancel_event: ClassVar[str] = "cancel"
    signals: ClassVar[Mapping[str, SignalCheck]] = {}
    #: Set when the workflow has its own way in, whose checks the generic `POST /saga` lacks
    #: (e.g. "POST /api/v1/chat/<session_id>/task"); the generic start then refuses the type.
    started_by: ClassVar[str] = ""

    def __init__(self, model: Any, settings: "Settings | None" = None, session: "Session | None" = None) -> None:
        self._bind_engine(settings, session)
        super().__init__(model=model, state_field="state")

    def _bind_engine(self, settings: "Settings | None", session: "Session | None") -> None:
        """What callbacks get from the engine, on a machine and on a `callback_host` alike."""
        self.settings = settings
        # The engine's transaction, for callbacks that write rows of their own in it (None while
        # the initial state is entered, before the instance exists).
        self.session = session
        self.context_touched = False
        self.messages: list[tuple[str, str, str | None, dict[str, Any]]] = []

    @classmethod
    def callback_host(cls, model: Any, settings: "Settings | None" = None,
                      session: "Session | None" = None) -> "Workflow":
        """An instance to run the workflow's table callbacks on (`Move.take`) without building a
        statemachine: it has what callbacks get on a machine (`model`, `context`, `emit` and
        `messages`, `settings`, `session`, the workflow's own methods), not the machine's state.

        `StateMachine.__init__` is not run: python-statemachine 3.2.2 overrides only
        `__setattr__` (refusing a state's name) and no `__getattr__`, so this instance reads and
        sets attributes as a plain object does, and a callback that uses the machine itself
        (`send`, `configuration`, `current_state`) raises AttributeError here instead of acting."""
        host = cls.__new__(cls)
        host.model = model
        host._bind_engine(settings, session)
        return host

    # -- helpers for callbacks ---------------------------------------------------------------
    @property
    def context(self) -> dict[str, Any]:
        self.context_touched = True  # the engine rewrites the JSON column only when touched
        return self.model.context  # type: ignore[no-any-return]

    def emit(self, channel: str, target: str, payload: dict[str, Any], key: str | None = None) -> None:
        """Queue an outgoing message; it is written to the outbox with this transition."""
        self.messages.append((channel, target, key, payload))

    def is_restart_target(self, target: State, payload: dict[str, Any] | None = None) -> bool:
        """Guard for restart transitions: go back to the state whose step is being restarted."""
        step = self.step_for_state(target.id)
        return step is not None and step.name == (payload or {}).get("step")

    @classmethod
    def message_failed(cls, context: dict[str, Any], target: str, payload: dict[str, Any],
                       error: str) -> "tuple[str, dict[str, Any]] | ItemFailed | None":
        """A message this workflow emitted can never be published (e.g. too large for Kafka):
        the (event, payload) to fire for it, an ItemFailed naming the external item whose request
        it was, or None to fail the current state's step."""
        return None

    # -- class-level lookups -----------------------------------------------------------------
    @classmethod
    def step_table(cls) -> dict[str, Step]:
        """{state id: Step} with every step named (default name: the state id)."""
        return _per_class(cls, "_step_table", lambda: {  # type: ignore[no-any-return]
            state.id: Step(**{**step.__dict__, "name": step.name or state.id})
            for state, step in cls.steps.items()})

    @classmethod
    def step_for_state(cls, state_id: str | None) -> Step | None:
        return cls.step_table().get(state_id or "")

    @classmethod
    def step_named(cls, name: str) -> tuple[str, Step] | None:
        for state_id, step in cls.step_table().items():
            if step.name == name:
                return state_id, step
        return None

    @classmethod
    def event_names(cls) -> frozenset[str]:
        return _per_class(cls, "_event_names", lambda: frozenset(e.id for e in cls.events))

    @classmethod
    def finished_state_ids(cls) -> frozenset[str]:
        return _per_class(cls, "_finished_state_ids",
                          lambda: frozenset(s.id for s in cls.states if s.final) | cls.failure_states)

    @classmethod
    def status_of(cls, state: str | None) -> InstanceStatus:
        """The status of an instance of this workflow in `state` (the inverse of `states_with_status`)."""
        if state in cls.success_states:
            return "completed"
        if state in cls.failure_states:
            return "failed"
        return "cancelled" if state in cls.finished_state_ids() else "running"

    @classmethod
    def states_with_status(cls, status: str) -> frozenset[str]:
        """The states in which an instance of this workflow has `status` (see InstanceStatus)."""
        finished = cls.finished_state_ids()
        return {"running": frozenset(s.id for s in cls.states) - finished,
                "completed": cls.success_states, "failed": cls.failure_states,
                "cancelled": finished - cls.success_states - cls.failure_states}[status]

    # -- input ---------------------------------------------------------------------------------
    @classmethod
    def validate_input(cls, data: Any, settings: "Settings") -> dict[str, Any]:
        """Check and normalise the start input; raise InvalidInput naming the field."""
        from .errors import InvalidInput

        if not isinstance(data, dict):
            raise InvalidInput("input", "must be a JSON object")
        return data

    @classmethod
    def fingerprint(cls, data: dict[str, Any]) -> str | None:
        """A digest of the request, for result reuse and Idempotency-Key checks."""
        from .jsonutil import digest

        return digest(data)

    @classmethod
    def timeout(cls, settings: "Settings") -> timedelta | None:
        """Deadline for the whole instance; when it passes the instance fails."""
        return None

    @classmethod
    def reuse_within(cls, settings: "Settings") -> timedelta | None:
        """A finished successful instance with the same fingerprint this recent is reused."""
        return None


def check_definition(cls: type[Workflow]) -> None:
    """Every state, event and method the workflow's declarations name exists on its machine.
    Raises WorkflowDefinitionError(workflow, kind, name)."""
    from .errors import WorkflowDefinitionError

    events = cls.event_names()
    states = {s.id for s in cls.states}
    own = {id(s) for s in cls.states}

    def need(kind: str, name: str, where: str, known: Collection[str]) -> None:
        if name and name not in known:
            raise WorkflowDefinitionError(cls.type, kind, name, where, known)

    for state, step in cls.steps.items():
        if id(state) not in own:
            raise WorkflowDefinitionError(cls.type, "state", getattr(state, "id", repr(state)), "the step table")
        where = f"step '{step.name or state.id}'"
        if step.external is None and not step.tasks:
            raise WorkflowDefinitionError(cls.type, "task", "", where)
        need("event", step.join, f"{where} join", events)
        if step.on_failure != Step.on_failure:  # the default names no event the workflow chose
            need("event", step.on_failure, f"{where} on_failure", events)
        # Every step can fail (its retries run out, its deadline passes), and the engine then
        # fires its on_failure from the step's state, the default `fail` included: a state that
        # does not take it left the instance there for ever, its step run again at every lease.
        accepted = {e.id for t in state.transitions for e in t.events}
        if step.on_failure not in accepted:
            raise WorkflowDefinitionError(
                cls.type, "event", step.on_failure, f"{where} on_failure", accepted,
                why=f"which state '{state.id}' does not take: the engine fires it there when the step fails "
                    f"(declare a transition from '{state.id}' on it, or set Step(on_failure=...))")
        if step.items_method and not step.join:
            raise WorkflowDefinitionError(cls.type, "event", "", f"{where} join (it fans out)", events)
        methods = [step.fanout] + ([step.external.items, step.external.send, step.external.token]
                                   if step.external else [])
        for method in filter(None, methods):
            if not callable(getattr(cls, method, None)):
                raise WorkflowDefinitionError(cls.type, "method", method, where)
    need("event", cls.start_event, "start_event", events)
    for attr in ("restart_event", "cancel_event"):
        if attr in cls.__dict__:  # the defaults apply only to a workflow that has those events
            need("event", getattr(cls, attr), attr, events)
    for name in sorted(cls.success_states | cls.failure_states):
        need("state", name, "success_states/failure_states", states)


def describe(cls: type[Workflow], settings: "Settings") -> dict[str, Any]:
    """A workflow type's definition as GET /workflow-types shows it: its states (declaration
    order), initial and final states, events, transitions and steps. A step shows its Celery
    task (`task`) or chain (`tasks`), its retry policy (`retry`: attempts, backoff and max_delay
    in seconds, factor, jitter), `timeout` in seconds (null: none), and for a step whose work is
    done elsewhere `external: true` (with `items` when it has one item per input)."""
    steps = []
    for state_id, step in cls.step_table().items():
        item: dict[str, Any] = {"name": step.name, "state": state_id}
        if step.chain:
            item["tasks"] = list(step.chain)
        else:
            item["task"] = step.task or None
        policy = step.policy(settings)
        item["retry"] = {"attempts": policy.attempts, "backoff": policy.backoff, "factor": policy.factor,
                         "max_delay": policy.max_delay, "jitter": policy.jitter}
        deadline = step.deadline(settings)
        item["timeout"] = deadline.total_seconds() if deadline is not None else None
        item["external"] = step.external is not None
        if step.items_method:
            item["items"] = step.items_method
        if step.join:
            item["join"] = step.join
        item["on_failure"] = step.on_failure
        if step.compensate:
            item["compensate"] = step.compensate
        steps.append(item)
    return {
        "type": cls.type,
        "states": [s.id for s in cls.states],
        "initial": next(s.id for s in cls.states if s.initial),
        "final_states": [s.id for s in cls.states if s.final],
        "success_states": sorted(cls.success_states),
        "failure_states": sorted(cls.failure_states),
        "events": [e.id for e in cls.events],
        "signals": sorted(cls.signals),
        "transitions": [{"event": e.id, "from": t.source.id, "to": t.target.id}
                        for s in cls.states for t in s.transitions for e in t.events],
        "steps": steps,
    }


def _per_class(cls: type, name: str, compute: Callable[[], Any]) -> Any:
    """A value computed once per workflow class (not inherited: a subclass has its own)."""
    value = cls.__dict__.get(name)
    if value is None:
        value = compute()
        setattr(cls, name, value)
    return value


#: Callbacks of the machine itself, which apply to every transition or state when a workflow
#: defines a method of that name.
_GENERIC_CALLBACKS = ("prepare_event", "before_transition", "on_transition", "after_transition",
                      "on_enter_state", "on_exit_state", "on_invoke_state")

#: A callback the engine runs itself: a function of the workflow class, and whether it is called
#: with `payload=` (else with no argument besides the instance).
Callback = tuple[Callable[..., Any], bool]


@dataclass(frozen=True)
class Move:
    """A transition the engine takes without a statemachine instance (`transition_table`): the
    target state's value and the workflow's callbacks in python-statemachine's order (read in its
    `engines/base.py` and `engines/sync.py`): validators and guards (never in a table), then
    `before_<event>`, `on_exit_<source>`, `on_<event>` in the source state (`leaving`), the state
    set, `on_enter_<target>` (`entering`), then `after_<event>` (`after`)."""

    target: str
    leaving: tuple[Callback, ...] = ()
    entering: tuple[Callback, ...] = ()
    after: tuple[Callback, ...] = ()

    def take(self, cls: type[Workflow], model: Any, payload: Any, settings: "Settings | None" = None,
             session: "Session | None" = None) -> Workflow | None:
        """Set `model.state` to the target and run the callbacks on a `callback_host` of `cls`,
        each given `payload` as `machine.send(event, payload=payload)` gives it. Returns the host
        (its `messages` and `context_touched` are the transition's), or None when no callback ran.

        A callback's exception propagates unchanged, as from a `StateMachine` (its
        `catch_errors_as_events` is off); raised before `after`, it leaves `model.state` at the
        source, as the machine restores its configuration."""
        if not (self.leaving or self.entering or self.after):
            model.state = self.target
            return None
        host = cls.callback_host(model, settings, session)
        source = model.state
        try:
            _call(host, self.leaving, payload)
            model.state = self.target
            _call(host, self.entering, payload)
        except Exception:
            model.state = source
            raise
        _call(host, self.after, payload)
        return host


def _call(host: Workflow, callbacks: tuple[Callback, ...], payload: Any) -> None:
    for function, takes_payload in callbacks:
        if takes_payload:
            function(host, payload=payload)
        else:
            function(host)


def _takes_payload(function: Any) -> bool | None:
    """For a plain function `(self)` or `(self, payload)` (`payload` with a default or not):
    whether it takes `payload`. None for anything else (a coroutine, a staticmethod, a property,
    any other parameter the machine would inject: `event_data`, `source`, `machine`, ...)."""
    if not inspect.isfunction(function) or inspect.iscoroutinefunction(function) \
            or inspect.isasyncgenfunction(function):
        return None
    params = list(inspect.signature(function).parameters.values())
    if not params or params[0].kind not in (inspect.Parameter.POSITIONAL_ONLY,
                                            inspect.Parameter.POSITIONAL_OR_KEYWORD):
        return None
    rest = params[1:]
    if not rest:
        return False
    if len(rest) == 1 and rest[0].name == "payload" and rest[0].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                                         inspect.Parameter.KEYWORD_ONLY):
        return True
    return None


def _runs_nothing(cls: type, specs: Any) -> bool:
    """True when none of `specs` (a python-statemachine callback list) can call anything on an
    instance of `cls`: each is a naming convention (`on_enter_<state>`, ...) that the class does
    not define. An explicit callback, guard or validator is never nothing."""
    return all(spec.is_convention and not hasattr(cls, spec.func) for spec in specs)


def _simple_callbacks(cls: type, specs: Any, event: str | None) -> tuple[Callback, ...] | None:
    """The callbacks `specs` (one group of a state or transition) run for `event` on an instance
    of `cls`, when each is a naming convention the class defines as a plain function taking at
    most `payload`; None when any spec is something else (explicit, a guard or validator, other
    parameters), or when the class has its own `__init__` (its callbacks may need what that sets
    up, which a `callback_host` lacks)."""
    found: list[Callback] = []
    for spec in specs:
        if not spec.is_convention:
            return None
        # a convention of another event of the same transition (`on_<other>`) does not run
        if not hasattr(cls, spec.func) or (spec.cond is not None and not spec.cond(event=event)):
            continue
        function = inspect.getattr_static(cls, spec.func)
        takes_payload = _takes_payload(function)
        if takes_payload is None or cls.__init__ is not Workflow.__init__:
            return None
        found.append((function, takes_payload))
    return tuple(found)


def _plain_class(cls: type[Workflow]) -> bool:
    """The machine is flat (no compound, parallel or history state), has no listeners, no
    eventless transition and no machine-wide callback: the cases a transition table can
    represent without running the library."""
    if getattr(cls, "_class_listeners", None) or any(hasattr(cls, name) for name in _GENERIC_CALLBACKS):
        return False
    if not _runs_nothing(cls, cls.prepare):
        return False
    for state in cls.states:
        if state.states or state.parallel or state.history or state.parent is not None:
            return False
        if any(t.is_eventless for t in state.transitions):
            return False
    return True


def transition_table(cls: type[Workflow]) -> dict[tuple[str, str], Move]:
    """{(state value, event): Move} for every transition the engine may take without building a
    statemachine instance, computed once per class.

    A pair is in the table only when exactly one transition of the state matches the event
    (`Transition.match`, so wildcard events count), that transition has no guard or validator,
    is neither delayed nor internal, the source and target have no invoke callback, and every
    callback it runs (`before_<event>`, `on_exit_<source>`, `on_<event>`, `on_enter_<target>`,
    `after_<event>`) is one `_simple_callbacks` accepts. Every other pair, an unknown state and
    an event the state does not accept go through the machine, which keeps its own errors
    (TransitionNotAllowed, InvalidStateValue)."""
    def compute() -> dict[tuple[str, str], Move]:
        table: dict[tuple[str, str], Move] = {}
        if not _plain_class(cls):
            return table
        events = list(cls.event_names())
        for state in cls.states:
            if not _runs_nothing(cls, state.invoke):
                continue
            for event in events:
                matching = [t for t in state.transitions if t.match(event)]
                if len(matching) != 1:
                    continue
                move = matching[0]
                target = move.target
                if move.internal or len(move.targets) != 1 or target is None \
                        or any(e.delay or e.internal for e in move.events):
                    continue
                if not (_runs_nothing(cls, [*move.validators, *move.cond]) and _runs_nothing(cls, target.invoke)):
                    continue
                groups = [_simple_callbacks(cls, specs, event)
                          for specs in (move.before, state.exit, move.on, target.enter, move.after)]
                if any(g is None for g in groups):
                    continue
                before, exit_, on, enter, after = groups
                table[(state.value, event)] = Move(target.value, before + exit_ + on, enter, after)  # type: ignore[operator]
        return table
    return _per_class(cls, "_transition_table", compute)  # type: ignore[no-any-return]


def initial_entry(cls: type[Workflow]) -> Move | None:
    """How a new instance enters its initial state without a statemachine instance: a Move to it
    whose callbacks are the state's `on_enter_<state>` when `_simple_callbacks` accepts it (called
    without `payload`, as the machine enters it when built), else None (the engine builds one)."""
    def compute() -> Move | bool:
        initial = cls.initial_state
        if initial is None or not _plain_class(cls) or cls.start_configuration_values \
                or not _runs_nothing(cls, initial.invoke):
            return False
        enter = _simple_callbacks(cls, initial.enter, None)
        if enter is None:
            return False
        # Entering the initial state is not a microstep: a failing callback leaves the state set,
        # as a failing `after` does.
        return Move(initial.value, after=tuple((function, False) for function, _ in enter))
    return _per_class(cls, "_initial_entry", compute) or None


class Registry:
    """Workflow types by name. Workflows register themselves; the engine knows none by name."""

    def __init__(self) -> None:
        self._types: dict[str, type[Workflow]] = {}

    def register(self, cls: type[Workflow]) -> type[Workflow]:
        """Add a workflow type. Raises WorkflowDefinitionError when its step table, events or
        state lists name something the machine does not have (the tasks are checked by
        `check_tasks`, once the Celery app has loaded them)."""
        if not cls.type:
            raise ValueError(f"{cls.__name__} has no type")
        check_definition(cls)
        undeclared = sorted(set(cls.signals) - cls.event_names())
        if undeclared:
            raise ValueError(f"{cls.__name__} declares signals it has no event for: {', '.join(undeclared)}")
        # Restart and cancel keep their own endpoints and checks (a failed step; compensations).
        if {cls.restart_event, cls.cancel_event} & set(cls.signals):
            raise ValueError(f"{cls.__name__}: restart and cancel cannot be signals")
        transition_table(cls)  # built once here, not on the first event
        initial_entry(cls)
        self._types[cls.type] = cls
        return cls

    def check_tasks(self, known: Collection[str]) -> None:
        """Every task a registered step table names is one the Celery app knows. Called at
        start-up after the workflow and task modules are imported (tasks import the workflows,
        so a workflow cannot check its tasks when it is registered). Raises
        WorkflowDefinitionError naming the workflow and the task."""
        from .errors import WorkflowDefinitionError

        for cls in self._types.values():
            for state_id, step in cls.step_table().items():
                for where, name in [*((f"step '{step.name}'", t) for t in step.tasks),
                                    (f"step '{step.name}' compensate", step.compensate)]:
                    if name and name not in known:
                        raise WorkflowDefinitionError(cls.type, "task", name, where)

    def get(self, name: str) -> type[Workflow] | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)


registry = Registry()
register = registry.register
