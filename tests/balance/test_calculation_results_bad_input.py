"""Hostile messages on the calculation results queue: each is dropped with its reason in the
log, none is requeued, the consumer keeps running, and a valid result behind them is applied."""
from __future__ import annotations

import json

import pytest
from balance_stack import local_stack, new_project, sent_task  # noqa: F401
from conftest import drained, wait_for

pytestmark = pytest.mark.e2e
QUEUE = "orchestrator.calculation-results"


def publish(stack, body: bytes, content_type: str = "application/json") -> None:
    from kombu import Connection, Exchange, Producer

    with Connection(stack.env["CELERY_BROKER_URL"]) as conn:
        Producer(conn).publish(body, exchange=Exchange(QUEUE, type="direct", durable=True), routing_key=QUEUE,
                               serializer=None, content_type=content_type, delivery_mode=2)


def test_hostile_results_are_dropped_with_their_reason_and_the_next_valid_one_applied(local_stack):
    s = local_stack
    s.stop("calculator")  # this test answers the task itself
    try:
        project = new_project(s)
        r = s.http("POST", "/calculations", json={
            "project": project, "branch": "calc/hostile", "files": {"in.json": {"x": 1}},
            "output_file": "out.json", "calculation": "pump"})
        assert r.status_code == 201, r.text
        cid = r.json()["correlationId"]
        task = wait_for(lambda: sent_task(s, cid),
                        timeout=30, what="the task sent")

        def result(**over) -> bytes:
            return json.dumps({"version": 1, "correlationId": task, "status": "failed", "error": "x", **over}).encode()

        hostile = {
            b"": "body: is not JSON",
            b"\x00\x01binary": "body: is not JSON",
            b"\xff\xfe{}": "body: is not UTF-8 text",
            b"null": "body: must be a JSON object",
            b"[1, 2]": "body: must be a JSON object",
            b"[" * 200_000: "body: is JSON nested too deeply",
            result(status="done"): "status:",
            result(correlationId=42): "correlationId: must be a string",
            result(correlationId=""): "correlationId:",
            result(status="succeeded"): "outputCommit: is required",
            result(error="e" * (1024 * 1024)): "more than the 1048576 a result may hold",
            result(correlationId="no-such-calculation"): "no-such-calculation dropped: it matches no waiting step",
        }
        for body in hostile:
            publish(s, body)
        publish(s, b"not even json", content_type="text/plain")
        publish(s, result(error="did not converge"))
        done = wait_for(lambda: (lambda b: b if b["status"] != "running" else None)(
            s.http("GET", f"/calculations/{cid}").json()), timeout=30, what="the valid result applied")
        assert done["status"] == "failed" and "did not converge" in done["error"], done
        wait_for(lambda: drained(s.env["CELERY_BROKER_URL"], QUEUE), timeout=30, what="nothing left or requeued")
        log = s.procs["calc-results"].output()
        for reason in hostile.values():
            assert reason in log, (reason, log[-3000:])
        assert "requeued" not in log and "Traceback" not in log, log[-3000:]
        assert s.procs["calc-results"].proc.poll() is None
    finally:
        s.start("calculator")
