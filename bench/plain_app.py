"""A plain Celery app holding only the raw chain's three tasks: the memory peer of the engine's
worker. Started by bench/run.py as `celery -A bench.plain_app worker` with the same pool and
concurrency as the engine's worker, and the same Celery settings (celeryconfig.py); it consumes
the queue `bench-plain` only. Broker and backend come from CELERY_BROKER_URL and
CELERY_RESULT_BACKEND.
"""
from __future__ import annotations

import os
from typing import Any

from celery import Celery, chain

QUEUE = "bench-plain"


def one() -> dict[str, Any]:
    return {"n": 1}


def two() -> dict[str, Any]:
    return {"n": 2}


def three() -> dict[str, Any]:
    return {"n": 3}


def make_app(broker: str, backend: str) -> Celery:
    """The plain app on `broker` and `backend`, its three tasks registered."""
    plain = Celery("bench-plain", broker=broker, backend=backend, set_as_current=False)
    plain.config_from_object("celeryconfig")
    for link in (one, two, three):
        plain.task(name=f"bench.plain_{link.__name__}", acks_late=True, reject_on_worker_lost=True,
                   queue=QUEUE)(link)
    return plain


def plain_chain(plain: Celery) -> Any:
    """The raw chain on the plain app."""
    return chain(*(plain.tasks[f"bench.plain_{n}"].si() for n in ("one", "two", "three")))


app = make_app(os.environ.get("CELERY_BROKER_URL", "amqp://guest:guest@127.0.0.1:5672//"),
               os.environ.get("CELERY_RESULT_BACKEND", "redis://127.0.0.1:6379/2"))
