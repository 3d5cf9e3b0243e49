"""The account's own history, credits and the model catalogue; the playground and docs pages'
headers and offline assets (issue 13, requirements 1, 2, 3 and 6 at the HTTP level; the
browser side is tests/playground)."""

from __future__ import annotations

import re
from html.parser import HTMLParser

import httpx
import pytest

from auraserve.core.presets import default_presets
from auraserve.core.request import GenerationRequest, bounds
from auraserve.core.samplers import OUTPUT_FORMATS, SAMPLERS, SCHEDULERS
from auraserve.playground import INDEX_HTML, STATIC_DIR
from tests.conftest import LiveServer, Tenant, make_tenant

MODEL = "auraflow-v0-3-512"
SUBMIT = f"/{MODEL}/v1/auraflow-v0-3-request"


def _submit(client: httpx.Client, tenant: Tenant, prompt: str) -> str:
    resp = client.post(
        SUBMIT,
        headers=tenant.headers,
        json={"prompt": prompt, "num_inference_steps": 4, "seed": 7},
    )
    assert resp.status_code == 202, resp.text
    return str(resp.json()["request_id"])


def _pages(client: httpx.Client, tenant: Tenant, **params: object) -> list[dict[str, object]]:
    items: list[dict[str, object]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        resp = client.get("/v2/requests", headers=tenant.headers, params=query)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items


def test_history_lists_only_the_callers_requests_newest_first(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    other = make_tenant(api_only_server.runtime, name="other")
    mine = []
    for i in range(3):
        mine.append(_submit(client, tenant, f"mine {i}"))
        _submit(client, other, f"<b>theirs</b> {i}")

    items = _pages(client, tenant, limit=2)
    assert [item["request_id"] for item in items] == list(reversed(mine))
    theirs = _pages(client, other, limit=100)
    assert len(theirs) == 3 and not {i["request_id"] for i in theirs} & set(mine)

    # Each item is the status endpoint's object, plus the parameters to resubmit it.
    for item in items:
        status = client.get(f"/v2/requests/status/{item['request_id']}", headers=tenant.headers)
        assert {k: v for k, v in item.items() if k != "parameters"} == status.json()
    params = items[-1]["parameters"]
    assert isinstance(params, dict)
    assert params["prompt"] == "mine 0"
    assert params["num_inference_steps"] == 4 and params["seed"] == 7
    assert params["width"] == params["height"] == 512
    assert "steps" not in params  # queue dialect names: the body can be submitted as it is
    again = client.post(SUBMIT, headers=tenant.headers, json=params)
    assert again.status_code == 202, again.text


def test_history_filters_by_status_and_refuses_bad_queries(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    kept = _submit(client, tenant, "kept")
    dropped = _submit(client, tenant, "dropped")
    resp = client.post(f"/v2/requests/{dropped}/cancel", headers=tenant.headers)
    assert resp.status_code == 200
    cancelled = _pages(client, tenant, status="CANCELLED")
    assert [i["request_id"] for i in cancelled] == [dropped]
    queued = _pages(client, tenant, status="QUEUED")
    assert [i["request_id"] for i in queued] == [kept]
    assert queued[0]["queue_position"] == 0
    assert _pages(client, tenant, status="COMPLETED") == []

    for params, field in (
        ({"status": "DONE"}, "status"),
        ({"cursor": "not-a-cursor"}, "cursor"),
        ({"limit": 0}, "limit"),
        ({"limit": 101}, "limit"),
        ({"limit": "ten"}, "limit"),
    ):
        resp = client.get("/v2/requests", headers=tenant.headers, params=params)
        assert resp.status_code == 400, (params, resp.text)
        assert resp.json()["field"] == field
        assert resp.json()["error"] == "Invalid parameter"
    assert client.get("/v2/requests").status_code == 401
    assert client.get("/v2/requests", headers={"x-api-key": "aura_bad"}).status_code == 401


def test_account_shows_balance_reservations_and_the_ledger(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    tenant = make_tenant(api_only_server.runtime, credits=1000, name="acme")
    other = make_tenant(api_only_server.runtime, credits=500, name="other")
    kept = _submit(client, tenant, "kept")
    dropped = _submit(client, tenant, "dropped")
    _submit(client, other, "not mine")
    client.post(f"/v2/requests/{dropped}/cancel", headers=tenant.headers)

    body = client.get("/v2/account", headers=tenant.headers).json()
    price = 1000 - body["balance"]
    assert price > 0
    assert body["name"] == "acme" and body["account_id"] == tenant.account_id
    assert body["reserved"] == price
    assert [(e["kind"], e["request_id"], e["balance_delta"]) for e in body["ledger"]] == [
        ("release", dropped, price),
        ("reserve", dropped, -price),
        ("reserve", kept, -price),
        ("grant", None, 1000),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT.*Z", e["created_at"]) for e in body["ledger"])
    theirs = client.get("/v2/account", headers=other.headers).json()
    assert {e["request_id"] for e in theirs["ledger"]} & {kept, dropped} == set()
    assert theirs["balance"] + theirs["reserved"] == 500

    short = client.get("/v2/account", headers=tenant.headers, params={"entries": 1}).json()
    assert [e["kind"] for e in short["ledger"]] == ["release"]
    assert client.get("/v2/account", params={"entries": 1}).status_code == 401
    bad = client.get("/v2/account", headers=tenant.headers, params={"entries": 1000})
    assert bad.status_code == 400 and bad.json()["field"] == "entries"


def test_models_lists_presets_with_ranges_from_the_canonical_request(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    resp = client.get("/v2/models")  # public: the form is built before a key is entered
    assert resp.status_code == 200
    body = resp.json()
    assert body["samplers"] == list(SAMPLERS)
    assert body["schedulers"] == list(SCHEDULERS)
    assert body["output_formats"] == list(OUTPUT_FORMATS)
    presets = api_only_server.runtime.settings.presets
    assert [m["model_id"] for m in body["models"]] == sorted(presets)
    assert {(s["width"], s["height"]) for s in body["sizes"]} == {
        (p.width, p.height) for p in presets.values()
    }
    small = next(m for m in body["models"] if m["model_id"] == MODEL)
    preset = default_presets()[MODEL]
    assert small["defaults"]["width"] == preset.width == 512
    assert small["defaults"]["num_inference_steps"] == preset.steps
    assert small["defaults"]["sampler"] == preset.sampler
    assert small["submit_path"] == f"/{MODEL}/v1/{MODEL}-request"
    ranges = small["ranges"]
    for public, canonical in (
        ("width", "width"),
        ("num_inference_steps", "steps"),
        ("guidance_scale", "guidance_scale"),
        ("shift", "shift"),
        ("num_images", "num_images"),
        ("output_quality", "output_quality"),
        ("seed", "seed"),
    ):
        assert (ranges[public]["minimum"], ranges[public]["maximum"]) == bounds(canonical)
    schema = GenerationRequest.model_json_schema()["properties"]
    assert ranges["prompt"]["maxLength"] == schema["prompt"]["maxLength"]
    assert ranges["sampler"]["enum"] == list(SAMPLERS)
    # A submission at the advertised limits is accepted by the validator.
    tenant = make_tenant(api_only_server.runtime)
    edge = {"prompt": "p", "width": ranges["width"]["maximum"], "num_inference_steps": 1}
    assert client.post(small["submit_path"], headers=tenant.headers, json=edge).status_code == 202


def test_openapi_documents_the_new_routes(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    doc = client.get("/openapi.json").json()
    for path in ("/v2/requests", "/v2/account", "/v2/models"):
        assert "get" in doc["paths"][path], path
    params = {p["name"] for p in doc["paths"]["/v2/requests"]["get"]["parameters"]}
    assert {"limit", "cursor", "status"} <= params
    # The pages are not API operations.
    assert "/" not in doc["paths"] and "/docs" not in doc["paths"]


def _policy(resp: httpx.Response) -> dict[str, str]:
    policy = resp.headers["content-security-policy"]
    return {
        part.split(" ", 1)[0]: part.split(" ", 1)[1] if " " in part else ""
        for part in (p.strip() for p in policy.split(";"))
    }


@pytest.mark.parametrize("path", ["/", "/playground"])
def test_the_page_is_served_with_a_strict_policy(
    api_only_server: LiveServer, client: httpx.Client, path: str
) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    assert resp.text == INDEX_HTML.read_text()
    policy = _policy(resp)
    assert policy["script-src"] == "'self'"
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert policy["default-src"] == "'none'"
    # No native form submission (which would put fields in a URL) even before the script runs.
    assert policy["form-action"] == "'none'"
    assert "unsafe" not in resp.headers["content-security-policy"]
    assert resp.headers["x-frame-options"] == "DENY"
    assert resp.headers["referrer-policy"] == "no-referrer"
    assert resp.headers["x-content-type-options"] == "nosniff"


class _Scan(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline_handlers: list[str] = []
        self.urls: list[str] = []
        self.in_script = False
        self.script_text = ""
        self.key_input: dict[str, str | None] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if found.get("id") == "api-key":
            self.key_input = found
        self.inline_handlers += [name for name in found if name.startswith("on")]
        self.urls += [v for k, v in found.items() if k in ("src", "href") and v]
        if tag == "script":
            self.scripts.append(found)
            self.in_script = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self.in_script = False

    def handle_data(self, data: str) -> None:
        if self.in_script:
            self.script_text += data


def test_the_page_has_no_inline_script_and_no_outside_urls(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    scan = _Scan()
    scan.feed(INDEX_HTML.read_text())
    assert scan.scripts and all(s.get("src") for s in scan.scripts)
    assert scan.script_text.strip() == ""
    assert scan.inline_handlers == []
    # The key field has no name, so no form serialisation can ever carry it.
    assert scan.key_input["type"] == "password" and "name" not in scan.key_input
    local = [u for u in scan.urls if not u.startswith("#")]
    assert all(u.startswith("/") for u in local), local
    for url in local:
        resp = client.get(url)
        assert resp.status_code == 200, url
    for source in STATIC_DIR.glob("*.js"):
        text = source.read_text()
        assert "innerHTML" not in text and "eval(" not in text and "new Function" not in text
        assert "http://" not in text and "https://" not in text, source.name


def test_assets_carry_types_and_the_policy(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    js = client.get("/playground/static/app.js")
    assert js.headers["content-type"].startswith(("text/javascript", "application/javascript"))
    assert "script-src 'self'" in js.headers["content-security-policy"]
    assert client.get("/playground/static/style.css").headers["content-type"].startswith("text/css")
    assert client.get("/playground/static/nope.js").status_code == 404
    assert client.get("/playground/static/../__init__.py").status_code == 404


@pytest.mark.parametrize(
    ("path", "assets"),
    [
        (
            "/docs",
            [
                "/playground/vendor/swagger-ui/swagger-ui-bundle.js",
                "/playground/vendor/swagger-ui/swagger-ui.css",
            ],
        ),
        ("/redoc", ["/playground/vendor/redoc/redoc.standalone.js"]),
    ],
)
def test_api_docs_load_their_assets_from_this_server(
    api_only_server: LiveServer, client: httpx.Client, path: str, assets: list[str]
) -> None:
    resp = client.get(path)
    assert resp.status_code == 200
    assert "https://" not in resp.text and "http://" not in resp.text
    for asset in assets:
        assert asset in resp.text
        served = client.get(asset)
        assert served.status_code == 200 and len(served.content) > 100_000, asset
    policy = _policy(resp)
    # Looser than the page's for styles (the viewers inject them), never for scripts.
    sources = policy["script-src"].split()
    assert sources[0] == "'self'"
    assert all(s.startswith("'sha256-") for s in sources[1:]), sources
    assert policy["frame-ancestors"] == "'none'"
    assert resp.headers["x-frame-options"] == "DENY"
