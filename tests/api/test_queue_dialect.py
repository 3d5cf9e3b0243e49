"""The async queue dialect (seed 002) end to end, against a live server on loopback."""

from __future__ import annotations

import io
import re

import httpx
import pytest
from PIL import Image

from auraserve.store import ledger
from tests.conftest import LiveServer, Tenant, make_tenant, wait_for_status

SEED_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
UUID7 = r"[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def test_submit_poll_complete_fetch_and_charge(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    before = ledger.balance(server.runtime.db, tenant.account_id)
    resp = client.post(
        SEED_PATH,
        headers=tenant.headers,
        json={
            "prompt": "Close-up portrait of a majestic iguana",
            "num_images": 2,
            "guidance_scale": 3.5,
            "num_inference_steps": 3,
            "expand_prompt": False,
            "seed": 42,
        },
    )
    assert resp.status_code == 202, resp.text
    body = resp.json()
    assert set(body) == {"request_id", "status", "polling_url"}
    assert body["status"] == "QUEUED"
    assert re.fullmatch(rf"auraflow-v0-3-512_{UUID7}", body["request_id"])
    assert body["polling_url"] == f"{server.url}/v2/requests/status/{body['request_id']}"

    final = wait_for_status(client, body["request_id"], tenant.headers)
    assert final["status"] == "COMPLETED", final
    for key in (
        "request_id",
        "status",
        "model_id",
        "error",
        "output",
        "created_at",
        "updated_at",
        "completed_at",
    ):
        assert key in final
    assert final["model_id"] == "auraflow-v0-3-512"
    assert final["error"] is None
    assert final["output"]["media_type"] == "image/png"
    assert final["seeds"] == [42, 43]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", final["completed_at"])
    urls = final["output"]["media_url"]
    assert len(urls) == 2 and urls[0] != urls[1]
    for url in urls:
        assert url.startswith(f"{server.url}/media/")
        media = httpx.get(url)  # no key: the unguessable name is the capability
        assert media.status_code == 200
        assert media.headers["content-type"] == "image/png"
        assert media.headers["x-content-type-options"] == "nosniff"
        image = Image.open(io.BytesIO(media.content))
        assert image.size == (512, 512)
    price = server.runtime.settings.presets["auraflow-v0-3-512"]
    charged = before - ledger.balance(server.runtime.db, tenant.account_id)
    assert charged == 2 * -(-price.price_per_image * 512 * 512 * 3 // (1024 * 1024 * 25))


@pytest.mark.parametrize("header", ["Ocp-Apim-Subscription-Key", "x-api-key", "Authorization"])
def test_every_key_header_works(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant, header: str
) -> None:
    value = f"Bearer {tenant.key}" if header == "Authorization" else tenant.key
    resp = client.post(SEED_PATH, headers={header: value}, json={"prompt": "x"})
    assert resp.status_code == 202, resp.text


def test_status_shows_queue_position_while_queued(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    ids = [
        client.post(SEED_PATH, headers=tenant.headers, json={"prompt": f"p{i}"}).json()[
            "request_id"
        ]
        for i in range(3)
    ]
    positions = [
        client.get(f"/v2/requests/status/{r}", headers=tenant.headers).json()["queue_position"]
        for r in ids
    ]
    assert positions == [0, 1, 2]


def test_unknown_model_is_400_with_seed_body(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    resp = client.post("/no-such-model/v1/x-request", headers=tenant.headers, json={"prompt": "x"})
    assert resp.status_code == 400
    assert resp.json() == {
        "error": "Model not found",
        "message": "Model 'no-such-model' not found or is disabled",
    }


def test_insufficient_balance_is_402_with_seed_body(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    poor = make_tenant(api_only_server.runtime, credits=1, name="poor")
    resp = client.post(SEED_PATH, headers=poor.headers, json={"prompt": "x"})
    assert resp.status_code == 402
    assert resp.json() == {
        "error": "Insufficient Balance",
        "message": "Your wallet does not have enough balance.",
    }
    assert ledger.balance(api_only_server.runtime.db, poor.account_id) == 1


def test_queue_limit_is_429(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    limit = api_only_server.runtime.settings.max_queued_per_account
    before = ledger.balance(api_only_server.runtime.db, tenant.account_id)
    for _ in range(limit):
        assert (
            client.post(SEED_PATH, headers=tenant.headers, json={"prompt": "x"}).status_code == 202
        )
    spent = before - ledger.balance(api_only_server.runtime.db, tenant.account_id)
    resp = client.post(SEED_PATH, headers=tenant.headers, json={"prompt": "x"})
    assert resp.status_code == 429
    assert "Retry-After" in resp.headers
    assert before - ledger.balance(api_only_server.runtime.db, tenant.account_id) == spent


def test_unauthorized(api_only_server: LiveServer, client: httpx.Client, tenant: Tenant) -> None:
    from auraserve.store import keys

    assert client.post(SEED_PATH, json={"prompt": "x"}).status_code == 401
    bad = tenant.key[:-4] + "AAAA"
    assert (
        client.post(SEED_PATH, headers={"x-api-key": bad}, json={"prompt": "x"}).status_code == 401
    )
    assert (
        client.post(SEED_PATH, headers={"x-api-key": "nonsense"}, json={"prompt": "x"}).status_code
        == 401
    )
    keys.revoke_key(api_only_server.runtime.db, tenant.key_id)
    resp = client.post(SEED_PATH, headers=tenant.headers, json={"prompt": "x"})
    assert resp.status_code == 401
    assert resp.json()["error"] == "Unauthorized"


def test_two_accounts_cannot_see_each_others_jobs(server: LiveServer, client: httpx.Client) -> None:
    alice = make_tenant(server.runtime, name="alice")
    bob = make_tenant(server.runtime, name="bob")
    rid = client.post(
        SEED_PATH, headers=alice.headers, json={"prompt": "secret", "num_inference_steps": 2}
    ).json()["request_id"]
    final = wait_for_status(client, rid, alice.headers)
    assert final["status"] == "COMPLETED"
    resp = client.get(f"/v2/requests/status/{rid}", headers=bob.headers)
    assert resp.status_code == 404
    assert "secret" not in resp.text
    # Tampering with the model prefix does not help either.
    other = rid.replace("auraflow-v0-3-512_", "auraflow-v0-3_")
    assert client.get(f"/v2/requests/status/{other}", headers=alice.headers).status_code == 404
    # Media names cannot be enumerated: a near miss is 404.
    name = final["output"]["media_url"][0].rsplit("/", 1)[1]
    near = ("A" if name[0] != "A" else "B") + name[1:]
    assert client.get(f"/media/{near}").status_code == 404
    assert client.get("/media/..%2Fauraserve.db").status_code == 404


def test_wrong_method_and_unknown_path(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    resp = client.get(SEED_PATH, headers=tenant.headers)
    assert resp.status_code == 405
    assert "POST" in resp.headers["allow"]
    resp = client.get("/nothing/here", headers=tenant.headers)
    assert resp.status_code == 404
    assert resp.json()["error"] == "Not Found"


def test_a_rounded_size_is_a_line_in_warnings(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    resp = client.post(
        SEED_PATH,
        headers=tenant.headers,
        json={"prompt": "a cat", "width": 520, "height": 512, "num_inference_steps": 1},
    )
    assert resp.status_code == 202, resp.text
    final = wait_for_status(client, resp.json()["request_id"], tenant.headers)
    assert final["status"] == "COMPLETED", final
    assert (final["width"], final["height"]) == (528, 512)
    assert final["warnings"] == ["width 520 was rounded to 528 (sizes are multiples of 16)"]


def test_a_lora_scale_given_as_a_string_is_refused_like_any_number(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    """The JSON dialects refuse numeric strings (api/body.py); `loras[].scale` is no
    exception."""
    resp = client.post(
        "/auraflow-v0-3-512/v1/auraflow-v0-3-request",
        headers=tenant.headers,
        json={"prompt": "x", "loras": [{"name": "any", "scale": "1"}]},
    )
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["field"] == "loras[0].scale"
    assert "must be a number, not a string" in body["message"]
