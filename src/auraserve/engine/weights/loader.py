"""One weights file → a whole AuraFlow pipeline: probe it, take what it lacks from the
components source, load each part with its layout's module."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from auraserve.engine.components import AuraFlowPipeline
from auraserve.engine.weights import bundled, components, single_file
from auraserve.engine.weights.probe import WeightsFile, probe
from auraserve.errors import BadWeights, ModelLoadError


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0][:300]


def _check_text_dim(
    info: WeightsFile, config: dict[str, Any], te: dict[str, Any], src: str
) -> None:
    text_dim = te.get("d_model")
    if text_dim is not None and int(text_dim) != int(config["joint_attention_dim"]):
        raise BadWeights(
            f"{info.path}: shape mismatch with --components {src}: the transformer takes "
            f"text features of {config['joint_attention_dim']} dims, the text encoder gives "
            f"{text_dim}"
        )


def load_file(
    path: Path, source: str, dtype: torch.dtype
) -> tuple[AuraFlowPipeline, str, list[dict[str, Any]]]:
    """The pipeline from one file plus the components source, a format label such as
    "safetensors, AuraFlow original, float8_e4m3fn storage; ", and the file's lossy storage
    for every image's fidelity label (`lossy_storage`)."""
    info = probe(path)
    inside = info.components_inside
    folder = components.resolve(source, [p for p in ("text_encoder", "vae") if p not in inside])
    config = single_file.derive_config(info, components.transformer_config(folder), source)
    text_config = components.part_config(folder, "text_encoder")
    _check_text_dim(info, config, text_config, source)
    try:
        parts: dict[str, Any] = {}
        if info.format == "gguf":
            from auraserve.engine.weights.gguf_file import load_transformer as load_gguf

            parts["transformer"] = load_gguf(info, config, dtype, folder)
        else:
            parts["transformer"] = single_file.load_transformer(info, config, dtype)
        if "text_encoder" in inside:
            parts["text_encoder"] = bundled.load_text_encoder(info, text_config, dtype)
        if "vae" in inside:
            parts["vae"] = bundled.load_vae(info, components.part_config(folder, "vae"), dtype)
        pipe = AuraFlowPipeline.from_pretrained(
            folder, local_files_only=True, **components.dtype_kwargs(dtype), **parts
        )
    except ModelLoadError:
        raise
    except Exception as exc:  # safetensors/diffusers errors on a damaged or odd file
        raise BadWeights(f"{path}: cannot load it: {_first_line(exc)}") from exc
    label = f"{info.format}, {info.layout_name}"
    if info.fp8_dtype is not None:
        label += f", {_FP8_NAMES[info.fp8_dtype]} storage"
    if info.format == "gguf":
        label += f", {info.transformer_dtypes.most_common(1)[0][0]}"
    if len(inside) > 1:
        label += ", all-in-one"
    return pipe, label + "; ", lossy_storage(info)


_FP8_NAMES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Storage that holds the weights as trained (or as a plain float cast of them).
_FLOAT_STORAGE = frozenset({"F32", "F16", "BF16"})


def lossy_storage(info: WeightsFile) -> list[dict[str, Any]]:
    """The file's transformer storage that is not the trained weights' own: fp8 and GGUF
    quant types, as fidelity-label items (an image drawn from them is never exact)."""
    if info.fp8_dtype is not None:
        return [{"option": "fp8_weights", "storage": _FP8_NAMES[info.fp8_dtype]}]
    if info.format == "gguf":
        quants = sorted(set(info.transformer_dtypes) - _FLOAT_STORAGE)
        if quants:
            return [{"option": "quantized_weights", "types": quants}]
    return []


__all__ = ["load_file"]
