"""Worker deployment endpoints (seed 001): list and read workers with the seed's columns."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from sagas.worker_deployment import WorkersQuery, get_worker, list_workers

from . import query, runtime
from .openapi import doc
from .schemas import WorkerPage, WorkerView

bp = Blueprint("workers", __name__)
TAGS = ("workers",)


@bp.get("/workers")
@doc(WorkerPage, query=WorkersQuery, tags=TAGS)
def list_all() -> Any:
    """Workers, newest first."""
    return list_workers(runtime().engine, query(WorkersQuery))


@bp.get("/workers/<worker_id>")
@doc(WorkerView, errors=(400, 404), tags=TAGS)
def get_one(worker_id: str) -> Any:
    """One worker with the seed's columns (400 for a malformed UUID)."""
    return get_worker(runtime().engine, worker_id)
