"""The operator console over HTTP (Flask test client): its login, the 403 that says how to turn
it on, and its pages for every built-in workflow type."""
from __future__ import annotations

import base64
from typing import Any, Iterator

import pytest
from conftest import wait_for
from markupsafe import escape

LOGIN = "operator:s3cret"


def basic(login: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


def app_with(env: dict[str, str], rt: Any, **extra: str) -> Iterator[Any]:
    from orchestrator import runtime
    from orchestrator.config import load_settings
    from web import create_app

    own = runtime.build(load_settings(environ={**env, **extra}, dotenv="/nonexistent"))
    try:
        yield create_app(own).test_client()
    finally:
        own.db.dispose()
        runtime.install(rt)


@pytest.fixture(scope="module")
def on(env: dict[str, str], rt: Any) -> Iterator[Any]:
    yield from app_with(env, rt, CONSOLE_BASIC_AUTH=LOGIN)


@pytest.fixture(scope="module")
def off(env: dict[str, str], rt: Any) -> Iterator[Any]:
    yield from app_with({k: v for k, v in env.items() if k != "CONSOLE_BASIC_AUTH"}, rt)


PAGES = ["/ui/", "/ui/sagas", "/ui/bulk", "/ui/static/console.js"]


@pytest.mark.parametrize("path", PAGES + ["/ui/bulk/run"])
@pytest.mark.parametrize("auth", [None, "operator:wrong", "someone:s3cret", "operator"])
def test_refused_without_the_right_login(on, path, auth):
    headers = basic(auth) if auth else {}
    r = on.post(path, headers=headers, json={}) if path.endswith("/run") else on.get(path, headers=headers)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"].startswith("Basic ")
    assert r.json["error"] == "unauthorized"


def test_several_logins_separated_by_commas_each_log_in(env, rt):
    """As FLOWER_BASIC_AUTH takes them: "a:b,c:d" logged in only `a` with the password `b,c:d`."""
    for app in app_with(env, rt, CONSOLE_BASIC_AUTH="ann:pw-1,bob:pw-2"):
        assert app.get("/ui/", headers=basic("ann:pw-1")).status_code == 200
        assert app.get("/ui/", headers=basic("bob:pw-2")).status_code == 200
        for wrong in ("ann:pw-2", "bob:pw-1", "ann:pw-1,bob:pw-2"):
            assert app.get("/ui/", headers=basic(wrong)).status_code == 401, wrong


def test_a_bearer_token_is_no_login(on):
    assert on.get("/ui/", headers={"Authorization": "Bearer s3cret"}).status_code == 401


@pytest.mark.parametrize("path", PAGES)
def test_disabled_when_unset_says_how_to_enable(off, path):
    page = off.get(path, headers={**basic(LOGIN), "Accept": "text/html"})
    assert page.status_code == 403 and page.mimetype == "text/html"
    assert "CONSOLE_BASIC_AUTH=user:password" in page.get_data(as_text=True)
    answer = off.get(path, headers={"Accept": "application/json"})
    assert answer.status_code == 403
    assert answer.json["error"] == "forbidden" and "CONSOLE_BASIC_AUTH" in answer.json["message"]


def test_bad_value_stops_start_up_naming_it():
    from orchestrator.config import ConfigError, load_settings

    with pytest.raises(ConfigError) as err:
        load_settings(environ={"CONSOLE_BASIC_AUTH": "nopassword"}, dotenv="/nonexistent")
    assert err.value.variable == "CONSOLE_BASIC_AUTH"


def test_pages_render_for_every_built_in_type(on, rt):
    names = rt.engine.registry.names()
    assert {"media", "calculate-balance", "simple-calculation", "route_content", "worker_deployment"} <= set(names)
    assert len(names) >= 6  # and the chat task
    home = on.get("/ui/", headers=basic(LOGIN))
    assert home.status_code == 200 and home.mimetype == "text/html"
    for name in names:
        assert f'data-type="{name}"' in home.get_data(as_text=True)
        page = on.get(f"/ui/types/{name}", headers=basic(LOGIN))
        assert page.status_code == 200, (name, page.get_data(as_text=True)[:500])
        assert "<svg" in page.get_data(as_text=True)
        listing = on.get(f"/ui/sagas?type={name}&state=", headers=basic(LOGIN))
        assert listing.status_code == 200 and f"<option selected>{name}</option>" in listing.get_data(as_text=True)
        bulk = on.get(f"/ui/bulk?type={name}", headers=basic(LOGIN))
        assert bulk.status_code == 200
    # the instance's status is one of the filters, as on GET /sagas
    for path in ("/ui/sagas?status=failed", "/ui/bulk?status=failed"):
        html = on.get(path, headers=basic(LOGIN)).get_data(as_text=True)
        assert '<select name="status">' in html and "<option selected>failed</option>" in html, path
    assert on.get("/ui/types/nope", headers=basic(LOGIN)).status_code == 404


def test_instance_page_shows_diagram_steps_context_history_and_actions(on):
    started = on.post("/pipeline", json={"youtube_url": "https://www.youtube.com/watch?v=abcdefghijk"})
    assert started.status_code == 200, started.json
    job = started.json["job_id"]
    page = on.get(f"/ui/sagas/{job}", headers=basic(LOGIN))
    assert page.status_code == 200
    html = page.get_data(as_text=True)
    assert 'data-current="true"' in html and 'data-step="download"' in html
    assert "youtube_url" in html and ">Cancel</button>" in html and 'id="history"' in html
    part = on.get(f"/ui/sagas/{job}?part=1", headers=basic(LOGIN)).get_data(as_text=True)
    assert "<html" not in part and 'id="steps"' in part
    assert on.get("/ui/sagas/00000000-0000-0000-0000-000000000000", headers=basic(LOGIN)).status_code == 404
    on.post(f"/sagas/{job}/cancel")


@pytest.mark.parametrize("query, field", [("status=bogus", "status"), ("type=nope", "type"),
                                          ("type=media&state=tts_failed", "state"), ("step_status=gone", "step_status"),
                                          ("created_after=yesterday", "created_after")])
@pytest.mark.parametrize("page, form", [("/ui/sagas", '<table id="instances"'), ("/ui/bulk", 'id="dry-run"')])
def test_a_bad_filter_is_said_on_the_page_as_the_api_says_it(on, query, field, page, form):
    api = on.get(f"/sagas?{query}")
    assert api.status_code == 400 and api.json["field"] == field, api.json
    answer = on.get(f"{page}?{query}", headers=basic(LOGIN))
    assert answer.status_code == 400 and answer.mimetype == "text/html"
    html = answer.get_data(as_text=True)
    assert f'<p id="message" role="status" class="bad">{escape(api.json["message"])}</p>' in html
    assert form in html  # the form stays, to correct the filter
    name, value = query.split("&")[-1].split("=")
    if name in ("type", "status", "step_status"):  # a select keeps the value it has no option for
        assert f'<option selected data-unknown="true">{value}</option></select>' in html
    good = on.get(f"{page}?status=failed&type=media", headers=basic(LOGIN)).get_data(as_text=True)
    assert '<p id="message" role="status"></p>' in good and "data-unknown" not in good


@pytest.mark.parametrize("path", ["/ui/sagas/00000000-0000-0000-0000-000000000000", "/ui/types/nope"])
def test_an_unknown_instance_or_type_is_a_console_page_for_a_browser(on, path):
    browser = {**basic(LOGIN), "Accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
    page = on.get(path, headers=browser)
    assert page.status_code == 404 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assert 'data-error="not_found"' in html and path.rsplit("/", 1)[1] in html and 'href="/ui/sagas"' in html
    # a script asking for JSON still gets the API's error
    answer = on.get(path, headers={**basic(LOGIN), "Accept": "application/json"})
    assert answer.status_code == 404 and answer.json["error"] == "not_found"


def test_send_event_offers_the_signals_the_state_allows(on, worker, sweeper):
    # the test `order` workflow declares one user signal, `approve`, allowed in awaiting_approval
    iid = on.post("/saga", json={"type": "order", "input": {"parcels": [], "limit": 50}}).json["id"]
    wait_for(lambda: on.get(f"/sagas/{iid}").json["state"] == "awaiting_approval", timeout=60,
             what="the order to wait for approval")
    html = on.get(f"/ui/sagas/{iid}", headers=basic(LOGIN)).get_data(as_text=True)
    assert ">Send event</button>" in html and '<select id="event-name"><option>approve</option></select>' in html
    on.post(f"/sagas/{iid}/cancel")
    wait_for(lambda: on.get(f"/sagas/{iid}").json["finished"], timeout=60, what="the order to be cancelled")
    html = on.get(f"/ui/sagas/{iid}", headers=basic(LOGIN)).get_data(as_text=True)
    assert "Send event" not in html and ">Cancel</button>" not in html


def test_cancel_is_offered_only_where_the_engine_takes_it(on, rt):
    """route_content, worker_deployment and chat_task have no cancel (409 "cannot be cancelled"):
    their running instances show no Cancel button; a failed media job, which can be cancelled, does."""
    import uuid

    from orchestrator.models import WorkflowInstance

    rows = {"route_content": "synthesizing", "worker_deployment": "deployed", "chat_task": "running",
            "media": "failed"}
    ids = {name: str(uuid.uuid4()) for name in rows}
    with rt.sessions() as s, s.begin():
        for name, state in rows.items():
            assert state in {st.id for st in rt.engine.registry.get(name).states}, (name, state)
            # the input a media job's views read (/jobs lists every media instance of this database)
            context = {"input": {"youtube_url": f"https://youtu.be/{ids[name][:8]}"}} if name == "media" else {}
            s.add(WorkflowInstance(id=ids[name], type=name, business_key=ids[name], state=state, context=context,
                                   finished=name == "media"))
    try:
        _offered_where_the_engine_takes_it(on, ids)
    finally:  # rows no workflow wrote: the next tests of this database must not meet them
        with rt.sessions() as s, s.begin():
            s.query(WorkflowInstance).filter(WorkflowInstance.id.in_(list(ids.values()))).delete()


def _offered_where_the_engine_takes_it(on: Any, ids: dict[str, str]) -> None:
    for name, iid in ids.items():
        html = on.get(f"/ui/sagas/{iid}", headers=basic(LOGIN)).get_data(as_text=True)
        part = on.get(f"/ui/sagas/{iid}?part=1", headers=basic(LOGIN)).get_data(as_text=True)
        offered = ">Cancel</button>" in html
        assert offered == (">Cancel</button>" in part), name
        if name == "media":
            assert offered, html[-2000:]
            continue
        assert not offered, (name, html[-2000:])
        r = on.post(f"/sagas/{iid}/cancel")
        assert r.status_code == 409 and "cannot be cancelled" in r.json["message"], (name, r.json)
    r = on.post(f"/sagas/{ids['media']}/cancel")
    assert r.status_code == 200 and r.json["state"] == "cancelled", r.json


def test_bulk_from_the_console_needs_no_admin_token_and_checks_its_input(on):
    dry = on.post("/ui/bulk/run", headers=basic(LOGIN),
                  json={"action": "restart", "step": "normalization", "dry_run": True, "filter": {"type": "media"}})
    assert dry.status_code == 200 and set(dry.json) == {"matched", "sample"}
    bad = on.post("/ui/bulk/run", headers=basic(LOGIN), json={"action": "restart", "step": "nope", "dry_run": True,
                                                              "filter": {"type": "media"}})
    assert bad.status_code == 400 and bad.json["field"] == "step"
    unfiltered = on.post("/ui/bulk/run", headers=basic(LOGIN), json={"action": "cancel"})  # not "every instance"
    assert unfiltered.status_code == 400 and unfiltered.json["field"] == "filter", unfiltered.json
    assert unfiltered.json["problem"] == "is required", unfiltered.json
    assert on.get("/ui/bulk/nope", headers=basic(LOGIN)).status_code in (400, 404)


@pytest.mark.parametrize("sent_by", [{"Origin": "http://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                                     {"Origin": "null"}])
def test_an_action_sent_by_another_site_is_refused(on, sent_by):
    """A browser sends the console's basic-auth login with any request to it: a form on another
    site cancelled a bulk run (`/ui/bulk/<id>/cancel` takes no body to be checked)."""
    run = on.post("/ui/bulk/run", headers=basic(LOGIN), json={"action": "cancel", "filter": {"type": "media",
                                                                                             "key": "nothing-k"}})
    assert run.status_code == 202, run.json
    bulk_id = run.json["bulk_id"]
    r = on.post(f"/ui/bulk/{bulk_id}/cancel", headers={**basic(LOGIN), **sent_by})
    assert r.status_code == 403 and r.json["field"] == "Origin", r.json
    r = on.post("/ui/bulk/run", headers={**basic(LOGIN), **sent_by}, json={"action": "cancel", "filter": {"type": "media"}})
    assert r.status_code == 403, r.json
    # the console's own pages (same origin), and clients that are not browsers, act
    same = {"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}
    for headers in (same, {}):  # 409 once done: it matched nothing, but got past the check
        assert on.post(f"/ui/bulk/{bulk_id}/cancel", headers={**basic(LOGIN), **headers}).status_code in (200, 409)


def test_the_context_shows_text_as_it_reads_and_hidden_characters_as_escapes(on):
    """`kéy` was shown as `k\\u00e9y`; a direction mark must still show as its escape."""
    iid = on.post("/saga", json={"type": "order", "input": {"parcels": [], "note": "kéy 漢字 a\u202eb"}}).json["id"]
    html = on.get(f"/ui/sagas/{iid}", headers=basic(LOGIN)).get_data(as_text=True)
    assert "kéy 漢字 a\\u202eb" in html and "\u202e" not in html, html[-2000:]
