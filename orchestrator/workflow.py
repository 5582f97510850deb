"""How a workflow is declared: a python-statemachine class plus a table of steps.

The machine decides every transition; the engine persists it. A state that has a `Step` runs
that step's Celery task(s) when the machine enters it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping

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
    compensate: a task that undoes the completed step when the instance is cancelled, retried
              by `compensate_retry` (default COMPENSATION_RETRY).
    """

    task: str = ""
    name: str = ""
    chain: tuple[str, ...] = ()
    fanout: str = ""
    join: str = ""
    retry: "Retry | Callable[[Settings], Retry]" = field(default_factory=Retry)
    timeout: timedelta | None = None
    on_failure: str = "fail"
    compensate: str = ""
    compensate_retry: "Retry | Callable[[Settings], Retry]" = COMPENSATION_RETRY

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.chain or (self.task,)

    def policy(self, settings: "Settings") -> Retry:
        """The retry policy; a workflow may derive it from configuration."""
        return self.retry(settings) if callable(self.retry) else self.retry

    def compensation_policy(self, settings: "Settings") -> Retry:
        """The compensation's retry policy; a workflow may derive it from configuration."""
        return self.compensate_retry(settings) if callable(self.compensate_retry) else self.compensate_retry


#: The check of a signal's payload: `check(payload, instance) -> payload to fire`. `payload` is
#: the request's JSON object; `instance` is the locked instance row (read `.state` and `.context`,
#: change nothing). Raise InvalidInput naming the field (400) or Conflict with `state` (409).
SignalCheck = Callable[[dict[str, Any], Any], dict[str, Any]]


class Workflow(StateMachine):
    """Base of every workflow definition.

    Subclasses set `type`, declare states and events, and a `steps` table
    `{state: Step(...)}`. Callbacks may change `self.context` and call `self.emit(...)`;
    both are written in the same transaction as the transition.

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
    #: Not final (a restart leaves them) but the instance counts as finished while there.
    failure_states: ClassVar[frozenset[str]] = frozenset()
    restart_event: ClassVar[str] = "restart"
    cancel_event: ClassVar[str] = "cancel"
    signals: ClassVar[Mapping[str, SignalCheck]] = {}
    #: Set when the workflow has its own way in, whose checks the generic `POST /saga` lacks
    #: (e.g. "POST /api/v1/chat/<session_id>/task"); the generic start then refuses the type.
    started_by: ClassVar[str] = ""

    def __init__(self, model: Any, settings: "Settings | None" = None, session: "Session | None" = None) -> None:
        self.settings = settings
        # The engine's transaction, for callbacks that write rows of their own in it (None while
        # the initial state is entered, before the instance exists).
        self.session = session
        self.context_touched = False
        self.messages: list[tuple[str, str, str | None, dict[str, Any]]] = []
        super().__init__(model=model, state_field="state")

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
                       error: str) -> tuple[str, dict[str, Any]] | None:
        """A message this workflow emitted can never be published (e.g. too large for Kafka):
        the (event, payload) to fire for it, or None to fail the current state's step."""
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


def _per_class(cls: type, name: str, compute: Callable[[], Any]) -> Any:
    """A value computed once per workflow class (not inherited: a subclass has its own)."""
    value = cls.__dict__.get(name)
    if value is None:
        value = compute()
        setattr(cls, name, value)
    return value


class Registry:
    """Workflow types by name. Workflows register themselves; the engine knows none by name."""

    def __init__(self) -> None:
        self._types: dict[str, type[Workflow]] = {}

    def register(self, cls: type[Workflow]) -> type[Workflow]:
        if not cls.type:
            raise ValueError(f"{cls.__name__} has no type")
        undeclared = sorted(set(cls.signals) - cls.event_names())
        if undeclared:
            raise ValueError(f"{cls.__name__} declares signals it has no event for: {', '.join(undeclared)}")
        # Restart and cancel keep their own endpoints and checks (a failed step; compensations).
        if {cls.restart_event, cls.cancel_event} & set(cls.signals):
            raise ValueError(f"{cls.__name__}: restart and cancel cannot be signals")
        self._types[cls.type] = cls
        return cls

    def get(self, name: str) -> type[Workflow] | None:
        return self._types.get(name)

    def names(self) -> list[str]:
        return sorted(self._types)


registry = Registry()
register = registry.register
