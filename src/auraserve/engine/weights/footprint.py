"""How many bytes AuraFlow's transformer keeps resident in each weights format, counted on
the meta device (no memory, no download): the figures behind the README's GPU table and
`bench/weights.py`.

Per format, what the loaders keep:

* bf16: every parameter in bf16;
* fp8 (float8 files): linear layers' weights and biases in fp8, upcast per layer as they run;
  the positional grid and register tokens (3-D parameters) in the compute dtype;
* GGUF Q8_0 / Q5_K / Q4_K / Q4_0: each 2-D weight whose rows are a multiple of the type's
  block (32 values, 256 for K-quants) stays quantized (diffusers dequantises it per layer);
  every other tensor is F16/BF16, as llama.cpp-style writers leave it.
"""

from __future__ import annotations

from typing import Any

import torch
from accelerate import init_empty_weights

from auraserve.engine.components import AuraFlowTransformer2DModel

# fal/AuraFlow-v0.3's transformer/config.json (Pony V7 shares the architecture).
V03_CONFIG: dict[str, Any] = {
    "attention_head_dim": 256,
    "caption_projection_dim": 3072,
    "in_channels": 4,
    "joint_attention_dim": 2048,
    "num_attention_heads": 12,
    "num_mmdit_layers": 4,
    "num_single_dit_layers": 32,
    "out_channels": 4,
    "patch_size": 2,
    "pos_embed_max_size": 9216,
    "sample_size": 64,
}
# GGUF types: (values per block, bytes per block).
GGUF_BLOCKS = {"Q8_0": (32, 34), "Q5_K": (256, 176), "Q4_K": (256, 144), "Q4_0": (32, 18)}
FORMATS = ("bf16", "fp8", "Q8_0", "Q5_K", "Q4_K")
# UMT5-XL encoder (1.22 B parameters) and the SDXL VAE (84 M) in bf16, for whole-model sums.
TEXT_ENCODER_BYTES = 2 * 1_223_000_000
VAE_BYTES = 2 * 83_650_000


def shapes(config: dict[str, Any] | None = None) -> dict[str, tuple[int, ...]]:
    """Parameter name → shape of the transformer with `config` (default v0.3), on meta."""
    with init_empty_weights():
        model = AuraFlowTransformer2DModel(**(config or V03_CONFIG))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def quantized(shape: tuple[int, ...], quant: str) -> bool:
    """Whether a GGUF writer quantizes a tensor of this shape to `quant`."""
    block, _ = GGUF_BLOCKS[quant]
    return len(shape) == 2 and shape[-1] % block == 0


def resident_bytes(tensors: dict[str, tuple[int, ...]], fmt: str) -> int:
    total = 0
    for shape in tensors.values():
        count = int(torch.Size(shape).numel())
        if fmt == "bf16":
            total += 2 * count
        elif fmt == "fp8":
            total += count if len(shape) <= 2 else 2 * count
        elif quantized(shape, fmt):
            block, size = GGUF_BLOCKS[fmt]
            total += count // block * size
        else:
            total += 2 * count
    return total


def table(config: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per format: transformer bytes, with text encoder and VAE, and bits per parameter."""
    tensors = shapes(config)
    params = sum(int(torch.Size(s).numel()) for s in tensors.values())
    rows = []
    for fmt in FORMATS:
        transformer = resident_bytes(tensors, fmt)
        rows.append(
            {
                "format": fmt,
                "parameters": params,
                "transformer_bytes": transformer,
                "bits_per_parameter": round(8 * transformer / params, 2),
                "with_text_encoder_and_vae_bytes": transformer + TEXT_ENCODER_BYTES + VAE_BYTES,
            }
        )
    return rows


__all__ = ["FORMATS", "GGUF_BLOCKS", "V03_CONFIG", "quantized", "resident_bytes", "shapes", "table"]
