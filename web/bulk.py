"""Bulk operations: restart, cancel or signal every instance a filter matches (orchestrator/bulk.py).
Admin only: the ADMIN_TOKEN, sent as for /admin/factory-reset."""
from __future__ import annotations

from typing import Any

from flask import Blueprint

from orchestrator import bulk
from orchestrator.errors import InvalidInput, nested_field

from . import auth, body, runtime
from .openapi import doc
from .schemas import AdminHeader, BulkDryRun, BulkRequest, BulkStarted, BulkStatus

bp = Blueprint("bulk", __name__)
TAGS = ("workflows",)
SAMPLE = 20


def require_admin() -> None:
    """401 without a token, 403 with a wrong one, 403 (saying how to enable them) when the
    server has no ADMIN_TOKEN (web/auth.py)."""
    auth.require_admin("bulk operations")


@bp.post("/sagas/bulk")
@doc(BulkStarted, status=202, also={200: BulkDryRun}, errors=(400, 401, 403, 404), json=BulkRequest,
     headers=AdminHeader, tags=TAGS)
def start_bulk() -> Any:
    """Restart a step of, cancel, or send a signal to every instance the filter matches now, at
    `rate_per_second` (default 10). `dry_run` answers the count and a sample and changes nothing;
    otherwise 202 with the `bulk_id` to follow. Durable: sweepers drive it (docs/operations.md)."""
    require_admin()
    return start(body(BulkRequest))


def start(req: BulkRequest) -> Any:
    """Dry run (200 `{"matched", "sample"}`) or start (202 `{"bulk_id", "matched", "status"}`)
    of the bulk operation `req`, once the caller has checked who asks (the admin token here,
    the console's own login in web/console.py)."""
    engine = runtime().engine
    bulk.check(engine, bulk.Spec(req.action, req.step, req.event, req.payload, req.rate_per_second),
               req.filter.type)
    try:
        ids = bulk.match_ids(engine, req.filter)
    except InvalidInput as exc:  # a filter field the registry does not know: named inside `filter`
        raise InvalidInput(nested_field("filter", exc.field), exc.problem, exc.status) from None
    if req.dry_run:
        return {"matched": len(ids), "sample": ids[:SAMPLE]}
    job = bulk.create(engine, bulk.Spec(req.action, req.step, req.event, req.payload, req.rate_per_second),
                      ids, req.filter.model_dump(mode="json", exclude_none=True))
    return {"bulk_id": job["bulk_id"], "matched": job["matched"], "status": job["status"]}, 202


@bp.get("/sagas/bulk/<bulk_id>")
@doc(BulkStatus, errors=(400, 401, 403, 404), headers=AdminHeader, tags=TAGS)
def get_bulk(bulk_id: str) -> Any:
    """How a bulk operation stands: done, skipped (no longer eligible) and failed counts, and the
    skipped and failed instances with the reason (`errors`, the first 50)."""
    require_admin()
    return bulk.view(runtime().engine, bulk_id)


@bp.post("/sagas/bulk/<bulk_id>/cancel")
@doc(BulkStatus, errors=(400, 401, 403, 404, 409), headers=AdminHeader, tags=TAGS)
def cancel_bulk(bulk_id: str) -> Any:
    """Stop a running bulk operation: no instance is acted on after this answers (409 if it has
    completed; cancelling it again is a no-op)."""
    require_admin()
    return bulk.cancel(runtime().engine, bulk_id)
