"""The operator console at /ui/: server-rendered HTML pages (web/templates/console/) with a
little JavaScript (web/static/console/console.js), shipped inside the package, nothing fetched
from the internet.

Pages: the workflow types with their instances per state (`/ui/`), the instances with the
GET /sagas filters, refreshing by themselves (`/ui/sagas`), one instance with its diagram, steps,
context, history and the Restart / Cancel / Send event buttons (`/ui/sagas/<id>`), and the bulk
operations (`/ui/bulk`). The pages' own calls go to the JSON API of the same origin, except the
bulk operations: those need the ADMIN_TOKEN, which never reaches the browser; the console's
`/ui/bulk/run` and `/ui/bulk/<bulk_id>` run them on the server for the logged-in operator.

Access: HTTP basic auth against CONSOLE_BASIC_AUTH (`user:password`). Unset, every console
route answers 403 saying how to enable it (`orchestrator dev` sets `admin:admin`); a missing or
wrong login is a 401 with `WWW-Authenticate: Basic`; an action another site's page sends is a
403 (`_same_origin`). The pages are not in /openapi.json (HTML,
and the console's two JSON routes are its own, not the API's).
"""
from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Response, jsonify, render_template, request
from markupsafe import Markup

from orchestrator.diagram import render
from orchestrator.errors import Forbidden, InvalidInput, NotFound, OrchestratorError, Unauthorized
from orchestrator.models import ACTIVE_STEP_STATUSES, StepStatus
from orchestrator.schemas import HIDDEN_CATEGORIES
from orchestrator.workflow import INSTANCE_STATUSES

from . import body, query, runtime
from .auth import CONSOLE_CHALLENGE, CONSOLE_HEADER, same_secret
from . import bulk as bulk_routes
from .schemas import BulkRequest, SagaListQuery

bp = Blueprint("console", __name__, url_prefix="/ui", template_folder="templates",
               static_folder="static/console", static_url_path="/static")
#: The GET /sagas filters the instances page offers, in the order shown.
FILTERS = ("type", "state", "status", "key", "created_after", "created_before", "error", "step", "step_status")
#: Seconds between two refreshes of a page that follows running work.
REFRESH_SECONDS = 2


#: The console's JSON routes (the rest are pages and their static files).
JSON_ROUTES = frozenset({"console.bulk_run", "console.bulk_status", "console.bulk_cancel"})


def _wants_html() -> bool:
    best = request.accept_mimetypes.best_match(["text/html", "application/json"])
    return best == "text/html" and request.endpoint not in JSON_ROUTES


@bp.before_request
def _login() -> Any:
    """403 when the console is off (CONSOLE_BASIC_AUTH unset), 401 without the right login."""
    configured = runtime().settings.console_basic_auth
    if not configured:
        message = ("the operator console is disabled: set CONSOLE_BASIC_AUTH=user:password "
                   "(orchestrator dev sets admin:admin) and restart the API")
        if _wants_html():
            return Response(render_template("console/disabled.html", message=message), 403, mimetype="text/html")
        return jsonify({"error": "forbidden", "message": message, "field": CONSOLE_HEADER}), 403
    auth = request.authorization
    given_user = (auth.username or "") if auth and auth.type == "basic" else None
    given_password = (auth.password or "") if auth and auth.type == "basic" else ""
    matched = False
    for login in configured.split(","):  # user:password, several separated by commas, as for Flower
        user, _, password = login.partition(":")  # every login compared: the time says nothing
        matched |= given_user is not None and same_secret(given_user, user) & same_secret(given_password, password)
    if not matched:
        raise Unauthorized("log in to the operator console", CONSOLE_CHALLENGE, field=CONSOLE_HEADER)
    if request.method not in ("GET", "HEAD", "OPTIONS"):
        _same_origin()
    return None


def _same_origin() -> None:
    """403 for an action sent by another site's page: a browser sends the console's basic-auth
    login with any request to it, so a form elsewhere could post to /ui/bulk/<id>/cancel. A
    browser names the sending page's origin (`Origin`) and how it relates (`Sec-Fetch-Site`);
    the console's own pages are same-origin; a client that is not a browser sends neither."""
    from urllib.parse import urlsplit

    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site")
    if (origin is not None and urlsplit(origin).netloc != request.host) or site not in (None, "same-origin", "none"):
        raise Forbidden(f"Origin: a console action must come from the console's own pages; refused a request "
                        f"sent by {origin or site!r}", field="Origin")


@bp.errorhandler(OrchestratorError)
def _error_page(exc: OrchestratorError) -> Any:
    """A page's refusal (an unknown instance or type) as a console page for a browser, with the
    same status; the JSON of the API's own error handler for anything else (the login's 401
    and its `WWW-Authenticate` included)."""
    headers = getattr(exc, "headers", None) or {}
    if not _wants_html() or isinstance(exc, Unauthorized):
        return jsonify(exc.to_dict()), exc.status, headers
    title = "Not found" if exc.status == 404 else "Cannot show this page"
    return render_template("console/error.html", status=exc.status, error=exc.code, title=title,
                           message=exc.message, page=None), exc.status, headers


@bp.after_request
def _no_store(response: Response) -> Response:
    # The pages show live state and carry a login: never cached, never framed by another site.
    response.headers["Cache-Control"] = "no-store"
    response.headers["X-Frame-Options"] = "DENY"
    return response


@bp.get("/")
def types_page() -> Any:
    """The workflow types, each with its instances per state (as GET /workflow-types)."""
    engine = runtime().engine
    counts = engine.counts()
    types = []
    for name in engine.registry.names():
        cls = engine.registry.get(name)
        per_state = counts.get(name, {})
        types.append({"type": name, "states": [s.id for s in cls.states],  # type: ignore[union-attr]
                      "counts": per_state, "total": sum(per_state.values())})
    return render_template("console/types.html", types=types, page="types")


@bp.get("/types/<type>")
def type_page(type: str) -> Any:  # noqa: A002 - named like the type field
    """One type's diagram and its states, each linking to its instances."""
    engine = runtime().engine
    cls = engine.registry.get(type)
    if cls is None:
        raise NotFound(f"unknown workflow type '{type}'")
    return render_template("console/type.html", type=type, svg=Markup(render(cls)),
                           counts=engine.counts(type).get(type, {}), states=[s.id for s in cls.states],
                           signals=sorted(cls.signals), page="types")


def _filter_page(template: str, page: str, **extra: Any) -> Any:
    """A page whose filter form comes from the address (instances, bulk). The API's own rule
    (GET /sagas): a bad filter is said, with the API's status, not silently left out."""
    engine = runtime().engine
    names = engine.registry.names()
    states = sorted({s.id for n in names for s in engine.registry.get(n).states})  # type: ignore[union-attr]
    values = {name: request.args.get(name, "") for name in FILTERS}
    try:
        engine.check_filter(query(SagaListQuery))
        refusal, status = "", 200
    except InvalidInput as exc:
        refusal, status = exc.message, exc.status
    return render_template(template, filters=values, types=names, states=states, statuses=_step_statuses(),
                           instance_statuses=INSTANCE_STATUSES, refresh=REFRESH_SECONDS, page=page,
                           refusal=refusal, **extra), status


@bp.get("/sagas")
def instances_page() -> Any:
    """The instances, filtered like GET /sagas; console.js fills and refreshes the table."""
    return _filter_page("console/instances.html", "instances")


@bp.get("/sagas/<instance_id>")
def instance_page(instance_id: str) -> Any:
    """One instance: diagram, steps, context, history and the actions it allows now. With
    `?part=1` only the part that changes (console.js swaps it in every few seconds)."""
    engine = runtime().engine
    snap = engine.snapshot(instance_id)
    cls = engine.registry.get(snap["type"])
    if cls is None:
        raise NotFound(f"instance {instance_id} has the unknown workflow type '{snap['type']}'")
    _, state, taken = engine.history_path(instance_id)
    # The signals the current state allows: the user may send these (Workflow.signals).
    allowed = sorted({e.id for s in cls.states if s.id == snap["state"] for t in s.transitions
                      for e in t.events if e.id in cls.signals}) if not snap["finished"] else []
    running = any(st["status"] in {s.value for s in ACTIVE_STEP_STATUSES} for st in snap["steps"] or [])
    # Cancel only where POST /sagas/<id>/cancel can succeed: the workflow has a cancel event (the
    # engine answers 409 "cannot be cancelled" otherwise) and the current state takes it (a
    # running state, or a failed one whose cancel runs the compensations).
    can_cancel = cls.cancel_event in cls.event_names() and any(
        t.match(cls.cancel_event) for s in cls.states if s.id == snap["state"] for t in s.transitions)
    context = {"instance": snap, "svg": Markup(render(cls, current=state, taken=taken)), "signals": allowed,
               "can_cancel": can_cancel, "running": running,
               "context_json": _readable_json(snap["context"]),
               "refresh": REFRESH_SECONDS, "page": "instances"}
    if request.args.get("part"):
        return render_template("console/instance_part.html", **context)
    return render_template("console/instance.html", **context)


@bp.get("/bulk")
def bulk_page() -> Any:
    """Bulk repair: a dry run shows the count, then the run and its progress. A bad filter in
    the address is refused as on the instances page: the form keeps the value, so a dry run or
    a run sends it (and is refused) instead of acting on every instance."""
    return _filter_page("console/bulk.html", "bulk", action=request.args.get("action", "restart"))


@bp.post("/bulk/run")
def bulk_run() -> Any:
    """POST /sagas/bulk for the logged-in operator (same body and answers), without the admin
    token: the console's login stands for it, so the token never reaches a browser."""
    return bulk_routes.start(body(BulkRequest))


@bp.get("/bulk/<bulk_id>")
def bulk_status(bulk_id: str) -> Any:
    """GET /sagas/bulk/<bulk_id> for the logged-in operator."""
    from orchestrator import bulk

    return bulk.view(runtime().engine, bulk_id)


@bp.post("/bulk/<bulk_id>/cancel")
def bulk_cancel(bulk_id: str) -> Any:
    """POST /sagas/bulk/<bulk_id>/cancel for the logged-in operator."""
    from orchestrator import bulk

    return bulk.cancel(runtime().engine, bulk_id)


def _readable_json(value: Any) -> str:
    """`value` as indented JSON for an operator to read: `é` and `漢` as themselves (they were
    shown as `\u00e9`), but a character that hides or reorders text (HIDDEN_CATEGORIES:
    U+202E, a zero-width space) still as its escape, so what is shown is what is stored."""
    import unicodedata

    text = json.dumps(value, indent=2, sort_keys=True, default=str, ensure_ascii=False)
    if text.isascii():
        return text
    return "".join(f"\\u{ord(c):04x}" if c != "\n" and unicodedata.category(c) in HIDDEN_CATEGORIES else c
                   for c in text)


def _step_statuses() -> list[str]:
    return [s.value for s in StepStatus]
