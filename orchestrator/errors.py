"""Every error the engine raises on purpose, each with the HTTP status the API gives it.

Callers catch these types; nobody parses message strings.
"""
from __future__ import annotations

from typing import Any


class OrchestratorError(Exception):
    """Base of all deliberate errors. `status` is the HTTP status the API answers with."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, **self.details}


class InvalidInput(OrchestratorError):
    """A request field is missing or malformed; `field` names it."""

    status = 400
    code = "invalid_input"

    def __init__(self, field: str, problem: str, status: int = 400) -> None:
        super().__init__(f"{field}: {problem}", field=field, problem=problem)
        self.field = field
        self.problem = problem
        self.status = status


def nested_field(prefix: str, field: str) -> str:
    """`field`, named by a check that saw only the object at `prefix` of a request, as its dotted
    path in the whole request: `youtube_url` in `input` is `input.youtube_url`. The object
    itself (`body`, or `prefix` already) is `prefix`; a path that already starts there is kept."""
    if field in ("body", prefix):
        return prefix
    return field if field.startswith(prefix + ".") else f"{prefix}.{field}"


class Unauthorized(OrchestratorError):
    """No credential was sent: 401 with `WWW-Authenticate: <challenge>`, which every 401 carries
    (RFC 9110), so the challenge is required; it names the scheme the credential fits (`Bearer`
    for a token, `Basic` for a login; `web/auth.py` holds the API's)."""

    status = 401
    code = "unauthorized"

    def __init__(self, message: str, challenge: str, **details: Any) -> None:
        super().__init__(message, **details)
        self.headers = {"WWW-Authenticate": challenge}


class Forbidden(OrchestratorError):
    status = 403
    code = "forbidden"


class NotFound(OrchestratorError):
    status = 404
    code = "not_found"


class IllegalTransition(OrchestratorError):
    """The event is not allowed in the instance's current state."""

    status = 409
    code = "illegal_transition"

    def __init__(self, instance_id: str, event: str, state: str, message: str | None = None,
                 **details: Any) -> None:
        """`message` says why in the caller's terms when `event` is an engine event the caller
        never sent (a route's restart); `details` add to the body."""
        super().__init__(
            message or f"event '{event}' is not allowed in state '{state}'",
            instance_id=instance_id,
            event=event,
            state=state,
            **details,
        )
        self.state = state


class Conflict(OrchestratorError):
    status = 409
    code = "conflict"


class UpstreamError(OrchestratorError):
    """A service we call answered badly. 5xx and connection errors are retryable; 4xx are not."""

    status = 502
    code = "upstream_error"

    def __init__(self, service: str, message: str, upstream_status: int | None = None) -> None:
        super().__init__(f"{service}: {message}", service=service, upstream_status=upstream_status)
        self.service = service
        self.upstream_status = upstream_status

    @property
    def retryable(self) -> bool:
        return self.upstream_status is None or self.upstream_status >= 500


class Unavailable(OrchestratorError):
    """A service a request needs did not answer, or the database's schema is behind the code:
    503 with `Retry-After` (seconds). `dependency` names it as `/readyz` does ("database"); the
    message says where it was looked for (password masked) and why. The request's own
    transaction did not commit."""

    status = 503
    code = "unavailable"
    RETRY_AFTER_SECONDS = 5

    def __init__(self, dependency: str, address: str, reason: str) -> None:
        super().__init__(f"the {dependency} at {address} is unavailable: {reason}", dependency=dependency)
        self.headers = {"Retry-After": str(self.RETRY_AFTER_SECONDS)}


class ConfigError(OrchestratorError):
    """A configuration variable is missing or malformed; raised at start-up."""

    code = "config_error"

    def __init__(self, variable: str, problem: str) -> None:
        super().__init__(f"{variable}: {problem}", variable=variable)
        self.variable = variable


class WorkflowDefinitionError(ValueError):
    """A workflow names a task, event, state or method that does not exist (a typo): raised when
    it is registered, or at start-up once the Celery app has loaded its tasks, so the process
    stops naming the workflow and the misspelled name."""

    def __init__(self, workflow: str, kind: str, name: str, where: str, known: Any = (), why: str = "") -> None:
        hint = f"; known: {', '.join(sorted(known))}" if known else ""
        if why:  # the name exists, but not where it is needed
            super().__init__(f"workflow '{workflow}': {where} names {kind} '{name}', {why}{hint}")
        else:
            super().__init__(f"workflow '{workflow}': {where} names unknown {kind} '{name}'{hint}")
        self.workflow = workflow
        self.kind = kind
        self.name = name
