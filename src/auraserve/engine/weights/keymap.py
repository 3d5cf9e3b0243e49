"""AuraFlow's original tensor names → diffusers' names, by diffusers' own converter.

`convert_auraflow_transformer_checkpoint_to_diffusers` works on a whole state dict of tensors.
Fed name markers instead of tensors it yields the mapping, so a file can be streamed tensor
by tensor (never held whole in memory) with diffusers' mapping and no copy of it. The one
tensor it transforms rather than renames, the final AdaLN (`modF.1.weight`), gets the same
`swap_scale_shift` here.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from diffusers.loaders.single_file_utils import (
    convert_auraflow_transformer_checkpoint_to_diffusers,
    swap_scale_shift,
)

# diffusers swaps the shift and scale halves of this one on conversion.
SWAPPED = "modF.1.weight"
# Keys the converter pops unconditionally (AuraFlow always has them).
_REQUIRED = ("positional_encoding", "init_x_linear.weight", "init_x_linear.bias")


def original_to_diffusers(keys: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """(original key → diffusers key, keys diffusers' converter does not know)."""
    keys = list(keys)
    markers: dict[str, str | None] = {k: k for k in keys if k != SWAPPED}
    for required in _REQUIRED:
        markers.setdefault(required, None)
    converted = convert_auraflow_transformer_checkpoint_to_diffusers(markers)
    mapping = {value: key for key, value in converted.items() if isinstance(value, str)}
    if SWAPPED in keys:
        mapping[SWAPPED] = "norm_out.linear.weight"
    unknown = [k for k, v in markers.items() if v is not None]  # left over: not converted
    return mapping, unknown


def diffusers_to_original(keys: Iterable[str]) -> dict[str, str]:
    """The inverse, for writers (tests, bench): diffusers key → original key."""
    keys = list(keys)
    # The converter needs original names to start from: ask it about every plausible one.
    originals = _original_candidates(keys)
    mapping, _ = original_to_diffusers(originals)
    inverse = {new: old for old, new in mapping.items()}
    return {k: inverse[k] for k in keys if k in inverse}


def _original_candidates(keys: list[str]) -> list[str]:
    double = {k.split(".")[1] for k in keys if k.startswith("joint_transformer_blocks.")}
    single = {k.split(".")[1] for k in keys if k.startswith("single_transformer_blocks.")}
    names = [
        "register_tokens",
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "cond_seq_linear.weight",
        "final_linear.weight",
        SWAPPED,
        *_REQUIRED,
    ]
    for i in sorted(double):
        for mlp in ("mlpX", "mlpC"):
            names += [f"double_layers.{i}.{mlp}.{k}.weight" for k in ("c_fc1", "c_fc2", "c_proj")]
        names += [f"double_layers.{i}.modX.1.weight", f"double_layers.{i}.modC.1.weight"]
        names += [
            f"double_layers.{i}.attn.{k}.weight"
            for k in ("w2q", "w2k", "w2v", "w2o", "w1q", "w1k", "w1v", "w1o")
        ]
    for i in sorted(single):
        names += [f"single_layers.{i}.mlp.{k}.weight" for k in ("c_fc1", "c_fc2", "c_proj")]
        names += [f"single_layers.{i}.modCX.1.weight"]
        names += [f"single_layers.{i}.attn.{k}.weight" for k in ("w1q", "w1k", "w1v", "w1o")]
    return names


def convert_tensor(original_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as diffusers holds it (the final AdaLN's halves swapped; others as they are)."""
    return swap_scale_shift(tensor, dim=None) if original_key == SWAPPED else tensor


__all__ = ["SWAPPED", "convert_tensor", "diffusers_to_original", "original_to_diffusers"]
