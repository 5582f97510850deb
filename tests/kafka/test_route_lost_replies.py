"""A route whose story.generate is lost (or its reply) does not wait for ever either: its
story_generate attempt times out after ROUTE_STORY_TIMEOUT_SECONDS into story_failed, and
POST /workflows/<route_id>/restart?step=story_generate asks for the stories again.

A route whose tts.completed replies are lost (the TTS service forgot its requests, or stopped)
does not wait for ever: its tts_batch attempt times out after ROUTE_TTS_TIMEOUT_SECONDS, and
POST /workflows/<route_id>/restart?step=tts_batch, also on a route still synthesizing,
re-requests only the stories without a reply and completes the route.

Bridge and sweeper run as processes on a broker and database of their own (their timers and
outbox rows stay theirs); the story, TTS and delivery services are emulated on that broker."""
from __future__ import annotations

import uuid
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
from conftest import Process, fresh_database, wait_for

from emulators.kafka_services import KafkaService, TTSService, delivery_prefetch, story_count, story_service

from .conftest import Kafka, start_bridge

pytestmark = pytest.mark.kafka


class ForgetfulStories(KafkaService):
    """The story emulator, except that it drops its first story.generate of each route (kept in
    `withheld`, the reply it would have sent, so a test can deliver it late)."""

    def __init__(self, brokers: str) -> None:
        inner = story_service(brokers, 3)
        self.withheld: dict[str, list[Any]] = {}

        def handle(p: dict[str, Any]) -> list[Any]:
            replies = inner.handle(p)
            if p["route_id"] not in self.withheld:
                self.withheld[p["route_id"]] = replies
                return []
            return replies

        super().__init__("story", brokers, "story.generate", handle)


class ForgetfulTTS(TTSService):
    """Answers a tts.requested like the TTS emulator, except the first attempt of the stories in
    `forget` (every story when None), which it drops: those replies are lost."""

    def __init__(self, brokers: str, forget: set[str] | None = None) -> None:
        super().__init__(brokers)
        self.forget = forget

    def _synthesise(self, p: dict[str, Any]) -> list[Any]:
        if p.get("attempt") == 1 and (self.forget is None or p["story_id"] in self.forget):
            return []
        return super()._synthesise(p)


@contextmanager
def routes(env: dict[str, str], broker: Any, tts: ForgetfulTTS | None = None,
           story: KafkaService | None = None, **extra: str) -> Iterator[Any]:
    """A bridge, a sweeper and the HTTP API on `broker` and a fresh database, with the story,
    `tts` and delivery services answering there."""
    from orchestrator import runtime
    from orchestrator.config import load_settings
    from web import create_app

    extra.setdefault("ROUTE_RESTART_RUNNING_AFTER_SECONDS", "0")  # these restart waiting attempts at once
    with fresh_database() as url:
        kenv = {**env, "DATABASE_URL": url, "KAFKA_BROKERS": broker.bootstrap,
                "CONSUMER_GROUP": f"orch-{uuid.uuid4().hex[:6]}",
                "WORKFLOW_MODULES": env["WORKFLOW_MODULES"] + ",kafka_workflows", **extra}
        built = runtime.build(load_settings(environ=kenv, dotenv="/nonexistent"))
        services: list[KafkaService] = [story or story_service(broker.bootstrap, 3),
                                        delivery_prefetch(broker.bootstrap)]
        if tts is not None:
            services.append(tts)
        procs: list[Process] = []
        try:
            for s in services:
                s.start()
            for s in services:
                assert s.wait_ready(), f"emulator {s.name} got no partitions"
            procs.append(Process("lost-sweeper", ["sweeper"], kenv).start())
            procs.append(start_bridge(kenv, "lost-bridge"))
            yield SimpleNamespace(client=create_app(built).test_client(), kafka=Kafka(broker.bootstrap),
                                  delivery=services[1], bridge=procs[1])
        finally:
            for p in procs:
                p.stop()
            for s in services:
                s.stop()
            built.db.dispose()


def new_route(most: int = 3, least: int = 2) -> str:
    """A route id the story emulator gives at least `least` stories."""
    return next(r for r in (f"r-{uuid.uuid4().hex[:8]}" for _ in range(1000)) if story_count(r, most) >= least)


def route_view(client: Any, route_id: str, check: Any, what: str, timeout: float = 40) -> dict[str, Any]:
    def probe() -> Any:
        r = client.get(f"/workflows/{route_id}")
        return r.json if r.status_code == 200 and check(r.json) else None
    return wait_for(probe, timeout=timeout, what=f"route {route_id} {what}")


def assert_completed_once(api: Any, tts: ForgetfulTTS, route_id: str, n: int, tts_attempt: int = 2) -> None:
    view = route_view(api.client, route_id, lambda v: v["status"] == "completed", "to complete")
    assert view["steps"]["tts_batch"]["status"] == "completed"
    assert view["steps"]["tts_batch"]["attempt"] == tts_attempt
    assert view["stories"] == [{"story_id": f"{route_id}-s{i + 1}", "tts_status": "completed"} for i in range(n)]
    # each story synthesised exactly once, and the route's audio delivered once, in story order
    assert {k: v for k, v in tts.succeeded.items() if k[0] == route_id} == \
        {(route_id, f"{route_id}-s{i + 1}"): 1 for i in range(n)}
    prefetch = wait_for(lambda: [m for m in api.delivery.messages() if m["route_id"] == route_id],
                        what="delivery.prefetch")
    assert prefetch == [{"route_id": route_id, "next_audio": [
        {"story_id": f"{route_id}-s{i + 1}",
         "audio_url": f"https://cdn.example/audio/{route_id}/{route_id}-s{i + 1}.mp3"} for i in range(n)]}]


def test_lost_tts_replies_time_out_and_a_restart_completes_the_route(env, own_broker):
    tts = ForgetfulTTS(own_broker.bootstrap)  # every first request is lost
    with routes(env, own_broker, tts, ROUTE_TTS_TIMEOUT_SECONDS="4") as api:
        types = api.client.get("/workflow-types").json
        route_type = next(t for t in types["items"] if t["type"] == "route_content")
        assert next(s for s in route_type["steps"] if s["name"] == "tts_batch")["timeout"] == 4.0

        route_id = new_route()
        n = story_count(route_id, 3)
        api.kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
        view = route_view(api.client, route_id, lambda v: v["status"] == "failed", "to time out")
        assert view["state"] == "tts_failed"
        assert view["steps"]["tts_batch"]["status"] == "failed"
        assert "timed out after 4s" in view["steps"]["tts_batch"]["error"]
        assert [s["tts_status"] for s in view["stories"]] == ["requested"] * n

        r = api.client.post(f"/workflows/{route_id}/restart?step=tts_batch")
        assert r.status_code == 200, r.json
        assert_completed_once(api, tts, route_id, n)
        requested = sorted((m["story_id"], m["attempt"]) for m in tts.messages() if m["route_id"] == route_id)
        assert requested == sorted((f"{route_id}-s{i + 1}", a) for i in range(n) for a in (1, 2))


def test_restart_while_synthesizing_rerequests_only_the_missing_stories(env, own_broker):
    route_id = new_route()
    n = story_count(route_id, 3)
    last = f"{route_id}-s{n}"
    tts = ForgetfulTTS(own_broker.bootstrap, forget={last})  # the last story's reply is lost
    with routes(env, own_broker, tts) as api:
        api.kafka.send("route.confirmed", {"route_id": route_id, "mode": "car"}, key=route_id)
        view = route_view(api.client, route_id, lambda v: [s["tts_status"] for s in v["stories"]]
                          == ["completed"] * (n - 1) + ["requested"], "to wait for its last story")
        assert view["state"] == "synthesizing"

        r = api.client.post(f"/workflows/{route_id}/restart?step=tts_batch")
        assert r.status_code == 200, r.json
        assert_completed_once(api, tts, route_id, n)
        # only the story without a reply was requested again
        requested = sorted((m["story_id"], m["attempt"]) for m in tts.messages() if m["route_id"] == route_id)
        assert requested == sorted([(f"{route_id}-s{i + 1}", 1) for i in range(n)] + [(last, 2)])

        # the lost reply to the abandoned attempt, arriving late, changes nothing
        api.kafka.send("tts.completed", {"route_id": route_id, "story_id": last, "status": "failed",
                                         "error": "late", "attempt": 1}, key=route_id)
        api.kafka.flush()
        wait_for(lambda: f"stale tts.completed for story {last}" in api.bridge.output(),
                 what="the bridge to ignore the late reply")
        view = api.client.get(f"/workflows/{route_id}").json
        assert view["status"] == "completed"
        assert view["stories"][-1]["tts_status"] == "completed"


def test_restart_of_a_finished_route_is_still_409(env, own_broker):
    with routes(env, own_broker, ForgetfulTTS(own_broker.bootstrap, forget=set())) as api:
        route_id = new_route()
        api.kafka.send("route.confirmed", {"route_id": route_id, "mode": "car"}, key=route_id)
        route_view(api.client, route_id, lambda v: v["status"] == "completed", "to complete")
        r = api.client.post(f"/workflows/{route_id}/restart?step=tts_batch")
        assert r.status_code == 409
        assert "completed" in str(r.json)


def test_a_lost_story_generate_times_out_and_a_restart_completes_the_route(env, own_broker):
    story = ForgetfulStories(own_broker.bootstrap)  # every route's first story.generate is lost
    tts = ForgetfulTTS(own_broker.bootstrap, forget=set())
    with routes(env, own_broker, tts, story, ROUTE_STORY_TIMEOUT_SECONDS="4") as api:
        types = api.client.get("/workflow-types").json
        route_type = next(t for t in types["items"] if t["type"] == "route_content")
        assert next(s for s in route_type["steps"] if s["name"] == "story_generate")["timeout"] == 4.0

        route_id = new_route()
        n = story_count(route_id, 3)
        api.kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking"}, key=route_id)
        view = route_view(api.client, route_id, lambda v: v["status"] == "failed", "to time out")
        assert view["state"] == "story_failed"
        assert view["steps"]["story_generate"]["status"] == "failed"
        assert view["steps"]["story_generate"]["attempt"] == 1
        assert "timed out after 4s" in view["steps"]["story_generate"]["error"]
        assert view["stories"] == [] and view["steps"]["tts_batch"]["status"] == "pending"
        failed = api.client.get("/sagas?type=route_content&status=failed").json
        assert route_id in [i["key"] for i in failed["items"]]

        # the operator is named in the history, as on every restart; over 128 characters is a 400
        r = api.client.post(f"/workflows/{route_id}/restart?step=story_generate", headers={"X-Actor": "x" * 129})
        assert r.status_code == 400 and r.json["field"] == "X-Actor", r.json
        r = api.client.post(f"/workflows/{route_id}/restart?step=story_generate", headers={"X-Actor": "oncall-ana"})
        assert r.status_code == 200, r.json
        instance_id = api.client.get(f"/sagas?type=route_content&key={route_id}").json["items"][0]["id"]
        history = api.client.get(f"/sagas/{instance_id}").json["history"]
        assert [h["actor"] for h in history if h["event"] == "restart_tts"] == ["oncall-ana"], history
        assert_completed_once(api, tts, route_id, n, tts_attempt=1)
        view = api.client.get(f"/workflows/{route_id}").json
        assert view["steps"]["story_generate"]["status"] == "completed"
        assert view["steps"]["story_generate"]["attempt"] == 2
        assert view["steps"]["story_generate"].get("error") is None
        assert [m["route_id"] for m in story.messages()].count(route_id) == 2

        # the reply to the lost request, arriving late, changes nothing
        for topic, key, payload in story.withheld[route_id]:
            api.kafka.send(topic, payload, key=key)
        api.kafka.flush()
        wait_for(lambda: f"stories for route {route_id} were already received" in api.bridge.output(),
                 what="the bridge to ignore the late reply")
        assert api.client.get(f"/workflows/{route_id}").json == view
        assert len([m for m in tts.messages() if m["route_id"] == route_id]) == n
        assert len([m for m in api.delivery.messages() if m["route_id"] == route_id]) == 1


def test_restart_while_generating_asks_for_the_stories_again(env, own_broker):
    story = ForgetfulStories(own_broker.bootstrap)
    tts = ForgetfulTTS(own_broker.bootstrap, forget=set())
    with routes(env, own_broker, tts, story) as api:  # the default timeout: far away
        route_id = new_route()
        n = story_count(route_id, 3)
        api.kafka.send("route.confirmed", {"route_id": route_id, "mode": "car"}, key=route_id)
        wait_for(lambda: route_id in story.withheld, what="the story service to get the request")
        view = api.client.get(f"/workflows/{route_id}").json
        assert view["state"] == "generating_stories" and view["steps"]["story_generate"]["status"] == "running"
        # a restart of tts_batch is still refused there
        assert api.client.post(f"/workflows/{route_id}/restart?step=tts_batch").status_code == 409

        # the operator is named in the history, as on every restart; over 128 characters is a 400
        r = api.client.post(f"/workflows/{route_id}/restart?step=story_generate", headers={"X-Actor": "x" * 129})
        assert r.status_code == 400 and r.json["field"] == "X-Actor", r.json
        r = api.client.post(f"/workflows/{route_id}/restart?step=story_generate", headers={"X-Actor": "oncall-ana"})
        assert r.status_code == 200, r.json
        instance_id = api.client.get(f"/sagas?type=route_content&key={route_id}").json["items"][0]["id"]
        history = api.client.get(f"/sagas/{instance_id}").json["history"]
        assert [h["actor"] for h in history if h["event"] == "restart_tts"] == ["oncall-ana"], history
        assert_completed_once(api, tts, route_id, n, tts_attempt=1)
        assert api.client.get(f"/workflows/{route_id}").json["steps"]["story_generate"]["attempt"] == 2
        r = api.client.post(f"/workflows/{route_id}/restart?step=story_generate")
        assert r.status_code == 409
