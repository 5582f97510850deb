"""OpenTelemetry traces: with OTEL_EXPORTER_OTLP_ENDPOINT set, the API, the worker and the sweeper
(real processes) export spans over OTLP/HTTP to an in-test receiver, and the spans that follow
one request share its trace across processes; unset, nothing is exported and nothing breaks."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
import requests
from conftest import ROOT, Process, start_worker, wait_for
from otlp import Receiver

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def traced(env, rt, receiver):
    """API, worker and sweeper exporting spans to the receiver; the API's base URL."""
    from e2e.test_processes import wait_http
    from orchestrator.entrypoints.ports import free_port

    tenv = {**env, **receiver.env()}
    port = free_port()
    procs = [Process("tapi", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"], tenv).start(),
             Process("tsweeper", ["sweeper"], tenv).start()]
    try:
        procs.append(start_worker(tenv, rt, f"tw{uuid.uuid4().hex[:6]}"))
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/healthz")
        yield base
    finally:
        for p in procs:
            p.stop()


def test_one_media_pipeline_is_one_trace_across_api_and_worker(traced, receiver):
    r = requests.post(f"{traced}/pipeline", json={"youtube_url": f"https://youtu.be/t{uuid.uuid4().hex[:8]}"},
                      timeout=10)
    assert r.status_code == 200, r.text
    job_id = r.json()["job_id"]
    wait_for(lambda: requests.get(f"{traced}/jobs/{job_id}", timeout=5).json()["status"] == "completed",
             timeout=90, interval=0.2, what=f"job {job_id} to complete")

    start = wait_for(lambda: [s for s in receiver.about(job_id) if s.name.startswith("workflow start")],
                     timeout=20, what="the API's start span")[0]
    assert start.service == "orchestrator-api"
    assert start.attributes["workflow.type"] == "media"
    trace = start.trace_id

    def worker_steps():
        return [s for s in receiver.about(job_id) if s.service == "orchestrator-worker" and s.trace_id == trace
                and "workflow.step" in s.attributes]

    steps = wait_for(worker_steps, timeout=20, what="the worker's step spans in the request's trace")
    first = steps[0]
    assert first.attributes["workflow.attempt"] == 1 and first.attributes["workflow.type"] == "media"
    # the HTTP request itself, the outbox publish and the transition are in the same trace
    with receiver.lock:
        in_trace = [s for s in receiver.spans if s.trace_id == trace]
    names = {s.name for s in in_trace}
    assert any(s.service == "orchestrator-api" and s.name.startswith("POST") for s in in_trace), names
    assert any(n.startswith("outbox publish") for n in names), names
    assert any(n.startswith("transition") for n in names), names
    # a step polled later runs from a timer: its own trace, linked to the first one
    timers = [s for s in receiver.about(job_id) if s.name.startswith("timer")]
    assert all(s.trace_id != trace and trace in s.links for s in timers)


def test_unset_means_no_sdk_and_no_exporter(env, tmp_path):
    """Without OTEL_EXPORTER_OTLP_ENDPOINT a process that serves requests and starts workflows sets up
    no tracer, exporter or instrumentation (and nothing fails). (redis-py imports parts of
    OpenTelemetry's metrics by itself when they are installed: not ours to check.)"""
    script = (
        "import sys\n"
        "from orchestrator import runtime, tracing\n"
        "from web import create_app\n"
        "tracing.setup('api')\n"
        "app = create_app(runtime.current())\n"
        "r = app.test_client().post('/saga', json={'type': 'order', 'input': {}})\n"
        "assert r.status_code == 201, r.get_data(as_text=True)\n"
        "assert not tracing.enabled()\n"
        "print(sorted(m for m in list(sys.modules) if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter', 'opentelemetry.instrumentation'))))\n")
    clean = {k: v for k, v in env.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", script], env=clean, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
