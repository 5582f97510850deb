"""The media pipeline of seed 004 through HTTP, with emulated microservices."""
from __future__ import annotations

import os
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import emulator_stats, wait_for

ADMIN = {"X-Admin-Token": "test-admin-token"}  # /admin/* needs it

STAGES = ("download", "normalization", "transcription")


def url(video: str | None = None) -> str:
    return f"https://www.youtube.com/watch?v={video or uuid.uuid4().hex[:11]}"


def submit(client, **body):
    body.setdefault("youtube_url", url())
    r = client.post("/pipeline", json=body)
    assert r.status_code == 200, r.json
    return r.json


def wait_job(client, job_id: str, timeout: float = 30) -> dict:
    def check():
        job = client.get(f"/jobs/{job_id}").json
        return job if job["status"] in ("completed", "failed", "cancelled") else None

    return wait_for(check, timeout=timeout, what=f"job {job_id} to finish")


def jobs_for(emulators, service: str, prefix: str) -> dict:
    return {k: v for k, v in emulator_stats(emulators, service)["jobs"].items()
            if (v["idempotency_key"] or "").startswith(prefix)}


def test_happy_path_shapes(client, worker, sweeper, emulators):
    video = f"v{uuid.uuid4().hex[:8]}"
    started = submit(client, youtube_url=url(video), language="pt")
    assert list(started) == ["job_id", "status", "message", "youtube_url", "overall_progress"]
    assert started["status"] == "queued" and started["overall_progress"] == 0.0
    assert started["youtube_url"] == url(video)
    job = wait_job(client, started["job_id"])
    assert job["status"] == "completed", job
    assert set(job) >= {"job_id", "youtube_url", "status", "overall_progress", "created_at", "updated_at",
                        "completed_at", "stages", "transcription_text", "transcription_segments",
                        "transcription_file", "audio_file"}
    assert job["overall_progress"] == 100.0 and job["completed_at"]
    assert list(job["stages"]) == list(STAGES)
    for name, stage in job["stages"].items():
        assert stage["status"] == "completed" and stage["progress"] == 100.0, (name, stage)
        assert stage["started_at"] and stage["completed_at"]
    assert job["stages"]["download"]["job_id"] == f"{video}_audio"
    assert job["stages"]["normalization"]["job_id"].startswith("norm_")
    assert job["stages"]["transcription"]["job_id"].startswith("trans_")
    assert job["transcription_text"] and job["transcription_file"] == "transcription.srt"
    assert job["audio_file"] == "audio_normalized.webm"
    seg = job["transcription_segments"][0]
    assert set(seg) == {"text", "start", "end", "duration"} and seg["end"] - seg["start"] == seg["duration"]
    # the normaliser got the downloader's bytes and the default options
    norm = jobs_for(emulators, "audio-normalization", started["job_id"])
    assert len(norm) == 1
    # listing and history
    listing = client.get("/jobs?limit=5").json
    assert set(listing) == {"total", "jobs"} and listing["total"] >= 1
    row = next(j for j in listing["jobs"] if j["job_id"] == started["job_id"])
    assert set(row) == {"job_id", "youtube_url", "status", "progress", "created_at", "updated_at"}
    assert row["status"] == "completed" and row["progress"] == 100.0
    saga = client.get(f"/sagas/{started['job_id']}").json
    assert [h["event"] for h in saga["history"]] == ["create", "start", "downloaded", "normalized", "transcribed"]
    assert [s["name"] for s in saga["steps"]] == list(STAGES)


def test_a_cancelled_job_shows_only_documented_stage_statuses(client):
    """A cancelled job's stage reads `cancelled`, which the README did not list among the stage
    statuses; the job reads `cancelled` alike in /jobs/<id> and /jobs."""
    import re
    from pathlib import Path

    from web.media import STAGE_STATUSES

    readme = Path(__file__).resolve().parents[2].joinpath("README.md").read_text()
    listed = re.search(r"Stage statuses are ((?:`\w+`,?\s*)+)", readme)
    assert listed, "the README lists the stage statuses"
    documented = set(re.findall(r"`(\w+)`", listed.group(1)))
    assert documented == set(STAGE_STATUSES), documented
    started = submit(client)  # no worker: the download step waits queued
    r = client.post(f"/sagas/{started['job_id']}/cancel")
    assert r.status_code == 200, r.json
    job = client.get(f"/jobs/{started['job_id']}").json
    assert job["status"] == "cancelled" and job["completed_at"] is None
    assert {name: stage["status"] for name, stage in job["stages"].items()} == {
        "download": "cancelled", "normalization": "pending", "transcription": "pending"}
    assert {stage["status"] for stage in job["stages"].values()} <= documented
    row = next(j for j in client.get("/jobs?limit=50").json["jobs"] if j["job_id"] == started["job_id"])
    assert row["status"] == "cancelled"


def test_5xx_then_success_retries_without_duplicate_jobs(client, worker, sweeper, faults, emulators):
    faults("video-downloader", [{"endpoint": "submit", "kind": "500", "times": 2}])
    faults("audio-transcriber", [{"endpoint": "status", "kind": "503", "times": 1}])
    job = wait_job(client, submit(client)["job_id"])
    assert job["status"] == "completed", job
    saga = client.get(f"/sagas/{job['job_id']}").json
    download = next(s for s in saga["steps"] if s["name"] == "download")
    assert download["attempt"] == 3  # two failed submits, then success
    # the failed attempts' error is gone with the success: the job failed at nothing, and the
    # error filter does not list it among the failures
    assert download["error"] is None and job["stages"]["download"].get("error") is None, (download, job)
    listed = client.get("/sagas?type=media&error=injected&limit=200").json["items"]
    assert job["job_id"] not in [i["id"] for i in listed]
    assert len(jobs_for(emulators, "video-downloader", job["job_id"])) == 1
    assert len(jobs_for(emulators, "audio-transcriber", job["job_id"])) == 1


def test_4xx_fails_the_stage_at_once_with_the_service_message(client, worker, sweeper, faults, emulators):
    faults("audio-normalization", [{"endpoint": "submit", "kind": "400", "times": 1}])
    before = emulator_stats(emulators, "audio-normalization")["submit_requests"]
    job = wait_job(client, submit(client)["job_id"])
    assert job["status"] == "failed"
    stage = job["stages"]["normalization"]
    assert stage["status"] == "failed" and "injected 400" in stage["error"]
    assert stage["started_at"] and stage["started_at"] <= job["updated_at"], stage  # it ran, up to its failure
    assert "injected 400" in job["error"]
    assert job["stages"]["transcription"]["status"] == "pending"
    # one request, no retry (the fault consumed it, so nothing was accepted either)
    assert emulator_stats(emulators, "audio-normalization")["submit_requests"] == before
    assert client.get(f"/sagas/{job['job_id']}").json["steps"][1]["attempt"] == 1
    # a newcomer restarts the failed stage and it completes
    r = client.post(f"/sagas/{job['job_id']}/restart?step=normalization")
    assert r.status_code == 200
    job = wait_job(client, job["job_id"])
    assert job["status"] == "completed" and job["stages"]["normalization"]["attempt"] == 2
    assert "error" not in job


def test_connection_drop_and_hang_are_retried(client, worker, sweeper, faults):
    faults("video-downloader", [{"endpoint": "status", "kind": "drop", "times": 1}])
    faults("audio-normalization", [{"endpoint": "status", "kind": "hang", "times": 1}])  # 3 s > timeout 2 s
    job = wait_job(client, submit(client)["job_id"], timeout=40)
    assert job["status"] == "completed", job


def test_retries_exhausted_fail_the_stage(client, worker, sweeper, faults):
    faults("video-downloader", [{"endpoint": "submit", "kind": "503", "times": 10}])
    job = wait_job(client, submit(client)["job_id"])
    assert job["status"] == "failed"
    assert "503" in job["stages"]["download"]["error"]
    assert client.get(f"/sagas/{job['job_id']}").json["steps"][0]["attempt"] == 4  # 1 + HTTP_MAX_RETRIES


def test_remote_job_failure_fails_the_stage(client, worker, sweeper, faults):
    faults("audio-transcriber", job={"fail": "model exploded"})
    job = wait_job(client, submit(client)["job_id"])
    assert job["status"] == "failed" and "model exploded" in job["stages"]["transcription"]["error"]


def test_a_service_answering_text_that_cannot_be_stored_fails_the_stage_visibly(client, worker, sweeper, faults):
    faults("audio-transcriber", job={"fail": "model\u0000exploded"})
    job = wait_job(client, submit(client)["job_id"])
    assert job["status"] == "failed", job
    error = job["stages"]["transcription"]["error"]
    assert "error: contains a NUL character" in error and "\x00" not in error, error


def test_poll_exhaustion(client, worker, sweeper, faults):
    faults("video-downloader", job={"never_finish": True})
    job = wait_job(client, submit(client)["job_id"], timeout=30)
    assert job["status"] == "failed"
    assert "not finished after 15 polls" in job["stages"]["download"]["error"]
    assert client.get(f"/sagas/{job['job_id']}").json["steps"][0]["polls"] == 14


def test_job_timeout(client, rt, worker, sweeper, faults):
    from orchestrator.config import load_settings
    from orchestrator.engine import Engine

    faults("video-downloader", job={"never_finish": True})
    short = load_settings(environ={**rt.settings.variables, "JOB_TIMEOUT_MINUTES": "0.02", "MAX_POLL_ATTEMPTS": "1000"},
                          dotenv=os.devnull)
    engine = Engine(short, rt.sessions, rt.engine.registry, relay=rt.relay)
    snap, _ = engine.start("media", {"youtube_url": url()})
    job = wait_job(client, snap["id"], timeout=20)
    assert job["status"] == "failed" and "timed out" in job["error"]
    assert job["stages"]["download"]["status"] == "failed"


def test_idempotency_key_and_cache(client, worker, sweeper):
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    body = {"youtube_url": url()}
    a = client.post("/pipeline", json=body, headers=key).json
    b = client.post("/pipeline", json=body, headers=key).json
    assert a["job_id"] == b["job_id"]
    other = client.post("/pipeline", json={"youtube_url": url()}, headers=key)
    assert other.status_code == 409 and other.json["field"] == "Idempotency-Key"
    wait_job(client, a["job_id"])
    # the same request within CACHE_TTL_HOURS reuses the finished result
    again = client.post("/pipeline", json=body).json
    assert again["job_id"] == a["job_id"] and again["status"] == "completed"
    assert again["overall_progress"] == 100.0
    # different options are a different request
    assert client.post("/pipeline", json={**body, "isolate_vocals": True}).json["job_id"] != a["job_id"]
    # a request that names itself is not answered from the cache: its header is then known as used
    # (the cached job held another, so the same header with another URL made a new job)
    named = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    fresh = client.post("/pipeline", json=body, headers=named).json
    assert fresh["job_id"] != a["job_id"]
    reused = client.post("/pipeline", json={"youtube_url": url()}, headers=named)
    assert reused.status_code == 409 and reused.json["field"] == "Idempotency-Key", reused.json
    # and a business key is kept (the cached job's key is null)
    keyed = client.post("/saga", json={"type": "media", "key": f"k-{uuid.uuid4().hex[:8]}", "input": body})
    assert keyed.status_code == 201 and keyed.json["id"] != a["job_id"] and keyed.json["key"], keyed.json


def test_fifty_concurrent_pipelines(client, app, worker, sweeper):
    videos = [f"c{i:02d}{uuid.uuid4().hex[:6]}" for i in range(50)]
    local = threading.local()

    def go(video: str) -> tuple[str, str]:
        if not hasattr(local, "client"):
            local.client = app.test_client()
        r = local.client.post("/pipeline", json={"youtube_url": url(video)})
        assert r.status_code == 200, r.json
        return video, r.json["job_id"]

    with ThreadPoolExecutor(8) as pool:
        started = list(pool.map(go, videos))
    assert len({j for _, j in started}) == 50
    texts = set()
    for video, job_id in started:
        job = wait_job(client, job_id, timeout=120)
        assert job["status"] == "completed", job
        assert job["youtube_url"] == url(video)
        assert job["stages"]["download"]["job_id"] == f"{video}_audio"
        texts.add(job["transcription_text"])
    assert len(texts) == 50  # every job got its own result


@pytest.mark.parametrize("body, field", [
    ({}, "youtube_url"),
    ({"youtube_url": 5}, "youtube_url"),
    ({"youtube_url": "not a url"}, "youtube_url"),
    ({"youtube_url": "ftp://x.org/a"}, "youtube_url"),
    ({"youtube_url": url(), "language": 3}, "language"),
    ({"youtube_url": url(), "language": ""}, "language"),
    ({"youtube_url": url(), "language_out": ["en"]}, "language_out"),
    ({"youtube_url": url(), "remove_noise": "yes"}, "remove_noise"),
    ({"youtube_url": url(), "convert_to_mono": 1}, "convert_to_mono"),
    ({"youtube_url": url(), "apply_highpass_filter": "false"}, "apply_highpass_filter"),
    ({"youtube_url": url(), "language_out": None, "isolate_vocals": "x"}, "isolate_vocals"),
    ({"youtube_url": url(), "convert_to_mono": None}, "convert_to_mono"),
    ({"youtube_url": url(), "colour": "blue"}, "colour"),
    ([], "body"),
])
def test_bad_pipeline_input(client, body, field):
    r = client.post("/pipeline", json=body)
    assert r.status_code == 400, r.json
    assert r.json["field"] == field and r.json["message"].startswith(field)


@pytest.mark.parametrize("field, value, reason", [
    ("youtube_url", "https://youtu.be/" + "x" * 2100, "is too long: 2117 characters, at most 2048"),
    ("youtube_url", "https://youtu.be/x y", "contains a whitespace or control character (U+0020 at position 18)"),
    ("youtube_url", "https://youtu.be/x\u2028y", "contains a whitespace or control character (U+2028 at position 18)"),
    ("youtube_url", "https://youtu.be/\tx", "contains a whitespace or control character (U+0009 at position 17)"),
    ("youtube_url", "https://youtu.be/x\u0085", "contains a whitespace or control character (U+0085 at position 18)"),
    ("youtube_url", "https://youtu.be/x\u200by", "contains a whitespace or control character (U+200B at position 18)"),
    ("youtube_url", "https://:80/x", "must be an http/https URL with a host"),
    # a port the downloader cannot connect to, and a password that /jobs and the console would show
    ("youtube_url", "https://ex.com:99999/", "has an invalid port: it must be a number from 1 to 65535"),
    ("youtube_url", "https://ex.com:abc/", "has an invalid port"),
    ("youtube_url", "https://ex.com:0/", "has an invalid port"),
    # hosts nobody can connect to: accepted, then failed at the downloader
    ("youtube_url", "https://%zz/", "has an invalid host"),
    ("youtube_url", "https://[v1.x]/", "has an invalid host"),
    ("youtube_url", "https://ex$ample.com/", "has an invalid host"),
    ("youtube_url", "https://user:pass@ex.com/", "must not contain credentials"),
    ("youtube_url", "https://user@ex.com/", "must not contain credentials"),
    ("language", "xx-not-lang-\u221e", "must be a language code such as 'auto', 'en' or 'pt-BR'"),
    ("language", "pt\u0085", "must be a language code"),
    ("language", "english", "must be a language code"),
    ("language", "pt-BR-x-" + "a" * 20, "is too long"),
    ("language_out", "en\u2028", "must be a language code"),
    ("language_out", "", "must be a language code"),
])
def test_pipeline_input_names_the_field_and_why(client, field, value, reason):
    """A URL or language the services downstream would fail on is refused at once, saying why:
    these were accepted (and failed at the downloader or transcriber), or called a too long URL
    not an http(s) URL."""
    body = {"youtube_url": url(), field: value}
    r = client.post("/pipeline", json=body)
    assert r.status_code == 400, r.json
    assert r.json["field"] == field and r.json["message"].startswith(f"{field}: {reason}"), r.json
    assert "@" not in value or value not in r.get_data(as_text=True)  # a refused password is not echoed


@pytest.mark.parametrize("value", ["https://u:secret@youtu.be/x", "https://youtu.be:65536/x"])
def test_a_bad_youtube_url_is_refused_as_saga_input_too(client, value):
    r = client.post("/saga", json={"type": "media", "input": {"youtube_url": value}})
    assert r.status_code == 400 and r.json["field"] == "input.youtube_url", r.json
    assert "secret" not in r.get_data(as_text=True)


@pytest.mark.parametrize("path, raw, field", [
    ("/pipeline", '{"youtube_url": "https://youtu.be/x", "youtube_url": "https://other.example/"}', "youtube_url"),
    ("/saga", '{"type": "media", "input": {"youtube_url": "https://youtu.be/x", "language": "en", '
              '"youtube_url": "https://other.example/"}}', "input.youtube_url"),
])
def test_a_key_sent_twice_is_refused_naming_it(client, path, raw, field):
    """A JSON parser keeps the last of the two: the job ran on a URL the client may not have meant."""
    r = client.post(path, data=raw, content_type="application/json")
    assert r.status_code == 400, r.json
    assert r.json["field"] == field and r.json["message"] == f"{field}: appears twice in an object", r.json


@pytest.mark.parametrize("language, language_out", [("auto", None), ("pt", None), ("en", "pt-BR"),
                                                    ("pt-BR", "en"), ("zh-Hant", "auto")])
def test_the_seeds_language_values_are_accepted(client, language, language_out):
    """The seed's request sends `"language": "auto", "language_out": null`; codes such as en and
    pt-BR are taken as they are."""
    r = client.post("/pipeline", json={"youtube_url": url(), "language": language, "language_out": language_out})
    assert r.status_code == 200, r.json


@pytest.mark.parametrize("body, field", [
    ({}, "input.youtube_url"),
    ({"youtube_url": 5}, "input.youtube_url"),
    ({"youtube_url": url(), "language": 3}, "input.language"),
    ({"youtube_url": url(), "bogus": 1}, "input.bogus"),
    ({"youtube_url": url(), "remove_noise": "yes"}, "input.remove_noise"),
    ([], "input"),
    ("x", "input"),
])
@pytest.mark.parametrize("path", ["/saga", "/saga/media"])
def test_bad_input_through_the_generic_start_is_named_inside_input(client, path, body, field):
    r = client.post(path, json={"type": "media", "input": body} if path == "/saga" else {"input": body})
    assert r.status_code == 400, r.json
    assert r.json["error"] == "invalid_input" and r.json["field"] == field, r.json
    assert r.json["message"].startswith(field + ":"), r.json


def test_bad_requests_never_500(client):
    assert client.post("/pipeline", data="{", content_type="application/json").json["field"] == "body"
    assert client.post("/pipeline").status_code == 400
    assert client.get("/jobs/nope").status_code == 404
    assert client.get("/jobs?limit=x").json["field"] == "limit"
    assert client.post("/admin/cleanup?max_age_hours=soon", headers=ADMIN).json["field"] == "max_age_hours"
    assert client.post("/admin/cleanup?deep=maybe", headers=ADMIN).json["field"] == "deep"
    assert client.get("/nothing-here").status_code == 404


def test_health_stats_and_admin(client, worker, sweeper, emulators):
    h = client.get("/health").json
    assert h["status"] == "healthy" and h["service"] == "ytcaption-orchestrator"
    assert h["microservices"] == {s: "healthy" for s in ("video-downloader", "audio-normalization",
                                                          "audio-transcriber")}
    stats = client.get("/admin/stats", headers=ADMIN).json
    assert set(stats) == {"orchestrator", "redis", "settings"}
    assert set(stats["redis"]) >= {"total_jobs", "active_jobs", "completed_jobs", "memory_usage"}
    assert stats["settings"] == {"cache_ttl_hours": 24.0, "job_timeout_minutes": 60.0, "poll_interval": 0.2,
                                 "max_poll_attempts": 15}
    cleaned = client.post("/admin/cleanup?max_age_hours=0&deep=true", headers=ADMIN).json
    assert cleaned["message"] and cleaned["logs_cleaned"] is True and cleaned["jobs_removed"] >= 0
    assert client.post("/admin/factory-reset").status_code == 401
    assert client.post("/admin/factory-reset", headers={"X-Admin-Token": "wrong"}).status_code == 403
    r = client.post("/admin/factory-reset", headers=ADMIN)
    assert r.status_code == 200
    assert set(r.json["microservices"]) == {"video-downloader", "audio-normalization", "audio-transcriber"}
    assert all(v["status"] == "success" for v in r.json["microservices"].values())
    assert client.get("/admin/stats", headers=ADMIN).json["redis"]["total_jobs"] == 0


def test_status_never_goes_back_while_a_slow_download_runs(client, worker, sweeper, faults):
    """A polling step is `queued` again before each poll: the job and its stage must still read
    as started (seed 004: processing until the stage completes or fails)."""
    faults("video-downloader", job={"job_seconds": 2})  # about 10 of its 15 polls
    job_id = submit(client)["job_id"]
    samples: list[tuple[str, str, float]] = []

    def sample():
        job = client.get(f"/jobs/{job_id}").json
        samples.append((job["status"], job["stages"]["download"]["status"], job["stages"]["download"]["progress"]))
        return job["stages"]["download"]["status"] in ("completed", "failed")

    wait_for(sample, timeout=30, interval=0.01, what="the download to finish")
    assert samples[-1][1] == "completed", samples[-1]
    midway = [s for s in samples if 0 < s[2] < 100]
    assert midway, "no sample while the download was under way"
    rank = {"queued": 0, "pending": 0, "processing": 1, "downloading": 1, "completed": 2}
    for before, after in zip(samples, samples[1:]):
        assert rank.get(after[0], 1) >= rank.get(before[0], 1), (before, after)  # the job's status
        assert rank[after[1]] >= rank[before[1]], (before, after)  # the download stage's status
    assert all(s[1] == "processing" and s[0] != "queued" for s in midway)


def test_a_language_code_is_kept_in_its_usual_case(client):
    """BCP 47 tags are the same in any case: `EN` and `en` started two jobs for one request.
    Now the stored input holds the usual case (`en`, `pt-BR`, `zh-Hant-TW`)."""
    r = client.post("/pipeline", json={"youtube_url": url(), "language": "EN", "language_out": "zh-hant-tw"})
    assert r.status_code == 200, r.json
    given = client.get(f"/sagas/{r.json['job_id']}").json["context"]["input"]
    assert (given["language"], given["language_out"]) == ("en", "zh-Hant-TW"), given
    assert client.post("/pipeline", json={"youtube_url": url(), "language": "pt-br"}).status_code == 200
