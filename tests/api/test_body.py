"""One content-type rule for the three dialects (api/body.py), against a live server: a body
whose type or charset a route does not read is 415 in that dialect's error shape, naming the
types it takes; JSON in UTF-8 (with or without `charset=utf-8`) is read everywhere."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, Tenant

QUEUE_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
SYNC_PATH = "/v1/aura-flow"
OPENAI_PATH = "/v1/images/generations"
JSON = "application/json"
FORMS = ["multipart/form-data", "application/x-www-form-urlencoded"]

# (path, the types it names in the 415)
ROUTES = {
    "queue": (QUEUE_PATH, [JSON]),
    "sync": (SYNC_PATH, [*FORMS, JSON]),
    "openai": (OPENAI_PATH, [JSON]),
}
# Content-Type header (None: not sent) → what the message says is wrong.
REFUSED: list[tuple[str | None, str]] = [
    ("text/plain", "'text/plain' is not accepted"),
    ("text/plain; charset=utf-8", "is not accepted"),
    (None, "no Content-Type"),
    ("application/json; charset=utf-16", "charset 'utf-16' is not read"),
    ('application/json; charset="ISO-8859-1"', "charset 'ISO-8859-1' is not read"),
    ("application/octet-stream", "is not accepted"),
]


def _message_and_accepted(dialect: str, resp: httpx.Response) -> tuple[str, list[str] | None]:
    body: dict[str, Any] = resp.json()
    if dialect == "openai":
        error = body["error"]
        assert error["type"] == "invalid_request_error"
        return error["message"], None
    assert body["error"] == "Unsupported Media Type"
    return body["message"], body["accepted"]


@pytest.mark.parametrize("dialect", list(ROUTES))
@pytest.mark.parametrize(("content_type", "why"), REFUSED, ids=[str(c) for c, _ in REFUSED])
def test_unread_content_types_are_415_in_the_dialects_shape(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    dialect: str,
    content_type: str | None,
    why: str,
) -> None:
    path, accepted = ROUTES[dialect]
    headers = dict(tenant.headers)
    if content_type is not None:
        headers["content-type"] = content_type
    raw = json.dumps({"prompt": "a cat"}).encode("utf-16" if "16" in str(content_type) else "utf-8")
    resp = client.post(path, content=raw, headers=headers)
    assert resp.status_code == 415, resp.text
    message, listed = _message_and_accepted(dialect, resp)
    assert why in message, message
    # The message (every shape) and the field (shapes that have fields) name what is taken.
    for kind in accepted:
        assert kind in message
    assert listed in (None, accepted)
    if dialect == "sync":
        assert "x-remaining-credits" in resp.headers


@pytest.mark.parametrize("dialect", list(ROUTES))
@pytest.mark.parametrize(
    "content_type", [JSON, "application/json; charset=utf-8", "Application/JSON; charset=UTF-8"]
)
def test_json_in_utf8_is_read_by_every_dialect(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    dialect: str,
    content_type: str,
) -> None:
    path, _ = ROUTES[dialect]
    # An out-of-range field proves the body was read: 400 naming it, not 415.
    field = {"queue": "num_inference_steps", "sync": "steps", "openai": "n"}[dialect]
    body = {"prompt": "a cat", field: 1000}
    headers = {**tenant.headers, "content-type": content_type}
    resp = client.post(path, content=json.dumps(body).encode(), headers=headers)
    assert resp.status_code == 400, resp.text
    assert field in resp.text


def test_sync_reads_form_data_with_a_utf8_charset(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    headers = {
        **tenant.headers,
        "content-type": "application/x-www-form-urlencoded; charset=utf-8",
    }
    resp = client.post(SYNC_PATH, content=b"prompt=a+cat&steps=1000", headers=headers)
    assert resp.status_code == 400 and "steps" in resp.text, resp.text
