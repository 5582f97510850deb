"""/openapi.json and /asyncapi.json are generated from the models; each validates against its
specification (OpenAPI 3.1 with openapi-spec-validator, AsyncAPI 3.0 with the official JSON
schema shipped in this folder) and describes every endpoint, topic and queue."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
from openapi_spec_validator import validate

from orchestrator.kafka_bridge import discover, produced_topics

ASYNCAPI_SCHEMA = Path(__file__).with_name("asyncapi-3.0.0.schema.json")


def test_openapi_document_is_valid_and_describes_every_endpoint(app, client):
    doc = client.get("/openapi.json").json
    assert doc["openapi"].startswith("3.1")
    validate(doc)
    documented = {(path, method.upper()) for path, ops in doc["paths"].items() for method in ops}
    for rule in app.url_map.iter_rules():
        if rule.endpoint in ("static",) or rule.rule == "/openapi.json" or getattr(rule, "websocket", False):
            continue
        if rule.endpoint.startswith("console."):  # the operator console's pages, behind its own login
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)  # <route_id>, <path:route_id>
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            assert (path, method) in documented, (path, method)
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["responses"], (path, method)
            for code, answer in op["responses"].items():
                if int(code) >= 400 and code != "503":  # every error answers the one error shape (503: readiness)
                    assert answer["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody"), \
                        (path, method, code)
    start = doc["paths"]["/pipeline"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    body = doc["components"]["schemas"][start["$ref"].rsplit("/", 1)[1]]
    assert body["required"] == ["youtube_url"] and body["additionalProperties"] is False


def test_asyncapi_document_is_valid_and_describes_every_topic_and_queue(app, client):
    doc = client.get("/asyncapi.json").json
    jsonschema.validate(doc, json.loads(ASYNCAPI_SCHEMA.read_text()))
    registry = app.config["RUNTIME"].engine.registry
    consumed = set(discover(registry))
    addresses = {c["address"] for c in doc["channels"].values()}
    assert consumed | {f"{t}.dlq" for t in consumed} | set(produced_topics(registry)) <= addresses
    assert {"orchestrator.calculations", "orchestrator.calculation-results", "callback:{consumer_id}",
            "chat:callbacks:{consumer_id}"} <= addresses
    for op in doc["operations"].values():  # every message has a payload schema that resolves
        for ref in op["messages"]:
            channel, message = ref["$ref"].split("/")[2], ref["$ref"].split("/")[-1]
            assert doc["channels"][channel]["messages"][message]
            spec = doc["components"]["messages"][message]
            payload = spec["payload"].get("$ref")
            if payload:
                assert payload.rsplit("/", 1)[1] in doc["components"]["schemas"]


def test_the_business_key_the_api_refuses_is_refused_by_its_schema(client):
    """`key` of POST /saga and POST /saga/<type> is refused empty, blank or over 255 characters
    (models.business_key_problem, a 400 naming it); its schema said any string, so a client
    generating requests from it sent "" and got a 400."""
    doc = client.get("/openapi.json").json
    for name in ("StartSaga", "StartSagaOfType"):
        key = doc["components"]["schemas"][name]["properties"]["key"]
        for bad in ("", " ", " k", "k" * 256):
            assert not _valid(key, bad), (name, bad)
        assert _valid(key, "order-42"), name
    for path in ("/saga", "/saga/order"):
        body = {"key": "", "input": {}} if path != "/saga" else {"type": "order", "key": "", "input": {}}
        r = client.post(path, json=body)
        assert r.status_code == 400 and r.json["field"] == "key", (path, r.json)


def _valid(schema: dict, value: str) -> bool:
    try:
        jsonschema.validate(value, schema)
    except jsonschema.ValidationError:
        return False
    return True
