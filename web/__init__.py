"""Flask app factory: one blueprint per resource, one JSON error handler."""
from __future__ import annotations

import logging
import time
from typing import Any, TypeVar
from urllib.parse import unquote_to_bytes

from flask import Flask, current_app, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from gunicorn.http.errors import ParseException
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge
from werkzeug.routing import BaseConverter

from orchestrator import logs, tracing
from orchestrator import runtime as runtime_module
from orchestrator.errors import InvalidInput, OrchestratorError, Unavailable
from orchestrator.jsonutil import NotJSON, check_storable, loads
from orchestrator.logs import mask_url
from orchestrator.metrics import HTTP_LATENCY, HTTP_REQUESTS
from orchestrator.models import HistoryEntry, idempotency_key_problem
from orchestrator.schemas import (boolean_text_problem, identifier_problem, integer_text_problem, is_blank,
                                  number_text_problem, parse)

from .server import ReadTimeout
from .settings import HttpSettings

M = TypeVar("M")

log = logging.getLogger(__name__)

#: URL arguments that name a workflow instance (a media job, a saga, a chat task, a worker).
WORKFLOW_ID_ARGS = frozenset({"instance_id", "saga_id", "job_id", "task_id", "worker_id"})
#: Request headers whose values are stored (idempotency keys, correlation ids, history actors) or
#: looked up in the database; their text is checked like the body's.
STORED_HEADERS = ("Idempotency-Key", "X-Correlation-ID", "X-Request-ID", "X-Actor", "X-User", "Last-Event-ID")
#: Stored headers that identify something (a request, a correlation, who acts): refused with a
#: control, format or line separator character inside, as a business key is (identifier_problem).
IDENTIFIER_HEADERS = frozenset(STORED_HEADERS) - {"Last-Event-ID"}


def create_app(runtime: runtime_module.Runtime | None = None) -> Flask:
    rt = runtime_module.install(runtime) if runtime is not None else runtime_module.current()
    app = Flask(__name__)
    app.json = StrictJSONProvider(app)
    app.config["RUNTIME"] = rt
    app.config["MAX_CONTENT_LENGTH"] = HttpSettings.from_settings(rt.settings).max_body_bytes
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.url_map.converters["instance"] = InstanceIdConverter

    from . import asyncapi, balance, bulk, chat, console, definitions, health, media, openapi, routes, sagas, workers

    for module in (health, bulk, sagas, definitions, media, balance, routes, workers, openapi, asyncapi, chat,
                   console):
        app.register_blueprint(module.bp)
    chat.init_app(app)
    tracing.instrument_flask(app)  # a span per request, when tracing is on

    @app.errorhandler(OrchestratorError)
    def _known(exc: OrchestratorError) -> Any:
        return jsonify(exc.to_dict()), exc.status, getattr(exc, "headers", None) or {}

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge) -> Any:
        limit = app.config["MAX_CONTENT_LENGTH"]
        got = f", got {request.content_length}" if request.content_length else ""
        err = InvalidInput("body", f"must be at most {limit} bytes (API_MAX_BODY_BYTES){got}", 413)
        return jsonify(err.to_dict()), 413

    @app.errorhandler(ReadTimeout)
    def _stalled(exc: ReadTimeout) -> Any:  # the client stopped sending its body (web.server)
        return jsonify(InvalidInput("body", f"did not arrive: {exc}", 408).to_dict()), 408

    @app.errorhandler(ParseException)
    def _unreadable(exc: ParseException) -> Any:  # gunicorn could not read the body (a bad chunk)
        return jsonify(InvalidInput("body", f"could not be read: {str(exc)[:200]}").to_dict()), 400

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Any:
        # Werkzeug's own headers stay (a 405's Allow, a 401's WWW-Authenticate); the body is ours.
        headers = [(k, v) for k, v in exc.get_headers() if k.lower() != "content-type"]
        return jsonify({"error": exc.name.lower().replace(" ", "_"), "message": exc.description}), exc.code, headers

    # A database that does not answer (unreachable, its schema not migrated, its connection lost,
    # SQLite's lock held past the busy timeout) is a 503 the client may retry, not a 500. The API
    # reaches the broker and Redis only after a commit, and leaves a failure there to the sweeper
    # or the sockets' catch-up.
    @app.errorhandler(DBAPIError)
    def _database(exc: DBAPIError) -> Any:
        gone = exc.connection_invalidated or "database is locked" in str(exc.orig)
        why = health.database_down() or (logs.first_line(exc) if gone else None)
        if why is None:  # the database answers and its schema is current: a fault of ours
            return _unexpected(exc)
        log.warning("answering 503, the database is unavailable: %s", why)
        return _known(Unavailable("database", mask_url(rt.settings.database_url), why))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Any:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return jsonify({"error": "internal_error", "message": "unexpected error; see the server log"}), 500

    @app.before_request
    def _check_text() -> None:
        # First of all: nothing below (logs, queries, the stored request) sees text that the
        # database refuses. The body is checked where it is decoded (json_body).
        try:
            check_request_text()
        except InvalidInput as exc:
            if not (request.url_rule is not None and request.url_rule.rule.startswith("/ws/")):
                raise
            # A browser cannot read the body of a refused WebSocket handshake: the socket opens
            # and answers with an error frame naming the field (web/chat.py).
            g.socket_problem = exc

    @app.before_request
    def _start_timer() -> None:
        g.started = time.perf_counter()
        # Log lines of this request carry its correlation id (given, or made up) and the
        # workflow it is about; the id goes on with the messages the request writes.
        given = request.headers.get("X-Correlation-ID") or request.headers.get("X-Request-ID")
        g.correlation_id = logs.given_correlation_id(given) or logs.new_correlation_id()
        workflow = next((v for k, v in (request.view_args or {}).items() if k in WORKFLOW_ID_ARGS), None)
        g.unbind_log_ids = logs.bind(workflow_id=workflow, correlation_id=g.correlation_id)

    @app.after_request
    def _observe(response: Any) -> Any:
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        HTTP_REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
        HTTP_LATENCY.labels(request.method, endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        if "correlation_id" in g:  # as it came: UTF-8 bytes, which WSGI spells as latin-1 text
            response.headers["X-Correlation-ID"] = g.correlation_id.encode().decode("latin-1")
        return response

    @app.teardown_request
    def _end_log_context(_exc: BaseException | None) -> None:
        # A streamed answer (SSE) tears its request down again when the stream ends: once only.
        unbind = g.pop("unbind_log_ids", None)
        if unbind is not None:
            unbind()

    return app


class InstanceIdConverter(BaseConverter):
    """`<instance:instance_id>` in `/sagas/...`: one path segment, but not `bulk`, which names
    the bulk operations (`/sagas/bulk`, `/sagas/bulk/<bulk_id>/...`). An instance id is a UUID,
    so no instance is lost; with the default converter `/sagas/bulk` also matched
    `GET /sagas/<instance_id>`, so a 405 there listed GET in its Allow header."""

    regex = r"(?!bulk(?:/|$))[^/]+"


class StrictJSONProvider(DefaultJSONProvider):
    """Answers are JSON only: a NaN or infinity raises (a 500 naming no field, logged) instead
    of going out as `NaN`, which JSON clients cannot parse. Inputs are refused before that
    (`json_body`)."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs.setdefault("allow_nan", False)
        return super().dumps(obj, **kwargs)


def runtime() -> runtime_module.Runtime:
    return current_app.config["RUNTIME"]  # type: ignore[no-any-return]


def admin_token_sent() -> str | None:
    """The admin token the request sends: `X-Admin-Token`, else `Authorization: Bearer <token>`."""
    given = request.headers.get("X-Admin-Token")
    auth = request.headers.get("Authorization", "")
    if not given and auth.startswith("Bearer "):
        given = auth[7:]
    return given or None


#: The longest history actor: the `actor` column's length (128).
MAX_ACTOR: int = HistoryEntry.__table__.c.actor.type.length


def actor(header: str = "X-Actor") -> str:
    """Who acts, for the instance's history: the request's `header` (`X-Actor`; the balance
    routes pass their gateway's `X-User`), "api" without one. 400 naming the header when it is
    longer than MAX_ACTOR characters: checked here, before anything is written, because the
    column's limit is not: SQLite would store it whole and PostgreSQL refuse it mid-transaction."""
    value = request.headers.get(header)
    if value is None:
        return "api"
    if is_blank(value):
        raise InvalidInput(header, "must not be empty")
    if len(value) > MAX_ACTOR:
        raise InvalidInput(header, f"must be at most {MAX_ACTOR} characters, got {len(value)}")
    return value


def check_request_text() -> None:
    """400 naming the path parameter, query parameter or stored header (STORED_HEADERS) whose
    text cannot be stored (a NUL character; see `orchestrator.jsonutil.unstorable`).

    A stored header is read as UTF-8 (400 when it is not): WSGI hands header values over as
    latin-1 text, one character per byte, so an actor `é` sent as UTF-8 was stored as `Ã©` and
    a U+202E as three Latin-1 characters. The decoded text replaces the environ's, so every
    later `request.headers` read gets it. A non-blank IDENTIFIER_HEADERS value with a control,
    format or line separator character is refused as a business key is.

    The path and the query string are read as UTF-8 too, strictly: Werkzeug turns bytes that are
    no UTF-8 character (`%FF`, an encoded lone surrogate `%ED%A0%80`) into U+FFFD, so a filter
    went looking for replacement characters. A query parameter given twice is refused: every
    parameter takes one value, and the first was taken silently."""
    _check_raw_url()
    check_storable(dict(request.view_args or {}))
    for name, value in request.args.items(multi=True):
        check_storable({name: value})
    for name in STORED_HEADERS:
        value = request.headers.get(name)
        if value is None:
            continue
        try:
            text = value.encode("latin-1").decode("utf-8")
        except UnicodeError:
            raise InvalidInput(name, "is not valid UTF-8") from None
        check_storable(text, name)
        if name == "Idempotency-Key" and (found := idempotency_key_problem(text)):
            raise InvalidInput(name, found)
        # surrounding whitespace is not part of a header's value (RFC 9110)
        if name in IDENTIFIER_HEADERS and not is_blank(text) and (found := identifier_problem(text.strip())):
            raise InvalidInput(name, found)
        request.environ["HTTP_" + name.upper().replace("-", "_")] = text


def _check_raw_url() -> None:
    """400 naming the path parameter or query parameter whose percent-encoded bytes are not
    UTF-8, or the query parameter sent more than once (see `check_request_text`). A path that
    matches no route is left to its 404."""
    if request.routing_exception is not None:
        return
    try:  # PEP 3333: the path's bytes, one latin-1 character each
        request.environ.get("PATH_INFO", "").encode("latin-1").decode("utf-8")
    except UnicodeDecodeError:
        bad = next((k for k, v in (request.view_args or {}).items() if "\ufffd" in str(v)), "path")
        raise InvalidInput(bad, "is not valid UTF-8 once percent-decoded") from None
    except UnicodeEncodeError:  # a server that handed the path over decoded: nothing to check
        pass
    for part in request.query_string.split(b"&"):
        name, _, value = (unquote_to_bytes(raw.replace(b"+", b" ")) for raw in part.partition(b"="))
        try:
            field = name.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput("query", "a parameter name is not valid UTF-8 once percent-decoded") from None
        try:
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(field, "is not valid UTF-8 once percent-decoded") from None
    for field, values in request.args.lists():
        if len(values) > 1:
            raise InvalidInput(field, "is given more than once; every query parameter takes one value")


def json_body(required: bool = True) -> Any:
    """The request's JSON body, or a 4xx that says what is wrong with it: a body that is not
    `application/json`, or said to be in a charset other than UTF-8 (415 naming `Content-Type`),
    more than API_MAX_BODY_BYTES (413), not JSON
    (invalid UTF-8 included) or nested deeper than the parser goes (400), or text the database
    cannot store, named by its dotted path (400)."""
    sent = bool(request.content_length) or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if sent and not request.is_json:  # before reading: a form body would be parsed away
        raise InvalidInput("Content-Type", f"must be application/json, got {request.mimetype or 'none'!r}", 415)
    charset = request.mimetype_params.get("charset")
    if sent and charset is not None and charset.lower().replace("-", "") != "utf8":  # JSON is UTF-8 (RFC 8259)
        raise InvalidInput("Content-Type", f"JSON must be utf-8, got charset {charset!r}", 415)
    data = request.get_data(cache=True)
    limit = request.max_content_length
    if request.content_length is None and limit is not None and len(data) >= limit:
        request.stream.read(1)  # a chunked body cut at the limit: 413 if it goes on past it
    if not data:
        if required:
            raise InvalidInput("body", "a JSON body is required")
        return {}
    try:
        data = loads(data)
    except NotJSON as exc:  # nesting past the parser's depth included (see jsonutil.loads)
        if exc.field:  # a key sent twice: named like any other field at fault
            raise InvalidInput(exc.field, exc.problem) from None
        raise InvalidInput("body", f"is not valid JSON: {exc}") from None
    try:
        return check_storable(data)
    except RecursionError:
        raise InvalidInput("body", "is nested too deeply") from None


def body(model: type[M], required: bool = True, context: dict[str, Any] | None = None) -> M:
    """The request's JSON body validated as `model` (see `json_body` for the checks before it);
    a 400 naming the first field at fault (its dotted path) otherwise. A missing optional body is
    `{}`."""
    return parse(model, json_body(required), context=context)


def query(model: type[M]) -> M:
    """The query parameters validated as `model`; an empty value counts as absent (`?limit=` is
    the default). A 400 naming the parameter otherwise, a number or boolean included when its
    text is not what a client means by one (pydantic's lax mode would read `1_0` as 10 and `on`
    as true): integers in decimal digits (`integer_text_problem`), numbers in decimal digits
    with a fraction or exponent (`number_text_problem`), booleans `true`/`false`/`1`/`0`
    (`boolean_text_problem`)."""
    args = {k: v for k, v in request.args.items() if v != ""}
    for name, field in model.model_fields.items():  # type: ignore[attr-defined]
        check = _TEXT_CHECKS.get(field.annotation)
        if check is None:
            continue
        for key in {name, field.alias or name}:
            if key in args and (found := check(args[key])):
                raise InvalidInput(key, found)
    return parse(model, args)


_TEXT_CHECKS = {int: integer_text_problem, float: number_text_problem, bool: boolean_text_problem}
