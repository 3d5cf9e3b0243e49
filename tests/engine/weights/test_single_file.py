"""Single .safetensors files in every layout, loaded through the public loader and compared
with the diffusers-folder image on the same seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from auraserve.engine.pipeline import load_engine
from tests.engine.weights.conftest import draw
from tests.engine.weights.writers import (
    COMFY,
    write_all_in_one,
    write_diffusers_file,
    write_original,
)


@pytest.mark.parametrize(
    ("layout", "write"),
    [
        ("original", lambda p, pipe: write_original(p, pipe)),
        ("comfyui", lambda p, pipe: write_original(p, pipe, prefix=COMFY)),
        ("diffusers", lambda p, pipe: write_diffusers_file(p, pipe)),
        (
            "diffusers-prefixed",
            lambda p, pipe: write_diffusers_file(p, pipe, prefix="transformer."),
        ),
        ("all-in-one", lambda p, pipe: write_all_in_one(p, pipe)),
    ],
)
def test_lossless_layouts_draw_the_folder_image(
    layout: str,
    write,
    tiny_built,
    tiny_folder: Path,
    reference: np.ndarray,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    path = write(tmp_path / "weights.bin", tiny_built)  # content decides, not the name
    engine = load_engine(str(path), components=str(tiny_folder), device="cpu", dtype="float32")
    assert engine.is_test_model
    assert engine.weights_lossy == []  # the weights as trained: images stay exact
    assert np.array_equal(draw(engine), reference), layout


@pytest.fixture(scope="session")
def bare_components(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny folder without any weights: configs, tokenizer and scheduler only. Loading
    from it proves that a file's transformer, text encoder and VAE are the ones used."""
    import shutil

    bare = tmp_path_factory.mktemp("bare") / "components"
    shutil.copytree(tiny_folder, bare)
    for weights in bare.glob("*/*.safetensors"):
        weights.unlink()
    return bare


def test_all_in_one_is_used_whole(
    tiny_built,
    bare_components: Path,
    reference: np.ndarray,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    path = write_all_in_one(tmp_path / "aio.safetensors", tiny_built)
    engine = load_engine(str(path), components=str(bare_components), device="cpu", dtype="float32")
    assert "all-in-one" in engine.description
    assert np.array_equal(draw(engine), reference)


def _diffusers_single_file(path: Path, folder: Path):  # type: ignore[no-untyped-def]
    """diffusers' own loading of the same file (from_single_file upcasts it whole)."""
    from diffusers import AuraFlowPipeline, AuraFlowTransformer2DModel

    from auraserve.engine.pipeline import AuraFlowEngine

    transformer = AuraFlowTransformer2DModel.from_single_file(
        str(path), config=str(folder), subfolder="transformer", torch_dtype=torch.float32
    )
    pipe = AuraFlowPipeline.from_pretrained(folder, transformer=transformer)
    return AuraFlowEngine(pipe, description="diffusers from_single_file", is_test_model=True)


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_files_stay_fp8_and_match_diffusers(
    fp8: torch.dtype,
    tiny_built,
    tiny_folder: Path,
    reference: np.ndarray,
    tmp_path: Path,  # type: ignore[no-untyped-def]
) -> None:
    from tests.engine.weights.conftest import psnr

    path = write_original(tmp_path / "fp8.safetensors", tiny_built, dtype=fp8)
    engine = load_engine(str(path), components=str(tiny_folder), device="cpu", dtype="float32")
    storage = "float8_e4m3fn" if fp8 == torch.float8_e4m3fn else "float8_e5m2"
    assert engine.weights_lossy == [{"option": "fp8_weights", "storage": storage}]
    dtypes = [p.dtype for p in engine.pipe.transformer.parameters()]
    # Every linear layer keeps fp8 storage; the positional grid and register tokens are upcast.
    assert dtypes.count(fp8) >= len(dtypes) - 3, dtypes
    ours = draw(engine)
    theirs = draw(_diffusers_single_file(path, tiny_folder))
    # fp8 → fp32 is exact, so upcasting per layer draws what upcasting all at once draws.
    assert np.array_equal(ours, theirs)
    print(f"{fp8}: {psnr(ours, reference):.2f} dB (diffusers: {psnr(theirs, reference):.2f} dB)")
    assert psnr(ours, reference) > 15
