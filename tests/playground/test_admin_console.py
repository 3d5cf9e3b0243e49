"""The operator's console in a real browser (headless chromium) against a real `auraserve serve
--model tiny` (issue 17, point 9): an admin key gets the Admin view and manages accounts, keys
and credits from it; a tenant key gets no Admin view, and the server refuses its /v2/admin
calls made from the page itself."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.playground.conftest import Serve, Watched, save_screenshot

try:
    from playwright.sync_api import Page, expect
except ImportError:
    if os.environ.get("CI"):
        raise
    pytest.skip("the playwright package is not installed", allow_module_level=True)

Opener = Callable[..., Watched]
SUBMIT = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"


def _admin_key(serve: Serve, name: str = "ops") -> str:
    record = json.loads(serve.cli("keys", "create", "--name", name, "--admin", "--json"))
    return str(record["key"])


def _sign_in(page: Page, key: str) -> None:
    page.wait_for_selector("body[data-ready=true]")
    page.fill("#api-key", key)
    page.click("#key-form button[type=submit]")
    expect(page.locator("#key-status")).to_contain_text("Signed in as")


def _fetch(page: Page, path: str, key: str, body: object | None = None) -> int:
    """Call the API from inside the page, as a curious tenant could from the console."""
    return int(
        page.evaluate(
            """async ([path, key, body]) => (await fetch(path, {
                 method: body === null ? 'GET' : 'POST',
                 headers: {'x-api-key': key, 'Content-Type': 'application/json'},
                 body: body === null ? undefined : JSON.stringify(body),
               })).status""",
            [path, key, body],
        )
    )


def _account_id(serve: Serve, key: str) -> str:
    return str(
        httpx.get(f"{serve.url}/v2/account", headers={"x-api-key": key}).json()["account_id"]
    )


def test_a_tenant_key_gets_no_admin_view_and_no_admin_data(serve: Serve, open_page: Opener) -> None:
    alice = serve.new_key("alice-tenant", 1_000)
    bob = serve.new_key("bob-tenant", 500)
    bob_account = _account_id(serve, bob)
    watched = open_page("/#admin")  # even asked for by URL
    page = watched.page
    _sign_in(page, alice)
    expect(page.locator("#view-admin")).to_be_hidden()
    expect(page.locator("#admin")).to_be_hidden()
    expect(page.locator("#playground")).to_be_visible()
    assert page.locator("#accounts li").count() == 0
    # The page's own code could be bypassed: the server is what refuses.
    assert _fetch(page, "/v2/admin/accounts", alice) == 403
    assert _fetch(page, "/v2/admin/jobs", alice) == 403
    grant = {"action": "grant", "amount": 10**6, "reason": "mine now"}
    assert _fetch(page, f"/v2/admin/accounts/{bob_account}/credits", alice, grant) == 403
    assert _fetch(page, "/v2/admin/keys", alice, {"name": "x", "account_id": bob_account}) == 403
    bob_state = httpx.get(f"{serve.url}/v2/account", headers={"x-api-key": bob}).json()
    assert bob_state["balance"] == 500 and len(bob_state["ledger"]) == 1

    # Signing in with an admin key in the same tab shows the view (the URL asked for it);
    # forgetting the key hides it.
    page.fill("#api-key", _admin_key(serve, "ops-switch"))
    page.click("#key-form button[type=submit]")
    expect(page.locator("#view-admin")).to_be_visible()
    expect(page.locator("#admin")).to_be_visible()
    page.click("#admin-forget")
    expect(page.locator("#view-admin")).to_be_hidden()
    expect(page.locator("#admin")).to_be_hidden()
    expect(page.locator("#key-status")).to_have_text("Enter your API key to start.")
    watched.assert_clean()


def test_an_admin_manages_accounts_keys_and_credits(
    serve: Serve, open_page: Opener, screenshot_dir: Path
) -> None:
    admin = _admin_key(serve)
    carol_tenant = serve.new_key("dana", 300)
    dana_account = _account_id(serve, carol_tenant)
    queued = httpx.post(
        serve.url + SUBMIT,
        headers={"x-api-key": carol_tenant},
        json={"prompt": "a heron in the reeds", "num_inference_steps": 2},
    )
    assert queued.status_code == 202, queued.text
    request_id = queued.json()["request_id"]

    watched = open_page("/", width=1440, height=1000)
    page = watched.page
    _sign_in(page, admin)
    page.click("#view-admin")
    expect(page.locator("#admin")).to_be_visible()
    expect(page.locator("#playground")).to_be_hidden()
    assert page.url.endswith("#admin")
    card = page.locator(f"#accounts li[data-account-id='{dana_account}']")
    expect(card.locator("h3")).to_have_text("dana")
    expect(card.locator(".stats")).to_contain_text("Requests1")
    job = page.locator(f"#admin-jobs li[data-request-id='{request_id}']")
    expect(job.locator(".job-account")).to_have_text("dana")
    expect(job.locator(".prompt")).to_have_text("a heron in the reeds")

    # Grant with a reason: the balance on the card moves, the ledger names it.
    balance = httpx.get(f"{serve.url}/v2/account", headers={"x-api-key": carol_tenant}).json()[
        "balance"
    ]
    card.locator("select").select_option("grant")
    card.locator("input[type=number]").fill("100")
    card.locator("input[type=text]").first.fill("support ticket 7")
    card.get_by_role("button", name="Apply").click()
    expect(page.locator("#admin-status")).to_have_text(
        f"Granted 100 credits: dana now has {balance + 100}."
    )
    expect(card.locator(".stats")).to_contain_text(f"Balance{balance + 100}")
    entry = httpx.get(f"{serve.url}/v2/account", headers={"x-api-key": carol_tenant}).json()[
        "ledger"
    ][0]
    assert (entry["kind"], entry["amount"], entry["note"]) == ("grant", 100, "support ticket 7")

    # A deduct beyond the balance is refused and says why; nothing changes.
    card.locator("select").select_option("deduct")
    card.locator("input[type=number]").fill(str(balance + 101))
    card.locator("input[type=text]").first.fill("too much")
    card.get_by_role("button", name="Apply").click()
    expect(card.locator(".credits .error-text")).to_contain_text(
        f"Cannot deduct {balance + 101} credits: the balance is {balance + 100}"
    )
    expect(card.locator(".stats")).to_contain_text(f"Balance{balance + 100}")

    # A new account and key, shown once; the key works, then is revoked from its card.
    page.fill("#new-account-name", "erin")
    page.fill("#new-account-credits", "40")
    page.click("#new-account-submit")
    expect(page.locator("#new-key-out")).to_be_visible()
    erin_key = page.text_content("#new-key-value") or ""
    erin = httpx.get(f"{serve.url}/v2/account", headers={"x-api-key": erin_key})
    assert erin.status_code == 200 and erin.json()["balance"] == 40
    erin_card = page.locator(f"#accounts li[data-account-id='{erin.json()['account_id']}']")
    revoke = erin_card.locator(".key .revoke")
    revoke.click()
    expect(revoke).to_have_text("Confirm revoke")
    save_screenshot(page, screenshot_dir / "admin-1440.png")
    revoke.click()
    expect(erin_card.locator(".key")).to_have_attribute("data-revoked", "true")
    expect(erin_card.locator(".key .badge")).to_have_text("revoked")
    assert httpx.get(f"{serve.url}/v2/account", headers={"x-api-key": erin_key}).status_code == 401
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 1440
    watched.assert_clean()


def test_the_console_fits_a_phone(serve: Serve, open_page: Opener, screenshot_dir: Path) -> None:
    admin = _admin_key(serve, "ops-phone")
    watched = open_page("/#admin", width=390, height=844)
    page = watched.page
    _sign_in(page, admin)
    expect(page.locator("#admin")).to_be_visible()  # the URL asked for it
    expect(page.locator("#admin")).to_have_attribute("data-loaded", "true")
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    cut = page.evaluate(
        """() => [...document.querySelectorAll('#admin *')].filter(e => {
             const r = e.getBoundingClientRect();
             return r.width > 0 && (r.left < -1 || r.right > innerWidth + 1);
           }).map(e => e.id || e.className || e.tagName)"""
    )
    assert cut == []
    save_screenshot(page, screenshot_dir / "admin-390.png")
    watched.assert_clean()
