"""Several models in one fleet: two tiny models of different weights served side by side by
one worker over a real store, each request drawn by its own model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from auraserve.config import Settings, load_settings
from auraserve.core.jobs import JobStatus
from auraserve.core.request import build_request
from auraserve.engine.fleet import FleetEngine, load_fleet
from auraserve.engine.pipeline import load_engine
from auraserve.engine.tiny import build_tiny_pipeline, save_tiny_model
from auraserve.errors import UnsupportedRequest
from auraserve.runtime import Runtime
from auraserve.store import jobs, keys
from tests.engine.weights.writers import COMFY, write_original
from tests.store_jobs import submit_one


@pytest.fixture(scope="module")
def models_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet")
    folder = save_tiny_model(root / "tiny-a")
    other = build_tiny_pipeline()
    with torch.no_grad():  # other weights: a fine-tune, as a ComfyUI single file
        for param in other.transformer.parameters():
            param.mul_(1.5)
    weights = write_original(root / "tiny-b.safetensors", other, prefix=COMFY)
    path = root / "models.toml"
    path.write_text(
        f'[models.tiny-a]\nweights = "{folder}"\nwidth = 512\nheight = 512\n\n'
        f'[models.tiny-b]\nweights = "{weights}"\ncomponents = "{folder}"\n'
        "width = 512\nheight = 512\nprice_per_image = 7\n"
    )
    return path


def _settings(tmp_path: Path, database_url: str, models_file: Path) -> Settings:
    from tests.conftest import free_port

    return load_settings(
        data_dir=tmp_path / "data",
        database_url=database_url or None,
        port=free_port(),
        models_file=models_file,
        lease_seconds=5.0,
        heartbeat_seconds=1.0,
        poll_interval_seconds=0.2,
    )


def _fleet(settings: Settings) -> FleetEngine:
    return load_fleet(
        {m: (settings.weights_for(m), settings.components_for(m)) for m in settings.presets},
        lambda weights, components: load_engine(
            weights, components=components, device="cpu", dtype="float32"
        ),
    )


def test_two_models_side_by_side(tmp_path: Path, database_url: str, models_file: Path) -> None:
    settings = _settings(tmp_path, database_url, models_file)
    assert list(settings.presets) == ["tiny-a", "tiny-b"]
    assert settings.presets["tiny-b"].price_per_image == 7
    fleet = _fleet(settings)
    assert fleet.engines["tiny-a"] is not fleet.engines["tiny-b"]
    rt = Runtime.open(settings, engine=fleet)
    try:
        account = keys.create_account(rt.db, "fleet", credits=10_000)
        rt.start_worker(models=fleet.models)
        submitted: dict[str, tuple[str, Any]] = {}
        for model in ("tiny-a", "tiny-b"):
            preset = settings.presets[model]
            request = build_request(
                {"prompt": "a fox", "steps": 2, "seed": 3}, model=model, preset=preset
            )
            job = submit_one(
                rt.db,
                account_id=account.account_id,
                request=request,
                price=request.price(preset),
                max_queued=100,
                max_attempts=3,
            ).job
            submitted[model] = (job.id, request)
        images: dict[str, np.ndarray] = {}
        for model, (job_id, request) in submitted.items():
            deadline = time.monotonic() + 120
            while (job := jobs.get(rt.db, job_id)) is None or not job.is_terminal:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert job.status == JobStatus.COMPLETED, job.error
            path = rt.media.path(job.output["media"][0])
            assert path is not None
            images[model] = np.asarray(Image.open(path).convert("RGB"))
            # Drawn by its own model: the image its engine draws alone.
            [alone] = fleet.engines[model].generate([request])
            assert np.array_equal(images[model], np.asarray(alone.images[0].convert("RGB")))
        assert not np.array_equal(images["tiny-a"], images["tiny-b"])
    finally:
        rt.close()


def test_a_model_the_worker_did_not_load(
    tmp_path: Path, database_url: str, models_file: Path
) -> None:
    settings = _settings(tmp_path, database_url, models_file)
    engine = load_engine(str(settings.weights_for("tiny-a")), device="cpu", dtype="float32")
    fleet = FleetEngine({"tiny-a": engine})
    preset = settings.presets["tiny-b"]
    request = build_request({"prompt": "x", "steps": 1}, model="tiny-b", preset=preset)
    with pytest.raises(UnsupportedRequest, match="not loaded by this worker"):
        fleet.generate([request])


def test_a_worker_takes_the_models_it_can_hold(models_file: Path, tmp_path: Path) -> None:
    from auraserve.engine.fleet import estimate_bytes, models_that_fit

    sizes = {"a": 10, "b": 6, "c": 5}
    models = {"x": "a", "x-512": "a", "y": "b", "z": "c"}
    assert models_that_fit(models, None) == ["x", "x-512", "y", "z"]
    # Presets sharing weights cost once; a model that does not fit is skipped, not the rest.
    assert models_that_fit(models, 15, sizes.__getitem__) == ["x", "x-512", "z"]
    weights = models_file.parent / "tiny-b.safetensors"
    assert estimate_bytes(str(weights)) > weights.stat().st_size  # + text encoder and VAE
