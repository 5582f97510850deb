"""Route content workflow endpoints (seed 000): read a route's workflow, restart its TTS batch."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from sagas.route_content import RouteContent, restart_step, route_view

from . import actor, query, runtime
from .openapi import doc
from .schemas import RouteStepQuery, RouteWorkflow

bp = Blueprint("routes", __name__)
TAGS = ("route content",)


# `path:`: a route id is the producer's and may hold "/" (`city/r-42`), which a plain
# converter refused: such a route was started but its endpoints answered 404
@bp.get("/workflows/<path:route_id>")
@doc(RouteWorkflow, errors=(400, 404), tags=TAGS)
def get_route_workflow(route_id: str) -> Any:
    """A route's content workflow: status, mode, steps and stories."""
    engine = runtime().engine
    return route_view(engine.snapshot(RouteContent.find(engine, route_id), history=False))


@bp.post("/workflows/<path:route_id>/restart")
@doc(RouteWorkflow, errors=(400, 404, 409), query=RouteStepQuery, tags=TAGS)
def restart_route_step(route_id: str) -> Any:
    """Reset tts_batch to pending, bump its attempt, re-request the stories not completed
    (400 naming `step` for any other step, 409 unless the batch failed)."""
    engine = runtime().engine
    return route_view(restart_step(engine, route_id, query(RouteStepQuery).step, actor=actor()))
