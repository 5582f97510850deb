"""Prometheus metrics. Counters and histograms work across processes (multiprocess mode when
PROMETHEUS_MULTIPROC_DIR is set); gauges about workflows are read from the database at scrape."""
from __future__ import annotations

import os
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select

HTTP_REQUESTS = Counter("orchestrator_http_requests_total", "HTTP requests", ["method", "endpoint", "status"])
HTTP_LATENCY = Histogram("orchestrator_http_request_seconds", "HTTP request latency", ["method", "endpoint"])


def multiprocess() -> bool:
    """Whether this process's metrics are shared with others (PROMETHEUS_MULTIPROC_DIR is set:
    prometheus_client's multiprocess mode, as under `orchestrator dev` and `orchestrator api`)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class DatabaseCollector:
    """Workflow instances by type and state, active steps, outbox backlog, due timers."""

    def __init__(self, sessions: Any) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The gauges, after `orchestrator_database_up` 1; only that gauge, at 0, when the
        database does not answer or has no schema yet: the page still carries every other
        metric (it answered 503, and a scrape during an outage lost the HTTP figures too)."""
        from sqlalchemy.exc import DBAPIError

        try:
            families: list[GaugeMetricFamily] | None = list(self._read())
        except DBAPIError:
            families = None
        yield GaugeMetricFamily("orchestrator_database_up", "Whether the database answered this scrape's queries",
                                value=0 if families is None else 1)
        yield from families or ()

    def _read(self) -> Iterator[GaugeMetricFamily]:
        from .models import OutboxMessage, StepRun, Timer, WorkflowInstance, utcnow

        instances = GaugeMetricFamily("orchestrator_workflow_instances", "Instances by type and state",
                                      labels=["type", "state"])
        steps = GaugeMetricFamily("orchestrator_steps", "Step rows by status", labels=["status"])
        with self.sessions() as s:
            for type_, state, n in s.execute(select(WorkflowInstance.type, WorkflowInstance.state,
                                                    func.count()).group_by(WorkflowInstance.type,
                                                                           WorkflowInstance.state)):
                instances.add_metric([type_, state or ""], n)
            for status, n in s.execute(select(StepRun.status, func.count()).group_by(StepRun.status)):
                steps.add_metric([status], n)
            backlog = s.execute(select(func.count()).where(OutboxMessage.sent_at.is_(None))).scalar_one()
            due = s.execute(select(func.count()).where(Timer.fired_at.is_(None),
                                                       Timer.due_at <= utcnow())).scalar_one()
        yield instances
        yield steps
        yield GaugeMetricFamily("orchestrator_outbox_backlog", "Outbox rows not yet published", value=backlog)
        yield GaugeMetricFamily("orchestrator_timers_due", "Timers due and not yet fired", value=due)


def render(sessions: Any) -> bytes:
    registry = CollectorRegistry()
    if multiprocess():
        from prometheus_client import multiprocess as shared

        shared.MultiProcessCollector(registry)
    else:
        from prometheus_client import REGISTRY

        registry = REGISTRY  # type: ignore[assignment]
        return generate_latest(registry) + generate_latest(_db_registry(sessions))
    registry.register(DatabaseCollector(sessions))  # type: ignore[arg-type]
    return generate_latest(registry)


def _db_registry(sessions: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(DatabaseCollector(sessions))  # type: ignore[arg-type]
    return registry
