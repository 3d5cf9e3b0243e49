"""Write the tiny AuraFlow in every layout users hold, with the real writers (safetensors'
`save_file`, gguf's `GGUFWriter`): what the loader tests load back."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from diffusers import AuraFlowPipeline
from safetensors.torch import save_file

from auraserve.engine.weights.keymap import SWAPPED, convert_tensor, diffusers_to_original

COMFY = "model.diffusion_model."
COMFY_TEXT = "text_encoders.pile_t5xl.transformer."
COMFY_VAE = "first_stage_model."


def original_state(pipe: AuraFlowPipeline) -> dict[str, torch.Tensor]:
    """The transformer in AuraFlow's original names (the final AdaLN's halves swapped back)."""
    state = pipe.transformer.state_dict()
    names = diffusers_to_original(state)
    # swap_scale_shift swaps two halves: applying it again undoes it.
    return {
        names[k]: convert_tensor(SWAPPED, v) if names[k] == SWAPPED else v for k, v in state.items()
    }


def write_original(
    path: Path, pipe: AuraFlowPipeline, *, prefix: str = "", dtype: torch.dtype | None = None
) -> Path:
    state = {prefix + k: _cast(v, dtype) for k, v in original_state(pipe).items()}
    save_file(state, str(path))
    return path


def write_diffusers_file(path: Path, pipe: AuraFlowPipeline, *, prefix: str = "") -> Path:
    state = {prefix + k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}
    save_file(state, str(path))
    return path


def write_all_in_one(
    path: Path, pipe: AuraFlowPipeline, *, dtype: torch.dtype | None = None
) -> Path:
    """ComfyUI's checkpoint layout: transformer, text encoder and LDM-layout VAE in one file."""
    state = {COMFY + k: _cast(v, dtype) for k, v in original_state(pipe).items()}
    text = pipe.text_encoder.state_dict()
    text.pop("encoder.embed_tokens.weight")  # tied to shared.weight; stored once
    state.update({COMFY_TEXT + k: v.contiguous() for k, v in text.items()})
    blocks = len(pipe.vae.config.down_block_types)
    state.update(
        {
            COMFY_VAE + k: v.contiguous()
            for k, v in vae_to_ldm(pipe.vae.state_dict(), blocks).items()
        }
    )
    save_file(state, str(path))
    return path


def vae_to_ldm(state: dict[str, torch.Tensor], blocks: int) -> dict[str, torch.Tensor]:
    """diffusers' VAE names → the LDM names that SD-style checkpoints use (the inverse of
    diffusers' `convert_ldm_vae_checkpoint`; a test checks the round trip)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new = re.sub(
            r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2.", key
        )
        new = re.sub(
            r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.",
            lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.block.{m[2]}.",
            new,
        )
        new = re.sub(
            r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
            lambda m: f"decoder.up.{blocks - 1 - int(m[1])}.upsample.",
            new,
        )
        new = re.sub(
            r"\.mid_block\.resnets\.(\d+)\.", lambda m: f".mid.block_{int(m[1]) + 1}.", new
        )
        new = new.replace(".mid_block.attentions.0.", ".mid.attn_1.")
        new = new.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if ".mid.attn_1." in new:
            for old, ldm in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                new = new.replace(f".attn_1.{old}.", f".attn_1.{ldm}.")
            if value.dim() == 2:
                value = value[:, :, None, None]  # LDM's attention projections are 1x1 convs
        out[new] = value
    return out


def _cast(value: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (value if dtype is None else value.to(dtype)).contiguous()


_BYTES = {"BF16": 2, "F16": 2, "F32": 4, "F8_E4M3": 1, "F8_E5M2": 1}


def write_sparse_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], str]]) -> Path:
    """A valid .safetensors file of the given tensors whose data is a hole (all zeros, no
    disk used): full-size files for header-only tools, written in milliseconds."""
    import json
    import math

    header: dict[str, object] = {}
    offset = 0
    for name, (shape, dtype) in tensors.items():
        size = math.prod(shape) * _BYTES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as file:
        file.write(len(raw).to_bytes(8, "little") + raw)
        file.truncate(8 + len(raw) + offset)
    return path


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------


def _kquant(rows: np.ndarray, bits: int) -> np.ndarray:
    """Q4_K / Q5_K blocks of float32 rows (row length a multiple of 256), in ggml's byte
    layout: gguf-py dequantises K-quants but has no quantizer for them. Simple min/max scales
    per 32-value sub-block (llama.cpp searches better ones: our files are a little worse)."""
    import numpy as np

    levels = 2**bits - 1
    x = rows.reshape(-1, 8, 32).astype(np.float64)  # blocks × sub-blocks × values
    lo = np.minimum(x.min(axis=2), 0.0)
    hi = np.maximum(x.max(axis=2), lo + 1e-12)
    scale, mins = (hi - lo) / levels, -lo
    d = np.maximum(scale.max(axis=1, keepdims=True) / 63, 1e-30).astype(np.float16)
    dmin = np.maximum(mins.max(axis=1, keepdims=True) / 63, 1e-30).astype(np.float16)
    sc = np.clip(np.round(scale / d.astype(np.float64)), 1, 63).astype(np.uint8)
    m = np.clip(np.round(mins / dmin.astype(np.float64)), 0, 63).astype(np.uint8)
    step = (d.astype(np.float64) * sc)[:, :, None]
    offset = (dmin.astype(np.float64) * m)[:, :, None]
    q = np.clip(np.round((x + offset) / step), 0, levels).astype(np.uint8).reshape(-1, 256)
    scales = np.zeros((x.shape[0], 12), np.uint8)
    for j in range(4):
        scales[:, j] = (sc[:, j] & 63) | ((sc[:, j + 4] >> 4) << 6)
        scales[:, j + 4] = (m[:, j] & 63) | ((m[:, j + 4] >> 4) << 6)
        scales[:, j + 8] = (sc[:, j + 4] & 15) | ((m[:, j + 4] & 15) << 4)
    chunks = q.reshape(-1, 4, 2, 32)  # 4 chunks of 64 values: two sub-blocks each
    qs = ((chunks[:, :, 0] & 15) | ((chunks[:, :, 1] & 15) << 4)).reshape(-1, 128)
    parts = [d.view(np.uint8), dmin.view(np.uint8), scales]
    if bits == 5:
        high = (chunks >> 4) & 1  # blocks × chunk i × half h × l → bit 2i + h of qh[l]
        qh = np.zeros((x.shape[0], 32), np.uint8)
        for i in range(4):
            for h in range(2):
                qh |= (high[:, i, h] << (2 * i + h)).astype(np.uint8)
        parts.append(qh)
    parts.append(qs.astype(np.uint8))
    return np.concatenate(parts, axis=1).reshape(*rows.shape[:-1], -1)


def gguf_quantize(array: np.ndarray, quant: str) -> tuple[np.ndarray, object]:
    """(data, GGMLQuantizationType) of one tensor: quantized when its rows fit the type's
    blocks (as llama.cpp-style writers do), else F16."""
    import numpy as np
    from gguf import GGMLQuantizationType, quants

    from auraserve.engine.weights.footprint import quantized

    kind = GGMLQuantizationType[quant]
    if quant != "F16" and quantized(tuple(array.shape), quant):
        if quant in ("Q4_K", "Q5_K"):
            return _kquant(array.astype(np.float32), 4 if quant == "Q4_K" else 5), kind
        return quants.quantize(array.astype(np.float32), kind), kind
    return array.astype(np.float16), GGMLQuantizationType.F16


def write_gguf(path: Path, pipe: AuraFlowPipeline, quant: str, *, prefix: str = "") -> Path:
    """The transformer in AuraFlow's original names as city96's ComfyUI-GGUF converter writes
    it (architecture "aura")."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch="aura")
    for name, tensor in original_state(pipe).items():
        data, kind = gguf_quantize(tensor.float().numpy(), quant)
        writer.add_tensor(prefix + name, data, raw_dtype=kind)  # type: ignore[arg-type]
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
