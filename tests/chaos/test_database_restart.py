"""A step whose database connection is lost while it runs (PostgreSQL restarted mid-step) is
retried like any transient failure, not failed for good. Found by the fault-injection run
(bench/chaos): a media pipeline ended `failed` with "server closed the connection unexpectedly"
after a PostgreSQL restart. PostgreSQL here is a private instance (bench/chaos/services.py):
the shared one is never restarted."""
from __future__ import annotations

import shutil
import time
import tempfile
import uuid
from pathlib import Path

import requests
from conftest import AMQP, Process, _rabbitmqctl, wait_for

from bench.chaos.services import Postgres


def test_a_step_that_loses_its_database_connection_is_retried(env, emulators):
    from orchestrator import runtime
    from orchestrator.config import load_settings
    from orchestrator.migrate import upgrade
    from web import create_app

    root = Path(tempfile.mkdtemp(prefix="orch-pgrestart-"))
    root.chmod(0o755)  # PostgreSQL runs as its own user below it (pytest's tmp_path is private)
    pg = Postgres(root)
    pg.start()
    vhost = f"orch-pgrestart-{uuid.uuid4().hex[:8]}"
    assert _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    downloader = emulators["video-downloader"].url
    procs: list[Process] = []
    try:
        db = pg.create_database("steps")
        upgrade(db.replace("postgresql://", "postgresql+psycopg2://", 1))
        penv = {**env, "DATABASE_URL": db, "CELERY_BROKER_URL": f"{AMQP}/{vhost}", "VIDEO_DOWNLOADER_TIMEOUT": "10"}
        rt = runtime.build(load_settings(environ=penv, dotenv="/nonexistent"))
        procs = [Process("pg-worker", ["worker", "--concurrency", "2", "--name", f"pgr{uuid.uuid4().hex[:6]}@%h"],
                         penv).start(), Process("pg-sweeper", ["sweeper"], penv).start()]
        # The download's submit answers after 3 s: the step is inside its call when the
        # database restarts, and saves the remote job id on a connection that is gone.
        requests.post(f"{downloader}/_emulator/latency", json={"seconds": 3.0}, timeout=5)
        client = create_app(rt).test_client()
        r = client.post("/pipeline", json={"youtube_url": f"https://youtu.be/pgr{uuid.uuid4().hex[:8]}"})
        assert r.status_code == 200, r.get_json()
        job_id = r.get_json()["job_id"]
        before = requests.get(f"{downloader}/_emulator/stats", timeout=5).json()["submit_requests"]
        wait_for(lambda: any(s["name"] == "download" and s["status"] == "queued"
                             for s in client.get(f"/sagas/{job_id}").get_json()["steps"]),
                 timeout=60, what="the download step to be dispatched")
        time.sleep(1.5)  # the worker has claimed it and waits for the submit's answer
        # What a restart does to the worker's pooled connections, while the server stays up:
        # every one of them is closed under it.
        import psycopg2

        with psycopg2.connect(db) as admin:
            admin.cursor().execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                   "WHERE datname = 'steps' AND pid <> pg_backend_pid()")
        rt.db.dispose()
        wait_for(lambda: requests.get(f"{downloader}/_emulator/stats", timeout=5).json()["submit_requests"] > before,
                 timeout=30, what="the submit to be answered")
        requests.post(f"{downloader}/_emulator/latency", json={"seconds": None}, timeout=5)
        def finished() -> dict | None:
            r = client.get(f"/jobs/{job_id}")  # the first answers after the restart may be 503
            return r.get_json() if r.status_code == 200 and r.get_json()["status"] in ("completed", "failed") else None

        job = wait_for(finished, timeout=90, interval=0.5, what="the pipeline")
        assert job["status"] == "completed", job
    finally:
        requests.post(f"{downloader}/_emulator/latency", json={"seconds": None}, timeout=5)
        for p in procs:
            p.stop()
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)
        _rabbitmqctl("delete_vhost", vhost)
