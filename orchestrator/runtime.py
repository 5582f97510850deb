"""One Runtime per process: settings, database, Celery app, relay and engine, wired once.

Made lazily on first use and made again after a fork, so no connection is ever shared
between processes (a prefork worker child gets its own).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable

from celery import Celery
from celery.utils.imports import import_from_cwd
from sqlalchemy import Engine as SAEngine
from sqlalchemy.orm import Session, sessionmaker
from statemachine.exceptions import InvalidDefinition

from .config import Settings, load_settings
from .db import make_autocommit_engine, make_engine, make_session_factory
from .engine import Engine
from .errors import ConfigError, WorkflowDefinitionError
from .logs import mask_url
from .outbox_relay import OutboxRelay, celery_publisher
from .workflow import registry

log = logging.getLogger(__name__)

#: How often (seconds) a consumer of the embedded broker (kombu's SQLAlchemy transport) looks for
#: messages while it has none, or holds as many as it may take. At kombu's 1 s default a worker
#: with four pool processes took about four deliveries a second: `make run` ran 4 workflows/s.
EMBEDDED_BROKER_POLL_SECONDS = 0.1


def make_celery(settings: Settings) -> Celery:
    """A Celery app of one runtime's own, on `settings`' broker and result backend, configured by
    celeryconfig.py. Every task of the product is a `shared_task`, so each app holds them all; an
    app per runtime means a second runtime built in one process (a test, a benchmark) never moves
    another's publishing or control to its broker."""
    app = Celery("orchestrator", set_as_current=False)
    app.config_from_object("celeryconfig")
    configure_celery(app, settings)
    return app


def configure_celery(app: Celery, settings: Settings) -> None:
    """Point `app` at `settings`' broker and result backend (the execution emulator's app too).
    On the embedded SQLite broker, also create its tables and queues (`prepare_embedded_broker`)."""
    app.conf.update(broker_url=settings.broker_url, result_backend=settings.result_backend)
    if settings.broker_url.startswith("sqla+"):
        # kombu hands these to SQLAlchemy's create_engine: no AMQP confirms, and the busy timeout
        # of our own SQLite files (pysqlite's 5 s default lets a loaded machine fail a publish
        # or drop a worker's consumer with "database is locked")
        app.conf.broker_transport_options = {"connect_args": {"timeout": 30}}
        # kombu hands every transport option to create_engine, `polling_interval` too (which
        # then fails): the transport's own default is the one place to set it
        from kombu.transport import sqlalchemy as kombu_sqla

        kombu_sqla.Transport.polling_interval = EMBEDDED_BROKER_POLL_SECONDS
        if settings.broker_url.startswith("sqla+sqlite:"):
            prepare_embedded_broker(app)


_prepared_brokers: dict[str, set[str]] = {}  # url -> its queues made; per process, a forked child inherits it


def prepare_embedded_broker(app: Celery, queues: Iterable[str] = ()) -> None:
    """Create the tables of kombu's SQLAlchemy transport and a row for each of `app`'s queues
    and of `queues` (names: those of a plain kombu consumer, such as the calculation queues),
    once, under SQLite's write lock (BEGIN IMMEDIATE, see db.make_engine).

    kombu creates both lazily in every process, unguarded: processes that first use a new
    broker.db at once (`make run` starts them together) lose that race with "table kombu_queue
    already exists" or a UNIQUE failure on kombu_queue.name. A worker that loses it stops
    ("Unrecoverable error: IntegrityError"), and a publisher's session is left unusable until
    its process restarts. Idempotent; the tables' names come from kombu's own channel."""
    url = app.conf.broker_url
    names = sorted({app.conf.task_default_queue, *app.amqp.queues, *queues})
    if set(names) <= _prepared_brokers.get(url, set()):
        return
    from kombu.transport.sqlalchemy.models import metadata
    from sqlalchemy.dialects.sqlite import insert

    with app.connection_for_write() as conn:
        table = conn.default_channel.queue_cls.__table__  # registers kombu's models in `metadata`
    db = make_engine(url.removeprefix("sqla+"))
    try:
        with db.begin() as tx:
            metadata.create_all(tx)  # checkfirst, inside the transaction: one process creates them
            tx.execute(insert(table).on_conflict_do_nothing(), [{"name": n} for n in names])
    finally:
        db.dispose()
    _prepared_brokers.setdefault(url, set()).update(names)


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
        try:
            import_from_cwd(name)  # as Celery finds `-A proj`: the folder a process starts in comes first
        except ModuleNotFoundError as exc:
            if exc.name is None or not (name == exc.name or name.startswith(exc.name + ".")):
                raise  # the module is there, something it imports is not: its traceback says where
            raise ConfigError("WORKFLOW_MODULES", f"no module named '{name}' in the current folder "
                                                  f"({os.getcwd()}) or on PYTHONPATH") from None
        except (WorkflowDefinitionError, InvalidDefinition) as exc:  # ours, or python-statemachine's
            raise ConfigError("WORKFLOW_MODULES", f"{name}: {exc}") from None
    settings.check_areas()


def build(settings: Settings | None = None, *, pre_ping: bool = False) -> Runtime:
    """The process's runtime (settings, database pools, Celery app, relay, engine).

    `pre_ping`: each pooled connection is tested (one round trip) before it is used, so a
    connection a database restart broke is replaced instead of failing its request (SQLAlchemy's
    `pool_pre_ping`). The API sets it; the step path would pay the round trip per statement and
    tries a failed claim or report again instead (orchestrator/steps.py)."""
    settings = settings or load_settings()
    load_workflow_modules(settings)
    app = make_celery(settings)
    # A step naming a task no module defines stops start-up here, naming both.
    try:
        registry.check_tasks(set(app.tasks.keys()))
    except WorkflowDefinitionError as exc:
        raise ConfigError("WORKFLOW_MODULES", str(exc)) from None
    db = make_engine(settings.database_url, pool_pre_ping=pre_ping)
    sessions = make_session_factory(db)
    autocommit = make_autocommit_engine(settings.database_url, pool_pre_ping=pre_ping)
    relay = OutboxRelay(sessions, autocommit)
    relay.register("celery", celery_publisher(app))
    if settings.kafka_brokers:
        from .kafka import KafkaPublisher

        relay.register("kafka", KafkaPublisher(settings.kafka_brokers))
    engine = Engine(settings, sessions, registry, relay=relay, autocommit=autocommit)
    relay.on_failed = engine.outbox_failed  # a row that can never be published fails its step
    return Runtime(settings, db, sessions, app, relay, engine, os.getpid())


def current() -> Runtime:
    global _current
    with _lock:
        if _current is None or _current.pid != os.getpid():
            _current = build(_current.settings if _current is not None else None)
            _current.celery.set_current()
        return _current


def install(runtime: Runtime) -> Runtime:
    """Make `runtime` this process's runtime (the app factory and tests use this)."""
    global _current
    with _lock:
        _current = runtime
        runtime.celery.set_current()
    return runtime


def reset() -> None:
    global _current
    with _lock:
        if _current is not None:
            _current.db.dispose()
        _current = None


# -- waiting for the services at start-up --------------------------------------------------------
#: Seconds between two tries while a service is unreachable: 0.5, 1, 2, ... at most this.
WAIT_MAX_BACKOFF = 10.0
#: Seconds one try may take before it counts as failed.
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Dependency:
    """A service a process needs: its `name` ("database", "broker", "redis"), its address with the
    password masked, and `probe`, which returns when the service answers and raises otherwise."""

    name: str
    address: str
    probe: Callable[[], None]
    variable: str = "DATABASE_URL"  # the setting that points at it, named when it stays unreachable


def _probe_database(url: str) -> Callable[[], None]:
    def probe() -> None:
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        db = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": int(PROBE_TIMEOUT)})
        try:
            with db.connect() as conn:
                conn.execute(text("SELECT 1"))
        finally:
            db.dispose()
    return probe


def _probe_schema(settings: Settings) -> Callable[[], None]:
    def probe() -> None:
        from sqlalchemy import create_engine
        from sqlalchemy.pool import NullPool

        from .migrate import check_schema

        db = create_engine(settings.database_url, poolclass=NullPool)
        try:
            with db.connect() as conn:
                check_schema(conn, settings.workflow_modules)
        finally:
            db.dispose()
    return probe


def _probe_broker(url: str) -> Callable[[], None]:
    def probe() -> None:
        from kombu import Connection

        with Connection(url, connect_timeout=PROBE_TIMEOUT) as conn:
            conn.ensure_connection(max_retries=1, timeout=PROBE_TIMEOUT)
    return probe


def _probe_redis(url: str) -> Callable[[], None]:
    def probe() -> None:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=PROBE_TIMEOUT, socket_timeout=PROBE_TIMEOUT)
        try:
            client.ping()
        finally:
            client.close()
    return probe


#: What a long-running process waits for before it starts (`orchestrator db upgrade` waits for
#: the database only: it is what brings the schema).
NEEDS = ("database", "schema", "broker", "redis")


def dependencies(settings: Settings, needs: Iterable[str] = NEEDS) -> list[Dependency]:
    """The services among `needs` that `settings` point at: PostgreSQL (not an SQLite file),
    the database's schema at every migration head ("schema", on SQLite too: a process started
    before `orchestrator db upgrade` would fail on missing tables), RabbitMQ (not the embedded
    SQLite broker) and Redis (REDIS_URL, or a redis:// result backend). Embedded services need
    no waiting and are left out."""
    out: list[Dependency] = []
    wanted = set(needs)
    if "database" in wanted and not settings.is_sqlite:
        out.append(Dependency("database", mask_url(settings.database_url), _probe_database(settings.database_url)))
    if "schema" in wanted:
        out.append(Dependency("database schema", mask_url(settings.database_url), _probe_schema(settings)))
    if "broker" in wanted and not settings.broker_url.startswith("sqla+"):
        out.append(Dependency("broker", mask_url(settings.broker_url), _probe_broker(settings.broker_url),
                              "CELERY_BROKER_URL"))
    if "redis" in wanted:
        redis_urls = dict.fromkeys(u for u in (settings.redis_url, settings.result_backend)
                                   if u.startswith(("redis://", "rediss://")))
        for url in redis_urls:
            out.append(Dependency("redis", mask_url(url), _probe_redis(url),
                                  "REDIS_URL" if url == settings.redis_url else "CELERY_RESULT_BACKEND"))
    return out


def wait_for_services(settings: Settings, needs: Iterable[str] = NEEDS,
                      stop: threading.Event | None = None) -> bool:
    """Block until every service among `needs` (see `dependencies`) answers, trying each again
    after 0.5, 1, 2, ... (at most WAIT_MAX_BACKOFF) seconds and logging, at WARNING, what it
    waits for (name, address without password, the error). Returns False if `stop` was set
    meanwhile; raises ConfigError naming the service's variable (DATABASE_URL, CELERY_BROKER_URL,
    REDIS_URL...) when it stayed unreachable longer than STARTUP_WAIT_SECONDS (0: wait for ever). Every long-running entry point calls it first,
    so a process started before PostgreSQL, RabbitMQ or Redis waits instead of crashing."""
    from tenacity import (RetryCallState, Retrying, retry_if_exception_type, stop_after_delay, stop_never,
                          wait_exponential)

    from .logs import first_line

    stop = stop or threading.Event()
    limit = settings.startup_wait_seconds
    for dep in dependencies(settings, needs):
        def waiting(state: RetryCallState, dep: Dependency = dep) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("waiting for the %s at %s (%s: %s); next try in %.1fs", dep.name, dep.address,
                        type(exc).__name__, first_line(exc, 200) if exc else "",
                        state.upcoming_sleep)

        def probe(dep: Dependency = dep) -> None:
            if stop.is_set():
                return
            dep.probe()

        started = time.monotonic()
        retrying = Retrying(retry=retry_if_exception_type(Exception),
                            wait=wait_exponential(multiplier=0.5, min=0.5, max=WAIT_MAX_BACKOFF),
                            stop=stop_after_delay(limit) if limit else stop_never, sleep=stop.wait,
                            before_sleep=waiting, reraise=True)
        try:
            retrying(probe)
        except Exception as exc:
            # named by the variable that points at it (the address may be wrong); the wait's own
            # setting is the other way out
            raise ConfigError(dep.variable, f"the {dep.name} at {dep.address} stayed unreachable for {limit:g}s "
                              f"({type(exc).__name__}: {first_line(exc, 200)}); STARTUP_WAIT_SECONDS sets "
                              "how long processes wait") from None
        if stop.is_set():
            return False
        if retrying.statistics.get("attempt_number", 1) > 1:
            log.warning("the %s at %s answers after %.1fs", dep.name, dep.address, time.monotonic() - started)
    return True
