"""On the embedded SQLite default the sweeper publishes without holding SQLite's write lock: a
slow broker (here one that accepts connections and never answers) must not stop every other
writer of the database for as long as the publish takes. Found with two test streams at once:
the sweeper's timers, the steps and the API waited past their 30 s busy timeout."""
from __future__ import annotations

import socket
import sqlite3
import threading
import time

import sagas  # noqa: F401  (registers the built-in workflows)
from conftest import engine_on
from orchestrator.entrypoints.ports import free_port

from orchestrator import migrate
from orchestrator.config import load_settings
from orchestrator.db import make_engine, make_session_factory
from orchestrator.outbox_relay import OutboxRelay, celery_publisher
from orchestrator.runtime import make_celery


class Silent:
    """A TCP port that accepts connections and never answers (a broker hung mid-handshake)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.accepted = threading.Event()
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            self.accepted.set()

    def close(self) -> None:
        self.listener.close()
        for conn in self.conns:
            conn.close()


def test_a_slow_publish_does_not_hold_the_write_lock(tmp_path):
    url = f"sqlite:///{tmp_path}/orchestrator.db"
    migrate.upgrade(url)
    silent = Silent()
    settings = load_settings(environ={"DATABASE_URL": url, "WORKFLOW_MODULES": "sagas,tasks",
                                      "CELERY_BROKER_URL": f"amqp://guest:guest@127.0.0.1:{silent.port}//"},
                             dotenv="/nonexistent")
    with engine_on(settings, url) as engine:  # no relay: the row waits for the sweep
        engine.start("media", {"youtube_url": "https://youtu.be/sqlitelock1"})
    db = make_engine(url)
    relay = OutboxRelay(make_session_factory(db))
    relay.register("celery", celery_publisher(make_celery(settings)))
    sweep = threading.Thread(target=relay.publish, kwargs={"grace_seconds": 0}, daemon=True)
    try:
        sweep.start()
        assert silent.accepted.wait(30), "the sweep never tried the broker"
        time.sleep(0.5)  # well inside the publish, which waits for the broker's answer
        writer = sqlite3.connect(f"{tmp_path}/orchestrator.db", timeout=2, isolation_level=None)
        started = time.monotonic()
        writer.execute("BEGIN IMMEDIATE")  # 'database is locked' after 2 s while the sweep holds it
        writer.execute("UPDATE workflow_instances SET updated_at = updated_at")
        writer.execute("COMMIT")
        writer.close()
        assert sweep.is_alive(), "the publish ended before the write was tried: the test proved nothing"
        assert time.monotonic() - started < 2
    finally:
        silent.close()
        sweep.join(120)  # it gives up on the closed port; a failure above stays the one reported
        db.dispose()
