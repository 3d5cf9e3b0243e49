"""Signatures must verify with the reference Standard Webhooks library, not just with ourselves."""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from auraserve.webhooks.signing import new_secret, secret_key, sign, signed_headers

# The example from the Standard Webhooks / Svix documentation.
SPEC_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
SPEC_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
SPEC_TS = 1614265330
SPEC_BODY = b'{"test": 2432232314}'
SPEC_SIG = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="

BODY = json.dumps({"id": "job_123", "status": "succeeded", "caption": "café ☕"}).encode()


def test_new_secret_format() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for s in secrets:
        assert s.startswith("whsec_")
        assert 24 <= len(base64.b64decode(s.removeprefix("whsec_"), validate=True)) <= 32
        Webhook(s)  # the reference library accepts it


def test_sign_matches_published_vector() -> None:
    assert sign(SPEC_SECRET, SPEC_ID, SPEC_TS, SPEC_BODY) == SPEC_SIG


def test_sign_matches_reference_implementation() -> None:
    secret = new_secret()
    from datetime import datetime

    ts = 1_700_000_000
    expected = Webhook(secret).sign(SPEC_ID, datetime.fromtimestamp(ts, tz=UTC), BODY.decode())
    assert sign(secret, SPEC_ID, ts, BODY) == expected


def test_signed_headers_verify_with_standardwebhooks() -> None:
    secret = new_secret()
    headers = signed_headers(secret, "msg_1", BODY)
    assert set(headers) == {"webhook-id", "webhook-timestamp", "webhook-signature", "content-type"}
    assert headers["content-type"] == "application/json"
    assert headers["webhook-id"] == "msg_1"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 5
    assert Webhook(secret).verify(BODY, headers) == json.loads(BODY)


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(lambda b, h, s: (b + b" ", h, s), id="body-appended"),
        pytest.param(lambda b, h, s: (b.replace(b"succeeded", b"failed"), h, s), id="body-edited"),
        pytest.param(lambda b, h, s: (b, {**h, "webhook-id": "msg_2"}, s), id="other-id"),
        pytest.param(
            lambda b, h, s: (
                b,
                {**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)},
                s,
            ),
            id="other-timestamp",
        ),
        pytest.param(lambda b, h, s: (b, h, new_secret()), id="wrong-secret"),
    ],
)
def test_tampering_fails_verification(tamper) -> None:  # type: ignore[no-untyped-def]
    secret = new_secret()
    headers = signed_headers(secret, "msg_1", BODY)
    body, headers, verify_secret = tamper(BODY, headers, secret)
    with pytest.raises(WebhookVerificationError):
        Webhook(verify_secret).verify(body, headers)


def test_stale_timestamp_is_rejected_by_receivers() -> None:
    """Each retry must be re-signed with a fresh timestamp: receivers refuse >5 min old ones."""
    secret = new_secret()
    headers = signed_headers(secret, "msg_1", BODY, now=int(time.time()) - 600)
    with pytest.raises(WebhookVerificationError, match="too old"):
        Webhook(secret).verify(BODY, headers)


def test_rotation_signs_with_every_secret() -> None:
    old, new = new_secret(), new_secret()
    headers = signed_headers([old, new], "msg_1", BODY, now=int(time.time()))
    assert len(headers["webhook-signature"].split(" ")) == 2
    Webhook(old).verify(BODY, headers)
    Webhook(new).verify(BODY, headers)


def test_secret_key_accepts_unprefixed_and_unpadded() -> None:
    key = secret_key(SPEC_SECRET)
    assert secret_key(SPEC_SECRET.removeprefix("whsec_")) == key
    assert secret_key("whsec_" + base64.b64encode(b"k" * 25).decode().rstrip("=")) == b"k" * 25


@pytest.mark.parametrize("bad", ["whsec_", "whsec_!!!notbase64", "", "whsec_a b"])
def test_bad_secret_raises(bad: str) -> None:
    with pytest.raises(ValueError, match=r"webhook secret is (empty|not valid base64)"):
        sign(bad, "msg_1", 1, b"{}")


@pytest.mark.parametrize("bad_id", ["", "msg 1", "msg\r\nX-Injected: 1", "msg\x00"])
def test_bad_message_id_raises(bad_id: str) -> None:
    with pytest.raises(ValueError, match="msg_id must be non-empty"):
        signed_headers(new_secret(), bad_id, b"{}")


def test_no_secrets_raises() -> None:
    with pytest.raises(ValueError, match="at least one webhook secret"):
        signed_headers([], "msg_1", b"{}")
