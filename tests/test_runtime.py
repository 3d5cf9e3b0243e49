"""Runtime.open: the server key from the settings, shared by replicas with separate data dirs."""

from __future__ import annotations

from pathlib import Path

import pytest

from auraserve.config import load_settings
from auraserve.errors import ConfigError
from auraserve.runtime import Runtime

KEY = "k" * 40


def test_replicas_given_one_secret_key_derive_the_same_webhook_secret(tmp_path: Path) -> None:
    db_url = f"sqlite:///{tmp_path / 'shared.db'}"
    first = Runtime.open(
        load_settings(data_dir=tmp_path / "a", database_url=db_url, secret_key=KEY)
    )
    second = Runtime.open(
        load_settings(data_dir=tmp_path / "b", database_url=db_url, secret_key=KEY)
    )
    try:
        assert first.server_key is not None and second.server_key is not None
        assert first.server_key.webhook_secret("acct_x", 1) == second.server_key.webhook_secret(
            "acct_x", 1
        )
        # A configured key means no key file is written into either data dir.
        assert not (tmp_path / "a" / "secret.key").exists()
        assert not (tmp_path / "b" / "secret.key").exists()
    finally:
        first.close()
        second.close()


def test_a_key_file_setting_is_used(tmp_path: Path) -> None:
    key_file = tmp_path / "server.key"
    key_file.write_text(KEY)
    key_file.chmod(0o600)
    a = Runtime.open(load_settings(data_dir=tmp_path / "a", secret_key_file=key_file))
    b = Runtime.open(load_settings(data_dir=tmp_path / "b", secret_key=KEY))
    try:
        assert a.server_key is not None and b.server_key is not None
        assert a.server_key.webhook_secret("acct_y", 2) == b.server_key.webhook_secret("acct_y", 2)
    finally:
        a.close()
        b.close()


def test_a_short_secret_key_stops_the_start_naming_the_setting() -> None:
    with pytest.raises(ConfigError, match=r"AURASERVE_SECRET_KEY: .*at least 32 characters"):
        load_settings(secret_key="short")
