"""Chat sessions (seed 003): a session holds a configuration; each message is a chat task whose
lifecycle is a workflow on the engine, and whose answer streams back as callbacks.

    queued --start--> running --stream--> streaming --complete--> completed
       \\________________\\____________________\\--error--> failed
        \\________________\\____________________\\--fail---> timed_out   (the engine's deadline)

A task is dispatched to the execution service when it is created: a Celery task
`execution.chat_task` on the `execution` queue, written to the outbox with the instance.
"""
from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

from sqlalchemy import ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column
from statemachine import State

from orchestrator.config import Settings
from orchestrator.errors import InvalidInput
from orchestrator.models import Base, JSONType, UTCDateTime, utcnow
from orchestrator.workflow import Workflow, register

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
@register
class ChatTask(Workflow):
    type = TASK_TYPE
    success_states = frozenset({"completed"})
    # No user signals: the lifecycle follows the execution service's callbacks (sagas/chat_store.py).
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
    complete = running.to(completed) | streaming.to(completed)
    error = queued.to(failed) | running.to(failed) | streaming.to(failed)
    # The engine fires `fail` when the task's deadline (CHAT_TASK_TIMEOUT_SECONDS) passes.
    fail = queued.to(timed_out) | running.to(timed_out) | streaming.to(timed_out)

    def on_enter_queued(self) -> None:
        """Dispatch to the execution service, in the transaction that creates the task."""
        data = self.model.context["input"]
        chat = ChatSettings.from_settings(self.settings) if self.settings else ChatSettings()
        message = {
            "task_id": self.model.id,
            "session_id": data["session_id"],
            "message": data["message"],
            "config": data.get("config") or {},
            "callback_channel": chat.callback_channel,
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
        return validate_message(data, ChatSettings.from_settings(settings)) | {
            "session_id": data["session_id"], "config": data.get("config") or {}}

    @classmethod
    def timeout(cls, settings: Settings) -> timedelta | None:
        return timedelta(seconds=ChatSettings.from_settings(settings).task_timeout_seconds)


def validate_message(body: dict[str, Any], chat: ChatSettings) -> dict[str, Any]:
    message = body.get("message")
    if message is None:
        raise InvalidInput("message", "is required")
    if not isinstance(message, str):
        raise InvalidInput("message", "must be a string")
    if not message.strip():
        raise InvalidInput("message", "must not be empty")
    if len(message) > chat.max_message_chars:
        raise InvalidInput("message", f"must be at most {chat.max_message_chars} characters "
                                      f"(CHAT_MAX_MESSAGE_CHARS), got {len(message)}", status=413)
    return {"message": message}


def validate_session_request(body: Any, chat: ChatSettings) -> tuple[str | None, dict[str, Any]]:
    """The optional body of POST /api/v1/chat/init: {"config": {...}, "user_id": "..."}."""
    if not isinstance(body, dict):
        raise InvalidInput("body", "must be a JSON object")
    unknown = sorted(set(body) - {"config", "user_id"})
    if unknown:
        raise InvalidInput(unknown[0], "unknown field; accepted fields: config, user_id")
    user_id = body.get("user_id")
    if user_id is not None and (not isinstance(user_id, str) or not user_id.strip() or len(user_id) > 255):
        raise InvalidInput("user_id", "must be a non-empty string of at most 255 characters")
    config = body.get("config")
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise InvalidInput("config", "must be a JSON object")
    size = len(json.dumps(config))
    if size > chat.max_config_bytes:
        raise InvalidInput("config", f"must be at most {chat.max_config_bytes} bytes of JSON "
                                     f"(CHAT_MAX_CONFIG_BYTES), got {size}", status=413)
    return user_id, config
