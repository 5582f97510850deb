"""Publishes committed outbox rows and marks them sent.

Rows are locked (SKIP LOCKED) while they are published, so the post-commit kick and any number
of sweepers never publish the same row at once. A crash after publish and before the mark
re-publishes the row later: consumers de-duplicate (steps by (instance, step, attempt)).
"""
from __future__ import annotations

import logging
from typing import Any, Callable

from sqlalchemy import select
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

    def __call__(self, ids: list[int]) -> None:
        self.publish(ids)

    def publish(self, ids: list[int] | None = None, limit: int = 500) -> int:
        """Publish unsent rows (the given ids, or the oldest `limit`). Returns how many were sent."""
        with self.sessions() as session, session.begin():
            q = select(OutboxMessage).where(OutboxMessage.sent_at.is_(None))
            q = q.where(OutboxMessage.id.in_(ids)) if ids is not None else q
            rows = session.execute(
                q.order_by(OutboxMessage.id).limit(limit).with_for_update(skip_locked=True)
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
                except Exception as exc:  # broker down: keep the row, the sweeper retries it
                    row.last_error = f"{type(exc).__name__}: {exc}"[:2000]
                    log.warning("outbox %s to %s not published: %s", row.id, row.target, exc)
                    break
                row.sent_at = utcnow()
                row.last_error = None
                sent += 1
            return sent

    def backlog(self) -> int:
        from sqlalchemy import func

        with self.sessions() as session:
            return session.execute(select(func.count()).where(OutboxMessage.sent_at.is_(None))).scalar_one()


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
