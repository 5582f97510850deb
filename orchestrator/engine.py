"""The engine: every change to a workflow instance is one transaction.

    lock the instance row -> rebuild the machine from the stored state -> fire the event ->
    write state, step rows, one history row, timers and outbox rows -> commit -> relay

Rows are read with Core statements into plain `Record`s and what changed is written at the end,
on PostgreSQL as one statement (orchestrator/rows.py). A step that reports success writes on
what it read when it was claimed, without the lock, and only if the instance's version has not
moved since; otherwise it does the same again under the lock.

Steps report back through `claim_step`, `step_progress`, `step_succeeded` and `step_failed`;
every one of them is keyed by (instance, step, attempt[, branch]) so a redelivered task or a
duplicated report has one effect.
"""
from __future__ import annotations

import contextvars
import copy
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import cached_property
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterator, Protocol

from sqlalchemy import Engine as SAEngine, Table, and_, bindparam, delete, false, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from statemachine.exceptions import TransitionNotAllowed

from .config import Settings
from .db import untouched
from .errors import Conflict, IllegalTransition, InvalidInput, NotFound, nested_field
from . import ids, logs, tracing
from .jsonutil import as_utc, digest, storable, utc_iso
from .schemas import identifier_problem
from .models import (ACTIVE_STEP_STATUSES, HistoryEntry, OutboxMessage, StepClaim, StepRun, StepStatus, StepToken,
                     Timer, business_key_problem, idempotency_key_problem, utcnow)
from .rows import INSTANCES, Record, StaleBasis, Writes, execute_prepared, insert_many
from .workflow import INSTANCE_STATUSES, ItemFailed, Registry, Step, Workflow, initial_entry, transition_table

log = logging.getLogger(__name__)

ACTIVE = tuple(s.value for s in ACTIVE_STEP_STATUSES)
#: The outbox channel of a step message its writer runs itself (a local continuation); the relay
#: publishes it like a "celery" row when it is still unsent after the grace period.
LOCAL = "local"
RUNS: Table = StepRun.__table__  # type: ignore[assignment]
TIMERS: Table = Timer.__table__  # type: ignore[assignment]
HISTORY: Table = HistoryEntry.__table__  # type: ignore[assignment]
OUTBOX: Table = OutboxMessage.__table__  # type: ignore[assignment]
CLAIMS: Table = StepClaim.__table__  # type: ignore[assignment]
TOKENS: Table = StepToken.__table__  # type: ignore[assignment]
INSTANCE = select(INSTANCES).where(INSTANCES.c.id == bindparam("id"))
LOCK = INSTANCE.with_for_update()
RUNS_OF = select(RUNS).where(RUNS.c.instance_id == bindparam("id"))
# What a claimed step reads: its instance and every step row, in one statement (one snapshot),
# kept as the basis its report is written on.
CLAIM = (select(INSTANCES, RUNS).select_from(INSTANCES.outerjoin(RUNS, RUNS.c.instance_id == INSTANCES.c.id))
         .where(INSTANCES.c.id == bindparam("id")))
INSTANCE_COLUMNS = tuple(c.name for c in INSTANCES.c)
RUN_COLUMNS = tuple(c.name for c in RUNS.c)
# The same, as a prepared statement on PostgreSQL.
CLAIM_SQL = (f"SELECT {', '.join('i.' + c for c in INSTANCE_COLUMNS)}, {', '.join('r.' + c for c in RUN_COLUMNS)} "
             "FROM workflow_instances i LEFT JOIN step_runs r ON r.instance_id = i.id WHERE i.id = $1")

# The claim upsert (Engine._take_claim): PostgreSQL's prepared text, and a Core statement per
# dialect built once (building it costs more than running it).
_CLAIM_KEYS = ("instance_id", "step", "task", "branch", "attempt", "dispatch", "claimed_at")
_CLAIM_INTO = "INSERT INTO step_claims (instance_id, step, task, branch, attempt, dispatch, claimed_at) "
# taken only over an older claim (a takeover: or the same dispatch's); returns a row when taken
_CLAIM_CONFLICT = {
    takeover: ("ON CONFLICT (instance_id, step, task, branch) DO UPDATE SET attempt = excluded.attempt, "
               "dispatch = excluded.dispatch, claimed_at = excluded.claimed_at "
               "WHERE step_claims.attempt < excluded.attempt OR (step_claims.attempt = excluded.attempt AND "
               f"step_claims.dispatch {'<=' if takeover else '<'} excluded.dispatch) RETURNING step_claims.attempt")
    for takeover in (False, True)}
_CLAIM_UPSERT_SQL = {takeover: f"{_CLAIM_INTO}VALUES ($1, $2, $3, $4, $5, $6, $7) {_CLAIM_CONFLICT[takeover]}"
                     for takeover in (False, True)}
_CLAIM_UPSERTS: dict[tuple[str, bool], Any] = {}


def _claim_upsert(dialect: str, takeover: bool) -> Any:
    stmt = _CLAIM_UPSERTS.get((dialect, takeover))
    if stmt is None:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        c = CLAIMS.c
        stmt = insert(CLAIMS).values({k: bindparam(k) for k in _CLAIM_KEYS})
        new = stmt.excluded
        newer = or_(c.attempt < new.attempt, and_(c.attempt == new.attempt, c.dispatch < new.dispatch))
        if takeover:
            newer = or_(newer, and_(c.attempt == new.attempt, c.dispatch == new.dispatch))
        stmt = _CLAIM_UPSERTS[(dialect, takeover)] = stmt.on_conflict_do_update(
            index_elements=[c.instance_id, c.step, c.task, c.branch],
            set_={"attempt": new.attempt, "dispatch": new.dispatch, "claimed_at": new.claimed_at},
            where=newer).returning(c.attempt)
    return stmt


# A delivery's claim (Engine.claim) on PostgreSQL: the claim of the dispatch its step row holds,
# and the read of the basis, in one statement (one snapshot); the first column says whether the
# claim was taken. ($1 instance, $2 step, $3 task, $4 branch, $5 attempt, $6 now)
_ACTIVE_SQL = ", ".join(f"'{s.value}'" for s in ACTIVE_STEP_STATUSES)
CLAIM_DELIVERY_SQL = {
    takeover: ("WITH d AS (SELECT dispatches FROM step_runs WHERE instance_id = $1 AND name = $2 "
               f"AND attempt = $5::integer AND status IN ({_ACTIVE_SQL})), "
               f"c AS ({_CLAIM_INTO}SELECT $1, $2, $3, $4::integer, $5::integer, d.dispatches, "
               f"$6::timestamptz FROM d {_CLAIM_CONFLICT[takeover]}) "
               f"SELECT (SELECT count(*) FROM c), {CLAIM_SQL.removeprefix('SELECT ')}")
    for takeover in (False, True)}

#: (instance values, [step row values]) as read by the claim
Basis = tuple[dict[str, Any], list[dict[str, Any]]]


class InstanceFilter(Protocol):
    """Which instances `Engine.list`, `match` and `match_ids` select; a field left None does not
    filter. `web.schemas.SagaFilter` (the query of GET /sagas, the filter of POST /sagas/bulk) and
    `Filter` both are one.

    type, state:     exact workflow type and current state (a state the type, or without a
                     type any registered type, has);
    status:          running, completed, failed or cancelled (`workflow.InstanceStatus`): the
                     instance's state is one its workflow counts so (`states_with_status`);
    key:             exact business key;
    created_after:   created at or after (inclusive); created_before: strictly before; a naive
                     datetime is UTC;
    error:           case-insensitive substring of the instance's failure message (its context's
                     "error") or of any of its steps' `error`;
    step, step_status: the instance has a step of that name (and/or a step in that status, a
                     `StepStatus` value).
    """

    type: str | None
    state: str | None
    status: str | None
    key: str | None
    created_after: datetime | None
    created_before: datetime | None
    error: str | None
    step: str | None
    step_status: Any


@dataclass(frozen=True)
class Filter:
    """A plain `InstanceFilter`."""

    type: str | None = None
    state: str | None = None
    status: str | None = None
    key: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    error: str | None = None
    step: str | None = None
    step_status: str | None = None


def _branches_failed(run: Record) -> str:
    """A fan-out step's error once every branch has reported and some failed: the same words
    whichever branch reported last, with each distinct error of the failed ones, so that the
    `error` filter (`GET /sagas?error=`, bulk operations) finds every such step by its cause."""
    branches = (run.data or {}).get("branches") or []
    errors = dict.fromkeys(b.get("error") or "failed" for b in branches if b["status"] == StepStatus.FAILED.value)
    return f"{run.failed} of {run.total} branches failed: " + "; ".join(errors)


@dataclass
class StepContext:
    """What a step task gets: the instance's input and its own saved data. No ORM objects."""

    instance_id: str
    step: str
    attempt: int
    branch: int | None
    input: dict[str, Any]
    data: dict[str, Any]
    polls: int
    restarts: int
    settings: Settings
    engine: "Engine" = field(repr=False)
    basis: Basis | None = field(default=None, repr=False)
    dispatch: int = 0  # which dispatch of this attempt was read (StepRun.dispatches)
    token: str | None = None  # an external step's item: the token its completion must carry

    @cached_property
    def outputs(self) -> dict[str, Any]:
        """Outputs of the steps completed before this one (read on first use)."""
        return self.engine.step_outputs(self.instance_id)

    @property
    def idempotency_key(self) -> str:
        """Stable across retries of one run; new after a restart (the old effect failed)."""
        key = f"{self.instance_id}:{self.step}:{self.restarts}"
        return key if self.branch is None else f"{key}:{self.branch}"

    def save(self, **data: Any) -> None:
        """Persist partial progress (e.g. a remote job id) before the next call."""
        self.data.update(data)
        self.engine.save_step_data(self.instance_id, self.step, self.attempt, data, self.branch)


@dataclass
class Done:
    """The step succeeded: fire `event` (default: the step's join for a branch) with `output`."""

    event: str = ""
    output: dict[str, Any] = field(default_factory=dict)


@dataclass
class Await:
    """An external step's task has sent its request: wait for `Engine.complete_external` with
    the item's token (`ctx.token`). The step holds no worker and no lease meanwhile; its
    `timeout` (a timer row) bounds the wait."""


#: What `Engine.complete_external` answers.
ACCEPTED, DUPLICATE, STALE, UNKNOWN = "accepted", "duplicate", "stale", "unknown"


@dataclass
class Poll:
    """Not finished yet: look again after `after` seconds (a timer row, not a sleeping worker)."""

    after: float
    progress: float | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Successor:
    """A step message its writer runs itself (a local continuation, `Engine.unit_of_work`): its
    outbox row's message id, the dispatch of the step it carries, and the instance and step rows
    as that writer's transaction left them (`Engine.claim_successor`; None: read them)."""

    message_id: str
    task: str
    instance_id: str
    step: str
    attempt: int
    dispatch: int
    basis: "Basis | None" = field(default=None, repr=False)


class UnitOfWork:
    """One transaction. Rows read here are Records, written when it ends (orchestrator/rows.py);
    outbox rows added here are relayed right after commit."""

    def __init__(self, session: Session, basis: Basis | None = None) -> None:
        self.session = session
        self.writes = Writes()
        self.runs: dict[str, dict[str, Record]] = {}  # every step row of a loaded instance
        self.history: list[Record] = []
        self.outbox: list[Record] = []
        self.kept: list[Successor] = []  # step messages its caller runs itself (Engine.unit_of_work)
        self.basis = basis
        self.before_read: Callable[[], None] | None = None  # a batch writes what it holds back

    def execute(self, statement: Any, params: dict[str, Any] | None = None) -> Any:
        if self.before_read is not None:
            self.before_read()
        return self.session.connection().execute(statement, params)

    def add_instance(self, **values: Any) -> Record:
        inst = self.writes.add(INSTANCES, Record(values, new=True))
        self.runs[inst.id] = {}
        return inst

    def add_run(self, run: Record) -> None:
        self.writes.add(RUNS, run)
        self.runs.setdefault(run.instance_id, {})[run.name] = run

    def add_timer(self, **values: Any) -> None:
        self.writes.add(TIMERS, Record({"step": None, "attempt": None, "branch": None, "event": None,
                                        "fired_at": None, **values}, new=True))

    def add_history(self, **values: Any) -> Record:
        entry = self.writes.add(HISTORY, Record(values, new=True))
        self.history.append(entry)
        return entry

    def add_message(self, channel: str, target: str, payload: dict[str, Any], *,
                    instance_id: str | None = None, key: str | None = None) -> None:
        # The request or event being handled, else the one that created the instance.
        inst = self.writes.instances.get(instance_id or "")
        correlation = logs.correlation_id() or (inst.correlation_id if inst is not None else None)
        msg = Record({"message_id": ids.uuid4().hex, "instance_id": instance_id, "channel": channel,
                      "target": target, "key": key, "payload": payload, "created_at": utcnow(),
                      "sent_at": None, "publish_attempts": 0, "last_error": None,
                      "correlation_id": correlation,
                      # its publish continues this trace (tracing.py); None when tracing is off
                      "trace_context": tracing.carrier()}, new=True)
        self.outbox.append(self.writes.add(OUTBOX, msg))

    def written_basis(self, instance_id: str) -> Basis | None:
        """The instance and every step row of it as a read right after this transaction's commit
        would return them; None when they are not all in hand (the instance was not read)."""
        inst, runs = self.writes.instances.get(instance_id), self.runs.get(instance_id)
        if inst is None or runs is None or instance_id not in self.writes.versions:
            return None
        values = inst.as_read(INSTANCES)
        values["version"] = self.writes.versions[instance_id] + 1  # every write bumps it once
        return values, [run.as_read(RUNS) for run in runs.values()]

    def lock(self, instance_id: str) -> Record:
        inst = self._load(instance_id)
        if inst is None:
            raise NotFound(f"instance {instance_id} not found", instance_id=instance_id)
        return inst

    def lock_with_runs(self, instance_id: str) -> Record | None:
        """Lock the instance, then load all its step rows. Two statements on purpose: rows joined
        to a locked row are not re-read when the lock was waited for, so a join would return
        step rows as they were before the transaction we waited on."""
        inst = self._load(instance_id)
        if inst is not None:
            self.all_runs(instance_id)
        return inst

    def _load(self, instance_id: str) -> Record | None:
        if self.basis is not None and self.basis[0]["id"] == instance_id:
            # Not locked: the write checks that the version is still the one read here.
            values, runs = self.basis
            self.basis = None
            self.runs[instance_id] = {r["name"]: self.writes.track(RUNS, Record(r)) for r in runs}
            return self.writes.track(INSTANCES, Record(values))
        row = self.execute(LOCK, {"id": instance_id}).first()
        return None if row is None else self.writes.track(INSTANCES, Record.loaded(row))

    def all_runs(self, instance_id: str) -> dict[str, Record]:
        runs = self.runs.get(instance_id)
        if runs is None:
            runs = self.runs[instance_id] = {
                row.name: self.writes.track(RUNS, Record.loaded(row))
                for row in self.execute(RUNS_OF, {"id": instance_id})}
        return runs

    def step_run(self, instance_id: str, name: str) -> Record | None:
        return self.all_runs(instance_id).get(name)


_NO_RUN = Record({"status": None})
_DEFAULT_FINGERPRINT = Workflow.fingerprint.__func__  # type: ignore[attr-defined]  # digest(data)


def unknown_step(step: Any, names: list[str]) -> str:
    """The problem of a restart naming a step the workflow does not have: its steps, or that it
    has none to restart (a workflow whose work runs in its handlers, not in steps)."""
    if not names:
        return f"unknown step '{step}'; this workflow has no steps to restart"
    return f"unknown step '{step}'; steps: " + ", ".join(names)


def _fingerprint(cls: type[Workflow], data: Any, payload_digest: str) -> str | None:
    """A start's fingerprint: the input's digest, unless the workflow fingerprints its own way."""
    if getattr(cls.fingerprint, "__func__", None) is _DEFAULT_FINGERPRINT:
        return payload_digest
    return cls.fingerprint(data)


def _check_idempotency_key(key: str) -> None:
    """InvalidInput (400) naming `Idempotency-Key` when the header's value cannot be one."""
    if found := idempotency_key_problem(key):
        raise InvalidInput("Idempotency-Key", found)  # the words of the header's check (web.check_request_text)
    if found := identifier_problem(key):
        raise InvalidInput("Idempotency-Key", found)  # an id like a business key: nothing hidden in it

#: The batch the engine calls of this thread join (Engine.batch).
_batch: "contextvars.ContextVar[Batch | None]" = contextvars.ContextVar("engine_batch", default=None)


class Batch:
    """One transaction shared by many units of work (Engine.batch).

    A unit of work that only adds rows (a start: a new instance, its history, step rows, timers
    and outbox rows) is held back, and the held ones go out as one multi-row INSERT per table
    when the batch flushes. Any other unit of work may read, so what is held back is written
    before it begins; its own writes go out when it ends, as outside a batch. `extra` rows
    (table, values) are inserted with the held ones (the bridge's de-duplication rows).
    `writes` counts the statements other than SELECT run on the batch's connection by anything
    but the flush, so a caller can tell whether a call that raised wrote something first.

    `before_first_statement`, when set, is called once, just before the first statement goes
    to the database (the Kafka bridge waits there for the batch before to commit)."""

    def __init__(self, engine: "Engine", session: Session) -> None:
        self.engine = engine
        self.session = session
        self.held: list[tuple[Any, Writes]] = []
        self.extra: list[tuple[Any, Table, dict[str, Any]]] = []
        self.tag: Any = None  # what the caller is applying now (an event): names held writes
        self.refused: set[Any] = set()  # tags whose new instance's key was taken: nothing written
        self.outbox: list[Record] = []
        self.writes = 0
        self.before_first_statement: Callable[[], None] | None = None
        self._flushing = False
        from sqlalchemy import event as sa_event

        sa_event.listen(session.connection(), "before_cursor_execute", self._count)
        # a workflow's own ORM reads and writes in the transaction see what is held back
        sa_event.listen(session, "do_orm_execute", lambda *_: self.flush())
        sa_event.listen(session, "before_flush", lambda *_: self.flush())

    def _count(self, conn: Any, cursor: Any, statement: str, *_: Any) -> None:
        hook, self.before_first_statement = self.before_first_statement, None
        if hook is not None:
            hook()
        if not self._flushing and not statement.lstrip()[:6].upper() == "SELECT":
            self.writes += 1

    @contextmanager
    def joined(self) -> Iterator["Batch"]:
        """Inside the block, this thread's engine calls join the batch (one at a time)."""
        if _batch.get() is not None:
            raise RuntimeError("batches do not nest")
        token = _batch.set(self)
        try:
            yield self
        finally:
            _batch.reset(token)

    def commit(self) -> None:
        """Write what is held back, commit, then hand the outbox rows to the relay. Raises what
        the database raised, after rolling everything back. From one thread at a time, which
        need not be the one that filled the batch."""
        self.before_first_statement = None
        try:
            self.flush()
            self.session.commit()
        except BaseException:
            self.rollback()
            raise
        self.session.close()
        relay = self.engine.relay
        if self.outbox and relay is not None:
            try:
                relay(self.outbox)
            except Exception:  # the sweeper publishes what the kick could not
                log.warning("relay after commit failed; the sweeper will publish", exc_info=True)

    def rollback(self) -> None:
        """Nothing of the batch is written."""
        self.before_first_statement = None
        self.held, self.extra, self.outbox = [], [], []
        try:
            self.session.rollback()
        finally:
            self.session.close()

    def unit_of_work(self, basis: Basis | None) -> Iterator[UnitOfWork]:
        uow = UnitOfWork(self.session, basis)
        uow.before_read = self.flush  # what it may read is written first
        yield uow
        w = uow.writes
        if not w.loaded and not w.upserts and not w.touched - set(w.instances) and all(r.is_new for _, r in w.new):
            self.held.append((self.tag, w))
        else:
            self.flush()
            self._flushing = True
            try:
                w.flush(self.session.connection(), self.engine.prepare)
            finally:
                self._flushing = False
        self.outbox += uow.outbox

    def flush(self) -> None:
        """Write what is held back: one INSERT per table (instances first, for the foreign keys)
        and shape of row. New instances are inserted skipping those whose (type, business key
        or idempotency key) exists (ON CONFLICT DO NOTHING): their rows are dropped and their
        tag goes to `refused` (the start found an existing instance; its caller does it again,
        alone, to get that answer)."""
        if not self.held and not self.extra:
            return
        held, extra = self.held, self.extra
        self.held, self.extra = [], []
        conn = self.session.connection()
        self._flushing = True
        try:
            new = [r.insert_values(INSTANCES) for _, w in held for t, r in w.new if t is INSTANCES]
            inserted: set[str] = set()
            for shape in _shapes(new).values():
                inserted.update(insert_many(conn, INSTANCES, shape, skip_existing=True))
            rows: list[tuple[Table, dict[str, Any]]] = []
            dropped: set[str] = set()
            for tag, w in held:
                ids = {r.id for t, r in w.new if t is INSTANCES}
                if ids - inserted:
                    self.refused.add(tag)
                    dropped |= ids
                    continue
                rows += [(t, r.insert_values(t)) for t, r in w.new if t is not INSTANCES]
            rows += [(t, values) for tag, t, values in extra if tag not in self.refused]
            by_table: dict[Table, list[dict[str, Any]]] = {}
            for table, values in rows:
                by_table.setdefault(table, []).append(values)
            for table, values_list in by_table.items():
                for shape in _shapes(values_list).values():
                    insert_many(conn, table, shape)
        finally:
            self._flushing = False
        if dropped:
            self.outbox = [m for m in self.outbox if m.instance_id not in dropped]


def _shapes(rows: list[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Rows grouped by their columns: one executemany each."""
    out: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for values in rows:
        out.setdefault(tuple(values), []).append(values)
    return out


def new_run(instance_id: str, step: Step) -> Record:
    return Record({"instance_id": instance_id, "name": step.name,
                   "task": step.tasks[-1] if step.tasks else "external",
                   "status": StepStatus.PENDING.value, "attempt": 0, "restarts": 0, "failures": 0,
                   "progress": 0.0, "polls": 0, "total": 0, "done": 0, "failed": 0, "data": {},
                   "error": None, "queued_at": None, "started_at": None, "finished_at": None,
                   "lease_until": None, "dispatches": 0}, new=True)


class Engine:
    def __init__(self, settings: Settings, session_factory: sessionmaker[Session], registry: Registry,
                 relay: Callable[[list[Record]], None] | None = None,
                 autocommit: SAEngine | None = None) -> None:
        self.settings = settings
        self.sessions = session_factory
        # A statement that is a whole transaction needs no BEGIN and COMMIT around it: a pool in
        # autocommit mode (PostgreSQL only) saves those two round trips for single-statement
        # reads, claims, and transitions whose writes are one statement (`unit_of_work`).
        self.autocommit = autocommit
        self.reads = autocommit or session_factory.kw["bind"]
        self.registry = registry
        self.relay = relay
        self.prepare = settings.database_prepared_statements and self.reads.dialect.name == "postgresql"

    # -- transactions --------------------------------------------------------------------------
    @contextmanager
    def unit_of_work(self, basis: Basis | None = None,
                     keep: "Callable[[Record], bool] | None" = None) -> Iterator[UnitOfWork]:
        """One transaction; its outbox rows are handed to the relay after commit. `keep` picks
        (at most) one step message (one task: `{"task": [name, [instance, step, attempt]]}`)
        its caller runs itself instead (`uow.kept`, a local continuation): that row is written
        on the LOCAL channel, marked sent, with the step's claim, and not relayed after commit
        (see `_keep`)."""
        batch = _batch.get()
        if batch is not None and batch.engine is self:  # a batch's unit of work: no local continuation
            yield from batch.unit_of_work(basis)
            return
        with self.sessions() as session:
            with session.begin():
                uow = UnitOfWork(session, basis)
                yield uow
                if keep is not None:
                    self._keep(uow, keep)
                if self.autocommit is not None and untouched(session) and uow.writes.one_statement():
                    # The whole transaction is that statement: PostgreSQL runs it as one
                    # transaction of its own, without the BEGIN and COMMIT round trips.
                    with self.autocommit.begin() as conn:
                        uow.writes.flush(conn, self.prepare)
                else:
                    uow.writes.flush(session.connection(), self.prepare)
        if uow.kept:
            uow.kept = [replace(s, basis=uow.written_basis(s.instance_id)) for s in uow.kept]
        outbox = [r for r in uow.outbox if r.channel != LOCAL] if uow.kept else uow.outbox
        if outbox and self.relay is not None:
            try:
                self.relay(outbox)
            except Exception:  # the sweeper publishes what the kick could not
                log.warning("relay after commit failed; the sweeper will publish", exc_info=True)

    @staticmethod
    def _keep(uow: UnitOfWork, keep: Callable[[Record], bool]) -> None:
        """Pick the step message `keep` wants to run locally. Its row is written on the `local`
        channel and marked sent, and the step's claim with it (`take_claim`'s row): the
        successor is this writer's from the commit on, as a delivered step is its delivery's
        once claimed, and its run needs no statement of its own before it starts. A crash
        after the commit is a crash of that run (`running_locally`, the step's lease).

        The claim is written over any older one: this transaction dispatches the step (bumps
        its dispatch under the instance's version), so no claim can be as new."""
        kept = next((r for r in uow.outbox if keep(r)), None)
        if kept is None:
            return
        task, (instance_id, step, attempt) = kept.payload["task"]
        run = uow.runs.get(instance_id, {}).get(step)
        if run is not None and run.attempt == attempt:
            now = utcnow()
            kept.channel, kept.sent_at, kept.publish_attempts = LOCAL, now, 1
            uow.writes.upsert(CLAIMS, Record({"instance_id": instance_id, "step": step, "task": task, "branch": -1,
                                              "attempt": attempt, "dispatch": run.dispatches, "claimed_at": now},
                                             new=True))
            uow.kept = [Successor(kept.message_id, task, instance_id, step, attempt, run.dispatches)]

    @contextmanager
    def reading(self) -> Iterator[Any]:
        """A SQLAlchemy Connection to read with: inside a batch (a Kafka handler) the batch's
        own, which sees what the batch wrote, else one of the read pool. Workflow code that
        reads its own tables from a Kafka handler must read through this: a session of its
        own would not see the batch's writes, and on SQLite its BEGIN IMMEDIATE would wait for
        the batch's write lock until the busy timeout (30 s) ran out."""
        batch = _batch.get()
        if batch is not None and batch.engine is self:
            batch.flush()
            yield batch.session.connection()
        else:
            with self.reads.connect() as conn:
                yield conn

    @contextmanager
    def batch(self) -> Iterator["Batch"]:
        """Many engine calls in one transaction (the Kafka bridge's batches): every
        `unit_of_work` opened inside joins it, and it commits once at the end, then relays the
        outbox rows of all of them. A call that raises writes nothing (its writes are only kept
        when it returns); anything raised out of the block rolls the whole batch back."""
        batch = self.open_batch()
        try:
            with batch.joined():
                yield batch
        except BaseException:
            batch.rollback()
            raise
        batch.commit()

    def open_batch(self) -> "Batch":
        """A batch like `batch`'s whose end its caller chooses (`Batch.commit` or
        `Batch.rollback`); engine calls join it inside `Batch.joined()`. The Kafka bridge fills
        the next batch while this one commits in another thread."""
        session = self.sessions()
        session.begin()
        try:
            return Batch(self, session)
        except BaseException:
            session.close()
            raise

    def workflow_class(self, type_name: str) -> type[Workflow]:
        cls = self.registry.get(type_name)
        if cls is None:
            raise NotFound(f"unknown workflow type '{type_name}'", type=type_name,
                           known=self.registry.names())
        return cls

    # -- start ---------------------------------------------------------------------------------
    def start(self, type_name: str, data: Any, *, key: str | None = None,
              idempotency_key: str | None = None, actor: str = "api",
              answer: bool = True, input_field: str = "") -> tuple[dict[str, Any] | None, bool]:
        """Create an instance, or return the existing one for the same key. (snapshot, created).
        `answer=False`: the caller needs only `created` (the Kafka bridge), so no snapshot is
        built or read and None stands in its place. `input_field`: where `data` sits in the
        caller's request (`input` in POST /saga's body), so that an InvalidInput from the
        workflow's `validate_input` names its dotted path there (`input.youtube_url`); "" when
        `data` is the whole request (a workflow's own endpoint), whose fields are named bare."""
        cls = self.workflow_class(type_name)
        try:
            data = cls.validate_input(data, self.settings)
        except InvalidInput as exc:
            if not input_field:
                raise
            raise InvalidInput(nested_field(input_field, exc.field), exc.problem, exc.status) from None
        # The same input is both history rows' payload (create, start event) and, unless the
        # workflow fingerprints it its own way, the fingerprint: one digest serves all three.
        payload_digest = digest(data)
        fingerprint = _fingerprint(cls, data, payload_digest)
        if key is not None and (found := business_key_problem(key)):
            raise InvalidInput("key", found)
        if idempotency_key is not None:
            _check_idempotency_key(idempotency_key)

        batch = _batch.get()
        if batch is not None and batch.engine is self and key is not None and idempotency_key is None \
                and cls.reuse_within(self.settings) is None:
            existing = None  # the batch's INSERT finds an existing key (Batch.flush)
        else:
            existing = self._find_existing(cls, key, idempotency_key, fingerprint)
        if existing is not None:
            return (self.snapshot(existing) if answer else None), False
        instance_id = str(ids.uuid4())
        try:
            with tracing.span(f"workflow start {cls.type}", tracing.workflow_attributes(instance_id, cls.type, key)), \
                    self.unit_of_work() as uow:
                now = utcnow()
                inst = uow.add_instance(id=instance_id, type=cls.type, business_key=key,
                                        idempotency_key=idempotency_key, fingerprint=fingerprint,
                                        state=None, context={"input": data}, finished=False,
                                        created_at=now, updated_at=now, finished_at=None, version=0,
                                        correlation_id=logs.correlation_id() or logs.new_correlation_id(),
                                        trace_context=tracing.carrier())  # later work links to it
                entry = initial_entry(cls)
                if entry is not None:  # its callbacks (if any) run without a machine
                    machine, entered = None, entry.take(cls, inst, None, self.settings)
                else:  # the start event goes to the machine that entered the initial state
                    machine = entered = cls(model=inst, settings=self.settings)
                self._record(uow, inst, None, "create", data, actor, payload_digest)
                if entered is not None:
                    self._write_messages(uow, inst, entered)
                deadline = cls.timeout(self.settings)
                if deadline is not None:
                    uow.add_timer(instance_id=inst.id, kind="expire", due_at=now + deadline)
                if cls.start_event:
                    self._transition(uow, inst, cls.start_event, data, actor, machine=machine,
                                     payload_digest=payload_digest)
                else:
                    self._enter_step(uow, inst, cls)
        except IntegrityError:
            # A concurrent start with the same key won the race; answer with its instance.
            existing = self._find_existing(cls, key, idempotency_key, fingerprint)
            if existing is None:
                raise
            return (self.snapshot(existing) if answer else None), False
        if not answer:
            return None, True
        # Everything the answer needs was just written: no need to read it back.
        runs = sorted(uow.runs[instance_id].values(), key=lambda r: r.queued_at or now)
        return instance_dict(inst, runs, uow.history, cls), True

    def started_with(self, type_name: str, data: dict[str, Any], idempotency_key: str) -> str | None:
        """The id of the instance of `type_name` an earlier start with this Idempotency-Key made
        from the same request, `data` as `validate_input` returned it; None when no start used the
        key. Conflict (409 naming `Idempotency-Key`) when it was used with a different request.
        For an endpoint that may answer with an instance it did not start (the balance saga's
        running saga of a branch), so that one key never answers two instances."""
        cls = self.workflow_class(type_name)
        _check_idempotency_key(idempotency_key)
        return self._find_existing(cls, None, idempotency_key, _fingerprint(cls, data, digest(data)))

    def _find_existing(self, cls: type[Workflow], key: str | None, idem: str | None,
                       fingerprint: str | None) -> str | None:
        reuse = cls.reuse_within(self.settings)
        # A request that names itself (a business key, an Idempotency-Key) is not answered from
        # the result cache: the cached instance holds neither, so a new key was dropped (a 200
        # with `key: null`) and a header used on a cache hit was not seen as used afterwards.
        if reuse is None or fingerprint is None or not cls.success_states or key is not None or idem is not None:
            reuse = None
            if idem is None and key is None:
                return None
        i = INSTANCES.c
        with self.reading() as conn:
            if idem is not None:
                row = conn.execute(select(i.id, i.fingerprint, i.business_key).where(
                    i.type == cls.type, i.idempotency_key == idem)).first()
                if row is not None:
                    # a different input or business key is a different request (the key is
                    # not in the fingerprint: a new key under a used header made no instance)
                    if (fingerprint is not None and row.fingerprint not in (None, fingerprint)) \
                            or row.business_key != key:
                        raise Conflict("Idempotency-Key was already used with a different request",
                                       field="Idempotency-Key", instance_id=row.id)
                    return row.id  # type: ignore[no-any-return]
            if key is not None:
                found = conn.execute(select(i.id).where(i.type == cls.type, i.business_key == key)).scalar()
                if found is not None:
                    return found  # type: ignore[no-any-return]
            if reuse is not None:
                return conn.execute(select(i.id).where(  # type: ignore[no-any-return]
                    i.type == cls.type, i.fingerprint == fingerprint, i.state.in_(cls.success_states),
                    i.finished_at >= utcnow() - reuse,
                ).order_by(i.finished_at.desc()).limit(1)).scalar()
        return None

    # -- events --------------------------------------------------------------------------------
    def fire(self, instance_id: str, event: str, payload: dict[str, Any] | None = None, *,
             actor: str = "api") -> dict[str, Any]:
        """Fire any event of the workflow with a payload the caller has already checked (the Kafka
        bridge's handlers, the chat callbacks, a workflow's own endpoint). Never pass an event name
        or payload straight from a user: that is `signal`. Raises IllegalTransition (409)."""
        with self.unit_of_work() as uow:
            inst = uow.lock(instance_id)
            self._transition(uow, inst, event, payload or {}, actor)
        return self.snapshot(instance_id)

    def signal(self, instance_id: str, event: str, payload: dict[str, Any] | None = None, *,
               actor: str = "api", within: Callable[[UnitOfWork], None] | None = None) -> dict[str, Any]:
        """A user's signal (`POST /sagas/<id>/events/<event>`, SPEC "signals and human input").

        Only the events the workflow declares in `Workflow.signals` are accepted, each payload
        checked by its declared check under the instance lock. Raises NotFound (404), InvalidInput
        on `event` (400: unknown, or the engine's own event) or on a payload field (400),
        Conflict / IllegalTransition with `state` (409: not allowed now). A refused signal
        changes nothing: no state, step or history row is written. `within`, if given, runs in
        the same transaction after the signal (a bulk operation marks its item done there).
        """
        with self.unit_of_work() as uow:
            inst = uow.lock(instance_id)
            cls = self.workflow_class(inst.type)
            check = cls.signals.get(event)
            if check is None:
                raise InvalidInput("event", _not_a_signal(cls, event))
            self._transition(uow, inst, event, check(dict(payload or {}), inst), actor)
            if within is not None:
                within(uow)
        return self.snapshot(instance_id)

    def _transition(self, uow: UnitOfWork, inst: Record, event: str, payload: dict[str, Any],
                    actor: str, failed_step: bool = False, old_run: Record | None = None,
                    machine: Workflow | None = None, payload_digest: str | None = None) -> None:
        if not tracing.enabled():  # the span's attributes cost more than the rest of a start's move
            self._apply_transition(uow, inst, event, payload, actor, failed_step, old_run, machine, payload_digest)
            return
        attrs = {**tracing.workflow_attributes(inst.id, inst.type, inst.business_key),
                 "workflow.event": event, "workflow.from_state": inst.state or "", "workflow.actor": actor}
        with tracing.span(f"transition {event}", attrs) as span:
            self._apply_transition(uow, inst, event, payload, actor, failed_step, old_run, machine, payload_digest)
            if span is not None:
                span.set_attribute("workflow.to_state", inst.state or "")

    def _apply_transition(self, uow: UnitOfWork, inst: Record, event: str, payload: dict[str, Any],
                          actor: str, failed_step: bool, old_run: Record | None,
                          machine: Workflow | None, payload_digest: str | None = None) -> None:
        cls = self.workflow_class(inst.type)
        if event not in cls.event_names():
            raise InvalidInput("event", f"unknown event '{event}' for workflow '{cls.type}'", status=400)
        before = inst.state
        move = transition_table(cls).get((before, event)) if machine is None else None
        if move is not None:
            # No guard, and only callbacks the table can run itself: building a statemachine
            # instance (about 1 ms) would decide nothing more.
            machine = move.take(cls, inst, payload, self.settings, uow.session)
        else:
            if machine is None:
                machine = cls(model=inst, settings=self.settings, session=uow.session)
            else:
                machine.session = uow.session  # the initial state was entered before there was one
            try:
                machine.send(event, payload=payload)
            except TransitionNotAllowed:
                raise IllegalTransition(inst.id, event, before or "") from None
        after = inst.state
        now = utcnow()
        if machine is not None and machine.context_touched:
            inst.touch("context")
        inst.updated_at = now
        old_step, new_step = cls.step_for_state(before), cls.step_for_state(after)
        # A step declared on several states runs on while the machine moves between them (the
        # progress of one external job, e.g. a chat task's running -> streaming).
        spanning = after != before and old_step is not None and new_step is not None \
            and old_step.name == new_step.name and (uow.step_run(inst.id, old_step.name) or _NO_RUN).status in ACTIVE
        if after != before and not spanning:
            if old_step is not None:
                run = old_run if old_run is not None and old_run.name == old_step.name \
                    else uow.step_run(inst.id, old_step.name)
                if run is not None and run.status in ACTIVE:
                    run.status = (StepStatus.FAILED if failed_step else StepStatus.CANCELLED).value
                    run.finished_at = now
        finished = after in cls.finished_state_ids()
        if finished != inst.finished:
            inst.finished = finished
            inst.finished_at = now if finished else None
            deadline = cls.timeout(self.settings)
            if not finished and deadline is not None:  # restarted: the job gets a new deadline
                uow.add_timer(instance_id=inst.id, kind="expire", due_at=now + deadline)
        self._record(uow, inst, before, event, payload, actor, payload_digest)
        if machine is not None:
            self._write_messages(uow, inst, machine)
        if after != before and not spanning:
            if event == cls.cancel_event:
                self._compensate(uow, inst, cls)
            self._enter_step(uow, inst, cls)

    def _record(self, uow: UnitOfWork, inst: Record, before: str | None, event: str,
                payload: Any, actor: str, payload_digest: str | None = None) -> None:
        """One history row; `payload_digest`: `digest(payload)` when the caller has it already."""
        uow.add_history(instance_id=inst.id, from_state=before, to_state=inst.state, event=event,
                        payload_digest=payload_digest or digest(payload), actor=actor, created_at=utcnow())

    def _write_messages(self, uow: UnitOfWork, inst: Record, machine: Workflow) -> None:
        for channel, target, key, payload in machine.messages:
            uow.add_message(channel, target, payload, instance_id=inst.id, key=key)
        machine.messages.clear()

    # -- steps ---------------------------------------------------------------------------------
    def _enter_step(self, uow: UnitOfWork, inst: Record, cls: type[Workflow]) -> None:
        step = cls.step_for_state(inst.state)
        if step is None:
            return
        run = uow.step_run(inst.id, step.name)
        now = utcnow()
        if run is None:
            run = new_run(inst.id, step)
            uow.add_run(run)
        else:
            # Entering again (a restart): keep completed branches, forget the failed effect.
            run.restarts += 1
            if not step.items_method:
                run.data = {}
        run.attempt += 1
        run.failures = 0
        run.polls = 0
        run.progress = 0.0
        run.error = None
        run.started_at = None
        run.finished_at = None
        run.queued_at = now
        branches = None
        if step.items_method:
            machine = cls(model=inst, settings=self.settings)
            previous = (run.data or {}).get("branches") or []
            if previous:
                branches = [i for i, b in enumerate(previous) if b["status"] != StepStatus.COMPLETED.value]
                for i in branches:
                    previous[i].update(status=StepStatus.QUEUED.value, attempt=previous[i]["attempt"] + 1,
                                       error=None)
                run.failed = 0
            else:
                items = list(getattr(machine, step.items_method)())
                previous = [{"input": item, "status": StepStatus.QUEUED.value, "attempt": 1,
                             "error": None} for item in items]
                branches = list(range(len(items)))
                run.total, run.done, run.failed = len(items), 0, 0
            run.data = {**(run.data or {}), "branches": previous}
            if run.total == 0:
                run.status = StepStatus.COMPLETED.value
                run.finished_at = now
                self._transition(uow, inst, step.join, {"items" if step.external else "branches": []}, "engine")
                return
        run.status = StepStatus.QUEUED.value
        self._dispatch(uow, inst.id, step, run, branches)
        deadline = step.deadline(self.settings)
        if deadline is not None:  # for an external step: how long its items may take
            uow.add_timer(instance_id=inst.id, kind="deadline", step=step.name, attempt=run.attempt,
                          due_at=now + deadline)

    def _dispatch(self, uow: UnitOfWork, instance_id: str, step: Step, run: Record,
                  branches: list[int] | None = None) -> None:
        if step.external is not None:
            self._issue(uow, instance_id, step, run, branches)
            if not step.tasks:  # the workflow sent the requests: only their completions are awaited
                run.started_at = run.started_at or utcnow()  # they went out: the step runs
                if step.external.resend:  # queued under a lease: sent again if nobody answers
                    run.lease_until = utcnow() + timedelta(seconds=self.settings.step_lease_seconds)
                    return
                run.status = StepStatus.WAITING.value
                run.lease_until = None
                if branches is not None:
                    for i in branches:
                        run.data["branches"][i]["status"] = StepStatus.WAITING.value
                return
        args = [instance_id, run.name, run.attempt]
        if branches is not None:
            payload = {"group": [[step.task, args + [i]] for i in branches]}
        elif len(step.tasks) > 1:
            payload = {"chain": [[t, args] for t in step.tasks]}
        else:
            payload = {"task": [step.task, args]}
        uow.add_message("celery", step.tasks[0], payload, instance_id=instance_id)
        run.lease_until = utcnow() + timedelta(seconds=self.settings.step_lease_seconds)
        # A new dispatch may be claimed once more (claim_step); copies of this one may not.
        run.dispatches = (run.dispatches or 0) + 1
        if branches is not None:
            for i in branches:
                run.data["branches"][i]["dispatch"] = run.data["branches"][i].get("dispatch", 0) + 1
            run.touch("data")

    # -- external steps ------------------------------------------------------------------------
    def _issue(self, uow: UnitOfWork, instance_id: str, step: Step, run: Record,
               branches: list[int] | None) -> None:
        """Give each item about to be sent its token for this attempt (kept when the same attempt
        is sent again), recorded on the step row and in step_tokens, and let the workflow emit
        its requests (written to the outbox in this transaction)."""
        ext = step.external
        assert ext is not None
        inst = uow.writes.instances.get(instance_id) or uow.lock(instance_id)
        cls = self.workflow_class(inst.type)
        machine = cls(model=inst, settings=self.settings, session=uow.session) if (ext.send or ext.token) else None
        if run.data is None:
            run.data = {}
        holders = [(-1, run.data)] if branches is None else [(i, run.data["branches"][i]) for i in branches]
        for index, holder in holders:
            attempt = run.attempt if index < 0 else holder["attempt"]
            item = holder.get("input") if index >= 0 else None
            token = holder.get("token") if holder.get("token_attempt") == attempt else None
            if token is None:
                token = getattr(machine, ext.token)(run.name, index, item, run.restarts) if ext.token \
                    else f"{instance_id}:{run.name}:{attempt}:{max(index, 0)}"
                if ext.token or not inst.is_new:
                    # a token of the workflow's own making, or of an earlier attempt, may exist; the
                    # default token of an instance this transaction creates cannot, and a read here
                    # would make a Kafka batch write each start's rows alone (Batch.flush)
                    uow.execute(delete(TOKENS).where(TOKENS.c.token == token))
                uow.writes.add(TOKENS, Record({"token": token, "instance_id": instance_id, "step": run.name,
                                               "branch": index, "attempt": attempt, "created_at": utcnow()},
                                              new=True))
                holder.update(token=token, token_attempt=attempt)
            if ext.send:
                getattr(machine, ext.send)(item, token, attempt)
        run.touch("data")
        if machine is not None:
            if machine.context_touched:
                inst.touch("context")
            self._write_messages(uow, inst, machine)

    def complete_external(self, token: str, ok: bool, output: dict[str, Any] | None = None,
                          error: str | None = None, *, retryable: bool = False, attempt: int | None = None,
                          actor: str = "external") -> str:
        """Report one item of an external step done (`ok`, with `output`) or failed (`error`;
        retried alone by the step's policy when `retryable`, else counted as failed). The step
        row counts its items; when all have completed the step's `join` fires with
        `{"items": [output, ...]}` (one item: with its output). A step whose items have all
        reported with at least one failed fails (its `on_failure`).

        `attempt`, when the completion event carries one, must be the item's current attempt.
        Returns ACCEPTED; DUPLICATE (the item already reported: no effect); STALE (the token is
        of an earlier attempt, or the step no longer waits); UNKNOWN (no such token)."""
        with self.reading() as conn:
            row = conn.execute(select(TOKENS).where(TOKENS.c.token == token)).first()
        if row is None:
            return UNKNOWN
        outcome = UNKNOWN

        def work(uow: UnitOfWork) -> None:
            nonlocal outcome
            inst = uow.lock_with_runs(row.instance_id)
            run = uow.step_run(row.instance_id, row.step) if inst is not None else None
            if inst is None or run is None:
                outcome = UNKNOWN
                return
            outcome = self._complete_item(uow, inst, run, row, ok, output, error, retryable, attempt, actor)

        with logs.context(workflow_id=row.instance_id):
            self._report(None, work)
        return outcome

    def _complete_item(self, uow: UnitOfWork, inst: Record, run: Record, token: Any, ok: bool,
                       output: dict[str, Any] | None, error: str | None, retryable: bool,
                       attempt: int | None, actor: str) -> str:
        branch = None if token.branch < 0 else token.branch
        holder = run.data if branch is None else run.data["branches"][branch]
        current = run.attempt if branch is None else holder["attempt"]
        if token.attempt != current or (attempt is not None and attempt != current) \
                or holder.get("token") != token.token:
            return STALE
        status = run.status if branch is None else holder["status"]
        if status in (StepStatus.COMPLETED.value, StepStatus.FAILED.value):
            return DUPLICATE
        if run.status not in ACTIVE or status not in ACTIVE:
            return STALE
        cls = self.workflow_class(inst.type)
        step = cls.step_named(run.name)[1]  # type: ignore[index]
        if ok:
            self._succeed_run(uow, inst, run, Done(step.join, dict(output or {})), branch, actor)
        else:
            self._fail_run(uow, inst, run, storable("failed" if error is None else error), retryable, branch)
        return ACCEPTED

    def step_awaiting(self, instance_id: str, step: str, attempt: int, branch: int | None = None,
                      basis: Basis | None = None, started: datetime | None = None) -> None:
        """An external step's task sent its request: the step waits for its completion (no
        lease: nothing is lost if no worker hears of it again). A step whose request is sent again
        when no answer comes (`External(resend=True)`) waits under its lease."""
        def work(uow: UnitOfWork) -> None:
            found = self._active_run(uow, instance_id, step, attempt, branch)
            if found is None:
                return
            inst, run = found
            run.started_at = run.started_at or started or utcnow()
            step_def = self.workflow_class(inst.type).step_named(step)
            if step_def is not None and step_def[1].external is not None and step_def[1].external.resend:
                if branch is None:  # its request is out: waiting, but under its lease (sent again
                    run.status = StepStatus.WAITING.value  # if no answer comes in time)
                return
            if branch is None or all(b["status"] != StepStatus.QUEUED.value or i == branch
                                     for i, b in enumerate(run.data["branches"])):
                run.status = StepStatus.WAITING.value
                run.lease_until = None
            if branch is not None:
                run.data["branches"][branch]["status"] = StepStatus.WAITING.value
                run.touch("data")

        self._report(basis, work)

    def find(self, type_name: str, key: str) -> str | None:
        """The id of the instance of `type_name` started with business key `key`, or None."""
        i = INSTANCES.c
        with self.reading() as conn:
            found = conn.execute(select(i.id).where(i.type == type_name, i.business_key == key)).scalar()
        return None if found is None else str(found)

    def claim_step(self, instance_id: str, step: str, attempt: int,
                   branch: int | None = None) -> StepContext | None:
        """Called by a task before doing work: one read, no lock. None means a stale or duplicate
        delivery (the attempt already reported, or a newer one exists): do nothing. A task then
        takes the claim (`take_claim`) so that of two copies of one dispatch only one runs."""
        with self.reads.connect() as conn:
            if self.prepare:
                rows = execute_prepared(conn, CLAIM_SQL, [instance_id]).all()
            else:
                rows = conn.execute(CLAIM, {"id": instance_id}).all()
        return self._step_context(instance_id, step, attempt, branch, rows)

    def claim(self, task: str, instance_id: str, step: str, attempt: int, branch: int | None = None,
              redelivered: bool = False) -> StepContext | None:
        """`claim_step`, then `take_claim`: what a delivery of a step does before its work.
        None: a stale or duplicate delivery, or another delivery holds the claim. On PostgreSQL
        a step that is not a fan-out branch is claimed and read by one prepared statement
        (a branch's dispatch is inside its step row's JSON: two statements, as elsewhere)."""
        if not self.prepare or branch is not None:
            ctx = self.claim_step(instance_id, step, attempt, branch)
            return ctx if ctx is not None and self.take_claim(ctx, task, redelivered) else None
        try:
            with self.reads.begin() as conn:
                rows = execute_prepared(conn, CLAIM_DELIVERY_SQL[redelivered],
                                        [instance_id, step, task, -1, attempt, utcnow()]).all()
        except IntegrityError:  # the instance was deleted meanwhile
            return None
        if not rows or not rows[0][0]:
            return None
        return self._step_context(instance_id, step, attempt, None, [row[1:] for row in rows])

    def claim_successor(self, successor: Successor) -> StepContext | None:
        """The StepContext of a local continuation. Its claim was written by the report that
        dispatched it (`_keep`), so no statement claims it; its basis is that report's rows as
        written (`successor.basis`), read only when they were not all in hand. None: stale."""
        s = successor
        if s.basis is not None:
            ctx = self._context_of(s.instance_id, s.step, s.attempt, None, *s.basis)
        else:
            ctx = self.claim_step(s.instance_id, s.step, s.attempt)
        return ctx if ctx is not None and ctx.dispatch == s.dispatch else None

    def running_locally(self, instance_id: str) -> tuple[str, int] | None:
        """(step, attempt) of the instance's step that a local continuation claimed and has not
        reported: the newest row on the LOCAL channel, marked sent (claimed), whose attempt is
        still active. None when no such step runs (an unclaimed row is left to the sweeper).
        The delivery a local run went on in is the only one that knows of it: when that
        delivery's worker is lost (`steps.report_lost_worker`) or the broker gives the message
        back (`execute_step`, redelivered), this names the step that died with it."""
        o = OUTBOX.c
        with self.reads.connect() as conn:
            row = conn.execute(select(o.payload).where(o.instance_id == instance_id, o.channel == LOCAL,
                                                       o.sent_at.is_not(None))
                               .order_by(o.id.desc()).limit(1)).first()
            if row is None:
                return None
            _, (_, step, attempt) = row[0]["task"]
            active = conn.execute(select(RUNS.c.id).where(
                RUNS.c.instance_id == instance_id, RUNS.c.name == step, RUNS.c.attempt == attempt,
                RUNS.c.status.in_(ACTIVE))).first()
        return (step, attempt) if active is not None else None

    def _step_context(self, instance_id: str, step: str, attempt: int, branch: int | None,
                      rows: Any) -> StepContext | None:
        """The StepContext from the claim's rows (instance columns, then step row columns)."""
        if not rows:
            return None
        k = len(INSTANCE_COLUMNS)
        return self._context_of(instance_id, step, attempt, branch, dict(zip(INSTANCE_COLUMNS, rows[0][:k])),
                                [dict(zip(RUN_COLUMNS, row[k:])) for row in rows if row[k] is not None])

    def _context_of(self, instance_id: str, step: str, attempt: int, branch: int | None,
                    instance: dict[str, Any], runs: list[dict[str, Any]]) -> StepContext | None:
        """The StepContext from the instance's values and its step rows' (None: not active)."""
        run = next((r for r in runs if r["name"] == step), None)
        if run is None or run["attempt"] != attempt or run["status"] not in ACTIVE:
            return None
        dispatch = run["dispatches"]
        token = (run["data"] or {}).get("token")
        if branch is not None:
            b = run["data"]["branches"][branch]
            if b["status"] not in ACTIVE:
                return None
            dispatch = b.get("dispatch", 0)
            token = b.get("token")
        return StepContext(instance_id=instance_id, step=step, attempt=attempt, branch=branch,
                           input=copy.deepcopy((instance["context"] or {}).get("input") or {}),
                           data=copy.deepcopy(run["data"] or {}), polls=run["polls"],
                           restarts=run["restarts"], settings=self.settings, engine=self,
                           basis=(instance, runs), dispatch=dispatch, token=token)

    def take_claim(self, ctx: StepContext, task: str = "", redelivered: bool = False) -> bool:
        """Make this delivery the only one to run this dispatch of the step: copies of one
        outbox row delivered at once would otherwise both call out. False: another delivery
        holds it (or a newer dispatch was claimed), do nothing. `redelivered` (the broker gave
        back a message whose consumer died) takes over the claim of the same dispatch, since
        its holder is gone. `task`: the task running, so each link of a chain claims its own."""
        return self._take_claim(ctx.instance_id, ctx.step, task, ctx.branch, ctx.attempt, ctx.dispatch,
                                redelivered)

    def _take_claim(self, instance_id: str, step: str, task: str, branch: int | None, attempt: int,
                    dispatch: int, takeover: bool) -> bool:
        """INSERT .. ON CONFLICT DO UPDATE .. WHERE the stored claim is older: atomic on both
        databases (a concurrent second upsert waits for the first and then finds it not older).
        Not part of the instance's version: a report on the claim's basis still writes.
        On PostgreSQL one prepared statement."""
        now = utcnow()
        values = [instance_id, step, task, -1 if branch is None else branch, attempt, dispatch, now]
        try:
            if self.prepare:
                with self.reads.begin() as conn:
                    return execute_prepared(conn, _CLAIM_UPSERT_SQL[takeover], values).first() is not None
            with self.reads.begin() as conn:
                return conn.execute(_claim_upsert(self.reads.dialect.name, takeover),
                                    dict(zip(_CLAIM_KEYS, values))).first() is not None
        except IntegrityError:  # the instance was deleted meanwhile
            return False

    def step_outputs(self, instance_id: str) -> dict[str, Any]:
        """Outputs of the instance's completed steps, by step name."""
        with self.reads.connect() as conn:
            rows = conn.execute(select(RUNS.c.name, RUNS.c.data).where(
                RUNS.c.instance_id == instance_id, RUNS.c.status == StepStatus.COMPLETED.value)).all()
        return {name: (data or {}).get("output") for name, data in rows}

    def _active_run(self, uow: UnitOfWork, instance_id: str, step: str, attempt: int,
                    branch: int | None) -> tuple[Record, Record] | None:
        inst = uow.lock_with_runs(instance_id)
        run = uow.step_run(instance_id, step) if inst is not None else None
        if inst is None or run is None or run.attempt != attempt or run.status not in ACTIVE:
            return None
        if branch is not None and run.data["branches"][branch]["status"] not in ACTIVE:
            return None
        return inst, run

    def save_step_data(self, instance_id: str, step: str, attempt: int, data: dict[str, Any],
                       branch: int | None = None) -> None:
        with self.unit_of_work() as uow:
            found = self._active_run(uow, instance_id, step, attempt, branch)
            if found is None:
                return
            _, run = found
            if branch is None:
                run.data = {**(run.data or {}), **data}
            else:
                run.data["branches"][branch].setdefault("data", {}).update(data)
                run.touch("data")

    def step_progress(self, instance_id: str, step: str, attempt: int, poll: Poll,
                      branch: int | None = None, basis: Basis | None = None, started: datetime | None = None) -> None:
        """Record progress and re-arm a timer; the step gives its worker slot back meanwhile.
        `started`: when the task began to run the step (the step's `started_at` if it has none)."""
        self._report(basis, lambda uow: self._progress(uow, instance_id, step, attempt, poll, branch, started))

    def _progress(self, uow: UnitOfWork, instance_id: str, step: str, attempt: int, poll: Poll,
                  branch: int | None, started: datetime | None) -> None:
        found = self._active_run(uow, instance_id, step, attempt, branch)
        if found is None:
            return
        _, run = found
        run.started_at = run.started_at or started or utcnow()
        if poll.progress is not None:
            run.progress = max(0.0, min(100.0, float(poll.progress)))
        if poll.data:
            run.data = {**(run.data or {}), **poll.data}
        run.polls += 1
        run.failures = 0
        run.status = StepStatus.WAITING.value
        run.lease_until = None
        t = TIMERS.c
        armed = uow.execute(select(t.id).where(
            t.instance_id == instance_id, t.step == step, t.attempt == attempt, t.kind == "poll",
            t.fired_at.is_(None), t.branch.is_(None) if branch is None else t.branch == branch
        ).limit(1)).first()
        if armed is not None:
            return  # a duplicate delivery polled too; one timer is enough
        uow.add_timer(instance_id=instance_id, kind="poll", step=step, attempt=attempt, branch=branch,
                      due_at=utcnow() + timedelta(seconds=poll.after))

    def step_succeeded(self, instance_id: str, step: str, attempt: int, done: Done,
                       branch: int | None = None, actor: str = "worker", basis: Basis | None = None,
                       keep: Callable[[Record], bool] | None = None,
                       started: datetime | None = None) -> list[Successor]:
        """Fire the step's event (a branch's: count it, and fire the join when all are in).
        `keep` (see `unit_of_work`) picks the successor's message its caller runs locally; the
        successors kept are returned. `started`: when the task began to run the step, the
        step's `started_at` if it has none (a step done in one delivery had its report's time,
        and a duration of 0)."""
        return self._report(basis, lambda uow: self._succeed(uow, instance_id, step, attempt, done, branch, actor,
                                                             started), keep)

    def _report(self, basis: Basis | None, work: Callable[[UnitOfWork], None],
                keep: Callable[[Record], bool] | None = None) -> list[Successor]:
        """A step's report, written on `basis` (what the step read when it was claimed) without
        the lock if the instance has not changed since, else again under the lock. The outbox
        rows `keep` chose are returned (see `unit_of_work`)."""
        if basis is not None:
            try:
                with self.unit_of_work(basis, keep) as uow:
                    work(uow)
                return uow.kept
            except StaleBasis:
                log.debug("instance %s changed since its step was claimed; reporting under the lock",
                          basis[0]["id"])
        with self.unit_of_work(keep=keep) as uow:
            work(uow)
        return uow.kept

    def _succeed(self, uow: UnitOfWork, instance_id: str, step: str, attempt: int, done: Done,
                 branch: int | None, actor: str, started: datetime | None = None) -> None:
        found = self._active_run(uow, instance_id, step, attempt, branch)
        if found is None:
            if branch is None:
                self._completed_after_cancel(uow, instance_id, step, attempt, done, started)
            return
        self._succeed_run(uow, *found, done, branch, actor, started)

    def _completed_after_cancel(self, uow: UnitOfWork, instance_id: str, step: str, attempt: int, done: Done,
                                started: datetime | None) -> None:
        """A step still running when its instance was cancelled (its run `cancelled`, the
        instance in a cancelled state) reports that it did its work after all: the cancel could
        not undo what had not happened yet, so the step is recorded completed and, if it
        declares a compensation, compensated with the others (newest first: after any under
        way). No transition: the instance stays cancelled."""
        inst, run = uow.writes.instances.get(instance_id), uow.runs.get(instance_id, {}).get(step)
        if inst is None or run is None or run.attempt != attempt or run.status != StepStatus.CANCELLED.value:
            return
        cls = self.workflow_class(inst.type)
        found = cls.step_named(step)
        if cls.status_of(inst.state) != "cancelled" or found is None or not found[1].compensate:
            return
        log.warning("step %s of %s completed after the instance was cancelled; its compensation follows",
                    step, instance_id)
        run.status = StepStatus.COMPLETED.value
        run.data = {**(run.data or {}), "output": done.output}
        run.progress = 100.0
        run.started_at = run.started_at or started
        run.finished_at = utcnow()
        self._compensate(uow, inst, cls)

    def _succeed_run(self, uow: UnitOfWork, inst: Record, run: Record, done: Done, branch: int | None,
                     actor: str, started: datetime | None = None) -> None:
        cls = self.workflow_class(inst.type)
        step = run.name
        now = utcnow()
        run.started_at = run.started_at or started
        if branch is not None:
            b = run.data["branches"][branch]
            b.update(status=StepStatus.COMPLETED.value, output=done.output, error=None, finished_at=now.isoformat())
            run.touch("data")
            run.done += 1
            if run.done < run.total:
                if run.done + run.failed == run.total:
                    self._fail_step(uow, inst, cls, run, _branches_failed(run))
                return
            found_step = cls.step_named(step)[1]  # type: ignore[index]
            outputs = [x.get("output") for x in run.data["branches"]]
            event = found_step.join
            payload = {"items": outputs} if found_step.external else {"branches": outputs}
        else:
            run.data = {**(run.data or {}), "output": done.output}
            event, payload = done.event, done.output
        run.status = StepStatus.COMPLETED.value
        run.progress = 100.0
        run.started_at = run.started_at or now
        run.finished_at = now
        run.lease_until = None
        if run.error is not None:  # an earlier attempt's: a completed step has failed at nothing
            run.error = None
        self._transition(uow, inst, event, payload, actor, old_run=run)

    def step_failed(self, instance_id: str, step: str, attempt: int, error: str, retryable: bool,
                    branch: int | None = None, basis: Basis | None = None, started: datetime | None = None) -> None:
        """Retry after a backoff timer if the policy allows, else fail the step for good.
        `started`: when the task began to run the step (the step's `started_at` if it has none)."""
        error = storable(error)  # it quotes others' text (a service, git, GitLab): keep it storable
        self._report(basis, lambda uow: self._fail(uow, instance_id, step, attempt, error, retryable, branch,
                                                   started))

    def _fail(self, uow: UnitOfWork, instance_id: str, step: str, attempt: int, error: str,
              retryable: bool, branch: int | None, started: datetime | None = None) -> None:
        found = self._active_run(uow, instance_id, step, attempt, branch)
        if found is None:
            return
        run = found[1]
        run.started_at = run.started_at or started or utcnow()  # it ran, up to its failure
        self._fail_run(uow, *found, error, retryable, branch)

    def _fail_run(self, uow: UnitOfWork, inst: Record, run: Record, error: str, retryable: bool,
                  branch: int | None) -> None:
        cls = self.workflow_class(inst.type)
        instance_id, step, attempt = inst.id, run.name, run.attempt
        policy = cls.step_named(step)[1].policy(self.settings)  # type: ignore[index]
        run.failures += 1
        run.error = error[:2000]
        if policy.should_retry(run.failures, retryable):
            delay = policy.delay(run.failures)
            run.status = StepStatus.WAITING.value
            run.lease_until = None
            if branch is not None:
                run.data["branches"][branch].update(status=StepStatus.WAITING.value, error=error)
                run.touch("data")
            uow.add_timer(instance_id=instance_id, kind="retry", step=step, attempt=attempt,
                          branch=branch, due_at=utcnow() + timedelta(seconds=delay))
            log.info("step %s of %s failed (%s); retry %d in %.1fs", step, instance_id, error,
                     run.failures, delay)
            return
        if branch is not None:
            run.data["branches"][branch].update(status=StepStatus.FAILED.value, error=error,
                                                finished_at=utcnow().isoformat())
            run.touch("data")
            run.failed += 1
            if run.done + run.failed < run.total:
                return  # the others may still finish; the step fails when all have reported
            error = _branches_failed(run)
        self._fail_step(uow, inst, cls, run, error)

    def _fail_step(self, uow: UnitOfWork, inst: Record, cls: type[Workflow], run: Record,
                   error: str) -> None:
        step = cls.step_named(run.name)[1]  # type: ignore[index]
        run.status = StepStatus.FAILED.value
        run.error = error[:2000]
        run.finished_at = utcnow()
        run.lease_until = None
        payload: dict[str, Any] = {"step": run.name, "error": error}
        if step.items_method:  # which items failed, for the workflow's own account of it
            payload["failed"] = [{"index": i, "input": b.get("input"), "token": b.get("token"), "error": b.get("error")}
                                 for i, b in enumerate((run.data or {}).get("branches") or [])
                                 if b["status"] == StepStatus.FAILED.value]
        self._transition(uow, inst, step.on_failure, payload, "engine", failed_step=True, old_run=run)

    def outbox_failed(self, message_id: str, error: str) -> bool:
        """An outbox row that can never be published (the relay's permanent error): mark it
        failed and fail the step it belongs to, in one transaction. A step message fails its
        step (no retry: the same message would fail again); a workflow's own message goes the
        way its class's `message_failed` says, else fails the current state's step. False if
        the row was already sent or failed."""
        with self.unit_of_work() as uow:
            row = uow.execute(select(OUTBOX).where(OUTBOX.c.message_id == message_id)).first()
            if row is None or row.sent_at is not None or row.failed_at is not None:
                return False
            inst = uow.lock_with_runs(row.instance_id) if row.instance_id else None
            done = uow.execute(update(OUTBOX).where(OUTBOX.c.id == row.id, OUTBOX.c.sent_at.is_(None),
                                                    OUTBOX.c.failed_at.is_(None))
                               .values(failed_at=utcnow(), last_error=error[:2000],
                                       publish_attempts=OUTBOX.c.publish_attempts + 1)).rowcount
            if done != 1 or inst is None or inst.finished:
                return done == 1
            reason = f"message to {row.target} could not be published: {error}"
            with logs.context(workflow_id=inst.id):
                self._message_failed(uow, inst, row, reason)
            return True

    def _message_failed(self, uow: UnitOfWork, inst: Record, row: Any, reason: str) -> None:
        cls = self.workflow_class(inst.type)
        run = None
        if row.channel in ("celery", LOCAL):
            p = row.payload or {}
            calls = [p["task"]] if "task" in p else p.get("chain") or p.get("group") or []
            if calls and len(calls[0][1]) >= 3:
                _, step, attempt = calls[0][1][:3]
                run = uow.step_run(inst.id, step)
                if run is not None and run.attempt != attempt:
                    run = None
        else:
            found = cls.message_failed(inst.context or {}, row.target, row.payload or {}, reason)
            if isinstance(found, ItemFailed):  # one item's request: that item fails, the rest go on
                token = uow.execute(select(TOKENS).where(TOKENS.c.token == found.token)).first()
                run = uow.step_run(inst.id, token.step) if token is not None else None
                if token is None or run is None or token.instance_id != inst.id or \
                        self._complete_item(uow, inst, run, token, False, None, found.error, False, None,
                                            "engine") != ACCEPTED:
                    log.warning("instance %s: %s (its item no longer waits)", inst.id, reason)
                return
            if found is not None:
                event, payload = found
                try:
                    self._transition(uow, inst, event, payload, "engine")
                except IllegalTransition:
                    log.warning("instance %s: %s not allowed after a failed message", inst.id, event)
                return
            step = cls.step_for_state(inst.state)
            run = uow.step_run(inst.id, step.name) if step is not None else None
        if run is None or run.status not in ACTIVE:
            log.error("instance %s: %s (no active step to fail)", inst.id, reason)
            return
        self._fail_step(uow, inst, cls, run, reason)

    # -- restart and cancel --------------------------------------------------------------------
    def restart(self, instance_id: str, step: str, actor: str = "api",
                within: Callable[[UnitOfWork], None] | None = None,
                running_after: timedelta | None = None) -> dict[str, Any]:
        """Restart a failed (or cancelled) step. Raises NotFound, InvalidInput on `step`, Conflict
        (409) unless the step failed. `within` runs in the same transaction (see `signal`).

        `running_after`: a step still running (an external step whose replies were lost) whose
        attempt was queued at least that long ago is first failed as an abandoned attempt, then
        restarted, in one transaction; an external step's items that completed are kept, the
        others are requested again under the next attempt. A younger running attempt is a 409:
        checked under the instance's lock, so restarts sent together (a double click, a retrying
        client) restart once instead of abandoning each other's attempts."""
        with self.unit_of_work() as uow:
            inst = uow.lock(instance_id)
            cls = self.workflow_class(inst.type)
            if not isinstance(step, str) or cls.step_named(step) is None:
                raise InvalidInput("step", unknown_step(step, [s.name for s in cls.step_table().values()]))
            run = uow.step_run(instance_id, step)
            if running_after is not None and run is not None and run.status in ACTIVE:
                since = run.queued_at or run.started_at
                waited = utcnow() - as_utc(since) if since is not None else running_after
                if waited < running_after:
                    raise Conflict(f"step '{step}' attempt {run.attempt} was queued {waited.total_seconds():.0f}s ago "
                                   f"and still runs; a running attempt can be restarted once it has run "
                                   f"{running_after.total_seconds():g}s", state=inst.state, step_status=run.status)
                self._fail_step(uow, inst, cls, run, f"attempt {run.attempt} abandoned by a restart")
            if run is None or run.status not in (StepStatus.FAILED.value, StepStatus.CANCELLED.value):
                raise Conflict(f"step '{step}' is {run.status if run else 'not started'}; only a failed "
                               "step can be restarted", state=inst.state,
                               step_status=run.status if run else None)
            status, run.status = run.status, StepStatus.PENDING.value
            # later work on the instance: its own trace (the request's), linked to the first one
            with tracing.span(f"workflow restart {step}", tracing.workflow_attributes(
                    inst.id, inst.type, inst.business_key, step, run.attempt + 1), link=inst.trace_context):
                try:
                    self._transition(uow, inst, cls.restart_event, {"step": step}, actor)
                except IllegalTransition:  # said as the operation asked for, not as the engine's event
                    raise Conflict(f"step '{step}' is {status}, but workflow '{cls.type}' cannot restart it "
                                   f"in state '{inst.state}'", state=inst.state, step=step,
                                   step_status=status) from None
            if within is not None:
                within(uow)
        return self.snapshot(instance_id)

    def cancel(self, instance_id: str, actor: str = "api",
               within: Callable[[UnitOfWork], None] | None = None) -> dict[str, Any]:
        """Cancel; compensations follow. Raises NotFound, Conflict (409, with `state`) when the
        type or its state does not allow it. `within` runs in the same transaction (see `signal`)."""
        with self.unit_of_work() as uow:
            inst = uow.lock(instance_id)
            cls = self.workflow_class(inst.type)
            if cls.cancel_event not in cls.event_names():
                raise Conflict(f"workflow '{cls.type}' cannot be cancelled", state=inst.state)
            try:
                self._transition(uow, inst, cls.cancel_event, {}, actor)
            except IllegalTransition:  # said as the operation asked for, not as the engine's event
                raise Conflict(f"workflow '{cls.type}' cannot be cancelled in state '{inst.state}'",
                               state=inst.state) from None
            if within is not None:
                within(uow)
        return self.snapshot(instance_id)

    def _compensate(self, uow: UnitOfWork, inst: Record, cls: type[Workflow]) -> bool:
        """Send the next compensation: completed steps that declare one, newest first, one at a
        time; each is retried by its own policy and reports on its own, so one that fails does not
        keep the others from running. False when none is left to send."""
        runs = uow.all_runs(inst.id).values()
        if any(r.status == StepStatus.COMPENSATING.value for r in runs):
            return True  # one at a time: the next goes when this one has reported
        done = sorted((r for r in runs if r.status == StepStatus.COMPLETED.value),
                      key=lambda r: (r.queued_at or datetime.min.replace(tzinfo=timezone.utc), r.id or 0),
                      reverse=True)
        for run in done:
            found = cls.step_named(run.name)
            if found and found[1].compensate:
                run.status = StepStatus.COMPENSATING.value
                run.attempt += 1  # the compensation's own delivery key
                run.failures = 0
                run.error = None
                self._dispatch_compensation(uow, inst.id, found[1], run)
                return True
        return False

    def _dispatch_compensation(self, uow: UnitOfWork, instance_id: str, step: Step, run: Record) -> None:
        uow.add_message("celery", step.compensate, {"task": [step.compensate, [instance_id, run.name, run.attempt]]},
                        instance_id=instance_id)
        run.lease_until = utcnow() + timedelta(seconds=self.settings.step_lease_seconds)

    def claim_compensation(self, instance_id: str, step: str, attempt: int) -> StepContext | None:
        """What a compensation task gets; None for a stale or duplicate delivery."""
        with self.reads.connect() as conn:
            inst = conn.execute(INSTANCE, {"id": instance_id}).first()
            run = conn.execute(RUNS_OF.where(RUNS.c.name == step), {"id": instance_id}).first()
        if inst is None or run is None or run.attempt != attempt or run.status != StepStatus.COMPENSATING.value:
            return None
        return StepContext(instance_id=instance_id, step=step, attempt=attempt, branch=None,
                           input=copy.deepcopy((inst.context or {}).get("input") or {}),
                           data=copy.deepcopy(run.data or {}), polls=0, restarts=run.restarts,
                           settings=self.settings, engine=self)

    def compensated(self, instance_id: str, step: str, attempt: int) -> bool:
        """Mark a step compensated and send the next compensation; False if this delivery was
        stale or a duplicate."""
        with self.unit_of_work() as uow:
            found = self._compensating_run(uow, instance_id, step, attempt)
            if found is None:
                return False
            inst, run, cls = found
            run.status = StepStatus.COMPENSATED.value
            run.lease_until = None
            self._compensate(uow, inst, cls)
            return True

    def compensation_failed(self, instance_id: str, step: str, attempt: int, error: str,
                            retryable: bool) -> None:
        """Retry the compensation after a backoff timer if its policy allows; else mark the step
        `compensation_failed` with the error and send the next compensation."""
        with self.unit_of_work() as uow:
            found = self._compensating_run(uow, instance_id, step, attempt)
            if found is None:
                return
            inst, run, cls = found
            policy = cls.step_named(step)[1].compensation_policy(self.settings)  # type: ignore[index]
            run.failures += 1
            run.error = error[:2000]
            run.lease_until = None
            if policy.should_retry(run.failures, retryable):
                delay = policy.delay(run.failures)
                uow.add_timer(instance_id=instance_id, kind="compensate", step=step, attempt=attempt,
                              due_at=utcnow() + timedelta(seconds=delay))
                log.info("compensation of step %s of %s failed (%s); retry %d in %.1fs", step, instance_id,
                         error, run.failures, delay)
                return
            log.warning("compensation of step %s of %s failed for good: %s", step, instance_id, error)
            run.status = StepStatus.COMPENSATION_FAILED.value
            self._compensate(uow, inst, cls)

    def _compensating_run(self, uow: UnitOfWork, instance_id: str, step: str,
                          attempt: int) -> tuple[Record, Record, type[Workflow]] | None:
        inst = uow.lock_with_runs(instance_id)
        run = uow.step_run(instance_id, step) if inst is not None else None
        if inst is None or run is None or run.attempt != attempt or run.status != StepStatus.COMPENSATING.value:
            return None
        return inst, run, self.workflow_class(inst.type)

    # -- sweeper -------------------------------------------------------------------------------
    def fire_due_timers(self, limit: int = 1000, batch: int = 100) -> int:
        """Turn due timers into dispatches and events: up to `batch` timers per transaction, at
        most `limit` per call; the number fired. Safe with several sweepers: on PostgreSQL each
        claims its batch with SKIP LOCKED, on SQLite BEGIN IMMEDIATE runs one batch at a time.
        A batch that raises is fired again one timer per transaction, so one bad timer holds
        back no other."""
        fired = 0
        while fired < limit:
            try:
                count, claimed = self._fire_timer_batch(min(batch, limit - fired))
            except Exception:
                log.warning("firing a batch of timers failed; firing them one at a time", exc_info=True)
                count, claimed = self._fire_timer_batch(1)
            fired += count
            if claimed < batch or count == 0:
                return fired
        return fired

    def _fire_timer_batch(self, size: int) -> tuple[int, int]:
        """Fire up to `size` due timers in one transaction: (fired, claimed). A second due timer
        of an instance already in the batch waits for the next one: the batch holds one copy
        of each instance row, so the later timer sees what the earlier one wrote."""
        with self.unit_of_work() as uow:
            rows = uow.execute(
                select(TIMERS).where(TIMERS.c.fired_at.is_(None), TIMERS.c.due_at <= utcnow())
                .order_by(TIMERS.c.due_at).limit(size).with_for_update(skip_locked=True)).all()
            first: dict[str, Any] = {}
            for row in rows:
                first.setdefault(row.instance_id, row)
            if not first:
                return 0, len(rows)
            ids = sorted(first)
            # A few statements for the whole batch instead of a few per timer: mark the timers
            # fired, lock their instances (in id order, as every sweeper does, so two batches
            # cannot deadlock), then read their step rows (after the lock: see lock_with_runs).
            uow.execute(update(TIMERS).where(TIMERS.c.id.in_([r.id for r in first.values()]))
                        .values(fired_at=utcnow()))
            instances = {row.id: uow.writes.track(INSTANCES, Record.loaded(row)) for row in uow.execute(
                select(INSTANCES).where(INSTANCES.c.id.in_(ids)).order_by(INSTANCES.c.id).with_for_update())}
            for instance_id in ids:
                uow.runs[instance_id] = {}
            for row in uow.execute(select(RUNS).where(RUNS.c.instance_id.in_(ids))):
                uow.runs[row.instance_id][row.name] = uow.writes.track(RUNS, Record.loaded(row))
            for instance_id in ids:
                inst = instances.get(instance_id)
                if inst is None:  # deleted since: its timer is spent
                    continue
                with logs.context(workflow_id=instance_id):
                    self._fire_timer(uow, Record.loaded(first[instance_id]), inst)
        return len(first), len(rows)

    def _fire_timer(self, uow: UnitOfWork, timer: Record, inst: Record) -> None:
        # A timer is work started later: a trace of its own, linked to the instance's first one.
        with tracing.span(f"timer {timer.kind}", tracing.workflow_attributes(
                inst.id, inst.type, inst.business_key, timer.step, timer.attempt),
                link=inst.trace_context, new_trace=True):
            self._on_timer(uow, inst, timer)

    def _on_timer(self, uow: UnitOfWork, inst: Record, timer: Record) -> None:
        cls = self.workflow_class(inst.type)
        if timer.kind == "compensate":  # the instance is finished (cancelled) by then
            run = uow.step_run(inst.id, timer.step or "")
            found = cls.step_named(timer.step or "")
            if run is not None and found and run.attempt == timer.attempt \
                    and run.status == StepStatus.COMPENSATING.value:
                run.attempt += 1
                self._dispatch_compensation(uow, inst.id, found[1], run)
            return
        if inst.finished:
            return
        if timer.kind == "expire":
            self._expire(uow, inst, cls)
            return
        run = uow.step_run(inst.id, timer.step or "")
        if run is None or run.attempt != timer.attempt or run.status not in ACTIVE:
            return
        step = cls.step_named(run.name)[1]  # type: ignore[index]
        if timer.kind == "deadline":
            deadline = step.deadline(self.settings)
            seconds = deadline.total_seconds() if deadline else 0
            self._fail_step(uow, inst, cls, run, f"step timed out after {seconds:g}s")
        elif timer.kind in ("retry", "poll"):
            run.status = StepStatus.QUEUED.value
            branches = None
            if timer.branch is not None:
                # Branches share the step's attempt; a branch retry counts on the branch alone.
                branch = run.data["branches"][timer.branch]
                branch["status"] = StepStatus.QUEUED.value
                if timer.kind == "retry":
                    branch["attempt"] += 1
                run.touch("data")
                branches = [timer.branch]
            elif timer.kind == "retry":
                run.attempt += 1  # a new delivery key: the old message, if it comes back, is stale
            self._dispatch(uow, inst.id, step, run, branches)

    def _expire(self, uow: UnitOfWork, inst: Record, cls: type[Workflow]) -> None:
        limit = cls.timeout(self.settings)
        error = f"job timed out after {limit.total_seconds() / 60:g} minutes" if limit else "timed out"
        step = cls.step_for_state(inst.state)
        run = uow.step_run(inst.id, step.name) if step else None
        if run is not None and run.status in ACTIVE:
            self._fail_step(uow, inst, cls, run, error)
            return
        failure = step.on_failure if step else "fail"
        if failure in cls.event_names():
            try:
                self._transition(uow, inst, failure, {"error": error}, "engine")
            except IllegalTransition:
                log.warning("instance %s expired in state %s with no way to fail", inst.id, inst.state)
                return
            # No step failed, so no step row holds the reason: the context's `error`, where
            # `GET /sagas?error=` and the console look, gets it unless a callback wrote one.
            if isinstance(inst.context, dict) and not inst.context.get("error"):
                inst.context["error"] = error
                inst.touch("context")

    def redispatch_expired_leases(self) -> int:
        """A dispatched step not heard of within its lease lost its message or worker: deliver it again."""
        count = 0
        with self.unit_of_work() as uow:
            # The instance is locked too (its version is bumped), and skipped while another
            # transaction holds it: waiting for it while holding the step row could deadlock.
            rows = uow.execute(
                select(RUNS, INSTANCES.c.type, INSTANCES.c.business_key, INSTANCES.c.trace_context)
                .join(INSTANCES, INSTANCES.c.id == RUNS.c.instance_id)
                .where(RUNS.c.status.in_((StepStatus.QUEUED.value, StepStatus.WAITING.value,
                                          StepStatus.COMPENSATING.value)),
                       RUNS.c.lease_until < utcnow())  # a waiting step has a lease if its request is resent
                .limit(100).with_for_update(of=(RUNS, INSTANCES), skip_locked=True)).all()
            for row in rows:
                run = uow.writes.track(RUNS, Record({c.name: row._mapping[c] for c in RUNS.c}))
                cls = self.workflow_class(row._mapping[INSTANCES.c.type])
                found = cls.step_named(run.name)
                if found is None:
                    continue
                with tracing.span(f"lease expired {run.name}", tracing.workflow_attributes(
                        run.instance_id, cls.type, row._mapping[INSTANCES.c.business_key], run.name, run.attempt),
                        link=row._mapping[INSTANCES.c.trace_context], new_trace=True):
                    count += self._redispatch(uow, cls, run, found[1])
        return count

    def resend_awaited_requests(self) -> int:
        """Let the lease of every step that waits, under a lease, for the answer to a request it
        sent (`External(resend=True)`, e.g. the balance saga's calculations) run out now: the
        sweeper sends those requests again at once instead of STEP_LEASE_SECONDS later. For a
        start on the embedded broker, which never hands out again a message that a process killed
        with kill -9 had fetched: a request the other side had taken was lost with it. The other
        side treats a repeat as one request (the contract of `resend`), and no worker runs these
        steps meanwhile (their task has returned), so nothing runs twice. Returns how many."""
        now = utcnow()
        with self.unit_of_work() as uow:
            rows = uow.execute(
                select(RUNS.c.instance_id, RUNS.c.name, INSTANCES.c.type)
                .join(INSTANCES, INSTANCES.c.id == RUNS.c.instance_id)
                .where(RUNS.c.status == StepStatus.WAITING.value, RUNS.c.lease_until > now)).all()
            awaited = [(row.instance_id, row.name) for row in rows
                       if (cls := self.registry.get(row.type)) is not None
                       and (found := cls.step_named(row.name)) is not None
                       and found[1].external is not None and found[1].external.resend]
            for instance_id, name in awaited:
                uow.execute(update(RUNS).where(RUNS.c.instance_id == instance_id, RUNS.c.name == name,
                                               RUNS.c.status == StepStatus.WAITING.value)
                            .values(lease_until=now))
        return len(awaited)

    def _redispatch(self, uow: UnitOfWork, cls: type[Workflow], run: Record, step: Step) -> int:
        """Deliver a step (or compensation) whose lease ran out again; 1 if it was sent."""
        if run.status == StepStatus.COMPENSATING.value:
            if not step.compensate:
                return 0
            self._dispatch_compensation(uow, run.instance_id, step, run)
            return 1
        run.lease_until = utcnow() + timedelta(seconds=self.settings.step_lease_seconds)
        run.status = StepStatus.QUEUED.value  # dispatched again: queued until its next report
        branches = None
        if step.items_method:
            branches = [i for i, b in enumerate(run.data["branches"])
                        if b["status"] == StepStatus.QUEUED.value or
                        (b["status"] in ACTIVE and not step.external)]
        self._dispatch(uow, run.instance_id, step, run, branches)
        return 1

    # -- reads ---------------------------------------------------------------------------------
    def snapshot(self, instance_id: str, history: bool = True) -> dict[str, Any]:
        with self.reading() as conn:
            inst = conn.execute(INSTANCE, {"id": instance_id}).first()
            if inst is None:
                raise NotFound(f"instance {instance_id} not found", instance_id=instance_id)
            runs = conn.execute(RUNS_OF.order_by(RUNS.c.queued_at, RUNS.c.id), {"id": instance_id}).all()
            entries = conn.execute(select(HISTORY).where(HISTORY.c.instance_id == instance_id)
                                   .order_by(HISTORY.c.id)).all() if history else None
            return instance_dict(inst, runs, entries, self.registry.get(inst.type))

    def list(self, flt: "InstanceFilter | str | None" = None, state: str | None = None, limit: int = 50,
             offset: int = 0) -> tuple[int, list[dict[str, Any]]]:
        """(total, a page of instances) matching `flt` (see `InstanceFilter`), newest first.
        The older form `list(type_name, state, limit, offset)` is kept for callers that filter by
        type and state only. Raises InvalidInput naming the filter field at fault."""
        if flt is None or isinstance(flt, str):
            flt = Filter(type=flt, state=state)
        q = self._matching(flt)
        with self.reads.connect() as conn:
            total = conn.execute(select(func.count()).select_from(q.subquery())).scalar_one()
            rows = conn.execute(q.order_by(INSTANCES.c.created_at.desc(), INSTANCES.c.id)
                                .limit(limit).offset(offset)).all()
            return total, [instance_dict(r, None, None, self.registry.get(r.type)) for r in rows]

    def match(self, flt: "InstanceFilter", limit: int = 50) -> list[dict[str, Any]]:
        """Up to `limit` instances matching `flt`, newest first (as `list` shows them)."""
        return self.list(flt, limit=limit)[1]

    def match_ids(self, flt: "InstanceFilter") -> list[str]:
        """The id of every instance matching `flt`, newest first (what a bulk operation acts
        on). Raises InvalidInput naming the filter field at fault."""
        q = self._matching(flt).with_only_columns(INSTANCES.c.id)
        with self.reads.connect() as conn:
            return list(conn.execute(q.order_by(INSTANCES.c.created_at.desc(), INSTANCES.c.id)).scalars())

    def check_filter(self, flt: "InstanceFilter") -> None:
        """Raise InvalidInput naming the filter field at fault, as `list` would (no query runs):
        for a page that renders the filter before its rows are fetched."""
        self._matching(flt)

    def _matching(self, flt: "InstanceFilter") -> Any:
        """The SELECT of instances matching `flt`, after checking the names it uses."""
        type_name = flt.type or None
        if type_name and self.registry.get(type_name) is None:
            raise InvalidInput("type", f"unknown workflow type '{type_name}'; known: "
                               + ", ".join(self.registry.names()))
        statuses = {s.value for s in StepStatus}
        step_status = getattr(flt.step_status, "value", flt.step_status) or None
        if step_status and step_status not in statuses:
            raise InvalidInput("step_status", f"unknown step status '{step_status}'; known: "
                               + ", ".join(sorted(statuses)))
        types = [type_name] if type_name else self.registry.names()
        where = f"workflow '{type_name}'" if type_name else "any workflow"
        if flt.state:
            states = {s.id for t in types for s in self.workflow_class(t).states}
            if flt.state not in states:
                raise InvalidInput("state", f"no state '{flt.state}' in {where}; states: " + ", ".join(sorted(states)))
        if flt.step:
            names = {s.name for t in types for s in self.workflow_class(t).step_table().values()}
            if flt.step not in names:
                raise InvalidInput("step", f"no step '{flt.step}' in {where}; steps: " + ", ".join(sorted(names)))
        status = flt.status
        if status and status not in INSTANCE_STATUSES:
            raise InvalidInput("status", f"unknown status '{status}'; known: " + ", ".join(INSTANCE_STATUSES))
        q = select(INSTANCES)
        if type_name:
            q = q.where(INSTANCES.c.type == type_name)
        if flt.state:
            q = q.where(INSTANCES.c.state == flt.state)
        if status:
            # Each type names its own states for a status (route_content's failures are tts_failed and story_failed).
            per_type = [and_(INSTANCES.c.type == t, INSTANCES.c.state.in_(sorted(states))) for t in types
                        if (states := self.workflow_class(t).states_with_status(status))]
            q = q.where(or_(*per_type) if per_type else false())
        if flt.key is not None:
            q = q.where(INSTANCES.c.business_key == flt.key)
        if flt.created_after is not None:
            q = q.where(INSTANCES.c.created_at >= as_utc(flt.created_after))
        if flt.created_before is not None:
            q = q.where(INSTANCES.c.created_at < as_utc(flt.created_before))
        if flt.step or step_status:
            run = select(RUNS.c.id).where(RUNS.c.instance_id == INSTANCES.c.id)
            if flt.step:
                run = run.where(RUNS.c.name == flt.step)
            if step_status:
                run = run.where(RUNS.c.status == step_status)
            q = q.where(run.exists())
        if flt.error:
            # An instance's failure message is its context's "error" (set by the workflow's
            # failure callback); a step's is its row's `error`.
            needle = flt.error.lower()
            failed_step = (select(RUNS.c.id).where(RUNS.c.instance_id == INSTANCES.c.id)
                           .where(func.lower(RUNS.c.error).contains(needle, autoescape=True)))
            q = q.where(or_(func.lower(INSTANCES.c.context["error"].as_string()).contains(needle, autoescape=True),
                            failed_step.exists()))
        return q

    def counts(self, type_name: str | None = None) -> dict[str, dict[str, int]]:
        """{type: {state: number of instances}}, every state of each registered type present
        (0 when none is there), plus any state stored that the machine no longer has."""
        names = [type_name] if type_name else self.registry.names()
        out = {n: {s.id: 0 for s in self.workflow_class(n).states} for n in names}
        q = select(INSTANCES.c.type, INSTANCES.c.state, func.count()).group_by(INSTANCES.c.type, INSTANCES.c.state)
        if type_name:
            q = q.where(INSTANCES.c.type == type_name)
        with self.reads.connect() as conn:
            for t, state, n in conn.execute(q):
                if t in out:
                    out[t][state or ""] = n
        return out

    def history_path(self, instance_id: str) -> tuple[str, str | None, list[tuple[str | None, str, str]]]:
        """(type, current state, [(from_state, to_state, event)] oldest first) of an instance:
        what its diagram marks. Raises NotFound."""
        with self.reads.connect() as conn:
            inst = conn.execute(INSTANCE, {"id": instance_id}).first()
            if inst is None:
                raise NotFound(f"instance {instance_id} not found", instance_id=instance_id)
            rows = conn.execute(select(HISTORY.c.from_state, HISTORY.c.to_state, HISTORY.c.event)
                                .where(HISTORY.c.instance_id == instance_id).order_by(HISTORY.c.id)).all()
            return inst.type, inst.state, [tuple(r) for r in rows]

    def delete_instances(self, ids: list[str]) -> int:
        """Delete instances (running ones too) with their timers, history, claims, tokens and step
        rows, in one transaction; their outbox rows are kept, unlinked. Returns how many of
        `ids` were there to delete (admin cleanup and factory reset, a chat session's delete).

        The instances are locked first, in id order, as a transition and every batch writer take
        them, so a busy worker and a delete wait for each other instead of deadlocking. The
        timer sweeper alone takes a due timer before its instance: when PostgreSQL breaks that
        deadlock by failing this transaction, it is tried again (up to 5 times, then the
        DBAPIError is raised)."""
        if not ids:
            return 0
        from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_random_exponential

        for attempt in Retrying(retry=retry_if_exception(is_deadlock), stop=stop_after_attempt(5),
                                wait=wait_random_exponential(multiplier=0.05, max=1), reraise=True):
            with attempt, self.unit_of_work() as uow:
                found = uow.execute(select(INSTANCES.c.id).where(INSTANCES.c.id.in_(ids))
                                    .order_by(INSTANCES.c.id).with_for_update()).scalars().all()
                for table in (TIMERS, HISTORY, CLAIMS, TOKENS, RUNS):
                    uow.execute(delete(table).where(table.c.instance_id.in_(found)))
                uow.execute(update(OUTBOX).where(OUTBOX.c.instance_id.in_(found)).values(instance_id=None))
                uow.execute(delete(INSTANCES).where(INSTANCES.c.id.in_(found)))
        return len(found)


def is_deadlock(exc: BaseException) -> bool:
    """PostgreSQL failed the transaction to break a deadlock (SQLSTATE 40P01): trying it again is safe."""
    return getattr(getattr(exc, "orig", None), "pgcode", None) == "40P01"


def _not_a_signal(cls: type[Workflow], event: str) -> str:
    """Why `event` is refused as a user's signal, and what to use instead."""
    signals = ", ".join(sorted(cls.signals)) or "none"
    if event == cls.restart_event and event in cls.event_names():
        hint = "; restart a failed step with POST /sagas/<id>/restart?step=<step>"
    elif event == cls.cancel_event and event in cls.event_names():
        hint = "; cancel with POST /sagas/<id>/cancel"
    else:
        hint = ""
    if event in cls.event_names():
        return (f"'{event}' is not a signal of workflow '{cls.type}' (the engine or its services send it)"
                f"{hint}; signals: {signals}")
    return f"unknown event {event[:80]!r} for workflow '{cls.type}'; signals: {signals}"


def _ts(value: datetime | None) -> str | None:
    return utc_iso(value)  # with +00:00 on SQLite too, which hands back naive values


def step_dict(run: Any) -> dict[str, Any]:
    """A step row (a Record or a result row) as the API shows it."""
    data = dict(run.data or {})
    out = {
        "name": run.name, "task": run.task, "status": run.status, "attempt": run.attempt,
        "restarts": run.restarts, "failures": run.failures, "progress": run.progress,
        "polls": run.polls, "error": run.error, "queued_at": _ts(run.queued_at),
        "started_at": _ts(run.started_at), "finished_at": _ts(run.finished_at),
        "duration_seconds": (run.finished_at - run.started_at).total_seconds()
        if run.finished_at and run.started_at else None,
        "data": data,
    }
    if data.get("branches") is not None:
        out.update(total=run.total, done=run.done, failed=run.failed)
        if run.total:  # a fan-out's progress: the share of its branches completed or failed for good
            out["progress"] = 100.0 * (run.done + run.failed) / run.total
    return out


def compensation_status(runs: list[Any]) -> str | None:
    """How the compensations of a cancelled instance stand: None (none ran), "running",
    "failed" (at least one gave up: see its step's `error`) or "completed"."""
    statuses = {r.status for r in runs}
    if StepStatus.COMPENSATING.value in statuses:
        return "running"
    if StepStatus.COMPENSATION_FAILED.value in statuses:
        return "failed"
    return "completed" if StepStatus.COMPENSATED.value in statuses else None


def instance_dict(inst: Any, runs: list[Any] | None, history: list[Any] | None,
                  cls: type[Workflow] | None) -> dict[str, Any]:
    """An instance as the API answers it; `status` from its workflow class `cls` (None when its
    type is not registered in this process: no status then)."""
    out: dict[str, Any] = {
        "id": inst.id, "type": inst.type, "key": inst.business_key, "state": inst.state,
        "status": cls.status_of(inst.state) if cls is not None else None, "finished": inst.finished, "created_at": _ts(inst.created_at),
        "updated_at": _ts(inst.updated_at), "finished_at": _ts(inst.finished_at),
        "context": inst.context,
    }
    if runs is not None:
        out["steps"] = [step_dict(r) for r in runs]
        out["compensation"] = compensation_status(runs)
    if history is not None:
        out["history"] = [{"from": h.from_state, "to": h.to_state, "event": h.event,
                           "payload_digest": h.payload_digest, "actor": h.actor,
                           "at": _ts(h.created_at)} for h in history]
    return out
