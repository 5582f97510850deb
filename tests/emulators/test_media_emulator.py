"""Contract tests for the media pipeline service emulators."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from flask.testing import FlaskClient

from emulators.media import DEFAULT_PORTS, SERVICES, EmulatorServer, create_app

JOB_SECONDS = 0.1
REPO_ROOT = Path(__file__).resolve().parents[2]
URL = "https://www.youtube.com/watch?v=dQw4w9WgXcQ&t=42"

ClientFactory = Callable[..., FlaskClient]


@pytest.fixture
def make_client() -> ClientFactory:
    def factory(service: str, **kwargs: Any) -> FlaskClient:
        kwargs.setdefault("job_seconds", JOB_SECONDS)
        return create_app(service, **kwargs).test_client()

    return factory


@pytest.fixture
def server() -> Iterator[Callable[..., EmulatorServer]]:
    started: list[EmulatorServer] = []

    def factory(service: str, **kwargs: Any) -> EmulatorServer:
        kwargs.setdefault("job_seconds", JOB_SECONDS)
        started.append(EmulatorServer(service, **kwargs).start())
        return started[-1]

    yield factory
    for srv in started:
        srv.stop()


def submit(client: FlaskClient, service: str, payload: bytes = b"audio-bytes", key: str | None = None,
           **form: str) -> Any:
    headers = {"Idempotency-Key": key} if key else {}
    if service == "video-downloader":
        return client.post("/jobs", json={"url": form.get("url", URL)}, headers=headers)
    data: dict[str, Any] = {"file": (io.BytesIO(payload), "in.webm"), **form}
    return client.post("/jobs", data=data, headers=headers, content_type="multipart/form-data")


def wait_status(client: FlaskClient, job_id: str, wanted: str, timeout: float = 2.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/jobs/{job_id}").get_json()
        if body["status"] == wanted or time.monotonic() > deadline:
            assert body["status"] == wanted, body
            return body
        time.sleep(0.02)


def set_faults(client: FlaskClient, *faults: dict[str, Any], job: dict[str, Any] | None = None) -> None:
    resp = client.post("/_emulator/faults", json={"faults": list(faults), "job": job or {}})
    assert resp.status_code == 200, resp.get_json()


@pytest.mark.parametrize("service", SERVICES)
def test_health(make_client: ClientFactory, service: str) -> None:
    resp = make_client(service).get("/health")
    assert resp.status_code == 200
    assert resp.get_json() == {"status": "healthy", "service": service}


def test_default_ports() -> None:
    assert DEFAULT_PORTS == {"video-downloader": 8001, "audio-normalization": 8002, "audio-transcriber": 8003}


def test_video_downloader_lifecycle(make_client: ClientFactory) -> None:
    client = make_client("video-downloader", job_seconds=0.2)
    resp = submit(client, "video-downloader")
    assert resp.status_code == 201
    assert resp.get_json() == {"job_id": "dQw4w9WgXcQ_audio", "status": "queued", "progress": 0.0}

    early = client.get("/jobs/dQw4w9WgXcQ_audio/download")
    assert early.status_code == 409 and early.get_json() == {"error": "job not completed"}
    time.sleep(0.05)
    mid = client.get("/jobs/dQw4w9WgXcQ_audio").get_json()
    assert mid["status"] == "processing" and 0 < mid["progress"] < 100 and mid["error"] is None

    done = wait_status(client, "dQw4w9WgXcQ_audio", "completed")
    assert done == {"job_id": "dQw4w9WgXcQ_audio", "status": "completed", "progress": 100.0, "error": None}
    result = client.get("/jobs/dQw4w9WgXcQ_audio/download")
    assert result.status_code == 200
    assert result.data == b"AUDIO:" + URL.encode()
    assert result.mimetype == "application/octet-stream"
    assert result.headers["Content-Disposition"] == "attachment; filename=dQw4w9WgXcQ_audio.webm"


def test_video_ids_short_urls_and_uniqueness(make_client: ClientFactory) -> None:
    client = make_client("video-downloader")
    ids = [submit(client, "video-downloader", key=f"k{i}", url="https://youtu.be/abc_-123").get_json()["job_id"]
           for i in range(3)]
    assert ids == ["abc_-123_audio", "abc_-123_audio_2", "abc_-123_audio_3"]


@pytest.mark.parametrize("body", [{}, {"url": 42}, {"url": ""}, {"url": "https://www.youtube.com/"}])
def test_video_downloader_rejects_bad_url(make_client: ClientFactory, body: dict[str, Any]) -> None:
    resp = make_client("video-downloader").post("/jobs", json=body)
    assert resp.status_code == 400 and "url" in resp.get_json()["error"]


def test_normalization_lifecycle(make_client: ClientFactory) -> None:
    client = make_client("audio-normalization")
    resp = submit(client, "audio-normalization", b"RAW", remove_noise="true", convert_to_mono="false",
                  isolate_vocals="true", set_sample_rate_16k="false", apply_highpass_filter="true")
    assert resp.status_code == 201
    job_id = resp.get_json()["job_id"]
    assert job_id.startswith("norm_") and len(job_id) == len("norm_") + 8
    wait_status(client, job_id, "completed")
    result = client.get(f"/jobs/{job_id}/download")
    assert result.data == b"NORM[apply_highpass_filter,isolate_vocals,remove_noise]:RAW"
    assert result.headers["Content-Disposition"] == "attachment; filename=audio_normalized.webm"


def test_normalization_validation(make_client: ClientFactory) -> None:
    client = make_client("audio-normalization")
    missing = client.post("/jobs", data={"remove_noise": "true"}, content_type="multipart/form-data")
    assert missing.status_code == 400 and "file" in missing.get_json()["error"]
    bad_flag = submit(client, "audio-normalization", convert_to_mono="maybe")
    assert bad_flag.status_code == 400 and "convert_to_mono" in bad_flag.get_json()["error"]


def test_transcriber_lifecycle(make_client: ClientFactory) -> None:
    client = make_client("audio-transcriber")
    resp = submit(client, "audio-transcriber", b"12345", language="pt")
    job_id = resp.get_json()["job_id"]
    assert resp.status_code == 201 and job_id.startswith("trans_")
    assert client.get(f"/jobs/{job_id}/transcription").status_code == 409
    wait_status(client, job_id, "completed")
    body = client.get(f"/jobs/{job_id}/transcription").get_json()
    assert body["language"] == "pt" and body["transcription_file"] == "transcription.srt"
    assert len(body["segments"]) == 3 and "5 bytes" in body["text"]
    assert body["segments"][1] == {"text": body["segments"][1]["text"], "start": 2.5, "end": 5.0, "duration": 2.5}

    # Deterministic: same input gives the same transcription; language_out wins.
    again = submit(client, "audio-transcriber", b"12345", language="pt", language_out="en").get_json()["job_id"]
    wait_status(client, again, "completed")
    other = client.get(f"/jobs/{again}/transcription").get_json()
    assert other["segments"] == body["segments"] and other["language"] == "en"
    assert client.post("/jobs", data={}, content_type="multipart/form-data").status_code == 400


def test_unknown_job_is_404(make_client: ClientFactory) -> None:
    for service, result in (("video-downloader", "download"), ("audio-transcriber", "transcription")):
        client = make_client(service)
        assert client.get("/jobs/nope").get_json() == {"error": "job nope not found"}
        assert client.get("/jobs/nope").status_code == 404
        assert client.get(f"/jobs/nope/{result}").status_code == 404


def test_idempotent_submit_and_stats(make_client: ClientFactory) -> None:
    client = make_client("audio-normalization")
    first = submit(client, "audio-normalization", key="step-1")
    second = submit(client, "audio-normalization", key="step-1")
    assert (first.status_code, second.status_code) == (201, 200)
    job_id = first.get_json()["job_id"]
    assert second.get_json()["job_id"] == job_id
    submit(client, "audio-normalization")  # no key: always new work

    client.get(f"/jobs/{job_id}/download")  # too early, not a fetch
    wait_status(client, job_id, "completed")
    client.get(f"/jobs/{job_id}/download")
    stats = client.get("/_emulator/stats").get_json()
    assert stats["submits"] == 2 and stats["submit_requests"] == 3
    assert stats["jobs"][job_id]["idempotency_key"] == "step-1"
    assert stats["jobs"][job_id]["status"] == "completed"
    assert stats["jobs"][job_id]["status_polls"] >= 1
    assert stats["jobs"][job_id]["result_fetches"] == 1


def test_status_faults_are_consumed_in_order(make_client: ClientFactory) -> None:
    client = make_client("video-downloader")
    job_id = submit(client, "video-downloader").get_json()["job_id"]
    set_faults(client, {"endpoint": "status", "kind": "404"}, {"endpoint": "status", "kind": "503", "times": 2})
    assert client.get(f"/jobs/{job_id}").get_json() == {"error": "injected 404"}
    assert [client.get(f"/jobs/{job_id}").status_code for _ in range(3)] == [503, 503, 200]
    assert client.get("/_emulator/faults").get_json()["faults"] == []


def test_submit_and_result_faults(make_client: ClientFactory) -> None:
    client = make_client("video-downloader")
    set_faults(client, {"endpoint": "submit", "kind": "500"}, {"endpoint": "submit", "kind": "400"},
               {"endpoint": "result", "kind": "500"}, {"endpoint": "health", "kind": "503"})
    failed = submit(client, "video-downloader", key="k")
    assert failed.status_code == 500 and failed.get_json() == {"error": "injected 500"}
    rejected = submit(client, "video-downloader", key="k")
    assert rejected.status_code == 400 and rejected.get_json() == {"error": "injected 400: bad request"}
    assert client.get("/_emulator/stats").get_json()["submit_requests"] == 0
    assert client.get("/health").status_code == 503
    job_id = submit(client, "video-downloader", key="k").get_json()["job_id"]
    wait_status(client, job_id, "completed")
    assert client.get(f"/jobs/{job_id}/download").status_code == 500
    assert client.get(f"/jobs/{job_id}/download").status_code == 200


def test_invalid_fault_plan_is_400(make_client: ClientFactory) -> None:
    client = make_client("audio-transcriber")
    bad = client.post("/_emulator/faults", json={"faults": [{"endpoint": "status", "kind": "418"}]})
    assert bad.status_code == 400 and "kind" in bad.get_json()["error"]


def test_drop_closes_connection_without_response(server: Callable[..., EmulatorServer]) -> None:
    srv = server("audio-transcriber")
    requests.post(f"{srv.url}/_emulator/faults", json={"faults": [
        {"endpoint": "health", "kind": "drop"}, {"endpoint": "submit", "kind": "drop"}]}, timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{srv.url}/health", timeout=5)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{srv.url}/jobs", files={"file": ("a.webm", b"x" * 100_000)}, timeout=5)
    assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200
    assert requests.get(f"{srv.url}/_emulator/stats", timeout=5).json()["submit_requests"] == 0


def test_hang_makes_client_time_out(server: Callable[..., EmulatorServer]) -> None:
    srv = server("video-downloader", hang_seconds=0.5)
    requests.post(f"{srv.url}/_emulator/faults", json={"faults": [{"endpoint": "submit", "kind": "hang"}]},
                  timeout=5)
    with pytest.raises(requests.Timeout):
        requests.post(f"{srv.url}/jobs", json={"url": URL}, headers={"Idempotency-Key": "a"}, timeout=0.1)
    # The hung request is still processed; a retry with the same key must not add work.
    time.sleep(0.6)
    retry = requests.post(f"{srv.url}/jobs", json={"url": URL}, headers={"Idempotency-Key": "a"}, timeout=5)
    assert retry.status_code == 200 and retry.json()["job_id"] == "dQw4w9WgXcQ_audio"
    assert requests.get(f"{srv.url}/_emulator/stats", timeout=5).json()["submits"] == 1


def test_latency_delays_answers(make_client: ClientFactory) -> None:
    client = make_client("audio-transcriber", latency=0.1)
    started = time.monotonic()
    client.get("/health")
    assert time.monotonic() - started >= 0.1


def test_never_finish(make_client: ClientFactory) -> None:
    client = make_client("audio-normalization")
    set_faults(client, job={"never_finish": True, "job_seconds": 0.05})
    job_id = submit(client, "audio-normalization").get_json()["job_id"]
    time.sleep(0.15)
    body = client.get(f"/jobs/{job_id}").get_json()
    assert body["status"] == "processing" and 0 < body["progress"] < 100
    assert client.get(f"/jobs/{job_id}/download").status_code == 409


def test_fail(make_client: ClientFactory) -> None:
    client = make_client("audio-transcriber")
    set_faults(client, job={"fail": "CUDA out of memory", "job_seconds": 0.2})
    job_id = submit(client, "audio-transcriber").get_json()["job_id"]
    assert client.get(f"/jobs/{job_id}").get_json()["status"] in ("queued", "processing")
    body = wait_status(client, job_id, "failed")
    assert body["error"] == "CUDA out of memory"
    assert client.get(f"/jobs/{job_id}/transcription").status_code == 409
    # Clearing the plan makes new jobs healthy again.
    client.delete("/_emulator/faults")
    healthy = submit(client, "audio-transcriber").get_json()["job_id"]
    wait_status(client, healthy, "completed")


def test_factory_reset_and_emulator_reset(make_client: ClientFactory) -> None:
    client = make_client("audio-normalization")
    done = submit(client, "audio-normalization", key="a").get_json()["job_id"]
    wait_status(client, done, "completed")
    set_faults(client, {"endpoint": "health", "kind": "500"}, job={"job_seconds": 10})
    submit(client, "audio-normalization")
    resp = client.post("/admin/factory-reset")
    assert resp.status_code == 200 and resp.get_json() == {"files_removed": 2, "tasks_purged": 1}
    assert client.get(f"/jobs/{done}").status_code == 404
    assert client.get("/_emulator/stats").get_json()["jobs"] == {}
    # Dropped keys no longer deduplicate.
    assert submit(client, "audio-normalization", key="a").status_code == 201

    client.post("/_emulator/reset")
    assert client.get("/_emulator/stats").get_json() == {"submits": 0, "submit_requests": 0, "jobs": {}}
    assert client.get("/health").status_code == 200  # fault plan cleared too


def test_server_context_manager_serves_and_stops() -> None:
    with EmulatorServer("video-downloader", job_seconds=JOB_SECONDS) as srv:
        assert srv.url.startswith("http://127.0.0.1:") and srv.port > 0
        assert requests.get(f"{srv.url}/health", timeout=5).json()["service"] == "video-downloader"
        url = srv.url
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/health", timeout=1)


def test_main_serves_all_services_until_sigterm() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "EMULATOR_JOB_SECONDS": "0.05"}
    with subprocess.Popen([sys.executable, "-m", "emulators.media", "--ports", "0,0,0"],
                          cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            urls = {}
            for _ in SERVICES:
                service, _, url = proc.stdout.readline().strip().partition(" listening on ")
                urls[service] = url
            assert set(urls) == set(SERVICES)
            for service, url in urls.items():
                assert requests.get(f"{url}/health", timeout=5).json()["service"] == service
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


def test_latency_switch_delays_service_answers_over_the_wire_until_cleared(server: Callable[..., EmulatorServer]) -> None:
    srv = server("video-downloader")
    assert requests.post(f"{srv.url}/_emulator/latency", json={"seconds": "slow"}, timeout=5).status_code == 400
    assert requests.post(f"{srv.url}/_emulator/latency", json={"seconds": 0.6}, timeout=5).json() == {"seconds": 0.6}
    t = time.monotonic()
    assert requests.get(f"{srv.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - t >= 0.6
    requests.post(f"{srv.url}/_emulator/latency", json={"seconds": None}, timeout=5)
    t = time.monotonic()
    requests.get(f"{srv.url}/health", timeout=5)
    assert time.monotonic() - t < 0.6


def test_effect_ledger_counts_one_job_per_stage_and_a_second_one_as_duplicated(
        make_client: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from emulators.effects import summary

    ledger = tmp_path / "effects.jsonl"
    monkeypatch.setenv("EMULATOR_EFFECTS_FILE", str(ledger))
    client = make_client("video-downloader")
    for key in ("wf1:download:0", "wf1:download:0", "wf2:download:0"):  # a retry reuses its job
        assert client.post("/jobs", json={"url": URL}, headers={"Idempotency-Key": key}).status_code in (200, 201)
    assert summary(str(ledger))["media_submit"] == {"effects": 2, "keys": 2, "duplicated": 0, "examples": {}}
    client.post("/jobs", json={"url": URL}, headers={"Idempotency-Key": "wf1:download:1"})  # a new job, same stage
    assert summary(str(ledger))["media_submit"]["duplicated"] == 1


RESULT_PATHS = {"video-downloader": "download", "audio-normalization": "download",
                "audio-transcriber": "transcription"}


def start_emulators(data: Path) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """`python -m emulators.media --data <data>` on free ports; jobs take no time unless a plan says so."""
    from orchestrator.entrypoints.ports import free_port

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "EMULATOR_JOB_SECONDS": "0"}
    ports = ",".join(str(free_port()) for _ in SERVICES)
    proc = subprocess.Popen([sys.executable, "-m", "emulators.media", "--ports", ports, "--data", str(data)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    urls = dict(proc.stdout.readline().strip().partition(" listening on ")[::2] for _ in SERVICES)
    assert set(urls) == set(SERVICES), urls
    return proc, urls


def post_job(url: str, service: str, key: str) -> requests.Response:
    headers = {"Idempotency-Key": key}
    if service == "video-downloader":
        return requests.post(f"{url}/jobs", json={"url": f"https://youtu.be/{key}"}, headers=headers, timeout=5)
    return requests.post(f"{url}/jobs", files={"file": ("in.webm", key.encode())}, headers=headers, timeout=5)


@pytest.mark.timeout(60)
def test_jobs_outlive_a_kill_9_of_the_emulators_with_a_data_dir(tmp_path: Path) -> None:
    running_seconds = 2.0
    proc, urls = start_emulators(tmp_path)
    done: dict[str, tuple[str, Any]] = {}
    running: dict[str, str] = {}
    try:
        for service, url in urls.items():
            job_id = post_job(url, service, "done").json()["job_id"]
            result = requests.get(f"{url}/jobs/{job_id}/{RESULT_PATHS[service]}", timeout=5)
            assert result.status_code == 200
            done[service] = (job_id, result.content)
            requests.post(f"{url}/_emulator/faults", json={"job": {"job_seconds": running_seconds}}, timeout=5)
            running[service] = post_job(url, service, "running").json()["job_id"]
            assert requests.get(f"{url}/jobs/{running[service]}", timeout=5).json()["status"] in ("queued",
                                                                                               "processing")
    finally:
        killed = time.monotonic()  # every job above was submitted before this
        proc.kill()  # SIGKILL: no chance to save anything on the way out
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()

    proc, urls = start_emulators(tmp_path)
    try:
        for service, url in urls.items():
            job_id, content = done[service]
            assert requests.get(f"{url}/jobs/{job_id}", timeout=5).json() == {
                "job_id": job_id, "status": "completed", "progress": 100.0, "error": None}
            assert requests.get(f"{url}/jobs/{job_id}/{RESULT_PATHS[service]}", timeout=5).content == content
            # A retried submit still finds its job by the idempotency key.
            again = post_job(url, service, "done")
            assert (again.status_code, again.json()["job_id"]) == (200, job_id)
            # The running job kept its start: its progress counts the time since its submit,
            # restart included (at least the time since the kill), not since the restart.
            floor = min(100.0, 100 * (time.monotonic() - killed) / running_seconds) - 1
            first = requests.get(f"{url}/jobs/{running[service]}", timeout=5).json()
            assert first["status"] in ("processing", "completed") and first["progress"] >= floor, first
        deadline = time.monotonic() + running_seconds + 5
        for service, url in urls.items():
            while (body := requests.get(f"{url}/jobs/{running[service]}", timeout=5).json())["status"] != "completed":
                assert time.monotonic() < deadline, body
                time.sleep(0.05)
            assert requests.get(f"{url}/jobs/{running[service]}/{RESULT_PATHS[service]}", timeout=5).status_code == 200
        assert requests.get(f"{urls['audio-normalization']}/jobs/nope", timeout=5).status_code == 404
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert proc.stdout is not None
        proc.stdout.close()
