"""Route content (seed 000): route.confirmed -> story.generate -> one tts.requested per story ->
tts.completed per story (fan-in) -> delivery.prefetch.

The work is done by services we do not own and reported on Kafka. Both waits are external steps
of the engine (`Step(external=...)`). The TTS batch has one item per story, each request written
to the outbox with the transition that issued its token, each tts.completed counted on the step
row, and the join fired when all have completed.

    received --confirm--> generating_stories --stories_ready--> synthesizing --tts_done--> completed
                               |       ^                             |       ^
    story_generate_failed      |       | restart_tts                 |       | restart_tts
    (timed out, or abandoned)  v       |        tts_batch_failed     v       |
                              story_failed                          tts_failed

(stories_ready with no stories goes from generating_stories straight to completed.)

Story generation is an external step too (`story_generate`, one item): its story.generate is
emitted with the confirm (or the restart) and its story.generate.completed completes it. When
no reply comes within ROUTE_STORY_TIMEOUT_SECONDS (the request or its reply was lost) the step
fails and the route goes to story_failed; a restart (also of a route still generating) sends
story.generate again. The story service's reply names no attempt, so whichever reply comes
first while the route waits is taken, and any later one is ignored (the route has its stories).

The tts_batch step fails once every requested story has reported and at least one failed, or
when its attempt outlives ROUTE_TTS_TIMEOUT_SECONDS (replies lost); a restart (also of a route
still synthesizing) re-requests only the stories that did not complete, so no story is
synthesised twice after success, and a reply to an abandoned attempt is ignored as stale. A tts.completed names its
story by (route_id, story_id): the token of that item is derived from them (`tts_token`).
"""
from __future__ import annotations

import functools
import hashlib
import logging
from datetime import datetime, timedelta
from typing import Any, Literal

from statemachine import State

from orchestrator.config import Settings
from pydantic import ConfigDict, Field

from orchestrator.engine import ACCEPTED, DUPLICATE, STALE
from orchestrator.errors import Conflict, IllegalTransition, InvalidInput, NotFound
from orchestrator.kafka_events import Ignored, KafkaEvent
from orchestrator.models import utcnow
from orchestrator.schemas import Event, Identifier, IdText, NonBlank, parse
from orchestrator.workflow import External, ItemFailed, Step, Workflow, register

from .settings import RouteSettings

log = logging.getLogger(__name__)


@functools.cache
def _histograms() -> tuple[Any, Any]:
    """(route_to_first_audio_seconds, job_duration_seconds), registered on first use: only the
    bridge observes them, and a worker, which loads this module too, is spared `prometheus_client`."""
    from prometheus_client import Histogram

    first_audio = Histogram("route_to_first_audio_seconds", "From route.confirmed to the first story with audio",
                            buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
    job_duration = Histogram("job_duration_seconds", "Duration of a workflow step, start to finish",
                             ["workflow", "step", "status"],
                             buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800))
    return first_audio, job_duration


STEP_NAMES = ("story_generate", "tts_batch", "delivery_prefetch")
STORY_LANG = "ru"
#: A story error that starts so: its tts.requested was never published.
UNSENT = "not requested: "


def _now() -> str:
    return utcnow().isoformat()


# -- schemas: the Kafka contract (docs/kafka.md; /asyncapi.json is generated from these) ----------
class RouteConfirmed(Event):
    """`route.confirmed` (consumed, key `route_id`): starts the route's workflow. Fields beyond
    these are kept in the workflow's input."""

    model_config = ConfigDict(extra="allow")

    route_id: Identifier = Field(max_length=255)
    mode: NonBlank = Field(max_length=64, description="how the route is travelled (walk, bike, ...)")


class StoryGenerate(Event):
    """`story.generate` (produced, key `route_id`): asks the story service for the route's stories."""

    route_id: str
    lang: str = Field(description='always "ru"')


class GeneratedStory(Event):
    story_id: IdText
    text: NonBlank


class StoryGenerateCompleted(Event):
    """`story.generate.completed` (consumed, key `route_id`): the route's stories (may be none);
    `story_id`s are unique within the route."""

    route_id: Identifier
    lang: NonBlank
    stories: list[GeneratedStory]


class TtsRequested(Event):
    """`tts.requested` (produced, key `route_id`): one story to synthesise; `attempt` is the
    tts_batch step's attempt (1, then 2 after a restart, ...)."""

    route_id: str
    story_id: str
    text: str
    lang: str
    attempt: int


class TtsCompleted(Event):
    """`tts.completed` (consumed, key `route_id`): one story's TTS outcome; a result for an older
    `attempt` is ignored."""

    route_id: Identifier
    story_id: IdText
    status: Literal["completed", "failed"]
    audio_url: str | None = None
    error: str | None = None
    attempt: int | None = None


class PrefetchAudio(Event):
    story_id: str
    audio_url: str | None


class DeliveryPrefetch(Event):
    """`delivery.prefetch` (produced, key `route_id`): the route's audio in story order."""

    route_id: str
    next_audio: list[PrefetchAudio]


def _tts_timeout(settings: Settings) -> timedelta:
    """How long one tts_batch attempt waits for its replies (ROUTE_TTS_TIMEOUT_SECONDS)."""
    return timedelta(seconds=RouteSettings.from_settings(settings).tts_timeout_seconds)


def _story_timeout(settings: Settings) -> timedelta:
    """How long one story_generate attempt waits for its reply (ROUTE_STORY_TIMEOUT_SECONDS)."""
    return timedelta(seconds=RouteSettings.from_settings(settings).story_timeout_seconds)


@register
class RouteContent(Workflow):
    type = "route_content"
    start_event = "confirm"
    success_states = frozenset({"completed"})
    failure_states = frozenset({"tts_failed", "story_failed"})

    kafka_consumes = {
        "route.confirmed": "on_route_confirmed",
        "story.generate.completed": "on_stories_generated",
        "tts.completed": "on_tts_completed",
    }
    kafka_produces = ("story.generate", "tts.requested", "delivery.prefetch")
    #: Every topic's payload model, consumed and produced (the bridge validates consumed events).
    kafka_schemas = {"route.confirmed": RouteConfirmed, "story.generate": StoryGenerate,
                     "story.generate.completed": StoryGenerateCompleted, "tts.requested": TtsRequested,
                     "tts.completed": TtsCompleted, "delivery.prefetch": DeliveryPrefetch}
    kafka_key = "route_id"
    # No user signals: the services' results arrive through the bridge, checked by the handlers
    # below; a step is restarted with POST /workflows/<route_id>/restart?step=tts_batch (or
    # step=story_generate).
    signals: dict[str, Any] = {}
    started_by = "a route.confirmed event on Kafka (keyed by its route_id)"

    received = State(initial=True)
    generating_stories = State()
    synthesizing = State()
    tts_failed = State()
    story_failed = State()
    completed = State(final=True)

    confirm = received.to(generating_stories)
    stories_ready = (generating_stories.to(synthesizing, cond="has_stories")
                     | generating_stories.to(completed))
    tts_done = synthesizing.to(completed)
    tts_batch_failed = synthesizing.to(tts_failed)
    story_generate_failed = generating_stories.to(story_failed)
    # The engine's one restart event (named for its first use), for either failed step.
    restart_tts = tts_failed.to(synthesizing) | story_failed.to(generating_stories)
    restart_event = "restart_tts"

    # story_generate: one item with the engine's own token (no method of the workflow, so a
    # route's start still builds no machine); story.generate is emitted by on_confirm and, on a
    # restart, by on_exit_story_failed. Listed after tts_batch, which GET /workflow-types showed
    # first before story_generate was a step.
    steps = {synthesizing: Step(name="tts_batch", external=External(items="story_ids", send="request_tts",
                                                                      token="story_token"),
                                timeout=_tts_timeout, join="tts_done", on_failure="tts_batch_failed"),
             generating_stories: Step(name="story_generate", external=External(), timeout=_story_timeout,
                                      join="stories_ready", on_failure="story_generate_failed")}

    # -- guards ----------------------------------------------------------------------------------
    def has_stories(self, payload: dict[str, Any] | None = None) -> bool:
        return bool((payload or {}).get("stories"))

    # -- the TTS batch: one item per story -------------------------------------------------------
    def story_ids(self) -> list[str]:
        return [s["story_id"] for s in self.model.context.get("stories", [])]

    def story_token(self, step: str, index: int, story_id: str, restarts: int) -> str:
        return tts_token(self.model.context["route_id"], story_id)

    def request_tts(self, story_id: str, token: str, attempt: int) -> None:
        """The tts.requested of one story (its first request, or a restart's)."""
        ctx = self.model.context
        text = next(s["text"] for s in ctx["stories"] if s["story_id"] == story_id)
        self.emit("kafka", "tts.requested", {"route_id": ctx["route_id"], "story_id": story_id, "text": text,
                                             "lang": ctx.get("lang") or STORY_LANG, "attempt": attempt},
                  key=ctx["route_id"])

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

    def on_enter_story_failed(self, payload: dict[str, Any] | None = None) -> None:
        error = (payload or {}).get("error") or "story generation failed"
        self.context["steps"]["story_generate"].update(status="failed", finished_at=_now(), error=error)

    def on_exit_story_failed(self) -> None:
        """Leaving story_failed is a restart: ask the story service again."""
        ctx = self.context
        step = ctx["steps"]["story_generate"]
        step.update(status="running", attempt=step["attempt"] + 1, started_at=_now(), finished_at=None,
                    error=None)
        self.emit("kafka", "story.generate", {"route_id": ctx["route_id"], "lang": STORY_LANG},
                  key=ctx["route_id"])

    def on_stories_ready(self, payload: dict[str, Any] | None = None) -> None:
        ctx = self.context
        payload = payload or {}
        ctx["lang"] = payload.get("lang")
        ctx["stories"] = [{"story_id": s["story_id"], "text": s["text"]} for s in payload.get("stories", [])]
        ctx["steps"]["story_generate"].update(status="completed", finished_at=_now())

    def on_enter_synthesizing(self) -> None:
        """The batch's own account (its counts come from the engine's step row: route_view)."""
        step = self.context["steps"]["tts_batch"]
        step.update(status="pending", attempt=step["attempt"] + 1, error=None, finished_at=None,
                    started_at=_now())  # this attempt's start: its requests go out now

    def on_enter_tts_failed(self, payload: dict[str, Any] | None = None) -> None:
        payload = payload or {}
        failed = payload.get("failed")
        if failed:
            error = f"TTS failed for stories: {', '.join(f['input'] for f in failed)}"
            unsent = [f"{f['input']}: {f['error']}" for f in failed if (f.get("error") or "").startswith(UNSENT)]
            if unsent:  # say why when the request never left (e.g. a text too large for Kafka)
                error += " (" + "; ".join(unsent) + ")"
        else:
            error = payload.get("error") or "TTS failed"
        self.context["steps"]["tts_batch"].update(status="failed", finished_at=_now(), error=error)

    @classmethod
    def message_failed(cls, context: dict[str, Any], target: str, payload: dict[str, Any],
                       error: str) -> ItemFailed | None:
        """A tts.requested that can never be published counts as that story's failed TTS, so
        the batch fails once the others have reported (and a restart can re-request it)."""
        if target == "tts.requested":
            return ItemFailed(tts_token(payload["route_id"], str(payload["story_id"])), f"{UNSENT}{error}")
        return None

    def on_enter_completed(self, payload: dict[str, Any] | None = None) -> None:
        ctx = self.context
        route_id = ctx["route_id"]
        if ctx["stories"]:
            ctx["steps"]["tts_batch"].update(status="completed", finished_at=_now())
        else:
            ctx["steps"]["tts_batch"].update(status="completed", total=0, done=0, failed=0)
        outputs = (payload or {}).get("items") or [{} for _ in ctx["stories"]]
        prefetch = ctx["steps"]["delivery_prefetch"]
        next_audio = [{"story_id": s["story_id"], "audio_url": (out or {}).get("audio_url")}
                      for s, out in zip(ctx["stories"], outputs)]
        self.emit("kafka", "delivery.prefetch", {"route_id": route_id, "next_audio": next_audio}, key=route_id)
        prefetch.update(status="completed", attempt=prefetch["attempt"] + 1, started_at=_now(),
                        finished_at=_now())

    # -- input -------------------------------------------------------------------------------
    @classmethod
    def validate_input(cls, data: Any, settings: Settings) -> dict[str, Any]:
        parse(RouteConfirmed, data)
        return data  # as sent: the seed's extra fields are kept in the input

    # -- Kafka handlers (run by the bridge; one engine call each) ----------------------------------
    @classmethod
    def find(cls, engine: Any, route_id: str) -> str:
        """The route's instance id; NotFound (404) naming the route_id."""
        found = engine.find(cls.type, route_id)
        if found is None:
            raise NotFound(f"unknown route_id {route_id!r}", route_id=route_id)
        return str(found)

    @classmethod
    def on_route_confirmed(cls, engine: Any, event: KafkaEvent) -> str:
        _histograms()  # listed on /metrics from the route's first event on
        # start() validates the input (validate_input) before it looks at the key
        route_id = event.payload.get("route_id")
        _, created = engine.start(cls.type, event.payload, key=route_id, actor="kafka:route.confirmed",
                                  answer=False)
        if not created:
            raise Ignored(f"route {route_id} was already confirmed")
        return "accepted"

    @classmethod
    def on_stories_generated(cls, engine: Any, event: KafkaEvent) -> str:
        p = parse(StoryGenerateCompleted, event.payload)
        route_id, lang = p.route_id, p.lang
        clean, seen = [], set()
        for i, story in enumerate(p.stories):
            if story.story_id in seen:  # across items: no per-field model rule says this
                raise InvalidInput(f"stories.{i}.story_id", f"story {story.story_id} appears twice")
            seen.add(story.story_id)
            clean.append({"story_id": story.story_id, "text": story.text})
        instance_id = cls.find(engine, route_id)
        before = engine.snapshot(instance_id, history=False)
        if before["state"] == "story_failed":
            raise Ignored(f"stories for route {route_id} came after its story_generate failed "
                          "(restart it: POST /workflows/<route_id>/restart?step=story_generate)")
        if before["state"] != "generating_stories":
            raise Ignored(f"stories for route {route_id} were already received (state {before['state']})")
        stories = {"lang": lang, "stories": clean}
        token = _story_token(before)
        if token is None:  # a route confirmed before story_generate was a step: no token to complete
            after = engine.fire(instance_id, "stories_ready", stories, actor="kafka:story.generate.completed")
        else:
            outcome = engine.complete_external(token, True, stories, actor="kafka:story.generate.completed")
            if outcome != ACCEPTED:  # the step stopped waiting since the snapshot (a restart, a timeout)
                raise Ignored(f"stories for route {route_id} came when no story.generate waited ({outcome})")
            after = engine.snapshot(instance_id, history=False)
        _observe_steps(before, after)
        return "accepted"

    @classmethod
    def on_tts_completed(cls, engine: Any, event: KafkaEvent) -> str:
        p = parse(TtsCompleted, event.payload)
        route_id, story_id, status = p.route_id, p.story_id, p.status
        audio_url, error, attempt = p.audio_url, p.error, p.attempt
        instance_id = cls.find(engine, route_id)
        before = engine.snapshot(instance_id, history=False)
        ok = status == "completed"
        outcome = engine.complete_external(tts_token(route_id, story_id), ok,
                                           {"audio_url": audio_url} if ok else None,
                                           None if ok else (error or ""), attempt=attempt,
                                           actor="kafka:tts.completed")
        if outcome == DUPLICATE:
            raise Ignored(f"second tts.completed for story {story_id} of route {route_id}")
        if outcome == STALE:
            raise Ignored(f"stale tts.completed for story {story_id} (attempt {attempt})")
        if outcome != ACCEPTED:
            if before["state"] in ("received", "generating_stories", "story_failed"):
                raise Ignored(f"tts.completed for story {story_id} before route {route_id} has stories")
            raise InvalidInput("story_id", f"story {story_id} does not belong to route {route_id}")
        confirmed = before["context"].get("confirmed_at")
        if ok and confirmed and _first_audio_at(before) is None:
            _histograms()[0].observe((utcnow() - datetime.fromisoformat(confirmed)).total_seconds())
        _observe_steps(before, engine.snapshot(instance_id, history=False))
        return "accepted"


def tts_token(route_id: str, story_id: str) -> str:
    """The token of one story's TTS item: a tts.completed names (route_id, story_id), which may be
    longer than a token, so the token is their digest."""
    return "tts:" + hashlib.sha256(f"{route_id}\x00{story_id}".encode()).hexdigest()


def _story_token(snapshot: dict[str, Any]) -> str | None:
    """The token of the story_generate step's waiting attempt, if it has one."""
    step = next((s for s in snapshot.get("steps") or [] if s["name"] == "story_generate"), None)
    return ((step or {}).get("data") or {}).get("token")


def _tts_items(snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    """The tts_batch step row's items (one per story, in story order), if it has started."""
    step = next((s for s in snapshot.get("steps") or [] if s["name"] == "tts_batch"), None)
    return ((step or {}).get("data") or {}).get("branches") or []


def _first_audio_at(snapshot: dict[str, Any]) -> str | None:
    done = [b["finished_at"] for b in _tts_items(snapshot)
            if b["status"] == "completed" and b.get("finished_at")]
    return min(done) if done else None


def _observe_steps(before: dict[str, Any], after: dict[str, Any]) -> None:
    """job_duration_seconds for each step this event finished."""
    old = before["context"].get("steps", {})
    for name, step in after["context"].get("steps", {}).items():
        if step.get("status") in ("completed", "failed") and old.get(name, {}).get("status") != step["status"] \
                and step.get("started_at") and step.get("finished_at"):
            seconds = (datetime.fromisoformat(step["finished_at"]) - datetime.fromisoformat(step["started_at"]))
            _histograms()[1].labels(RouteContent.type, name, step["status"]).observe(seconds.total_seconds())


def restart_step(engine: Any, route_id: str, step: str | None, actor: str = "api") -> dict[str, Any]:
    """POST /workflows/<route_id>/restart?step=tts_batch|story_generate; `actor` goes to the history."""
    if not step:
        raise InvalidInput("step", "query parameter is required (step=tts_batch or step=story_generate)")
    if step not in RESTARTABLE:
        raise InvalidInput("step", f"only tts_batch and story_generate can be restarted, got {step!r}")
    instance_id = RouteContent.find(engine, route_id)
    snapshot = engine.snapshot(instance_id, history=False)
    state = snapshot["state"] or ""
    if state not in RESTARTABLE[step]:  # said in the route's terms: restart_tts is the engine's event
        view = route_view(snapshot)
        now = (view["steps"].get(step) or {}).get("status", "pending")
        raise IllegalTransition(
            instance_id, "restart", state, step=step, step_status=now,
            message=f"route {route_id} is {view['status']} (state {state}): only a step that failed or is "
                    f"still waiting can be restarted, and {step} is {now}")
    # While the step still waits (its request or replies lost), the running attempt is abandoned
    # and its requests are sent again: for tts_batch only the stories without a tts.completed (a
    # late reply to the old attempt is stale); for story_generate the story.generate.
    after = timedelta(seconds=RouteSettings.from_settings(engine.settings).restart_running_after_seconds)
    try:
        return engine.restart(instance_id, step, actor=actor, running_after=after)
    except Conflict as exc:  # an attempt too young to abandon: the same 409 body as the one above
        now = (route_view(engine.snapshot(instance_id, history=False))["steps"].get(step) or {}).get("status")
        raise IllegalTransition(instance_id, "restart", exc.details.get("state") or state, step=step,
                                step_status=now, message=f"route {route_id}: {exc.message}") from None


#: The steps POST /workflows/<route_id>/restart restarts, and the states it may do so in.
RESTARTABLE = {"tts_batch": ("tts_failed", "synthesizing"),
               "story_generate": ("story_failed", "generating_stories")}


#: How the API names an item's status (docs/kafka.md): requested until its tts.completed.
ITEM_STATUS = {"queued": "requested", "waiting": "requested", "completed": "completed", "failed": "failed"}


def route_view(snapshot: dict[str, Any]) -> dict[str, Any]:
    """GET /workflows/<route_id> (docs/kafka.md): the context's account of each step, with the
    TTS batch's counts and each story's status read from the engine's tts_batch step row."""
    ctx = snapshot["context"]
    state = snapshot["state"]
    status = {"completed": "completed", "tts_failed": "failed", "story_failed": "failed"}.get(state, "running")
    steps = {name: dict(step) for name, step in ctx.get("steps", {}).items()}
    items = _tts_items(snapshot)
    stories = []
    for i, s in enumerate(ctx.get("stories", [])):
        item = items[i] if i < len(items) else {}
        story = {"story_id": s["story_id"], "tts_status": ITEM_STATUS.get(item.get("status", ""), "pending")}
        if story["tts_status"] == "failed" and item.get("error"):
            story["error"] = item["error"]
        stories.append(story)
    tts = steps.get("tts_batch")
    if tts is not None and items:
        statuses = [s["tts_status"] for s in stories]
        tts.update(total=len(statuses), done=statuses.count("completed"), failed=statuses.count("failed"))
        # Running once a story of this attempt has reported (a restart's items are of the next).
        if tts.get("status") == "pending" and any(
                b["status"] in ("completed", "failed") and b.get("attempt") == tts.get("attempt") for b in items):
            tts["status"] = "running"
    return {
        "route_id": ctx.get("route_id"),
        "status": status,
        "state": state,
        "mode": ctx.get("mode"),
        "created_at": snapshot["created_at"],
        "updated_at": snapshot["updated_at"],
        "steps": steps,
        "stories": stories,
    }
