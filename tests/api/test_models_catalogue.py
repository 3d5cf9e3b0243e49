"""GET /v2/models for a fleet: each model with its own live workers and its own LoRAs, and a
LoRA of one model refused on another (a models file with two presets, one with its own
LoRA folder)."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from auraserve.config import Settings, load_settings
from auraserve.store import workers
from tests.conftest import LiveServer, Tenant, free_port


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    shared, pony = tmp_path / "loras", tmp_path / "pony-loras"
    for folder, name in ((shared, "ink"), (pony, "pony-style")):
        folder.mkdir()
        (folder / f"{name}.safetensors").write_bytes(b"placeholder")  # the API never reads them
    models_file = tmp_path / "models.toml"
    models_file.write_text(
        '[models.base]\nweights = "tiny"\nwidth = 512\nheight = 512\n\n'
        f'[models.pony]\nweights = "tiny"\nwidth = 512\nheight = 512\nlora_dir = "{pony}"\n'
    )
    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url or None,
        port=free_port(),
        models_file=models_file,
        lora_dir=shared,
    )


def _models(client: httpx.Client) -> dict[str, dict[str, object]]:
    resp = client.get("/v2/models")
    assert resp.status_code == 200, resp.text
    return {entry["model_id"]: entry for entry in resp.json()["models"]}


def test_each_model_lists_its_own_loras_and_live_workers(
    api_only_server: LiveServer, client: httpx.Client
) -> None:
    models = _models(client)
    assert models["base"]["loras"] == [{"name": "ink", "source": "file"}]
    assert models["pony"]["loras"] == [{"name": "pony-style", "source": "file"}]
    assert models["base"]["live_workers"] == 0 and models["pony"]["live_workers"] == 0

    db = api_only_server.runtime.db
    workers.register(db, worker_id="w1", host="h", pid=1, models=["base", "pony"], device="cpu")
    workers.register(db, worker_id="w2", host="h", pid=2, models=["pony"], device="cpu")
    workers.register(db, worker_id="w3", host="h", pid=3, models=["base"], device="cpu")
    workers.mark_stopped(db, "w3", jobs_done=0)  # said goodbye: not live
    models = _models(client)
    assert models["base"]["live_workers"] == 1
    assert models["pony"]["live_workers"] == 2


def test_a_lora_of_another_model_is_refused(
    api_only_server: LiveServer, client: httpx.Client, tenant: Tenant
) -> None:
    def submit(model: str, lora: str) -> httpx.Response:
        return client.post(
            f"/{model}/v1/{model}-request",
            headers=tenant.headers,
            json={"prompt": "a fox", "loras": [{"name": lora}]},
        )

    assert submit("pony", "pony-style").status_code == 202
    assert submit("base", "ink").status_code == 202
    refused = submit("base", "pony-style")
    assert refused.status_code == 400, refused.text
    assert refused.json()["field"] == "loras[0].name"
    assert submit("pony", "ink").status_code == 400
