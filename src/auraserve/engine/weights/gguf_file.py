"""The transformer from a GGUF file (F16, Q8_0, Q5_K, Q4_K, Q4_0 … as city96's ComfyUI-GGUF
converter and Pony V7's quants write them) through diffusers' GGUF support.

diffusers reads the tensors as `GGUFParameter`s (the quantized bytes, never expanded), maps
AuraFlow's original names with its own converter and swaps each `nn.Linear` for a layer that
dequantises its weight to the compute dtype as it runs: resident memory is the file's size.
What this module adds: the `model.diffusion_model.` prefix stripped (diffusers' detection
matches only bare keys), the config from the file's shapes and the components
(`single_file.derive_config`), and one-line errors.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers.quantizers.quantization_config import GGUFQuantizationConfig

from auraserve.engine.components import AuraFlowTransformer2DModel
from auraserve.engine.weights.probe import WeightsFile
from auraserve.errors import BadWeights

# Config values the file's shapes decide; they override the components' config.
_FROM_SHAPES = (
    "num_mmdit_layers",
    "num_single_dit_layers",
    "num_attention_heads",
    "attention_head_dim",
    "joint_attention_dim",
    "caption_projection_dim",
    "in_channels",
    "out_channels",
    "patch_size",
    "pos_embed_max_size",
)


def load_transformer(
    info: WeightsFile, config: dict[str, Any], dtype: torch.dtype, folder: Path
) -> AuraFlowTransformer2DModel:
    state = _read(info)
    model: AuraFlowTransformer2DModel = AuraFlowTransformer2DModel.from_single_file(
        state,
        config=str(folder),
        subfolder="transformer",
        local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=dtype),
        torch_dtype=dtype,
        **{key: config[key] for key in _FROM_SHAPES},
    )
    return model.eval()


def _read(info: WeightsFile) -> dict[str, torch.Tensor]:
    """The transformer's tensors as diffusers' `load_gguf_checkpoint` makes them, but as
    views of the memory-mapped file instead of copies: the quantized bytes are read once, by
    the model's load, so the peak stays near the file's size, not twice it."""
    import gguf
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES, GGUFParameter

    plain = (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
    keys = set(info.transformer_keys)
    state: dict[str, torch.Tensor] = {}
    with warnings.catch_warnings():
        # The map is read-only; nothing writes to these tensors (the load copies them).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for tensor in gguf.GGUFReader(info.path).tensors:
            if tensor.name not in keys:
                continue
            kind = tensor.tensor_type
            if kind not in plain and kind not in SUPPORTED_GGUF_QUANT_TYPES:
                raise BadWeights(f"{info.path}: GGUF quant type {kind.name} is not supported")
            data = torch.from_numpy(tensor.data)
            name = tensor.name[len(info.prefix) :]
            state[name] = data if kind in plain else GGUFParameter(data, quant_type=kind)
    return state


def quant_types(info: WeightsFile) -> str:
    """e.g. "Q4_K (288 tensors), F16 (12)": the transformer's types, most used first."""
    counts = info.transformer_dtypes.most_common()
    return ", ".join(f"{name} ({n})" for name, n in counts)


__all__ = ["load_transformer", "quant_types"]
