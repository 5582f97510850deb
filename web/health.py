"""Liveness, readiness and metrics.

`/healthz` is liveness: the process answers. `/readyz` is readiness: 200 once the database (its
schema migrated to every head), the broker, the result backend, Redis (REDIS_URL) and Kafka
(KAFKA_BROKERS) answer, else 503 naming what is down (`down`), each dependency with its address
(password masked) and the error."""
from __future__ import annotations

import time
from typing import Any, Callable

from flask import Blueprint, Response
from sqlalchemy import text

from orchestrator.logs import first_line, mask_url, redact
from orchestrator.metrics import render

from . import runtime
from .openapi import doc
from .schemas import Liveness, Readiness

bp = Blueprint("health", __name__)
STARTED = time.time()


def check_database() -> None:
    """The database answers and its schema is at every head: a database never migrated
    answers too, but every request that writes would fail on its missing tables."""
    from orchestrator.migrate import check_schema

    with runtime().db.connect() as conn:
        check_schema(conn, runtime().settings.workflow_modules)


def database_down() -> str | None:
    """Why the database cannot serve requests now (unreachable, or its schema behind: the
    first line of the error, passwords masked), or None when `check_database` passes."""
    try:
        check_database()
    except Exception as exc:  # the answer is the reason itself
        return first_line(exc)
    return None


def check_broker() -> None:
    with runtime().celery.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1, timeout=2)


def check_result_backend() -> None:
    backend = runtime().celery.backend
    client = getattr(backend, "client", None)
    if client is not None and hasattr(client, "ping"):
        client.ping()
    elif hasattr(backend, "ResultSession"):
        with backend.ResultSession() as session:
            session.execute(text("SELECT 1"))


def check_redis() -> None:
    import redis

    client = redis.Redis.from_url(runtime().settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    finally:
        client.close()


def check_kafka() -> None:
    from confluent_kafka.admin import AdminClient

    AdminClient({"bootstrap.servers": runtime().settings.kafka_brokers}).list_topics(timeout=2)


CHECKS: dict[str, Callable[[], None]] = {
    "database": check_database,
    "broker": check_broker,
    "result_backend": check_result_backend,
}


def addresses() -> dict[str, str]:
    """Where each dependency is looked for, passwords masked."""
    s = runtime().settings
    out = {"database": s.database_url, "broker": s.broker_url, "result_backend": s.result_backend,
           "redis": s.redis_url, "kafka": s.kafka_brokers}
    return {name: mask_url(url) for name, url in out.items() if url}


def dependencies() -> dict[str, dict[str, Any]]:
    """Each dependency's answer now: {"status": "ok"|"error", "address", "latency_ms" | "error"}."""
    out: dict[str, dict[str, Any]] = {}
    checks = dict(CHECKS)
    if runtime().settings.redis_url:
        checks["redis"] = check_redis
    if runtime().settings.kafka_brokers:
        checks["kafka"] = check_kafka
    where = addresses()
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            check()
            out[name] = {"status": "ok", "address": where.get(name),
                         "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:  # a failed dependency is a readiness answer, not an error
            out[name] = {"status": "error", "address": where.get(name),
                         "error": redact(f"{type(exc).__name__}: {exc}")[:300]}
    return out


@bp.get("/healthz")
@doc(Liveness, errors=(), tags=("operations",))
def healthz() -> Any:
    return {"status": "ok", "uptime_seconds": round(time.time() - STARTED, 1)}


@bp.get("/readyz")
@doc(Readiness, also={503: Readiness}, errors=(), tags=("operations",))
def readyz() -> Any:
    """200 when every dependency answers; 503 naming those that do not (`down`)."""
    deps = dependencies()
    down = [name for name, d in deps.items() if d["status"] != "ok"]
    return ({"status": "not_ready" if down else "ready", "down": down, "dependencies": deps},
            503 if down else 200)


@bp.get("/metrics")
@doc(None, errors=(), tags=("operations",))
def metrics() -> Response:
    return Response(render(runtime().sessions), mimetype="text/plain; version=0.0.4")
