"""Real processes over real HTTP: the API under gunicorn, and the whole `orchestrator dev`."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from conftest import Process, ROOT, embedded, fresh_database, serve_api, terminate, wait_for
from orchestrator.entrypoints.ports import free_port


def free_port_run(count: int) -> int:
    """The first of `count` consecutive free ports."""
    for _ in range(50):
        base = free_port()
        try:
            socks = []
            for p in range(base, base + count):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports")


def wait_http(url: str, timeout: float = 60) -> None:
    def up() -> bool:
        try:
            return requests.get(url, timeout=1).status_code < 500
        except requests.RequestException:
            return False

    wait_for(up, timeout=timeout, interval=0.2, what=url)


def wait_job(base: str, job_id: str, timeout: float = 90) -> dict:
    def done():
        job = requests.get(f"{base}/jobs/{job_id}", timeout=5).json()
        return job if job["status"] in ("completed", "failed") else None

    return wait_for(done, timeout=timeout, interval=0.2, what=f"job {job_id}")


@pytest.fixture(scope="module")
def api(env, worker, sweeper):
    port = free_port()
    proc = Process("api", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "2"], env).start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz")
        yield base
    finally:
        proc.stop()


def test_api_process_runs_pipelines_concurrently(api):
    def go(i: int) -> str:
        r = requests.post(f"{api}/pipeline", json={"youtube_url": f"https://youtu.be/e{i:02d}{uuid.uuid4().hex[:6]}"},
                          timeout=10)
        assert r.status_code == 200, r.text
        return r.json()["job_id"]

    with ThreadPoolExecutor(10) as pool:
        ids = list(pool.map(go, range(50)))
    assert len(set(ids)) == 50
    for job_id in ids:
        assert wait_job(api, job_id)["status"] == "completed"


def test_operations_endpoints(api):
    assert requests.get(f"{api}/healthz", timeout=5).json()["status"] == "ok"
    ready = requests.get(f"{api}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert {k: v["status"] for k, v in ready.json()["dependencies"].items()} == {
        "database": "ok", "broker": "ok", "result_backend": "ok", "redis": "ok"}
    metrics = requests.get(f"{api}/metrics", timeout=10).text
    assert "orchestrator_http_requests_total" in metrics
    assert 'orchestrator_workflow_instances{state="completed",type="media"}' in metrics
    assert "orchestrator_outbox_backlog" in metrics
    spec = requests.get(f"{api}/openapi.json", timeout=5).json()
    for path in ("/saga", "/saga/{type}", "/sagas", "/sagas/{instance_id}", "/sagas/{instance_id}/events/{event}",
                 "/sagas/{instance_id}/restart", "/sagas/{instance_id}/cancel", "/pipeline", "/jobs",
                 "/jobs/{job_id}", "/health", "/admin/stats", "/admin/cleanup", "/admin/factory-reset",
                 "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    bad = requests.post(f"{api}/pipeline", data="nope", headers={"Content-Type": "application/json"}, timeout=5)
    assert bad.status_code == 400 and bad.json()["field"] == "body"


def test_readyz_reports_a_dead_broker(env, tmp_path):
    port = free_port()
    broken = {**env, "CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{free_port()}//"}
    proc = Process("api-broken", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"], broken).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        r = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=15)
        assert r.status_code == 503 and r.json()["dependencies"]["broker"]["status"] == "error"
        assert r.json()["dependencies"]["database"]["status"] == "ok"
    finally:
        proc.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def unmigrated(request, env, tmp_path):
    """The environment of an API on a database nobody has migrated: the embedded default's new
    state file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield {**env, **embedded(tmp_path)}
        return
    with fresh_database(migrated=False) as url:
        yield {**env, "DATABASE_URL": url}


def test_an_unmigrated_database_is_not_ready_and_answers_503_until_it_is_migrated(unmigrated):
    """An API started on a database nobody migrated answered ready, then 500 on every start
    (no such table, relation does not exist). Readiness and every request now name the
    database and the command that fixes it, with a 503 the client may retry."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = Process("api-unmigrated", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
                   unmigrated).start()
    start = {"input": {"youtube_url": f"https://youtu.be/u{uuid.uuid4().hex[:8]}"}}
    try:
        wait_http(f"{base}/healthz")
        r = requests.get(f"{base}/readyz", timeout=15)
        assert r.status_code == 503 and r.json()["down"] == ["database"], r.text
        assert "run `orchestrator db upgrade`" in r.json()["dependencies"]["database"]["error"], r.text
        for method, path, body in (("POST", "/saga/media", start), ("GET", "/sagas", None), ("GET", "/jobs", None)):
            r = requests.request(method, base + path, json=body, timeout=15)
            assert r.status_code == 503, (path, r.text)
            assert r.json()["error"] == "unavailable" and r.json()["dependency"] == "database", r.text
            assert "run `orchestrator db upgrade`" in r.json()["message"] and r.headers["Retry-After"] == "5", r.text
        out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "db", "upgrade"], env=unmigrated,
                             cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        r = requests.get(f"{base}/readyz", timeout=15)
        assert r.status_code == 200 and r.json()["dependencies"]["database"]["status"] == "ok", r.text
        r = requests.post(f"{base}/saga/media", json=start, timeout=15)
        assert r.status_code == 201, r.text
        assert requests.get(f"{base}/sagas", timeout=15).json()["total"] == 1  # the refused start left nothing
    finally:
        proc.stop()
    assert "Traceback" not in proc.log.read_text(), proc.log.read_text()[-3000:]


def test_an_unreachable_database_answers_503_naming_it(env):
    """PostgreSQL down: a start answers 503 naming the database and where it was looked for,
    not a 500 that says to read the server's log."""
    port, nobody = free_port(), free_port()
    down = {**env, "DATABASE_URL": f"postgresql+psycopg2://orchestrator:secret@127.0.0.1:{nobody}/orchestrator"}
    proc = Process("api-no-database", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
                   down).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        r = requests.post(f"http://127.0.0.1:{port}/pipeline", json={"youtube_url": "https://youtu.be/unreachable"},
                          timeout=30)
        assert r.status_code == 503 and r.json()["dependency"] == "database", r.text
        assert f"127.0.0.1:{nobody}" in r.json()["message"] and "secret" not in r.text, r.text
        # /metrics still answers, with the HTTP figures and the database marked down (it was a
        # 503: a scrape during an outage lost every metric)
        page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert page.status_code == 200, page.text
        assert "orchestrator_database_up 0.0" in page.text and "orchestrator_http_requests_total{" in page.text
        assert "orchestrator_workflow_instances{" not in page.text
    finally:
        proc.stop()



def test_a_database_that_takes_connections_and_never_answers_is_down_within_seconds(env):
    """A PostgreSQL host that accepts the connection and then says nothing (a partition, a hung
    server): /readyz and /metrics waited for it without end (a scrape returned after 169 s, when
    the connection was cut). A new connection now gives up after CONNECT_TIMEOUT_SECONDS."""
    from orchestrator.db import CONNECT_TIMEOUT_SECONDS

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # the kernel accepts; nobody ever answers
    port = free_port()
    stalled = {**env, "DATABASE_URL": f"postgresql+psycopg2://postgres@127.0.0.1:{silent.getsockname()[1]}/db"}
    proc = Process("api-silent-database", ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"],
                   stalled).start()
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        limit = 3 * CONNECT_TIMEOUT_SECONDS + 10  # a bound on the answer, not a timing asserted
        ready = requests.get(f"http://127.0.0.1:{port}/readyz", timeout=limit)
        assert ready.status_code == 503 and "database" in ready.json()["down"], ready.text
        page = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=limit)
        assert page.status_code == 200 and "orchestrator_database_up 0.0" in page.text, page.text[-2000:]
    finally:
        proc.stop()
        silent.close()

# One variable of the core settings and one of each workflow's own (media, balance, chat): the
# workflows' settings are checked at start-up too, not on the first request that reads them.
@pytest.mark.parametrize("name, value", [("POLL_INTERVAL", "often"), ("API_THREADS", "0"), ("GITLAB_URL", "gitlab"),
                                         ("CHAT_HEARTBEAT_SECONDS", "0"), ("CHAT_CONSUMER_ID", "has space")])
def test_misconfiguration_stops_start_up_naming_the_variable(env, name, value):
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "api"], env={**env, name: value},
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and f"configuration error: {name}:" in out.stderr


@pytest.mark.parametrize("command", ["sweeper", "worker", "calc-results", "bridge", "flower", "db"])
def test_every_process_refuses_a_bad_variable_in_one_line(env, command):
    args = [command, "upgrade"] if command == "db" else [command]
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", *args],
                         env={**env, "LOG_LEVEL": "loud", "KAFKA_BROKERS": "127.0.0.1:1"},
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "configuration error: LOG_LEVEL:" in out.stderr
    assert "Traceback" not in out.stderr, out.stderr


def test_variable_names_are_exact_a_lower_case_one_is_not_read(tmp_path):
    # `log_level` and `database_url` are not LOG_LEVEL and DATABASE_URL: had they been read, the
    # first would stop start-up and the second would point the upgrade at a server that is not there.
    env = {**os.environ, **embedded(tmp_path), "log_level": "loud", "database_url": "postgresql://nobody@127.0.0.1:1/x"}
    out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "db", "upgrade"], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "orchestrator.db").exists(), out.stdout


# Values a server cannot run with: before, WORKERS=0 started a gunicorn that listened and never
# answered, PORT=99999 ended in gunicorn's OverflowError traceback, and API_MAX_BODY_BYTES (the
# API's own settings, read only in gunicorn's forked workers) in a traceback per worker and
# "Worker failed to boot"; `dev` did not read it at all and its API child restarted until dev gave up.
@pytest.mark.parametrize("command, name, value", [
    ("api", "WORKERS", "0"), ("api", "PORT", "99999"), ("api", "PORT", "0"), ("api", "API_MAX_BODY_BYTES", "10"),
    ("api", "STEP_LEASE_SECONDS", "0"), ("api", "AUDIO_TRANSCRIBER_TIMEOUT", "0"), ("sweeper", "SWEEP_INTERVAL", "0"),
    ("dev", "API_MAX_BODY_BYTES", "10"), ("dev", "PORT", "70000"), ("dev", "GITLAB_EMULATOR_PORT", "70000"),
    # URLs the libraries that use them cannot read: processes waited for ever, or a worker stopped
    # with status 0 (docs: "configuration error: <VARIABLE>: <why>")
    ("sweeper", "DATABASE_URL", "postgresql://postgres@127.0.0.1:notaport/db"),
    ("worker", "CELERY_BROKER_URL", "amqpp://x"),
    ("worker", "CELERY_BROKER_URL", "garbage"), ("worker", "CELERY_RESULT_BACKEND", "garbage://x"),
    ("api", "REDIS_URL", "garbage")])
def test_a_value_no_process_can_run_with_is_refused_before_it_starts(env, tmp_path, command, name, value):
    out = _refused([command], {**env, name: value}, tmp_path)
    assert out.returncode != 0, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip().splitlines()[0]], out.stderr  # one line
    assert out.stderr.startswith(f"configuration error: {name}: "), out.stderr


@pytest.mark.parametrize("args, flag", [
    (["api", "--workers", "0"], "--workers"), (["api", "--port", "99999"], "--port"),
    (["api", "--threads", "0"], "--threads"), (["worker", "--concurrency", "0"], "--concurrency"),
    (["flower", "--port", "0"], "--port"), (["bridge", "--metrics-port", "70000"], "--metrics-port"),
    (["dev", "--api-workers", "0"], "--api-workers"), (["dev", "--concurrency", "0"], "--concurrency"),
    (["dev", "--emulator-port", "65534"], "--emulator-port"), (["dev", "--kafka-port", "-1"], "--kafka-port")])
def test_a_flag_out_of_range_is_a_usage_error(env, tmp_path, args, flag):
    out = _refused(args, env, tmp_path)
    assert out.returncode == 2 and f"error: argument {flag}: expected" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


# `inf` passed every bound (a lease that never expires) and `nan` was refused as negative.
@pytest.mark.parametrize("command, name, value", [
    ("dev", "STEP_LEASE_SECONDS", "inf"), ("api", "CACHE_TTL_HOURS", "nan"), ("api", "CHAT_HEARTBEAT_SECONDS", "Infinity")])
def test_a_duration_that_is_not_finite_is_refused_saying_so(env, tmp_path, command, name, value):
    out = _refused([command], {**env, name: value}, tmp_path)
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip() == f"configuration error: {name}: must be a finite number, got {value!r}", out.stderr


def _refused(args: list[str], env: dict, cwd) -> "subprocess.CompletedProcess[str]":
    """`orchestrator <args>`, expected to stop at once. One that starts instead (as before the
    checks) gets SIGTERM after a while, and dev runs on free ports, never the defaults a user's
    `make run` takes."""
    env = dict(env)
    if args[0] == "dev":
        env.update(PORT=env.get("PORT") or str(free_port()), HOST="127.0.0.1", GITLAB_EMULATOR_PORT=env.get(
            "GITLAB_EMULATOR_PORT") or str(free_port()))
        args = args + ["--flower-port", str(free_port()), "--emulator-port", str(free_port_run(3)), "--kafka-port", "0"]
    if args[0] == "api" and "PORT" not in env:
        env["PORT"] = str(free_port())
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", *args], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)  # dev stops its children on it
        try:
            proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"orchestrator {' '.join(args)} started instead of refusing")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_a_second_dev_on_the_same_data_folder_refuses_at_once(tmp_path):
    """A second `orchestrator dev` on other ports but the same ./data started and broke the first
    (one SQLite file under two sets of processes, media jobs the other copy's emulators did not
    know). Now, while the folder's lock is held (here by the test, as a running dev holds it),
    dev exits at once naming the folder and what to do, and starts nothing."""
    import fcntl

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "VIDEO_", "AUDIO_", "KAFKA_"))}
    env.update(LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT))
    (tmp_path / "data").mkdir()
    with (tmp_path / "data" / "dev.lock").open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("4242\n")
        held.flush()
        started = time.monotonic()
        out = _refused(["dev"], env, tmp_path)
    assert time.monotonic() - started < 20, "dev took its time before refusing"
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert (f"orchestrator dev: another orchestrator dev (pid 4242) runs on the data folder {tmp_path / 'data'}: "
            "stop it, or start this one in another folder") in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and "orchestrator dev: pids" not in out.stdout, out.stderr
    assert not (tmp_path / "data" / "repos").exists()  # the demo project, dev's first set-up step: not made


def test_ctrl_c_during_dev_start_up_stops_everything_without_a_traceback(tmp_path):
    """Ctrl-C (SIGINT to dev's process group, as a terminal sends it) while a set-up step runs
    (the demo project, `db upgrade`) printed the KeyboardInterrupt tracebacks of dev and of the
    step. Now the step finishes, dev says it stopped, exits 0 and leaves no process behind."""
    import psutil

    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "VIDEO_", "AUDIO_"))}
    port = free_port()
    env.update(PORT=str(port), HOST="127.0.0.1", LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT),
               GITLAB_EMULATOR_PORT=str(free_port()))
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", "dev", "--flower-port",
                                 str(free_port()), "--emulator-port", str(free_port_run(3)), "--kafka-port", "0"],
                                cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    dev = psutil.Process(proc.pid)

    def setting_up() -> bool:
        steps = []
        for child in dev.children():
            try:
                steps.append(" ".join(child.cmdline()))
            except psutil.Error:  # a step that ended since it was listed (a zombie until dev reaps it)
                continue
        return any("emulators.demo" in c or c.endswith("db upgrade") for c in steps)

    try:
        wait_for(setting_up, timeout=60, interval=0.01, what="a set-up step of dev")
        seen = dev.children(recursive=True)  # the step, and the bundled broker once it runs
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(60) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            terminate(proc)
    text = log.read_text()
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    assert "orchestrator dev: stopped during start-up" in text, text[-3000:]
    left = [p for p in seen if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [p.cmdline() for p in left]


def test_dev_runs_everything_on_embedded_defaults(tmp_path):
    """The README's main command on a machine with nothing configured: SQLite, a server-less
    broker, the emulators; a pipeline completes; SIGTERM stops every process cleanly."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "VIDEO_", "AUDIO_"))}
    port, flower = free_port(), free_port()
    env.update(PORT=str(port), HOST="127.0.0.1", POLL_INTERVAL="0.3", SWEEP_INTERVAL="0.2",
               EMULATOR_JOB_SECONDS="0.5", LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT),
               FLOWER_BASIC_AUTH="admin:secret",
               GITLAB_EMULATOR_PORT=str(free_port()))  # dev refuses a port in use: none of its fixed ones
    log = (tmp_path / "dev.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", "dev", "--flower-port", str(flower),
                             "--concurrency", "2", "--emulator-port", str(free_port_run(3)),
                             "--kafka-port", "0"], cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/healthz", timeout=90)
        r = requests.post(f"{base}/pipeline", json={"youtube_url": "https://www.youtube.com/watch?v=devrun01"},
                          timeout=10)
        assert r.status_code == 200, r.text
        job = wait_job(base, r.json()["job_id"], timeout=120)
        assert job["status"] == "completed", job
        assert (tmp_path / "data" / "orchestrator.db").exists()
        wait_http(f"http://127.0.0.1:{flower}/healthcheck", timeout=60)
        assert requests.get(f"http://127.0.0.1:{flower}/", timeout=5).status_code == 401
        tasks = requests.get(f"http://127.0.0.1:{flower}/api/tasks", auth=("admin", "secret"), timeout=10)
        assert tasks.status_code == 200
    finally:
        code = terminate(proc)
    assert code == 0, (tmp_path / "dev.log").read_text()[-3000:]
    time.sleep(0.5)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{base}/healthz", timeout=2)


def _dev(tmp_path, port: int, flower: int, emulators: int, gitlab: int, log_name: str) -> "subprocess.Popen[bytes]":
    """`orchestrator dev` in `tmp_path` on the ports given (never the defaults a user's `make run` takes)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_", "REDIS_", "VIDEO_", "AUDIO_", "KAFKA_"))}
    env.update(PORT=str(port), HOST="127.0.0.1", LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT),
               FLOWER_BASIC_AUTH="admin:secret", GITLAB_EMULATOR_PORT=str(gitlab))
    with (tmp_path / log_name).open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", "dev", "--flower-port", str(flower),
                                 "--concurrency", "2", "--api-workers", "2", "--emulator-port", str(emulators),
                                 "--kafka-port", "0"], cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _alive(procs: list) -> list:
    import psutil

    left = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(p)
        except psutil.NoSuchProcess:
            pass
    return left


def test_kill_9_of_dev_takes_every_child_with_it_and_dev_starts_again(tmp_path):
    """Each dev child runs in a session of its own (out of Ctrl-C's reach): a kill -9 of dev
    orphaned them all (API, worker, sweeper, bridge, Flower, emulators, the bundled broker), and
    the next `make run` stopped at 'port ... not available'. Now every one dies with dev, and a
    second dev on the same ports and data directory starts."""
    import psutil

    port, flower, emulators, gitlab = free_port(), free_port(), free_port_run(3), free_port()
    proc = _dev(tmp_path, port, flower, emulators, gitlab, "dev.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90)
        wait_http(f"http://127.0.0.1:{flower}/healthcheck", timeout=60)
        dev = psutil.Process(proc.pid)
        # the worker's pool processes and gunicorn's workers too
        wait_for(lambda: len(dev.children(recursive=True)) >= 14, timeout=30, what="every dev process")
        seen = dev.children(recursive=True)
        names = {" ".join(p.cmdline()[1:4]) for p in seen}
        proc.send_signal(signal.SIGKILL)  # dev alone, as `kill -9 <pid>`
        proc.wait(10)
        deadline = time.monotonic() + 30  # a worker's warm shutdown, gunicorn's graceful stop
        while _alive(seen) and time.monotonic() < deadline:
            time.sleep(0.2)
        left = _alive(seen)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    for p in _alive(seen):  # leave nothing behind whatever happened
        p.kill()
    assert not left, ([p.cmdline() for p in left], names)

    again = _dev(tmp_path, port, flower, emulators, gitlab, "dev2.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90)
    finally:
        code = terminate(again)
    assert code == 0, (tmp_path / "dev2.log").read_text()[-3000:]


def _taken_calculations(tmp_path) -> int:
    """Calculation tasks the emulated calculation worker has fetched from the embedded broker
    (kombu's SQLAlchemy transport keeps a fetched message, invisible)."""
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "broker.db", timeout=30) as db:
        return db.execute("SELECT count(*) FROM kombu_message m JOIN kombu_queue q ON q.id = m.queue_id "
                          "WHERE q.name = 'orchestrator.calculations' AND NOT m.visible").fetchone()[0]


def test_a_calculation_lost_in_a_kill_9_goes_again_when_dev_starts_again(tmp_path):
    """`kill -9` of make run's process group while the emulated calculation worker computes: the
    embedded broker never hands out again a message it had fetched, so the saga waited out the
    step's lease (10 minutes). The next dev's sweeper sends the request again at start, and the
    saga goes on at once (the calculation worker answers a repeat with the same commit)."""
    import psutil

    port, flower, emulators, gitlab = free_port(), free_port(), free_port_run(3), free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _dev(tmp_path, port, flower, emulators, gitlab, "dev.log")
    seen: list = []
    try:
        wait_http(f"{base}/healthz", timeout=120)
        wait_for(lambda: requests.get(f"{base}/readyz", timeout=5).status_code == 200, timeout=60,
                 what="dev to be ready")
        saga = requests.post(f"{base}/saga/calculate-balance", timeout=30,
                             json={"project": "demo/balance", "branch": "issue/7-kill"}).json()
        assert saga["state"] == "AWAIT_USER_CONDENSER_INPUT", saga
        taken = _taken_calculations(tmp_path)
        answer = requests.post(f"{base}/sagas/{saga['saga_id']}/events/submit_input", timeout=30,
                               json={"step": "CONDENSER", "use_hydrated": True})
        assert answer.status_code == 200, answer.text
        # the calculation worker takes 2 s per task: kill everything while it computes this one
        wait_for(lambda: _taken_calculations(tmp_path) > taken, timeout=60, interval=0.05,
                 what="the calculation worker to take the task")
        seen = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: not _alive(seen), timeout=60, what="every process of the first dev to end")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for p in _alive(seen):
            p.kill()

    def moved_on() -> dict | None:
        try:
            found = requests.get(f"{base}/sagas/{saga['saga_id']}", timeout=5).json()
        except requests.RequestException:
            return None
        return found if found["state"] != "CONDENSER_CALCULATION" else None

    again = _dev(tmp_path, port, flower, emulators, gitlab, "dev2.log")
    try:
        state = wait_for(moved_on, timeout=120, interval=0.5,
                         what="the saga to get past its lost calculation (its lease is 600 s)")
    finally:
        code = terminate(again)
    assert code == 0, (tmp_path / "dev2.log").read_text()[-3000:]
    assert state["status"] == "running", state
    condenser = [s for s in state["steps"] if "condenser" in s["name"].lower() and "calc" in s["name"].lower()]
    assert condenser and condenser[0]["status"] == "completed", state["steps"]


def test_ctrl_c_stops_the_emulators_after_the_product_processes(tmp_path):
    """Ctrl-C stopped every child at once: the media emulators were gone while the worker, in its
    warm shutdown, still polled them, and the running stage counted the ConnectionError as a
    failed attempt (attempt 2 and an error text after the restart). Now the product's processes
    stop first and are waited for; the emulators and the bundled broker go last."""
    import psutil

    port = free_port()
    proc = _dev(tmp_path, port, free_port(), free_port_run(3), free_port(), "dev.log")
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz", timeout=90)
        pids = dict(item.split("=") for item in
                    wait_for(lambda: [line for line in (tmp_path / "dev.log").read_text().splitlines()
                                      if line.startswith("orchestrator dev: pids ")], timeout=10)[0]
                    .removeprefix("orchestrator dev: pids ").split(", "))
        watched = {name: psutil.Process(int(pid)) for name, pid in pids.items()}
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: dev's process group
        gone: dict[str, float] = {}
        deadline = time.monotonic() + 60
        while len(gone) < len(watched) and time.monotonic() < deadline:
            for name, p in watched.items():
                if name not in gone and not _alive([p]):
                    gone[name] = time.monotonic()
            time.sleep(0.01)
        assert proc.wait(60) == 0, (tmp_path / "dev.log").read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    emulators = {"emulators", "gitlab", "calculator", "execution", "kafka-emulators"} & set(watched)
    product = set(watched) - emulators
    assert emulators and {"worker", "api"} <= product and set(gone) == set(watched), (gone, watched)
    last_product = max(gone[n] for n in product)
    assert all(gone[n] >= last_product for n in emulators), sorted(gone, key=gone.get)
    text = (tmp_path / "dev.log").read_text()
    assert text.index("stopped the product's processes") < text.index("stopped the emulators"), text[-3000:]
    # each stopped by itself: the worker's main process, its idle pool processes killed by the
    # same SIGTERM, waited at exit for the pool's queue lock one of them held, until dev killed it
    assert "did not stop within" not in text, text[-3000:]


OWN_WORKFLOW = '''
from statemachine import State
from orchestrator.steps import Done, step_task
from orchestrator.workflow import Step, Workflow, register

@step_task("{name}.work")
def work(ctx):
    return Done("worked")

@register
class Own(Workflow):
    type = "{name}"
    start_event = "go"
    a, b, c, d = State(initial=True), State(), State(final=True), State(final=True)
    go = a.to(b)
    worked = b.to(c)
    drop = a.to(d)
    {fail}
    steps = {{b: Step("{name}.work")}}
'''


def test_a_workflow_module_in_the_folder_a_process_starts_in_is_found_and_a_bad_one_named_in_one_line(env, tmp_path):
    """WORKFLOW_MODULES names the user's own module, as the README says. A module beside the
    checkout was not found by the `orchestrator` command (a ModuleNotFoundError traceback) unless
    PYTHONPATH named its folder; a workflow whose step's state did not take `fail` registered,
    and its first failed step left the instance running for ever. Both now stop start-up with
    one line naming WORKFLOW_MODULES; a good module is found in the current folder, as Celery
    finds `-A proj`."""
    command = os.path.join(os.path.dirname(sys.executable), "orchestrator")  # the console script, not -m
    (tmp_path / "own_flow.py").write_text(OWN_WORKFLOW.format(name="own_flow", fail="fail = b.to(d)"))
    (tmp_path / "no_fail.py").write_text(OWN_WORKFLOW.format(name="no_fail", fail=""))
    base = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    base["DATABASE_URL"] = f"sqlite:///{tmp_path / 'own.db'}"

    def upgrade(modules: str) -> "subprocess.CompletedProcess[str]":
        return subprocess.run([command, "db", "upgrade"], env={**base, "WORKFLOW_MODULES": modules}, cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    good = upgrade("sagas,tasks,own_flow")
    assert good.returncode == 0, good.stderr
    for modules, line in (
            ("sagas,tasks,no_fail", "configuration error: WORKFLOW_MODULES: no_fail: workflow 'no_fail': step 'b' "
                                    "on_failure names event 'fail', which state 'b' does not take"),
            ("sagas,tasks,nosuch", "configuration error: WORKFLOW_MODULES: no module named 'nosuch' in the current "
                                   f"folder ({tmp_path}) or on PYTHONPATH")):
        out = upgrade(modules)
        assert out.returncode == 1 and out.stderr.startswith(line), out.stderr
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    # python-statemachine's own refusal of a class, one line too
    (tmp_path / "lonely.py").write_text(OWN_WORKFLOW.format(name="lonely", fail="").replace("drop = a.to(d)", ""))
    out = upgrade("sagas,tasks,lonely")
    assert out.returncode == 1 and out.stderr.startswith(
        "configuration error: WORKFLOW_MODULES: lonely: There are unreachable states"), out.stderr


def test_two_workers_on_one_host_need_no_name_and_a_worker_that_cannot_run_exits_1(env, rt):
    """`orchestrator worker` twice on one host, as the README's process list runs it: both ran
    as `worker@<host>`, and the second lost the race for that name's control queue, logged
    "Unrecoverable error: ResourceLocked" and exited 0, which a supervisor takes for a clean
    stop. Each is now named after its process id, and a worker Celery stops on an error exits 1."""
    def nodes() -> set[str]:
        return {k for r in rt.celery.control.ping(timeout=0.5) for k in r}

    before = nodes()
    first = Process("unnamed-a", ["worker", "--concurrency", "1"], env).start()
    second = Process("unnamed-b", ["worker", "--concurrency", "1"], env).start()
    try:
        pids = {first.proc.pid, second.proc.pid}  # type: ignore[union-attr]
        wait_for(lambda: {f"worker{pid}@" for pid in pids} <= {n.split("@")[0] + "@" for n in nodes() - before},
                 timeout=60, what="both workers to answer ping under their own names")
        assert first.proc.poll() is None and second.proc.poll() is None  # type: ignore[union-attr]
        # the same name twice on one broker: the second cannot take the name's control queue
        name = f"twin{uuid.uuid4().hex[:6]}@%h"
        twin = Process("twin", ["worker", "--concurrency", "1", "--name", name], env).start()
        try:
            wait_for(lambda: any(n.startswith(name.split("@")[0] + "@") for n in nodes()), timeout=60,
                     what="the first twin to answer ping")
            again = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "worker", "--concurrency", "1",
                                    "--name", name], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
            assert again.returncode == 1 and "ResourceLocked" in again.stderr, again.stderr[-3000:]
        finally:
            twin.stop()
    finally:
        first.stop()
        second.stop()


@pytest.mark.parametrize("args, variable", [(["api"], "PORT"), (["flower", "--address", "127.0.0.1"], "--port")])
def test_a_port_in_use_is_refused_in_one_line_naming_what_moves_it(env, tmp_path, args, variable):
    """`orchestrator api` on a port in use printed gunicorn's "Connection in use" five times and
    exited without naming PORT; `orchestrator flower` a 34-line traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        extra = ["--port", str(port)] if args[0] == "flower" else []
        out = subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", *args, *extra], cwd=tmp_path,
                             env={**env, "HOST": "127.0.0.1", "PORT": str(port), "FLOWER_BASIC_AUTH": "a:b"},
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"configuration error: {variable}: port {port} for {'the API' if args[0] == 'api' else 'Flower'} on 127.0.0.1 "
        f"is not available (Address already in use): stop what uses it or move "
        f"{'the API' if args[0] == 'api' else 'Flower'} with {variable}"], out.stderr[-2000:]


def test_the_api_leaves_no_control_socket_another_api_could_take(env, tmp_path):
    """gunicorn (25.1 on) makes one control socket per user, `$XDG_RUNTIME_DIR/gunicorn.ctl`: two
    APIs on one host shared it, and the first to stop deleted it under the other. Signals manage
    the API, so it makes none."""
    api = serve_api("no-ctl", {**env, "XDG_RUNTIME_DIR": str(tmp_path)})
    host, port = next(api)
    try:
        assert requests.get(f"http://{host}:{port}/healthz", timeout=10).status_code == 200
        assert list(tmp_path.iterdir()) == []
    finally:
        next(api, None)  # stops it
