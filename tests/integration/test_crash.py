"""Crashes: a worker killed mid-step, and a process that dies between commit and publish."""
from __future__ import annotations

import subprocess
import sys
import textwrap
import time
import uuid

from conftest import ROOT, emulator_stats, start_worker, wait_for


def wait_job(client, job_id, timeout=60):
    return wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
        client.get(f"/jobs/{job_id}").json), timeout=timeout, what=f"job {job_id}")


def test_worker_killed_mid_step_then_a_new_worker_completes(client, rt, env, sweeper, faults, emulators):
    # The normaliser hangs 3 s on submit (then creates the job anyway); the worker dies meanwhile.
    victim = start_worker(env, rt, f"victim{uuid.uuid4().hex[:4]}", concurrency=1)
    try:
        faults("audio-normalization", [{"endpoint": "submit", "kind": "hang", "times": 1}])
        job_id = client.post("/pipeline", json={"youtube_url": f"https://youtu.be/k{uuid.uuid4().hex[:8]}"}).json["job_id"]
        wait_for(lambda: client.get(f"/jobs/{job_id}").json["stages"]["download"]["status"] == "completed",
                 timeout=20, what="download to complete")
        time.sleep(1.0)  # the normalization task is now inside its 3 s submit
        assert client.get(f"/jobs/{job_id}").json["stages"]["normalization"]["job_id"] is None
        victim.kill()
    finally:
        victim.kill()
    rescuer = start_worker(env, rt, f"rescuer{uuid.uuid4().hex[:4]}")
    try:
        job = wait_job(client, job_id)
    finally:
        rescuer.stop()
    assert job["status"] == "completed", job
    norm = {k: v for k, v in emulator_stats(emulators, "audio-normalization")["jobs"].items()
            if v["idempotency_key"].startswith(job_id)}
    assert len(norm) == 1, norm  # the redelivered step reused the job the dead worker had created


RELAY_CRASH = textwrap.dedent("""
    import os, sys
    from orchestrator import runtime
    from orchestrator.config import load_settings
    rt = runtime.build(load_settings())
    mode = sys.argv[1]
    if mode == "before_publish":
        rt.engine.relay = lambda ids: os._exit(17)          # committed, never published
    else:
        publish = rt.relay.publishers["celery"]
        def publish_then_die(row):
            publish(row)
            os._exit(17)                                     # published, never marked sent
        rt.relay.publishers["celery"] = publish_then_die
    snap, _ = rt.engine.start("media", {"youtube_url": sys.argv[2]})
    print(snap["id"])
""")


def _start_in_dying_process(env, mode: str, video_url: str) -> None:
    proc = subprocess.run([sys.executable, "-c", RELAY_CRASH, mode, video_url], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 17, proc.stderr


def _job_by_url(client, video_url: str) -> str:
    return wait_for(lambda: next((j["job_id"] for j in client.get("/jobs?limit=1000").json["jobs"]
                                  if j["youtube_url"] == video_url), None), what="the job to exist")


def test_death_between_commit_and_publish_is_recovered_by_the_sweeper(client, env, worker, sweeper, emulators):
    video_url = f"https://www.youtube.com/watch?v=r{uuid.uuid4().hex[:8]}"
    _start_in_dying_process(env, "before_publish", video_url)
    job = wait_job(client, _job_by_url(client, video_url))
    assert job["status"] == "completed"


def test_death_between_publish_and_mark_has_one_effect(client, env, worker, sweeper, emulators):
    video_url = f"https://www.youtube.com/watch?v=d{uuid.uuid4().hex[:8]}"
    _start_in_dying_process(env, "after_publish", video_url)
    job_id = _job_by_url(client, video_url)
    job = wait_job(client, job_id)
    assert job["status"] == "completed"
    # the message went out twice (the sweeper re-sent the unmarked row) but had one effect
    downloads = {k: v for k, v in emulator_stats(emulators, "video-downloader")["jobs"].items()
                 if v["idempotency_key"].startswith(job_id)}
    assert len(downloads) == 1
    saga = client.get(f"/sagas/{job_id}").json
    assert [h["event"] for h in saga["history"]] == ["create", "start", "downloaded", "normalized", "transcribed"]
