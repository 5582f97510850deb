"""Migrations in several folders: the engine's history, and a workflow's own tables in its
package (`<package>/migrations/`, Alembic version_locations), applied by `orchestrator db upgrade`
to a database made by the previous version, on SQLite and PostgreSQL."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from conftest import PG_ADMIN, ROOT, _admin_engine, fresh_database
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, inspect, text

#: The engine's newest revision, which a workflow's own branch depends on.
ENGINE_HEAD = ScriptDirectory(str(ROOT / "orchestrator" / "migrations")).get_current_head()

REVISION = '''
"""notes of the example workflow

Revision ID: notes_0001
Revises:
"""
from alembic import op
import sqlalchemy as sa

revision = "notes_0001"
down_revision = None
branch_labels = ("notes",)
depends_on = "{engine_head}"


def upgrade() -> None:
    op.create_table("notes", sa.Column("id", sa.Integer(), primary_key=True), sa.Column("body", sa.Text()))


def downgrade() -> None:
    op.drop_table("notes")
'''


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'state.db'}"
        return
    name = f"orch_test_{uuid.uuid4().hex[:8]}"
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def db_upgrade(url: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "POSTGRES_", "WORKFLOW_"))}
    environ.update(DATABASE_URL=url, PYTHONPATH=os.pathsep.join([str(cwd), str(ROOT)]), **env)
    return subprocess.run([sys.executable, "-m", "orchestrator.entrypoints.cli", "db", "upgrade"], env=environ,
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def tables_and_heads(url: str) -> tuple[set[str], set[str]]:
    db = create_engine(url)
    try:
        with db.connect() as conn:
            heads = {r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))}
        return set(inspect(db).get_table_names()), heads
    finally:
        db.dispose()


def test_a_workflow_owns_its_tables_in_its_own_migrations_folder(empty_database: str, tmp_path: Path) -> None:
    # The previous version's database: the engine's history only.
    out = db_upgrade(empty_database, tmp_path)
    assert out.returncode == 0, out.stderr
    tables, heads = tables_and_heads(empty_database)
    assert {"workflow_instances", "workers", "chat_sessions"} <= tables and "notes" not in tables
    assert heads == {ENGINE_HEAD}

    # A workflow of one's own, with a table of its own beside it.
    package = tmp_path / "notes_workflow"
    (package / "migrations").mkdir(parents=True)
    (package / "__init__.py").write_text('"""An example workflow package owning one table."""\n')
    (package / "migrations" / "notes_0001.py").write_text(textwrap.dedent(REVISION).replace("{engine_head}", ENGINE_HEAD))
    modules = {"WORKFLOW_MODULES": "sagas,tasks,notes_workflow"}
    out = db_upgrade(empty_database, tmp_path, **modules)
    assert out.returncode == 0, out.stderr
    tables, heads = tables_and_heads(empty_database)
    # the branch depends on the engine's head, so Alembic keeps only the branch's head as current
    assert "notes" in tables and heads == {"notes_0001"}
    # Upgrading again changes nothing.
    assert db_upgrade(empty_database, tmp_path, **modules).returncode == 0
    assert tables_and_heads(empty_database) == (tables, heads)


def test_the_migrations_make_the_schema_the_models_describe(empty_database: str) -> None:
    """`db upgrade` from nothing gives the tables, columns, types, indexes and keys of the engine's
    and the built-in workflows' models, so a model changed without its migration fails here
    instead of on a user's existing database (a column the code writes that the table lacks).
    SQLite's lengths are left out: it keeps a VARCHAR's declared length but never enforces it,
    and cannot alter a column in place (migration 0006)."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import sagas  # noqa: F401  (the built-in workflows' tables: chat sessions and events, workers)
    from orchestrator.migrate import upgrade
    from orchestrator.models import Base

    upgrade(empty_database)
    db = create_engine(empty_database)
    try:
        with db.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": db.dialect.name != "sqlite"})
            assert compare_metadata(context, Base.metadata) == []
    finally:
        db.dispose()


def test_upgrades_started_together_take_turns(tmp_path: Path) -> None:
    """Several `db upgrade` at once on one new PostgreSQL database (replicas, the jobs of one
    deploy): each succeeds, the first migrating and the others finding the schema at its head.
    Before, two created the same table and one failed with a 97-line IntegrityError."""
    with fresh_database(migrated=False) as url:
        environ = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "POSTGRES_", "WORKFLOW_"))}
        environ.update(DATABASE_URL=url, PYTHONPATH=str(ROOT))
        procs = [subprocess.Popen([sys.executable, "-m", "orchestrator.entrypoints.cli", "db", "upgrade"], env=environ,
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(4)]
        outs = [p.communicate(timeout=180) for p in procs]
        assert [p.returncode for p in procs] == [0] * 4, [err[-2000:] for _, err in outs]
        assert tables_and_heads(url)[1] == {ENGINE_HEAD}
