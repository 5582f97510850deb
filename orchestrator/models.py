"""The tables. PostgreSQL (SQLite in the embedded default) is the only truth about a workflow."""
from __future__ import annotations

import enum
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from .jsonutil import as_utc
from .schemas import identifier_problem, is_blank

JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class UTCDateTime(DateTime):
    """Timezone-aware everywhere; SQLite hands back naive values, so mark them UTC on the way out."""

    cache_ok = True

    def __init__(self) -> None:
        super().__init__(timezone=True)

    def result_processor(self, dialect: Any, coltype: Any) -> Any:
        parent = super().result_processor(dialect, coltype)

        def process(value: Any) -> Any:
            if parent is not None:
                value = parent(value)
            return as_utc(value) if isinstance(value, datetime) else value

        return process


class Base(DeclarativeBase):
    pass


class StepStatus(str, enum.Enum):
    PENDING = "pending"          # declared, not dispatched yet (or reset by a restart)
    QUEUED = "queued"            # dispatched; a task will run it (claiming is a read, not a write)
    WAITING = "waiting"          # between polls or retries: a timer row will dispatch it again
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    COMPENSATING = "compensating"  # cancelled instance: its compensation is sent or waits for a retry
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"  # gave up after its retries; `error` says why


ACTIVE_STEP_STATUSES = (StepStatus.QUEUED, StepStatus.WAITING)


class WorkflowInstance(Base):
    __tablename__ = "workflow_instances"
    __table_args__ = (
        UniqueConstraint("type", "business_key", name="uq_instance_business_key"),
        UniqueConstraint("type", "idempotency_key", name="uq_instance_idempotency_key"),
        Index("ix_instances_type_state", "type", "state"),
        Index("ix_instances_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    type: Mapped[str] = mapped_column(String(64))
    business_key: Mapped[str | None] = mapped_column(String(255))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    fingerprint: Mapped[str | None] = mapped_column(String(64), index=True)
    state: Mapped[str | None] = mapped_column(String(64))
    context: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    finished: Mapped[bool] = mapped_column(default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Bumped by every transaction that writes to the instance or its steps: a writer that read
    # without a lock writes only if nobody wrote since (see orchestrator/rows.py).
    version: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # The request or event that created it; its log lines and messages carry it (orchestrator/logs.py).
    correlation_id: Mapped[str | None] = mapped_column(String(64))
    # The trace it was created in (W3C traceparent/tracestate); later work links to it (tracing.py).
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSONType)


#: The longest `Idempotency-Key`: the instances' `idempotency_key` column's length (255), the
#: same on every route (chat scopes the key to its session within that column: sagas/chat/store.py).
MAX_IDEMPOTENCY_KEY: int = WorkflowInstance.__table__.c.idempotency_key.type.length


def idempotency_key_problem(key: str) -> str | None:
    """Why `key` cannot be an `Idempotency-Key`, or None: blank, or longer than its column. One
    rule in the same words where the header enters (`web.check_request_text`) and for a caller
    of `Engine.start` in code."""
    if is_blank(key):
        return "must not be empty"
    if len(key) > MAX_IDEMPOTENCY_KEY:
        return f"must be at most {MAX_IDEMPOTENCY_KEY} characters, got {len(key)}"
    return None


#: The longest business key (`POST /saga`'s `key`, a route id, an event id): its column's length.
MAX_BUSINESS_KEY: int = WorkflowInstance.__table__.c.business_key.type.length


def business_key_problem(key: object) -> str | None:
    """Why `key` cannot be a business key, or None: not a string, longer than its column, or not
    an identifier (`schemas.identifier_problem`: blank, a hidden character, whitespace around
    it, not NFC). The words match `idempotency_key_problem`'s for the same faults."""
    if not isinstance(key, str):
        return "must be a string"
    if len(key) > MAX_BUSINESS_KEY:
        return f"must be at most {MAX_BUSINESS_KEY} characters, got {len(key)}"
    return identifier_problem(key)


class StepRun(Base):
    """One row per (instance, step): its status, current attempt and timings."""

    __tablename__ = "step_runs"
    __table_args__ = (
        UniqueConstraint("instance_id", "name", name="uq_step_instance_name"),
        Index("ix_step_runs_lease", "status", "lease_until"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("workflow_instances.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(64))
    task: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(32), default=StepStatus.PENDING.value)
    attempt: Mapped[int] = mapped_column(Integer, default=0)      # bumped on every dispatch key change
    restarts: Mapped[int] = mapped_column(Integer, default=0)
    failures: Mapped[int] = mapped_column(Integer, default=0)     # consecutive, for the retry policy
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    polls: Mapped[int] = mapped_column(Integer, default=0)
    # Fan-out join counted here, not in a chord callback.
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    data: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    queued_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # Bumped by every dispatch: a delivery claims (attempt, dispatch) once (StepClaim).
    dispatches: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class StepClaim(Base):
    """Which delivery of a step runs it: one row per (instance, step, task, branch), holding the
    newest (attempt, dispatch) claimed. A claim is one conditional upsert, so of two deliveries
    of the same dispatch (an outbox row published twice) exactly one gets to call out."""

    __tablename__ = "step_claims"

    instance_id: Mapped[str] = mapped_column(ForeignKey("workflow_instances.id", ondelete="CASCADE"),
                                             primary_key=True)
    step: Mapped[str] = mapped_column(String(64), primary_key=True)
    task: Mapped[str] = mapped_column(String(128), primary_key=True)  # each link of a chain claims
    branch: Mapped[int] = mapped_column(Integer, primary_key=True)  # -1: not a branch
    attempt: Mapped[int] = mapped_column(Integer)
    dispatch: Mapped[int] = mapped_column(Integer)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class StepToken(Base):
    """A token the engine issued for one item of an external step (`Step(external=...)`): a
    completion event names it, and it points at the (instance, step, item, attempt) it was issued
    for. A token issued again (a contract's own id, reused by a later attempt) points at the
    newest attempt; an engine token of an older attempt stays, so its late completion is stale."""

    __tablename__ = "step_tokens"

    token: Mapped[str] = mapped_column(String(255), primary_key=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("workflow_instances.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(String(64))
    branch: Mapped[int] = mapped_column(Integer)  # -1: the step has one item
    attempt: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class HistoryEntry(Base):
    __tablename__ = "history"
    __table_args__ = (Index("ix_history_instance", "instance_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("workflow_instances.id", ondelete="CASCADE"))
    from_state: Mapped[str | None] = mapped_column(String(64))
    to_state: Mapped[str] = mapped_column(String(64))
    event: Mapped[str] = mapped_column(String(64))
    payload_digest: Mapped[str] = mapped_column(String(64))
    actor: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class OutboxMessage(Base):
    """A message written in the same transaction as the state change; the relay publishes it."""

    __tablename__ = "outbox"
    __table_args__ = (Index("ix_outbox_unsent", "sent_at", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(64), unique=True)
    instance_id: Mapped[str | None] = mapped_column(String(36))
    channel: Mapped[str] = mapped_column(String(16))  # "celery" or "kafka"
    target: Mapped[str] = mapped_column(String(255))  # task name or topic
    key: Mapped[str | None] = mapped_column(String(255))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    publish_attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    correlation_id: Mapped[str | None] = mapped_column(String(64))  # sent as a message header
    # Set when publishing failed for good (a permanent error): the relay no longer tries it.
    failed_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The trace the row was written in (W3C traceparent/tracestate): its publish continues it.
    trace_context: Mapped[dict[str, str] | None] = mapped_column(JSONType)
    # Set while the process that wrote the row still means to send it but lags behind (a
    # backlog past half the sweepers' grace period): sweepers leave the row alone until then.
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Timer(Base):
    """A wait, stored: backoff, poll interval, step deadline, job timeout. The sweeper fires it."""

    __tablename__ = "timers"
    __table_args__ = (Index("ix_timers_due", "fired_at", "due_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    instance_id: Mapped[str] = mapped_column(ForeignKey("workflow_instances.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))  # "retry", "poll", "deadline", "expire", "compensate"
    step: Mapped[str | None] = mapped_column(String(64))
    attempt: Mapped[int | None] = mapped_column(Integer)
    branch: Mapped[int | None] = mapped_column(Integer)
    event: Mapped[str | None] = mapped_column(String(64))
    due_at: Mapped[datetime] = mapped_column(UTCDateTime())
    fired_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class ProcessedMessage(Base):
    """De-duplication of deliveries: one row per (consumer, message id) that had its effect."""

    __tablename__ = "processed_messages"

    consumer: Mapped[str] = mapped_column(String(64), primary_key=True)
    message_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class BulkJob(Base):
    """One bulk operation (`POST /sagas/bulk`): an action applied to the instances a filter matched
    when it was created (its BulkItem rows), at `rate_per_second`. A sweeper drives it while it
    holds the lease (`owner`, `lease_until`); `next_at` is when its next item is due, so the rate
    holds across passes and across a sweeper's restart."""

    __tablename__ = "bulk_jobs"
    __table_args__ = (Index("ix_bulk_jobs_status", "status", "lease_until"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    action: Mapped[str] = mapped_column(String(16))  # "restart", "cancel" or "event"
    step: Mapped[str | None] = mapped_column(String(64))
    event: Mapped[str | None] = mapped_column(String(64))
    payload: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    filter: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)  # as given, for the record
    rate_per_second: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))  # "running", "completed" or "cancelled"
    matched: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    next_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    owner: Mapped[str | None] = mapped_column(String(64))
    lease_until: Mapped[datetime | None] = mapped_column(UTCDateTime())


class BulkItem(Base):
    """One instance a bulk operation acts on. `status` goes from "pending" to "done" in the same
    transaction as the action on the instance (so an action is never done twice), or to
    "skipped" (no longer eligible: `error` says why) or "failed" (`error`)."""

    __tablename__ = "bulk_items"
    __table_args__ = (Index("ix_bulk_items_status", "bulk_id", "status", "position"),)

    bulk_id: Mapped[str] = mapped_column(ForeignKey("bulk_jobs.id", ondelete="CASCADE"), primary_key=True)
    instance_id: Mapped[str] = mapped_column(String(36), primary_key=True)  # no FK: an instance may be deleted
    position: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16), default="pending")
    error: Mapped[str | None] = mapped_column(Text)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
