"""Bring your weights from the command line: `models inspect`, `--components`,
bad weights as one line and exit 2, `worker --models`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from auraserve.engine.tiny import build_tiny_pipeline, save_tiny_model
from tests.cli.test_cli import run_cli
from tests.engine.weights.writers import COMFY, write_all_in_one, write_original

ENV = {"AURASERVE_DEVICE": "cpu", "AURASERVE_DTYPE": "float32", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cli-weights")
    pipe = build_tiny_pipeline()
    comfy = write_original(root / "comfy.safetensors", pipe, prefix=COMFY)
    cut = root / "cut.safetensors"
    data = comfy.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    return {
        "folder": save_tiny_model(root / "folder"),
        "comfy": comfy,
        "aio": write_all_in_one(root / "aio.safetensors", pipe),
        "cut": cut,
    }


def test_models_inspect(files: dict[str, Path]) -> None:
    text = run_cli("models", "inspect", str(files["aio"]))
    assert text.returncode == 0, text.stderr
    assert (
        "ComfyUI prefix" in text.stdout
        and "inside:        transformer, text_encoder, vae" in text.stdout
    )
    as_json = run_cli("models", "inspect", str(files["aio"]), "--json")
    assert json.loads(as_json.stdout)["inside"] == ["transformer", "text_encoder", "vae"]
    bad = run_cli("models", "inspect", str(files["cut"]))
    assert bad.returncode == 2 and bad.stdout == ""
    [line] = bad.stderr.strip().splitlines()
    assert "truncated" in line and "cannot be served" in line


def _generate(tmp_path: Path, name: str, *flags: str) -> tuple[int, str, Path]:
    out = tmp_path / f"{name}.png"
    result = run_cli(
        "generate",
        "a fox",
        "-o",
        str(out),
        "--steps",
        "2",
        "--seed",
        "4",
        "--width",
        "512",
        "--height",
        "512",
        *flags,
        env={**ENV, "AURASERVE_DATA_DIR": str(tmp_path / "d")},
    )
    return result.returncode, result.stderr, out


def test_generate_from_single_files_with_components(files: dict[str, Path], tmp_path: Path) -> None:
    code, err, folder = _generate(tmp_path, "folder", "--model", str(files["folder"]))
    assert code == 0, err
    code, err, comfy = _generate(
        tmp_path, "comfy", "--model", str(files["comfy"]), "--components", str(files["folder"])
    )
    assert code == 0, err
    reference = np.asarray(Image.open(folder))
    assert np.array_equal(np.asarray(Image.open(comfy)), reference)


def test_bad_weights_exit_2_in_one_line(files: dict[str, Path], tmp_path: Path) -> None:
    code, err, _ = _generate(
        tmp_path, "cut", "--model", str(files["cut"]), "--components", str(files["folder"])
    )
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.startswith("auraserve:")]
    assert len(lines) == 1 and "truncated" in lines[0] and "Traceback" not in err


def test_worker_models_must_be_presets(tmp_path: Path) -> None:
    result = run_cli(
        "worker",
        "--models",
        "auraflow-v0-3,nope",
        "--model",
        "tiny",
        env={**ENV, "AURASERVE_DATA_DIR": str(tmp_path / "d")},
    )
    assert result.returncode == 2
    assert "--models auraflow-v0-3,nope: unknown preset nope" in result.stderr


def test_an_adapter_that_does_not_fit_stops_the_start(
    files: dict[str, Path], tmp_path: Path
) -> None:
    import torch
    from safetensors.torch import save_file

    loras = tmp_path / "loras"
    loras.mkdir()
    module = "lora_unet_joint_transformer_blocks_0_attn_to_q"
    save_file(
        {
            f"{module}.lora_down.weight": torch.ones(8, 32),
            f"{module}.lora_up.weight": torch.ones(32, 8),
        },
        str(loras / "too-wide.safetensors"),
    )
    out = tmp_path / "o.png"
    result = run_cli(
        "generate",
        "x",
        "-o",
        str(out),
        "--model",
        str(files["folder"]),
        env={
            **ENV,
            "AURASERVE_DATA_DIR": str(tmp_path / "d"),
            "AURASERVE_LORA_DIR": str(loras),
            "AURASERVE_LORA_MAX_RANK": "4",
        },
    )
    assert result.returncode == 2
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("auraserve:")]
    assert "too-wide.safetensors" in line and "rank 8" in line
    assert not out.exists()
