"""Who may do what, over HTTP against the API process and Flower started from the CLI: every
admin, bulk and destructive endpoint refuses a request without the ADMIN_TOKEN (401 with
WWW-Authenticate: Bearer), with a wrong one (403), and everything when the server has no token
(403 saying how to enable it); the console and Flower refuse without their basic-auth login, and
GET /issues without the gateway's X-User. Every refusal has the API's error shape and names the
header at fault, every 401 carries WWW-Authenticate; none echoes a secret."""
from __future__ import annotations

import base64
import re
import uuid
from typing import Any, Iterator

import pytest
import requests
from conftest import Process, start_flower, wait_for
from orchestrator.entrypoints.ports import free_port

TOKEN = "test-admin-token"
CONSOLE = "operator:console-pass-7c1e"
FLOWER = "flower:flower-pass-93ab"
#: (method, path, JSON body): every operation that acts on many instances, deletes or resets.
ADMIN_ONLY = [
    ("GET", "/admin/stats", None),
    ("POST", "/admin/cleanup?max_age_hours=1", None),
    ("POST", "/admin/factory-reset", None),
    ("POST", "/sagas/bulk", {"action": "cancel", "filter": {"type": "media"}, "dry_run": True}),
    ("GET", f"/sagas/bulk/{uuid.UUID(int=1)}", None),
    ("POST", f"/sagas/bulk/{uuid.UUID(int=1)}/cancel", None),
]


def start_api(env: dict[str, str], name: str) -> tuple[Process, str]:
    port = free_port()
    proc = Process(name, ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"], env).start()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    wait_for(up, timeout=60, interval=0.2, what=f"{name} on {base}")
    return proc, base


@pytest.fixture(scope="module")
def api(env: dict[str, str]) -> Iterator[str]:
    proc, base = start_api({**env, "CONSOLE_BASIC_AUTH": CONSOLE}, "api-auth")
    try:
        yield base
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def api_without_token(env: dict[str, str]) -> Iterator[str]:
    proc, base = start_api({k: v for k, v in env.items() if k not in ("ADMIN_TOKEN", "CONSOLE_BASIC_AUTH")},
                           "api-no-token")
    try:
        yield base
    finally:
        proc.stop()


def call(base: str, method: str, path: str, body: Any, headers: dict[str, str] | None = None) -> requests.Response:
    return requests.request(method, base + path, json=body, headers=headers or {}, timeout=30)


def refusal(r: requests.Response, status: int, field: str) -> dict[str, Any]:
    assert r.status_code == status, (r.request.method, r.request.url, r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "message", "field"}, body
    assert body["field"] == field and body["error"] == ("unauthorized" if status == 401 else "forbidden"), body
    assert TOKEN not in r.text
    return body


@pytest.mark.parametrize("method, path, body", ADMIN_ONLY)
def test_admin_operations_refuse_a_request_without_the_token(api, method, path, body):
    r = call(api, method, path, body)
    refusal(r, 401, "X-Admin-Token")
    assert r.headers["WWW-Authenticate"].startswith("Bearer ")


@pytest.mark.parametrize("method, path, body", ADMIN_ONLY)
@pytest.mark.parametrize("headers", [{"X-Admin-Token": "wrong"}, {"Authorization": "Bearer wrong"},
                                     {"X-Admin-Token": TOKEN[:-1]}, {"X-Admin-Token": TOKEN + "x"}])
def test_admin_operations_refuse_a_wrong_token(api, method, path, body, headers):
    refusal(call(api, method, path, body, headers), 403, "X-Admin-Token")


@pytest.mark.parametrize("method, path, body", ADMIN_ONLY)
def test_admin_operations_are_off_when_the_server_has_no_token(api_without_token, method, path, body):
    answer = refusal(call(api_without_token, method, path, body, {"X-Admin-Token": TOKEN}), 403, "X-Admin-Token")
    assert "set ADMIN_TOKEN" in answer["message"], answer


@pytest.mark.parametrize("headers", [{"X-Admin-Token": TOKEN}, {"Authorization": f"Bearer {TOKEN}"}])
def test_the_token_lets_an_admin_in(api, headers):
    assert call(api, "GET", "/admin/stats", None, headers).status_code == 200
    assert call(api, "POST", "/admin/cleanup?max_age_hours=100000", None, headers).status_code == 200
    dry = call(api, "POST", "/sagas/bulk", ADMIN_ONLY[3][2], headers)
    assert dry.status_code == 200 and "matched" in dry.json(), dry.text
    assert call(api, "GET", ADMIN_ONLY[4][1], None, headers).status_code == 404


#: The challenge each credential's 401 carries, by the header the refusal names.
CHALLENGES = {"X-Admin-Token": 'Bearer realm="orchestrator admin"', "X-User": 'X-User realm="orchestrator"'}


def test_every_operation_that_answers_401_says_how_to_authenticate(client):
    # Every operation /openapi.json declares a 401 for, called without its credential: the 401
    # carries WWW-Authenticate with the scheme of the header it names (the console's own: below).
    spec = client.get("/openapi.json").json
    refused = set()
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            if "401" not in op.get("responses", {}):
                continue
            url = re.sub(r"\{[^}]+\}", str(uuid.UUID(int=1)), path)
            for headers in ({}, {"X-User": "  "}):
                r = client.open(url, method=method.upper(), headers=headers)
                assert r.status_code == 401, (method, path, r.status_code, r.json)
                assert r.json["error"] == "unauthorized" and r.json["field"] in CHALLENGES, (method, path, r.json)
                assert r.headers.get("WWW-Authenticate") == CHALLENGES[r.json["field"]], (method, path, r.headers)
            refused.add(f"{method.upper()} {path}")
    assert refused >= {"GET /issues", "GET /admin/stats", "POST /admin/cleanup", "POST /admin/factory-reset",
                       "POST /sagas/bulk", "GET /sagas/bulk/{bulk_id}", "POST /sagas/bulk/{bulk_id}/cancel"}, refused


def basic(login: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}


@pytest.mark.parametrize("path", ["/ui/", "/ui/bulk"])
@pytest.mark.parametrize("headers", [{}, basic("operator:wrong"), {"Authorization": f"Bearer {TOKEN}"},
                                     {"X-Admin-Token": TOKEN}])
def test_the_console_refuses_without_its_login(api, path, headers):
    r = requests.get(api + path, headers={**headers, "Accept": "application/json"}, timeout=10)
    refusal(r, 401, "Authorization")
    assert r.headers["WWW-Authenticate"].startswith("Basic ") and "console-pass" not in r.text
    assert requests.get(api + path, headers=basic(CONSOLE), timeout=10).status_code == 200


def test_the_console_bulk_run_refuses_without_its_login(api):
    r = requests.post(f"{api}/ui/bulk/run", json=ADMIN_ONLY[3][2], timeout=10)
    refusal(r, 401, "Authorization")
    ok = requests.post(f"{api}/ui/bulk/run", json=ADMIN_ONLY[3][2], headers=basic(CONSOLE), timeout=10)
    assert ok.status_code == 200, ok.text


def test_the_console_is_off_without_a_login_configured(api_without_token):
    r = requests.get(f"{api_without_token}/ui/", headers={**basic(CONSOLE), "Accept": "application/json"},
                     timeout=10)
    assert "CONSOLE_BASIC_AUTH" in refusal(r, 403, "Authorization")["message"]


def test_flower_refuses_without_its_login(env):
    proc, base = start_flower("flower-auth", {**env, "FLOWER_BASIC_AUTH": FLOWER})
    try:
        for path in ("/", "/api/tasks", "/api/workers", "/tasks", "/broker", "/metrics"):
            for auth in (None, ("flower", "wrong"), ("admin", "admin")):
                r = requests.get(base + path, auth=auth, timeout=10)
                assert r.status_code == 401, (path, auth, r.status_code)
                if auth is None and path == "/":  # the browser's login prompt
                    assert r.headers["WWW-Authenticate"].startswith("Basic ")
        assert requests.get(f"{base}/api/tasks", auth=("flower", "flower-pass-93ab"), timeout=10).status_code == 200
        r = requests.get(f"{base}/metrics", auth=("flower", "flower-pass-93ab"), timeout=10)
        assert r.status_code == 200 and "flower_" in r.text, r.text[:300]
    finally:
        proc.stop()


def test_flower_will_not_start_open(env):
    import subprocess
    import sys

    from conftest import ROOT

    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "flower", "--port", str(free_port())],
                         env={k: v for k, v in env.items() if k != "FLOWER_BASIC_AUTH"}, cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "FLOWER_BASIC_AUTH: required" in out.stderr
