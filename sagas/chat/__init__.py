"""Chat sessions (seed 003): a session holds a configuration; each message is a chat task whose
lifecycle is a workflow on the engine, and whose answer streams back as callbacks.

    queued --start--> running --stream--> streaming --complete--> completed (a result)
       \\________________\\____________________\\--complete--> failed    (an error)
        \\________________\\____________________\\--fail------> timed_out (the engine's deadline)

The execution is one external step of the engine (`execute`, declared on queued, running and
streaming, so it runs on while the callbacks move the task between them): its request, a Celery
task `execution.chat_task` on the `execution` queue, is written to the outbox with the instance,
keyed by the task id (the token the callbacks carry); the final callback completes the step
(`Engine.complete_external`), whose join `complete` ends the task.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from pydantic import Field, ValidationInfo, field_validator
from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column
from statemachine import State

from orchestrator.config import Settings
from orchestrator.errors import InvalidInput
from orchestrator.models import Base, JSONType, UTCDateTime, utcnow
from orchestrator.schemas import TOO_LARGE, Closed, Identifier, JsonObject, NonBlank, omittable, parse, problem
from orchestrator.workflow import External, Step, Workflow, register

from .settings import ChatSettings

TASK_TYPE = "chat_task"
EXECUTION_TASK = "execution.chat_task"
CALLBACK_TYPES = ("chunk", "result", "error")
FINISHED = frozenset({"completed", "failed", "timed_out"})


# -- tables ------------------------------------------------------------------------------------
class ChatSession(Base):
    """A session: its configuration (passed to the execution service) and its stream counter."""

    __tablename__ = "chat_sessions"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    user_id: Mapped[str | None] = mapped_column(String(255))
    config: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="active")
    last_seq: Mapped[int] = mapped_column(Integer, default=0)  # the session stream's last seq
    created_at: Mapped[Any] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[Any] = mapped_column(UTCDateTime(), default=utcnow)


class ChatEvent(Base):
    """One frame of a session's stream, or a callback waiting for an earlier one.

    `task_seq` is the execution service's sequence number (one callback each, so a duplicate
    finds its row); `seq` is the position in the session's stream, given when the event is
    delivered, i.e. when every earlier callback of its task has arrived.
    """

    __tablename__ = "chat_events"
    __table_args__ = (
        UniqueConstraint("session_id", "seq", name="uq_chat_event_stream_seq"),
        UniqueConstraint("task_id", "task_seq", name="uq_chat_event_task_seq"),
        Index("ix_chat_events_task", "task_id", "task_seq"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session_id: Mapped[str] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"))
    task_id: Mapped[str | None] = mapped_column(String(36))
    seq: Mapped[int | None] = mapped_column(Integer)
    task_seq: Mapped[int | None] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(16))
    data: Mapped[Any] = mapped_column(JSONType, nullable=True)
    created_at: Mapped[Any] = mapped_column(UTCDateTime(), default=utcnow)


# -- the task's lifecycle ----------------------------------------------------------------------
#: The execution service's work on a task: sent by `ChatTask.dispatch`, awaited under the task id.
EXECUTE = Step(name="execute", external=External(send="dispatch", token="task_token"), join="complete")


@register
class ChatTask(Workflow):
    type = TASK_TYPE
    success_states = frozenset({"completed"})
    failure_states = frozenset({"failed", "timed_out"})
    # No user signals: the lifecycle follows the execution service's callbacks (sagas/chat/store.py).
    signals: dict[str, Any] = {}
    started_by = "POST /api/v1/chat/<session_id>/task"

    queued = State(initial=True)
    running = State()
    streaming = State()
    completed = State(final=True)
    failed = State(final=True)
    timed_out = State(final=True)

    start = queued.to(running)                   # the execution service's first callback
    stream = running.to(streaming)               # its first chunk is delivered
    # The execution's join: its final callback, a result or an error.
    complete = (queued.to(completed, cond="answered") | running.to(completed, cond="answered")
                | streaming.to(completed, cond="answered")
                | queued.to(failed) | running.to(failed) | streaming.to(failed))
    # The engine fires `fail` when the task's deadline (CHAT_TASK_TIMEOUT_SECONDS) passes.
    fail = queued.to(timed_out) | running.to(timed_out) | streaming.to(timed_out)

    steps = {queued: EXECUTE, running: EXECUTE, streaming: EXECUTE}

    def answered(self, payload: dict[str, Any] | None = None) -> bool:
        return "error" not in (payload or {})

    def task_token(self, step: str, index: int, item: Any, restarts: int) -> str:
        """The callbacks name the task by its id: the instance's."""
        return str(self.model.id)

    def dispatch(self, item: Any, token: str, attempt: int) -> None:
        """Send the task to the execution service, in the transaction that creates it."""
        data = self.model.context["input"]
        chat = ChatSettings.from_settings(self.settings) if self.settings else ChatSettings()
        message = {
            "task_id": token,
            "session_id": data["session_id"],
            "message": data["message"],
            "config": data.get("config") or {},
            "callback_channel": chat.callback_channel,
            "callback_stream": chat.callback_stream,
            "timeout_seconds": chat.task_timeout_seconds,
        }
        self.emit("celery", EXECUTION_TASK, {"task": [EXECUTION_TASK, [message]]}, key=data["session_id"])

    def on_enter_completed(self, payload: dict[str, Any] | None = None) -> None:
        self.context["result"] = (payload or {}).get("result")

    def on_enter_failed(self, payload: dict[str, Any] | None = None) -> None:
        self.context["error"] = (payload or {}).get("error")

    def on_enter_timed_out(self, payload: dict[str, Any] | None = None) -> None:
        self.context["error"] = (payload or {}).get("error") or "timed out"
        # The sweeper fires this; a worker tells the session's sockets (see tasks/chat.py).
        self.emit("celery", "chat.task_timed_out", {"task": ["chat.task_timed_out", [self.model.id]]})

    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        if not isinstance(data, dict) or not isinstance(data.get("session_id"), str):
            raise InvalidInput("input", "a chat task is created through POST /api/v1/chat/<session_id>/task")
        return validate_message({"message": data.get("message")}, ChatSettings.from_settings(settings)) | {
            "session_id": data["session_id"], "config": data.get("config") or {}}

    @classmethod
    def timeout(cls, settings: Settings) -> timedelta | None:
        return timedelta(seconds=ChatSettings.from_settings(settings).task_timeout_seconds)


# -- schemas: the request bodies (seed 003, docs/chat.md) ----------------------------------------
# The size limits are configured (CHAT_MAX_MESSAGE_CHARS, CHAT_MAX_CONFIG_BYTES): they come in the
# validation context as {"chat": ChatSettings} and are answered 413.
def _limits(info: ValidationInfo) -> ChatSettings | None:
    return (info.context or {}).get("chat")


class ChatMessage(Closed):
    """POST /api/v1/chat/<session_id>/task. Unknown fields are refused."""

    message: NonBlank = Field(description="at most CHAT_MAX_MESSAGE_CHARS characters (413 over it)")

    @field_validator("message")
    @classmethod
    def _not_too_long(cls, value: str, info: ValidationInfo) -> str:
        chat = _limits(info)
        if chat is not None and len(value) > chat.max_message_chars:
            raise problem(f"must be at most {chat.max_message_chars} characters (CHAT_MAX_MESSAGE_CHARS), "
                          f"got {len(value)}", TOO_LARGE)
        return value


class ChatInit(Closed):
    """POST /api/v1/chat/init (the body is optional). Unknown fields are refused."""

    config: JsonObject = omittable(description="at most CHAT_MAX_CONFIG_BYTES of JSON (413 over it)")
    user_id: Identifier = omittable(max_length=255)

    @field_validator("config")
    @classmethod
    def _not_too_big(cls, value: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        chat = _limits(info)
        size = len(json.dumps(value or {}))
        if chat is not None and size > chat.max_config_bytes:
            raise problem(f"must be at most {chat.max_config_bytes} bytes of JSON (CHAT_MAX_CONFIG_BYTES), "
                          f"got {size}", TOO_LARGE)
        return value


def validate_message(body: Any, chat: ChatSettings) -> dict[str, Any]:
    """{"message": <text>} checked against ChatMessage and the configured limit."""
    return {"message": parse(ChatMessage, body, context={"chat": chat}).message}


def validate_session_request(body: Any, chat: ChatSettings) -> tuple[str | None, dict[str, Any]]:
    """The optional body of POST /api/v1/chat/init: {"config": {...}, "user_id": "..."}."""
    req = parse(ChatInit, body, context={"chat": chat})
    return req.user_id, req.config or {}
