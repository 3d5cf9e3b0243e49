"""The sync dialect (seed 000) end to end: form/JSON in, image bytes (or base64 JSON) out,
the seed's defaults, ranges, status codes and headers, against a live server."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from PIL import Image

from auraserve.config import Settings
from auraserve.core.request import GenerationRequest
from auraserve.engine.base import CancelCheck, JobResult, StepCallback
from auraserve.media.encode import encode_image
from auraserve.media.storage import new_media_name
from auraserve.store import jobs, ledger
from tests.conftest import LiveServer, Tenant, make_tenant

SEED_URL = "/v1/aura-flow"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"sync_timeout_seconds": 60.0})


def _form(**fields: Any) -> dict[str, tuple[None, str]]:
    """multipart/form-data fields as the seed's Node client sends them: every value a string."""
    return {k: (None, str(v).lower() if isinstance(v, bool) else str(v)) for k, v in fields.items()}


def _price(server: LiveServer, preset: str, width: int, height: int, steps: int, n: int) -> int:
    p = server.runtime.settings.presets[preset].price_per_image
    return n * max(1, -(-p * width * height * steps // (1024 * 1024 * 25)))


def test_seed_form_returns_the_image_with_its_headers(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    resp = client.post(
        SEED_URL,
        headers={"x-api-key": tenant.key},
        files=_form(
            cfg=5,
            seed=2425367,
            shift=1.73,
            steps=2,
            width=512,
            height=512,
            prompt="a red fox",
            sampler="uni_pc",
            scheduler="normal",
            output_format="webp",
            output_quality=80,
            number_of_images=1,
        ),
    )
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"] == "image/webp"
    image = Image.open(io.BytesIO(resp.content))
    assert image.format == "WEBP" and image.size == (512, 512)
    assert resp.headers["x-seed"] == "2425367"
    assert float(resp.headers["x-generation-time"]) > 0
    request_id = resp.headers["x-request-id"]
    assert request_id.startswith("auraflow-v0-3_")
    charged = _price(server, "auraflow-v0-3", 512, 512, 2, 1)
    assert int(resp.headers["x-remaining-credits"]) == before - charged
    assert ledger.balance(db, tenant.account_id) == before - charged
    # The same request is visible to the async dialect's status endpoint.
    status = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()
    assert status["status"] == "COMPLETED" and status["seeds"] == [2425367]


def test_several_images_or_base64_answer_json(
    server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    # application/x-www-form-urlencoded, two images → JSON with both and their seeds.
    resp = client.post(
        SEED_URL,
        headers={"x-api-key": tenant.key},
        data={
            "prompt": "two cats",
            "steps": "1",
            "width": "512",
            "height": "512",
            "seed": "7",
            "number_of_images": "2",
            "output_format": "png",
            "sampler": "euler",
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert set(body) == {"images", "seeds"} and body["seeds"] == [7, 8]
    pngs = [Image.open(io.BytesIO(base64.b64decode(i))) for i in body["images"]]
    assert [p.format for p in pngs] == ["PNG", "PNG"]
    assert resp.headers["x-seed"] == "7"
    # JSON body with base64 true → JSON even for one image.
    resp = client.post(
        SEED_URL,
        headers={"x-api-key": tenant.key},
        json={
            "prompt": "a cat",
            "steps": 1,
            "width": 512,
            "height": 512,
            "seed": 11,
            "output_format": "jpeg",
            "base64": True,
            "sampler": "euler",
        },
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["seeds"] == [11]
    assert Image.open(io.BytesIO(base64.b64decode(body["images"][0]))).format == "JPEG"


def test_seed_defaults_and_timeout_504_leaves_job_pollable(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    """No worker runs: the request times out with 504 + request_id and the job, with exactly
    the seed's documented defaults, stays pollable."""
    api_only_server.runtime.settings = api_only_server.runtime.settings.model_copy(
        update={"sync_timeout_seconds": 0.3}
    )
    resp = client.post(SEED_URL, headers={"x-api-key": tenant.key}, files=_form(prompt="defaults"))
    assert resp.status_code == 504, resp.text
    body = resp.json()
    assert body["error"] == "Gateway Timeout"
    request_id = body["request_id"]
    assert body["polling_url"].endswith(f"/v2/requests/status/{request_id}")
    assert resp.headers["x-remaining-credits"]
    status = client.get(f"/v2/requests/status/{request_id}", headers=tenant.headers).json()
    assert status["status"] == "QUEUED" and status["queue_position"] == 0
    job = jobs.get(api_only_server.runtime.db, request_id.rsplit("_", 1)[1])
    assert job is not None
    req = job.request
    assert (req.guidance_scale, req.shift, req.steps, req.width, req.height) == (
        5.0,
        1.73,
        25,
        1024,
        1024,
    )
    assert (req.sampler, req.scheduler, req.output_format, req.output_quality) == (
        "uni_pc",
        "normal",
        "webp",
        80,
    )
    assert req.num_images == 1 and req.negative_prompt == "" and not req.expand_prompt
    # Seed is random when absent.
    resp2 = client.post(SEED_URL, headers={"x-api-key": tenant.key}, files=_form(prompt="defaults"))
    job2 = jobs.get(api_only_server.runtime.db, resp2.json()["request_id"].rsplit("_", 1)[1])
    assert job2 is not None and job2.request.seed != req.seed
    # /v1/{preset}: the same defaults, the preset's size.
    resp3 = client.post(
        "/v1/auraflow-v0-3-512",
        headers={"x-api-key": tenant.key},
        data={"prompt": "small", "cfg": "7.5", "base64": "false"},
    )
    assert resp3.status_code == 504
    job3 = jobs.get(api_only_server.runtime.db, resp3.json()["request_id"].rsplit("_", 1)[1])
    assert job3 is not None and job3.model_id == "auraflow-v0-3-512"
    assert (job3.request.width, job3.request.guidance_scale, job3.request.sampler) == (
        512,
        7.5,
        "uni_pc",
    )


BAD: list[tuple[dict[str, str], str]] = [
    ({"cfg": "5"}, "prompt"),  # prompt is required
    ({"prompt": "x", "cfg": "20.5"}, "cfg"),
    ({"prompt": "x", "cfg": "-1"}, "cfg"),
    ({"prompt": "x", "shift": "10.1"}, "shift"),
    ({"prompt": "x", "steps": "0"}, "steps"),
    ({"prompt": "x", "steps": "101"}, "steps"),
    ({"prompt": "x", "steps": "2.5"}, "steps"),
    ({"prompt": "x", "width": "511"}, "width"),
    ({"prompt": "x", "height": "2049"}, "height"),
    ({"prompt": "x", "seed": "-3"}, "seed"),
    ({"prompt": "x", "sampler": "magic"}, "sampler"),
    ({"prompt": "x", "scheduler": "magic"}, "scheduler"),
    ({"prompt": "x", "output_format": "gif"}, "output_format"),
    ({"prompt": "x", "output_quality": "101"}, "output_quality"),
    ({"prompt": "x", "number_of_images": "11"}, "number_of_images"),
    ({"prompt": "x", "number_of_images": "0"}, "number_of_images"),
    ({"prompt": "x", "base64": "maybe"}, "base64"),
    ({"prompt": ""}, "prompt"),
]


@pytest.mark.parametrize(("fields", "field"), BAD, ids=[f"{b[1]}-{i}" for i, b in enumerate(BAD)])
def test_invalid_parameters_are_400_naming_the_field(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    fields: dict[str, str],
    field: str,
) -> None:
    before = ledger.balance(api_only_server.runtime.db, tenant.account_id)
    resp = client.post(SEED_URL, headers={"x-api-key": tenant.key}, files=_form(**fields))
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["field"] == field and body["message"].startswith(field)
    assert resp.headers["x-remaining-credits"] == str(before)
    assert ledger.balance(api_only_server.runtime.db, tenant.account_id) == before


def test_status_codes_401_404_405_406_415(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    assert client.post(SEED_URL, files=_form(prompt="x")).status_code == 401
    bad_key = client.post(SEED_URL, headers={"x-api-key": "aura_0_nope"}, files=_form(prompt="x"))
    assert bad_key.status_code == 401 and "x-remaining-credits" not in bad_key.headers
    # Every key header works here too.
    for headers in (
        {"Ocp-Apim-Subscription-Key": tenant.key},
        {"Authorization": f"Bearer {tenant.key}"},
    ):
        assert (
            client.post(SEED_URL, headers=headers, json={"prompt": "x", "steps": 101}).status_code
            == 400
        )
    missing = client.post(
        "/v1/no-such-model", headers={"x-api-key": tenant.key}, files=_form(prompt="x")
    )
    # Every unknown path under /v1/ answers in OpenAI's shape (the SDKs' base URL).
    assert missing.status_code == 404
    assert missing.json()["error"]["message"] == "The requested URL does not exist"
    wrong = client.get(SEED_URL, headers={"x-api-key": tenant.key})
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert client.put("/v1/auraflow-v0-3-512", headers={"x-api-key": tenant.key}).status_code == 405
    poor = make_tenant(api_only_server.runtime, credits=3, name="poor")
    resp = client.post(SEED_URL, headers={"x-api-key": poor.key}, files=_form(prompt="x"))
    assert resp.status_code == 406, resp.text
    assert resp.headers["x-remaining-credits"] == "3"
    assert resp.json()["error"] == "Insufficient Balance"
    resp = client.post(
        SEED_URL,
        headers={"x-api-key": tenant.key, "content-type": "text/plain"},
        content=b"prompt=x",
    )
    assert resp.status_code == 415 and "x-remaining-credits" in resp.headers


class ExplodingEngine:
    """A model that fails on every batch, as a GPU out of memory would."""

    description = "exploding test engine"
    is_test_model = True

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> list[JobResult]:
        raise RuntimeError("CUDA error: out of memory (simulated)")


@pytest.fixture
def exploding_server(runtime: Any) -> Iterator[LiveServer]:
    runtime.engine = ExplodingEngine()
    runtime.start_worker()
    live = LiveServer(runtime).start()
    yield live
    live.stop()


def test_engine_failure_is_500_and_not_charged(
    exploding_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = exploding_server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    resp = client.post(
        SEED_URL,
        headers={"x-api-key": tenant.key},
        files=_form(prompt="boom", steps=2, width=512, height=512),
    )
    assert resp.status_code == 500, resp.text
    body = resp.json()
    assert "out of memory" in body["message"] and body["request_id"] == resp.headers["x-request-id"]
    assert resp.headers["x-remaining-credits"] == str(before)
    assert ledger.balance(db, tenant.account_id) == before


def _complete_by_hand(runtime: Any, job_id: str) -> float:
    """Act as a worker: claim the job, store an image, complete it. Returns when it committed."""
    claimed = jobs.claim(
        runtime.db, worker_id="hand", models=["auraflow-v0-3"], max_images=1, lease_seconds=30
    )
    assert [j.id for j in claimed] == [job_id]
    name = new_media_name("webp")
    runtime.media.put(
        name, encode_image(Image.new("RGB", (512, 512), "red"), "webp", 80, metadata={})
    )
    jobs.complete(
        runtime.db,
        worker_id="hand",
        job_id=job_id,
        engine_seconds=0.25,
        output={
            "media": [name],
            "media_type": "image/webp",
            "seeds": [5],
            "width": 512,
            "height": 512,
            "prompt_used": "p",
            "warnings": [],
        },
    )
    return time.monotonic()


def test_waiting_request_is_woken_by_the_store_bus(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sync request wakes when its job completes, not by re-reading the store: with the
    fallback re-check pushed to 30 s, only the bus can answer it within seconds."""
    from auraserve.api import results as shared

    monkeypatch.setattr(shared, "FALLBACK_RECHECK_SECONDS", 30.0)
    runtime = api_only_server.runtime
    result: dict[str, Any] = {}

    def call() -> None:
        resp = client.post(
            SEED_URL,
            headers={"x-api-key": tenant.key},
            files=_form(prompt="p", seed=5, width=512, height=512, steps=1),
        )
        result["resp"], result["at"] = resp, time.monotonic()

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 10
    while True:
        queued = jobs.count_active(runtime.db, tenant.account_id)
        if queued or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    time.sleep(0.3)  # let the request settle into its wait
    from sqlalchemy import select

    from auraserve.store.schema import jobs as jobs_table

    with runtime.db.read() as conn:
        job_id = conn.execute(select(jobs_table.c.id)).scalar_one()
    done_at = _complete_by_hand(runtime, job_id)
    thread.join(10)
    resp = result["resp"]
    assert resp.status_code == 200, resp.text
    assert resp.headers["x-generation-time"] == "0.250"
    assert Image.open(io.BytesIO(resp.content)).size == (512, 512)
    assert result["at"] - done_at < 5.0, "the sync wait was not woken by the bus"
