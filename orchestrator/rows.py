"""Rows as plain objects, and one transaction's writes sent in one round trip.

The engine reads rows with Core statements into `Record`s, lets the machine and the step logic
change them, and writes what changed when the transaction ends. Every write hangs off the
instance row, whose `version` is checked and bumped:

    WITH i AS (UPDATE workflow_instances SET ..., version = version + 1
               WHERE id = :id AND version = :read RETURNING id),
         w1 AS (UPDATE step_runs SET ... FROM i WHERE step_runs.id = :run),
         w2 AS (INSERT INTO history (...) SELECT ... FROM i),
         w3 AS (INSERT INTO step_claims (...) SELECT ... FROM i ON CONFLICT (...) DO UPDATE ...), ...
    SELECT count(*) FROM i

Under the instance's lock the check always holds. A writer that read without the lock (a step
reporting on what it read when it was claimed) writes nothing at all if anyone wrote since,
and does it again under the lock. On PostgreSQL this is one statement, prepared once per
connection and shape (`DATABASE_PREPARED_STATEMENTS`); elsewhere (SQLite, or a transaction that
touches several instances) the same writes go out as plain statements.
"""
from __future__ import annotations

import json
import weakref
from typing import Any, Iterable

from sqlalchemy import JSON, Connection, DateTime, Table, UniqueConstraint, update
from sqlalchemy.dialects import postgresql, sqlite

from .models import WorkflowInstance

INSTANCES: Table = WorkflowInstance.__table__  # type: ignore[assignment]


_NAMES: dict[Table, frozenset[str]] = {}
_JSON_NAMES: dict[Table, frozenset[str]] = {}


def _names(table: Table) -> frozenset[str]:
    """The table's column names (a set lookup; `name in table.c` is a Python method call)."""
    names = _NAMES.get(table)
    if names is None:
        names = _NAMES[table] = frozenset(c.name for c in table.c)
    return names


def _json_names(table: Table) -> frozenset[str]:
    names = _JSON_NAMES.get(table)
    if names is None:
        names = _JSON_NAMES[table] = frozenset(c.name for c in table.c if isinstance(c.type, JSON))
    return names


class StaleBasis(Exception):
    """The instance changed since it was read without a lock: nothing was written."""


class Record:
    """A row as attributes; remembers which columns were set, so an update writes only those."""

    __slots__ = ("_values", "_dirty")

    def __init__(self, values: dict[str, Any], new: bool = False) -> None:
        object.__setattr__(self, "_values", values)
        object.__setattr__(self, "_dirty", None if new else set())

    @classmethod
    def loaded(cls, row: Any) -> "Record":
        return cls(dict(row._mapping))

    def __getattr__(self, name: str) -> Any:
        try:
            return self._values[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self._values[name] = value
        if self._dirty is not None:
            self._dirty.add(name)

    def touch(self, name: str) -> None:
        """A JSON value was changed in place: write it."""
        if self._dirty is not None:
            self._dirty.add(name)

    @property
    def is_new(self) -> bool:
        return self._dirty is None

    def changes(self, table: Table) -> dict[str, Any]:
        # sorted: the same change is the same statement text, so its prepared plan is reused
        names = _names(table)
        return {k: self._values[k] for k in sorted(self._dirty or ()) if k in names and k != "id"}

    def insert_values(self, table: Table) -> dict[str, Any]:
        names = _names(table)
        return {k: v for k, v in self._values.items() if k in names and not (k == "id" and v is None)}

    def row_key(self, table: Table) -> dict[str, Any]:
        """What an update finds the row by: its `id`, or, for a row inserted by an earlier
        transaction whose id was never read (`as_read`), the table's unique constraint."""
        if self._values.get("id") is not None:
            return {"id": self._values["id"]}
        unique = next(c for c in table.constraints if isinstance(c, UniqueConstraint))
        return {c.name: self._values[c.name] for c in unique.columns}

    def as_read(self, table: Table) -> dict[str, Any]:
        """The row's values as a read right after its transaction committed would return them:
        JSON values through JSON (a tuple comes back a list, an integer key a string), an `id`
        the database assigned and nobody read as None (see `row_key`)."""
        out = {"id": None} if "id" in _names(table) else {}
        for k, v in self._values.items():
            out[k] = json.loads(json.dumps(v)) if v is not None and k in _json_names(table) else v
        return out

    def __repr__(self) -> str:
        return f"Record({self._values!r})"


class Writes:
    """What one transaction writes: new rows, changed rows, and the instances they belong to.

    `versions` holds the version each instance was read at; an instance written to without
    having been read gets its version bumped unchecked (its lock is not needed for that write).
    """

    def __init__(self) -> None:
        self.new: list[tuple[Table, Record]] = []
        # rows inserted or, when their primary key exists, written over (a step's claim)
        self.upserts: list[tuple[Table, Record]] = []
        self.loaded: list[tuple[Table, Record]] = []
        self.instances: dict[str, Record] = {}
        self.versions: dict[str, int] = {}
        self.touched: set[str] = set()

    def add(self, table: Table, record: Record) -> Record:
        self.new.append((table, record))
        if table is INSTANCES:
            self.instances[record.id] = record
        else:
            self._touch(record)
        return record

    def upsert(self, table: Table, record: Record) -> Record:
        """`record` inserted, or written over the row with the same primary key."""
        self.upserts.append((table, record))
        self._touch(record)
        return record

    def track(self, table: Table, record: Record) -> Record:
        self.loaded.append((table, record))
        if table is INSTANCES:
            self.instances[record.id] = record
            self.versions[record.id] = record.version
        return record

    def _touch(self, record: Record) -> None:
        instance_id = record._values.get("instance_id")
        if instance_id is not None:
            self.touched.add(instance_id)

    def _ids(self) -> set[str]:
        """The instances whose rows this transaction writes."""
        for table, record in self.loaded:
            if table is not INSTANCES and record.changes(table):
                self._touch(record)
        return self.touched | {i for i, r in self.instances.items() if r.is_new or r.changes(INSTANCES)}

    def one_statement(self) -> bool:
        """Whether `flush` on PostgreSQL sends one statement (it writes one instance's rows)."""
        return len(self._ids()) == 1

    def flush(self, conn: Connection, prepare: bool = False) -> None:
        ids = self._ids()
        if not ids and not self.new:
            return
        if conn.dialect.name == "postgresql" and len(ids) == 1:
            self._flush_one_statement(conn, next(iter(ids)), prepare)
        else:
            self._flush_statements(conn, ids)

    # -- plain statements, in an order the foreign keys accept ---------------------------------
    def _flush_statements(self, conn: Connection, ids: Iterable[str]) -> None:
        for table, record in self.new:
            if table is INSTANCES:
                conn.execute(table.insert().values(record.insert_values(table)))
        for instance_id in sorted(ids):  # a fixed order, so two such writers cannot deadlock
            record = self.instances.get(instance_id)
            if record is not None and record.is_new:
                continue
            values = record.changes(INSTANCES) if record is not None else {}
            stmt = update(INSTANCES).where(INSTANCES.c.id == instance_id)
            if instance_id in self.versions:
                stmt = stmt.where(INSTANCES.c.version == self.versions[instance_id])
            if conn.execute(stmt.values(**values, version=INSTANCES.c.version + 1)).rowcount != 1:
                raise StaleBasis(instance_id)
        for table, record in self.loaded:
            values = record.changes(table) if table is not INSTANCES else None
            if values:
                conn.execute(update(table).where(*(table.c[k] == v for k, v in record.row_key(table).items()))
                             .values(**values))
        for table, record in self.new:
            if table is not INSTANCES:
                conn.execute(table.insert().values(record.insert_values(table)))
        for table, record in self.upserts:
            values = record.insert_values(table)
            conn.execute(_upsert(conn.dialect.name, table, tuple(values)), values)

    # -- PostgreSQL: one statement, every write conditional on the instance's version ----------
    def _flush_one_statement(self, conn: Connection, instance_id: str, prepare: bool) -> None:
        sql = _Sql(positional=prepare)
        root = self.instances.get(instance_id)
        if root is not None and root.is_new:
            head = sql.insert_returning_id(INSTANCES, root.insert_values(INSTANCES))
        else:
            values = root.changes(INSTANCES) if root is not None else {}
            sets = [f"{k} = {sql.param(INSTANCES, k, v)}" for k, v in values.items()]
            sets.append("version = version + 1")
            where = f"id = {sql.bind(instance_id)}"
            if instance_id in self.versions:
                where += f" AND version = {sql.bind(self.versions[instance_id])}"
            head = f"UPDATE workflow_instances SET {', '.join(sets)} WHERE {where} RETURNING id"
        parts = [f"i AS ({head})"]
        for table, record in self.loaded:
            values = record.changes(table) if table is not INSTANCES else None
            if values:
                sets = ", ".join(f"{k} = {sql.param(table, k, v)}" for k, v in values.items())
                where = " AND ".join(f"{table.name}.{k} = {sql.bind(v)}" for k, v in record.row_key(table).items())
                parts.append(f"w{len(parts)} AS (UPDATE {table.name} SET {sets} FROM i WHERE {where})")
        grouped: dict[Table, list[dict[str, Any]]] = {}
        for table, record in self.new:
            if table is not INSTANCES:
                grouped.setdefault(table, []).append(record.insert_values(table))
        for table, rows in grouped.items():
            parts.append(f"w{len(parts)} AS ({sql.insert_rows(table, rows, 'i')})")
        for table, record in self.upserts:
            values = record.insert_values(table)
            keys = [c.name for c in table.primary_key]
            sets = ", ".join(f"{k} = excluded.{k}" for k in values if k not in keys)
            parts.append(f"w{len(parts)} AS ({sql.insert_rows(table, [values], 'i')} "
                         f"ON CONFLICT ({', '.join(keys)}) DO UPDATE SET {sets})")
        statement = f"WITH {', '.join(parts)} SELECT count(*) FROM i"
        if prepare:
            written = execute_prepared(conn, statement, sql.params).scalar()
        else:
            written = conn.exec_driver_sql(statement, sql.params).scalar()
        if written != 1:
            raise StaleBasis(instance_id)


class _Sql:
    """Parameters for a hand-written statement, typed by their column: psycopg2's pyformat, or
    PostgreSQL's $1, $2, ... for a prepared statement."""

    def __init__(self, positional: bool = False) -> None:
        self.params: Any = [] if positional else {}

    def bind(self, value: Any) -> str:
        n = len(self.params)
        if isinstance(self.params, list):
            self.params.append(value)
            return f"${n + 1}"
        self.params[f"p{n}"] = value
        return f"%(p{n})s"

    def param(self, table: Table, column: str, value: Any) -> str:
        if value is not None and isinstance(table.c[column].type, JSON):
            from psycopg2.extras import Json

            value = Json(value)
        return self.bind(value)

    def insert_returning_id(self, table: Table, values: dict[str, Any]) -> str:
        row = ", ".join(self.param(table, k, v) for k, v in values.items())
        return f"INSERT INTO {table.name} ({', '.join(values)}) VALUES ({row}) RETURNING id"

    def insert_rows(self, table: Table, rows: list[dict[str, Any]], source: str) -> str:
        """Rows inserted once `source` has a row, in list order (so serial ids follow it)."""
        columns = list(rows[0])
        # A NULL or a string in VALUES would be typed as text: say each column's type.
        values = ", ".join(
            "(" + ", ".join([str(n)] + [f"CAST({self.param(table, k, row.get(k))} AS {_pg_type(table, k)})"
                                        for k in columns]) + ")"
            for n, row in enumerate(rows))
        names = ", ".join(columns)
        return (f"INSERT INTO {table.name} ({names}) SELECT {names} FROM {source}, "
                f"(VALUES {values}) AS v(n, {names}) ORDER BY n")


_PG_TYPES: dict[tuple[str, str], str] = {}


def _pg_type(table: Table, column: str) -> str:
    key = (table.name, column)
    found = _PG_TYPES.get(key)
    if found is None:
        found = _PG_TYPES[key] = table.c[column].type.compile(dialect=postgresql.dialect())
    return found



_UPSERTS: dict[tuple[str, Table, tuple[str, ...]], Any] = {}


def _upsert(dialect: str, table: Table, columns: tuple[str, ...]) -> Any:
    """INSERT .. ON CONFLICT (primary key) DO UPDATE of the other columns, for a row of these
    columns; built once per shape (building it costs more than running it)."""
    stmt = _UPSERTS.get((dialect, table, columns))
    if stmt is None:
        insert = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table)
        keys = set(table.primary_key.columns.keys())
        stmt = _UPSERTS[(dialect, table, columns)] = insert.on_conflict_do_update(
            index_elements=list(table.primary_key), set_={k: insert.excluded[k] for k in columns if k not in keys})
    return stmt


# -- many rows of one table -----------------------------------------------------------------------
#: (dialect, table, columns, skip_existing) -> the JSON-parameter INSERT, or None where it does not apply
_MANY_SQL: dict[tuple[str, Table, tuple[str, ...], bool], str | None] = {}


def insert_many(conn: Connection, table: Table, rows: list[dict[str, Any]], *,
                skip_existing: bool = False) -> list[Any]:
    """Rows of one shape (the same columns) inserted by one statement, in list order (so serial
    ids follow it). `skip_existing`: a row whose unique key exists is skipped (ON CONFLICT DO
    NOTHING) and the primary keys of the rows inserted are returned; otherwise [].

    On PostgreSQL the rows travel as one JSON parameter that `json_populate_recordset` turns
    into rows of the table's own type: a short statement with one bind, where an INSERT with
    a VALUES row per row had a bind per value for SQLAlchemy and psycopg2 to render and
    PostgreSQL to parse (the Kafka bridge's batches wrote their rows in less than half the time;
    docs/performance.md, "Kafka intake"). Elsewhere, or for a shape that leaves out a column
    with a Python-side default (only SQLAlchemy fills that in), SQLAlchemy's executemany."""
    if not rows:
        return []
    columns = tuple(rows[0])
    sql = _json_insert(conn, table, columns, skip_existing)
    if sql is None:
        if skip_existing:
            insert = (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)
            pk = list(table.primary_key)[0]
            return list(conn.execute(insert.on_conflict_do_nothing().returning(pk), rows).scalars())
        conn.execute(table.insert(), rows)
        return []
    dates = [c for c in columns if isinstance(table.c[c].type, DateTime)]
    if dates:  # JSON has no timestamp: ISO 8601 with its offset, which PostgreSQL parses exactly
        rows = [{**r, **{c: r[c].isoformat() for c in dates if r[c] is not None}} for r in rows]
    result = conn.exec_driver_sql(sql, (_json_rows(rows),))
    return list(result.scalars()) if skip_existing else []


def _json_rows(rows: list[dict[str, Any]]) -> str:
    """`rows` as one JSON text, by orjson: the Kafka bridge's committer thread spent a quarter of
    its time in the standard library's encoder, holding the GIL its batches' handlers wait for
    (orjson encodes a batch's 500 instance rows in 0.3 ms instead of 4.8 ms; docs/performance.md,
    "Kafka intake"). What orjson refuses goes to the standard encoder, which keeps its verdict:
    a datetime inside a JSON value (orjson would write it; `OPT_PASSTHROUGH_DATETIME` hands it to
    the missing `default`, which raises), an integer beyond 64 bits, a key that is not a string.
    A float NaN or infinity, which no JSON holds, is written as null by orjson: the rows come
    from the engine and a workflow's callbacks, and every value from outside was refused such
    numbers where it entered (`jsonutil.unstorable`)."""
    import orjson  # here: only a Kafka bridge writes batches, and a worker process spares its 1.8 MiB

    try:
        return orjson.dumps(rows, option=orjson.OPT_PASSTHROUGH_DATETIME).decode()
    except TypeError:  # orjson.JSONEncodeError is one
        return json.dumps(rows, ensure_ascii=False, allow_nan=False, separators=(",", ":"))


def _json_insert(conn: Connection, table: Table, columns: tuple[str, ...], skip_existing: bool) -> str | None:
    key = (conn.dialect.name, table, columns, skip_existing)
    if key not in _MANY_SQL:
        defaulted = any(c.default is not None and c.name not in columns for c in table.c)
        if key[0] != "postgresql" or defaulted:
            _MANY_SQL[key] = None
        else:
            quote = conn.dialect.identifier_preparer.quote
            name, names = quote(table.name), ", ".join(quote(c) for c in columns)
            sql = (f"INSERT INTO {name} ({names}) SELECT {names} FROM "
                   f"json_populate_recordset(NULL::{name}, %s) WITH ORDINALITY AS r ORDER BY r.ordinality")
            if skip_existing:
                sql += f" ON CONFLICT DO NOTHING RETURNING {quote(list(table.primary_key)[0].name)}"
            _MANY_SQL[key] = sql
    return _MANY_SQL[key]


# -- prepared statements -------------------------------------------------------------------------
# PostgreSQL plans a statement on every call unless it is prepared; for the engine's few statement
# shapes that planning was half the server's time. Names are per DBAPI connection (a reconnect
# starts afresh); a PREPARE survives a rolled-back transaction.
_PREPARED: "weakref.WeakKeyDictionary[Any, dict[str, str]]" = weakref.WeakKeyDictionary()
MAX_PREPARED = 200  # per connection; then all are dropped and prepared again as they come


def execute_prepared(conn: Connection, sql: str, params: list[Any]) -> Any:
    """Run `sql` (placeholders $1, $2, ...) as a prepared statement of this connection."""
    dbapi = conn.connection.dbapi_connection
    names = _PREPARED.get(dbapi)
    if names is None:
        names = _PREPARED[dbapi] = {}
    name = names.get(sql)
    if name is None:
        if len(names) >= MAX_PREPARED:
            conn.exec_driver_sql("DEALLOCATE ALL")
            names.clear()
        name = f"orch_{len(names) + 1}"
        conn.exec_driver_sql(f"PREPARE {name} AS {sql}")
        names[sql] = name
    if not params:
        return conn.exec_driver_sql(f"EXECUTE {name}")
    return conn.exec_driver_sql(f"EXECUTE {name} ({', '.join(['%s'] * len(params))})", tuple(params))
