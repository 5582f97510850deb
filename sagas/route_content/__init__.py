"""Route content (seed 000): route.confirmed -> story.generate -> one tts.requested per story ->
tts.completed per story (fan-in) -> delivery.prefetch.

The work is done by services we do not own and reported on Kafka, so the steps are awaited as
events: no Celery task runs. Each step's status and attempt live in the instance's context and
change in the same transaction as the state and the outgoing messages.

    received --confirm--> generating_stories --stories_ready--> synthesizing --tts_result*--> completed
                                                                     |  ^
                                                  (all reported, one failed)  restart_tts
                                                                     v  |
                                                                  tts_failed

The tts_batch step fails once every requested story has reported and at least one failed, so a
restart never re-requests a story still in flight; a restart re-requests only the stories that
did not complete, so no story is synthesised twice after success.
"""
from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from prometheus_client import Histogram
from sqlalchemy import select
from statemachine import State

from orchestrator.config import Settings
from orchestrator.errors import InvalidInput, NotFound
from orchestrator.kafka_bridge import Ignored, KafkaEvent, require
from orchestrator.models import WorkflowInstance, utcnow
from orchestrator.workflow import Workflow, register

log = logging.getLogger(__name__)

ROUTE_TO_FIRST_AUDIO = Histogram("route_to_first_audio_seconds",
                                 "From route.confirmed to the first story with audio",
                                 buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
JOB_DURATION = Histogram("job_duration_seconds", "Duration of a workflow step, start to finish",
                         ["workflow", "step", "status"],
                         buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))

STEP_NAMES = ("story_generate", "tts_batch", "delivery_prefetch")
STORY_LANG = "ru"
#: A story error that starts so: its tts.requested was never published.
UNSENT = "not requested: "


def _now() -> str:
    return utcnow().isoformat()


def _story_id(value: Any, field: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or (isinstance(value, str) and not value.strip()):
        raise InvalidInput(field, "must be a non-empty string or an integer")
    return str(value)


@register
class RouteContent(Workflow):
    type = "route_content"
    start_event = "confirm"
    success_states = frozenset({"completed"})
    failure_states = frozenset({"tts_failed"})

    kafka_consumes = {
        "route.confirmed": "on_route_confirmed",
        "story.generate.completed": "on_stories_generated",
        "tts.completed": "on_tts_completed",
    }
    kafka_produces = ("story.generate", "tts.requested", "delivery.prefetch")
    # No user signals: the services' results arrive through the bridge, checked by the handlers
    # below; the TTS batch is restarted with POST /workflows/<route_id>/restart?step=tts_batch.
    signals: dict[str, Any] = {}
    started_by = "a route.confirmed event on Kafka (keyed by its route_id)"

    received = State(initial=True)
    generating_stories = State()
    synthesizing = State()
    tts_failed = State()
    completed = State(final=True)

    confirm = received.to(generating_stories)
    stories_ready = (generating_stories.to(synthesizing, cond="has_stories")
                     | generating_stories.to(completed))
    tts_result = (synthesizing.to(completed, cond="result_completes_batch")
                  | synthesizing.to(tts_failed, cond="result_fails_batch")
                  | synthesizing.to.itself(internal=True, cond="result_expected"))
    restart_tts = tts_failed.to(synthesizing)

    # -- guards (the truth, under the instance lock) ---------------------------------------------
    def has_stories(self, payload: dict[str, Any] | None = None) -> bool:
        return bool((payload or {}).get("stories"))

    def _story(self, story_id: str) -> dict[str, Any] | None:
        return next((s for s in self.model.context.get("stories", []) if s["story_id"] == story_id), None)

    def result_expected(self, payload: dict[str, Any] | None = None) -> bool:
        story = self._story(str((payload or {}).get("story_id")))
        return story is not None and story["tts_status"] == "requested"

    def _after(self, payload: dict[str, Any]) -> list[str]:
        sid = str(payload["story_id"])
        return [payload["status"] if s["story_id"] == sid else s["tts_status"]
                for s in self.model.context.get("stories", [])]

    def result_completes_batch(self, payload: dict[str, Any] | None = None) -> bool:
        return self.result_expected(payload) and all(s == "completed" for s in self._after(payload or {}))

    def result_fails_batch(self, payload: dict[str, Any] | None = None) -> bool:
        if not self.result_expected(payload):
            return False
        after = self._after(payload or {})
        return "requested" not in after and "failed" in after

    # -- effects (written in the transition's transaction) ---------------------------------------
    def on_enter_received(self) -> None:
        ctx = self.model.context
        data = ctx.get("input") or {}
        ctx.setdefault("route_id", data.get("route_id"))
        ctx.setdefault("mode", data.get("mode"))
        ctx.setdefault("steps", {name: {"status": "pending", "attempt": 0} for name in STEP_NAMES})
        ctx.setdefault("stories", [])

    def on_confirm(self) -> None:
        ctx = self.context
        ctx["confirmed_at"] = _now()
        step = ctx["steps"]["story_generate"]
        step.update(status="running", attempt=step["attempt"] + 1, started_at=_now())
        self.emit("kafka", "story.generate", {"route_id": ctx["route_id"], "lang": STORY_LANG},
                  key=ctx["route_id"])

    def on_stories_ready(self, payload: dict[str, Any] | None = None) -> None:
        ctx = self.context
        payload = payload or {}
        ctx["lang"] = payload.get("lang")
        ctx["stories"] = [{"story_id": s["story_id"], "text": s["text"], "tts_status": "pending",
                           "audio_url": None, "error": None} for s in payload.get("stories", [])]
        ctx["steps"]["story_generate"].update(status="completed", finished_at=_now())

    def on_enter_synthesizing(self) -> None:
        """Request TTS for every story not completed yet (all of them the first time)."""
        ctx = self.context
        route_id = ctx["route_id"]
        step = ctx["steps"]["tts_batch"]
        step.update(status="pending", attempt=step["attempt"] + 1, error=None, finished_at=None,
                    started_at=step.get("started_at") or _now())
        for story in ctx["stories"]:
            if story["tts_status"] == "completed":
                continue
            story.update(tts_status="requested", error=None)
            self.emit("kafka", "tts.requested", {"route_id": route_id, "story_id": story["story_id"],
                                                 "text": story["text"], "lang": ctx.get("lang") or STORY_LANG,
                                                 "attempt": step["attempt"]}, key=route_id)
        self._count()

    def on_tts_result(self, payload: dict[str, Any] | None = None) -> None:
        payload = payload or {}
        ctx = self.context
        story = self._story(str(payload["story_id"]))
        assert story is not None  # the guard checked it
        story.update(tts_status=payload["status"], audio_url=payload.get("audio_url"),
                     error=payload.get("error") if payload["status"] == "failed" else None)
        if payload["status"] == "completed" and not ctx.get("first_audio_at"):
            ctx["first_audio_at"] = _now()
        ctx["steps"]["tts_batch"]["status"] = "running"
        self._count()

    def _count(self) -> None:
        ctx = self.context
        statuses = [s["tts_status"] for s in ctx["stories"]]
        ctx["steps"]["tts_batch"].update(total=len(statuses), done=statuses.count("completed"),
                                         failed=statuses.count("failed"))

    def on_enter_tts_failed(self) -> None:
        ctx = self.context
        failed = [s for s in ctx["stories"] if s["tts_status"] == "failed"]
        error = f"TTS failed for stories: {', '.join(s['story_id'] for s in failed)}"
        unsent = [f"{s['story_id']}: {s['error']}" for s in failed if (s.get("error") or "").startswith(UNSENT)]
        if unsent:  # say why when the request never left (e.g. a text too large for Kafka)
            error += " (" + "; ".join(unsent) + ")"
        ctx["steps"]["tts_batch"].update(status="failed", finished_at=_now(), error=error)

    @classmethod
    def message_failed(cls, context: dict[str, Any], target: str, payload: dict[str, Any],
                       error: str) -> tuple[str, dict[str, Any]] | None:
        """A tts.requested that can never be published counts as that story's failed TTS, so
        the batch fails once the others have reported (and a restart can re-request it)."""
        if target == "tts.requested" and payload.get("attempt") == context["steps"]["tts_batch"]["attempt"]:
            return "tts_result", {"story_id": payload["story_id"], "status": "failed", "audio_url": None,
                                  "error": f"{UNSENT}{error}"}
        return None

    def on_enter_completed(self) -> None:
        ctx = self.context
        route_id = ctx["route_id"]
        if ctx["stories"]:
            ctx["steps"]["tts_batch"].update(status="completed", finished_at=_now())
        else:
            ctx["steps"]["tts_batch"].update(status="completed", total=0, done=0, failed=0)
        prefetch = ctx["steps"]["delivery_prefetch"]
        next_audio = [{"story_id": s["story_id"], "audio_url": s.get("audio_url")} for s in ctx["stories"]]
        self.emit("kafka", "delivery.prefetch", {"route_id": route_id, "next_audio": next_audio}, key=route_id)
        prefetch.update(status="completed", attempt=prefetch["attempt"] + 1, started_at=_now(),
                        finished_at=_now())

    # -- input -------------------------------------------------------------------------------
    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        if not isinstance(data, dict):
            raise InvalidInput("body", "must be a JSON object")
        require(data, "route_id", str)
        require(data, "mode", str)
        if len(data["route_id"]) > 255:
            raise InvalidInput("route_id", "must be at most 255 characters")
        return data

    # -- Kafka handlers (run by the bridge; one engine call each) ----------------------------------
    @classmethod
    def find(cls, engine: Any, route_id: str) -> str:
        with engine.sessions() as s:
            found = s.execute(select(WorkflowInstance.id).where(
                WorkflowInstance.type == cls.type, WorkflowInstance.business_key == route_id)).scalar()
        if found is None:
            raise NotFound(f"unknown route_id {route_id!r}", route_id=route_id)
        return str(found)

    @classmethod
    def on_route_confirmed(cls, engine: Any, event: KafkaEvent) -> str:
        data = cls.validate_input(event.payload, engine.settings)
        _, created = engine.start(cls.type, data, key=data["route_id"], actor="kafka:route.confirmed")
        if not created:
            raise Ignored(f"route {data['route_id']} was already confirmed")
        return "accepted"

    @classmethod
    def on_stories_generated(cls, engine: Any, event: KafkaEvent) -> str:
        p = event.payload
        route_id = require(p, "route_id", str)
        lang = require(p, "lang", str)
        stories = require(p, "stories", list, nonempty=False)
        clean, seen = [], set()
        for i, story in enumerate(stories):
            if not isinstance(story, dict):
                raise InvalidInput(f"stories[{i}]", "must be an object with story_id and text")
            sid = _story_id(story.get("story_id"), f"stories[{i}].story_id")
            if sid in seen:
                raise InvalidInput(f"stories[{i}].story_id", f"story {sid} appears twice")
            seen.add(sid)
            text = story.get("text")
            if not isinstance(text, str) or not text.strip():
                raise InvalidInput(f"stories[{i}].text", "must be a non-empty string")
            clean.append({"story_id": sid, "text": text})
        instance_id = cls.find(engine, route_id)
        before = engine.snapshot(instance_id, history=False)
        if before["state"] != "generating_stories":
            raise Ignored(f"stories for route {route_id} were already received (state {before['state']})")
        after = engine.fire(instance_id, "stories_ready", {"lang": lang, "stories": clean},
                            actor="kafka:story.generate.completed")
        _observe_steps(before, after)
        return "accepted"

    @classmethod
    def on_tts_completed(cls, engine: Any, event: KafkaEvent) -> str:
        p = event.payload
        route_id = require(p, "route_id", str)
        story_id = _story_id(p.get("story_id"), "story_id") if p.get("story_id") is not None \
            else require(p, "story_id", str)
        status = require(p, "status", str)
        if status not in ("completed", "failed"):
            raise InvalidInput("status", f"must be 'completed' or 'failed', got {status!r}")
        audio_url = require(p, "audio_url", str, optional=True)
        error = require(p, "error", str, optional=True, nonempty=False)
        attempt = require(p, "attempt", int, optional=True)
        instance_id = cls.find(engine, route_id)
        before = engine.snapshot(instance_id, history=False)
        ctx = before["context"]
        story = next((s for s in ctx.get("stories", []) if s["story_id"] == story_id), None)
        if story is None:
            if before["state"] in ("received", "generating_stories"):
                raise Ignored(f"tts.completed for story {story_id} before route {route_id} has stories")
            raise InvalidInput("story_id", f"story {story_id} does not belong to route {route_id}")
        current = ctx["steps"]["tts_batch"]["attempt"]
        if attempt is not None and attempt != current:
            raise Ignored(f"stale tts.completed for story {story_id} (attempt {attempt}, now {current})")
        if story["tts_status"] != "requested":
            raise Ignored(f"second tts.completed for story {story_id} of route {route_id} "
                          f"(already {story['tts_status']})")
        after = engine.fire(instance_id, "tts_result",
                            {"story_id": story_id, "status": status, "audio_url": audio_url, "error": error},
                            actor="kafka:tts.completed")
        first, confirmed = after["context"].get("first_audio_at"), after["context"].get("confirmed_at")
        if first and not ctx.get("first_audio_at") and confirmed:
            ROUTE_TO_FIRST_AUDIO.observe((datetime.fromisoformat(first) - datetime.fromisoformat(confirmed))
                                         .total_seconds())
        _observe_steps(before, after)
        return "accepted"


def _observe_steps(before: dict[str, Any], after: dict[str, Any]) -> None:
    """JOB_DURATION for each step this event finished."""
    old = before["context"].get("steps", {})
    for name, step in after["context"].get("steps", {}).items():
        if step.get("status") in ("completed", "failed") and old.get(name, {}).get("status") != step["status"] \
                and step.get("started_at") and step.get("finished_at"):
            seconds = (datetime.fromisoformat(step["finished_at"]) - datetime.fromisoformat(step["started_at"]))
            JOB_DURATION.labels(RouteContent.type, name, step["status"]).observe(seconds.total_seconds())


def restart_step(engine: Any, route_id: str, step: str | None) -> dict[str, Any]:
    """POST /workflows/<route_id>/restart?step=tts_batch."""
    if not step:
        raise InvalidInput("step", "query parameter is required (step=tts_batch)")
    if step != "tts_batch":
        raise InvalidInput("step", f"only tts_batch can be restarted, got {step!r}")
    instance_id = RouteContent.find(engine, route_id)
    return engine.fire(instance_id, "restart_tts", {"step": step}, actor="api")


def route_view(snapshot: dict[str, Any]) -> dict[str, Any]:
    ctx = snapshot["context"]
    state = snapshot["state"]
    status = {"completed": "completed", "tts_failed": "failed"}.get(state, "running")
    return {
        "route_id": ctx.get("route_id"),
        "status": status,
        "state": state,
        "mode": ctx.get("mode"),
        "created_at": snapshot["created_at"],
        "updated_at": snapshot["updated_at"],
        "steps": ctx.get("steps", {}),
        "stories": [{"story_id": s["story_id"], "tts_status": s["tts_status"],
                     **({"error": s["error"]} if s.get("error") else {})} for s in ctx.get("stories", [])],
    }
