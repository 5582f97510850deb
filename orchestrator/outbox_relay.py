"""Publishes committed outbox rows and marks them sent.

The process that commits hands its rows to a background thread that publishes them at once
(so a task or a request does not wait for the broker's confirm, and marks batch up under
load); sweepers publish what is left
(older than a short grace period), locking rows with SKIP LOCKED so several sweepers never
send the same row at once. Delivery is at least once: a crash after publish and before the
mark sends the row again, and consumers de-duplicate (steps by (instance, step, attempt)).
"""
from __future__ import annotations

import atexit
import logging
import os
import queue
import threading
from datetime import timedelta
from typing import Any, Callable

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from .models import OutboxMessage, utcnow

log = logging.getLogger(__name__)

Publisher = Callable[[OutboxMessage], None]


class OutboxRelay:
    def __init__(self, sessions: sessionmaker[Session], autocommit: Engine | None = None) -> None:
        self.sessions = sessions
        self.marks = autocommit or sessions.kw["bind"]  # marking sent is one statement
        self.publishers: dict[str, Publisher] = {}

    def register(self, channel: str, publisher: Publisher) -> None:
        self.publishers[channel] = publisher

    def __call__(self, rows: list[OutboxMessage]) -> None:
        self.kicker().submit(rows)

    def kicker(self) -> "Kicker":
        kicker = getattr(self, "_kicker", None)
        if kicker is None or kicker.pid != os.getpid():  # a forked child starts its own thread
            kicker = self._kicker = Kicker(self)
        return kicker

    def publish_committed(self, rows: list[OutboxMessage]) -> int:
        """The kick right after commit: publish the rows this process just wrote, then mark them
        with one UPDATE. No lock is held while the broker confirms; a crash before the mark
        means the sweeper sends the row again, and consumers ignore the duplicate."""
        sent: list[str] = []
        for row in rows:
            publisher = self.publishers.get(row.channel)
            if publisher is None:
                continue
            try:
                publisher(row)
            except Exception as exc:  # broker down: the sweeper retries the rest
                log.warning("outbox %s to %s not published: %s", row.message_id, row.target, exc)
                break
            sent.append(row.message_id)
        if sent:
            table = OutboxMessage.__table__
            with self.marks.connect() as conn:  # one autocommit statement
                conn.execute(table.update().where(table.c.message_id.in_(sent), table.c.sent_at.is_(None))
                             .values(sent_at=utcnow(), publish_attempts=table.c.publish_attempts + 1))
        return len(sent)

    def publish(self, limit: int = 500, grace_seconds: float = 2.0) -> int:
        """The sweep: publish unsent rows older than `grace_seconds` (younger ones are still
        being sent by the process that wrote them), locked while they are sent."""
        with self.sessions() as session, session.begin():
            rows = session.execute(
                select(OutboxMessage).where(OutboxMessage.sent_at.is_(None),
                                            OutboxMessage.created_at < utcnow() - timedelta(seconds=grace_seconds))
                .order_by(OutboxMessage.id).limit(limit).with_for_update(skip_locked=True)
            ).scalars().all()
            sent = 0
            for row in rows:
                publisher = self.publishers.get(row.channel)
                if publisher is None:
                    row.last_error = f"no publisher for channel '{row.channel}'"
                    continue
                row.publish_attempts += 1
                try:
                    publisher(row)
                except Exception as exc:  # broker down: keep the row, the next sweep retries it
                    row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
                    log.warning("outbox %s to %s not published: %s", row.id, row.target, exc)
                    break
                row.sent_at = utcnow()
                row.last_error = None
                sent += 1
            return sent


class Kicker:
    """The post-commit publisher of one process: a thread that takes committed rows in order,
    publishes them and marks each batch sent with one UPDATE. Whatever it has not sent when the
    process dies, a sweeper sends after the grace period."""

    def __init__(self, relay: OutboxRelay) -> None:
        self.relay = relay
        self.pid = os.getpid()
        self.queue: queue.SimpleQueue[list[OutboxMessage]] = queue.SimpleQueue()
        self.pending = 0
        self.idle = threading.Condition()
        threading.Thread(target=self._run, name="outbox-kicker", daemon=True).start()
        atexit.register(self.flush)

    def submit(self, rows: list[OutboxMessage]) -> None:
        with self.idle:
            self.pending += len(rows)
        self.queue.put(rows)

    def _run(self) -> None:
        while True:
            batch = list(self.queue.get())
            while True:
                try:
                    batch.extend(self.queue.get_nowait())
                except queue.Empty:
                    break
            try:
                self.relay.publish_committed(batch)
            except Exception:  # database or broker down: the sweeper sends these later
                log.warning("publishing %d outbox rows failed; the sweeper will", len(batch), exc_info=True)
            with self.idle:
                self.pending -= len(batch)
                self.idle.notify_all()

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted has been handled (at exit, and for tests)."""
        with self.idle:
            return self.idle.wait_for(lambda: self.pending <= 0, timeout)


def celery_publisher(app: Any) -> Publisher:
    """Publish a step message: one task, a chain or a group, by name (the engine imports no task)."""
    from celery import chain, group

    def sig(name: str, args: list[Any]) -> Any:
        return app.signature(name, args=args, immutable=True)

    def publish(row: OutboxMessage) -> None:
        p = row.payload
        if "task" in p:
            name, args = p["task"]
            app.send_task(name, args=args, task_id=row.message_id)
        elif "chain" in p:
            chain(*(sig(n, a) for n, a in p["chain"])).apply_async()
        elif "group" in p:
            group(*(sig(n, a) for n, a in p["group"])).apply_async()
        else:
            raise ValueError(f"outbox {row.id}: unknown celery payload {sorted(p)}")

    return publish
