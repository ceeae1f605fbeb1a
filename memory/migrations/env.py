"""Alembic environment of the memory schema.

Run through `memory.database.upgrade` / `memory.database.alembic_config` (the Config carries
``script_location`` pointing here, so no alembic.ini is needed and any cwd works). When the
caller passes an open connection in ``config.attributes["connection"]``, migrations run on it,
inside one transaction (SQLite and PostgreSQL both have transactional DDL); otherwise an
engine is made from the ``sqlalchemy.url`` option.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine, pool, text

from memory.models import Base

VERSION_TABLE = "nextgpt_memory_version"
# Arbitrary constant: concurrent `Memory.open` calls on one PostgreSQL database migrate one at
# a time (SQLite gets the same from BEGIN IMMEDIATE in memory.database).
_PG_LOCK_KEY = 0x6E657874_6D656D  # "next" "mem"

config = context.config
target_metadata = Base.metadata


def _configure(**kw):
    context.configure(
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        render_as_batch=True,  # SQLite ALTER TABLE goes through batch mode in future revisions
        compare_type=True,
        **kw,
    )


def run_migrations_offline() -> None:
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def _run(connection) -> None:
    _configure(connection=connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            _run(connection)
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
