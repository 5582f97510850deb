"""Hostile HTTP against a real `orchestrator api` process (gunicorn), on every operation of
/openapi.json: oversized bodies (API_MAX_BODY_BYTES, chunked too), wrong content types, deep
nesting, huge numbers, invalid UTF-8 in bodies, paths and queries, request lines gunicorn cannot
parse. Every answer is a 4xx with the API's JSON error `{"error", "message", "field"}`; no 5xx."""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import uuid
from typing import Any, Iterator

import pytest
import requests
from conftest import ROOT, serve_api
from orchestrator.entrypoints.ports import free_port

pytestmark = pytest.mark.e2e
LIMIT = 65536


@pytest.fixture(scope="module")
def api(env: dict[str, str]) -> Iterator[tuple[str, int]]:
    yield from serve_api("hostile-api", {**env, "API_MAX_BODY_BYTES": str(LIMIT)})


def send(api: tuple[str, int], method: str, path: bytes, body: bytes | None = None,
         content_type: bytes | None = b"application/json", chunked: bool = False) -> tuple[int, dict[str, Any]]:
    """One request as raw bytes (nothing normalised by a client library); (status, JSON body)."""
    head = method.encode() + b" " + path + b" HTTP/1.1\r\nHost: test\r\nConnection: close\r\n"
    if content_type:
        head += b"Content-Type: " + content_type + b"\r\n"
    payload = b""
    if body is not None and chunked:
        head += b"Transfer-Encoding: chunked\r\n"
        payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 4096]), body[i:i + 4096])
                           for i in range(0, len(body), 4096)) + b"0\r\n\r\n"
    elif body is not None:
        head += b"Content-Length: %d\r\n" % len(body)
        payload = body
    with socket.create_connection(api, timeout=30) as s:
        try:
            s.sendall(head + b"\r\n" + payload)
        except (BrokenPipeError, ConnectionResetError):  # answered before the whole body was read
            pass
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    status_line, _, rest = out.partition(b"\r\n")
    headers, _, answer = rest.partition(b"\r\n\r\n")
    status = int(status_line.split()[1])
    if status < 400:
        return status, {}
    assert re.search(rb"(?im)^content-type: application/json", headers), (status, headers, answer[:300])
    return status, json.loads(answer)


def assert_error(status: int, answer: dict[str, Any], expected: int | None = None, field: str | None = None) -> None:
    assert 400 <= status < 500, (status, answer)
    assert expected is None or status == expected, (status, answer)
    assert isinstance(answer.get("error"), str) and isinstance(answer.get("message"), str), answer
    assert field is None or answer.get("field") == field, answer


def operations(api: tuple[str, int], with_body: bool) -> list[tuple[str, str]]:
    doc = requests.get(f"http://{api[0]}:{api[1]}/openapi.json", timeout=10).json()
    return [(method.upper(), path) for path, ops in doc["paths"].items() for method, op in ops.items()
            if ("requestBody" in op) == with_body and (with_body or method == "get")]


def filled(path: str, value: str) -> bytes:
    return re.sub(r"\{[^}]+\}", value, path).encode()


HOSTILE_BODIES = {
    "oversized": (b'{"x": "' + b"a" * LIMIT + b'"}', b"application/json"),
    "plain text": (b'{"type": "order"}', b"text/plain"),
    "a form": (b"type=order&input=1", b"application/x-www-form-urlencoded"),
    "no content type": (b'{"type": "order"}', None),
    "nested 100000 deep": (b"[" * 50_000, b"application/json"),
    "nested 990 deep": (b'{"a": ' + b"[" * 990 + b"]" * 990 + b"}", b"application/json"),
    "a 5000-digit number": (b'{"n": ' + b"9" * 5000 + b"}", b"application/json"),
    "1e999": (b'{"n": 1e999, "limit": -1e999}', b"application/json"),
    "invalid UTF-8": (b'{"type": "\xff\xfe"}', b"application/json"),
    "empty": (b"", b"application/json"),
    "null": (b"null", b"application/json"),
}


def test_every_operation_with_a_body_answers_hostile_bodies_with_a_json_4xx(api):
    ops = operations(api, with_body=True)
    assert len(ops) >= 10
    for method, path in ops:
        for name, (body, ctype) in HOSTILE_BODIES.items():
            status, answer = send(api, method, filled(path, str(uuid.uuid4())), body, ctype)
            if name == "empty" and status < 300:  # an optional body (POST /api/v1/chat/init)
                continue
            assert 400 <= status < 500, (method, path, name, status, answer)
            assert_error(status, answer)


@pytest.mark.parametrize("path", [b"/saga", b"/api/v1/chat/init", b"/pipeline", b"/calculations"])
def test_a_body_over_the_limit_is_a_413_naming_it(api, path):
    for chunked in (False, True):
        status, answer = send(api, "POST", path, b'{"x": "' + b"a" * (LIMIT * 3) + b'"}', chunked=chunked)
        assert_error(status, answer, 413, "body")
        assert f"at most {LIMIT} bytes (API_MAX_BODY_BYTES)" in answer["message"], answer
    # just under the limit is read and judged on its content
    status, answer = send(api, "POST", path, b'{"x": "' + b"a" * (LIMIT - 100) + b'"}', chunked=True)
    assert status == 400 and answer["field"] != "body", answer


@pytest.mark.parametrize("ctype", [b"text/plain", b"application/x-www-form-urlencoded", b"multipart/form-data",
                                   b"application/xml", None])
def test_a_body_that_is_not_json_is_a_415_naming_the_content_type(api, ctype):
    status, answer = send(api, "POST", b"/saga", b'{"type": "order"}', ctype)
    assert_error(status, answer, 415, "Content-Type")
    assert "must be application/json" in answer["message"]
    # JSON with parameters is JSON
    status, answer = send(api, "POST", b"/saga", b'{"type": "no-such-type"}', b"application/json; charset=utf-8")
    assert_error(status, answer, 400, "type")


@pytest.mark.parametrize("charset", [b"utf-16", b"latin-1", b"UTF-32BE"])
def test_json_in_another_charset_is_a_415_not_read_as_utf8(api, charset):
    """JSON is UTF-8 (RFC 8259): a body said to be in another charset was read as UTF-8 anyway,
    so `é` sent in latin-1 became a 400 about bad UTF-8, or worse, other text."""
    body = '{"type": "order", "input": {"note": "é"}}'.encode("latin-1" if charset == b"latin-1" else "utf-8")
    status, answer = send(api, "POST", b"/saga", body, b"application/json; charset=" + charset)
    assert_error(status, answer, 415, "Content-Type")
    assert "utf-8" in answer["message"], answer
    status, answer = send(api, "POST", b"/saga", b'{"type": "no-such-type"}', b'application/json; charset="UTF8"')
    assert_error(status, answer, 400, "type")


@pytest.mark.parametrize("body, field", [
    (b"[" * 50_000, "body"), (b'{"type": ' + b"[" * 990 + b"]" * 990 + b"}", None),
    (b'{"type": "order", "input": {"n": ' + b"9" * 5000 + b"}}", "body"), (b'{"type": "\xff"}', "body"),
    (b'{"type": "order", "input": {"n": 1e999}}', "input.n"),
])
def test_deep_nesting_huge_numbers_and_invalid_utf8_are_a_400(api, body, field):
    status, answer = send(api, "POST", b"/saga", body)
    assert_error(status, answer, 400, field)


@pytest.mark.parametrize("body, message", [
    (b'{"n": ' + b"9" * 5000 + b"}", "body: is not valid JSON: has a number of more than 4300 digits"),
    (b'{"type": "\xff"}', "body: is not valid JSON: is not valid UTF-8"),
])
def test_a_body_the_parser_refuses_is_named_in_the_user_s_terms(api, body, message):
    """Not Python's words (`sys.set_int_max_str_digits()`), which mean nothing to a client."""
    status, answer = send(api, "POST", b"/saga", body)
    assert_error(status, answer, 400, "body")
    assert answer["message"] == message, answer


def test_invalid_utf8_and_huge_values_in_paths_and_queries_never_get_a_5xx(api):
    ops = operations(api, with_body=False)
    assert len(ops) >= 20
    for _method, path in ops:
        if path in ("/api/v1/chat/{session_id}/events",):  # an event stream: checked with a bad id below
            continue
        for value in ("%FF%FE", "%C0%80", "9" * 400, "%00"):
            for url in (filled(path, value), filled(path, "x") + b"?limit=" + value.encode() + b"&offset=" +
                        value.encode() + b"&state=" + value.encode()):
                status, answer = send(api, "GET", url, content_type=None) if b"{" not in url else (0, {})
                assert status < 500, (url, status, answer)
                if status >= 400:
                    assert_error(status, answer)
    status, answer = send(api, "GET", b"/api/v1/chat/%FF%FE/events", content_type=None)
    assert_error(status, answer, 400, "session_id")


@pytest.mark.parametrize("path, field", [
    (b"/sagas/a%FFb", "instance_id"),  # was a 404 for an id with U+FFFD in it
    (b"/workflows/r-%ED%A0%80", "route_id"),  # an encoded lone surrogate
    (b"/jobs/%C0%80", "job_id"),  # an overlong NUL
])
def test_a_path_whose_bytes_are_not_utf8_is_a_400_naming_the_parameter(api, path, field):
    status, answer = send(api, "GET", path, content_type=None)
    assert_error(status, answer, 400, field)
    assert answer["message"] == f"{field}: is not valid UTF-8 once percent-decoded", answer


def test_a_path_that_matches_no_route_is_a_404_whatever_its_bytes(api):
    status, answer = send(api, "GET", b"/sagas/%FF/nothing-here", content_type=None)
    assert_error(status, answer, 404)


@pytest.mark.parametrize("raw, status, field", [
    (b"GET /sagas/\xff\xfe HTTP/1.1\r\nHost: t\r\n\r\n", 400, "request line"),
    (b"GET /sagas?state=\xff HTTP/1.1\r\nHost: t\r\n\r\n", 400, "request line"),
    (b"GET /sagas?limit=" + b"9" * 5000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414, "request line"),
    (b"GET /sagas HTTP/1.1\r\nHost: t\r\nX-Bad\xff: 1\r\n\r\n", 400, "headers"),
    (b"NOT HTTP AT ALL\r\n\r\n", 400, "request line"),
    (b"POST /saga HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
     b"zz\r\n{}\r\n0\r\n\r\n", 400, "body"),
    (b"GET /sagas HTTP/1.1\r\nHost: t\r\nX-Big: " + b"h" * 10_000 + b"\r\n\r\n", 431, "headers"),
    (b"GET /sagas HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-H%d: 1\r\n" % i for i in range(200)) + b"\r\n",
     431, "headers"),
    (b"POST /saga HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n{}", 400, "headers"),
    (b"POST /saga HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n{}", 400,
     "headers"),  # both framings at once: a request-smuggling attempt
    (b"POST /saga HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nExpect: 999-nonsense\r\n"
     b"Content-Length: 2\r\n\r\n{}", 417, "Expect"),  # gunicorn's own answer was an HTML page
])
def test_requests_the_server_cannot_parse_get_the_json_error_too(api, raw, status, field):
    with socket.create_connection(api, timeout=30) as s:
        s.sendall(raw)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, answer = out.partition(b"\r\n\r\n")
    assert head.split()[1] == str(status).encode() and b"application/json" in head, out[:500]
    answer = json.loads(answer)
    assert isinstance(answer.get("error"), str) and isinstance(answer.get("message"), str), answer
    assert answer["field"] == field and answer["message"] == f"{field}: {answer['problem']}", answer


@pytest.mark.parametrize("content_type, status", [(b"application/json", 413), (b"text/plain", 415)])
def test_an_error_answer_to_a_body_it_did_not_read_closes_the_connection(api, content_type, status):
    """The API answers these before reading the body; gunicorn reads at most 64 KiB of a body
    left unread to keep a connection alive. The answer said `Connection: keep-alive` and the
    connection was then dropped: a client's next request on it failed. Now it says close."""
    body = b'{"x": "' + b"a" * (4 * LIMIT) + b'"}'
    head = (b"POST /pipeline HTTP/1.1\r\nHost: t\r\nContent-Type: " + content_type
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body))
    with socket.create_connection(api, timeout=30) as s:
        try:
            s.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):  # answered before the whole body was read
            pass
        out = b""
        while b"\r\n\r\n" not in out and (chunk := s.recv(65536)):
            out += chunk
    headers = out.partition(b"\r\n\r\n")[0].lower()
    assert headers.split()[1] == str(status).encode(), out[:500]
    assert b"\r\nconnection: close" in headers, headers
    with requests.Session() as client:  # what a client library does with it: a fresh connection next
        for _ in range(3):
            r = client.post(f"http://{api[0]}:{api[1]}/pipeline", data=body,
                            headers={"Content-Type": content_type.decode()}, timeout=30)
            assert r.status_code == status, r.text
            assert client.get(f"http://{api[0]}:{api[1]}/healthz", timeout=30).status_code == 200


def test_the_limit_is_checked_at_start_up(env):
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "api", "--port", str(free_port())],
                         env={**env, "API_MAX_BODY_BYTES": "12"}, cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "API_MAX_BODY_BYTES" in out.stdout + out.stderr, out.stderr[-2000:]


def test_a_method_a_path_does_not_take_is_a_405_that_says_which_it_takes(api):
    """RFC 9110: a 405 carries Allow. The JSON error handler kept Werkzeug's status but dropped
    its headers, so `PUT /sagas` answered 405 without saying which methods to use."""
    doc = requests.get(f"http://{api[0]}:{api[1]}/openapi.json", timeout=10).json()
    for path, ops in doc["paths"].items():
        if "{" in path:  # a route's methods do not depend on its values
            continue
        declared = {m.upper() for m in ops}
        method = next(m for m in ("PATCH", "PUT", "DELETE") if m not in declared)
        r = requests.request(method, f"http://{api[0]}:{api[1]}{path}", timeout=10)
        assert r.status_code == 405, (method, path, r.status_code, r.text[:200])
        assert r.json()["error"] == "method_not_allowed", (path, r.text)
        allowed = {m.strip() for m in r.headers.get("Allow", "").split(",")}
        assert declared <= allowed, (method, path, r.headers.get("Allow"))
