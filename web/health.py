"""Liveness, readiness and metrics."""
from __future__ import annotations

import time
from typing import Any, Callable

from flask import Blueprint, Response
from sqlalchemy import text

from orchestrator.metrics import render

from . import runtime
from .openapi import doc
from .schemas import Liveness, Readiness

bp = Blueprint("health", __name__)
STARTED = time.time()


def check_database() -> None:
    with runtime().db.connect() as conn:
        conn.execute(text("SELECT 1"))


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


def check_kafka() -> None:
    from confluent_kafka.admin import AdminClient

    AdminClient({"bootstrap.servers": runtime().settings.kafka_brokers}).list_topics(timeout=2)


CHECKS: dict[str, Callable[[], None]] = {
    "database": check_database,
    "broker": check_broker,
    "result_backend": check_result_backend,
}


def dependencies() -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    checks = dict(CHECKS)
    if runtime().settings.kafka_brokers:
        checks["kafka"] = check_kafka
    for name, check in checks.items():
        started = time.perf_counter()
        try:
            check()
            out[name] = {"status": "ok", "latency_ms": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:  # a failed dependency is a readiness answer, not an error
            out[name] = {"status": "error", "error": f"{type(exc).__name__}: {exc}"[:300]}
    return out


@bp.get("/healthz")
@doc(Liveness, errors=(), tags=("operations",))
def healthz() -> Any:
    return {"status": "ok", "uptime_seconds": round(time.time() - STARTED, 1)}


@bp.get("/readyz")
@doc(Readiness, also={503: Readiness}, errors=(), tags=("operations",))
def readyz() -> Any:
    deps = dependencies()
    ready = all(d["status"] == "ok" for d in deps.values())
    return {"status": "ready" if ready else "not_ready", "dependencies": deps}, (200 if ready else 503)


@bp.get("/metrics")
@doc(None, errors=(), tags=("operations",))
def metrics() -> Response:
    return Response(render(runtime().sessions), mimetype="text/plain; version=0.0.4")
