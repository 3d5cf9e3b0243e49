"""The PostgreSQL driver: pooled connections are pinged only after sitting idle."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import create_engine, text

from auraserve.store.db import Store
from auraserve.store.drivers import postgresql as pg_driver
from tests.conftest import BACKEND

# --- PostgreSQL: pooled connections are pinged only after sitting idle -----------------------

needs_postgresql = pytest.mark.skipif(
    BACKEND != "postgresql", reason="connection pinging: PostgreSQL only"
)


@needs_postgresql
def test_only_connections_idle_for_a_while_are_pinged(
    db: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    pings: list[object] = []
    real_ping = db.engine.dialect.do_ping

    def counting_ping(dbapi_connection: Any) -> bool:
        pings.append(dbapi_connection)
        return real_ping(dbapi_connection)

    monkeypatch.setattr(db.engine.dialect, "do_ping", counting_ping)
    for _ in range(3):  # a new connection, then one just used: no round trip spent on pings
        with db.read() as conn:
            conn.execute(text("SELECT 1"))
    assert pings == []
    monkeypatch.setattr(pg_driver, "PING_AFTER_IDLE_SECONDS", 0.0)
    with db.read() as conn:
        conn.execute(text("SELECT 1"))
    assert len(pings) == 1


@needs_postgresql
def test_an_idle_connection_that_died_is_replaced_before_use(
    db: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    with db.read() as conn:
        backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    admin = create_engine(db.engine.url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": backend})
    finally:
        admin.dispose()
    monkeypatch.setattr(pg_driver, "PING_AFTER_IDLE_SECONDS", 0.0)  # as if it sat idle
    with db.read() as conn:  # the dead one fails its ping and is replaced: no error
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() != backend
    with db.write() as conn:
        conn.execute(text("SELECT 1"))
