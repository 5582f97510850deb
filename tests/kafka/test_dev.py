"""`orchestrator dev` with no Kafka configured: it starts the bundled broker, the bridge and the
Kafka emulators; a route and a worker go through; SIGTERM stops everything, the broker too."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest
import requests
from conftest import ROOT, terminate, wait_for

from orchestrator.kafka_broker import free_port

pytestmark = pytest.mark.kafka


def test_dev_runs_both_kafka_workflows_on_the_bundled_broker(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "KAFKA_"))}
    port, flower = free_port(), free_port()
    env.update(PORT=str(port), HOST="127.0.0.1", SWEEP_INTERVAL="0.2", LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT),
               FLOWER_BASIC_AUTH="admin:secret", EMULATOR_TTS_FAILURE_RATE="0", EMULATOR_TTS_LATENCY="0.05",
               EMULATOR_RUNNER_FAILURE_RATE="0",
               # the media emulators are not under test here; keep their fixed ports free
               VIDEO_DOWNLOADER_URL="http://127.0.0.1:9", AUDIO_NORMALIZATION_URL="http://127.0.0.1:9",
               AUDIO_TRANSCRIBER_URL="http://127.0.0.1:9")
    log_path = tmp_path / "dev.log"
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "dev", "--flower-port", str(flower),
                             "--concurrency", "1", "--api-workers", "1", "--kafka-port", "0"], cwd=tmp_path, env=env,
                            stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        brokers = wait_for(lambda: (re.search(r"Kafka (127\.0\.0\.1:\d+) \(bundled\)", log_path.read_text())
                                    or [None, None])[1], timeout=60, what="dev to start the broker")

        def ready():
            try:
                return requests.get(f"{base}/readyz", timeout=3).json()["dependencies"]["kafka"]["status"] == "ok"
            except (requests.RequestException, KeyError, ValueError):
                return False

        wait_for(ready, timeout=90, interval=0.5, what="API ready with Kafka")
        route_id = f"dev-{uuid.uuid4().hex[:6]}"
        produce = [sys.executable, "-m", "orchestrator.cli", "produce"]
        penv = {**env, "KAFKA_BROKERS": brokers}
        subprocess.run(produce + ["route.confirmed", f'{{"route_id": "{route_id}", "mode": "walking"}}',
                                  "--key", route_id], env=penv, cwd=tmp_path, check=True, timeout=60)
        scenario = str(uuid.uuid4())
        subprocess.run(produce + ["init_scenario", f'{{"scenario_uuid": "{scenario}", "camera_url": "rtsp://c/1"}}'],
                       env=penv, cwd=tmp_path, check=True, timeout=60)

        def route():
            r = requests.get(f"{base}/workflows/{route_id}", timeout=5)
            return r.json() if r.status_code == 200 and r.json()["status"] == "completed" else None

        view = wait_for(route, timeout=90, interval=0.5, what="the route completed under dev")
        assert view["steps"]["delivery_prefetch"]["status"] == "completed"
        workers = wait_for(lambda: (lambda p: p if p["total"] == 1 and p["items"][0]["status"] == "running" else None)(
            requests.get(f"{base}/workers?scenario_uuid={scenario}", timeout=5).json()), timeout=60,
            what="the worker running under dev")
        assert workers["items"][0]["camera_url"] == "rtsp://c/1"
        metrics = requests.get(f"{base}/metrics", timeout=10).text
        assert "route_to_first_audio_seconds_count" in metrics  # the bridge's metrics on the API's /metrics
    finally:
        code = terminate(proc)
    assert code == 0, log_path.read_text()[-3000:]
    host, kport = brokers.split(":")
    import socket

    with pytest.raises(OSError):
        socket.create_connection((host, int(kport)), timeout=1).close()
