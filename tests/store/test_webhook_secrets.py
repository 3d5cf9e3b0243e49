"""Webhook signing secrets at rest: derived from the server key, never stored; rotation keeps
the previous secret signing for a grace period; the migration drops the plaintext column."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text

from auraserve.core.credentials import ServerKey
from auraserve.store import keys
from auraserve.store.db import Store
from auraserve.store.schema import accounts


def _row_values(db: Store, account_id: str) -> list[object]:
    with db.read() as conn:
        row = conn.execute(select(accounts).where(accounts.c.id == account_id)).one()
    return list(row)


def test_the_secret_is_derived_not_stored(db: Store) -> None:
    key = ServerKey(b"k" * 32)
    db.server_key = key
    created = keys.create_account(db, "a")
    assert created.webhook_secret == key.webhook_secret(created.account_id, 1)
    assert keys.webhook_secret(db, created.account_id) == created.webhook_secret
    assert keys.webhook_secrets(db, created.account_id) == (created.webhook_secret,)
    stored = " ".join(str(v) for v in _row_values(db, created.account_id))
    body = created.webhook_secret.removeprefix("whsec_")
    assert body not in stored and "whsec_" not in stored
    assert "webhook_secret" not in {c["name"] for c in inspect(db.engine).get_columns("accounts")}
    # Another key for the account sees the same secret.
    assert keys.create_key(db, created.account_id, "b").webhook_secret == created.webhook_secret


def test_another_server_key_derives_other_secrets(db: Store) -> None:
    db.server_key = ServerKey(b"a" * 32)
    created = keys.create_account(db, "a")
    db.server_key = ServerKey(b"b" * 32)
    assert keys.webhook_secret(db, created.account_id) != created.webhook_secret


def test_rotation_keeps_the_previous_secret_for_the_grace_period(db: Store) -> None:
    created = keys.create_account(db, "a")
    rotation = keys.rotate_webhook_secret(db, created.account_id, grace_seconds=3600)
    assert rotation.previous_secret == created.webhook_secret
    assert rotation.secret != created.webhook_secret and rotation.version == 2
    assert rotation.previous_until == pytest.approx(time.time() + 3600, abs=5)
    assert keys.webhook_secret(db, created.account_id) == rotation.secret
    assert keys.webhook_secrets(db, created.account_id) == (rotation.secret, created.webhook_secret)
    later = rotation.previous_until + 1
    assert keys.webhook_secrets(db, created.account_id, now=later) == (rotation.secret,)


def test_a_second_rotation_retires_the_oldest_secret(db: Store) -> None:
    created = keys.create_account(db, "a")
    first = keys.rotate_webhook_secret(db, created.account_id)
    second = keys.rotate_webhook_secret(db, created.account_id)
    assert second.previous_secret == first.secret
    assert keys.webhook_secrets(db, created.account_id) == (second.secret, first.secret)
    assert created.webhook_secret not in keys.webhook_secrets(db, created.account_id)


def test_no_grace_period_retires_the_old_secret_at_once(db: Store) -> None:
    created = keys.create_account(db, "a")
    rotation = keys.rotate_webhook_secret(db, created.account_id, grace_seconds=0)
    assert keys.webhook_secrets(db, created.account_id) == (rotation.secret,)


def test_rotating_an_unknown_account_is_a_lookup_error(db: Store) -> None:
    with pytest.raises(LookupError):
        keys.rotate_webhook_secret(db, "acct_missing")
    with pytest.raises(LookupError):
        keys.webhook_secrets(db, "acct_missing")
    with pytest.raises(ValueError, match="negative"):
        keys.rotate_webhook_secret(db, keys.create_account(db, "a").account_id, grace_seconds=-1)


def test_the_migration_drops_plaintext_secrets(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config

    from auraserve.store.db import MIGRATIONS_DIR

    db = Store(f"sqlite:///{tmp_path / 'old.db'}")
    try:
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        with db.write() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "0001")
            conn.execute(
                text(
                    "INSERT INTO accounts (id, name, balance, active_jobs, webhook_secret, "
                    "created_at) VALUES ('acct_old', 'old', 5, 0, 'whsec_cGxhaW50ZXh0', 1.0)"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO api_keys (id, account_id, name, key_hash, created_at) "
                    "VALUES ('0123456789abcdef', 'acct_old', 'old', :h, 1.0)"
                ),
                {"h": "0" * 64},
            )
        db.migrate()
        assert db.schema_is_current()
        values = _row_values(db, "acct_old")
        assert "whsec_cGxhaW50ZXh0" not in values
        with db.read() as conn:
            row = conn.execute(select(accounts).where(accounts.c.id == "acct_old")).one()
        assert (row.webhook_secret_version, row.balance) == (1, 5)
        assert keys.webhook_secret(db, "acct_old").startswith("whsec_")
    finally:
        db.dispose()
