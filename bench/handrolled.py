"""The hand-rolled durable chain: three raw Celery tasks, each writing the chain's state row with
one autocommit `INSERT ... ON CONFLICT DO UPDATE` (what teams write by hand around Celery).

Imported through WORKFLOW_MODULES by the benchmark's engine worker, so it runs with the same
pool, concurrency, broker and backend as the engine and the raw chain. The table
`bench_chain_state` is created by bench/run.py in the run's own database.
"""
from __future__ import annotations

import os
from typing import Any

from celery import chain, shared_task

QUEUE = "bench"
TABLE_DDL = ("CREATE TABLE IF NOT EXISTS bench_chain_state (id text PRIMARY KEY, step integer NOT NULL, "
             "output jsonb NOT NULL, updated_at timestamptz NOT NULL)")
UPSERT = ("INSERT INTO bench_chain_state (id, step, output, updated_at) VALUES (%s, %s, %s, now()) "
          "ON CONFLICT (id) DO UPDATE SET step = excluded.step, output = excluded.output, "
          "updated_at = excluded.updated_at")

_conn: Any = None  # one connection per pool process, opened on first use (after the fork)


def _save(chain_id: str, step: int) -> dict[str, int]:
    global _conn
    if _conn is None or _conn.closed:
        import psycopg2

        _conn = psycopg2.connect(os.environ["DATABASE_URL"].replace("postgresql+psycopg2", "postgresql"))
        _conn.autocommit = True
    output = {"n": step}
    with _conn.cursor() as cur:
        cur.execute(UPSERT, (chain_id, step, f'{{"n": {step}}}'))
    return output


@shared_task(name="bench.upsert_one", acks_late=True, reject_on_worker_lost=True, queue=QUEUE)
def upsert_one(chain_id: str) -> dict[str, int]:
    return _save(chain_id, 1)


@shared_task(name="bench.upsert_two", acks_late=True, reject_on_worker_lost=True, queue=QUEUE)
def upsert_two(chain_id: str) -> dict[str, int]:
    return _save(chain_id, 2)


@shared_task(name="bench.upsert_three", acks_late=True, reject_on_worker_lost=True, queue=QUEUE)
def upsert_three(chain_id: str) -> dict[str, int]:
    return _save(chain_id, 3)


def upsert_chain(app: Any, chain_id: str) -> Any:
    """The three upserting links as one Celery chain, from `app` (so the tasks' options apply)."""
    return chain(*(app.tasks[f"bench.upsert_{n}"].si(chain_id) for n in ("one", "two", "three")))
