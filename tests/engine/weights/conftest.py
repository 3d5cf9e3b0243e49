"""Fixtures: the tiny model's diffusers folder (the components source) and its reference image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from auraserve.engine.pipeline import AuraFlowEngine, load_engine
from auraserve.engine.tiny import build_tiny_pipeline, save_tiny_model
from tests.bench.loader import bench_module
from tests.engine.conftest import make_small_request


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("tiny-folder"))


@pytest.fixture(scope="session")
def tiny_built():  # type: ignore[no-untyped-def]
    return build_tiny_pipeline()


def draw(engine: AuraFlowEngine) -> np.ndarray:
    """The reference request (CFG, 3 steps, 64 px) on a fixed seed, as uint8 pixels."""
    [result] = engine.generate([make_small_request(size=64, steps=3)])
    return np.asarray(result.images[0])


@pytest.fixture(scope="session")
def reference(tiny_folder: Path) -> np.ndarray:
    return draw(load_engine(str(tiny_folder), device="cpu", dtype="float32"))


# The measure the speed modes are held to, and the formats too.
psnr = bench_module("quality").psnr
