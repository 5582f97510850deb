"""Publishes committed outbox rows and marks them sent.

The process that commits hands its rows to a background thread that publishes them at once
(so a task or a request does not wait for the broker's confirm) and marks them sent in batches
a moment later; sweepers publish what is left (older than a short grace period), locking rows
with SKIP LOCKED so several sweepers never send the same row at once. Delivery is at least
once: a crash after publish and before the mark sends the row again, and consumers
de-duplicate (steps by (instance, step, attempt), and one claim per dispatch).

A process whose backlog outgrows the grace period (a burst of thousands of starts, each publish
waiting for its broker confirm) would otherwise see sweepers send its rows too, doubling the
broker's and the workers' load just when they are busiest. So rows that wait in a process past
half the grace period get a lease (`lease_until`, one UPDATE for all of them, renewed while they
wait): sweepers leave leased rows alone, and send them once the lease has run out if the process
died. A process that is keeping up writes no lease.

A row that can never be published (a permanent error: too large for the broker, a payload that
does not serialise) is failed: `failed_at` and `last_error` are set, it is not tried again,
and the engine fails the step it belonged to (`on_failed`). A transient error (broker down,
timeout) holds back that instance's later rows on the same channel, so one instance's messages
still go out in order, while other rows are still sent. A row for a channel this process has
no publisher for (an API without KAFKA_BROKERS) is left, like a transient error, for a sweeper
that has one.
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
import time
from datetime import datetime, timedelta
from typing import Any, Callable, Iterator

from sqlalchemy import Engine, or_, select
from sqlalchemy.orm import Session, sessionmaker

from . import tracing
from .models import OutboxMessage, utcnow

log = logging.getLogger(__name__)

Publisher = Callable[[OutboxMessage], None]
#: Called with (message id, error) for a row that failed for good (Engine.outbox_failed).
FailureHandler = Callable[[str, str], Any]


class NoPublisher(Exception):
    """This process cannot publish to the row's channel; another process may (not permanent)."""


class PermanentPublishError(Exception):
    """Publishing this row can never succeed (e.g. Kafka MSG_SIZE_TOO_LARGE): retrying it would
    only block the rows behind it."""


def is_permanent(exc: BaseException) -> bool:
    """A publish error no retry can fix: the publisher said so, or the payload does not
    serialise (TypeError/ValueError from the encoder, kombu's EncodeError)."""
    if isinstance(exc, (PermanentPublishError, TypeError, ValueError)):
        return True
    try:
        from kombu.exceptions import EncodeError
    except ImportError:  # pragma: no cover - kombu comes with celery
        return False
    return isinstance(exc, EncodeError)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:2000]

#: How long the kicker lets sent rows wait to be marked, so one UPDATE marks many. Far below
#: the sweeper's grace period: only a process that dies in between gets its rows sent twice.
MARK_DELAY = 0.2
MARK_BATCH = 500

#: The sweepers' grace period (seconds): unsent rows younger than this are left to their writer.
GRACE_SECONDS = 2.0
#: A row still waiting in its writer this long (seconds) after it was written gets a lease ...
LEASE_AFTER = GRACE_SECONDS / 2
#: ... of this many seconds, renewed when less than half of it is left; a process that died
#: holds its rows back from the sweepers for at most this long.
LEASE_SECONDS = 10.0
#: How often (seconds) a process looks for rows that need a lease.
LEASE_CHECK = 0.25


class OutboxRelay:
    def __init__(self, sessions: sessionmaker[Session], autocommit: Engine | None = None) -> None:
        self.sessions = sessions
        self.marks = autocommit or sessions.kw["bind"]  # marking sent is one statement
        self.publishers: dict[str, Publisher] = {}
        self.on_failed: FailureHandler | None = None  # the engine's, set by the runtime

    def register(self, channel: str, publisher: Publisher) -> None:
        self.publishers[channel] = publisher

    def __call__(self, rows: list[OutboxMessage]) -> None:
        self.kicker().submit(rows)

    def kicker(self) -> "Kicker":
        kicker = getattr(self, "_kicker", None)
        if kicker is None or kicker.pid != os.getpid():  # a forked child starts its own thread
            kicker = self._kicker = Kicker(self)
        return kicker

    def publish_committed(self, rows: list[OutboxMessage]) -> list[str]:
        """The kick right after commit: publish the rows this process just wrote, in order; the
        message ids sent. No lock is held while the broker confirms. A row that fails for good
        is failed (and its step with it); after a transient error that instance's later rows
        wait for the sweeper, the others still go."""
        sent: list[str] = []
        held: set[tuple[str | None, str]] = set()  # (instance, channel) with an earlier row unsent
        for row, error in self._send_all(rows, held):
            if error is None:
                sent.append(row.message_id)
            elif is_permanent(error):
                self.fail(row.message_id, describe(error))
            else:  # broker down: the sweeper retries this row and the ones after it
                if not isinstance(error, NoPublisher):
                    log.warning("outbox %s to %s not published: %s", row.message_id, row.target, error)
                held.add((row.instance_id, row.channel))
        return sent

    def _send_all(self, rows: list[OutboxMessage], held: set[tuple[str | None, str]]
                  ) -> Iterator[tuple[OutboxMessage, Exception | None]]:
        """(row, error or None) for each row sent, in order, skipping rows whose (instance,
        channel) is in `held` (the caller adds to it after an error). Rows of a channel whose
        publisher sends many at once (`publish_many`: Kafka) go in rounds, each round holding at
        most one row per instance and waiting once for all its acknowledgements, so an
        instance's rows still go out in order and stop at its first failure. With tracing on,
        each row is sent alone inside its publish span."""
        many = {ch: getattr(p, "publish_many", None) for ch, p in self.publishers.items()}
        queue_ = [r for r in rows]
        while queue_:
            round_: list[OutboxMessage] = []
            rest: list[OutboxMessage] = []
            taken: set[tuple[str | None, str]] = set()
            for row in queue_:
                k = (row.instance_id, row.channel)
                if k in held:
                    continue
                if many.get(row.channel) is None or tracing.enabled():
                    if round_ or rest:
                        rest.append(row)
                    else:  # one at a time, in order, until the next batchable row
                        yield row, self._send(row)
                    continue
                if k in taken:
                    rest.append(row)
                else:
                    taken.add(k)
                    round_.append(row)
            if round_:
                by_channel: dict[str, list[OutboxMessage]] = {}
                for row in round_:
                    by_channel.setdefault(row.channel, []).append(row)
                for channel, group in by_channel.items():
                    try:
                        errors = many[channel](group)  # type: ignore[misc]
                    except Exception as exc:
                        errors = [exc] * len(group)
                    for row, error in zip(group, errors):
                        yield row, error
            queue_ = rest

    def _send(self, row: OutboxMessage) -> Exception | None:
        # A "local" row is a step message its writer meant to run itself (Engine.unit_of_work):
        # still unsent, that writer died first, so it goes out as the Celery message it is.
        publisher = self.publishers.get("celery" if row.channel == "local" else row.channel)
        if publisher is None:
            return NoPublisher(f"no publisher for channel '{row.channel}' in this process")
        # The publish continues the trace the row was written in (its request, event or task), so
        # the message's headers carry it on (Celery's instrumentation, KafkaPublisher).
        with tracing.span(f"outbox publish {row.target}", {
                **tracing.workflow_attributes(row.instance_id), "messaging.system": row.channel,
                "messaging.destination.name": row.target, "messaging.message.id": row.message_id},
                parent=getattr(row, "trace_context", None), kind="producer") as span:
            try:
                publisher(row)
            except Exception as exc:
                if span is not None:
                    span.record_exception(exc)
                    from opentelemetry.trace import Status, StatusCode
                    span.set_status(Status(StatusCode.ERROR, describe(exc)))
                return exc
        return None

    def fail(self, message_id: str, error: str) -> None:
        """Fail a row for good, with its step, in one transaction (Engine.outbox_failed); without
        an engine, only the row. Errors are logged: the next sweep meets the row again."""
        log.error("outbox %s cannot be published, failing it: %s", message_id, error)
        try:
            if self.on_failed is not None:
                self.on_failed(message_id, error)
            else:
                table = OutboxMessage.__table__
                with self.marks.begin() as conn:
                    conn.execute(table.update().where(table.c.message_id == message_id, table.c.sent_at.is_(None),
                                                      table.c.failed_at.is_(None))
                                 .values(failed_at=utcnow(), last_error=error,
                                         publish_attempts=table.c.publish_attempts + 1))
        except Exception:
            log.warning("recording outbox %s as failed did not work; the sweeper retries", message_id,
                        exc_info=True)

    def mark_sent(self, message_ids: list[str]) -> None:
        """One UPDATE, committed (on SQLite `marks` is the main engine, where a statement left
        uncommitted is rolled back: the sweeper then sent every row again). A crash before it
        means the sweeper sends the rows again, and consumers ignore the duplicates."""
        table = OutboxMessage.__table__
        with self.marks.begin() as conn:
            conn.execute(table.update().where(table.c.message_id.in_(message_ids), table.c.sent_at.is_(None))
                         .values(sent_at=utcnow(), publish_attempts=table.c.publish_attempts + 1))

    def lease(self, message_ids: list[str], until: datetime | None) -> None:
        """Keep sweepers off these unsent rows until `until` (None: at once), in one UPDATE
        per 500 ids, committed. Raises the database's error (the caller logs it: without the
        lease a sweeper may send a row twice, which consumers de-duplicate)."""
        table = OutboxMessage.__table__
        with self.marks.begin() as conn:
            for i in range(0, len(message_ids), 500):
                conn.execute(table.update().where(table.c.message_id.in_(message_ids[i:i + 500]),
                                                  table.c.sent_at.is_(None))
                             .values(lease_until=until))

    def publish(self, limit: int = 500, grace_seconds: float = GRACE_SECONDS) -> int:
        """The sweep: publish unsent rows older than `grace_seconds` (younger ones are still
        being sent by the process that wrote them) whose lease, if any, has run out, locked
        while they are sent (on PostgreSQL; see below for SQLite); the number sent. Rows that
        fail for good are failed after the sweep commits (their step's transaction locks the
        instance, which must not wait inside this one)."""
        now = utcnow()
        due = (select(OutboxMessage)
               .where(OutboxMessage.sent_at.is_(None), OutboxMessage.failed_at.is_(None),
                      OutboxMessage.created_at < now - timedelta(seconds=grace_seconds),
                      or_(OutboxMessage.lease_until.is_(None), OutboxMessage.lease_until < now))
               .order_by(OutboxMessage.id).limit(limit))
        if self.marks.dialect.name == "sqlite":
            # SQLite has one write lock for the whole file and no row locks: holding it while
            # the broker confirms stopped every other writer (timers, steps, the API) for as
            # long as a slow publish took, past their busy timeout. The rows are read, sent
            # without a lock and marked; a second sweeper may send one twice, which consumers
            # de-duplicate by message id.
            with self.sessions() as session:
                rows = list(session.execute(due).scalars().all())
            sent_ids = self.publish_committed(rows)
            if sent_ids:
                self.mark_sent(sent_ids)
            return len(sent_ids)
        failed: list[tuple[str, str]] = []
        with self.sessions() as session, session.begin():
            rows = session.execute(due.with_for_update(skip_locked=True)).scalars().all()
            sent = 0
            held: set[tuple[str | None, str]] = set()  # an earlier row of the instance is unsent: keep their order
            for row, error in self._send_all(list(rows), held):
                row.publish_attempts += 1
                if error is None:
                    row.sent_at = utcnow()
                    row.last_error = None
                    sent += 1
                elif is_permanent(error):
                    failed.append((row.message_id, describe(error)))  # never sent: the rest may go
                else:  # broker down: keep the row, the next sweep retries it
                    row.last_error = describe(error)
                    if not isinstance(error, NoPublisher):
                        log.warning("outbox %s to %s not published: %s", row.id, row.target, error)
                    held.add((row.instance_id, row.channel))
        for message_id, error in failed:
            self.fail(message_id, error)
        return sent


class Kicker:
    """The post-commit publisher of one process: a thread that takes committed rows in order,
    publishes them, and marks what it sent with one UPDATE per MARK_DELAY; and a thread that
    leases the rows still waiting LEASE_AFTER after they were written (`_lease_loop`).
    Whatever it has not sent or marked when the process dies, a sweeper sends after the grace
    period, or once the lease has run out."""

    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay
        self.pid = os.getpid()
        self.queue: queue.SimpleQueue[list[OutboxMessage]] = queue.SimpleQueue()
        self.pending = 0  # submitted and not yet marked (or given up on)
        self.hurry = False  # flush(): mark now instead of after MARK_DELAY
        self.idle = threading.Condition()
        self.waiting: dict[str, datetime] = {}  # message id -> written at, of rows not yet published
        self.leased: dict[str, datetime] = {}  # message id -> lease end, of waiting rows with a lease
        threading.Thread(target=self._run, name="outbox-kicker", daemon=True).start()
        threading.Thread(target=self._lease_loop, name="outbox-lease", daemon=True).start()
        atexit.register(self.flush)

    def submit(self, rows: list[OutboxMessage]) -> None:
        with self.idle:
            self.pending += len(rows)
            for row in rows:
                self.waiting[row.message_id] = row.created_at
        self.queue.put(rows)

    def _published(self, batch: list[OutboxMessage], sent: list[str]) -> None:
        """The batch is through (`sent`: the ids that went out): no longer waiting. A leased row
        that did not go out (broker down) is released at once, for the sweepers to retry."""
        with self.idle:
            released = [r.message_id for r in batch
                        if self.waiting.pop(r.message_id, None) is not None
                        and self.leased.pop(r.message_id, None) is not None]
        unsent = set(released) - set(sent) if released else None
        if unsent:
            try:
                self.relay.lease(sorted(unsent), None)
            except Exception:  # the lease runs out on its own
                log.warning("releasing %d outbox rows failed", len(unsent), exc_info=True)

    def _lease_loop(self) -> None:
        """Every LEASE_CHECK: lease the rows waiting LEASE_AFTER or longer (and renew leases
        with less than half left), in one UPDATE. Writes nothing while the process keeps up."""
        while True:
            time.sleep(LEASE_CHECK)
            now = utcnow()
            oldest = now - timedelta(seconds=LEASE_AFTER)
            renew = now + timedelta(seconds=LEASE_SECONDS / 2)
            with self.idle:
                due = [m for m, written in self.waiting.items()
                       if written <= oldest and self.leased.get(m, now) <= renew]
            if not due:
                continue
            until = now + timedelta(seconds=LEASE_SECONDS)
            try:
                self.relay.lease(due, until)
            except Exception:  # database down: a sweeper may send these too; consumers de-duplicate
                log.warning("leasing %d outbox rows failed", len(due), exc_info=True)
                continue
            with self.idle:
                for m in due:
                    if m in self.waiting:
                        self.leased[m] = until

    def _run(self) -> None:
        unmarked: list[str] = []
        handled = 0  # rows taken off the queue since the last mark
        mark_at = 0.0
        while True:
            batch = self._take(None if not unmarked else max(0.0, mark_at - time.monotonic()))
            handled += len(batch)
            if batch:
                try:
                    sent = self.relay.publish_committed(batch)
                except Exception:  # the sweeper sends these later
                    log.warning("publishing %d outbox rows failed; the sweeper will", len(batch), exc_info=True)
                    sent = []
                self._published(batch, sent)
                if sent and not unmarked:
                    mark_at = time.monotonic() + MARK_DELAY
                unmarked += sent
            if unmarked and (self.hurry or len(unmarked) >= MARK_BATCH or time.monotonic() >= mark_at):
                try:
                    self.relay.mark_sent(unmarked)
                except Exception:  # database down: the sweeper sends them again; consumers de-duplicate
                    log.warning("marking %d outbox rows sent failed", len(unmarked), exc_info=True)
                unmarked = []
            if not unmarked:
                with self.idle:
                    self.pending -= handled
                    self.idle.notify_all()
                handled = 0

    def _take(self, timeout: float | None) -> list[OutboxMessage]:
        """Everything queued, waiting up to `timeout` for the first rows (None: for ever)."""
        try:
            batch = list(self.queue.get(timeout=timeout))
        except queue.Empty:
            return []
        while True:
            try:
                batch.extend(self.queue.get_nowait())
            except queue.Empty:
                return batch

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted has been published and marked (at exit, and for tests)."""
        with self.idle:
            self.hurry = True
            self.queue.put([])  # wake the thread if it waits for its mark time
            try:
                return self.idle.wait_for(lambda: self.pending <= 0, timeout)
            finally:
                self.hurry = False


def celery_publisher(app: Any) -> Publisher:
    """Publish a step message: one task, a chain or a group, by name (the engine imports no task)."""
    from celery import chain, group

    from .logs import HEADER

    # A step reports its outcome to the engine, and nobody waits on a published message's Celery
    # result: `ignore_result` spares the Redis result backend a SUBSCRIBE (and its UNSUBSCRIBE
    # once the unused AsyncResult is dropped) per message, and the worker a result write.
    def publish(row: OutboxMessage) -> None:
        p = row.payload
        headers = {HEADER: row.correlation_id} if row.correlation_id else {}

        def sig(name: str, args: list[Any]) -> Any:
            return app.signature(name, args=args, immutable=True, headers=headers)

        if "task" in p:
            name, args = p["task"]
            app.send_task(name, args=args, task_id=row.message_id, headers=headers, ignore_result=True)
        elif "chain" in p:
            chain(*(sig(n, a) for n, a in p["chain"])).apply_async(ignore_result=True)
        elif "group" in p:
            group(*(sig(n, a) for n, a in p["group"])).apply_async(ignore_result=True)
        else:
            raise ValueError(f"outbox {row.id}: unknown celery payload {sorted(p)}")

    return publish
