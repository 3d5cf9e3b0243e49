"""Image-to-image through the API: the queue and sync dialects, inline images, file parts,
URLs failing in the worker (FAILED, uncharged), sizes from the image and the price."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from PIL import Image

from auraserve.config import Settings
from auraserve.store import ledger
from tests.conftest import LiveServer, Tenant, wait_for_status

PRESET = "auraflow-v0-3-512"
QUEUE_URL = f"/{PRESET}/v1/auraflow-v0-3-request"
SYNC_URL = f"/v1/{PRESET}"
# Resolving the reserved .invalid name fails (RFC 6761): it passes the submit-time checks and
# is unreachable for the worker.
UNREACHABLE = "https://images.invalid/cat.png"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sync_timeout_seconds": 60.0})


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _data_uri(width: int, height: int) -> str:
    return "data:image/png;base64," + base64.b64encode(_png(width, height)).decode()


def _price(server: LiveServer, width: int, height: int, steps: int) -> int:
    p = server.runtime.settings.presets[PRESET].price_per_image
    return max(1, -(-p * width * height * steps // (1024 * 1024 * 25)))


def test_queue_inline_image_follows_its_size_and_pays_for_the_steps_it_runs(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    body: dict[str, Any] = {"prompt": "a fox", "num_inference_steps": 4, "strength": 0.5, "seed": 5}
    body["image"] = _data_uri(520, 500)
    resp = client.post(QUEUE_URL, json=body, headers=tenant.headers)
    assert resp.status_code == 202, resp.text
    status = wait_for_status(client, resp.json()["request_id"], tenant.headers)
    assert status["status"] == "COMPLETED", status
    # The 512 preset prices 512²; a 520×500 input keeps its ratio inside those pixels.
    image = Image.open(io.BytesIO(client.get(status["output"]["media_url"][0]).content))
    assert image.size == (512, 512)
    # strength 0.5 of 4 steps runs 2: the price counts those 2 at the priced 512².
    assert before - ledger.balance(db, tenant.account_id) == _price(server, 512, 512, 2)


def test_sync_form_takes_the_image_as_a_file_part(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    resp = client.post(
        SYNC_URL,
        headers=tenant.headers,
        files={
            "prompt": (None, "a fox"),
            "steps": (None, "2"),
            "strength": (None, "0.5"),
            "width": (None, "512"),
            "height": (None, "768"),
            "output_format": (None, "png"),
            "image": ("cat.png", _png(64, 64), "image/png"),
        },
    )
    assert resp.status_code == 200, resp.text
    assert Image.open(io.BytesIO(resp.content)).size == (512, 768)  # given sizes win


def test_sync_form_refuses_a_file_part_that_is_not_an_image(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    resp = client.post(
        SYNC_URL,
        headers=tenant.headers,
        files={"prompt": (None, "a"), "image": ("x.png", b"<html></html>", "image/png")},
    )
    assert resp.status_code == 400, resp.text
    assert resp.json()["field"] == "image"
    assert "not a PNG, JPEG or WebP" in resp.json()["message"]


def test_an_unreachable_url_fails_the_job_uncharged(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    resp = client.post(
        QUEUE_URL, json={"prompt": "a", "image": UNREACHABLE}, headers=tenant.headers
    )
    assert resp.status_code == 202, resp.text
    status = wait_for_status(client, resp.json()["request_id"], tenant.headers)
    assert status["status"] == "FAILED", status
    assert "image: unreachable" in str(status)
    assert ledger.balance(db, tenant.account_id) == before


def test_an_unreachable_url_is_the_sync_dialects_400(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    resp = client.post(SYNC_URL, json={"prompt": "a", "image": UNREACHABLE}, headers=tenant.headers)
    assert resp.status_code == 400, resp.text
    assert "image: unreachable" in resp.json()["message"]
    assert ledger.balance(db, tenant.account_id) == before


def test_the_request_bodies_document_image_and_strength(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    spec = client.get("/openapi.json").json()
    found: list[dict[str, Any]] = []
    for item in spec["paths"].values():
        post = item.get("post") or {}
        content = post.get("requestBody", {}).get("content", {})
        schema = content.get("application/json", {}).get("schema", {})
        if "$ref" in schema:
            schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
        if "strength" in schema.get("properties", {}):
            found.append(schema["properties"])
    assert len(found) >= 2  # the queue and the sync dialects (the latter once per path)
    strength = found[0]["strength"]
    options = strength.get("anyOf", [strength])
    assert any(o.get("minimum") == 0 and o.get("maximum") == 1 for o in options)
    assert "image" in found[0]
