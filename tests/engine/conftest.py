"""Fixtures for the engine tests: the tiny random-weight AuraFlow, built once per session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from diffusers import AuraFlowPipeline

from auraserve.core.request import GenerationRequest
from auraserve.engine.pipeline import AuraFlowEngine, load_engine
from auraserve.engine.tiny import build_tiny_pipeline, save_tiny_model


@pytest.fixture(scope="session")
def tiny_pipe() -> AuraFlowPipeline:
    """The pipeline as built in code (fp32, CPU). Tests must not modify it."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model saved in diffusers format."""
    return save_tiny_model(tmp_path_factory.mktemp("tiny-auraflow"))


@pytest.fixture(scope="session")
def engine(tiny_dir: Path) -> AuraFlowEngine:
    """The engine on the saved tiny model, loaded the way the server loads weights."""
    return load_engine(str(tiny_dir), device="cpu", dtype="float32")


def make_request(**overrides: Any) -> GenerationRequest:
    """A valid request with small defaults; overrides win."""
    fields: dict[str, Any] = {
        "model": "auraflow-v0-3",
        "prompt": "a cat holding a sign that says hello world",
        "negative_prompt": "blurry, low quality",
        "guidance_scale": 4.5,
        "steps": 3,
        "width": 512,
        "height": 512,
        "seed": 1234,
        "shift": 1.73,
        "sampler": "euler",
        "scheduler": "normal",
        "output_format": "png",
        "output_quality": 80,
    }
    fields.update(overrides)
    return GenerationRequest(**fields)


def make_small_request(size: int = 128, **overrides: Any) -> GenerationRequest:
    """A request below the API's 512 px minimum (validation skipped): sampler sweeps only."""
    valid = make_request(**overrides)
    fields = {**valid.model_dump(), "width": size, "height": size}
    return GenerationRequest.model_construct(**fields)
