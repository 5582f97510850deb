"""The media pipeline's own endpoints, in the exact shapes of seed 004."""
from __future__ import annotations

from datetime import timedelta
from typing import Any

import requests
from flask import Blueprint, request
from sqlalchemy import delete, func, select

from orchestrator.errors import NotFound
from orchestrator.jsonutil import iso, loads
from orchestrator.logs import redact
from orchestrator.models import OutboxMessage, ProcessedMessage, WorkflowInstance, utcnow
from sagas.media import STAGES, PipelineRequest
from sagas.media.settings import MediaSettings

from . import actor, auth, health, json_body, query, runtime
from .openapi import doc
from .schemas import (AdminHeader, AdminStats, Cleanup, CleanupQuery, FactoryReset, IdempotencyHeader, Job, JobPage,
                      JobsQuery, PipelineStarted, ServiceHealth)

bp = Blueprint("media", __name__)
TAGS = ("media",)
OPS = ("operations",)
VERSION = "1.0.0"
SERVICES = ("video-downloader", "audio-normalization", "audio-transcriber")
STAGE_STATES = {"download": "downloading", "normalization": "normalizing", "transcription": "transcribing"}


def started(step: dict[str, Any] | None) -> bool:
    """Whether a stage's step has begun its work: it ran (started_at), polled the service or
    reported progress. A polling step goes back to `queued` between polls, and a retry waits
    `queued` too: neither is "not started" to someone watching the job."""
    return bool(step) and bool(step["started_at"] or step["polls"] or step["progress"])  # type: ignore[index]


def job_status(snapshot: dict[str, Any]) -> str:
    """The seed's job status: queued until the first stage has started, then the state's name
    (never back to queued: see `started`)."""
    state = snapshot["state"]
    steps = {s["name"]: s for s in snapshot.get("steps", [])}
    first = steps.get("download")
    if state == "queued" or (state == "downloading" and first and first["status"] in ("pending", "queued")
                             and first["attempt"] <= 1 and first["restarts"] == 0 and not started(first)):
        return "queued"
    return state


#: Every status a stage shows (README); the seed itself shows only completed.
STAGE_STATUSES = ("pending", "processing", "completed", "failed", "cancelled")


def stage_view(step: dict[str, Any] | None) -> dict[str, Any]:
    """A stage as seed 004 shows it: pending until its step starts, then processing until it
    completes or fails (a step queued for its next poll or retry still reads processing), or
    cancelled with its job: one of STAGE_STATUSES, as the README lists them."""
    if step is None:
        return {"status": "pending", "job_id": None, "progress": 0.0, "started_at": None, "completed_at": None}
    status = step["status"]
    progress = 100.0 if status == "completed" else round(float(step["progress"]), 1)
    shown = {"queued": "pending", "waiting": "processing"}.get(status, status)
    if shown == "pending" and started(step):
        shown = "processing"
    view = {
        "status": shown,
        "job_id": (step["data"].get("output") or {}).get("remote_job_id") or step["data"].get("remote_job_id"),
        "progress": progress,
        "started_at": _iso(step["started_at"]),
        "completed_at": _iso(step["finished_at"]) if status == "completed" else None,
        "attempt": step["attempt"],
    }
    if step["error"]:
        view["error"] = step["error"]
    return view


def _iso(value: str | None) -> str | None:
    from datetime import datetime

    return iso(datetime.fromisoformat(value)) if value else None


def overall_progress(stages: dict[str, dict[str, Any]]) -> float:
    return round(sum(s["progress"] for s in stages.values()) / len(stages), 1)


def job_view(snapshot: dict[str, Any]) -> dict[str, Any]:
    steps = {s["name"]: s for s in snapshot.get("steps", [])}
    stages = {name: stage_view(steps.get(name)) for name in STAGES}
    transcription = (steps.get("transcription") or {}).get("data", {}).get("output") or {}
    normalization = (steps.get("normalization") or {}).get("data", {}).get("output") or {}
    status = job_status(snapshot)
    view: dict[str, Any] = {
        "job_id": snapshot["id"],
        "youtube_url": snapshot["context"]["input"]["youtube_url"],
        "status": status,
        "overall_progress": 100.0 if status == "completed" else overall_progress(stages),
        "created_at": _iso(snapshot["created_at"]),
        "updated_at": _iso(snapshot["updated_at"]),
        "completed_at": _iso(snapshot["finished_at"]) if status == "completed" else None,
        "stages": stages,
        "transcription_text": transcription.get("text"),
        "transcription_segments": transcription.get("segments"),
        "transcription_file": transcription.get("transcription_file"),
        "audio_file": normalization.get("audio_file"),
    }
    if snapshot["context"].get("error"):
        view["error"] = snapshot["context"]["error"]
    return view


@bp.post("/pipeline")
@doc(PipelineStarted, errors=(400, 409), json=PipelineRequest, headers=IdempotencyHeader, tags=TAGS)
def start_pipeline() -> Any:
    """Start a media pipeline, or answer the cached job for the same request (seed 004).
    Unknown fields are refused; the workflow's input check parses PipelineRequest."""
    body = json_body()
    snapshot, created = runtime().engine.start(
        "media", body, idempotency_key=request.headers.get("Idempotency-Key"), actor=actor())
    view = job_view(snapshot)
    return {
        "job_id": view["job_id"],
        "status": view["status"],
        "message": "Pipeline iniciado com sucesso" if created else "Job existente reutilizado",
        "youtube_url": view["youtube_url"],
        "overall_progress": view["overall_progress"],
    }


@bp.get("/jobs/<job_id>")
@doc(Job, errors=(400, 404), tags=TAGS)
def get_job(job_id: str) -> Any:
    snapshot = runtime().engine.snapshot(job_id, history=False)
    if snapshot["type"] != "media":
        raise NotFound(f"job {job_id} not found", job_id=job_id)
    return job_view(snapshot)


@bp.get("/jobs")
@doc(JobPage, query=JobsQuery, tags=TAGS)
def list_jobs() -> Any:
    """Recent media jobs."""
    limit = query(JobsQuery).limit
    engine = runtime().engine
    total, items = engine.list("media", None, limit, 0)
    jobs = []
    for item in items:
        view = job_view(engine.snapshot(item["id"], history=False))
        jobs.append({"job_id": view["job_id"], "youtube_url": view["youtube_url"], "status": view["status"],
                     "progress": view["overall_progress"], "created_at": view["created_at"],
                     "updated_at": view["updated_at"]})
    return {"total": total, "jobs": jobs}


def _service_health(service: str) -> str:
    url = MediaSettings.from_settings(runtime().settings).service_url(service)
    try:
        resp = requests.get(f"{url}/health", timeout=3)
        return "healthy" if resp.ok else f"unhealthy (HTTP {resp.status_code})"
    except requests.RequestException as exc:
        return f"unreachable ({type(exc).__name__})"


@bp.get("/health")
@doc(ServiceHealth, errors=(), tags=OPS)
def service_health() -> Any:
    micro = {service: _service_health(service) for service in SERVICES}
    deps = health.dependencies()
    healthy = all(v == "healthy" for v in micro.values()) and all(d["status"] == "ok" for d in deps.values())
    return {
        "status": "healthy" if healthy else "degraded",
        "service": "ytcaption-orchestrator",
        "version": VERSION,
        "timestamp": iso(utcnow()),
        "microservices": micro,
        "dependencies": deps,
    }


def _counts() -> dict[str, int]:
    with runtime().sessions() as s:
        rows = dict(s.execute(select(WorkflowInstance.state, func.count()).where(
            WorkflowInstance.type == "media").group_by(WorkflowInstance.state)).all())
    total = sum(rows.values())
    finished = sum(rows.get(k, 0) for k in ("completed", "failed", "cancelled"))
    return {"total_jobs": total, "active_jobs": total - finished, "completed_jobs": rows.get("completed", 0),
            "failed_jobs": rows.get("failed", 0)}


def _database_size() -> str:
    rt = runtime()
    try:
        if rt.settings.is_sqlite:
            import os

            path = rt.settings.database_url.split(":///", 1)[-1]
            size = os.path.getsize(path) if os.path.exists(path) else 0
        else:
            with rt.db.connect() as conn:
                from sqlalchemy import text

                size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
    except Exception:
        return "unknown"
    return f"{size / 1024 / 1024:.1f}MB"


@bp.get("/admin/stats")
@doc(AdminStats, errors=(401, 403), headers=AdminHeader, tags=OPS)
def stats() -> Any:
    """Job counts, database size and the media settings in force (admin: ADMIN_TOKEN). Names no
    secret: no URL, token or password."""
    auth.require_admin()
    s = runtime().settings
    media = MediaSettings.from_settings(s)
    return {
        "orchestrator": {"version": VERSION, "environment": s.environment},
        # The seed kept jobs in Redis; they live in the database now. The key stays for clients.
        "redis": {**_counts(), "memory_usage": _database_size()},
        "settings": {"cache_ttl_hours": media.cache_ttl_hours, "job_timeout_minutes": media.job_timeout_minutes,
                     "poll_interval": media.poll_interval, "max_poll_attempts": media.max_poll_attempts},
    }


def cleanup(max_age: timedelta | None, deep: bool) -> int:
    """Remove finished media jobs older than max_age (all jobs when None); deep also drops
    delivered outbox rows and de-duplication records of that age."""
    rt = runtime()
    with rt.sessions() as s:
        q = select(WorkflowInstance.id).where(WorkflowInstance.type == "media")
        if max_age is not None:
            q = q.where(WorkflowInstance.finished.is_(True), WorkflowInstance.updated_at < utcnow() - max_age)
        ids = list(s.execute(q).scalars())
    removed = rt.engine.delete_instances(ids)
    if deep:
        cutoff = utcnow() - (max_age or timedelta(0))
        with rt.sessions() as s, s.begin():
            s.execute(delete(OutboxMessage).where(OutboxMessage.sent_at.is_not(None),
                                                  OutboxMessage.sent_at < cutoff))
            s.execute(delete(ProcessedMessage).where(ProcessedMessage.created_at < cutoff))
    return removed


@bp.post("/admin/cleanup")
@doc(Cleanup, errors=(400, 401, 403), query=CleanupQuery, headers=AdminHeader, tags=OPS)
def admin_cleanup() -> Any:
    """Remove finished jobs older than max_age_hours (deep: delivered outbox rows too); admin."""
    auth.require_admin()
    q = query(CleanupQuery)
    removed = cleanup(timedelta(hours=q.max_age_hours), q.deep)
    return {"message": "Cleanup executado com sucesso", "jobs_removed": removed, "logs_cleaned": q.deep}


@bp.post("/admin/factory-reset")
@doc(FactoryReset, errors=(401, 403), headers=AdminHeader, tags=OPS)
def factory_reset() -> Any:
    """Delete every media job (running ones too), every delivered outbox row and every
    de-duplication record, and ask the three media services to reset; admin. Other workflow
    types' instances are kept (README: the seed's message says "all services")."""
    auth.require_admin()
    removed = cleanup(None, deep=True)
    micro: dict[str, Any] = {}
    for service in SERVICES:
        url = MediaSettings.from_settings(runtime().settings).service_url(service)
        try:
            resp = requests.post(f"{url}/admin/factory-reset", timeout=10)
            resp.raise_for_status()
            micro[service] = {"status": "success", "data": loads(resp.content)}
        except (requests.RequestException, ValueError) as exc:
            micro[service] = {"status": "error", "error": redact(f"{type(exc).__name__}: {exc}")[:300]}
    return {
        "message": "Factory reset executado em todos os serviços",
        "orchestrator": {"jobs_removed": removed, "logs_cleaned": True},
        "microservices": micro,
        "warning": "Todos os dados foram removidos de todos os serviços",
    }
