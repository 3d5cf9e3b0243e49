"""CFG-parallel generation (`engine.parallel`): two real processes on gloo give one process's
images, for first-order, stochastic and second-order samplers, with and without LoRA, and for
batches whose uncond and cond halves differ in size."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.core.lora import LoraSpec, available_loras
from auraserve.core.request import GenerationRequest
from auraserve.engine.lora import LoraOptions
from auraserve.engine.parallel import RowSplit, install, parse_parallel, start_group
from auraserve.engine.pipeline import AuraFlowEngine
from auraserve.engine.tiny import build_tiny_pipeline
from auraserve.errors import ConfigError
from tests.engine.conftest import make_small_request
from tests.engine.test_lora import save_adapter


def _engine(lora_dir: Path) -> AuraFlowEngine:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    options = LoraOptions(registry=lambda: available_loras(lora_dir), max_rank=8)
    return AuraFlowEngine(pipe, description="tiny", is_test_model=True, lora=options)


def _request(sampler: str, *, lora: bool = False, **overrides: Any) -> GenerationRequest:
    fields: dict[str, Any] = {"size": 64, "steps": 2, "seed": 11, "sampler": sampler}
    fields.update(overrides)
    request = make_small_request(**fields)
    if lora:
        request = request.model_copy(update={"loras": (LoraSpec(name="style", scale=0.8),)})
    return request


def _batches() -> list[list[GenerationRequest]]:
    return [
        [_request("euler")],
        [_request("euler_ancestral")],
        [_request("dpmpp_sde", lora=True)],
        [_request("heun")],
        [_request("dpmpp_2m", lora=True)],
        [_request("euler", lora=True)],
        # Uneven halves: 1 uncond row + 3 cond rows, then a lone row without CFG.
        [_request("euler", num_images=2), _request("euler", guidance_scale=1.0, seed=3)],
        [_request("euler", guidance_scale=1.0)],
    ]


def _run_all(engine: AuraFlowEngine) -> list[list[Image.Image]]:
    return [
        [image for result in engine.generate(batch) for image in result.images]
        for batch in _batches()
    ]


def _follower(index: int, port: int, world: int, lora_dir: Path) -> None:
    from auraserve.engine.parallel import join_group, leave_group

    split = join_group(index + 1, world, port, "cpu")
    try:
        engine = _engine(lora_dir)
        install(engine, split)
        _run_all(engine)
    finally:
        leave_group()


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("loras")
    save_adapter(root / "style", rank=4, alpha=8, seed=1)
    return root


def test_two_ranks_draw_the_single_process_images(lora_dir: Path) -> None:
    single = _run_all(_engine(lora_dir))
    group = start_group(_follower, (2, lora_dir), 2, "cpu")
    try:
        engine = _engine(lora_dir)
        install(engine, group.split)
        split = _run_all(engine)
    except BaseException:
        group.abort()
        raise
    group.finish()
    for batch, (one, two) in enumerate(zip(single, split, strict=True)):
        assert len(one) == len(two) > 0
        for a, b in zip(one, two, strict=True):
            diff = np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max()
            assert diff <= 1, f"batch {batch}: {diff}/255"
    # The LoRA really changed the image (else the LoRA cases would prove nothing).
    assert not np.array_equal(np.asarray(single[0][0]), np.asarray(single[5][0]))


def test_a_follower_that_fails_stops_the_start(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="boom"):
        start_group(_failing_follower, (), 2, "cpu")


def _failing_follower(index: int, port: int) -> None:
    raise RuntimeError("boom: the model did not load")


def test_rows_split_into_equal_padded_slices() -> None:
    # 2 uncond + 2 cond rows: rank 0 the uncond half, rank 1 the cond half.
    assert RowSplit(0, 2).indices(4) == [0, 1]
    assert RowSplit(1, 2).indices(4) == [2, 3]
    # Uneven: 3 rows, the last slice repeats its last row; 1 row: both ranks compute it.
    assert RowSplit(1, 2).indices(3) == [2, 2]
    assert RowSplit(0, 2).indices(1) == [0] and RowSplit(1, 2).indices(1) == [0]


@pytest.mark.parametrize(
    ("text", "message"),
    [("cfg=3", "cfg must be 2"), ("ulysses=2", "not available"), ("tp=2", "expected cfg=2")],
)
def test_parallel_spec_refuses_what_is_not_built(text: str, message: str) -> None:
    assert parse_parallel("cfg=2").world_size == 2
    with pytest.raises(ConfigError, match=message):
        parse_parallel(text)


def test_a_step_cache_engine_is_refused() -> None:
    pipe = build_tiny_pipeline()
    engine = AuraFlowEngine(pipe, description="tiny", options=EngineOptions(step_cache="fbcache"))
    with pytest.raises(ConfigError, match="step_cache"):
        install(engine, RowSplit(0, 2))
    assert engine.row_split is None
