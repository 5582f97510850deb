"""Workflow definitions, state diagrams and the filters of GET /sagas, over HTTP."""
from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

from conftest import wait_for

BUILT_IN = {"media", "calculate-balance", "simple-calculation", "chat_task", "route_content", "worker_deployment"}
SVG = "{http://www.w3.org/2000/svg}"


def svg(resp) -> ET.Element:
    assert resp.status_code == 200, resp.data[:300]
    assert resp.mimetype == "image/svg+xml"
    root = ET.fromstring(resp.data)
    assert root.tag == f"{SVG}svg"
    return root


def states_of(root: ET.Element) -> dict[str, ET.Element]:
    return {g.get("data-state"): g for g in root.iter(f"{SVG}g") if g.get("data-state")}


def taken(root: ET.Element) -> set[tuple[str, str]]:
    return {(g.get("data-from"), g.get("data-to")) for g in root.iter(f"{SVG}g")
            if "taken" in (g.get("class") or "").split()}


def media_job(client, **fault) -> str:
    r = client.post("/pipeline", json={"youtube_url": f"https://www.youtube.com/watch?v={uuid.uuid4().hex[:11]}"})
    assert r.status_code == 200, r.json
    return r.json["job_id"]


def finished(client, job_id: str) -> dict:
    return wait_for(lambda: (lambda s: s if s["finished"] else None)(client.get(f"/sagas/{job_id}").json),
                    timeout=30, what=f"{job_id} to finish")


def test_every_type_is_listed_with_its_machine_steps_and_counts(client):
    items = {i["type"]: i for i in client.get("/workflow-types").json["items"]}
    assert BUILT_IN <= set(items)
    for name, item in items.items():
        assert item["initial"] in item["states"] and set(item["final_states"]) <= set(item["states"])
        assert set(item["counts"]) >= set(item["states"]) and all(n >= 0 for n in item["counts"].values())
        for step in item["steps"]:
            assert step["state"] in item["states"] and ("task" in step or "tasks" in step)
            assert set(step["retry"]) >= {"attempts", "backoff"} and "timeout" in step
        # the counts are the listing's totals, state by state
        for state, n in item["counts"].items():
            assert client.get(f"/sagas?type={name}&state={state}&limit=1").json["total"] == n, (name, state)
    tts = items["route_content"]["steps"][0]
    assert tts["name"] == "tts_batch" and tts["external"] is True and tts["task"] is None
    charge = items["order"]["steps"][1]
    assert charge["tasks"] == ["order.authorize", "order.capture"] and "task" not in charge
    assert items["order"]["steps"][2]["retry"]["attempts"] == 2
    assert client.get("/workflow-types/media").json == {**items["media"], "counts": items["media"]["counts"]}


def test_counts_follow_new_instances(client):
    before = client.get("/workflow-types/order").json["counts"]
    for _ in range(3):  # the module starts its worker later: each waits in its first step
        assert client.post("/saga", json={"type": "order", "input": {}}).status_code == 201
    after = client.get("/workflow-types/order").json["counts"]
    assert after["reserving"] == before["reserving"] + 3
    assert {k: v for k, v in after.items() if k != "reserving"} == {k: v for k, v in before.items() if k != "reserving"}


def test_an_unknown_type_is_404(client):
    for path in ("/workflow-types/nope", "/workflow-types/nope/diagram.svg"):
        r = client.get(path)
        assert r.status_code == 404 and r.json["error"] == "not_found" and "media" in r.json["message"]
    r = client.get(f"/sagas/{uuid.uuid4()}/diagram.svg")
    assert r.status_code == 404 and r.json["error"] == "not_found"


def test_every_built_in_type_renders_its_diagram(client):
    for item in client.get("/workflow-types").json["items"]:
        root = svg(client.get(f"/workflow-types/{item['type']}/diagram.svg"))
        nodes = states_of(root)
        assert list(nodes) == item["states"]
        assert nodes[item["initial"]].get("data-initial") == "true"
        assert not any(g.get("data-current") for g in nodes.values()) and not taken(root)
        edges = {(g.get("data-from"), g.get("data-to")) for g in root.iter(f"{SVG}g") if g.get("data-from")}
        assert edges == {(t["from"], t["to"]) for t in item["transitions"]}


def test_an_instance_diagram_marks_its_current_state_and_the_path_it_took(client, worker, sweeper, faults):
    # Every normalization submit fails until this job has: a pipeline another test left running
    # on the shared emulators would otherwise take a one-shot fault.
    faults("audio-normalization", [{"endpoint": "submit", "kind": "400", "times": 1000}])
    job = media_job(client)
    assert finished(client, job)["state"] == "failed"
    faults("audio-normalization", [])
    root = svg(client.get(f"/sagas/{job}/diagram.svg"))
    nodes = states_of(root)
    assert [s for s, g in nodes.items() if g.get("data-current") == "true"] == ["failed"]
    assert "current" in nodes["failed"].get("class").split()
    fills = {s: g.find(f"{SVG}rect").get("fill") for s, g in nodes.items()}
    assert fills["failed"] != fills["completed"] and fills["failed"] != fills["downloading"]
    assert taken(root) == {("queued", "downloading"), ("downloading", "normalizing"), ("normalizing", "failed")}

    done = media_job(client)
    assert finished(client, done)["state"] == "completed"
    root = svg(client.get(f"/sagas/{done}/diagram.svg"))
    assert [s for s, g in states_of(root).items() if g.get("data-current")] == ["completed"]
    assert ("normalizing", "failed") not in taken(root) and ("transcribing", "completed") in taken(root)


def ids(client, query: str) -> list[str]:
    r = client.get(f"/sagas?limit=500&{query}")
    assert r.status_code == 200, r.json
    return [i["id"] for i in r.json["items"]]


def test_filters_by_key_time_error_and_step_status(client, worker, sweeper, faults):
    faults("audio-normalization", [{"endpoint": "submit", "kind": "400", "times": 1000}])  # as above
    failed = media_job(client)
    assert finished(client, failed)["state"] == "failed"
    faults("audio-normalization", [])
    ok = media_job(client)
    assert finished(client, ok)["state"] == "completed"
    first = client.get(f"/sagas/{failed}").json
    since = quote(first["created_at"])

    # error: the failed step's message, any case; step + step_status: that step's current status
    assert ids(client, f"type=media&created_after={since}&error=INJECTED%20400") == [failed]
    assert ids(client, f"type=media&created_after={since}&step=normalization&step_status=failed") == [failed]
    assert ids(client, f"type=media&created_after={since}&step=normalization&step_status=completed") == [ok]
    assert ids(client, f"type=media&created_after={since}&step=download&step_status=completed") == [ok, failed]
    # created_after is inclusive, created_before exclusive; no offset means UTC
    assert ids(client, f"type=media&created_before={since}&created_after={since}") == []
    at = datetime.fromisoformat(first["created_at"])
    naive = at.astimezone(timezone.utc).replace(tzinfo=None).isoformat()
    assert ids(client, f"type=media&created_after={naive}") == [ok, failed]
    plus2 = quote(at.astimezone(timezone(timedelta(hours=2))).isoformat())
    assert ids(client, f"type=media&created_after={plus2}") == [ok, failed]
    after_first = quote((at + timedelta(microseconds=1)).isoformat())
    assert ids(client, f"type=media&created_after={after_first}") == [ok]

    key = f"k-{uuid.uuid4().hex[:8]}"
    made = client.post("/saga", json={"type": "order", "key": key, "input": {}}).json["id"]
    assert ids(client, f"key={key}") == [made]
    assert ids(client, f"key={key}&type=media") == []
    page = client.get(f"/sagas?key={key}").json
    assert set(page) == {"total", "limit", "offset", "items"} and page["total"] == 1


def test_a_malformed_filter_is_a_400_naming_it(client):
    for query, field in [("created_after=yesterday", "created_after"), ("created_before=2024-13-01", "created_before"),
                         ("step_status=broken", "step_status"), ("type=nope", "type"), ("step=nope", "step"),
                         ("type=media&step=tts_batch", "step"), ("limit=0", "limit"),
                         ("state=nope", "state"), ("type=media&state=nope", "state"),
                         ("type=media&state=tts_failed", "state"), ("type=media&state=COMPLETED", "state")]:
        r = client.get(f"/sagas?{query}")
        assert r.status_code == 400, (query, r.json)
        assert r.json["error"] == "invalid_input" and r.json["field"] == field, (query, r.json)
    assert "tts_failed" not in client.get("/sagas?type=media&state=nope").json["message"]
    # a state some type has is a filter, also without a type; the type's own states list it
    for query in ("state=tts_failed", "type=route_content&state=tts_failed", "type=media&state=failed"):
        assert client.get(f"/sagas?{query}").status_code == 200, query
    r = client.get("/sagas?created_after=2024-05-01T12:00:00+02:00")  # '+' unencoded reads as a space
    assert r.status_code == 400 and "%2B" in r.json["message"]


def test_status_finds_failed_instances_whatever_their_type_names_the_state(client, rt):
    # A route whose TTS batch failed is in tts_failed, a chat task may be timed_out: status=failed
    # finds them with the failed media job, by each type's failure_states.
    from orchestrator.models import WorkflowInstance

    at = datetime(2001, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=uuid.uuid4().int % 10**6)
    rows = {(t, s): str(uuid.uuid4()) for t, s in [
        ("route_content", "tts_failed"), ("media", "failed"), ("chat_task", "timed_out"), ("route_content", "completed"),
        ("media", "cancelled"), ("route_content", "synthesizing"), ("worker_deployment", "stopped")]}
    with rt.sessions() as s, s.begin():
        for i, ((type_name, state), id_) in enumerate(rows.items()):
            # a media job's views read its input (/jobs lists every media instance of this database)
            context = {"input": {"youtube_url": f"https://youtu.be/{id_[:8]}"}} if type_name == "media" else {}
            s.add(WorkflowInstance(id=id_, type=type_name, business_key=id_, state=state, context=context,
                                   finished=state not in ("synthesizing",), created_at=at + timedelta(seconds=i)))
    window = f"created_after={quote(at.isoformat())}&created_before={quote((at + timedelta(minutes=1)).isoformat())}"
    try:
        def have(query: str) -> set[tuple[str, str]]:
            got = set(ids(client, f"{window}&{query}"))
            return {k for k, v in rows.items() if v in got}

        assert have("status=failed") == {("route_content", "tts_failed"), ("media", "failed"), ("chat_task", "timed_out")}
        assert have("type=route_content&status=failed") == {("route_content", "tts_failed")}
        assert have("type=route_content&state=tts_failed") == {("route_content", "tts_failed")}
        assert have("status=completed") == {("route_content", "completed"), ("worker_deployment", "stopped")}
        assert have("status=cancelled") == {("media", "cancelled")}
        assert have("status=running") == {("route_content", "synthesizing")}
        assert have("type=worker_deployment&status=cancelled") == set()
        # every answer names its status, as the filter reads it, listed or read alone
        for status in ("running", "completed", "failed", "cancelled"):
            items = client.get(f"/sagas?{window}&status={status}&limit=50").json["items"]
            assert items and {i["status"] for i in items} == {status}, (status, items)
            for item in items:
                assert client.get(f"/sagas/{item['id']}").json["status"] == status, item
        r = client.get("/sagas?status=broken")
        assert r.status_code == 400 and r.json["field"] == "status", r.json
        # the bulk filter takes it too (a dry run changes nothing)
        bulk = client.post("/sagas/bulk", headers={"X-Admin-Token": "test-admin-token"}, json={
            "action": "cancel", "dry_run": True, "filter": {"status": "failed", "created_after": at.isoformat(),
                                                            "created_before": (at + timedelta(minutes=1)).isoformat()}})
        assert bulk.status_code == 200 and bulk.json["matched"] == 3, bulk.json
    finally:
        with rt.sessions() as s, s.begin():
            s.query(WorkflowInstance).filter(WorkflowInstance.id.in_(list(rows.values()))).delete()
