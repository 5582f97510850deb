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
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, WithJsonSchema

from sqlalchemy import Integer, String, Text, select
from sqlalchemy.orm import Mapped, mapped_column
from statemachine import State

from orchestrator.config import Settings
from orchestrator.errors import NotFound
from orchestrator.jsonutil import iso
from orchestrator.kafka_events import Ignored, KafkaEvent
from orchestrator.models import Base, UTCDateTime, utcnow
from orchestrator.schemas import INT32_MAX, INT64_MAX, Contract, Event, check_url, parse, parse_value, problem
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


def _uuid(value: str) -> str:
    try:
        return str(uuid.UUID(value.strip()))
    except ValueError:
        raise problem(f"must be a UUID, got {value[:80]!r}") from None


def _camera_url(value: str) -> str:
    if not value.strip():
        raise problem("is required: a stream URL such as rtsp://host/stream")
    return check_url(value, CAMERA_SCHEMES, credentials=True)  # rtsp://user:pass@camera/


#: A UUID in any of the spellings Python's uuid accepts, kept in its canonical form.
UuidText = Annotated[str, AfterValidator(_uuid), WithJsonSchema({"type": "string", "format": "uuid"})]
CameraUrl = Annotated[str, AfterValidator(_camera_url), WithJsonSchema(
    {"type": "string", "format": "uri", "pattern": "^(rtsp|rtsps|rtmp|http|https)://[^\\s]+$"})]


# -- schemas: the Kafka contract (docs/kafka.md; /asyncapi.json is generated from these) ----------
class InitScenario(Event):
    """`init_scenario` (consumed, any key): deploy one worker for a camera of a scenario."""

    scenario_uuid: UuidText
    camera_url: CameraUrl


class ToDeploy(Event):
    """`to_deploy` (produced, key `worker_id`): the runner deploys this worker."""

    worker_id: UuidText
    scenario_uuid: UuidText
    camera_url: str


class WorkerStatusReport(Event):
    """`worker.status` (consumed, key `worker_id`): the runner's report on a worker."""

    worker_id: UuidText
    status: Literal[REPORTED]  # type: ignore[valid-type]
    process_pid: int | None = Field(None, ge=0, le=INT32_MAX)
    reason: str | None = None


class WorkersQuery(Contract):
    """GET /workers query parameters (seed 001)."""

    status: Literal[STATUSES] | None = None  # type: ignore[valid-type]
    scenario_uuid: UuidText | None = None
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=INT64_MAX)


@register
class WorkerDeployment(Workflow):
    type = "worker_deployment"
    start_event = "deploy"
    success_states = frozenset({"stopped"})
    failure_states = frozenset({"failed"})

    kafka_consumes = {"init_scenario": "on_init_scenario", "worker.status": "on_worker_status"}
    kafka_produces = ("to_deploy",)
    kafka_schemas = {"init_scenario": InitScenario, "to_deploy": ToDeploy, "worker.status": WorkerStatusReport}
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
        return parse(InitScenario, data).model_dump()

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
        p = parse(WorkerStatusReport, event.payload)
        worker_id, status, pid, reason = p.worker_id, p.status, p.process_pid, p.reason
        with engine.reading() as conn:  # inside the bridge's batch: its connection (Engine.reading)
            row = conn.execute(select(Worker.status).where(Worker.worker_id == worker_id)).first()
        if row is None:
            raise NotFound(f"unknown worker_id {worker_id}", worker_id=worker_id)
        event_name = f"report_{status}"
        if row.status == status:
            raise Ignored(f"worker {worker_id} is already {status}")
        engine.fire(worker_id, event_name, {"process_pid": pid, "reason": reason}, actor="kafka:worker.status")
        return "accepted"


def get_worker(engine: Any, worker_id: str) -> dict[str, Any]:
    wid = parse_value(UuidText, worker_id, "worker_id")
    with engine.sessions() as s:
        row = s.execute(select(Worker).where(Worker.worker_id == wid)).scalar_one_or_none()
        if row is None:
            raise NotFound(f"worker {wid} not found", worker_id=wid)
        return worker_dict(row)


def list_workers(engine: Any, query: WorkersQuery) -> dict[str, Any]:
    """A page of workers, newest first, filtered by the query's status and scenario."""
    from sqlalchemy import func

    q = select(Worker)
    if query.status:
        q = q.where(Worker.status == query.status)
    if query.scenario_uuid:
        q = q.where(Worker.scenario_uuid == query.scenario_uuid)
    limit, offset = query.limit, query.offset
    with engine.sessions() as s:
        total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
        rows = s.execute(q.order_by(Worker.id.desc()).limit(limit).offset(offset)).scalars().all()
        return {"total": total, "limit": limit, "offset": offset, "items": [worker_dict(r) for r in rows]}
