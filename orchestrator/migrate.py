"""Schema migrations (Alembic), run by `orchestrator db upgrade` and by the dev runner.

One history, several folders (Alembic `version_locations`): the engine's own revisions in
`orchestrator/migrations/versions/`, then a `migrations/` folder in any package of a workflow
module (`WORKFLOW_MODULES`, e.g. `sagas/<workflow>/migrations/`) for the tables that workflow
owns. A workflow's revisions form a branch of their own (`branch_labels = ("<workflow>",)`,
`depends_on` the engine revision they need), so `upgrade` goes to every head ("heads").

The revisions up to 0007 (the engine's tables, and the `workers` and `chat_*` tables that came
with them) stay in the engine's folder as shared history: moving them would change nothing for
Alembic but would make the engine's chain depend on a workflow's folder. docs/architecture.md
lists which workflow uses which table.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config

from .config import Settings

MIGRATIONS = Path(__file__).with_name("migrations")
DEFAULT_WORKFLOW_MODULES = Settings.model_fields["workflow_modules"].default


def workflow_migration_folders(workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> list[Path]:
    """Every `migrations/` folder holding revisions in the packages of `workflow_modules`
    (comma-separated module names), the package itself and its direct subpackages, sorted.
    Found on disk: no workflow module is imported."""
    found: set[Path] = set()
    for name in filter(None, (n.strip() for n in workflow_modules.split(","))):
        spec = importlib.util.find_spec(name)
        for root in (spec.submodule_search_locations or []) if spec else []:
            for folder in [Path(root) / "migrations", *Path(root).glob("*/migrations")]:
                if folder.is_dir() and any(folder.glob("*.py")):
                    found.add(folder.resolve())
    return sorted(found)


def alembic_config(database_url: str, workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    locations = [MIGRATIONS / "versions", *workflow_migration_folders(workflow_modules)]
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    return cfg


def upgrade(database_url: str, revision: str = "heads", workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> None:
    """Upgrade to `revision` (default: every head, the engine's and each workflow's branch)."""
    command.upgrade(alembic_config(database_url, workflow_modules), revision)


def downgrade(database_url: str, revision: str, workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> None:
    command.downgrade(alembic_config(database_url, workflow_modules), revision)


@functools.cache
def heads(workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> frozenset[str]:
    """The revision at the tip of each branch (the engine's and each workflow's), read from the
    migration folders once per process."""
    from alembic.script import ScriptDirectory

    return frozenset(ScriptDirectory.from_config(alembic_config("sqlite://", workflow_modules)).get_heads())


class SchemaBehind(Exception):
    """The database answers, but its schema lacks migrations this code needs."""


def check_schema(conn: Any, workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> None:
    """Raise SchemaBehind, naming the missing heads and the command that adds them, unless the
    schema on `conn` is at every head (`missing_heads`)."""
    missing = missing_heads(conn, workflow_modules)
    if missing:
        raise SchemaBehind(f"the schema is not at revision {', '.join(missing)}: run `orchestrator db upgrade`")


def missing_heads(conn: Any, workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> list[str]:
    """The heads the schema on `conn` (a SQLAlchemy Connection) has not reached, sorted; empty
    when `orchestrator db upgrade` has nothing left to do. A database never migrated has no
    `alembic_version` table and misses every head."""
    from alembic.runtime.migration import MigrationContext

    current = set(MigrationContext.configure(conn).get_current_heads())
    return sorted(heads(workflow_modules) - current)
