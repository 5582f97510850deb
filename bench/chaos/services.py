"""Private instances of PostgreSQL, RabbitMQ, Redis and the Kafka-protocol broker, each on its own
free port and in its own directory, so the fault-injection run can restart them without touching
the machine's shared services on the default ports.

Each service has `start()`, `stop()` (a clean stop that keeps its data), `crash()` (SIGKILL of
the server: what a lost machine does) and `restart(pause)`; data lives under `root` and survives
restarts (PostgreSQL's WAL, RabbitMQ's durable queues, Redis's append-only file, the Kafka
broker's log in the private PostgreSQL).
"""
from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from orchestrator.entrypoints.ports import free_port


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not come up within {timeout}s")
        time.sleep(0.2)


def _as_postgres() -> list[str]:
    """PostgreSQL refuses to run as root: run its tools as the `postgres` user then."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


class Service:
    """Common bookkeeping: a name, a port, a directory, the server's Popen."""

    name = "service"

    def __init__(self, root: Path) -> None:
        self.root = root / self.name
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.root / "server.log"

    def restart(self, pause: float) -> None:
        """Stop (SIGKILL for a crash), stay down `pause` seconds, start again with the same data."""
        self.crash()
        time.sleep(pause)
        self.start()

    def crash(self) -> None:
        """SIGKILL every process of the server's group, and wait until none is left (a backend
        still exiting would hold PostgreSQL's lock file or a port)."""
        if self.proc is None:
            return
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                break
            self.proc.poll()
            time.sleep(0.05)
        self.proc.wait(30)

    def stop(self) -> None:
        self.crash()


class Postgres(Service):
    """`initdb` into a temporary directory, `postgres -D` on a free port (unix socket there too)."""

    name = "postgres"

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
        if not found:
            raise RuntimeError("no PostgreSQL server under /usr/lib/postgresql/*/bin")
        self.bin = Path(found[-1]).parent
        self.data = self.root / "data"
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres")
        if not self.data.exists():
            subprocess.run(_as_postgres() + [str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                                             "-A", "trust", "--no-sync"], check=True, capture_output=True)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            _as_postgres() + [str(self.bin / "postgres"), "-D", str(self.data), "-p", str(self.port),
                              "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}",
                              "-c", "max_connections=300", "-c", "fsync=off", "-c", "shared_buffers=64MB"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: subprocess.run([str(self.bin / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],
                                     capture_output=True).returncode == 0, 60, "PostgreSQL")

    def create_database(self, name: str) -> str:
        subprocess.run([str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", name],
                       check=True, capture_output=True)
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"


class Redis(Service):
    """`redis-server --appendonly yes` in its own directory."""

    name = "redis"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.root),
             "--appendonly", "yes", "--appendfsync", "always", "--save", ""],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: _listening(self.port), 30, "Redis")


class RabbitMQ(Service):
    """A node of its own (`RABBITMQ_NODENAME`, ports, mnesia and log directories, no plugins). A
    crash kills the Erlang VM in the server's process group; epmd, shared by every node, is kept."""

    name = "rabbitmq"
    BIN = Path("/usr/lib/rabbitmq/bin")

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.dist_port = free_port()
        self.node = f"chaos{self.port}@localhost"
        (self.root / "enabled_plugins").write_text("[].\n")
        self.env = {**os.environ, "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_PORT": str(self.port),
                    "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_DIST_PORT": str(self.dist_port),
                    "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"), "RABBITMQ_LOG_BASE": str(self.root / "log"),
                    "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins"),
                    "RABBITMQ_PID_FILE": str(self.root / "pid"), "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
                    "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.root / "advanced.config"),
                    "RABBITMQ_CONF_ENV_FILE": str(self.root / "rabbitmq-env.conf")}

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(self.BIN / "rabbitmqctl"), "-n", self.node, *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def start(self) -> None:
        out = self.log.open("ab")
        self.proc = subprocess.Popen([str(self.BIN / "rabbitmq-server")], env=self.env, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: self.proc.poll() is None and _listening(self.port), 120, "RabbitMQ")  # type: ignore[union-attr]


class KafkaBroker(Service):
    """The bundled Tansu broker (orchestrator/entrypoints/kafka_broker.py), its log kept in the
    private PostgreSQL so that a restart keeps topics, messages and committed offsets."""

    name = "kafka"

    def __init__(self, root: Path, storage: str) -> None:
        super().__init__(root)
        self.storage = storage

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        from orchestrator.entrypoints.kafka_broker import broker_binary

        url = f"tcp://127.0.0.1:{self.port}"
        out = self.log.open("ab")
        self.proc = subprocess.Popen(
            [str(broker_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage, "--cluster-id", "chaos"],
            env={**os.environ, "RUST_LOG": "warn"}, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        _wait(lambda: self.proc.poll() is None and _listening(self.port), 30, "the Kafka broker")  # type: ignore[union-attr]
