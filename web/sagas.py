"""The generic workflow API: start, list, read, signal, restart, cancel."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from orchestrator.errors import InvalidInput

from . import actor, body, query, runtime
from .openapi import doc
from .schemas import (IdempotencyHeader, Instance, InstancePage, SagaListQuery, SignalPayload, StartSaga,
                      StartSagaOfType, StepQuery)

bp = Blueprint("sagas", __name__)
TAGS = ("workflows",)


def _start(type_name: str, key: str | None, data: dict[str, Any]) -> Any:
    cls = runtime().engine.registry.get(type_name)
    if cls is not None and cls.started_by:
        # Its own way in checks what this endpoint cannot (a session, a project, a Kafka key).
        raise InvalidInput("type", f"a '{type_name}' workflow is started by {cls.started_by}, "
                                   "not by the generic start")
    snapshot, created = runtime().engine.start(  # the input's fields are named inside `input`
        type_name, data, key=key, idempotency_key=request.headers.get("Idempotency-Key"), input_field="input",
        actor=actor())
    return snapshot, (201 if created else 200)


@bp.post("/saga")
@doc(Instance, status=201, also={200: Instance}, errors=(400, 404, 409), json=StartSaga,
     headers=IdempotencyHeader, tags=TAGS)
def start_saga() -> Any:
    """Start a workflow (idempotent by key or Idempotency-Key header); 200 for an existing one."""
    start = body(StartSaga)
    if runtime().engine.registry.get(start.type) is None:  # the registry is known at run time only
        raise InvalidInput("type", f"unknown workflow type '{start.type}'; known: "
                           + ", ".join(runtime().engine.registry.names()))
    return _start(start.type, start.key, start.input)


@bp.post("/saga/<type>")
@doc(Instance, status=201, also={200: Instance}, errors=(400, 404, 409), json=StartSagaOfType,
     headers=IdempotencyHeader, tags=TAGS)
def start_saga_of_type(type: str) -> Any:  # noqa: A002 - the path parameter is named as in SPEC
    """Start a workflow of a type."""
    start = body(StartSagaOfType, required=False)
    return _start(type, start.key, start.input)


@bp.get("/sagas")
@doc(InstancePage, query=SagaListQuery, tags=TAGS)
def list_sagas() -> Any:
    """List instances, newest first, filtered by type, state, business key, creation time,
    failure message or a step's status; 400 naming the parameter for a malformed one."""
    q = query(SagaListQuery)
    total, items = runtime().engine.list(q, limit=q.limit, offset=q.offset)
    return {"total": total, "limit": q.limit, "offset": q.offset, "items": items}


@bp.get("/sagas/<instance:instance_id>")
@doc(Instance, errors=(400, 404), tags=TAGS)
def get_saga(instance_id: str) -> Any:
    """State, context, steps and history."""
    return runtime().engine.snapshot(instance_id)


@bp.post("/sagas/<instance:instance_id>/events/<event>")
@doc(Instance, errors=(400, 404, 409), json=SignalPayload, tags=TAGS)
def fire_event(instance_id: str, event: str) -> Any:
    """A signal the workflow declares for users (Workflow.signals); its own events are refused
    with 400 naming `event`."""
    payload = body(SignalPayload, required=False).root
    return runtime().engine.signal(instance_id, event, payload, actor=actor())


@bp.post("/sagas/<instance:instance_id>/restart")
@doc(Instance, errors=(400, 404, 409), query=StepQuery, tags=TAGS)
def restart_step(instance_id: str) -> Any:
    """Restart a failed step."""
    step = query(StepQuery).step
    return runtime().engine.restart(instance_id, step, actor=actor())


@bp.post("/sagas/<instance:instance_id>/cancel")
@doc(Instance, errors=(400, 404, 409), tags=TAGS)
def cancel(instance_id: str) -> Any:
    """Cancel; declared compensations run in reverse order."""
    return runtime().engine.cancel(instance_id, actor=actor())
