"""The OpenAI Images dialect, driven by the official `openai` SDK against a live server."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI
from PIL import Image

from auraserve.config import Settings
from auraserve.store import jobs, ledger
from tests.conftest import LiveServer, Tenant, make_tenant


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sync_timeout_seconds": 60.0})


def _client(server: LiveServer, key: str) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _job_of(server: LiveServer, request_id: str) -> jobs.Job:
    job = jobs.get(server.runtime.db, request_id.rsplit("_", 1)[1])
    assert job is not None
    return job


def test_sdk_b64_json(server: LiveServer, tenant: Tenant) -> None:
    sdk = _client(server, tenant.key)
    raw = sdk.images.with_raw_response.generate(
        model="auraflow-v0-3-512",
        prompt="a lighthouse at dusk",
        n=1,
        size="512x512",
        quality="low",
        response_format="b64_json",
        output_format="webp",
        output_compression=70,
    )
    result = raw.parse()
    assert result.created > 0 and result.size == "512x512" and result.output_format == "webp"
    [item] = result.data or []
    assert item.url is None and item.b64_json is not None
    assert item.revised_prompt == "a lighthouse at dusk"
    image = Image.open(io.BytesIO(base64.b64decode(item.b64_json)))
    assert image.format == "WEBP" and image.size == (512, 512)
    job = _job_of(server, raw.headers["x-request-id"])
    assert job.model_id == "auraflow-v0-3-512"
    assert (job.request.steps, job.request.output_quality) == (12, 70)  # quality low → 12 steps
    assert raw.headers["x-remaining-credits"] == str(
        ledger.balance(server.runtime.db, tenant.account_id)
    )


def test_sdk_urls(server: LiveServer, tenant: Tenant) -> None:
    sdk = _client(server, tenant.key)
    result = sdk.images.generate(
        prompt="two owls",
        n=2,
        size="512x512",
        response_format="url",
        extra_body={"seed": 99, "guidance_scale": 4.0},
        quality="low",
    )
    assert result.output_format == "png"  # OpenAI's default
    urls = [d.url or "" for d in result.data or []]
    assert len(urls) == 2 and all(u.startswith(server.url + "/media/") for u in urls)
    for url in urls:
        media = httpx.get(url)
        assert media.status_code == 200 and media.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(media.content)).size == (512, 512)


def test_sdk_errors_raise_typed_exceptions(api_only_server: LiveServer, tenant: Tenant) -> None:
    sdk = _client(api_only_server, tenant.key)
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", n=11)
    err = info.value
    assert err.status_code == 400 and err.param == "n" and err.type == "invalid_request_error"
    assert "n:" in err.message
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", size="256x256")
    assert info.value.param == "size"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", size="huge")
    assert info.value.param == "size"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", model="no-such-model")
    assert info.value.param == "model"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", quality="ultra")  # type: ignore[call-overload]
    assert info.value.param == "quality"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="x", output_format="gif")
    assert info.value.param == "output_format"
    with pytest.raises(openai.BadRequestError) as info:
        sdk.images.generate(prompt="")
    assert info.value.param == "prompt"
    with pytest.raises(openai.AuthenticationError) as auth:
        _client(api_only_server, "aura_bad_key").images.generate(prompt="x")
    assert auth.value.status_code == 401 and auth.value.type == "authentication_error"
    poor = make_tenant(api_only_server.runtime, credits=1, name="poor")
    with pytest.raises(openai.RateLimitError) as quota:
        _client(api_only_server, poor.key).images.generate(prompt="x")
    assert quota.value.code == "insufficient_quota"
    # Unknown paths under the SDK's base URL are OpenAI-shaped too.
    resp = httpx.post(
        api_only_server.url + "/v1/images/edits", headers={"Authorization": f"Bearer {tenant.key}"}
    )
    assert resp.status_code == 404 and resp.json()["error"]["type"] == "not_found_error"


def test_mapping_of_model_quality_and_size(api_only_server: LiveServer, tenant: Tenant) -> None:
    """Without a worker the request times out (504), which leaves the mapped job to inspect."""
    runtime = api_only_server.runtime
    runtime.settings = runtime.settings.model_copy(update={"sync_timeout_seconds": 0.2})
    headers = {"Authorization": f"Bearer {tenant.key}"}
    url = api_only_server.url + "/v1/images/generations"
    cases = [
        ({"prompt": "a"}, ("auraflow-v0-3", 25, 1024, 1024, "png")),
        (
            {"prompt": "a", "model": "dall-e-3", "quality": "hd", "size": "768x512"},
            ("auraflow-v0-3", 40, 768, 512, "png"),
        ),
        (
            {
                "prompt": "a",
                "model": "auraflow-v0-3-512",
                "quality": "auto",
                "size": "auto",
                "output_format": "jpeg",
            },
            ("auraflow-v0-3-512", 25, 512, 512, "jpeg"),
        ),
        ({"prompt": "a", "quality": "medium", "n": 3}, ("auraflow-v0-3", 25, 1024, 1024, "png")),
    ]
    for body, (model, steps, width, height, fmt) in cases:
        resp = httpx.post(url, headers=headers, json=body)
        assert resp.status_code == 504, resp.text
        assert resp.json()["error"]["message"].startswith("The image is not ready")
        job = _job_of(api_only_server, resp.headers["x-request-id"])
        req = job.request
        assert (job.model_id, req.steps, req.width, req.height, req.output_format) == (
            model,
            steps,
            width,
            height,
            fmt,
        )
    assert job.request.num_images == 3


def test_gpt_image_models_answer_b64_json_by_default(server: LiveServer, tenant: Tenant) -> None:
    """As at OpenAI: gpt-image-* answer with base64 unless asked otherwise; dall-e-* with URLs."""
    sdk = _client(server, tenant.key)
    common: dict[str, Any] = {"prompt": "a kite", "size": "512x512", "quality": "low"}
    gpt = sdk.images.generate(model="gpt-image-1", **common)
    [item] = gpt.data or []
    assert item.url is None and item.b64_json is not None
    assert Image.open(io.BytesIO(base64.b64decode(item.b64_json))).size == (512, 512)
    dalle = sdk.images.generate(model="dall-e-3", **common)
    [item] = dalle.data or []
    assert item.b64_json is None and (item.url or "").startswith(server.url + "/media/")
    asked = sdk.images.generate(model="gpt-image-1", response_format="url", **common)
    assert (asked.data or [])[0].url is not None


def test_invalid_size_names_the_allowed_sizes(api_only_server: LiveServer, tenant: Tenant) -> None:
    sdk = _client(api_only_server, tenant.key)
    for size in ("256x256", "4096x1024", "huge"):
        with pytest.raises(openai.BadRequestError) as info:
            sdk.images.generate(prompt="x", size=size)  # type: ignore[arg-type]
        err = info.value
        assert err.param == "size" and err.type == "invalid_request_error"
        assert "an integer" not in err.message
        assert "from 512 to 2048" in err.message and "1024x1024" in err.message
        assert "1536x1024" in err.message and "auto" in err.message


def test_unknown_method_under_the_prefix_is_openai_shaped_405(
    api_only_server: LiveServer, tenant: Tenant
) -> None:
    resp = httpx.get(
        api_only_server.url + "/v1/images/generations",
        headers={"Authorization": f"Bearer {tenant.key}"},
    )
    assert resp.status_code == 405 and resp.headers["allow"] == "POST"
    assert resp.json()["error"]["type"] == "invalid_request_error"


def test_sdk_lists_and_retrieves_the_served_models(
    api_only_server: LiveServer, tenant: Tenant
) -> None:
    sdk = _client(api_only_server, tenant.key)
    presets = sorted(api_only_server.runtime.settings.presets)
    models = list(sdk.models.list())
    assert [m.id for m in models] == presets
    assert all(m.object == "model" and m.owned_by == "auraserve" for m in models)
    assert all(isinstance(m.created, int) and m.created > 0 for m in models)
    assert sdk.models.retrieve(presets[0]).id == presets[0]
    # OpenAI's own names are accepted by images.generate, so they retrieve too.
    assert sdk.models.retrieve("gpt-image-1").id == "gpt-image-1"
    with pytest.raises(openai.NotFoundError) as missing:
        sdk.models.retrieve("no-such-model")
    assert missing.value.code == "model_not_found" and missing.value.param == "model"
    with pytest.raises(openai.AuthenticationError):
        list(_client(api_only_server, "aura_bad_key").models.list())


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/chat/completions", 404),
        ("POST", "/v1/embeddings", 404),
        ("GET", "/v1/", 404),
        ("DELETE", "/v1/models/auraflow-v0-3", 405),
        ("POST", "/v1/models", 405),
        ("GET", "/v1/images/generations", 405),
        ("PUT", "/v1/images/edits", 404),
        # A Sync API path with a method it does not take: still below the SDKs' base URL.
        ("GET", "/v1/aura-flow", 405),
    ],
)
def test_unknown_paths_and_methods_under_v1_answer_in_openais_shape(
    api_only_server: LiveServer, tenant: Tenant, method: str, path: str, status: int
) -> None:
    headers = {"Authorization": f"Bearer {tenant.key}"}
    resp = httpx.request(method, api_only_server.url + path, headers=headers)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    if status == 405:
        assert resp.headers["allow"]


def test_a_503_is_a_server_error_not_the_requests_fault() -> None:
    from auraserve.api.dialects.openai import OPENAI
    from auraserve.errors import StoreUnavailable

    body = OPENAI.error_body(OPENAI.problem(StoreUnavailable()))
    assert body["error"]["type"] == "server_error"
