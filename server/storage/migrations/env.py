"""Alembic environment for the kpisettle store.

`server.storage.sql.upgrade_to_head` runs the migrations programmatically: it passes an open
connection (inside a transaction it holds a lock for) in ``config.attributes["connection"]``,
and the migrations join that transaction. Given only ``sqlalchemy.url`` (a programmatic
`Config` from `server.storage.sql.alembic_config` with the URL set), it connects itself.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from server.storage.sql import create_engine_for


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transactional_ddl=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = context.config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError("no connection given and no sqlalchemy.url configured")
    engine = create_engine_for(url)
    try:
        with engine.connect() as own:
            _run(own)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("offline (SQL script) migrations are not supported")
run_migrations_online()
