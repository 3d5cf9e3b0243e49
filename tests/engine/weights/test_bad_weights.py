"""Bad weights fail at load, in one line naming the file and the problem (point 7)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from auraserve.engine.pipeline import load_engine
from auraserve.errors import BadWeights
from tests.engine.weights.writers import COMFY, write_original


def _fails(path: Path, components: Path) -> str:
    with pytest.raises(BadWeights) as info:
        load_engine(str(path), components=str(components), device="cpu", dtype="float32")
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_file(tiny_built, tiny_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_original(tmp_path / "cut.safetensors", tiny_built, prefix=COMFY)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert "truncated" in _fails(path, tiny_folder)
    path.write_bytes(data[:5])
    assert "truncated" in _fails(path, tiny_folder)


@pytest.mark.parametrize(
    ("key", "looks"),
    [
        ("model.diffusion_model.input_blocks.0.0.weight", "Stable Diffusion 1.x/2.x"),
        ("conditioner.embedders.1.model.ln_final.weight", "Stable Diffusion XL"),
        (
            "model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight",
            "Stable Diffusion 3",
        ),
        ("double_blocks.0.img_attn.qkv.weight", "Flux"),
        ("lora_unet_double_layers_0_attn_w2q.lora_down.weight", "LoRA"),
        ("transformer.joint_transformer_blocks.0.attn.to_q.lora_A.weight", "LoRA"),
    ],
)
def test_other_architectures(key: str, looks: str, tiny_folder: Path, tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2, 2)}, str(path))
    message = _fails(path, tiny_folder)
    assert looks in message and "cannot be served" in message


def _components(tiny_folder: Path, tmp_path: Path, part: str, **changes: int) -> Path:
    folder = tmp_path / "components"
    shutil.copytree(tiny_folder, folder)
    config_path = folder / part / "config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))
    return folder


def test_shape_mismatch_with_the_components(tiny_built, tiny_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_original(tmp_path / "t.safetensors", tiny_built)
    heads = _components(tiny_folder, tmp_path / "a", "transformer", attention_head_dim=12)
    assert "shape mismatch" in _fails(path, heads)
    text = _components(tiny_folder, tmp_path / "b", "text_encoder", d_model=64)
    assert "text features of 32 dims" in _fails(path, text)


def test_tensor_of_the_wrong_shape(tiny_built, tiny_folder: Path, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = write_original(tmp_path / "t.safetensors", tiny_built)
    from safetensors.torch import load_file

    state = load_file(str(path))
    state["double_layers.0.mlpX.c_proj.weight"] = torch.zeros(32, 7)
    save_file(state, str(path))
    assert "shape mismatch for 'double_layers.0.mlpX.c_proj.weight'" in _fails(path, tiny_folder)


def test_components_that_cannot_be_had(
    tiny_built,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from auraserve.errors import ModelLoadError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_original(tmp_path / "t.safetensors", tiny_built)
    with pytest.raises(ModelLoadError) as info:
        load_engine(str(path), components="auraserve-tests/missing", device="cpu")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("cannot get components auraserve-tests/missing")
    assert "--components" in message
    with pytest.raises(ModelLoadError, match="not a diffusers folder"):
        load_engine(str(path), components=str(tmp_path), device="cpu")
