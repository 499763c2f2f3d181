"""Database fixtures shared by test files: every store test runs on SQLite and on PostgreSQL.

Use them from a test module with

    from tests.db_fixtures import database_url_fixture, postgres_url_fixture, store_fixture  # noqa: F401

(or once for the whole suite in tests/conftest.py: ``from tests.db_fixtures import *``).
The fixtures are registered under the names ``database_url``, ``postgres_url``,
``new_database_url``, ``store`` and ``tenant``.

PostgreSQL policy: the server is the one at ``KPISETTLE_TEST_POSTGRES_URL`` (default
``postgresql+psycopg://postgres@127.0.0.1:5432/postgres``); the session creates a fresh
database ``kpisettle_test_<random>`` there and drops it at the end. When the server cannot
be reached, the PostgreSQL tests are skipped, unless ``KPISETTLE_POSTGRES=required``, which
makes them errors.

The SQLite database is a fresh file per test; the PostgreSQL database is shared by the
session's tests, so tests keep to their own tenant (the ``tenant`` fixture is unique per
test) or ask for ``new_database_url`` for an empty database of their own.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from server.storage.sql import SqlStore, open_store

POSTGRES_POLICY_ENV = "KPISETTLE_POSTGRES"
POSTGRES_URL_ENV = "KPISETTLE_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DATABASES = ("sqlite", "postgresql")


def postgres_required() -> bool:
    return os.environ.get(POSTGRES_POLICY_ENV, "").strip().lower() == "required"


def postgres_admin_url() -> sa.URL:
    url = make_url(os.environ.get(POSTGRES_URL_ENV) or DEFAULT_POSTGRES_URL)
    if url.drivername == "postgresql":
        url = url.set(drivername="postgresql+psycopg")
    return url


class _PostgresServer:
    """Creates and drops the session's test databases on the server at the admin URL."""

    def __init__(self, admin_url: sa.URL) -> None:
        self.admin_url = admin_url
        self.engine = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})
        self.created: list[str] = []

    def check(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def create(self) -> str:
        name = f"kpisettle_test_{secrets.token_hex(6)}"
        with self.engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        self.created.append(name)
        return self.admin_url.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        with self.engine.connect() as conn:
            for name in self.created:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.engine.dispose()


@pytest.fixture(scope="session", name="postgres_server")
def postgres_server_fixture() -> Iterator[_PostgresServer]:
    admin_url = postgres_admin_url()
    server = _PostgresServer(admin_url)
    try:
        server.check()
    except DBAPIError as exc:
        server.engine.dispose()
        where = admin_url.render_as_string(hide_password=True)
        error = (str(exc.orig or exc).strip().splitlines() or [type(exc).__name__])[0]
        if postgres_required():
            pytest.fail(f"PostgreSQL not reachable at {where} ({error}) and {POSTGRES_POLICY_ENV}=required", pytrace=False)
        pytest.skip(f"PostgreSQL not reachable at {where} ({error}); set {POSTGRES_POLICY_ENV}=required to make this an error")
    yield server
    server.drop_all()


@pytest.fixture(scope="session", name="postgres_url")
def postgres_url_fixture(postgres_server: _PostgresServer) -> str:
    """A fresh PostgreSQL database for the session (dropped at its end)."""
    return postgres_server.create()


@pytest.fixture(params=DATABASES, name="database_url")
def database_url_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a migrated-or-empty database: a fresh SQLite file, or the session's PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'kpisettle.db'}"
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture(name="new_database_url")
def new_database_url_fixture(database_url: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of the same kind as `database_url`, for this test alone."""
    if database_url.startswith("sqlite"):
        return f"sqlite:///{tmp_path / 'kpisettle-new.db'}"
    server: _PostgresServer = request.getfixturevalue("postgres_server")
    return server.create()


@pytest.fixture(name="store")
def store_fixture(database_url: str) -> Iterator[SqlStore]:
    store = open_store(database_url)
    yield store
    store.close()


@pytest.fixture(name="tenant")
def tenant_fixture() -> str:
    return f"tenant-{secrets.token_hex(4)}"


__all__ = [
    "DATABASES",
    "database_url_fixture",
    "new_database_url_fixture",
    "postgres_admin_url",
    "postgres_required",
    "postgres_server_fixture",
    "postgres_url_fixture",
    "store_fixture",
    "tenant_fixture",
]
