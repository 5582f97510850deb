"""POST /workflows/<route_id>/restart over HTTP, on routes brought along by the bridge's own
handlers: a refused restart says why in the route's terms, and a restarted step shows its own
attempt's start."""
from __future__ import annotations

import uuid
from datetime import datetime

from test_signals import _route_in_synthesis

from orchestrator.kafka_bridge import KafkaEvent
from orchestrator.models import utcnow
from sagas.route_content import RouteContent


def tts_reply(rt, route_id: str, story: int, status: str) -> None:
    payload = {"route_id": route_id, "story_id": f"{route_id}-s{story}", "status": status}
    payload.update({"audio_url": f"https://cdn/{story}.mp3"} if status == "completed" else {"error": "voice down"})
    RouteContent.on_tts_completed(rt.engine, KafkaEvent("tts.completed", 0, story, route_id, payload,
                                                        f"tts.completed:{uuid.uuid4().hex}"))


def test_restart_of_a_completed_route_says_why_in_the_routes_terms(client, rt):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    _route_in_synthesis(rt.engine, route_id)
    for story in (1, 2):
        tts_reply(rt, route_id, story, "completed")
    assert client.get(f"/workflows/{route_id}").json["status"] == "completed"

    r = client.post(f"/workflows/{route_id}/restart?step=tts_batch")
    assert r.status_code == 409
    body = r.json
    assert body["error"] == "illegal_transition" and body["state"] == "completed"
    assert body["message"] == (f"route {route_id} is completed (state completed): only a step that failed "
                               "or is still waiting can be restarted, and tts_batch is completed"), body
    assert "restart_tts" not in str(body)  # the engine's event, which the operator never sent
    assert body["step"] == "tts_batch" and body["step_status"] == "completed"


def test_a_restarted_tts_batch_shows_its_own_start(client, rt):
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    _route_in_synthesis(rt.engine, route_id)
    tts_reply(rt, route_id, 1, "completed")
    tts_reply(rt, route_id, 2, "failed")
    failed = client.get(f"/workflows/{route_id}").json
    assert failed["status"] == "failed" and failed["steps"]["tts_batch"]["attempt"] == 1
    first_start = datetime.fromisoformat(failed["steps"]["tts_batch"]["started_at"])

    restarted_at = utcnow()
    r = client.post(f"/workflows/{route_id}/restart?step=tts_batch")
    assert r.status_code == 200, r.json
    tts = r.json["steps"]["tts_batch"]
    assert tts["attempt"] == 2 and tts["status"] == "pending" and tts.get("finished_at") is None
    assert datetime.fromisoformat(tts["started_at"]) >= restarted_at > first_start, (tts, first_start)
    assert client.get(f"/workflows/{route_id}").json["steps"]["tts_batch"] == tts


def test_restarts_sent_together_restart_once(app, rt):
    """A waiting attempt is abandoned by a restart only once it has waited
    ROUTE_RESTART_RUNNING_AFTER_SECONDS (30 s): twenty restarts of a failed batch sent together
    made twenty attempts, each abandoning the one before, and re-requested its stories each time."""
    from concurrent.futures import ThreadPoolExecutor

    route_id = f"r-{uuid.uuid4().hex[:8]}"
    _route_in_synthesis(rt.engine, route_id)
    tts_reply(rt, route_id, 1, "completed")
    tts_reply(rt, route_id, 2, "failed")
    assert app.test_client().get(f"/workflows/{route_id}").json["status"] == "failed"

    def restart(_):
        return app.test_client().post(f"/workflows/{route_id}/restart?step=tts_batch")

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(restart, range(20)))
    assert sorted(r.status_code for r in answers) == [200] + [409] * 19, [r.json for r in answers]
    refused = next(r.json for r in answers if r.status_code == 409)
    assert refused["message"].startswith(f"route {route_id}: step 'tts_batch' attempt 2 was queued "), refused
    # the body of every refused route restart: the step in the route's terms
    assert (refused["error"], refused["step"]) == ("illegal_transition", "tts_batch"), refused
    assert refused["step_status"] in ("pending", "running"), refused  # as GET /workflows/<id> names it
    assert refused["message"].endswith("a running attempt can be restarted once it has run 30s"), refused
    assert app.test_client().get(f"/workflows/{route_id}").json["steps"]["tts_batch"]["attempt"] == 2


def test_a_route_id_with_a_slash_is_reached_by_its_endpoints(client, rt):
    """A route id is the producer's and may hold "/": such a route was started, but its
    endpoints answered Flask's own 404, since the URL's plain converter stops at a slash."""
    from urllib.parse import quote

    route_id = f"city/r-{uuid.uuid4().hex[:8]}"
    _route_in_synthesis(rt.engine, route_id)
    tts_reply(rt, route_id, 1, "completed")
    tts_reply(rt, route_id, 2, "failed")
    for path in (route_id, quote(route_id, safe="")):  # as typed, and percent-encoded
        r = client.get(f"/workflows/{path}")
        assert r.status_code == 200 and r.json["route_id"] == route_id, r.json
    r = client.post(f"/workflows/{quote(route_id, safe='')}/restart?step=tts_batch")
    assert r.status_code == 200 and r.json["steps"]["tts_batch"]["attempt"] == 2, r.json
    assert client.get(f"/workflows/{route_id}/nothing").json["message"] == f"unknown route_id '{route_id}/nothing'"


def test_a_failed_batch_has_the_same_error_whichever_story_reported_last(client, rt):
    """The error of a fan-out step whose branches failed does not depend on the order of the
    replies: when a success came last it said "some branches failed", and the `error` filter
    (and a bulk repair by error) missed that route."""
    failed_first, failed_last = (f"r-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for route_id, replies in ((failed_first, ((1, "failed"), (2, "completed"))),
                              (failed_last, ((1, "completed"), (2, "failed")))):
        _route_in_synthesis(rt.engine, route_id)
        for story, status in replies:
            tts_reply(rt, route_id, story, status)
        assert client.get(f"/workflows/{route_id}").json["status"] == "failed"

    ids = {RouteContent.find(rt.engine, r) for r in (failed_first, failed_last)}
    for instance_id in ids:
        tts = next(s for s in client.get(f"/sagas/{instance_id}").json["steps"] if s["name"] == "tts_batch")
        assert tts["status"] == "failed" and tts["error"] == "1 of 2 branches failed: voice down", tts
    found = client.get("/sagas", query_string={"type": "route_content", "error": "voice down", "limit": 500}).json
    assert ids <= {item["id"] for item in found["items"]}, found


def test_a_tts_batch_shows_its_start_and_progress_in_the_generic_view(client, rt):
    """`/sagas/<id>` showed a batch whose requests were out as not started (`started_at` null,
    no duration) and at 0% progress until its last reply, where `/workflows/<id>` showed its start."""
    route_id = f"r-{uuid.uuid4().hex[:8]}"
    instance_id = _route_in_synthesis(rt.engine, route_id)

    def tts() -> dict:
        return next(s for s in client.get(f"/sagas/{instance_id}").json["steps"] if s["name"] == "tts_batch")

    waiting = tts()
    assert waiting["status"] == "waiting" and waiting["progress"] == 0.0 and waiting["started_at"] is not None, waiting
    tts_reply(rt, route_id, 1, "completed")
    assert tts()["progress"] == 50.0 and tts()["started_at"] == waiting["started_at"], tts()
    tts_reply(rt, route_id, 2, "failed")
    failed = tts()
    assert failed["status"] == "failed" and failed["progress"] == 100.0 and failed["duration_seconds"] >= 0, failed

    restarted = client.post(f"/workflows/{route_id}/restart?step=tts_batch")
    assert restarted.status_code == 200, restarted.json
    again = tts()
    assert again["attempt"] == 2 and again["progress"] == 50.0, again  # story 1 stays completed
    assert again["started_at"] > failed["started_at"], (again, failed)
