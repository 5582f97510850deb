"""Headers stored in a length-limited column are checked against it where they enter, the same
on both databases: SQLite does not enforce a String(n) length (it would store the whole value)
and PostgreSQL refuses it inside the transaction. A value over the limit is a 400 naming the
header, and nothing is written."""
from __future__ import annotations

from typing import Any, Iterator

import pytest

from conftest import embedded

LONG = "a" * 5000


@pytest.fixture(params=["postgresql", "sqlite"])
def api(request: Any, tmp_path: Any) -> Iterator[Any]:
    if request.param == "postgresql":
        yield request.getfixturevalue("client")
        return
    from orchestrator import runtime
    from orchestrator.config import load_settings
    from orchestrator.migrate import upgrade
    from web import create_app

    env, rt = request.getfixturevalue("env"), request.getfixturevalue("rt")
    files = embedded(tmp_path)
    upgrade(files["DATABASE_URL"])
    own = runtime.build(load_settings(environ={**env, **files}, dotenv="/nonexistent"))
    try:
        yield create_app(own).test_client()
    finally:
        own.db.dispose()
        runtime.install(rt)


def test_an_x_actor_over_128_characters_is_a_400_naming_it_and_nothing_is_written(api):
    iid = api.post("/saga/order", json={"input": {"limit": 50, "parcels": [{"id": "p1"}]}}).json["id"]
    before = api.get(f"/sagas/{iid}").json
    for method, url, body in (("post", f"/sagas/{iid}/cancel", None),
                              ("post", f"/sagas/{iid}/events/approve", {"amount": 20}),
                              ("post", f"/sagas/{iid}/restart?step=reserve", None)):
        r = getattr(api, method)(url, json=body, headers={"X-Actor": LONG})
        assert r.status_code == 400, (url, r.status_code, r.json)
        assert r.json["error"] == "invalid_input" and r.json["field"] == "X-Actor", r.json
        assert r.json["problem"] == "must be at most 128 characters, got 5000", r.json
    after = api.get(f"/sagas/{iid}").json
    assert after["history"] == before["history"] and not after["finished"], after
    # the longest allowed is stored whole
    ok = api.post(f"/sagas/{iid}/cancel", headers={"X-Actor": "b" * 128})
    assert ok.status_code == 200, ok.json
    assert ok.json["history"][-1]["actor"] == "b" * 128 or any(
        h["actor"] == "b" * 128 for h in api.get(f"/sagas/{iid}").json["history"])


def test_starts_record_the_x_actor_and_refuse_one_over_128_characters(api):
    """POST /pipeline, /saga and /saga/<type> record who started the instance in its history, as
    restart, cancel and signals do; 129 characters is a 400 naming X-Actor and no instance."""
    import uuid

    def total(type_name: str) -> int:
        return api.get(f"/sagas?type={type_name}&limit=1").json["total"]

    url = f"https://www.youtube.com/watch?v={uuid.uuid4().hex[:11]}"
    starts = (("media", "/pipeline", lambda: {"youtube_url": url}, "job_id"),
              ("order", "/saga", lambda: {"type": "order", "key": uuid.uuid4().hex,
                                          "input": {"limit": 50, "parcels": [{"id": "p1"}]}}, "id"),
              ("order", "/saga/order", lambda: {"key": uuid.uuid4().hex,
                                                "input": {"limit": 50, "parcels": [{"id": "p1"}]}}, "id"))
    for type_name, path, body, id_field in starts:
        before = total(type_name)
        r = api.post(path, json=body(), headers={"X-Actor": "x" * 129})
        assert r.status_code == 400, (path, r.status_code, r.json)
        assert r.json["error"] == "invalid_input" and r.json["field"] == "X-Actor", (path, r.json)
        assert total(type_name) == before, path
        r = api.post(path, json=body(), headers={"X-Actor": "alice"})
        assert r.status_code in (200, 201), (path, r.json)
        history = api.get(f"/sagas/{r.json[id_field]}").json["history"]
        assert history[0]["actor"] == "alice", (path, history)
        api.post(f"/sagas/{r.json[id_field]}/cancel")
    # without the header: "api", as before
    r = api.post("/saga/order", json=starts[2][2]())
    assert api.get(f"/sagas/{r.json['id']}").json["history"][0]["actor"] == "api"
    api.post(f"/sagas/{r.json['id']}/cancel")


@pytest.mark.parametrize("path", ["/saga/order", "/api/v1/chat/{session}/task"])
def test_an_idempotency_key_is_one_rule_on_every_route(api, path):
    """Up to 255 characters, not blank. Chat scopes the key to its session inside the same column:
    a 250-character key was refused there, naming a limit of 255, and a blank one was taken."""
    session = api.post("/api/v1/chat/init", json={}).json["session_id"]
    url = path.format(session=session)
    body = {"message": "hi"} if "chat" in path else {"input": {"parcels": []}}
    key = "k" * 250
    first, again = (api.post(url, json=body, headers={"Idempotency-Key": key}) for _ in range(2))
    assert first.status_code in (201, 202) and again.status_code in (200, 202), (first.json, again.json)
    ident = "task_id" if "chat" in path else "id"
    assert first.json[ident] == again.json[ident]
    for bad, problem in (("   ", "must not be empty"), ("k" * 256, "must be at most 255 characters, got 256")):
        r = api.post(url, json=body, headers={"Idempotency-Key": bad})
        assert r.status_code == 400 and r.json["field"] == "Idempotency-Key", r.json
        assert r.json["problem"] == problem, r.json


def test_a_business_key_is_refused_in_the_words_of_an_idempotency_key(api):
    """`key` has the Idempotency-Key's column length and words: a 256-character key was refused as
    "a non-empty string of at most 255 characters", which did not say which rule it broke."""
    body = {"input": {"parcels": []}}
    first = api.post("/saga/order", json={**body, "key": "k" * 255})
    assert first.status_code == 201, first.json
    assert api.post("/saga/order", json={**body, "key": "k" * 255}).json["id"] == first.json["id"]
    for bad, problem in (("k" * 256, "must be at most 255 characters, got 256"), ("  ", "must not be empty"),
                         (" k", "must not begin or end with whitespace")):
        r = api.post("/saga/order", json={**body, "key": bad})
        assert r.status_code == 400 and (r.json["field"], r.json["problem"]) == ("key", problem), r.json
    assert api.get("/sagas?type=order&key=" + "k" * 256).json["items"] == []
