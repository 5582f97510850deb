"""Text the database cannot store (a NUL character, a lone UTF-16 surrogate) is refused where it
enters over HTTP: a 400 naming the field by its dotted path, never a 500 from PostgreSQL."""
from __future__ import annotations

import json

import pytest

NUL, SURROGATE = "a\u0000b", "\ud800"
URL = "https://www.youtube.com/watch?v=dQw4w9WgXcQ"


@pytest.mark.parametrize("path, body, field", [
    ("/saga/order", {"input": {"note": NUL}}, "input.note"),
    ("/saga/order", {"input": {"note": SURROGATE}}, "input.note"),
    ("/saga/order", {"key": NUL}, "key"),
    ("/saga", {"type": "order", "input": {"parcels": [{"id": "p1"}, {"id": SURROGATE}]}}, "input.parcels.1.id"),
    ("/saga", {"type": "order", "input": {"bad\u0000key": 1}}, "input.bad\\u0000key"),
    ("/pipeline", {"youtube_url": URL + NUL}, "youtube_url"),
    ("/pipeline", {"youtube_url": URL, "language": SURROGATE}, "language"),
    ("/api/v1/chat/init", {"config": {"persona": NUL}}, "config.persona"),
    ("/api/v1/chat/init", {"config": {"tags": [SURROGATE]}}, "config.tags.0"),
    ("/calculations", {"project": "team/p", "branch": "b", "files": {"in.json": {"note": NUL}},
                       "output_file": "out.json"}, "files.in.json.note"),
])
def test_unstorable_text_in_a_body_is_a_400_naming_the_field(client, path, body, field):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.json
    assert r.json["error"] == "invalid_input" and r.json["field"] == field, r.json
    assert r.json["message"].startswith(f"{field}: ") and "contains a" in r.json["message"]


@pytest.mark.parametrize("levels", [101, 300])
@pytest.mark.parametrize("path, raw, field", [
    ("/api/v1/chat/init", '{"config": {"x": %s}}', "config"),
    ("/saga/order", '{"input": {"parcels": [], "note": %s}}', "input"),
    ("/saga", '{"type": "order", "input": {"parcels": [], "note": %s}}', "input"),
])
def test_json_nested_deeper_than_100_levels_is_a_400_naming_the_field(client, path, raw, field, levels):
    """The parser took about 975 levels, but the value is encoded again further down the stack
    when it is stored: a chat config of 960 levels was a 500 (RecursionError) on the server, and deep inputs
    left workflows stuck with no failure recorded."""
    body = raw % ("[" * levels + "]" * levels)
    r = client.post(path, data=body, content_type="application/json")
    assert r.status_code == 400 and r.json["field"] == field, r.json
    assert r.json["message"] == f"{field}: is nested deeper than 100 levels of arrays and objects", r.json
    ok = raw % ("[" * 90 + "]" * 90)  # deep, but within the bound: taken
    assert client.post(path, data=ok, content_type="application/json").status_code < 400


def test_bytes_that_are_not_utf8_text_are_a_400(client):
    for raw, field in ((b'{"input": {"note": "\xff\xfe"}}', "body"),  # not UTF-8
                       (b'{"input": {"note": "\xed\xa0\x80"}}', "input.note"),  # an encoded surrogate
                       (b"[" * 100_000, "body")):  # deeper than any parser goes
        r = client.post("/saga/order", data=raw, content_type="application/json")
        assert r.status_code == 400 and r.json["field"] == field, (raw[:40], r.json)


def test_a_task_message_with_unstorable_text_is_a_400(client):
    session = client.post("/api/v1/chat/init", json={}).json["session_id"]
    for message in (NUL, SURROGATE):
        r = client.post(f"/api/v1/chat/{session}/task", json={"message": message})
        assert r.status_code == 400 and r.json["field"] == "message", r.json
    assert client.get(f"/api/v1/chat/{session}/tasks").json["total"] == 0


@pytest.mark.parametrize("method, url, field", [
    ("get", "/sagas?type=a%00b", "type"),
    ("get", "/sagas?state=%00", "state"),
    ("get", "/workers?status=x%00", "status"),
    ("get", "/geometries?project=team/p&ref=main%00", "ref"),
    ("get", "/sagas/a%00b", "instance_id"),
    ("post", "/sagas/a%00b/cancel", "instance_id"),
    ("get", "/jobs/x%00", "job_id"),
    ("get", "/workflows/r%00", "route_id"),
    ("get", "/api/v1/chat/s%00/status", "session_id"),
    ("get", "/calculations/c%00", "correlation_id"),
])
def test_unstorable_text_in_the_url_is_a_400_naming_the_parameter(client, method, url, field):
    r = getattr(client, method)(url)
    assert r.status_code == 400, (url, r.status_code, r.json)
    assert r.json["field"] == field, r.json


@pytest.mark.parametrize("url, field", [
    ("/sagas?key=%ED%A0%80", "key"),  # an encoded lone surrogate: was a 200 filtering on U+FFFD
    ("/sagas?type=order&error=%FF", "error"),
    ("/workers?status=a%C3", "status"),
])  # in the path: tests/contracts/test_hostile_http.py (a test client decodes the path itself)
def test_a_url_whose_bytes_are_not_utf8_is_a_400_naming_the_parameter(client, url, field):
    r = client.get(url)
    assert r.status_code == 400 and r.json["field"] == field, (url, r.status_code, r.json)
    assert r.json["message"] == f"{field}: is not valid UTF-8 once percent-decoded", r.json


@pytest.mark.parametrize("url, field", [
    ("/sagas?key=k-1&key=k-2", "key"),  # was a 200 filtering on k-1 alone
    ("/sagas?limit=5&type=order&limit=", "limit"),
    ("/workers?status=running&status=failed", "status"),
])
def test_a_query_parameter_given_twice_is_a_400_naming_it(client, url, field):
    r = client.get(url)
    assert r.status_code == 400 and r.json["field"] == field, (url, r.status_code, r.json)
    assert "more than once" in r.json["message"], r.json


def test_a_parameter_name_that_is_not_utf8_is_a_400_naming_the_query_and_an_unknown_path_a_404(client):
    r = client.get("/sagas?%FF=1")
    assert r.status_code == 400 and r.json["field"] == "query", r.json  # it named "\ufffd"
    r = client.get("/sagas/x/nothing-here?a=1&a=2")
    assert r.status_code == 404, r.json  # no route: its 404, not the query's 400


def test_utf8_in_the_url_is_read_as_sent(client):
    started = client.post("/saga/order", json={"key": "café-1", "input": {}})
    assert started.status_code == 201, started.json
    found = client.get("/sagas?type=order&key=caf%C3%A9-1").json["items"]
    assert [i["id"] for i in found] == [started.json["id"]], found


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Correlation-ID", "X-Actor"])
def test_unstorable_text_in_a_stored_header_is_a_400_naming_it(client, header):
    r = client.post("/saga/order", json={"input": {}}, headers={header: "k\u0000"})
    assert r.status_code == 400 and r.json["field"] == header, r.json
    assert "X-Correlation-ID" not in r.headers or "\x00" not in r.headers["X-Correlation-ID"]


@pytest.mark.parametrize("key", ["k\x1b[2J", "k\x7f", "k\xe2\x80\xae"])
def test_an_idempotency_key_with_a_control_character_is_a_400_naming_it(client, key):
    """The header is an identifier like a business key: an escape sequence, DEL, or a UTF-8
    U+202E (as a WSGI server hands it over: latin-1 text) was taken and stored."""
    r = client.post("/saga/order", json={"input": {}}, headers={"Idempotency-Key": key})
    assert r.status_code == 400 and r.json["field"] == "Idempotency-Key", r.json
    assert "control" in r.json["message"], r.json
    assert client.post("/saga/order", json={"input": {}}, headers={"Idempotency-Key": "order-7"}).status_code in (200, 201)


def wire(text: str) -> str:
    """A header value as a client sends it (UTF-8) and a WSGI server hands it over (latin-1 text)."""
    return text.encode().decode("latin-1")


def test_stored_headers_are_read_as_utf8(client):
    """An actor `é` was stored as `Ã©`: WSGI spells header bytes as latin-1 text."""
    r = client.post("/saga/order", json={"input": {"parcels": []}},
                    headers={"X-Actor": wire("José"), "X-Correlation-ID": wire("corr-é-1")})
    assert r.status_code == 201, r.json
    assert r.headers["X-Correlation-ID"] == wire("corr-é-1")  # the bytes sent, sent back
    assert client.get(f"/sagas/{r.json['id']}").json["history"][0]["actor"] == "José"


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Correlation-ID", "X-Request-ID", "X-Actor"])
def test_a_stored_header_with_a_hidden_character_is_a_400_naming_it(client, header):
    """A U+202E sent as UTF-8 is named as U+202E, not as the latin-1 characters of its bytes."""
    r = client.post("/saga/order", json={"input": {"parcels": []}}, headers={header: wire("ab\u202ecd")})
    assert r.status_code == 400 and r.json["field"] == header, r.json
    assert r.json["message"] == (f"{header}: contains a control, format or line separator character "
                                 "(U+202E at position 2)"), r.json


@pytest.mark.parametrize("header", ["Idempotency-Key", "X-Correlation-ID", "X-Actor", "X-User"])
def test_a_stored_header_that_is_not_utf8_is_a_400_naming_it(client, header):
    r = client.post("/saga/order", json={"input": {"parcels": []}}, headers={header: "ab\xffcd"})
    assert r.status_code == 400 and r.json["message"] == f"{header}: is not valid UTF-8", r.json


def test_a_blank_actor_is_a_400(client):
    r = client.post("/saga/order", json={"input": {"parcels": []}}, headers={"X-Actor": "   "})
    assert r.status_code == 400 and r.json["message"] == "X-Actor: must not be empty", r.json


@pytest.mark.parametrize("message", ["\u202e\u2028\u200f", "\u200b \u2029\ufeff"])
def test_a_task_message_of_only_invisible_characters_is_empty(client, message):
    """Direction marks and separators show nothing, like spaces: such a message was a 202 and a task."""
    session = client.post("/api/v1/chat/init", json={}).json["session_id"]
    r = client.post(f"/api/v1/chat/{session}/task", json={"message": message})
    assert r.status_code == 400 and r.json["message"] == "message: must not be empty", r.json
    assert client.get(f"/api/v1/chat/{session}/tasks").json["total"] == 0


def test_a_business_key_not_in_composed_form_is_a_400(client):
    """`cle\u0301` (e + a combining accent) and `clé` read the same but were two instances."""
    assert client.post("/saga/order", json={"key": "cl\u00e9-k", "input": {"parcels": []}}).status_code == 201
    r = client.post("/saga/order", json={"key": "cle\u0301-k", "input": {"parcels": []}})
    assert r.status_code == 400 and r.json["message"] == (
        "key: must be in Unicode's composed form (NFC, here 'cl\u00e9-k'): it differs at position 2"), r.json


@pytest.mark.parametrize("key", [" padded ", "k-1 ", "\u00a0k-2"])
def test_a_business_key_with_whitespace_around_it_is_a_400(client, key):
    """`" padded "` was stored with its spaces: a second id that reads as `padded`."""
    r = client.post("/saga/order", json={"key": key, "input": {"parcels": []}})
    assert r.status_code == 400 and r.json["message"] == "key: must not begin or end with whitespace", r.json


@pytest.mark.parametrize("key, code", [("k-1\u202e", "U+202E at position 3"), ("k\u2028x", "U+2028 at position 1"),
                                       ("k\x07", "U+0007 at position 1"), ("\u200fk", "U+200F at position 0")])
def test_a_business_key_with_a_control_or_direction_character_is_a_400(client, key, code):
    r = client.post("/saga/order", json={"key": key, "input": {"parcels": []}})
    assert r.status_code == 400 and r.json["field"] == "key", r.json
    assert r.json["message"] == f"key: contains a control, format or line separator character ({code})", r.json


def test_text_that_can_be_stored_is_kept_intact(client):
    note = "tab\t, newline\n, é, 漢字, emoji 🎉, escaped \\u0000 as text"
    r = client.post("/saga/order", json={"input": {"note": note, "parcels": []}})
    assert r.status_code == 201, r.json
    assert client.get(f"/sagas/{r.json['id']}").json["context"]["input"]["note"] == note
    assert json.loads(json.dumps(note)) == note


# NaN, Infinity and -Infinity are not JSON, though Python's parser takes them (and 1e999 as
# infinity): PostgreSQL's json refuses them (a 500), SQLite stores them and then fails every read.
# An integer of 400 digits parses as a Python int, but no double holds it: a calculation worker
# requeued such an input for ever ("int too large to convert to float").
@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "9" * 400, "-" + "9" * 400])
@pytest.mark.parametrize("path, raw, field", [
    ("/api/v1/chat/init", '{"config": {"x": %s}}', "config.x"),
    ("/saga/order", '{"input": {"parcels": [{"weight": %s}]}}', "input.parcels.0.weight"),
    ("/pipeline", '{"youtube_url": "%s", "extra": %%s}' % URL, "extra"),
    ("/calculations", '{"project": "team/p", "branch": "b", "files": {"in.json": {"p": %s}}, '
                      '"output_file": "out.json"}', "files.in.json.p"),
])
def test_a_number_that_is_not_finite_is_a_400_naming_the_field(client, path, raw, field, number):
    r = client.post(path, data=raw % number, content_type="application/json")
    assert r.status_code == 400, (path, number, r.status_code, r.json)
    assert r.json["field"] == field and "is not a finite number" in r.json["message"], r.json


def test_after_a_refused_nan_every_chat_session_still_answers(client):
    session = client.post("/api/v1/chat/init", json={"config": {"x": 1.5}}).json["session_id"]
    r = client.post("/api/v1/chat/init", data='{"config": {"x": NaN}}', content_type="application/json")
    assert r.status_code == 400
    for path in ("status", "events", "tasks"):
        assert client.get(f"/api/v1/chat/{session}/{path}").status_code == 200, path


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_a_json_body_in_utf16_or_utf32_is_a_400_naming_the_body(client, encoding):
    """RFC 8259: JSON between systems is UTF-8. json.loads guessed the encoding from the first
    bytes, so a UTF-16 body started a job."""
    raw = '{"youtube_url": "https://youtu.be/abcdefghijk"}'.encode(encoding)
    r = client.post("/pipeline", data=raw, content_type="application/json")
    assert r.status_code == 400 and r.json["field"] == "body", r.json
    # UTF-8 with a byte order mark is still taken (RFC 8259 lets a parser ignore the mark)
    ok = client.post("/pipeline", data="\ufeff{\"youtube_url\": \"https://youtu.be/abcdefghijk\"}".encode("utf-8"),
                     content_type="application/json")
    assert ok.status_code == 200, ok.json
