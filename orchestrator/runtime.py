"""One Runtime per process: settings, database, Celery app, relay and engine, wired once.

Made lazily on first use and made again after a fork, so no connection is ever shared
between processes (a prefork worker child gets its own).
"""
from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass
from celery import Celery
from sqlalchemy import Engine as SAEngine
from sqlalchemy.orm import Session, sessionmaker

from .config import Settings, load_settings
from .db import make_engine, make_session_factory
from .engine import Engine
from .outbox_relay import OutboxRelay, celery_publisher
from .workflow import registry

log = logging.getLogger(__name__)

celery_app = Celery("orchestrator")
celery_app.config_from_object("celeryconfig")


def configure_celery(app: Celery, settings: Settings) -> None:
    app.conf.update(broker_url=settings.broker_url, result_backend=settings.result_backend)
    if settings.broker_url.startswith("sqla+"):
        app.conf.broker_transport_options = {}  # confirms exist only on AMQP


@dataclass
class Runtime:
    settings: Settings
    db: SAEngine
    sessions: sessionmaker[Session]
    celery: Celery
    relay: OutboxRelay
    engine: Engine
    pid: int


_lock = threading.Lock()
_current: Runtime | None = None


def load_workflow_modules(settings: Settings) -> None:
    """Import WORKFLOW_MODULES (registering workflows, tasks and their settings) and check the
    settings they brought (ConfigError naming a bad variable)."""
    for name in filter(None, (n.strip() for n in settings.workflow_modules.split(","))):
        importlib.import_module(name)
    settings.check_areas()


def build(settings: Settings | None = None) -> Runtime:
    settings = settings or load_settings()
    configure_celery(celery_app, settings)
    load_workflow_modules(settings)
    # A step naming a task no module defines stops start-up here, naming both.
    registry.check_tasks(set(celery_app.tasks.keys()))
    db = make_engine(settings.database_url)
    sessions = make_session_factory(db)
    # SQLite serialises writers anyway; a second pool there would only add lock waits (the
    # relay's marks then go through the main engine, so they must commit explicitly)
    autocommit = None if settings.is_sqlite else make_engine(
        settings.database_url, pool_size=2, isolation_level="AUTOCOMMIT",
        # this pool only reads and marks outbox rows sent: a mark lost in a server crash costs
        # one duplicate send (consumers de-duplicate), so it need not wait for the disk
        connect_args={"options": "-c synchronous_commit=off"})
    relay = OutboxRelay(sessions, autocommit)
    relay.register("celery", celery_publisher(celery_app))
    if settings.kafka_brokers:
        from .kafka import KafkaPublisher

        relay.register("kafka", KafkaPublisher(settings.kafka_brokers))
    engine = Engine(settings, sessions, registry, relay=relay, autocommit=autocommit)
    relay.on_failed = engine.outbox_failed  # a row that can never be published fails its step
    return Runtime(settings, db, sessions, celery_app, relay, engine, os.getpid())


def current() -> Runtime:
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = build(_current.settings if _current is not None else None)
        return _current


def install(runtime: Runtime) -> Runtime:
    """Make `runtime` this process's runtime (the app factory and tests use this)."""
    global _current
    with _lock:
        _current = runtime
    return runtime


def reset() -> None:
    global _current
    with _lock:
        if _current is not None:
            _current.db.dispose()
        _current = None
