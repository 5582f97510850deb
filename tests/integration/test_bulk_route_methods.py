"""`/sagas/bulk` is the bulk operations' path, not an instance's: a method it does not take is a
405 whose Allow lists only its own methods (with the default converter `/sagas/<instance_id>`
matched it too, and the Allow header offered GET, which answered 404)."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("method", ["get", "put", "delete", "patch"])
def test_a_405_on_sagas_bulk_allows_only_post(client, method):
    r = getattr(client, method)("/sagas/bulk")
    assert r.status_code == 405, (method, r.status_code, r.json)
    assert r.json["error"] == "method_not_allowed", r.json
    allowed = {m.strip() for m in r.headers["Allow"].split(",")}
    assert allowed == {"POST", "OPTIONS"}, r.headers["Allow"]


def test_an_instance_id_other_than_bulk_still_reaches_the_instance_routes(client):
    assert client.get("/sagas/bulkhead").status_code == 404
    assert client.get("/sagas/bulk-1").json["error"] == "not_found"
    assert client.post("/sagas/bulk/cancel").status_code == 405  # a bulk's path: it takes GET only
