"""The operator's API (`/v2/admin/…`) over real HTTP, with two tenant accounts beside the admin:
tenants are refused on every admin route, and admins see and change every account, each
money change a ledger entry that names the admin key and the reason."""

from __future__ import annotations

import httpx
import pytest

from auraserve.store import keys, ledger
from tests.conftest import LiveServer, Tenant, make_tenant

SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"


@pytest.fixture
def admin(api_only_server: LiveServer) -> Tenant:
    created = keys.create_account(api_only_server.runtime.db, "ops", is_admin=True)
    return Tenant(created.key, created.account_id, created.key_id, created.webhook_secret)


@pytest.fixture
def alice(api_only_server: LiveServer) -> Tenant:
    return make_tenant(api_only_server.runtime, credits=1_000, name="alice")


@pytest.fixture
def bob(api_only_server: LiveServer) -> Tenant:
    return make_tenant(api_only_server.runtime, credits=500, name="bob")


def _admin_operations(client: httpx.Client) -> list[tuple[str, str]]:
    doc = client.get("/openapi.json").json()
    found = [
        (method.upper(), path)
        for path, item in doc["paths"].items()
        if path.startswith("/v2/admin/")
        for method in item
    ]
    assert len(found) == 5, found
    return found


def test_tenant_keys_get_403_on_every_admin_route(
    client: httpx.Client, admin: Tenant, alice: Tenant, bob: Tenant
) -> None:
    before = client.get("/v2/account", headers=bob.headers).json()
    for method, template in _admin_operations(client):
        # Aimed at the other tenant's account and key, with a body that would be valid.
        path = template.replace("{account_id}", bob.account_id).replace("{key_id}", bob.key_id)
        body = (
            {"action": "grant", "amount": 10**6, "reason": "steal"}
            if path.endswith("/credits")
            else {"name": "sneaky", "account_id": bob.account_id}
        )
        json_body = body if method == "POST" else None
        refused = client.request(method, path, headers=alice.headers, json=json_body)
        assert refused.status_code == 403, (method, path, refused.text)
        assert refused.json()["error"] == "Forbidden"
        assert "admin key" in refused.json()["message"]
        # Refused before the parameters are read: a malformed request gets the same answer.
        garbage = client.request(
            method, path + "?limit=-1", headers=alice.headers, content=b"{not json"
        )
        assert garbage.status_code == 403, (method, path, garbage.text)
        assert client.request(method, path, json=json_body).status_code == 401
    # Nothing of bob's changed: his balance, and his key still works.
    assert client.get("/v2/account", headers=bob.headers).json() == before
    assert client.get("/v2/admin/accounts", headers=admin.headers).status_code == 200


def test_accounts_list_balances_usage_and_keys(
    client: httpx.Client, admin: Tenant, alice: Tenant, bob: Tenant
) -> None:
    for prompt in ("one", "two"):
        accepted = client.post(SUBMIT, headers=alice.headers, json={"prompt": prompt})
        assert accepted.status_code == 202, accepted.text
    body = client.get("/v2/admin/accounts", headers=admin.headers).json()
    assert body["total"] == 3
    by_name = {a["name"]: a for a in body["accounts"]}
    assert [a["name"] for a in body["accounts"]] == ["bob", "alice", "ops"]  # newest first
    a, b = by_name["alice"], by_name["bob"]
    assert a["account_id"] == alice.account_id and not a["is_admin"] and by_name["ops"]["is_admin"]
    assert a["reserved"] > 0 and a["balance"] == 1_000 - a["reserved"]
    assert a["active_jobs"] == 2
    assert a["usage"]["requests"] == 2 and a["usage"]["granted"] == 1_000
    assert a["usage"]["last_request_at"].endswith("Z")
    assert b["balance"] == 500 and b["reserved"] == 0 and b["usage"]["requests"] == 0
    assert b["usage"]["last_request_at"] is None
    assert [k["key_id"] for k in b["keys"]] == [bob.key_id]
    assert b["keys"][0]["revoked_at"] is None
    assert bob.key not in str(body)  # key ids only, never a key

    page = client.get("/v2/admin/accounts?limit=1&offset=1", headers=admin.headers).json()
    assert [x["name"] for x in page["accounts"]] == ["alice"] and page["total"] == 3
    bad = client.get("/v2/admin/accounts?limit=0", headers=admin.headers)
    assert bad.status_code == 400 and bad.json()["field"] == "limit"


def test_jobs_across_accounts_newest_first(
    client: httpx.Client, admin: Tenant, alice: Tenant, bob: Tenant
) -> None:
    ids = []
    for who, prompt in ((alice, "a1"), (bob, "b1"), (alice, "a2")):
        ids.append(client.post(SUBMIT, headers=who.headers, json={"prompt": prompt}).json())
    body = client.get("/v2/admin/jobs", headers=admin.headers).json()
    assert [i["request_id"] for i in body["items"]] == [x["request_id"] for x in reversed(ids)]
    first = body["items"][0]
    assert first["account_id"] == alice.account_id and first["account_name"] == "alice"
    assert first["parameters"]["prompt"] == "a2" and first["status"] == "QUEUED"
    assert first["price"] > 0 and body["next_before"] is None

    only_bob = client.get(
        "/v2/admin/jobs", headers=admin.headers, params={"account_id": bob.account_id}
    ).json()
    assert [i["parameters"]["prompt"] for i in only_bob["items"]] == ["b1"]
    page = client.get("/v2/admin/jobs?limit=2", headers=admin.headers).json()
    assert len(page["items"]) == 2 and page["next_before"]
    rest = client.get(
        "/v2/admin/jobs", headers=admin.headers, params={"before": page["next_before"]}
    ).json()
    assert [i["parameters"]["prompt"] for i in rest["items"]] == ["a1"]
    none = client.get("/v2/admin/jobs?status=COMPLETED", headers=admin.headers).json()
    assert none["items"] == []
    bad = client.get("/v2/admin/jobs?status=DONE", headers=admin.headers)
    assert bad.status_code == 400 and bad.json()["field"] == "status"
    for name, value in (("account_id", "acct\x00"), ("before", "not-a-job-id")):
        refused = client.get("/v2/admin/jobs", headers=admin.headers, params={name: value})
        assert refused.status_code == 400 and refused.json()["field"] == name, refused.text


def test_admins_create_and_revoke_keys(
    api_only_server: LiveServer, client: httpx.Client, admin: Tenant, alice: Tenant
) -> None:
    db = api_only_server.runtime.db
    made = client.post(
        "/v2/admin/keys", headers=admin.headers, json={"name": "carol", "credits": 250}
    )
    assert made.status_code == 201, made.text
    carol = made.json()
    assert carol["balance"] == 250 and carol["key"].startswith("aura_")
    account = client.get("/v2/account", headers={"x-api-key": carol["key"]}).json()
    assert account["name"] == "carol" and account["balance"] == 250
    (grant,) = ledger.entries(db, carol["account_id"])
    assert grant["kind"] == "grant" and grant["actor_key_id"] == admin.key_id
    # A new account made over the API is a tenant: it cannot reach the console.
    assert client.get("/v2/admin/jobs", headers={"x-api-key": carol["key"]}).status_code == 403

    second = client.post(
        "/v2/admin/keys", headers=admin.headers, json={"name": "ci", "account_id": alice.account_id}
    ).json()
    assert second["account_id"] == alice.account_id and second["balance"] == 1_000
    assert client.get("/v2/account", headers={"x-api-key": second["key"]}).status_code == 200

    revoked = client.post(f"/v2/admin/keys/{second['key_id']}/revoke", headers=admin.headers)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json()["revoked_at"] and revoked.json()["account_id"] == alice.account_id
    assert client.get("/v2/account", headers={"x-api-key": second["key"]}).status_code == 401
    assert client.get("/v2/account", headers=alice.headers).status_code == 200  # her other key

    again = client.post(f"/v2/admin/keys/{second['key_id']}/revoke", headers=admin.headers)
    assert again.status_code == 409 and "already revoked" in again.json()["message"]
    unknown = client.post("/v2/admin/keys/0123456789abcdef/revoke", headers=admin.headers)
    assert unknown.status_code == 404
    own = client.post(f"/v2/admin/keys/{admin.key_id}/revoke", headers=admin.headers)
    assert own.status_code == 409 and "key you are using" in own.json()["message"]
    missing = client.post(
        "/v2/admin/keys", headers=admin.headers, json={"name": "x", "account_id": "acct_nope"}
    )
    assert missing.status_code == 404
    mixed = client.post(
        "/v2/admin/keys",
        headers=admin.headers,
        json={"name": "x", "account_id": alice.account_id, "credits": 5},
    )
    assert mixed.status_code == 409 and "/credits" in mixed.json()["message"]
    for bad, field in (({"name": " "}, "name"), ({"name": "x", "credits": -1}, "credits")):
        refused = client.post("/v2/admin/keys", headers=admin.headers, json=bad)
        assert refused.status_code == 400 and refused.json()["field"] == field, refused.text


def test_grant_and_deduct_are_ledger_entries_and_never_go_negative(
    api_only_server: LiveServer, client: httpx.Client, admin: Tenant, alice: Tenant, bob: Tenant
) -> None:
    db = api_only_server.runtime.db
    url = f"/v2/admin/accounts/{alice.account_id}/credits"
    granted = client.post(
        url, headers=admin.headers, json={"action": "grant", "amount": 50, "reason": "refund #12"}
    )
    assert granted.status_code == 200, granted.text
    assert granted.json() == {
        "account_id": alice.account_id,
        "kind": "grant",
        "amount": 50,
        "balance": 1_050,
        "reason": "refund #12",
        "actor_key_id": admin.key_id,
    }
    taken = client.post(
        url,
        headers=admin.headers,
        json={"action": "deduct", "amount": 1_000, "reason": "chargeback"},
    ).json()
    assert taken["balance"] == 50
    entries_before = ledger.entries(db, alice.account_id)
    assert [
        (e["kind"], e["balance_delta"], e["note"], e["actor_key_id"]) for e in entries_before[-2:]
    ] == [
        ("grant", 50, "refund #12", admin.key_id),
        ("deduct", -1_000, "chargeback", admin.key_id),
    ]

    too_much = client.post(
        url, headers=admin.headers, json={"action": "deduct", "amount": 51, "reason": "x"}
    )
    assert too_much.status_code == 409
    assert too_much.json()["message"] == (
        "Cannot deduct 51 credits: the balance is 50. Deduct at most 50."
    )
    assert ledger.entries(db, alice.account_id) == entries_before  # nothing written
    assert ledger.balance(db, alice.account_id) == 50
    assert ledger.balance(db, bob.account_id) == 500  # the other tenant is untouched
    exact = client.post(  # 50.0 is a JSON integer, as everywhere in this API
        url, headers=admin.headers, json={"action": "deduct", "amount": 50.0, "reason": "close"}
    )
    assert exact.json()["balance"] == 0

    for bad, field in (
        ({"action": "grant", "amount": 0, "reason": "r"}, "amount"),
        ({"action": "grant", "amount": -5, "reason": "r"}, "amount"),
        ({"action": "grant", "amount": 1.5, "reason": "r"}, "amount"),
        ({"action": "grant", "amount": "5", "reason": "r"}, "amount"),
        ({"action": "grant", "amount": True, "reason": "r"}, "amount"),
        ({"action": "grant", "amount": 10**16, "reason": "r"}, "amount"),
        ({"action": "steal", "amount": 5, "reason": "r"}, "action"),
        ({"action": "grant", "amount": 5, "reason": ""}, "reason"),
        ({"action": "grant", "amount": 5}, "reason"),
    ):
        refused = client.post(url, headers=admin.headers, json=bad)
        assert refused.status_code == 400, (bad, refused.text)
        assert refused.json()["field"] == field, (bad, refused.json())
    unknown = client.post(
        "/v2/admin/accounts/acct_nope/credits",
        headers=admin.headers,
        json={"action": "grant", "amount": 5, "reason": "r"},
    )
    assert unknown.status_code == 404 and "acct_nope" in unknown.json()["message"]
