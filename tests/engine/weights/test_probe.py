"""`models inspect`'s reading of a file: header only, under 2 s for a full-size file, torch-free."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from auraserve.engine.weights.footprint import shapes
from auraserve.engine.weights.keymap import diffusers_to_original
from auraserve.engine.weights.probe import probe, render
from auraserve.errors import BadWeights
from tests.engine.weights.writers import COMFY, write_all_in_one, write_sparse_safetensors


def test_a_full_size_file_is_read_from_its_header(tmp_path: Path) -> None:
    v03 = shapes()
    names = diffusers_to_original(v03)
    path = write_sparse_safetensors(
        tmp_path / "auraflow-v0.3-bf16.bin",
        {COMFY + names[k]: (shape, "BF16") for k, shape in v03.items()},
    )
    assert path.stat().st_size > 13.7e9  # Pony V7 / AuraFlow v0.3 in bf16, as a hole
    started = time.perf_counter()
    info = probe(path).describe()
    assert time.perf_counter() - started < 2
    assert info["format"] == "safetensors"
    assert info["layout"] == "AuraFlow original, ComfyUI prefix 'model.diffusion_model.'"
    arch = info["architecture"]
    assert (arch["double_layers"], arch["single_layers"], arch["width"], arch["text_dim"]) == (
        4,
        32,
        3072,
        2048,
    )
    assert round(arch["parameters"] / 1e9, 2) == 6.86
    assert info["dtypes"]["transformer.single_blocks"] == {"BF16": 32 * 8}
    assert info["inside"] == ["transformer"]
    assert "text_encoder" in info["from_components"] and "vae" in info["from_components"]
    assert "6.86 B parameters" in render(info)


def test_all_in_one_components_are_listed(tiny_built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    info = probe(write_all_in_one(tmp_path / "aio.safetensors", tiny_built)).describe()
    assert info["inside"] == ["transformer", "text_encoder", "vae"]
    assert info["from_components"] == [
        "tokenizer",
        "scheduler",
        "transformer config (attention heads)",
    ]
    assert set(info["dtypes"]) >= {"text_encoder", "vae", "transformer.double_blocks"}


def test_probe_never_imports_torch(tiny_built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_all_in_one(tmp_path / "aio.safetensors", tiny_built)
    code = (
        "import sys\nfrom auraserve.engine.weights.probe import probe, render\n"
        f"render(probe({str(path)!r}).describe())\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_not_a_weights_file(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(BadWeights, match="cannot be served"):
        probe(path)


def test_inspect_report_and_exit_status(tiny_built, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    import json

    from auraserve.engine.weights.probe import inspect

    path = write_all_in_one(tmp_path / "aio.safetensors", tiny_built)
    text, code = inspect(path)
    assert code == 0 and "inside:        transformer, text_encoder, vae" in text
    data, code = inspect(path, as_json=True)
    assert code == 0 and json.loads(data)["inside"] == ["transformer", "text_encoder", "vae"]
    lora = tmp_path / "lora.safetensors"
    write_sparse_safetensors(lora, {"lora_unet_x.lora_down.weight": ((4, 8), "F16")})
    text, code = inspect(lora)
    assert code == 2 and "\n" not in text and "a LoRA adapter" in text
    data, code = inspect(lora, as_json=True)
    assert code == 2 and json.loads(data)["servable"] is False
