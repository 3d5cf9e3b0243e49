"""Bad requests: each gets its specific 4xx naming the field, and nothing is charged."""

from __future__ import annotations

import base64
import json
from typing import Any

import httpx
import pytest

from auraserve.store import jobs, ledger
from tests.conftest import LiveServer, Tenant

SEED_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
# A 1×1 PNG, and a PNG signature followed by more than the 2 MiB inline limit.
_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
)
_SCALE = "loras[0].scale"
_TOO_LARGE_PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"0" * (2 * 1024 * 1024)).decode()

CASES: list[tuple[str, Any, int, str | None]] = [
    # (name, body (dict → JSON, bytes → raw), expected status, field named in the error)
    ("missing prompt", {"num_images": 1}, 400, "prompt"),
    ("empty prompt", {"prompt": ""}, 400, "prompt"),
    ("blank prompt", {"prompt": "   "}, 400, "prompt"),
    ("prompt not a string", {"prompt": 5}, 400, "prompt"),
    ("prompt with NUL", {"prompt": "a\x00b"}, 400, "prompt"),
    ("1 MB prompt", {"prompt": "x" * 1_000_000}, 400, "prompt"),
    ("negative prompt NUL", {"prompt": "a", "negative_prompt": "\x00"}, 400, "negative_prompt"),
    ("steps string", {"prompt": "a", "num_inference_steps": "many"}, 400, "num_inference_steps"),
    ("steps bool", {"prompt": "a", "num_inference_steps": True}, 400, "num_inference_steps"),
    ("steps float", {"prompt": "a", "num_inference_steps": 2.5}, 400, "num_inference_steps"),
    ("steps zero", {"prompt": "a", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ("steps too many", {"prompt": "a", "num_inference_steps": 101}, 400, "num_inference_steps"),
    ("images too many", {"prompt": "a", "num_images": 11}, 400, "num_images"),
    ("images negative", {"prompt": "a", "num_images": -1}, 400, "num_images"),
    ("guidance too high", {"prompt": "a", "guidance_scale": 20.5}, 400, "guidance_scale"),
    ("guidance list", {"prompt": "a", "guidance_scale": [1]}, 400, "guidance_scale"),
    ("width small", {"prompt": "a", "width": 256}, 400, "width"),
    ("height huge", {"prompt": "a", "height": 10**12}, 400, "height"),
    ("seed negative", {"prompt": "a", "seed": -5}, 400, "seed"),
    ("seed huge", {"prompt": "a", "seed": 2**64}, 400, "seed"),
    ("expand not bool", {"prompt": "a", "expand_prompt": "perhaps"}, 400, "expand_prompt"),
    ("unknown sampler", {"prompt": "a", "sampler": "magic"}, 400, "sampler"),
    ("unknown scheduler", {"prompt": "a", "scheduler": "magic"}, 400, "scheduler"),
    ("unknown format", {"prompt": "a", "output_format": "gif"}, 400, "output_format"),
    ("malformed JSON", b'{"prompt": ', 400, "body"),
    ("JSON array", b'["prompt"]', 400, "body"),
    ("empty body", b"", 400, "body"),
    ("not UTF-8", b'{"prompt": "\xff\xfe"}', 400, "body"),
    ("integer of 5000 digits", b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", 400, "body"),
    (
        "JSON nested 980 deep",
        b'{"prompt": "a", "x": ' + b"[" * 980 + b"]" * 980 + b"}",
        400,
        "body",
    ),
    ("JSON nested 100000 deep", b"[" * 100_000 + b"]" * 100_000, 400, "body"),
    ("JSON nested 33 deep", b'{"prompt": "a", "x": ' + b"[" * 32 + b"]" * 32 + b"}", 400, "body"),
    # Image-to-image: what the API can see at submit (it never decodes the image).
    ("image malformed data URI", {"prompt": "a", "image": "data:image/png,abc"}, 400, "image"),
    ("image wrong data type", {"prompt": "a", "image": "data:text/html;base64,PGI+"}, 400, "image"),
    ("image bad base64", {"prompt": "a", "image": "!!not base64!!"}, 400, "image"),
    ("image not an image", {"prompt": "a", "image": "aGVsbG8gd29ybGQ="}, 400, "image"),
    ("image too large", {"prompt": "a", "image": _TOO_LARGE_PNG}, 400, "image"),
    ("image not a string", {"prompt": "a", "image": 5}, 400, "image"),
    ("image http URL", {"prompt": "a", "image": "http://example.com/a.png"}, 400, "image"),
    ("image ftp URL", {"prompt": "a", "image": "ftp://example.com/a.png"}, 400, "image"),
    ("image private address", {"prompt": "a", "image": "https://10.0.0.1/a.png"}, 400, "image"),
    ("image metadata address", {"prompt": "a", "image": "https://169.254.169.254/"}, 400, "image"),
    ("image URL credentials", {"prompt": "a", "image": "https://u:p@example.com/"}, 400, "image"),
    ("strength above 1", {"prompt": "a", "image": _PNG, "strength": 1.5}, 400, "strength"),
    ("strength negative", {"prompt": "a", "image": _PNG, "strength": -0.1}, 400, "strength"),
    ("strength not a number", {"prompt": "a", "image": _PNG, "strength": "x"}, 400, "strength"),
    ("strength without image", {"prompt": "a", "strength": 0.5}, 400, "strength"),
    # LoRA (the default settings register no adapter, so every name is unknown).
    ("lora unknown name", {"prompt": "a", "loras": [{"name": "x"}]}, 400, "loras[0].name"),
    ("lora path as name", {"prompt": "a", "loras": [{"name": "../a"}]}, 400, "loras[0].name"),
    ("lora too many", {"prompt": "a", "loras": [{"name": "x"}] * 5}, 400, "loras"),
    ("lora scale 3", {"prompt": "a", "loras": [{"name": "x", "scale": 3}]}, 400, "loras[0].scale"),
    ("lora scale bool", {"prompt": "a", "loras": [{"name": "x", "scale": True}]}, 400, _SCALE),
    ("lora no name", {"prompt": "a", "loras": [{"scale": 1}]}, 400, "loras[0].name"),
    ("lora not a list", {"prompt": "a", "loras": "x"}, 400, "loras"),
    ("10 MB body", b'{"prompt": "' + b"x" * (10 * 1024 * 1024) + b'"}', 413, None),
]


@pytest.mark.parametrize(("name", "body", "status", "field"), CASES, ids=[c[0] for c in CASES])
def test_bad_request(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    name: str,
    body: Any,
    status: int,
    field: str | None,
) -> None:
    db = api_only_server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    resp = client.post(
        SEED_PATH, content=raw, headers={**tenant.headers, "content-type": "application/json"}
    )
    assert resp.status_code == status, resp.text
    payload = resp.json()
    assert set(payload) >= {"error", "message"}
    if field is not None:
        assert payload["field"] == field
        assert payload["message"].startswith(field)
    assert ledger.balance(db, tenant.account_id) == before
    assert jobs.count_active(db, tenant.account_id) == 0


def test_range_errors_say_the_allowed_range(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    resp = client.post(
        SEED_PATH, headers=tenant.headers, json={"prompt": "a", "num_inference_steps": 500}
    )
    assert "from 1 to 100" in resp.json()["message"]
    resp = client.post(SEED_PATH, headers=tenant.headers, json={"prompt": "a", "sampler": "x"})
    assert "euler" in resp.json()["message"] and "uni_pc" in resp.json()["message"]


def test_chunked_body_over_the_limit_is_413(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    def chunks():
        yield b'{"prompt": "'
        for _ in range(6):
            yield b"x" * (1024 * 1024)
        yield b'"}'

    resp = client.post(
        SEED_PATH, content=chunks(), headers={**tenant.headers, "content-type": "application/json"}
    )
    assert resp.status_code == 413


# The body parsers' refusals, on every dialect: each a 400 in that dialect's shape.
PARSER_CASES: list[tuple[str, bytes, str]] = [
    ("integer of 5000 digits", b'{"prompt": "a", "seed": ' + b"9" * 5000 + b"}", "number too long"),
    ("JSON nested 980 deep", b'{"prompt": "a", "x": ' + b"[" * 980 + b"]" * 980 + b"}", "nested"),
    ("malformed JSON", b'{"prompt": ', "malformed JSON"),
]
DIALECT_PATHS = {
    "queue": SEED_PATH,
    "sync": "/v1/aura-flow",
    "openai": "/v1/images/generations",
}


def _message_and_field(dialect: str, payload: dict[str, Any]) -> tuple[str, str | None]:
    if dialect == "openai":
        return payload["error"]["message"], payload["error"]["param"]
    return payload["message"], payload.get("field")


@pytest.mark.parametrize("dialect", list(DIALECT_PATHS))
@pytest.mark.parametrize(("name", "body", "says"), PARSER_CASES, ids=[c[0] for c in PARSER_CASES])
def test_parser_refusals_are_400_in_every_dialect(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    dialect: str,
    name: str,
    body: bytes,
    says: str,
) -> None:
    resp = client.post(
        DIALECT_PATHS[dialect],
        content=body,
        headers={**tenant.headers, "content-type": "application/json"},
    )
    assert resp.status_code == 400, resp.text
    message, field = _message_and_field(dialect, resp.json())
    assert field == "body"
    assert says in message


FORM_CASES: list[tuple[str, bytes, str]] = [
    ("no boundary", b"garbage", "multipart/form-data"),
    (
        "part without a name",
        b"--xyz\r\nContent-Disposition: form-data\r\n\r\na\r\n--xyz--\r\n",
        "multipart/form-data; boundary=xyz",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "content_type"), FORM_CASES, ids=[c[0] for c in FORM_CASES]
)
def test_malformed_form_data_is_400_in_the_sync_shape(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    name: str,
    body: bytes,
    content_type: str,
) -> None:
    resp = client.post(
        "/v1/aura-flow", content=body, headers={**tenant.headers, "content-type": content_type}
    )
    assert resp.status_code == 400, resp.text
    payload = resp.json()
    assert payload["field"] == "body"
    assert payload["message"].startswith("body: malformed form data")


# Lax parsing, decided (api/body.py): per dialect, (field, value) → accepted value or refused.
LAX: list[tuple[str, str, Any, Any]] = [
    # dialect, field, sent, read as (None: refused with 400 naming the field)
    ("sync", "steps", "3", 3),
    ("sync", "steps", "3.0", 3),
    ("sync", "steps", 3.0, 3),
    ("sync", "cfg", "1.5", 1.5),
    ("sync", "seed", "1e3", 1000),
    ("sync", "steps", "1_0", None),
    ("sync", "steps", " 3", None),
    ("sync", "steps", "+3", None),
    ("sync", "steps", "0x10", None),
    ("sync", "steps", "٣", None),
    ("sync", "steps", "2.5", None),
    ("sync", "seed", "9" * 5000, None),
    ("queue", "num_inference_steps", 3, 3),
    ("queue", "num_inference_steps", 3.0, 3),
    ("queue", "guidance_scale", 2, 2.0),
    ("queue", "num_inference_steps", "3", None),
    ("queue", "guidance_scale", "1.5", None),
    ("queue", "seed", "1_0", None),
    ("queue", "num_inference_steps", 2.5, None),
    ("openai", "n", 1.0, 1),
    ("openai", "seed", 7, 7),
    ("openai", "n", "1", None),
    ("openai", "seed", "1_0", None),
]
CANONICAL = {"steps": "steps", "num_inference_steps": "steps", "cfg": "guidance_scale"}
CANONICAL |= {"guidance_scale": "guidance_scale", "seed": "seed", "n": "num_images"}


@pytest.mark.parametrize(
    ("dialect", "field", "sent", "read"), LAX, ids=[f"{d}-{f}-{s!r:.12}" for d, f, s, _ in LAX]
)
def test_lax_parsing_per_dialect(
    settings: Any, dialect: str, field: str, sent: Any, read: Any
) -> None:
    from auraserve.api.body import read_numbers
    from auraserve.api.dialects.openai import OPENAI
    from auraserve.api.dialects.queue import QUEUE
    from auraserve.api.dialects.sync import SYNC
    from auraserve.errors import InvalidParameter

    d = {"sync": SYNC, "queue": QUEUE, "openai": OPENAI}[dialect]
    body = {"prompt": "a", field: sent}
    if read is None:
        with pytest.raises(InvalidParameter) as refused:
            d.build(settings, settings.default_preset, d.canonical(read_numbers(body, d)))
        assert refused.value.field == field
        assert refused.value.message.startswith(field)
    else:
        gen = d.build(settings, settings.default_preset, d.canonical(read_numbers(body, d)))
        value = getattr(gen, CANONICAL[field])
        assert value == read and type(value) is type(read)


@pytest.mark.parametrize(
    ("path", "content", "field"),
    [
        ("/v1/aura-flow", {"prompt": "a", "steps": "1_0"}, "steps"),
        (SEED_PATH, {"prompt": "a", "num_inference_steps": "3"}, "num_inference_steps"),
        ("/v1/images/generations", {"prompt": "a", "n": "1"}, "n"),
    ],
)
def test_lax_parsing_over_http(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    path: str,
    content: dict[str, Any],
    field: str,
) -> None:
    form = path == "/v1/aura-flow"
    resp = client.post(
        path, headers=tenant.headers, **({"data": content} if form else {"json": content})
    )
    assert resp.status_code == 400, resp.text
    payload = resp.json()
    named = payload["error"]["param"] if "images" in path else payload["field"]
    assert named == field
    accepted = client.post(
        SEED_PATH, headers=tenant.headers, json={"prompt": "a", "num_inference_steps": 3.0}
    )
    assert accepted.status_code == 202, accepted.text


def test_nul_bytes_in_paths_and_query_strings_are_4xx_on_every_get_route(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    """PostgreSQL refuses NUL in text with an error of its own; a NUL in an id or a query
    parameter must get a 4xx before it reaches a query, on every route the OpenAPI document
    lists (so a new route is covered the day it is added)."""
    spec = client.get("/openapi.json").json()
    tried = []
    for path, operations in spec["paths"].items():
        operation = operations.get("get")
        if operation is None:
            continue
        params = operation.get("parameters", [])
        path_params = [p["name"] for p in params if p["in"] == "path"]
        query_params = [
            p["name"]
            for p in params
            if p["in"] == "query" and p.get("schema", {}).get("type") in ("string", None)
        ]
        url = path
        for name in path_params:
            url = url.replace("{" + name + "}", "req%00x")
        queries = [f"{name}=a%00b" for name in query_params]
        for query in [None, *queries] if path_params else queries:
            target = url if query is None else f"{url}?{query}"
            resp = client.get(target, headers=tenant.headers)
            tried.append(target)
            assert 400 <= resp.status_code < 500, (target, resp.status_code, resp.text)
    assert any("{" not in t and "%00x" in t for t in tried), tried  # path ids were tried
    assert any("cursor=" in t for t in tried), tried  # and query strings
