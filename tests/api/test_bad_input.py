"""Bad requests: each gets its specific 4xx naming the field, and nothing is charged."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from auraserve.store import jobs, ledger
from tests.conftest import LiveServer, Tenant

SEED_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"

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
