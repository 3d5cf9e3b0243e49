"""Shared fixtures. The whole suite runs once per store backend:

    pytest                                   # SQLite (the embedded default)
    AURASERVE_TEST_BACKEND=postgresql pytest # PostgreSQL at AURASERVE_TEST_PG_URL

On PostgreSQL each test session creates its own database and drops it afterwards, so parallel
runs never see each other; each test starts from empty tables.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text

from auraserve.config import Settings, load_settings
from auraserve.store.db import Database
from auraserve.store.schema import metadata

BACKEND = os.environ.get("AURASERVE_TEST_BACKEND", "sqlite")
PG_ADMIN_URL = os.environ.get("AURASERVE_TEST_PG_URL", "postgresql://127.0.0.1:5432/test")


def pytest_report_header() -> str:
    return f"auraserve store backend: {BACKEND}"


@pytest.fixture(scope="session")
def pg_database_url() -> Iterator[str | None]:
    if BACKEND != "postgresql":
        yield None
        return
    name = f"auraserve_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(
        PG_ADMIN_URL.replace("postgresql://", "postgresql+psycopg://", 1),
        isolation_level="AUTOCOMMIT",
    )
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
            ),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture
def database_url(tmp_path: Path, pg_database_url: str | None) -> str:
    """A URL to an empty, migrated store for this test."""
    if pg_database_url is None:
        return ""  # Settings puts SQLite in the data dir
    db = Database(Settings(database_url=pg_database_url).resolved_database_url)
    db.migrate()
    with db.engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    db.dispose()
    return pg_database_url


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url or None,
        model="tiny",
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        poll_interval_seconds=0.2,
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings.resolved_database_url)
    database.migrate()
    yield database
    database.dispose()
