"""Write the tiny AuraFlow in every layout users hold, with the real writers (safetensors'
`save_file`, gguf's `GGUFWriter`): what the loader tests load back."""

from __future__ import annotations

import re
from pathlib import Path

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
