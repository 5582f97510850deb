"""Worker deployment (seed 001): init_scenario -> worker row -> to_deploy -> deployed; then the
runner's reports on `worker.status` move the worker along legal transitions only.

    pending --deploy--> deployed --report_running--> running --report_stopped--> stopped
                        deployed / running --report_failed--> failed; deployed --report_stopped--> stopped

The worker row (the seed's `workers` table) is written in the same transaction as the
transition and the outgoing `to_deploy` message. The worker id is the instance id. An
init_scenario event is started once: its business key is the event id (the `event_id` header
when the producer sets one, else partition:offset@timestamp, which a re-created topic or a new
broker does not repeat: see `kafka_bridge.event_id`), so a redelivery or a second copy of the
same event makes no second worker. Failed workers are kept.
"""
from __future__ import annotations

import logging
import re
import uuid
from datetime import datetime
from typing import Any
from urllib.parse import urlparse

from sqlalchemy import Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column
from statemachine import State

from orchestrator.config import Settings
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.jsonutil import iso
from orchestrator.kafka_bridge import Ignored, KafkaEvent, require
from orchestrator.models import Base, UTCDateTime, utcnow
from orchestrator.workflow import Workflow, register

log = logging.getLogger(__name__)

STATUSES = ("pending", "deployed", "running", "failed", "stopped")
REPORTED = ("running", "failed", "stopped")
CAMERA_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https")


class Worker(Base):
    """The seed's `workers` table."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    worker_id: Mapped[str] = mapped_column(String(36), unique=True)
    scenario_uuid: Mapped[str] = mapped_column(String(36), index=True)
    camera_url: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(50), default="pending", index=True)
    process_pid: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


def worker_dict(w: Worker) -> dict[str, Any]:
    return {"id": w.id, "worker_id": w.worker_id, "scenario_uuid": w.scenario_uuid, "camera_url": w.camera_url,
            "status": w.status, "process_pid": w.process_pid, "reason": w.reason,
            "created_at": iso(w.created_at), "updated_at": iso(w.updated_at)}


def parse_uuid(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(field, "must be a UUID string")
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise InvalidInput(field, f"must be a UUID, got {value[:80]!r}") from None


def parse_camera_url(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("camera_url", "is required: a stream URL such as rtsp://host/stream")
    url = value.strip()
    parsed = urlparse(url)
    if parsed.scheme not in CAMERA_SCHEMES or not parsed.netloc or len(url) > 2048 or re.search(r"\s", url):
        raise InvalidInput("camera_url", f"must be an {'/'.join(CAMERA_SCHEMES)} URL with a host, got {url[:80]!r}")
    return url


@register
class WorkerDeployment(Workflow):
    type = "worker_deployment"
    start_event = "deploy"
    success_states = frozenset({"stopped"})
    failure_states = frozenset({"failed"})

    kafka_consumes = {"init_scenario": "on_init_scenario", "worker.status": "on_worker_status"}
    kafka_produces = ("to_deploy",)
    # No user signals: the runner's reports arrive on worker.status through the bridge.
    signals: dict[str, Any] = {}
    started_by = "an init_scenario event on Kafka"

    pending = State(initial=True)
    deployed = State()
    running = State()
    failed = State(final=True)
    stopped = State(final=True)

    deploy = pending.to(deployed)
    report_running = deployed.to(running)
    report_failed = deployed.to(failed) | running.to(failed)
    report_stopped = deployed.to(stopped) | running.to(stopped)

    def _row(self) -> Worker:
        session = self.session
        assert session is not None, "a worker transition runs inside the engine's transaction"
        row = session.execute(select(Worker).where(Worker.worker_id == self.model.id)).scalar_one_or_none()
        if row is None:
            data = self.model.context["input"]
            row = Worker(worker_id=self.model.id, scenario_uuid=data["scenario_uuid"],
                         camera_url=data["camera_url"], status="pending", created_at=utcnow(),
                         updated_at=utcnow())
            session.add(row)
            session.flush()  # stored as pending, then deployed below in the same transaction
        return row

    def on_deploy(self) -> None:
        row = self._row()
        self.emit("kafka", "to_deploy", {"worker_id": row.worker_id, "scenario_uuid": row.scenario_uuid,
                                         "camera_url": row.camera_url}, key=row.worker_id)

    def after_transition(self, target: State, payload: dict[str, Any] | None = None) -> None:
        if self.session is None:
            return  # the initial state, entered before the instance row is added
        row = self._row()
        row.status = target.id
        payload = payload or {}
        if payload.get("process_pid") is not None:
            row.process_pid = payload["process_pid"]
        if payload.get("reason"):
            row.reason = payload["reason"]
        row.updated_at = utcnow()

    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidInput("body", "must be a JSON object")
        return {"scenario_uuid": parse_uuid(data.get("scenario_uuid"), "scenario_uuid")
                if data.get("scenario_uuid") is not None else require(data, "scenario_uuid", str),
                "camera_url": parse_camera_url(data.get("camera_url"))}

    # -- Kafka handlers --------------------------------------------------------------------------
    @classmethod
    def on_init_scenario(cls, engine: Any, event: KafkaEvent) -> str:
        data = cls.validate_input(event.payload, engine.settings)
        _, created = engine.start(cls.type, data, key=f"init_scenario:{event.event_id}",
                                  actor="kafka:init_scenario")
        if not created:
            raise Ignored(f"init_scenario {event.event_id} already deployed a worker")
        return "accepted"

    @classmethod
    def on_worker_status(cls, engine: Any, event: KafkaEvent) -> str:
        p = event.payload
        worker_id = parse_uuid(p.get("worker_id"), "worker_id") if p.get("worker_id") is not None \
            else require(p, "worker_id", str)
        status = require(p, "status", str)
        if status not in REPORTED:
            raise InvalidInput("status", f"must be one of {', '.join(REPORTED)}, got {status!r}")
        pid = require(p, "process_pid", int, optional=True)
        reason = require(p, "reason", str, optional=True, nonempty=False)
        with engine.sessions() as s:
            row = s.execute(select(Worker.status).where(Worker.worker_id == worker_id)).first()
        if row is None:
            raise NotFound(f"unknown worker_id {worker_id}", worker_id=worker_id)
        event_name = f"report_{status}"
        if row.status == status:
            raise Ignored(f"worker {worker_id} is already {status}")
        engine.fire(worker_id, event_name, {"process_pid": pid, "reason": reason}, actor="kafka:worker.status")
        return "accepted"


def get_worker(engine: Any, worker_id: str) -> dict[str, Any]:
    wid = parse_uuid(worker_id, "worker_id")
    with engine.sessions() as s:
        row = s.execute(select(Worker).where(Worker.worker_id == wid)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"worker {wid} not found", worker_id=wid)
        return worker_dict(row)


def list_workers(engine: Any, status: str | None, scenario_uuid: str | None, limit: int,
                 offset: int) -> dict[str, Any]:
    from sqlalchemy import func

    q = select(Worker)
    if status:
        if status not in STATUSES:
            raise InvalidInput("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")
        q = q.where(Worker.status == status)
    if scenario_uuid:
        q = q.where(Worker.scenario_uuid == parse_uuid(scenario_uuid, "scenario_uuid"))
    with engine.sessions() as s:
        total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        rows = s.execute(q.order_by(Worker.id.desc()).limit(limit).offset(offset)).scalars().all()
        return {"total": total, "limit": limit, "offset": offset, "items": [worker_dict(r) for r in rows]}
