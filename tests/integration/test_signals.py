"""POST /sagas/<id>/events/<event> takes only the signals a workflow declares for users, checked
like their own endpoints and the Kafka bridge check them; the engine's own events (step outcomes,
joins, restart, cancel, failures) and Kafka-driven ones are refused and change nothing."""
from __future__ import annotations

import uuid

from conftest import wait_for
from test_engine import start as start_order, wait_state
from test_media import submit, wait_job

from orchestrator.kafka_bridge import KafkaEvent
from sagas.route_content import RouteContent


def refused(client, instance_id: str, event: str, body: dict | None = None, status: int = 400,
            field: str = "event") -> dict:
    r = client.post(f"/sagas/{instance_id}/events/{event}", json=body or {})
    assert r.status_code == status, (event, body, r.status_code, r.json)
    assert r.json["field"] == field and r.json["error"] == "invalid_input", (event, r.json)
    return r.json


def no_media_job_in_flight(rt) -> None:
    """Wait until every media job of the session has finished: an emulator's fault is taken by
    whichever request comes first, and an earlier test's job could take the one meant here."""
    from sqlalchemy import text

    def settled() -> bool:
        with rt.db.connect() as conn:
            return not conn.execute(text("SELECT count(*) FROM workflow_instances "
                                         "WHERE type = 'media' AND NOT finished")).scalar()

    wait_for(settled, timeout=90, interval=0.5, what="the session's other media jobs to finish")


def test_media_job_refuses_the_engines_own_events(rt, client, worker, sweeper, faults):
    no_media_job_in_flight(rt)
    faults("audio-normalization", [{"endpoint": "submit", "kind": "400", "times": 1}])
    job = wait_job(client, submit(client)["job_id"])
    assert job["status"] == "failed" and job["stages"]["normalization"]["status"] == "failed"
    job_id = job["job_id"]
    before = client.get(f"/sagas/{job_id}").json

    # its dedicated endpoint refuses to re-run a completed stage; the event endpoint must not do it either
    assert client.post(f"/sagas/{job_id}/restart?step=download").status_code == 409
    body = refused(client, job_id, "restart", {"step": "download"})
    assert "/restart?step=" in body["message"]
    refused(client, job_id, "restart", {"step": "transcription"})  # would skip the failed stage
    assert "/cancel" in refused(client, job_id, "cancel")["message"]
    for event in ("start", "downloaded", "normalized", "transcribed", "fail"):
        assert "not a signal" in refused(client, job_id, event)["message"]
    assert "unknown event" in refused(client, job_id, "no_such_event")["message"]
    assert "unknown event" in refused(client, job_id, "submit_input", {"step": "CONDENSER"})["message"]

    # nothing changed: state, steps, context and history are as before
    assert client.get(f"/sagas/{job_id}").json == before
    # the dedicated endpoint still restarts the failed stage
    r = client.post(f"/sagas/{job_id}/restart?step=normalization")
    assert r.status_code == 200 and r.json["state"] == "normalizing"
    assert wait_job(client, job_id)["status"] == "completed"


def test_a_running_stage_cannot_be_skipped(client, worker, sweeper, faults):
    faults("video-downloader", job={"never_finish": True})
    job_id = submit(client)["job_id"]
    wait_for(lambda: client.get(f"/jobs/{job_id}").json["stages"]["download"]["status"] == "processing",
             timeout=20, what="the download to run")
    refused(client, job_id, "downloaded", {"output": {}})
    snap = client.get(f"/sagas/{job_id}").json
    assert snap["state"] in ("downloading", "failed")  # the download fails once its polls run out
    assert [s["name"] for s in snap["steps"]] == ["download"]
    assert "downloaded" not in [h["event"] for h in snap["history"]]
    client.post(f"/sagas/{job_id}/cancel")


def _route_in_synthesis(engine, route_id: str) -> str:
    """A route whose stories were generated and whose TTS results are awaited, brought there by
    the bridge's own handlers (what route.confirmed and story.generate.completed do)."""
    def event(topic: str, payload: dict) -> KafkaEvent:
        return KafkaEvent(topic, 0, 0, route_id, payload, f"{topic}:{uuid.uuid4().hex}")

    RouteContent.on_route_confirmed(engine, event("route.confirmed", {"route_id": route_id, "mode": "walking"}))
    stories = [{"story_id": f"{route_id}-s{i}", "text": f"story {i}"} for i in (1, 2)]
    RouteContent.on_stories_generated(engine, event("story.generate.completed",
                                                    {"route_id": route_id, "lang": "ru", "stories": stories}))
    return RouteContent.find(engine, route_id)


def test_route_refuses_kafka_driven_events(client, rt):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    instance_id = _route_in_synthesis(rt.engine, route_id)
    before = client.get(f"/sagas/{instance_id}").json
    assert before["state"] == "synthesizing"

    refused(client, instance_id, "tts_result", {"story_id": "s1"})
    refused(client, instance_id, "tts_result", {"story_id": f"{route_id}-s1"})  # was a 500 (KeyError in a guard)
    refused(client, instance_id, "tts_result", {"story_id": f"{route_id}-s1", "status": "bogus"})
    refused(client, instance_id, "tts_result", {"story_id": f"{route_id}-s1", "status": "completed"})
    for event in ("confirm", "stories_ready", "restart_tts"):
        refused(client, instance_id, event, {"stories": []})
    assert client.get(f"/sagas/{instance_id}").json == before

    # the route still finishes when the TTS service reports, through the bridge's handler
    for i in (1, 2):
        RouteContent.on_tts_completed(rt.engine, KafkaEvent(
            "tts.completed", 0, i, route_id, {"route_id": route_id, "story_id": f"{route_id}-s{i}",
                                              "status": "completed", "audio_url": f"https://cdn/{i}.mp3"},
            f"tts.completed:{uuid.uuid4().hex}"))
    view = client.get(f"/workflows/{route_id}").json
    assert view["status"] == "completed" and [s["tts_status"] for s in view["stories"]] == ["completed"] * 2


def test_a_declared_signal_is_checked_like_an_endpoint(client, worker, sweeper):
    inst = start_order(client, [], limit=50)
    iid = inst["id"]
    wait_state(client, iid, "awaiting_approval")
    before = client.get(f"/sagas/{iid}").json
    for body, field in (({"amount": "abc"}, "amount"), ({}, "amount"), ({"amount": True}, "amount"),
                        ({"amount": [1]}, "amount"), ({"amount": 1, "note": "x"}, "note")):
        refused(client, iid, "approve", body, field=field)  # "abc" was a 500 (a ValueError in the guard)
    for event in ("reserved", "charged", "shipped", "fail", "restart", "cancel"):
        refused(client, iid, event, {"step": "reserve"})
    assert client.get(f"/sagas/{iid}").json == before
    # the guard still answers 409 with the state; a valid signal moves the instance on
    r = client.post(f"/sagas/{iid}/events/approve", json={"amount": 80})
    assert r.status_code == 409 and r.json["state"] == "awaiting_approval"
    r = client.post(f"/sagas/{iid}/events/approve", json={"amount": 20})
    assert r.status_code == 200 and r.json["state"] in ("shipping", "done")
    assert [h["event"] for h in r.json["history"]][-1] in ("approve", "shipped")
    # a signal the state does not allow: 409 naming the state
    r = client.post(f"/sagas/{iid}/events/approve", json={"amount": 1})
    assert r.status_code == 409 and r.json["state"] in ("shipping", "done")



def test_the_generic_start_leaves_workflows_with_their_own_start_alone(client):
    """A route started here had no key, so route.confirmed for it started a second one; a chat task
    skipped its session's checks. Their own way in is named in the answer."""
    own = {"route_content": {"route_id": f"r-{uuid.uuid4().hex[:8]}", "mode": "walking"},
           "worker_deployment": {"scenario_uuid": str(uuid.uuid4()), "camera_url": "rtsp://cam/1"},
           "chat_task": {"session_id": "no-such-session", "message": "hi"},
           "calculate-balance": {"project": "group/project", "branch": "issue-1"},
           "simple-calculation": {"project": "group/project", "branch": "issue-1", "files": {"a.json": {}},
                                  "output_file": "b.json"}}
    for type_name, data in own.items():
        total = client.get(f"/sagas?type={type_name}").json["total"]
        answers = [client.post("/saga", json={"type": type_name, "input": data})]
        if type_name != "calculate-balance":  # POST /saga/calculate-balance is the saga's own endpoint
            answers.append(client.post(f"/saga/{type_name}", json={"input": data}))
        for r in answers:
            assert r.status_code == 400 and r.json["field"] == "type", (type_name, r.status_code, r.json)
            assert "started by" in r.json["message"]
        assert client.get(f"/sagas?type={type_name}").json["total"] == total, type_name
    # workflows without a start of their own still start here
    assert client.post("/saga/order", json={"input": {}}).status_code == 201


def test_restarting_a_step_of_a_workflow_without_steps_says_it_has_none(client, rt):
    """A worker deployment's work runs in its handlers, not in steps: a restart's 400 said
    "steps: " and listed nothing."""
    snap, _ = rt.engine.start("worker_deployment", {"scenario_uuid": str(uuid.uuid4()), "camera_url": "rtsp://cam/1"})
    r = client.post(f"/sagas/{snap['id']}/restart?step=deploy")
    assert r.status_code == 400 and r.json["field"] == "step", r.json
    assert r.json["message"] == "step: unknown step 'deploy'; this workflow has no steps to restart", r.json
    r = client.post("/sagas/bulk", json={"action": "restart", "step": "deploy", "filter": {"type": "worker_deployment"},
                                         "dry_run": True}, headers={"X-Admin-Token": "test-admin-token"})
    assert r.status_code == 400 and r.json["message"].endswith("this workflow has no steps to restart"), r.json
