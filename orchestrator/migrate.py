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

Alembic (with Mako and Pygments) costs about 9 MiB of RSS in a process that imports it, which a
prefork worker would pay in each of its processes. So only the commands that migrate import it:
the schema check of the long-running processes and `/readyz` (`check_schema`) reads the
`alembic_version` table with SQLAlchemy, and takes the heads from `python -m orchestrator.migrate`
run once per process (`heads`).
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import Settings

if TYPE_CHECKING:
    from alembic.config import Config

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
    """Alembic's configuration for `database_url`: the engine's revisions and every workflow's
    migration folder (`workflow_migration_folders`) as its version locations."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    locations = [MIGRATIONS / "versions", *workflow_migration_folders(workflow_modules)]
    cfg.set_main_option("path_separator", "os")
    cfg.set_main_option("version_locations", os.pathsep.join(str(p) for p in locations))
    return cfg


def upgrade(database_url: str, revision: str = "heads", workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> None:
    """Upgrade to `revision` (default: every head, the engine's and each workflow's branch)."""
    from alembic import command

    command.upgrade(alembic_config(database_url, workflow_modules), revision)


def downgrade(database_url: str, revision: str, workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> None:
    """Downgrade to `revision` (an id, or relative such as `-1`)."""
    from alembic import command

    command.downgrade(alembic_config(database_url, workflow_modules), revision)


@functools.cache
def heads(workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> frozenset[str]:
    """The revision at the tip of each branch (the engine's and each workflow's), read from the
    migration folders once per process, by Alembic in a child process (`script_heads`) so that
    this one does not load it. Raises RuntimeError, with the child's last line, when it fails."""
    path = os.pathsep.join(p for p in sys.path if p)  # the workflow modules this process finds
    done = subprocess.run([sys.executable, "-m", "orchestrator.migrate", workflow_modules],
                          env={**os.environ, "PYTHONPATH": path}, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
        raise RuntimeError(f"could not read the migration heads: {last}")
    return frozenset(done.stdout.split())


def script_heads(workflow_modules: str = DEFAULT_WORKFLOW_MODULES) -> list[str]:
    """The heads of the migration folders as Alembic reads them, sorted (imports Alembic)."""
    from alembic.script import ScriptDirectory

    return sorted(ScriptDirectory.from_config(alembic_config("sqlite://", workflow_modules)).get_heads())


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
    from sqlalchemy import inspect, text

    current: set[str] = set()
    if inspect(conn).has_table("alembic_version"):
        current = set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars())
    return sorted(heads(workflow_modules) - current)


if __name__ == "__main__":  # `heads` runs this: prints the heads of the folders of sys.argv[1]
    print("\n".join(script_heads(*sys.argv[1:2])))
