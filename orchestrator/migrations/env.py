"""Alembic environment: the URL comes from the orchestrator's configuration, never an ini file."""
from alembic import context

from orchestrator.db import make_engine
from orchestrator.models import Base

config = context.config

#: The PostgreSQL advisory lock key that upgrades of one database take turns on.
MIGRATION_LOCK = 7_204_311_842


def run_migrations_online() -> None:
    url = config.get_main_option("sqlalchemy.url")
    engine = make_engine(url)
    with engine.connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata,
                          render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Upgrades started together (replicas, a deploy's jobs) take turns: each one after
                # the first finds the schema at its head. Without it two created the same table
                # and one failed with a 97-line IntegrityError. Released when the transaction ends.
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
            context.run_migrations()
    engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=Base.metadata,
                      literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
