"""HTTP-only shapes: query parameters, headers and the JSON each endpoint answers.

Request bodies that start a workflow are declared beside their workflow (sagas/*.py); the
generic shapes here are the API's own. `/openapi.json` is generated from all of them (see
web/openapi.py). Answers are open (`extra="allow"`): a client may rely on the fields named here,
and a field added later is not a breaking change.
"""
from __future__ import annotations

from datetime import datetime
from functools import partial
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, RootModel, WithJsonSchema

from orchestrator.jsonutil import as_utc
from orchestrator.models import MAX_BUSINESS_KEY, MAX_IDEMPOTENCY_KEY, StepStatus
from orchestrator.schemas import INT64_MAX, Closed, Contract, JsonObject, NonBlank, SchemaPattern, omittable, problem, text_patterns
from orchestrator.workflow import InstanceStatus
from sagas.balance.repository import MAX_PATH_CHARS, PROJECT_PATTERN, branch_pattern, check_branch_name
from sagas.balance import Project
from sagas.route_content import RESTARTABLE


class Answer(BaseModel):
    """Base of every JSON answer: the fields named are always there; others may be added."""

    model_config = ConfigDict(extra="allow")


# -- headers (documented; read where they are used) ----------------------------------------------
class IdempotencyHeader(Contract):
    idempotency_key: Annotated[str, SchemaPattern(lambda: text_patterns()["identifier"])] = omittable(
        alias="Idempotency-Key", max_length=MAX_IDEMPOTENCY_KEY,
        description="repeats of a request with the same key answer the same instance; "
                    "an identifier: no control, format or line separator character")


class AdminHeader(Contract):
    admin_token: str | None = Field(None, alias="X-Admin-Token",
                                    description="ADMIN_TOKEN (or send Authorization: Bearer <token>)")


class UserHeader(Contract):
    user: Annotated[str, SchemaPattern(lambda: text_patterns()["identifier"])] = omittable(
        alias="X-User", description="the GitLab username the API gateway authenticated")


# -- the generic workflow API ----------------------------------------------------------------
#: A business key as the schema documents it: an identifier (`models.business_key_problem`, which
#: the engine checks, answering 400 naming `key`).
BusinessKey = Annotated[str, SchemaPattern(lambda: text_patterns()["identifier"])]


class StartSaga(Closed):
    """POST /saga: unknown fields are refused."""

    type: str = Field(min_length=1, description="the workflow type (GET /sagas lists instances of each)")
    key: BusinessKey = omittable(json_schema_extra={"maxLength": MAX_BUSINESS_KEY},
                                 description="business key: a second start with it answers the same instance")
    input: JsonObject = Field(default_factory=dict, description="the workflow's input, checked by the workflow")


class StartSagaOfType(Contract):
    """POST /saga/<type>: the body is optional; unknown fields are ignored."""

    model_config = ConfigDict(strict=True)

    key: BusinessKey = omittable(json_schema_extra={"maxLength": MAX_BUSINESS_KEY})
    input: JsonObject = Field(default_factory=dict)


class SignalPayload(RootModel[JsonObject]):
    """A signal's payload: any JSON object, checked by the workflow's own signal check."""


class Paging(Contract):
    limit: int = Field(50, ge=1, le=500)
    offset: int = Field(0, ge=0, le=INT64_MAX)


def _instant(value: Any) -> Any:
    """An ISO 8601 date or date-time as an aware UTC datetime (UTC when it gives no offset)."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.upper())  # RFC 3339 allows a lower-case t and z
        except ValueError:
            hint = " (send '+' in a query string as %2B)" if " " in value else ""
            raise problem(f"must be an ISO 8601 date-time such as 2024-05-01T12:00:00Z, got {value!r}{hint}") from None
    if not isinstance(value, datetime):
        raise problem("must be an ISO 8601 date-time string")
    try:
        return as_utc(value)
    except OverflowError:
        raise problem("is out of range") from None


Instant = Annotated[datetime, BeforeValidator(_instant), WithJsonSchema({"type": "string", "format": "date-time"})]


class SagaFilter(Closed):
    """Which instances: the filters of GET /sagas (query parameters) and of POST /sagas/bulk
    (its `filter` object, where a key it does not name is refused). Every field left out does
    not filter; the engine reads it as an `orchestrator.engine.InstanceFilter` and answers 400
    naming `type`, `state` or `step` when the registry has no such workflow, or no such state or
    step in that workflow (in any workflow when no type is given)."""

    model_config = ConfigDict(extra="forbid", strict=False, populate_by_name=True)

    type: str = omittable(min_length=1, description="the workflow type (GET /workflow-types lists them)")
    state: str = omittable(min_length=1, description="the instance's current state (one the type has; without a type, one any type has)")
    status: InstanceStatus = omittable(description="running (not finished), completed (a success state), failed (a "
                                                   "failure state, e.g. route_content's tts_failed or story_failed) or cancelled")
    key: str = omittable(min_length=1, description="the business key, exactly")
    created_after: Instant = omittable(description="created at or after this ISO 8601 time (UTC when no offset)")
    created_before: Instant = omittable(description="created before this ISO 8601 time (UTC when no offset)")
    error: str = omittable(min_length=1, description="a case-insensitive part of the instance's or a step's failure message")
    step: str = omittable(min_length=1, description="the instance has a step of this name (with step_status: in that status)")
    step_status: StepStatus = omittable(description="a step's current status (with step: that step's)")


class SagaListQuery(Paging, SagaFilter):
    """GET /sagas: paging and the filters; other query parameters are ignored."""

    model_config = ConfigDict(extra="ignore", strict=False, populate_by_name=True)


class StepQuery(Contract):
    step: str = Field(min_length=1, description="the step to restart")


class RouteStepQuery(Contract):
    """POST /workflows/<route_id>/restart: the route content steps that can be restarted (the
    route answers 400 naming `step` for another, in its own words)."""

    step: str = Field(min_length=1, description="the step to restart",
                      json_schema_extra={"enum": list(RESTARTABLE)})


class StepView(Answer):
    name: str
    task: str | None
    status: str
    attempt: int
    restarts: int
    failures: int
    progress: float | None
    polls: int | None
    error: str | None
    queued_at: str | None
    started_at: str | None
    finished_at: str | None
    duration_seconds: float | None
    data: dict[str, Any]


class HistoryEntry(Answer):
    from_: str | None = Field(alias="from")
    to: str | None
    event: str | None
    payload_digest: str | None
    actor: str | None
    at: str | None


class Instance(Answer):
    """A workflow instance: state, context, and (when read one by one) steps and history."""

    id: str
    type: str
    key: str | None
    state: str | None
    status: InstanceStatus | None = Field(description="running, completed, failed or cancelled: from the state and "
                                                      "the workflow's success_states and failure_states, as the "
                                                      "`status` filter reads it (null for a type not registered)")
    finished: bool
    created_at: str | None
    updated_at: str | None
    finished_at: str | None
    context: dict[str, Any] | None
    steps: list[StepView] | None = None
    compensation: str | None = None
    history: list[HistoryEntry] | None = None


class InstancePage(Answer):
    total: int
    limit: int
    offset: int
    items: list[Instance]


# -- workflow definitions --------------------------------------------------------------------
class StepDefinition(Answer):
    """A step of a workflow type: `task` (one Celery task; null for an external step whose
    request the workflow sends itself) or `tasks` (a chain), `retry` (attempts, backoff and
    max_delay in seconds, factor, jitter), `timeout` in seconds (null: none), `external`."""

    name: str
    state: str
    retry: dict[str, Any]
    timeout: float | None
    external: bool


class WorkflowType(Answer):
    """A registered workflow type: its machine, its steps and how many instances are in each state."""

    type: str
    states: list[str]
    initial: str
    final_states: list[str]
    events: list[str]
    steps: list[StepDefinition]
    counts: dict[str, int]


class WorkflowTypeList(Answer):
    items: list[WorkflowType]


# -- operations -------------------------------------------------------------------------------
class Dependency(Answer):
    status: str = Field(description="ok or error")
    address: str | None = Field(None, description="where it is looked for, the password masked (***)")
    latency_ms: float | None = None
    error: str | None = Field(None, description="why it does not answer (secrets masked)")


class Liveness(Answer):
    status: str
    uptime_seconds: float


class Readiness(Answer):
    status: str = Field(description="ready or not_ready")
    down: list[str] = Field(default_factory=list, description="the dependencies that do not answer")
    dependencies: dict[str, Dependency]


# -- media (seed 004) -------------------------------------------------------------------------
class JobsQuery(Contract):
    limit: int = Field(50, ge=1, le=1000)


class CleanupQuery(Contract):
    max_age_hours: float = Field(24.0, ge=0, le=1_000_000, allow_inf_nan=False)
    deep: bool = False


class PipelineStarted(Answer):
    job_id: str
    status: str
    message: str
    youtube_url: str
    overall_progress: float


class Stage(Answer):
    status: str
    job_id: str | None
    progress: float
    started_at: str | None
    completed_at: str | None
    attempt: int | None = None
    error: str | None = None


class Job(Answer):
    job_id: str
    youtube_url: str
    status: str
    overall_progress: float
    created_at: str | None
    updated_at: str | None
    completed_at: str | None
    stages: dict[str, Stage]
    transcription_text: str | None
    transcription_segments: Any
    transcription_file: Any
    audio_file: Any
    error: Any = None


class JobSummary(Answer):
    job_id: str
    youtube_url: str
    status: str
    progress: float
    created_at: str | None
    updated_at: str | None


class JobPage(Answer):
    total: int
    jobs: list[JobSummary]


class ServiceHealth(Answer):
    status: str = Field(description="healthy or degraded")
    service: str
    version: str
    timestamp: str
    microservices: dict[str, str]
    dependencies: dict[str, Dependency]


class AdminStats(Answer):
    orchestrator: dict[str, Any]
    redis: dict[str, Any]
    settings: dict[str, Any]


class Cleanup(Answer):
    message: str
    jobs_removed: int
    logs_cleaned: bool


class FactoryReset(Answer):
    message: str
    orchestrator: dict[str, Any]
    microservices: dict[str, Any]
    warning: str


# -- route content (seed 000) -----------------------------------------------------------------
class RouteStory(Answer):
    story_id: str
    tts_status: str
    error: str | None = None


class RouteWorkflow(Answer):
    route_id: str | None
    status: str = Field(description="running, completed or failed")
    state: str | None
    mode: str | None
    created_at: str | None
    updated_at: str | None
    steps: dict[str, dict[str, Any]]
    stories: list[RouteStory]


# -- workers (seed 001) -----------------------------------------------------------------------
class WorkerView(Answer):
    id: int
    worker_id: str
    scenario_uuid: str
    camera_url: str
    status: str
    process_pid: int | None
    reason: str | None
    created_at: str | None
    updated_at: str | None


class WorkerPage(Answer):
    total: int
    limit: int
    offset: int
    items: list[WorkerView]


# -- balance (seed 002) and the GitLab endpoints ----------------------------------------------
class BalanceStatus(Answer):
    saga_id: str
    status: str = Field(description="running, user_input_required, completed, failed or cancelled")
    state: str
    next_step: str | None
    commit: str | None
    result: Any = None
    error: Any = None
    failed_step: str | None = None


class CalculationStatus(Answer):
    correlationId: str
    status: str
    state: str | None
    input_commit: str | None
    task: dict[str, Any] | None
    output_commit: str | None
    error: Any = None


class GeometriesQuery(Contract):
    project: str = Field(description="a project id or path such as demo/balance (or its id)", min_length=1,
                         max_length=MAX_PATH_CHARS, json_schema_extra={"pattern": PROJECT_PATTERN})
    ref: Annotated[str, SchemaPattern(branch_pattern)] = omittable(
        description="a branch; the project's default branch when absent")


def _branch(field: str) -> Any:
    return Annotated[str, BeforeValidator(partial(check_branch_name, field=field)), SchemaPattern(branch_pattern)]


class MergeRequestBody(Closed):
    """POST /merge-requests. Unknown fields are refused."""

    project: Project
    source_branch: _branch("source_branch")  # type: ignore[valid-type]
    target_branch: _branch("target_branch") = omittable(  # type: ignore[valid-type]
        description="the project's default branch when absent")
    title: NonBlank = Field(max_length=255)


class Issues(Answer):
    user: str
    issues: list[dict[str, Any]]


class Geometries(Answer):
    project: str
    ref: str | None
    geometries: list[dict[str, Any]]


class MergeRequest(Answer):
    created: bool


# -- chat (seed 003) --------------------------------------------------------------------------
class ChatPaging(Paging):
    pass


class EventsQuery(Contract):
    after_seq: int = Field(0, ge=0, le=INT64_MAX,
                           description="resume after this stream seq (or send Last-Event-ID)")


class SessionCreated(Answer):
    session_id: str
    status: str
    created_at: str | None


class SessionStatus(Answer):
    session_id: str
    status: str
    created_at: str | None
    updated_at: str | None
    user_id: str | None
    config: dict[str, Any]
    last_seq: int
    tasks: int
    recent_tasks: list[str] | None
    connections: int | None


class SessionDeleted(Answer):
    session_id: str
    status: str
    tasks_deleted: int


class TaskQueued(Answer):
    task_id: str
    session_id: str
    status: str


class TaskView(Answer):
    task_id: str
    session_id: str | None
    status: str | None
    message: str | None
    created_at: str | None
    updated_at: str | None
    finished_at: str | None
    chunks_received: int
    chunks: list[dict[str, Any]] | None = None
    result: Any = None
    error: Any = None


class TaskPage(Answer):
    session_id: str
    total: int
    limit: int
    offset: int
    tasks: list[TaskView]


class BasicHealth(Answer):
    status: str
    service: str
    timestamp: str
    uptime_seconds: float


class DetailedHealth(Answer):
    status: str
    timestamp: str
    uptime_seconds: float
    dependencies: dict[str, Dependency]
    websockets: dict[str, Any]
    callback_consumers: dict[str, Any]
    sessions: Any


# -- bulk operations (POST /sagas/bulk) ----------------------------------------------------------
class BulkRequest(Closed):
    """POST /sagas/bulk: an action on every instance the filter matches now."""

    action: Literal["restart", "cancel", "event"]
    step: str = omittable(min_length=1, max_length=64, description="restart: the failed step to restart")
    event: str = omittable(min_length=1, max_length=64, description="event: the signal to send")
    payload: dict[str, Any] = omittable(description="event: the signal's payload")
    # Required: a body that leaves it out (a typo, a client that forgot it) must not act on every
    # instance of every type. `{}` still means every instance, but the caller has to say so.
    filter: SagaFilter = Field(description="which instances (the GET /sagas filters as keys); required: "
                                           "`{}` acts on every instance of every type")
    dry_run: bool = Field(False, description="only count the matches and show a sample; change nothing")
    # at least one action in 100 s: a bulk slower than that would not end within a working day
    rate_per_second: float = Field(10.0, ge=0.01, le=10000, description="actions per second at most, 0.01 to 10000")


class BulkDryRun(Answer):
    matched: int
    sample: list[str] = Field(description="up to 20 of the matched instance ids")


class BulkStarted(Answer):
    bulk_id: str
    matched: int
    status: str


class BulkError(Answer):
    instance_id: str
    status: str = Field(description="skipped (no longer eligible) or failed")
    error: str | None


class BulkStatus(Answer):
    bulk_id: str
    status: str = Field(description="running, completed or cancelled")
    matched: int
    done: int
    skipped: int
    failed: int
    errors: list[BulkError]
