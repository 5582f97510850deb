"""/openapi.json: every endpoint, with its parameters and answers."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from sagas.media import FIELDS

bp = Blueprint("openapi", __name__)

ERROR = {"$ref": "#/components/schemas/Error"}


def _op(summary: str, *, params: list[tuple[str, str, str, bool]] = (), body: dict[str, Any] | None = None,
        answers: dict[str, str] | None = None, tag: str = "workflows") -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": {}}
    if params:
        op["parameters"] = [{"name": n, "in": where, "required": req, "schema": {"type": t}}
                            for n, where, t, req in params]
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    for code, text in (answers or {"200": "OK"}).items():
        resp: dict[str, Any] = {"description": text}
        if int(code) >= 400:
            resp["content"] = {"application/json": {"schema": ERROR}}
        op["responses"][code] = resp
    return op


ID = ("instance_id", "path", "string", True)
ERRORS = {"400": "bad input, the body names the field", "404": "unknown instance",
          "409": "illegal transition; the body carries the current state"}
PIPELINE_BODY = {
    "type": "object", "required": ["youtube_url"], "additionalProperties": False,
    "properties": {
        "youtube_url": {"type": "string", "format": "uri"}, "language": {"type": "string", "default": "auto"},
        "language_out": {"type": ["string", "null"]},
        **{name: {"type": "boolean"} for name in FIELDS[3:]},
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "orchestrator", "version": "0.1.0",
             "description": "Durable multi-step workflows on Celery, RabbitMQ, PostgreSQL and Redis."},
    "paths": {
        "/saga": {"post": _op("Start a workflow (idempotent by key or Idempotency-Key header)", body={
            "type": "object", "required": ["type"],
            "properties": {"type": {"type": "string"}, "key": {"type": "string"}, "input": {"type": "object"}}},
            params=[("Idempotency-Key", "header", "string", False)],
            answers={"201": "created", "200": "existing instance for that key", **ERRORS})},
        "/saga/{type}": {"post": _op("Start a workflow of a type", params=[("type", "path", "string", True),
                                                                          ("Idempotency-Key", "header", "string", False)],
                                     body={"type": "object", "properties": {"key": {"type": "string"}, "input": {"type": "object"}}},
                                     answers={"201": "created", "200": "existing", **ERRORS})},
        "/sagas": {"get": _op("List instances", params=[("type", "query", "string", False),
                                                         ("state", "query", "string", False),
                                                         ("limit", "query", "integer", False),
                                                         ("offset", "query", "integer", False)],
                              answers={"200": "a page of instances", "400": "bad paging parameter"})},
        "/sagas/{instance_id}": {"get": _op("State, context, steps and history", params=[ID],
                                            answers={"200": "the instance", "404": "unknown"})},
        "/sagas/{instance_id}/events/{event}": {"post": _op(
            "Send a signal the workflow declares for users (400 naming 'event' for any other event)",
            params=[ID, ("event", "path", "string", True)],
            body={"type": "object"}, answers={"200": "the instance after the transition", **ERRORS})},
        "/sagas/{instance_id}/restart": {"post": _op(
            "Restart a failed step", params=[ID, ("step", "query", "string", True)],
            answers={"200": "the instance", **ERRORS})},
        "/sagas/{instance_id}/cancel": {"post": _op(
            "Cancel; declared compensations run in reverse order", params=[ID],
            answers={"200": "the instance", **ERRORS})},
        "/pipeline": {"post": _op("Start a media pipeline (seed 004)", body=PIPELINE_BODY, tag="media",
                                  params=[("Idempotency-Key", "header", "string", False)],
                                  answers={"200": "job queued, or the cached result", "400": "bad input"})},
        "/jobs/{job_id}": {"get": _op("A media job with its stages", tag="media",
                                      params=[("job_id", "path", "string", True)],
                                      answers={"200": "the job", "404": "unknown job"})},
        "/jobs": {"get": _op("Recent media jobs", tag="media", params=[("limit", "query", "integer", False)],
                             answers={"200": "jobs", "400": "bad limit"})},
        "/health": {"get": _op("Orchestrator and microservices health", tag="operations")},
        "/admin/stats": {"get": _op("Job counts and settings", tag="operations")},
        "/admin/cleanup": {"post": _op("Remove finished jobs older than max_age_hours", tag="operations",
                                       params=[("max_age_hours", "query", "number", False),
                                               ("deep", "query", "boolean", False)],
                                       answers={"200": "removed", "400": "bad parameter"})},
        "/admin/factory-reset": {"post": _op("Remove everything in every service", tag="operations",
                                             params=[("X-Admin-Token", "header", "string", True)],
                                             answers={"200": "reset", "401": "wrong token",
                                                      "403": "disabled: no ADMIN_TOKEN configured"})},
        "/workflows/{route_id}": {"get": _op(
            "A route's content workflow: status, mode, steps and stories (seed 000)", tag="route content",
            params=[("route_id", "path", "string", True)], answers={"200": "the workflow", "404": "unknown route"})},
        "/workflows/{route_id}/restart": {"post": _op(
            "Reset tts_batch to pending, bump its attempt, re-request the stories not completed", tag="route content",
            params=[("route_id", "path", "string", True), ("step", "query", "string", True)],
            answers={"200": "the workflow", "400": "step missing or not tts_batch", "404": "unknown route",
                     "409": "the step is not failed; the body carries the state"})},
        "/workers": {"get": _op("Workers, newest first (seed 001)", tag="workers",
                                params=[("status", "query", "string", False),
                                        ("scenario_uuid", "query", "string", False),
                                        ("limit", "query", "integer", False), ("offset", "query", "integer", False)],
                                answers={"200": "a page of workers", "400": "bad filter or paging parameter"})},
        "/workers/{worker_id}": {"get": _op("One worker with the seed's columns", tag="workers",
                                            params=[("worker_id", "path", "string", True)],
                                            answers={"200": "the worker", "400": "not a UUID",
                                                     "404": "unknown worker"})},
        "/healthz": {"get": _op("Liveness", tag="operations")},
        "/readyz": {"get": _op("Readiness: database, broker, result backend, Kafka when configured", tag="operations",
                               answers={"200": "ready", "503": "a dependency is down"})},
        "/metrics": {"get": _op("Prometheus metrics", tag="operations")},
        "/openapi.json": {"get": _op("This document", tag="operations")},
    },
    "components": {"schemas": {"Error": {"type": "object", "required": ["error", "message"], "properties": {
        "error": {"type": "string"}, "message": {"type": "string"}, "field": {"type": "string"},
        "state": {"type": "string"}}}}},
}


@bp.get("/openapi.json")
def openapi() -> Any:
    return SPEC
