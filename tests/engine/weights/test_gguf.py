"""GGUF files of each type, written with gguf's writer, loaded through the public loader and
measured against the diffusers-folder image and against diffusers' own loading of the file.

The tiny model's widths (32) are below the K-quants' 256-value blocks, so these tests use a
wider tiny transformer (4 heads x 64 = 256, feed-forward 768): every large 2-D weight is
quantized; the patch projection (16 inputs per row) and the text projection's 32-wide rows
(for K-quants) stay F16, as llama.cpp-style writers leave them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AuraFlowPipeline

from auraserve.engine.components import AuraFlowTransformer2DModel
from auraserve.engine.pipeline import AuraFlowEngine, load_engine
from auraserve.engine.tiny import build_tiny_pipeline, wide_transformer
from auraserve.errors import BadWeights
from tests.engine.weights.conftest import draw, psnr
from tests.engine.weights.writers import COMFY, write_gguf

QUANTS = ("F16", "Q8_0", "Q5_K", "Q4_K", "Q4_0")
MEASURED: dict[str, tuple[float, float]] = {}


@pytest.fixture(scope="module")
def wide() -> AuraFlowPipeline:
    pipe = build_tiny_pipeline()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(19)
        pipe.transformer = wide_transformer(256)
    return pipe


@pytest.fixture(scope="module")
def wide_folder(wide: AuraFlowPipeline, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("wide")
    wide.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def wide_reference(wide_folder: Path) -> np.ndarray:
    return draw(load_engine(str(wide_folder), device="cpu", dtype="float32"))


def _diffusers_gguf(path: Path, folder: Path) -> AuraFlowEngine:
    from diffusers import GGUFQuantizationConfig

    transformer = AuraFlowTransformer2DModel.from_single_file(
        str(path),
        config=str(folder),
        subfolder="transformer",
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
        torch_dtype=torch.float32,
    )
    pipe = AuraFlowPipeline.from_pretrained(folder, transformer=transformer)
    return AuraFlowEngine(pipe, description="diffusers GGUF", is_test_model=True)


@pytest.mark.parametrize("quant", QUANTS)
def test_gguf_types(
    quant: str,
    wide: AuraFlowPipeline,
    wide_folder: Path,
    wide_reference: np.ndarray,
    tmp_path: Path,
) -> None:
    bare = write_gguf(tmp_path / "bare.gguf", wide, quant)
    comfy = write_gguf(tmp_path / "comfy.gguf", wide, quant, prefix=COMFY)
    engine = load_engine(str(comfy), components=str(wide_folder), device="cpu", dtype="float32")
    assert quant in engine.description
    # Every image says it was drawn from quantized weights (F16 is the weights as trained).
    expected_lossy = [] if quant == "F16" else [{"option": "quantized_weights", "types": [quant]}]
    assert engine.weights_lossy == expected_lossy
    # Quantized weights stay quantized in memory (F16 tensors are upcast to the compute dtype,
    # as diffusers does): far below the float32 model.
    fp32_bytes = 4 * sum(p.numel() for p in wide.transformer.parameters())
    transformer = engine.pipe.transformer
    resident = sum(p.numel() * p.element_size() for p in transformer.parameters())
    assert resident < (1.01 if quant == "F16" else 0.5) * fp32_bytes
    ours = draw(engine)
    theirs = draw(_diffusers_gguf(bare, wide_folder))  # diffusers cannot read the prefixed one
    ours_db, theirs_db = psnr(ours, wide_reference), psnr(theirs, wide_reference)
    MEASURED[quant] = (ours_db, theirs_db)
    print(f"{quant}: ours {ours_db:.2f} dB, diffusers {theirs_db:.2f} dB")
    assert abs(ours_db - theirs_db) <= 0.5 or ours_db == theirs_db
    if quant == "F16":
        assert ours_db > 40


def test_inspect_reads_gguf_metadata(wide: AuraFlowPipeline, tmp_path: Path) -> None:
    from auraserve.engine.weights.probe import probe

    info = probe(write_gguf(tmp_path / "q.gguf", wide, "Q4_K", prefix=COMFY)).describe()
    assert info["format"] == "gguf"
    assert info["layout"].startswith("AuraFlow original, ComfyUI prefix")
    assert info["dtypes"]["transformer.single_blocks"] == {"Q4_K": 8}
    assert info["architecture"]["width"] == 256


def test_quality_order() -> None:
    if set(MEASURED) != set(QUANTS):
        pytest.skip("needs every type measured in this session")
    assert MEASURED["Q8_0"][0] >= MEASURED["Q5_K"][0] >= MEASURED["Q4_K"][0]


def test_unknown_quant_type(wide: AuraFlowPipeline, wide_folder: Path, tmp_path: Path) -> None:
    from gguf import GGMLQuantizationType, GGUFWriter

    path = tmp_path / "odd.gguf"
    writer = GGUFWriter(str(path), arch="aura")
    writer.add_tensor(
        "double_layers.0.attn.w2q.weight",
        np.zeros((256, 54), np.uint8),  # one TQ1_0 block per row: a type not served here
        raw_dtype=GGMLQuantizationType.TQ1_0,
    )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(BadWeights, match=r"odd.gguf: GGUF quant type TQ1_0 is not supported"):
        load_engine(str(path), components=str(wide_folder), device="cpu", dtype="float32")
