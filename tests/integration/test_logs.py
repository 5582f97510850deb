"""Structured logs: JSON lines that carry the workflow id and the correlation id of the request
that caused them, in the API, and in a worker two hops later."""
from __future__ import annotations

import io
import json
import logging
import uuid

import pytest

from conftest import start_worker, wait_for
from orchestrator import logs


def test_lines_carry_the_ids_of_their_context():
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(logs.ContextFilter())
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger("test.logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logs.context(workflow_id="wf-1", correlation_id="c-1"):
            with logs.context(workflow_id="wf-2"):
                logger.warning("inner %s", 1)
            try:
                raise ValueError("boom")
            except ValueError:
                logger.exception("failed")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inner, failed, outside = (json.loads(line) for line in out.getvalue().splitlines())
    assert (inner["message"], inner["workflow_id"], inner["correlation_id"]) == ("inner 1", "wf-2", "c-1")
    assert failed["workflow_id"] == "wf-1" and "ValueError: boom" in failed["exc"]
    assert "workflow_id" not in outside and "correlation_id" not in outside and outside["level"] == "WARNING"


@pytest.fixture(scope="module")
def chatty_worker(env, rt):
    proc = start_worker({**env, "LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}, rt, f"logs{uuid.uuid4().hex[:6]}")
    yield proc
    proc.stop()


def test_a_request_is_followed_into_the_worker(client, chatty_worker, sweeper):
    correlation = f"corr-{uuid.uuid4().hex[:8]}"
    r = client.post("/saga", json={"type": "order", "input": {}}, headers={"X-Correlation-ID": correlation})
    assert r.status_code == 201 and r.headers["X-Correlation-ID"] == correlation
    instance_id = r.json["id"]
    wait_for(lambda: client.get(f"/sagas/{instance_id}").json["state"] == "awaiting_approval", timeout=20,
             what="the order to reach its approval")

    def step_lines() -> list[dict]:
        lines = [json.loads(line) for line in chatty_worker.output().splitlines() if line.startswith("{")]
        return [line for line in lines if line.get("workflow_id") == instance_id and "step" in line["message"]]

    lines = wait_for(lambda: len(step_lines()) >= 3 and step_lines(), timeout=10, what="the worker's step lines")
    # reserve, then the charge chain's two links: every line names the workflow and the request
    assert {line["message"].split()[1] for line in lines} >= {"reserve", "charge"}
    assert {line["correlation_id"] for line in lines} == {correlation}
    assert client.get("/healthz").headers["X-Correlation-ID"]  # made up when none is given
