"""Graceful start and stop of real processes started from the CLI.

- A worker, a sweeper and the calculation-results consumer started while PostgreSQL, RabbitMQ and
  Redis cannot be reached wait, logging what they wait for (address, password masked), instead of
  exiting; once the services answer they work: a pipeline completes through them.
- The API answers /healthz at once and /readyz 503 naming what is down until then, 200 after.
- A worker stopped with SIGTERM in the middle of a step lets the step finish: its effect (a submit
  to the service) happens once, and the workflow completes after a new worker starts.

The services "come up late" through a TCP forwarder (tests/tcp_proxy.py) on a port where nothing
listens until it is switched on: the shared servers are never stopped."""
from __future__ import annotations

import os
import signal
import time
import uuid
from typing import Any
from urllib.parse import urlparse

import psutil
import pytest
import requests
from conftest import Process, embedded, start_worker, wait_for
from orchestrator.entrypoints.ports import free_port
from tcp_proxy import Proxy

from orchestrator.entrypoints.cli import SHUTDOWN_SIGNAL_WINDOW

#: A password the shared PostgreSQL (trust) ignores, to see that it is never shown.
DB_PASSWORD = "db-pass-9f3k2q7z"


def behind_proxies(env: dict[str, str]) -> tuple[dict[str, str], dict[str, Proxy]]:
    """`env` with the database, broker and Redis reached through proxies that are off."""
    proxies: dict[str, Proxy] = {}
    out = dict(env)
    for name, var in (("database", "DATABASE_URL"), ("broker", "CELERY_BROKER_URL"), ("redis", "REDIS_URL")):
        url = urlparse(env[var])
        proxy = proxies[name] = Proxy(url.hostname or "127.0.0.1", url.port or {"database": 5432, "broker": 5672,
                                                                                "redis": 6379}[name])
        netloc = f"{url.username or ''}{':' + url.password if url.password else ''}{'@' if url.username else ''}"
        if name == "database":
            netloc = f"{url.username}:{DB_PASSWORD}@"
        out[var] = url._replace(netloc=f"{netloc}127.0.0.1:{proxy.port}").geturl()
    out["CELERY_RESULT_BACKEND"] = out["REDIS_URL"]
    return out, proxies


def test_processes_started_before_the_services_wait_for_them(env, rt, client, sweeper):
    late, proxies = behind_proxies(env)
    name = f"late{uuid.uuid4().hex[:6]}"
    procs = {
        "worker": Process(name, ["worker", "--concurrency", "2", "--name", f"{name}@%h"], late).start(),
        "sweeper": Process("sweeper-late", ["sweeper"], late).start(),
        "calc-results": Process("calc-late", ["calc-results"], late).start(),
    }
    try:
        db_address = f"127.0.0.1:{proxies['database'].port}"
        for role, proc in procs.items():
            wait_for(lambda: "waiting for the database at" in proc.output(), timeout=60,
                     what=f"the {role} to say it waits for the database")
        # well past the first tries: still alive and still waiting, never exited
        wait_for(lambda: all(p.output().count("waiting for the database") >= 3 for p in procs.values()),
                 timeout=30, what="repeated tries")
        for role, proc in procs.items():
            assert proc.proc.poll() is None, (role, proc.output()[-2000:])
            out = proc.output()
            assert db_address in out and DB_PASSWORD not in out, out[-2000:]
            assert "Traceback" not in out, out[-2000:]
        proxies["database"].start()
        for role, proc in procs.items():
            wait_for(lambda: "waiting for the broker at" in proc.output(), timeout=60,
                     what=f"the {role} to wait for the broker next")
            assert "amqp://guest:***@" in proc.output() and "guest:guest" not in proc.output()
        proxies["broker"].start()
        proxies["redis"].start()
        wait_for(lambda: any(k.startswith(f"{name}@") for r in rt.celery.control.ping(timeout=0.5) for k in r),
                 timeout=60, what="the late worker to answer ping")
        # The late worker runs a pipeline (the session's sweeper publishes its steps).
        job = client.post("/pipeline", json={"youtube_url": f"https://www.youtube.com/watch?v={uuid.uuid4().hex[:11]}"})
        assert job.status_code == 200, job.json
        done = wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
            client.get(f"/jobs/{job.json['job_id']}").json), timeout=90, what="the pipeline")
        assert done["status"] == "completed", done
        for role, proc in procs.items():
            assert proc.proc.poll() is None, (role, proc.output()[-2000:])
            assert "answers after" in proc.output(), (role, proc.output()[-2000:])
    finally:
        for proc in procs.values():
            proc.stop()
        for proxy in proxies.values():
            proxy.stop()


def test_a_process_waiting_for_the_services_stops_cleanly_on_sigterm(env):
    late, proxies = behind_proxies(env)
    proc = Process("sweeper-stop", ["sweeper"], late).start()
    wait_for(lambda: "waiting for the database" in proc.output(), timeout=60, what="the wait")
    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(30) == 0, proc.output()[-2000:]


def test_a_process_started_before_the_migrations_waits_for_the_schema(env, tmp_path):
    """A sweeper started on a database nobody migrated logged "no such table" on every pass;
    it now waits, naming the command that fixes it, and goes on once the schema is there."""
    import subprocess
    import sys

    from conftest import ROOT, embedded

    fresh = {**env, **embedded(tmp_path), "LOG_LEVEL": "INFO"}
    proc = Process("sweeper-unmigrated", ["sweeper"], fresh).start()
    try:
        wait_for(lambda: "waiting for the database schema" in proc.output(), timeout=60, what="the wait")
        assert "run `orchestrator db upgrade`" in proc.output(), proc.output()[-2000:]
        out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "db", "upgrade"], env=fresh,
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: "the database schema at" in proc.output() and "answers after" in proc.output(),
                 timeout=60, what="the sweeper to go on")
        assert proc.proc.poll() is None and "no such table" not in proc.output(), proc.output()[-2000:]
    finally:
        proc.stop()


def test_startup_wait_seconds_bounds_the_wait(env):
    late, _ = behind_proxies(env)
    proc = Process("sweeper-bounded", ["sweeper"], {**late, "STARTUP_WAIT_SECONDS": "2"}).start()
    assert proc.proc.wait(60) != 0
    out = proc.output()
    # named by the variable that points at the database, the wait's own setting said as the other way out
    assert "configuration error: DATABASE_URL: the database at" in out and DB_PASSWORD not in out, out[-2000:]
    assert "STARTUP_WAIT_SECONDS sets how long" in out, out[-2000:]


def test_readyz_names_what_is_down_until_it_answers(env):
    late, proxies = behind_proxies(env)
    port = free_port()
    api = Process("api-late", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"], late).start()
    base = f"http://127.0.0.1:{port}"
    try:
        def live() -> bool:
            try:
                return requests.get(f"{base}/healthz", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        wait_for(live, timeout=60, interval=0.2, what="the API to answer /healthz")
        r = requests.get(f"{base}/readyz", timeout=30)
        assert r.status_code == 503, r.text
        body = r.json()
        assert set(body["down"]) == {"database", "broker", "result_backend", "redis"}, body
        assert body["dependencies"]["database"]["address"] == \
            f"postgresql+psycopg2://postgres:***@127.0.0.1:{proxies['database'].port}/{urlparse(env['DATABASE_URL']).path[1:]}"
        assert DB_PASSWORD not in r.text and "guest:guest" not in r.text
        # the chat listener inside the API waits for Redis too, logging it, and the API lives on
        wait_for(lambda: "callback consumer: Redis unavailable" in api.output(), timeout=30,
                 what="the chat listener to log the wait")
        proxies["database"].start()
        r = requests.get(f"{base}/readyz", timeout=30)
        assert r.status_code == 503 and "database" not in r.json()["down"] and "broker" in r.json()["down"], r.text
        proxies["broker"].start()
        proxies["redis"].start()
        r = wait_for(lambda: (lambda a: a if a.status_code == 200 else None)(requests.get(f"{base}/readyz", timeout=30)),
                     timeout=60, what="ready")
        assert r.json()["status"] == "ready" and r.json()["down"] == []
        proxies["redis"].stop()  # Redis goes away again: not ready, still alive
        r = requests.get(f"{base}/readyz", timeout=30)
        assert r.status_code == 503 and "redis" in r.json()["down"], r.text
        assert requests.get(f"{base}/healthz", timeout=5).status_code == 200
        assert api.proc.poll() is None and DB_PASSWORD not in api.output(), api.output()[-2000:]
    finally:
        api.stop()
        for proxy in proxies.values():
            proxy.stop()


@pytest.fixture
def slow_downloader() -> Any:
    from emulators.media import EmulatorServer

    server = EmulatorServer("video-downloader", job_seconds=0.2, latency=3.0).start()
    yield server
    server.stop()


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_sigterm_lets_the_step_in_flight_finish_once(env, rt, client, sweeper, slow_downloader, group):
    """Every answer of the video downloader takes 3 s: SIGTERM arrives while the worker waits for
    its answer to the submit; sent to the main process (docker stop, Kubernetes) or to every
    process of the worker (systemd's default)."""
    slow = {**env, "VIDEO_DOWNLOADER_URL": slow_downloader.url, "VIDEO_DOWNLOADER_TIMEOUT": "10"}
    first = start_worker(slow, rt, f"term{uuid.uuid4().hex[:6]}", concurrency=2)
    first.node = next(k for r in rt.celery.control.ping(timeout=1) for k in r if k.startswith(first.name + "@"))
    job_id = None
    try:
        r = client.post("/pipeline", json={"youtube_url": f"https://www.youtube.com/watch?v={uuid.uuid4().hex[:11]}"})
        assert r.status_code == 200, r.json
        job_id = r.json["job_id"]

        def download_running() -> bool:  # what Flower shows: the task the worker executes now
            active = rt.celery.control.inspect(destination=[first.node], timeout=1).active() or {}
            return any("download" in t["name"] for tasks in active.values() for t in tasks)

        wait_for(download_running, timeout=30, interval=0.05, what="the download step to run")
        assert requests.get(f"{slow_downloader.url}/_emulator/stats", timeout=10).json()["submit_requests"] == 0
        if group:
            os.killpg(first.proc.pid, signal.SIGTERM)
        else:
            first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(60) == 0, first.output()[-3000:]
        stats = requests.get(f"{slow_downloader.url}/_emulator/stats", timeout=10).json()
        assert stats["submit_requests"] == 1 and stats["submits"] == 1, stats  # finished, not abandoned
        assert client.get(f"/jobs/{job_id}").json["status"] != "completed"
    finally:
        first.kill()
    second = start_worker(slow, rt, f"term{uuid.uuid4().hex[:6]}", concurrency=2)
    try:
        done = wait_for(lambda: (lambda j: j if j["status"] in ("completed", "failed") else None)(
            client.get(f"/jobs/{job_id}").json), timeout=120, what="the pipeline after the restart")
        assert done["status"] == "completed", done
        stats = requests.get(f"{slow_downloader.url}/_emulator/stats", timeout=10).json()
        assert stats["submit_requests"] == 1 and stats["submits"] == 1, stats
    finally:
        second.stop()


@pytest.mark.parametrize("group", [False, True], ids=["main-process", "process-group"])
def test_an_idle_worker_on_the_embedded_broker_stops_on_sigterm(env, tmp_path, group):
    """`make run`'s configuration (SQLite and kombu's SQLite broker: billiard's plain pool, whose
    idle pool process holds the pool's queue lock while it waits): a worker that has run nothing
    stops by itself on SIGTERM, sent to its main process or to every process of it (what
    `orchestrator dev` sends on Ctrl-C), its pool processes ending as the main process tells
    them. Idle pool processes were ended by the signal itself; the one holding the lock never
    gave it back, and the main process then often waited on it at exit until it was killed."""
    from orchestrator.migrate import upgrade

    files = embedded(tmp_path)
    upgrade(files["DATABASE_URL"])
    worker = Process(f"idle{uuid.uuid4().hex[:6]}", ["worker", "--concurrency", "4"], {**env, **files}).start()
    try:
        assert worker.proc is not None
        main = psutil.Process(worker.proc.pid)
        wait_for(lambda: len(main.children()) == 4, timeout=60, what="the worker's four pool processes")
        time.sleep(2)  # they wait for their first task
        if group:
            os.killpg(worker.proc.pid, signal.SIGTERM)
        else:
            worker.proc.send_signal(signal.SIGTERM)
        assert worker.proc.wait(30) == 0, worker.output()[-3000:]
        # the pool processes finished as the worker told them, none was ended by the signal
        assert "signal 15" not in worker.output(), worker.output()[-3000:]
    finally:
        worker.kill()


def test_sigquit_after_sigterm_still_stops_the_worker_at_once(env, rt, client, sweeper, slow_downloader):
    """The cold shutdown an impatient operator asks for (SIGQUIT) while a warm one waits for a
    stalled step: the pool process still ends within seconds."""
    slow = {**env, "VIDEO_DOWNLOADER_URL": slow_downloader.url, "VIDEO_DOWNLOADER_TIMEOUT": "30"}
    requests.post(f"{slow_downloader.url}/_emulator/faults", json={"faults": [{"endpoint": "submit", "kind": "hang"}]},
                  timeout=5)
    worker = start_worker(slow, rt, f"cold{uuid.uuid4().hex[:6]}", concurrency=1)
    node = next(k for r in rt.celery.control.ping(timeout=1) for k in r if k.startswith(worker.name + "@"))
    try:
        r = client.post("/pipeline", json={"youtube_url": f"https://www.youtube.com/watch?v={uuid.uuid4().hex[:11]}"})
        assert r.status_code == 200, r.json
        wait_for(lambda: any(t for tasks in (rt.celery.control.inspect(destination=[node], timeout=1).active() or {})
                             .values() for t in tasks), timeout=30, interval=0.1, what="a step to run")
        os.killpg(worker.proc.pid, signal.SIGTERM)  # warm: waits for the step (stalled for 30 s)
        wait_for(lambda: "Warm shutdown" in worker.output(), timeout=10, what="the warm shutdown")
        time.sleep(SHUTDOWN_SIGNAL_WINDOW + 0.5)  # the operator loses patience a moment later
        worker.proc.send_signal(signal.SIGQUIT)  # cold
        worker.proc.wait(20)
        assert "Cold shutdown" in worker.output()
    finally:
        worker.kill()
        requests.delete(f"{slow_downloader.url}/_emulator/faults", timeout=5)


def test_a_step_that_ends_while_the_database_is_away_reports_when_it_is_back(env, rt, client, sweeper):
    """A step's outcome exists only in its worker: when its report met a database outage, the
    task failed, its message was acknowledged, and the step waited out its lease (10 minutes by
    default) to run again. The report now waits for the database (REPORT_WAIT_SECONDS), so a
    20-second outage costs the workflow 20 seconds, and the step runs once."""
    from engine_workflows import effects

    url = urlparse(env["DATABASE_URL"])
    gate = Proxy(url.hostname or "127.0.0.1", url.port or 5432).start()
    gated = {**env, "DATABASE_URL": url._replace(netloc=f"{url.username}@127.0.0.1:{gate.port}").geturl()}
    name = f"gated{uuid.uuid4().hex[:6]}"
    worker = Process(name, ["worker", "--concurrency", "1", "--queues", "default,hops-far", "--name", f"{name}@%h"],
                     gated).start()
    try:
        wait_for(lambda: any(k.startswith(f"{name}@") for r in rt.celery.control.ping(timeout=0.5) for k in r),
                 timeout=60, what="the gated worker to answer ping")
        instance_id = client.post("/saga", json={"type": "hops", "input": {"slow_in": "near"}}).json["id"]
        wait_for(lambda: effects().hget(f"effects:{instance_id}", "near") == b"1", timeout=60, what="near to start")
        gate.stop()  # near (3 s) ends while the database cannot be reached
        wait_for(lambda: "waits for the database" in worker.output(), timeout=30, what="the report to wait")
        gate.start()
        saga = wait_for(lambda: (lambda s: s if s["state"] == "done" else None)(client.get(f"/sagas/{instance_id}").json),
                        timeout=90, what="the workflow to finish well within its steps' lease (600 s)")
    finally:
        worker.stop()
        gate.stop()
    assert {k.decode(): int(v) for k, v in effects().hgetall(f"effects:{instance_id}").items()} == \
        {"near": 1, "next": 1, "far": 1}, saga


def _break_database_connections(env: dict[str, str], pid: int) -> int:
    """What a restart of PostgreSQL does to the connections a process tree has pooled: their
    backends are terminated. The number of them."""
    import psutil
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    tree = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    pg_port = urlparse(env["DATABASE_URL"]).port or 5432
    ports = [c.laddr.port for p in tree for c in p.net_connections("tcp") if c.raddr and c.raddr.port == pg_port]
    assert ports, "the process holds no database connection"
    admin = create_engine(env["DATABASE_URL"], poolclass=NullPool)
    with admin.connect() as conn:
        killed = conn.execute(text("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                                   "WHERE client_port = ANY(:ports)"), {"ports": ports}).scalar()
    admin.dispose()
    assert killed == len(ports), (killed, ports)
    return killed


def test_a_delivery_right_after_a_database_restart_runs_at_once(env, rt, client):
    """A database restart breaks every pooled connection of a worker; the next statement on each
    fails once, and SQLAlchemy then replaces them. When that statement was a delivery's claim,
    the task failed, its message was acknowledged, and the step waited out its lease
    (STEP_LEASE_SECONDS: 20 s in these tests, 10 minutes by default). The claim is now tried
    again, so workflows started right after the restart finish at once."""
    def done(instance_id: str) -> bool:
        return client.get(f"/sagas/{instance_id}").json["state"] == "done"

    name = f"restarted{uuid.uuid4().hex[:6]}"
    worker = start_worker(env, rt, name, concurrency=2)
    try:
        for instance_id in [client.post("/saga", json={"type": "trio", "input": {}}).json["id"] for _ in range(4)]:
            wait_for(lambda: done(instance_id), timeout=30, what="a first workflow (the pool processes connect)")
        assert worker.proc is not None
        _break_database_connections(env, worker.proc.pid)
        started = [client.post("/saga", json={"type": "trio", "input": {}}).json["id"] for _ in range(4)]
        for instance_id in started:
            wait_for(lambda: done(instance_id), timeout=12, what="the workflow to finish well within the 20 s lease")
    finally:
        worker.stop()
    assert "waits for the database" in worker.output(), worker.output()[-3000:]


def test_the_api_answers_right_after_a_database_restart(env):
    """The API tests a pooled connection before a request uses it (SQLAlchemy's pre-ping):
    after a database restart it answered 503 "database unavailable" once per broken pooled
    connection, the database being up."""
    from contextlib import contextmanager

    import psutil

    from conftest import serve_api

    with contextmanager(serve_api)(f"api{uuid.uuid4().hex[:6]}", env) as (host, port):
        base = f"http://{host}:{port}"
        for _ in range(10):  # each of its threads' connections in the pool
            assert requests.get(f"{base}/sagas?limit=1", timeout=10).status_code == 200
        master = next(c.pid for c in psutil.net_connections("tcp")
                      if c.laddr.port == port and c.status == psutil.CONN_LISTEN)
        _break_database_connections(env, master)
        answers = [requests.get(f"{base}/sagas?limit=1", timeout=10) for _ in range(10)]
        answers += [requests.post(f"{base}/saga", json={"type": "trio", "input": {}}, timeout=10) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 10 + [201] * 3, [a.text[:300] for a in answers]
