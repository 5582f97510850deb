"""200 routes confirmed at once, 1 to 4 stories each, TTS failing some requests: every route
ends completed or waits in a failed tts_batch; restarting each failed one completes it, and no
story is synthesised twice after it succeeded."""
from __future__ import annotations

import uuid
from collections import Counter

import pytest
from conftest import wait_for
from sqlalchemy import select

from emulators.kafka_services import story_count
from orchestrator.models import WorkflowInstance

from .conftest import metric

pytestmark = pytest.mark.kafka

ROUTES = 200


def states(krt, keys):
    with krt.sessions() as s:
        return dict(s.execute(select(WorkflowInstance.business_key, WorkflowInstance.state).where(
            WorkflowInstance.type == "route_content", WorkflowInstance.business_key.in_(keys))).all())


def settled(krt, keys, wanted):
    now = states(krt, keys)
    return len(now) == len(keys) and all(v in wanted for v in now.values())


def test_200_routes_with_tts_failures_and_restarts(kclient, kafka, krt, bridge, kafka_emulators):
    tts = kafka_emulators["tts"]
    tts.failure_rate = 0.15
    try:
        tag = uuid.uuid4().hex[:6]
        keys = [f"load-{tag}-{i}" for i in range(ROUTES)]
        for k in keys:
            kafka.send("route.confirmed", {"route_id": k, "mode": "walking"}, key=k, flush=False)
        kafka.flush()
        wait_for(lambda: settled(krt, keys, {"completed", "tts_failed"}), timeout=180, interval=1,
                 what="every route completed or failed in tts_batch")
        first = states(krt, keys)
        failed = [k for k, v in first.items() if v == "tts_failed"]
        assert failed, "no TTS failure was injected; the restart path went untested"
        assert len(failed) < ROUTES

        for k in failed:
            view = kclient.get(f"/workflows/{k}").json
            tb = view["steps"]["tts_batch"]
            assert view["status"] == "failed" and tb["status"] == "failed" and tb["attempt"] == 1
            assert tb["failed"] >= 1 and tb["done"] + tb["failed"] == tb["total"] == story_count(k, 4)
            r = kclient.post(f"/workflows/{k}/restart?step=tts_batch")
            assert r.status_code == 200, r.json
            assert r.json["steps"]["tts_batch"]["status"] == "pending"
            assert r.json["steps"]["tts_batch"]["attempt"] == 2
        wait_for(lambda: settled(krt, keys, {"completed"}), timeout=120, interval=1,
                 what="every restarted route completed")
    finally:
        tts.failure_rate = 0.0

    requests = Counter((m["route_id"], m["story_id"]) for m in tts.messages() if m["route_id"] in set(keys))
    for k in keys:
        view = kclient.get(f"/workflows/{k}").json
        n = story_count(k, 4)
        tb = view["steps"]["tts_batch"]
        assert (tb["status"], tb["done"], tb["failed"], tb["total"]) == ("completed", n, 0, n)
        assert tb["attempt"] == (2 if k in failed else 1)
        for i in range(n):
            sid = f"{k}-s{i + 1}"
            assert tts.succeeded[(k, sid)] == 1, f"{sid} synthesised {tts.succeeded[(k, sid)]} times"
            assert requests[(k, sid)] == (2 if (k, sid) in tts.failed_once else 1)
    prefetch = Counter(m["route_id"] for m in kafka_emulators["delivery"].messages() if m["route_id"] in set(keys))
    assert prefetch == Counter({k: 1 for k in keys})
    assert metric(bridge, "route_to_first_audio_seconds_count") >= ROUTES
    assert metric(bridge, "job_duration_seconds_count", step="tts_batch", status="failed") >= len(failed)
