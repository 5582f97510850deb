"""Both Kafka workflows end to end: the bridge and sweeper as processes, the emulators consuming
and answering on the real broker; assertions on what the emulators received, field by field."""
from __future__ import annotations

import uuid

import pytest
from conftest import wait_for

from emulators.kafka_services import story_count

from .conftest import headers

pytestmark = pytest.mark.kafka


def route_done(kclient, route_id, *statuses):
    def check():
        r = kclient.get(f"/workflows/{route_id}")
        return r.json if r.status_code == 200 and r.json["status"] in statuses else None
    return wait_for(check, timeout=40, what=f"route {route_id} to be {statuses}")


def test_route_goes_through(kclient, kafka, bridge, kafka_emulators):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    kafka.send("route.confirmed", {"route_id": route_id, "mode": "walking", "city": "Kazan"}, key=route_id)
    view = route_done(kclient, route_id, "completed")
    n = story_count(route_id, 4)

    story = [m for m in kafka_emulators["story"].messages() if m["route_id"] == route_id]
    assert story == [{"route_id": route_id, "lang": "ru"}]
    tts = [m for m in kafka_emulators["tts"].messages() if m["route_id"] == route_id]
    assert len(tts) == n
    for i, m in enumerate(sorted(tts, key=lambda m: m["story_id"])):
        assert m == {"route_id": route_id, "story_id": f"{route_id}-s{i + 1}",
                     "text": f"История {i + 1} для маршрута {route_id}.", "lang": "ru", "attempt": 1}
    prefetch = wait_for(lambda: [m for m in kafka_emulators["delivery"].messages() if m["route_id"] == route_id],
                        timeout=10, what="delivery.prefetch")
    assert prefetch == [{"route_id": route_id, "next_audio": [
        {"story_id": f"{route_id}-s{i + 1}",
         "audio_url": f"https://cdn.example/audio/{route_id}/{route_id}-s{i + 1}.mp3"} for i in range(n)]}]

    assert view["route_id"] == route_id and view["mode"] == "walking"
    steps = view["steps"]
    assert steps["story_generate"]["status"] == "completed" and steps["story_generate"]["attempt"] == 1
    tb = steps["tts_batch"]
    assert (tb["status"], tb["attempt"], tb["done"], tb["failed"], tb["total"]) == ("completed", 1, n, 0, n)
    assert steps["delivery_prefetch"]["status"] == "completed"
    assert view["stories"] == [{"story_id": f"{route_id}-s{i + 1}", "tts_status": "completed"} for i in range(n)]
    assert view["created_at"] and view["updated_at"]

    # the outgoing messages are keyed by the route: one route's messages stay ordered
    sent = [m for m in kafka.read("tts.requested", until=lambda ms: any(
        x.key() == route_id.encode() for x in ms)) if m.key() == route_id.encode()]
    assert {m.key().decode() for m in sent} == {route_id}
    # every message of the route carries the correlation id stored with its instance, from the
    # one its first event started to those later events (without the header) set off
    story_sent = [m for m in kafka.read("story.generate", until=lambda ms: any(
        x.key() == route_id.encode() for x in ms)) if m.key() == route_id.encode()]
    correlations = {headers(m).get("orchestrator_correlation_id") for m in sent + story_sent}
    assert len(correlations) == 1 and None not in correlations and "" not in correlations

    metrics = kclient.get("/metrics").get_data(as_text=True)
    assert "orchestrator_workflow_instances" in metrics


def test_route_endpoints_errors(kclient):
    assert kclient.get("/workflows/no-such-route").status_code == 404
    assert kclient.post("/workflows/no-such-route/restart?step=tts_batch").status_code == 404
    r = kclient.post("/workflows/whatever/restart")
    assert r.status_code == 400 and r.json["field"] == "step"
    r = kclient.post("/workflows/whatever/restart?step=delivery_prefetch")
    assert r.status_code == 400 and r.json["field"] == "step"
    assert kclient.post("/workflows/no-such-route/restart?step=story_generate").status_code == 404


def test_restart_of_a_running_batch_is_409(kclient, kafka, bridge, kafka_emulators):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    kafka.send("route.confirmed", {"route_id": route_id, "mode": "car"}, key=route_id)
    route_done(kclient, route_id, "completed")
    r = kclient.post(f"/workflows/{route_id}/restart?step=tts_batch")
    assert r.status_code == 409 and r.json["state"] == "completed"


def test_worker_deployment_goes_through(kclient, kafka, bridge, kafka_emulators):
    scenario = str(uuid.uuid4())
    kafka.send("init_scenario", {"scenario_uuid": scenario, "camera_url": "rtsp://cam.example/stream1"},
               key=scenario)

    def running():
        page = kclient.get(f"/workers?scenario_uuid={scenario}").json
        return page["items"][0] if page["total"] == 1 and page["items"][0]["status"] == "running" else None

    worker = wait_for(running, timeout=40, what="worker running")
    deploys = [m for m in kafka_emulators["runner"].messages() if m["scenario_uuid"] == scenario]
    assert deploys == [{"worker_id": worker["worker_id"], "scenario_uuid": scenario,
                        "camera_url": "rtsp://cam.example/stream1"}]
    assert set(worker) == {"id", "worker_id", "scenario_uuid", "camera_url", "status", "process_pid", "reason",
                           "created_at", "updated_at"}
    assert isinstance(worker["process_pid"], int) and worker["camera_url"] == "rtsp://cam.example/stream1"
    assert kclient.get(f"/workers/{worker['worker_id']}").json == worker

    # the runner stops it; a late `running` after `stopped` is ignored
    kafka.send("worker.status", {"worker_id": worker["worker_id"], "status": "stopped",
                                 "process_pid": worker["process_pid"], "reason": "scenario ended"})
    wait_for(lambda: kclient.get(f"/workers/{worker['worker_id']}").json["status"] == "stopped", timeout=20,
             what="worker stopped")
    kafka.send("worker.status", {"worker_id": worker["worker_id"], "status": "running", "process_pid": 1})
    marker = str(uuid.uuid4())  # a later event on the same key: once it is applied, the late one was seen
    kafka.send("init_scenario", {"scenario_uuid": marker, "camera_url": "rtsp://cam.example/x"}, key=marker)
    wait_for(lambda: kclient.get(f"/workers?scenario_uuid={marker}").json["total"] == 1, timeout=20,
             what="marker worker")
    final = kclient.get(f"/workers/{worker['worker_id']}").json
    assert final["status"] == "stopped" and final["process_pid"] == worker["process_pid"]
    assert final["reason"] == "scenario ended"

    assert kclient.get("/workers?status=stopped&limit=500").json["total"] >= 1
    assert all(w["status"] == "stopped" for w in kclient.get("/workers?status=stopped").json["items"])


def test_worker_endpoints_errors(kclient):
    r = kclient.get("/workers/not-a-uuid")
    assert r.status_code == 400 and r.json["field"] == "worker_id"
    assert kclient.get(f"/workers/{uuid.uuid4()}").status_code == 404
    for query, field in (("status=sleeping", "status"), ("scenario_uuid=xyz", "scenario_uuid"),
                         ("limit=0", "limit"), ("offset=-1", "offset"), ("limit=abc", "limit")):
        r = kclient.get(f"/workers?{query}")
        assert r.status_code == 400 and r.json["field"] == field, query


def test_kafka_outbox_rows_left_unsent_are_published_by_the_sweeper(kclient, krt, kafka, bridge, kafka_emulators):
    """A process that committed and died before its kick: the sweeper produces the Kafka row."""
    from orchestrator.engine import Engine
    from orchestrator.workflow import registry

    no_kick = Engine(krt.settings, krt.sessions, registry, relay=None)
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    no_kick.start("route_content", {"route_id": route_id, "mode": "car"}, key=route_id)
    story = wait_for(lambda: [m for m in kafka_emulators["story"].messages() if m["route_id"] == route_id],
                     timeout=30, what="story.generate sent by the sweeper")
    assert story == [{"route_id": route_id, "lang": "ru"}]
    assert route_done(kclient, route_id, "completed")["route_id"] == route_id
