"""Route content workflow endpoints (seed 000): read a route's workflow, restart its TTS batch."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from sagas.route_content import RouteContent, restart_step, route_view

from . import runtime

bp = Blueprint("routes", __name__)


@bp.get("/workflows/<route_id>")
def get_route_workflow(route_id: str) -> Any:
    engine = runtime().engine
    return route_view(engine.snapshot(RouteContent.find(engine, route_id), history=False))


@bp.post("/workflows/<route_id>/restart")
def restart_route_step(route_id: str) -> Any:
    engine = runtime().engine
    return route_view(restart_step(engine, route_id, request.args.get("step")))
