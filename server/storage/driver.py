"""The settle path's statements, run on the database driver's own cursor.

A Settle runs five statements under its tenant's lock. Through SQLAlchemy Core each cost
about 25 µs of Python on top of the driver's 2 µs (measured on this project's SQLite file),
and on PostgreSQL psycopg sent each one, and the BEGIN, in a round trip of its own while
the tenant's lock was held. So these few statements are compiled by SQLAlchemy once per
dialect (the same SQL it would send) and their parameters converted by the column types'
own bind processors (the same values it would send), and `SqlStore` runs them on the DBAPI
cursor of the SQLAlchemy connection that holds the transaction; on PostgreSQL in psycopg
pipelines (see `pipeline`). Everything else goes through SQLAlchemy as before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.sql.compiler import SQLCompiler


class DriverStatement:
    """One statement compiled for a dialect, with named parameters (``:name`` or ``%(name)s``)."""

    __slots__ = ("_defaults", "_processors", "sql")

    def __init__(self, statement: sa.ClauseElement, dialect: sa.Dialect, column_keys: Sequence[str] | None = None) -> None:
        named: sa.Dialect = dialect if dialect.paramstyle in ("named", "pyformat") else type(dialect)(paramstyle="named")  # type: ignore[call-arg]
        compiled = statement.compile(dialect=named, column_keys=list(column_keys) if column_keys is not None else None)
        assert isinstance(compiled, SQLCompiler)
        self.sql: str = compiled.string
        # Values the statement carries itself (a LIMIT 1, say), under the names it renders.
        self._defaults = {name: value for name, value in compiled.params.items() if value is not None}
        processors = []
        for bind in compiled.binds.values():
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            if process is not None:
                processors.append((compiled.bind_names[bind], process))
        self._processors: tuple[tuple[str, Callable[[Any], Any]], ...] = tuple(processors)

    def params(self, values: Mapping[str, object]) -> dict[str, object]:
        """The driver's parameters for `values` (keyed by bind name), converted as SQLAlchemy would."""
        params = {**self._defaults, **values}
        for name, process in self._processors:
            if name in params:
                params[name] = process(params[name])
        return params


def driver_connection(conn: Connection) -> Any:
    """The DBAPI connection (sqlite3 or psycopg) under a SQLAlchemy connection."""
    return conn.connection.driver_connection


@contextmanager
def pipeline(raw: Any, postgres: bool) -> Iterator[None]:
    """A psycopg pipeline on PostgreSQL: the statements inside go in one round trip when the
    block ends (in order: each sees what those before it did; a statement's snapshot is
    taken when it starts, after the one before it has finished), and their cursors hold
    their rows after it. A fetch inside the block, or psycopg's own BEGIN or commit(),
    would cost a round trip more: the store sends BEGIN and COMMIT as statements. Nothing
    on SQLite."""
    with raw.pipeline() if postgres else nullcontext():
        yield


@contextmanager
def as_sqlalchemy_errors(conn: Connection, sql: str) -> Iterator[None]:
    """Driver errors as SQLAlchemy's (IntegrityError, OperationalError, …), so that the
    store's handlers see what they would see had SQLAlchemy run the statement; a lost
    connection is invalidated as SQLAlchemy would, so that the pool does not hand it out
    again."""
    dialect = conn.dialect
    dbapi = dialect.loaded_dbapi
    try:
        yield
    except dbapi.Error as exc:
        lost = not conn.invalidated and dialect.is_disconnect(exc, driver_connection(conn), None)
        if lost:
            conn.invalidate(exc)
        raise sa.exc.DBAPIError.instance(sql, None, exc, dbapi.Error, connection_invalidated=lost, dialect=dialect) from exc
