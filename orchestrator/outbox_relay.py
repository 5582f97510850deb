"""Publishes committed outbox rows and marks them sent.

The process that commits publishes its own rows right away; sweepers publish what is left
(older than a short grace period), locking rows with SKIP LOCKED so several sweepers never
send the same row at once. Delivery is at least once: a crash after publish and before the
mark sends the row again, and consumers de-duplicate (steps by (instance, step, attempt)).
"""
from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Callable

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from .models import OutboxMessage, utcnow

log = logging.getLogger(__name__)

Publisher = Callable[[OutboxMessage], None]


class OutboxRelay:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions
        self.publishers: dict[str, Publisher] = {}

    def register(self, channel: str, publisher: Publisher) -> None:
        self.publishers[channel] = publisher

    def __call__(self, rows: list[OutboxMessage]) -> None:
        self.publish_committed(rows)

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
            with self.sessions() as session, session.begin():
                if session.bind.dialect.name == "postgresql":  # type: ignore[union-attr]
                    # losing this mark in a crash only costs a duplicate send
                    session.execute(text("SET LOCAL synchronous_commit = off"))
                session.execute(update(OutboxMessage).where(OutboxMessage.message_id.in_(sent),
                                                            OutboxMessage.sent_at.is_(None))
                                .values(sent_at=utcnow(), publish_attempts=OutboxMessage.publish_attempts + 1))
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
