"""Fresh credentials: the key format of docs/architecture.md and Standard Webhooks secrets."""

from __future__ import annotations

import base64
import re

from auraserve.store.credentials import new_api_key, new_webhook_secret


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
