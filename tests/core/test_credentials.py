"""Fresh credentials: the key format of docs/architecture.md, Standard Webhooks secrets, and
the server key webhook secrets derive from."""

from __future__ import annotations

import base64
import logging
import re
import stat
from pathlib import Path

import pytest

from auraserve.core.credentials import (
    SERVER_KEY_FILE,
    ServerKey,
    load_server_key,
    new_api_key,
    new_webhook_secret,
)


def test_api_keys_have_the_documented_shape_and_never_repeat() -> None:
    keys = [new_api_key() for _ in range(50)]
    assert len({raw for _, raw in keys}) == 50
    for key_id, raw in keys:
        assert re.fullmatch(r"[0-9a-f]{16}", key_id)
        assert re.fullmatch(rf"aura_{key_id}_[A-Za-z0-9_-]{{43}}", raw)


def test_webhook_secrets_are_32_random_bytes_behind_whsec() -> None:
    secrets = {new_webhook_secret() for _ in range(50)}
    assert len(secrets) == 50
    for secret in secrets:
        assert secret.startswith("whsec_")
        assert len(base64.b64decode(secret.removeprefix("whsec_"), validate=True)) == 32


def test_server_key_derives_one_secret_per_account_and_version() -> None:
    key = ServerKey(b"s" * 32)
    first = key.webhook_secret("acct_a", 1)
    assert first == ServerKey(b"s" * 32).webhook_secret("acct_a", 1)
    others = {
        key.webhook_secret("acct_a", 2),
        key.webhook_secret("acct_b", 1),
        ServerKey(b"t" * 32).webhook_secret("acct_a", 1),
    }
    assert first not in others and len(others) == 3
    assert len(base64.b64decode(first.removeprefix("whsec_"), validate=True)) == 32
    assert "s" * 32 not in repr(key)


def test_a_short_server_key_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        ServerKey(b"short")
    with pytest.raises(ValueError, match="at least 32"):
        load_server_key("short", None, Path("/nonexistent"))


def test_the_default_server_key_is_made_once_in_the_data_dir_0600(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="auraserve.core.credentials"):
        first = load_server_key(None, None, tmp_path)
    path = tmp_path / SERVER_KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(path) in caplog.text  # says where
    assert first.created and first.source == str(path)
    again = load_server_key(None, None, tmp_path)
    assert again == first and not again.created


def test_a_configured_key_or_key_file_wins(tmp_path: Path) -> None:
    configured = load_server_key("v" * 40, None, tmp_path)
    assert configured.key == b"v" * 40
    shared = tmp_path / "shared.key"
    shared.write_text("f" * 40 + "\n")
    assert load_server_key(None, shared, tmp_path).key == b"f" * 40
    assert not (tmp_path / SERVER_KEY_FILE).exists()
    with pytest.raises(ValueError, match="does not exist"):
        load_server_key(None, tmp_path / "missing.key", tmp_path)
