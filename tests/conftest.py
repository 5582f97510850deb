"""Fixtures that build real things: a fresh PostgreSQL database, a RabbitMQ vhost, Redis,
emulator servers on loopback, and worker and sweeper processes started from the CLI."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("TEST_PG_ADMIN_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
AMQP = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
# A Redis database per pytest-xdist worker (gw0 -> 1, gw1 -> 2, ...): what one session's
# processes keep in Redis never meets the other's.
_WORKER = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0")[2:] or 0)
REDIS = os.environ.setdefault("TEST_REDIS_URL", f"redis://127.0.0.1:6379/{1 + _WORKER}")

# Short intervals keep the suite fast; the production defaults are tested in unit tests.
FAST = {
    "POLL_INTERVAL": "0.2",
    "MAX_POLL_ATTEMPTS": "15",
    "HTTP_MAX_RETRIES": "3",
    "RETRY_BACKOFF_BASE_SECONDS": "0.2",
    "SWEEP_INTERVAL": "0.1",
    "STEP_LEASE_SECONDS": "20",
    "JOB_TIMEOUT_MINUTES": "60",
    "CACHE_TTL_HOURS": "24",
    "ADMIN_TOKEN": "test-admin-token",
    "LOG_LEVEL": "WARNING",
}


def _admin_engine() -> Any:
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")


def _rabbitmqctl(*args: str) -> bool:
    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        return False
    return subprocess.run([ctl, *args], capture_output=True, timeout=60).returncode == 0


def queued_messages(broker_url: str) -> dict[str, int]:
    """{queue: messages} of the broker URL's RabbitMQ vhost, counting ready and unacknowledged
    messages alike: a queue at 0 has had every message consumed and acknowledged (our tasks and
    consumers acknowledge after their effect is committed)."""
    from urllib.parse import unquote, urlparse

    vhost = unquote(urlparse(broker_url).path[1:]) or "/"
    out = subprocess.run([shutil.which("rabbitmqctl") or "rabbitmqctl", "list_queues", "-q", "-p", vhost,
                          "name", "messages"], capture_output=True, text=True, timeout=60).stdout
    rows = (line.split() for line in out.splitlines())
    return {r[0]: int(r[1]) for r in rows if len(r) == 2 and r[1].isdigit()}


def drained(broker_url: str, *queues: str) -> bool:
    """Every one of `queues` exists and holds no message, ready or unacknowledged."""
    counts = queued_messages(broker_url)
    return all(counts.get(q) == 0 for q in queues)


@contextmanager
def fresh_database(migrated: bool = True) -> Iterator[str]:
    """A new PostgreSQL database at the schema's head (empty unless `migrated`), dropped afterwards."""
    from sqlalchemy import text

    from orchestrator.migrate import upgrade

    name = f"orch_test_{uuid.uuid4().hex[:8]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    try:
        if migrated:
            upgrade(url)
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def embedded(directory: Any) -> dict[str, str]:
    """The variables of `make run`'s embedded defaults with their files in `directory`: SQLite
    state, kombu's SQLite broker, and the result backend in the state file (as config.py has it)."""
    url = f"sqlite:///{directory}/orchestrator.db"
    return {"DATABASE_URL": url, "CELERY_BROKER_URL": f"sqla+sqlite:///{directory}/broker.db",
            "CELERY_RESULT_BACKEND": f"db+{url}"}


@contextmanager
def engine_on(settings: Any, url: str, **overrides: Any) -> Iterator[Any]:
    """An engine of its own on `url`, with its pools as a process's runtime makes them (no relay:
    the tests read the outbox instead)."""
    from orchestrator.db import make_autocommit_engine, make_engine, make_session_factory
    from orchestrator.engine import Engine
    from orchestrator.workflow import registry

    db, autocommit = make_engine(url), make_autocommit_engine(url)
    try:
        yield Engine(settings.model_copy(update={"database_url": url, **overrides}), make_session_factory(db), registry,
                     autocommit=autocommit)
    finally:
        db.dispose()
        if autocommit is not None:
            autocommit.dispose()


@pytest.fixture(params=["postgresql", "sqlite"])
def own_engine(request: Any, rt: Any, tmp_path: Any) -> Iterator[Any]:
    """An engine of its own (`engine_on`, no relay) on a new database of either kind."""
    from orchestrator import migrate

    if request.param == "postgresql":
        with fresh_database() as url, engine_on(rt.settings, url) as engine:
            yield engine
    else:
        url = f"sqlite:///{tmp_path / 'own.db'}"
        migrate.upgrade(url)
        with engine_on(rt.settings, url) as engine:
            yield engine


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(scope="session")
def broker_url() -> Iterator[str]:
    """A RabbitMQ vhost of its own, so queues never mix with another run's."""
    vhost = f"orch-test-{uuid.uuid4().hex[:8]}"
    if _rabbitmqctl("add_vhost", vhost) and _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"):
        yield f"{AMQP}/{vhost}"
        _rabbitmqctl("delete_vhost", vhost)
    else:
        yield f"{AMQP}//"


@pytest.fixture(scope="session")
def emulators() -> Iterator[dict[str, Any]]:
    from emulators.media import SERVICES, EmulatorServer

    servers = {name: EmulatorServer(name, job_seconds=0.3, hang_seconds=3.0).start() for name in SERVICES}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="session")
def env(database_url: str, broker_url: str, emulators: dict[str, Any]) -> dict[str, str]:
    """The environment every orchestrator process of this test session runs with."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CELERY_", "DATABASE_", "POSTGRES_"))}
    return {
        **base,
        **FAST,
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": broker_url,
        "CELERY_RESULT_BACKEND": REDIS,
        "REDIS_URL": REDIS,
        "VIDEO_DOWNLOADER_URL": emulators["video-downloader"].url,
        "AUDIO_NORMALIZATION_URL": emulators["audio-normalization"].url,
        "AUDIO_TRANSCRIBER_URL": emulators["audio-transcriber"].url,
        "VIDEO_DOWNLOADER_TIMEOUT": "2",
        "AUDIO_NORMALIZATION_TIMEOUT": "2",
        "AUDIO_TRANSCRIBER_TIMEOUT": "2",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}",
        "WORKFLOW_MODULES": "sagas,tasks,engine_workflows",
    }


@pytest.fixture(scope="session")
def rt(env: dict[str, str]) -> Iterator[Any]:
    from orchestrator import runtime
    from orchestrator.config import load_settings

    built = runtime.install(runtime.build(load_settings(environ=env, dotenv="/nonexistent")))
    yield built
    runtime.reset()


class Process:
    """An orchestrator process started from the CLI, as an operator would start it."""

    def __init__(self, name: str, args: list[str], env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = Path(os.environ.get("TEST_LOG_DIR", "/tmp")) / f"orch-{name}-{uuid.uuid4().hex[:6]}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "Process":
        out = self.log.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", *self.args], env=self.env,
                                     cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """SIGKILL the whole process group: a crash, children included."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def serve_api(name: str, env: dict[str, str]) -> Iterator[tuple[str, int]]:
    """`orchestrator api` (one gunicorn worker) on a free loopback port, yielded as (host, port)
    once /healthz answers; stopped afterwards, and its log must hold no traceback."""
    from orchestrator.entrypoints.ports import free_port

    port = free_port()
    proc = Process(name, ["api", "--port", str(port), "--host", "127.0.0.1", "--workers", "1"], env).start()

    def up() -> bool:
        try:
            return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code < 500
        except requests.RequestException:
            return proc.proc is not None and proc.proc.poll() is not None

    wait_for(up, timeout=60, interval=0.2, what="the API")
    assert proc.proc is not None and proc.proc.poll() is None, proc.output()[-3000:]
    yield "127.0.0.1", port
    proc.stop()
    assert "Traceback" not in proc.output(), proc.output()[-5000:]


def terminate(proc: "subprocess.Popen[bytes]", timeout: float = 60.0) -> int:
    """SIGTERM, as an operator stops a process; its exit code (SIGKILL and raise if it hangs)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.1, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def start_flower(name: str, env: dict[str, str]) -> tuple[Process, str]:
    """`orchestrator flower` on a free port with `env` (FLOWER_BASIC_AUTH included), once its
    open /healthcheck answers: the process and its base URL."""
    from orchestrator.entrypoints.ports import free_port

    port = free_port()
    proc = Process(name, ["flower", "--port", str(port)], env).start()
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return requests.get(f"{base}/healthcheck", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    try:
        wait_for(up, timeout=60, interval=0.3, what="flower")
    except BaseException:
        proc.stop()
        raise
    return proc, base


def start_worker(env: dict[str, str], rt: Any, name: str, concurrency: int = 4) -> Process:
    worker = Process(name, ["worker", "--concurrency", str(concurrency), "--name", f"{name}@%h"], env).start()
    node = f"{name}@"
    wait_for(lambda: any(k.startswith(node) for r in rt.celery.control.ping(timeout=0.5) for k in r),
             timeout=60, what=f"worker {name} to answer ping")
    return worker


@pytest.fixture(scope="module")
def worker(env: dict[str, str], rt: Any) -> Iterator[Process]:
    proc = start_worker(env, rt, f"w{uuid.uuid4().hex[:6]}")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def sweeper(env: dict[str, str], rt: Any) -> Iterator[Process]:
    proc = Process("sweeper", ["sweeper"], env).start()
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def app(rt: Any) -> Any:
    from web import create_app

    return create_app(rt)


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def faults(emulators: dict[str, Any]) -> Iterator[Any]:
    """Set a fault plan on an emulator; every plan is cleared after the test."""

    def set_plan(service: str, faults: list[dict[str, Any]] | None = None, job: dict[str, Any] | None = None) -> None:
        resp = requests.post(f"{emulators[service].url}/_emulator/faults",
                             json={"faults": faults or [], "job": job or {}}, timeout=5)
        assert resp.status_code == 200, resp.text

    yield set_plan
    for server in emulators.values():
        requests.delete(f"{server.url}/_emulator/faults", timeout=5)


def emulator_stats(emulators: dict[str, Any], service: str) -> dict[str, Any]:
    return requests.get(f"{emulators[service].url}/_emulator/stats", timeout=5).json()
