"""Helpers for the speed-mode tests: a fresh tiny engine per test (modes change the pipeline
in place), the unoptimised image to compare against, and PSNR from bench/quality.py."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.core.request import GenerationRequest
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.tiny import build_tiny_pipeline
from tests.bench.loader import bench_module
from tests.engine.conftest import make_small_request

# The bars: against the unoptimised engine on the same seed, bf16-class modes and fp8.
BF16_BAR_DB = 35.0
FP8_BAR_DB = 25.0

psnr: Callable[[Any, Any], float] = bench_module("quality").psnr


def tiny_engine(options: EngineOptions | None = None) -> AuraFlowEngine:
    """A fresh tiny pipeline per engine: optimisations modify the pipeline in place."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return AuraFlowEngine(pipe, description="tiny", is_test_model=True, options=options)


def small_request(**overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {"size": 128, "steps": 3, "guidance_scale": 4.5, "seed": 77}
    fields.update(overrides)
    return make_small_request(**fields)


def first_image(engine: AuraFlowEngine, request: GenerationRequest | None = None) -> Image.Image:
    [result] = engine.generate([request or small_request()])
    return result.images[0]


@pytest.fixture(scope="module")
def baseline() -> Image.Image:
    """The unoptimised engine's image for `small_request()`."""
    image = first_image(tiny_engine())
    assert np.asarray(image).std() > 10  # a real image, where a broken mode would show
    return image


@pytest.fixture
def fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
