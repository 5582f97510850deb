"""Chat persistence: sessions, tasks and each session's ordered stream, in PostgreSQL.

Every change to a session's stream happens under that session's row lock, so the stream's
sequence numbers are gap-free and every frame with seq N is committed before N+1 is given out:
a reader that sees N+1 can always read everything before it.
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from orchestrator.engine import ACCEPTED, Engine
from orchestrator.errors import IllegalTransition, InvalidInput, NotFound
from orchestrator.jsonutil import NotJSON, iso, loads, unstorable
from orchestrator.models import WorkflowInstance, utcnow
from orchestrator.schemas import INT32_MAX, INT64_MAX, Event, integer_text_problem, parse

from . import CALLBACK_TYPES, FINISHED, TASK_TYPE, ChatEvent, ChatSession, ChatSettings

log = logging.getLogger(__name__)


class Rejected(Exception):
    """A callback that cannot be accepted; `reason` is logged and counted."""

    def __init__(self, reason: str, problem: str) -> None:
        super().__init__(f"{reason}: {problem}")
        self.reason = reason
        self.problem = problem


@dataclass
class Accepted:
    duplicate: bool = False
    frames: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # engine events to fire


def frame(ev: ChatEvent) -> dict[str, Any]:
    """The WebSocket frame of a stream event (see docs/chat.md)."""
    return {"type": ev.type, "task_id": ev.task_id, "seq": ev.seq, "data": ev.data}


# -- schemas: the Redis callback contract (docs/chat.md; /asyncapi.json is generated from it) -------
class ChatCallback(Event):
    """One message of the execution service, on the Redis Stream `chat:callbacks:<consumer_id>`
    (field `data`) or the pub/sub channel `callback:<consumer_id>`:
    a `chunk` of a task's output, or its final `result` or `error`; `seq` counts from 1 per task."""

    session_id: str = Field(min_length=1, max_length=64)
    task_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=1, le=INT32_MAX)  # stored in an INTEGER column
    type: Literal[CALLBACK_TYPES]  # type: ignore[valid-type]
    result: Any = Field(description="the chunk's or the final answer's data (any JSON; required, may be null)")


NESTED_TOO_DEEPLY = "body: JSON nested too deeply"


def parse_callback(raw: Any, max_bytes: int | None = None) -> dict[str, Any]:
    """Check a callback's shape; raise Rejected("malformed", ...) naming the field, or
    Rejected("too_large", ...) when the message holds more than `max_bytes` bytes."""
    if max_bytes is not None and isinstance(raw, (bytes, str)):
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogateescape"))
        if size > max_bytes:
            raise Rejected("too_large", f"body: {size} bytes, more than CHAT_MAX_CALLBACK_BYTES ({max_bytes})")
    if isinstance(raw, (bytes, str)):
        try:
            raw = loads(raw)
        except NotJSON as exc:  # its field when it names one (a key given twice), else the body
            raise Rejected("malformed", NESTED_TOO_DEEPLY if "nested" in str(exc) else
                           f"{exc.field}: {exc.problem}" if exc.field else f"body: not JSON: {exc.problem}") from None
    if not isinstance(raw, dict):
        raise Rejected("malformed", "body: must be a JSON object")
    try:
        bad = unstorable(raw)  # text the database refuses would fail the store on every consumer
        if bad is not None:
            raise Rejected("malformed", f"{bad[0]}: {bad[1]}")
        return parse(ChatCallback, raw).model_dump()
    except InvalidInput as exc:
        raise Rejected("malformed", f"{exc.field}: {exc.problem}") from None
    except RecursionError:
        raise Rejected("malformed", NESTED_TOO_DEEPLY) from None


class ChatStore:
    def __init__(self, engine: Engine, chat: ChatSettings) -> None:
        self.engine = engine
        self.sessions = engine.sessions
        self.chat = chat

    # -- sessions ------------------------------------------------------------------------------
    def create_session(self, user_id: str | None, config: dict[str, Any]) -> dict[str, Any]:
        now = utcnow()
        row = ChatSession(id=str(uuid.uuid4()), user_id=user_id, config=config, status="active",
                          last_seq=0, created_at=now, updated_at=now)
        with self.sessions() as s, s.begin():
            s.add(row)
        return session_dict(row)

    def session(self, session_id: str) -> dict[str, Any]:
        with self.sessions() as s:
            row = s.get(ChatSession, session_id)
            if row is None:
                raise NotFound(f"chat session {session_id} not found", session_id=session_id)
            out = session_dict(row)
            out["tasks"] = s.execute(select(func.count()).where(
                WorkflowInstance.type == TASK_TYPE, _task_session() == session_id)).scalar_one()
            return out

    def exists(self, session_id: str) -> bool:
        with self.sessions() as s:
            return s.get(ChatSession, session_id) is not None

    def delete_session(self, session_id: str) -> list[str]:
        """Remove the session, its stream and its tasks. Returns the task ids."""
        with self.sessions() as s, s.begin():
            row = s.execute(select(ChatSession).where(ChatSession.id == session_id).with_for_update()
                            ).scalar_one_or_none()
            if row is None:
                raise NotFound(f"chat session {session_id} not found", session_id=session_id)
            ids = list(s.execute(select(WorkflowInstance.id).where(
                WorkflowInstance.type == TASK_TYPE, _task_session() == session_id)).scalars())
            s.execute(delete(ChatEvent).where(ChatEvent.session_id == session_id))
            s.delete(row)
        self.engine.delete_instances(ids)
        return ids

    # -- tasks ---------------------------------------------------------------------------------
    def submit(self, session_id: str, message: str, idempotency_key: str | None) -> tuple[dict[str, Any], bool]:
        with self.sessions() as s:
            row = s.get(ChatSession, session_id)
            if row is None:
                raise NotFound(f"chat session {session_id} not found", session_id=session_id)
            config = row.config or {}
        snapshot, created = self.engine.start(
            TASK_TYPE, {"session_id": session_id, "message": message, "config": config},
            idempotency_key=session_key(session_id, idempotency_key) if idempotency_key else None, actor="chat")
        frames: list[dict[str, Any]] = []
        if created:
            frames = self.append_status(session_id, snapshot["id"], "queued")
        return {"task": snapshot, "frames": frames}, created

    def task(self, session_id: str, task_id: str) -> dict[str, Any]:
        with self.sessions() as s:
            inst = s.get(WorkflowInstance, task_id)
            if inst is None or inst.type != TASK_TYPE or (inst.context or {}).get("input", {}).get(
                    "session_id") != session_id:
                if s.get(ChatSession, session_id) is None:
                    raise NotFound(f"chat session {session_id} not found", session_id=session_id)
                raise NotFound(f"task {task_id} not found in session {session_id}", task_id=task_id)
            events = s.execute(select(ChatEvent).where(ChatEvent.task_id == task_id, ChatEvent.task_seq.is_not(None))
                               .order_by(ChatEvent.task_seq)).scalars().all()
            return task_dict(inst, events)

    def tasks(self, session_id: str, limit: int, offset: int) -> dict[str, Any]:
        with self.sessions() as s:
            if s.get(ChatSession, session_id) is None:
                raise NotFound(f"chat session {session_id} not found", session_id=session_id)
            q = select(WorkflowInstance).where(WorkflowInstance.type == TASK_TYPE, _task_session() == session_id)
            total = s.execute(select(func.count()).select_from(q.subquery())).scalar_one()
            rows = s.execute(q.order_by(WorkflowInstance.created_at, WorkflowInstance.id)
                             .limit(limit).offset(offset)).scalars().all()
            ids = [r.id for r in rows]
            counts = dict(s.execute(select(ChatEvent.task_id, func.count()).where(
                ChatEvent.task_id.in_(ids), ChatEvent.type == "chunk",
                ChatEvent.seq.is_not(None)).group_by(ChatEvent.task_id)).all()) if rows else {}
            # each task's final event, so an item's result and error are the single read's, not null
            finals: dict[str, list[ChatEvent]] = {}
            if rows:
                for ev in s.execute(select(ChatEvent).where(
                        ChatEvent.task_id.in_(ids), ChatEvent.type.in_(("result", "error")),
                        ChatEvent.seq.is_not(None)).order_by(ChatEvent.task_seq)).scalars():
                    finals.setdefault(ev.task_id, []).append(ev)
            items = []
            for r in rows:
                item = task_dict(r, finals.get(r.id, []))
                item["chunks_received"] = counts.get(r.id, 0)
                del item["chunks"]
                items.append(item)
            return {"session_id": session_id, "total": total, "limit": limit, "offset": offset, "tasks": items}

    # -- the stream ----------------------------------------------------------------------------
    def _lock(self, s: Session, session_id: str) -> ChatSession | None:
        return s.execute(select(ChatSession).where(ChatSession.id == session_id).with_for_update()
                         ).scalar_one_or_none()

    @staticmethod
    def _append(s: Session, sess: ChatSession, task_id: str | None, type_: str, data: Any) -> ChatEvent:
        sess.last_seq += 1
        sess.updated_at = utcnow()
        ev = ChatEvent(session_id=sess.id, task_id=task_id, seq=sess.last_seq, type=type_, data=data)
        s.add(ev)
        return ev

    @staticmethod
    def _stream_status(s: Session, task_id: str) -> str | None:
        data = s.execute(select(ChatEvent.data).where(ChatEvent.task_id == task_id, ChatEvent.type == "status")
                         .order_by(ChatEvent.seq.desc()).limit(1)).scalar()
        return data.get("status") if data else None

    def append_status(self, session_id: str, task_id: str, status: str, **extra: Any) -> list[dict[str, Any]]:
        """Append a status frame; "queued" only as the task's first (a callback may have been first)."""
        with self.sessions() as s, s.begin():
            sess = self._lock(s, session_id)
            if sess is None:
                return []
            if status == "queued" and self._stream_status(s, task_id) is not None:
                return []
            ev = self._append(s, sess, task_id, "status", {"status": status, **extra})
            s.flush()
            return [frame(ev)]

    def events_after(self, session_id: str, after: int, limit: int = 1000) -> list[dict[str, Any]]:
        with self.sessions() as s:
            rows = s.execute(select(ChatEvent).where(ChatEvent.session_id == session_id, ChatEvent.seq > after)
                             .order_by(ChatEvent.seq).limit(limit)).scalars().all()
            return [frame(r) for r in rows]

    def accept_callback(self, cb: dict[str, Any]) -> Accepted:
        """Store a callback once (by task and seq) and deliver, in order, every callback of its
        task whose predecessors have all arrived. Raises Rejected for an unknown session or task,
        or a task that has already finished."""
        sid, tid, seq, type_ = cb["session_id"], cb["task_id"], cb["seq"], cb["type"]
        with self.sessions() as s, s.begin():
            sess = self._lock(s, sid)
            if sess is None:
                raise Rejected("unknown_session", f"session_id: no session {sid}")
            inst = s.execute(select(WorkflowInstance.type, WorkflowInstance.state, WorkflowInstance.context)
                             .where(WorkflowInstance.id == tid)).first()
            if inst is None or inst.type != TASK_TYPE or (inst.context or {}).get("input", {}).get("session_id") != sid:
                raise Rejected("unknown_task", f"task_id: no task {tid} in session {sid}")
            if s.execute(select(ChatEvent.id).where(ChatEvent.task_id == tid, ChatEvent.task_seq == seq)).first():
                return Accepted(duplicate=True, events=self._unfinished_end(s, tid, inst.state))
            delivered = s.execute(select(ChatEvent.task_seq, ChatEvent.type).where(
                ChatEvent.task_id == tid, ChatEvent.task_seq.is_not(None), ChatEvent.seq.is_not(None))
                .order_by(ChatEvent.task_seq)).all()
            if inst.state in FINISHED or any(t in ("result", "error") for _, t in delivered):
                raise Rejected("task_finished", f"task_id: task {tid} is already {inst.state}")
            s.add(ChatEvent(session_id=sid, task_id=tid, task_seq=seq, type=type_, data=cb["result"]))
            s.flush()
            out = Accepted()
            new: list[ChatEvent] = []
            # The stream's own status frames say where the task is (the engine follows after
            # commit, so its row may lag behind a callback that came right after another).
            state = self._stream_status(s, tid)
            if state is None:  # the callback beat the API's "queued" frame
                new.append(self._append(s, sess, tid, "status", {"status": "queued"}))
                state = "queued"
            if state == "queued":
                out.events.append(("start", {}))
                new.append(self._append(s, sess, tid, "status", {"status": "running"}))
                state = "running"
            expected = (delivered[-1][0] if delivered else 0) + 1
            waiting = s.execute(select(ChatEvent).where(ChatEvent.task_id == tid, ChatEvent.seq.is_(None),
                                                        ChatEvent.task_seq >= expected)
                                .order_by(ChatEvent.task_seq)).scalars().all()
            for ev in waiting:
                if ev.task_seq != expected:
                    break  # an earlier callback is still missing; deliver when it comes
                if ev.type == "chunk" and state == "running":
                    out.events.append(("stream", {}))
                    new.append(self._append(s, sess, tid, "status", {"status": "streaming"}))
                    state = "streaming"
                sess.last_seq += 1
                ev.seq = sess.last_seq
                new.append(ev)
                expected += 1
                if ev.type in ("result", "error"):
                    if ev.type == "result":
                        out.events.append(("complete", {"result": ev.data}))
                        new.append(self._append(s, sess, tid, "status", {"status": "completed"}))
                    else:
                        out.events.append(("error", {"error": ev.data}))
                        new.append(self._append(s, sess, tid, "status", {"status": "failed"}))
                    break
            s.flush()
            out.frames = [frame(ev) for ev in new]
            return out

    @staticmethod
    def _unfinished_end(s: Session, task_id: str, state: str) -> list[tuple[str, dict[str, Any]]]:
        """The final event again when the task's result or error is stored but its step is not
        completed: the process that stored it died before it fired it. A redelivered callback
        (stream entries are acknowledged only after this) then finishes the task."""
        if state in FINISHED:
            return []
        final = s.execute(select(ChatEvent.type, ChatEvent.data).where(
            ChatEvent.task_id == task_id, ChatEvent.seq.is_not(None), ChatEvent.type.in_(("result", "error")))
        ).first()
        if final is None:
            return []
        return [("complete", {"result": final.data})] if final.type == "result" else [("error", {"error": final.data})]

    def fire(self, task_id: str, events: list[tuple[str, dict[str, Any]]]) -> None:
        """Follow the stream with the task's lifecycle on the engine: `start` and `stream` move
        it while its execution step runs; the final `complete` or `error` completes that step
        (an external step keyed by the task id), which ends the task."""
        for event, payload in events:
            try:
                if event in ("complete", "error"):
                    outcome = self.engine.complete_external(task_id, True, payload, actor="execution")
                    if outcome != ACCEPTED:
                        log.info("chat task %s: %s not applied (%s)", task_id, event, outcome)
                else:
                    self.engine.fire(task_id, event, payload, actor="execution")
            except (IllegalTransition, NotFound) as exc:  # timed out or deleted meanwhile
                log.info("chat task %s: %s not applied: %s", task_id, event, exc)

    def timed_out_frames(self, task_id: str) -> tuple[str, list[dict[str, Any]]]:
        """(session id, the status frame) for a task the sweeper timed out; idempotent."""
        with self.sessions() as s:
            inst = s.get(WorkflowInstance, task_id)
            if inst is None or inst.type != TASK_TYPE or inst.state != "timed_out":
                return "", []
            sid = inst.context["input"]["session_id"]
            error = inst.context.get("error")
            already = s.execute(select(ChatEvent.id).where(ChatEvent.task_id == task_id, ChatEvent.type == "status",
                                                           ChatEvent.data["status"].as_string() == "timed_out")).first()
        if already:
            return sid, []
        return sid, self.append_status(sid, task_id, "timed_out", error=error)

    def live_counts(self) -> dict[str, int]:
        with self.sessions() as s:
            return {"sessions": s.execute(select(func.count()).select_from(ChatSession)).scalar_one()}


def session_key(session_id: str, key: str) -> str:
    """The stored idempotency key of a task submitted with `Idempotency-Key: key`: scoped to its
    session (two sessions may use the same key), `<session>:<key>`, or `<session>:sha256:<hex>`
    when that would not fit the 255-character column (a key of up to 255 characters is taken on
    every route, and a longer scoped one was refused naming a limit the client had kept)."""
    scoped = f"{session_id}:{key}"
    if len(scoped) <= WorkflowInstance.__table__.c.idempotency_key.type.length:
        return scoped
    import hashlib

    return f"{session_id}:sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def _task_session() -> Any:
    return WorkflowInstance.context["input"]["session_id"].as_string()


def session_dict(row: ChatSession) -> dict[str, Any]:
    return {"session_id": row.id, "status": row.status, "created_at": iso(row.created_at),
            "updated_at": iso(row.updated_at), "user_id": row.user_id, "config": row.config or {},
            "last_seq": row.last_seq}


def task_dict(inst: WorkflowInstance, events: list[ChatEvent]) -> dict[str, Any]:
    data = inst.context.get("input", {})
    chunks = [{"seq": e.task_seq, "data": e.data} for e in events if e.type == "chunk" and e.seq is not None]
    final = next((e for e in events if e.type in ("result", "error") and e.seq is not None), None)
    return {
        "task_id": inst.id, "session_id": data.get("session_id"), "status": inst.state,
        "message": data.get("message"), "created_at": iso(inst.created_at), "updated_at": iso(inst.updated_at),
        "finished_at": iso(inst.finished_at), "chunks_received": len(chunks), "chunks": chunks,
        "result": final.data if final is not None and final.type == "result" else None,
        "error": (final.data if final is not None and final.type == "error" else inst.context.get("error")),
    }


def bad_after_seq(raw: Any, field: str = "after_seq") -> int:
    """A resume position: an integer from 0 to INT64_MAX (it is compared in SQL); InvalidInput
    naming `field` (`after_seq`, or the `Last-Event-ID` header it came from) otherwise. Text
    must be decimal digits (`integer_text_problem`): int() would take `1_0` as 10."""
    if isinstance(raw, str) and integer_text_problem(raw):
        raise InvalidInput(field, f"must be an integer >= 0, got {raw[:40]!r}")
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise InvalidInput(field, f"must be an integer >= 0, got {str(raw)[:40]!r}") from None
    if not 0 <= value <= INT64_MAX:
        raise InvalidInput(field, f"must be an integer from 0 to {INT64_MAX}, got {str(raw)[:40]}")
    return value
