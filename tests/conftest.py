"""Shared fixtures. The whole suite runs once per store backend:

    pytest                                   # SQLite (the embedded default)
    AURASERVE_TEST_BACKEND=postgresql pytest # PostgreSQL at AURASERVE_TEST_PG_URL

On PostgreSQL each test session creates its own database and drops it afterwards, so parallel
runs never see each other; each test starts from empty tables.
"""

from __future__ import annotations

import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import create_engine, text

from auraserve.config import Settings, load_settings
from auraserve.store.db import Store
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
            text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"),
            {"n": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


@pytest.fixture
def database_url(tmp_path: Path, pg_database_url: str | None) -> str:
    """A URL to an empty, migrated store for this test."""
    if pg_database_url is None:
        return ""  # Settings puts SQLite in the data dir
    db = Store(Settings(database_url=pg_database_url).resolved_database_url)
    db.migrate()
    with db.engine.begin() as conn:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        conn.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
    db.dispose()
    return pg_database_url


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url or None,
        port=free_port(),
        model="tiny",
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        poll_interval_seconds=0.2,
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Store]:
    database = Store(settings.resolved_database_url)
    database.migrate()
    yield database
    database.dispose()


@pytest.fixture(scope="session")
def tiny_engine() -> Any:
    """The tiny random-weight AuraFlow, built once per test session."""
    from auraserve.engine.pipeline import load_engine

    return load_engine("tiny", device="cpu", dtype="float32")


class LiveServer:
    """A real uvicorn server on loopback, in a thread, around a runtime."""

    def __init__(self, runtime: Any) -> None:
        from auraserve.api.app import create_app
        from auraserve.api.server import server_config

        self.runtime = runtime
        self.app = create_app(runtime)
        settings = runtime.settings
        self.url = f"http://{settings.host}:{settings.port}"
        # The same HTTP server and limits as `auraserve serve`.
        config = server_config(self.app, settings, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def runtime(settings: Settings) -> Iterator[Any]:
    from auraserve.runtime import Runtime

    rt = Runtime.open(settings)
    yield rt
    rt.close()


@pytest.fixture
def server(runtime: Any, tiny_engine: Any) -> Iterator[LiveServer]:
    """API plus one in-process worker, as `auraserve serve` runs them."""
    runtime.engine = tiny_engine
    runtime.start_worker()
    live = LiveServer(runtime).start()
    yield live
    live.stop()


@pytest.fixture
def api_only_server(runtime: Any) -> Iterator[LiveServer]:
    """API without a worker: jobs stay QUEUED until a test runs one."""
    live = LiveServer(runtime).start()
    yield live
    live.stop()


@dataclass
class Tenant:
    key: str
    account_id: str
    key_id: str
    webhook_secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Ocp-Apim-Subscription-Key": self.key}


def make_tenant(runtime: Any, credits: int = 100_000, name: str = "tenant") -> Tenant:
    from auraserve.store import keys

    created = keys.create_account(runtime.db, name, credits=credits)
    return Tenant(created.key, created.account_id, created.key_id, created.webhook_secret)


@pytest.fixture
def tenant(runtime: Any) -> Tenant:
    return make_tenant(runtime)


@pytest.fixture
def client(runtime: Any) -> Iterator[httpx.Client]:
    s = runtime.settings
    with httpx.Client(base_url=f"http://{s.host}:{s.port}", timeout=30) as c:
        yield c


def wait_for_status(
    client: httpx.Client, request_id: str, headers: dict[str, str], *, timeout: float = 60
) -> dict[str, Any]:
    """Poll until a terminal status; returns the last status body."""
    deadline = time.monotonic() + timeout
    while True:
        body = client.get(f"/v2/requests/status/{request_id}", headers=headers).json()
        if body.get("status") in ("COMPLETED", "FAILED", "ERROR", "CANCELLED"):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not finish: {body}")
        time.sleep(0.05)
