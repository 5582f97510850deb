"""The generic workflow API: start, list, read, signal, restart, cancel."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from orchestrator.errors import InvalidInput

from . import int_arg, json_object, runtime

bp = Blueprint("sagas", __name__)


def _start(type_name: str, body: dict[str, Any]) -> Any:
    cls = runtime().engine.registry.get(type_name)
    if cls is not None and cls.started_by:
        # Its own way in checks what this endpoint cannot (a session, a project, a Kafka key).
        raise InvalidInput("type", f"a '{type_name}' workflow is started by {cls.started_by}, "
                                   "not by the generic start")
    key = body.get("key")
    if key is not None and not isinstance(key, str):
        raise InvalidInput("key", "must be a string")
    data = body.get("input", {})
    if not isinstance(data, dict):
        raise InvalidInput("input", "must be a JSON object")
    snapshot, created = runtime().engine.start(
        type_name, data, key=key, idempotency_key=request.headers.get("Idempotency-Key"))
    return snapshot, (201 if created else 200)


@bp.post("/saga")
def start_saga() -> Any:
    body = json_object("type", "key", "input")
    type_name = body.get("type")
    if not isinstance(type_name, str) or not type_name:
        raise InvalidInput("type", "is required: the workflow type, one of "
                           + ", ".join(runtime().engine.registry.names()))
    if runtime().engine.registry.get(type_name) is None:
        raise InvalidInput("type", f"unknown workflow type '{type_name}'; known: "
                           + ", ".join(runtime().engine.registry.names()))
    return _start(type_name, body)


@bp.post("/saga/<type_name>")
def start_saga_of_type(type_name: str) -> Any:
    body = json_object(required=False)
    return _start(type_name, {"key": body.get("key"), "input": body.get("input", {})})


@bp.get("/sagas")
def list_sagas() -> Any:
    limit = int_arg("limit", 50, 1, 500)
    offset = int_arg("offset", 0)
    total, items = runtime().engine.list(request.args.get("type"), request.args.get("state"), limit, offset)
    return {"total": total, "limit": limit, "offset": offset, "items": items}


@bp.get("/sagas/<instance_id>")
def get_saga(instance_id: str) -> Any:
    return runtime().engine.snapshot(instance_id)


@bp.post("/sagas/<instance_id>/events/<event>")
def fire_event(instance_id: str, event: str) -> Any:
    """A signal the workflow declares for users (Workflow.signals); its own events are refused."""
    payload = json_object(required=False)
    return runtime().engine.signal(instance_id, event, payload, actor=request.headers.get("X-Actor", "api"))


@bp.post("/sagas/<instance_id>/restart")
def restart_step(instance_id: str) -> Any:
    step = request.args.get("step")
    if not step:
        raise InvalidInput("step", "query parameter is required")
    return runtime().engine.restart(instance_id, step, actor=request.headers.get("X-Actor", "api"))


@bp.post("/sagas/<instance_id>/cancel")
def cancel(instance_id: str) -> Any:
    return runtime().engine.cancel(instance_id, actor=request.headers.get("X-Actor", "api"))
