"""LoRA over HTTP: the registry in GET /v2/models, `loras` in the queue and sync dialects,
their 400s, the price, and a LoRA job run end to end by the worker."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from auraserve.config import Settings, load_settings
from auraserve.store import ledger
from tests.conftest import LiveServer, Tenant, free_port, wait_for_status

SEED_PATH = "/auraflow-v0-3-512/v1/auraflow-v0-3-request"
SYNC_PATH = "/v1/aura-flow"


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    """The shared settings plus a LoRA folder (placeholder files: the API never reads them)."""
    lora_dir = tmp_path / "loras"
    lora_dir.mkdir()
    (lora_dir / "ink.safetensors").write_bytes(b"placeholder")
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url or None,
        port=free_port(),
        model="tiny",
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        poll_interval_seconds=0.2,
        lora_dir=lora_dir,
        lora_hub_allowlist=["owner/hub-style"],
    )


def test_models_lists_the_registry_without_paths(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    body = client.get("/v2/models").json()
    assert body["loras"] == [
        {"name": "ink", "source": "file"},
        {"name": "owner/hub-style", "source": "hub"},
    ]
    small = body["models"][0]
    assert small["ranges"]["loras"]["maxItems"] == 4
    # A file the operator adds is listed at once, without a restart.
    lora_dir = api_only_server.runtime.settings.lora_dir
    (lora_dir / "late.safetensors").write_bytes(b"placeholder")
    names = [entry["name"] for entry in client.get("/v2/models").json()["loras"]]
    assert names == ["ink", "late", "owner/hub-style"]


def test_queue_submit_with_loras_is_priced_and_stored(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    db = api_only_server.runtime.db
    before = ledger.balance(db, tenant.account_id)
    plain = {"prompt": "a cat", "num_inference_steps": 25, "width": 1024, "height": 1024}
    resp = client.post(SEED_PATH, headers=tenant.headers, json=plain)
    assert resp.status_code == 202, resp.text
    plain_price = before - ledger.balance(db, tenant.account_id)
    loras = [{"name": "ink", "scale": 0.8}, {"name": "owner/hub-style"}]
    resp = client.post(SEED_PATH, headers=tenant.headers, json={**plain, "loras": loras})
    assert resp.status_code == 202, resp.text
    lora_price = before - ledger.balance(db, tenant.account_id) - plain_price
    assert lora_price == plain_price + 2 * -(-plain_price // 10)  # +10 % per adapter
    history = client.get("/v2/requests", headers=tenant.headers).json()["items"]
    assert history[0]["parameters"]["loras"] == [
        {"name": "ink", "scale": 0.8},
        {"name": "owner/hub-style", "scale": 1.0},
    ]


@pytest.mark.parametrize(
    ("path", "loras", "field", "says"),
    [
        (SEED_PATH, [{"name": "../ink"}], "loras[0].name", "unknown LoRA"),
        (SEED_PATH, [{"name": "/etc/passwd"}], "loras[0].name", "available: ink, owner/hub"),
        (SEED_PATH, [{"name": "https://evil.test/x.safetensors"}], "loras[0].name", "unknown"),
        (SEED_PATH, [{"name": "ink", "scale": 9}], "loras[0].scale", "scale from -2 to 2"),
        (SEED_PATH, [{"name": "ink"}] * 5, "loras", "at most 4"),
        (SYNC_PATH, [{"name": "other"}], "loras[0].name", "unknown LoRA"),
        (SYNC_PATH, [{"name": "ink", "scale": -3}], "loras[0].scale", "scale from -2 to 2"),
    ],
)
def test_bad_loras_are_400_naming_the_entry_in_each_dialect(
    api_only_server: LiveServer,
    client: httpx.Client,
    tenant: Tenant,
    path: str,
    loras: Any,
    field: str,
    says: str,
) -> None:
    before = ledger.balance(api_only_server.runtime.db, tenant.account_id)
    resp = client.post(path, headers=tenant.headers, json={"prompt": "a", "loras": loras})
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["field"] == field
    assert body["message"].startswith(field)
    assert says in body["message"]
    assert ledger.balance(api_only_server.runtime.db, tenant.account_id) == before


def test_openapi_documents_loras_where_the_dialect_takes_them(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    doc = client.get("/openapi.json").json()

    def fields(path: str) -> set[str]:
        content = doc["paths"][path]["post"]["requestBody"]["content"]
        return {name for body in content.values() for name in body["schema"]["properties"]}

    [queue_path] = [path for path in doc["paths"] if path.endswith("-request")]
    assert "loras" in fields(queue_path)
    assert "loras" in fields(SYNC_PATH)
    # OpenAI's API has no adapters: there `loras` is ignored like every unknown field.
    assert "loras" not in fields("/v1/images/generations")
    spec = doc["components"]["schemas"]["LoraSpec"]["properties"]
    assert (spec["scale"]["minimum"], spec["scale"]["maximum"]) == (-2, 2)


# --- end to end ----------------------------------------------------------------------------


@pytest.fixture
def lora_server(tmp_path: Path, runtime: Any) -> Iterator[LiveServer]:
    """API plus a worker whose engine loads adapters from the runtime's registry."""
    from auraserve.engine.lora import LoraOptions
    from auraserve.engine.pipeline import load_engine
    from tests.engine.test_lora import save_adapter

    settings: Settings = runtime.settings
    assert settings.lora_dir is not None
    save_adapter(settings.lora_dir / "style", rank=4, alpha=8, seed=1)
    runtime.engine = load_engine(
        "tiny",
        device="cpu",
        dtype="float32",
        lora=LoraOptions(registry=settings.loras, max_rank=8),
    )
    runtime.start_worker()
    live = LiveServer(runtime).start()
    yield live
    live.stop()


def _image(client: httpx.Client, tenant: Tenant, body: dict[str, Any]) -> np.ndarray:
    resp = client.post(SEED_PATH, headers=tenant.headers, json=body)
    assert resp.status_code == 202, resp.text
    final = wait_for_status(client, resp.json()["request_id"], tenant.headers)
    assert final["status"] == "COMPLETED", final
    media = httpx.get(final["output"]["media_url"][0])
    return np.asarray(Image.open(io.BytesIO(media.content))).astype(np.int16)


def test_a_lora_job_runs_end_to_end_and_plain_jobs_stay_plain(
    lora_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    body = {"prompt": "a cat", "num_inference_steps": 2, "seed": 3, "guidance_scale": 1.0}
    plain = _image(client, tenant, body)
    styled = _image(client, tenant, {**body, "loras": [{"name": "style", "scale": 1.5}]})
    assert np.abs(plain - styled).mean() > 1
    assert np.array_equal(_image(client, tenant, body), plain)
    # A name that is listed but whose file is not an adapter: the job FAILS, not charged.
    before = ledger.balance(lora_server.runtime.db, tenant.account_id)
    resp = client.post(SEED_PATH, headers=tenant.headers, json={**body, "loras": [{"name": "ink"}]})
    final = wait_for_status(client, resp.json()["request_id"], tenant.headers)
    assert final["status"] == "FAILED", final
    assert ledger.balance(lora_server.runtime.db, tenant.account_id) == before
