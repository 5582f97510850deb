"""Worker deployment endpoints (seed 001): list and read workers with the seed's columns."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, request

from sagas.worker_deployment import get_worker, list_workers

from . import int_arg, runtime

bp = Blueprint("workers", __name__)


@bp.get("/workers")
def list_all() -> Any:
    return list_workers(runtime().engine, request.args.get("status") or None,
                        request.args.get("scenario_uuid") or None,
                        int_arg("limit", 50, 1, 500), int_arg("offset", 0))


@bp.get("/workers/<worker_id>")
def get_one(worker_id: str) -> Any:
    return get_worker(runtime().engine, worker_id)
