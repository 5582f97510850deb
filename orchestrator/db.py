"""Database engine and sessions, made per process (never at import)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker


#: How long a new PostgreSQL connection may take to open (libpq's connect_timeout, seconds).
CONNECT_TIMEOUT_SECONDS = 5


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        return _sqlite_engine(url, **kwargs)
    # No ping per checkout by default (it costs a round trip on every transaction); recycle
    # instead. The API asks for the ping (runtime.build(pre_ping=True)); a step's claim and
    # report that meet a dead connection are tried again (orchestrator/steps.py).
    kwargs.setdefault("pool_recycle", 300)
    kwargs.setdefault("pool_size", 5)
    kwargs.setdefault("max_overflow", 10)
    # A server that takes the connection and never answers (a partition, a hung host) held a
    # request, /readyz and /metrics for minutes: libpq gives up on a new connection after this.
    kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_SECONDS, **kwargs.get("connect_args", {})}
    return create_engine(url, **kwargs)


def make_autocommit_engine(url: str, **kwargs: Any) -> Engine | None:
    """A second, small pool in autocommit mode for statements that are a transaction of their
    own (reads, claims, outbox marks, transitions written in one statement): each goes without
    the BEGIN and COMMIT round trips around it. Its commits wait for the disk like any other, so
    a transition written there is as durable as one written in a session. None on SQLite, which
    serialises writers anyway: a second pool there would only add lock waits."""
    if url.startswith("sqlite"):
        return None
    return make_engine(url, pool_size=2, isolation_level="AUTOCOMMIT", **kwargs)


def _sqlite_engine(url: str, **kwargs: Any) -> Engine:
    """SQLite shared by several processes: WAL, a busy timeout, and BEGIN IMMEDIATE so that
    a read-then-write transaction takes the write lock up front instead of failing later."""
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, **kwargs)

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout=30000")
        _use_wal(dbapi_connection)
        dbapi_connection.execute("PRAGMA foreign_keys=ON")

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def _use_wal(dbapi_connection: Any) -> None:
    """Put the file in WAL mode (kept in the file: later connections find it so). Switching a new
    file needs its exclusive lock, and SQLite answers "database is locked" at once, not after
    the busy timeout, while another process holds a lock on it: processes starting together
    on a new file (`make run`) retry for up to the busy timeout (tenacity)."""
    if dbapi_connection.execute("PRAGMA journal_mode").fetchone()[0].lower() == "wal":
        return  # every connection after the file's first
    import sqlite3

    from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_random_exponential

    for attempt in Retrying(retry=retry_if_exception(lambda e: isinstance(e, sqlite3.OperationalError)
                                                     and "locked" in str(e)),
                            wait=wait_random_exponential(multiplier=0.01, max=0.5), stop=stop_after_delay(30),
                            reraise=True):
        with attempt:
            dbapi_connection.execute("PRAGMA journal_mode=WAL")


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions that note when they first use a connection (see `untouched`)."""
    factory = sessionmaker(engine, expire_on_commit=False)

    @event.listens_for(factory, "after_begin")
    def _connected(session: Session, *_: Any) -> None:
        session.info["connected"] = True

    return factory


def untouched(session: Session) -> bool:
    """True while `session` (of `make_session_factory`) has sent no statement and holds no
    ORM change to flush: a write that is the whole of its transaction may then go on a
    connection of its own."""
    return not session.info.get("connected") and not (session.new or session.dirty or session.deleted)
