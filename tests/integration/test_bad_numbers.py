"""Numbers in query parameters and headers that do not fit: a 400 naming the parameter, never a
500 from the database (an integer beyond 64 bits), from timedelta (hours beyond its range) or
from float parsing (nan, 1e999)."""
from __future__ import annotations

from urllib.parse import quote

import pytest

HUGE = "9223372036854775808"  # 2**63: one past the largest signed 64-bit integer
HUGER = "99999999999999999999999999"
ADMIN = {"X-Admin-Token": "test-admin-token"}  # /admin/* needs it


@pytest.fixture
def session(client) -> str:
    return client.post("/api/v1/chat/init", json={}).json["session_id"]


@pytest.mark.parametrize("method, url, field", [
    ("get", f"/sagas?offset={HUGE}", "offset"),
    ("get", f"/sagas?limit={HUGE}", "limit"),
    ("get", f"/sagas?offset={HUGER}", "offset"),
    ("get", "/sagas?offset=-1", "offset"),
    ("get", f"/workers?offset={HUGE}", "offset"),
    ("get", f"/workers?limit={HUGER}", "limit"),
    ("get", f"/jobs?limit={HUGE}", "limit"),
    ("post", "/admin/cleanup?max_age_hours=nan", "max_age_hours"),
    ("post", "/admin/cleanup?max_age_hours=inf", "max_age_hours"),
    ("post", "/admin/cleanup?max_age_hours=1e999", "max_age_hours"),
    ("post", "/admin/cleanup?max_age_hours=1e300", "max_age_hours"),
    ("post", "/admin/cleanup?max_age_hours=99999999999", "max_age_hours"),
    ("post", "/admin/cleanup?max_age_hours=-1", "max_age_hours"),
])
def test_a_number_out_of_range_in_the_query_is_a_400_naming_it(client, method, url, field):
    r = getattr(client, method)(url, headers=ADMIN)
    assert r.status_code == 400, (url, r.status_code, r.json)
    assert r.json["field"] == field, r.json


@pytest.mark.parametrize("value", [HUGE, HUGER, "-1", "nan", "1e3"])
def test_a_resume_position_out_of_range_is_a_400_naming_it(client, session, value):
    r = client.get(f"/api/v1/chat/{session}/events?after_seq={value}")
    assert r.status_code == 400 and r.json["field"] == "after_seq", (value, r.json)
    r = client.get(f"/api/v1/chat/{session}/events", headers={"Last-Event-ID": value})
    assert r.status_code == 400 and r.json["field"] == "Last-Event-ID", (value, r.json)


def test_the_largest_allowed_values_are_answered(client, session):
    assert client.get("/sagas?offset=9223372036854775807").status_code == 200
    assert client.post("/admin/cleanup?max_age_hours=1000000", headers=ADMIN).status_code == 200
    assert client.get("/workers?offset=9223372036854775807").status_code == 200


@pytest.mark.parametrize("value", ["1_0", " 10", "10 ", "+10", "10.0", "\u0661\u0660", "1e1"])
@pytest.mark.parametrize("url, field", [
    ("/sagas?limit={}", "limit"), ("/sagas?offset={}", "offset"), ("/workers?limit={}", "limit"),
    ("/workers?offset={}", "offset"), ("/jobs?limit={}", "limit"),
])
def test_an_integer_in_the_query_is_decimal_digits_only(client, url, field, value):
    """pydantic's lax mode read `limit=1_0` as 10 (and ` 10`, `+10`, `10.0`, Arabic-Indic digits):
    a query parameter that a client did not mean as that number is a 400 naming it."""
    r = client.get(url.format(quote(value)))
    assert r.status_code == 400 and r.json["field"] == field, (url, value, r.status_code, r.json)
    assert "decimal digits" in r.json["message"], r.json


@pytest.mark.parametrize("value", ["1_0", "+10", "\u0661\u0660"])
def test_a_resume_position_is_decimal_digits_only(client, session, value):
    r = client.get(f"/api/v1/chat/{session}/events?after_seq={quote(value)}")
    assert r.status_code == 400 and r.json["field"] == "after_seq", (value, r.json)
    r = client.get(f"/api/v1/chat/{session}/events", headers={"Last-Event-ID": value.encode().decode("latin-1")})
    assert r.status_code == 400 and r.json["field"] == "Last-Event-ID", (value, r.json)


def test_plain_digits_are_still_integers(client):
    r = client.get("/sagas?limit=10&offset=0")
    assert r.status_code == 200 and r.json["limit"] == 10, r.json
    assert client.get("/sagas?limit=-1").json["field"] == "limit"  # signed text: the range names it


@pytest.mark.parametrize("value", ["1_0", " 24", "24 ", "+24", "\u0661\u0660", "0x10", "24h"])
def test_a_number_in_the_query_is_decimal_digits_only(client, value):
    """`max_age_hours=1_0` cleaned up everything older than 10 hours: float() reads `1_0`, ` 24`
    and `+24` too. A 400 naming the parameter, and nothing removed."""
    r = client.post(f"/admin/cleanup?max_age_hours={quote(value)}", headers=ADMIN)
    assert r.status_code == 400 and r.json["field"] == "max_age_hours", (value, r.status_code, r.json)
    assert "decimal digits" in r.json["message"], r.json


@pytest.mark.parametrize("value", ["yes", "on", "t", "y", "no", "off", "2", "truee"])
def test_a_boolean_in_the_query_is_true_or_false(client, value):
    r = client.post(f"/admin/cleanup?deep={quote(value)}", headers=ADMIN)
    assert r.status_code == 400 and r.json["field"] == "deep", (value, r.status_code, r.json)


@pytest.mark.parametrize("query", ["max_age_hours=24", "max_age_hours=0.5", "max_age_hours=1e3", "deep=true",
                                   "deep=FALSE", "deep=1", "deep=0"])
def test_plain_numbers_and_booleans_are_still_taken(client, query):
    assert client.post(f"/admin/cleanup?{query}", headers=ADMIN).status_code == 200, query
