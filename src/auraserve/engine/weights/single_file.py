"""The transformer from one .safetensors file, streamed tensor by tensor.

The model is built on the meta device (no memory), then each tensor is read from the
memory-mapped file, renamed (`keymap`), checked against the parameter's shape and stored in
the compute dtype, so the host never holds the file and the model at once.

float8 files (float8_e4m3fn, float8_e5m2, as ComfyUI's fp8 checkpoints) stay in fp8 storage:
the linear and convolution layers keep their fp8 weights and diffusers' layerwise casting
(`enable_layerwise_casting`) upcasts one layer's weights at a time, as it runs, to the compute
dtype. The rest (positional grid, register tokens, norms) is small and is upcast at load.
Nothing is ever upcast whole: resident weights are ~1 byte per parameter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers.hooks.layerwise_casting import apply_layerwise_casting
from safetensors import safe_open
from torch import nn

from auraserve.engine.components import AuraFlowTransformer2DModel
from auraserve.engine.weights.keymap import convert_tensor, original_to_diffusers
from auraserve.engine.weights.probe import WeightsFile
from auraserve.errors import BadWeights

FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def derive_config(info: WeightsFile, base: dict[str, Any], source: str) -> dict[str, Any]:
    """The transformer's config: every value the file's shapes decide comes from the file;
    the head split (and sample size) from the components' config, checked against the file."""
    arch = info.architecture()
    where = f"{info.path}"
    q_key = (
        "double_layers.0.attn.w2q.weight"
        if info.layout == "original"
        else ("joint_transformer_blocks.0.attn.to_q.weight")
    )
    q = info.transformer_tensor(q_key)
    if q is None or "width" not in arch or "patch_inputs" not in arch:
        raise BadWeights(f"{where}: the AuraFlow transformer in it is incomplete")
    inner = q.shape[0]
    head_dim = int(base.get("attention_head_dim", 256))
    patch = int(base.get("patch_size", 2))
    if inner % head_dim:
        raise BadWeights(
            f"{where}: shape mismatch with --components {source}: attention width {inner} is "
            f"not a multiple of its attention_head_dim {head_dim}"
        )
    if arch["patch_inputs"] % (patch * patch) or arch.get("patch_outputs", 0) % (patch * patch):
        raise BadWeights(
            f"{where}: shape mismatch with --components {source}: patch projection of "
            f"{arch['patch_inputs']} inputs does not fit patch_size {patch}"
        )
    config = {k: v for k, v in base.items() if not k.startswith("_")}
    config.update(
        num_mmdit_layers=arch["double_layers"],
        num_single_dit_layers=arch["single_layers"],
        num_attention_heads=inner // head_dim,
        attention_head_dim=head_dim,
        joint_attention_dim=arch["text_dim"],
        caption_projection_dim=arch["width"],
        in_channels=arch["patch_inputs"] // (patch * patch),
        out_channels=arch["patch_outputs"] // (patch * patch),
        patch_size=patch,
        pos_embed_max_size=arch["pos_embed_max_size"],
    )
    return config


def renamed_keys(info: WeightsFile) -> dict[str, str]:
    """File key → diffusers parameter name, for every transformer tensor of the file."""
    own = {key: key[len(info.prefix) :] for key in info.transformer_keys}
    if info.layout == "diffusers":
        return own
    mapping, unknown = original_to_diffusers(own.values())
    if unknown:
        raise BadWeights(
            f"{info.path}: {len(unknown)} tensors that AuraFlow does not have, e.g. "
            f"{unknown[0]!r}; is it a fine-tune of another architecture?"
        )
    return {key: mapping[name] for key, name in own.items()}


def stream_into(
    model: nn.Module,
    names: dict[str, str],
    tensors: Iterator[tuple[str, torch.Tensor]],
    dtype_for: Callable[[torch.Tensor], torch.dtype],
    where: str,
    convert: Callable[[str, torch.Tensor], torch.Tensor] = lambda _key, tensor: tensor,
    finish: Callable[[], None] = lambda: None,
) -> None:
    """Replace the meta model's parameters one file tensor at a time; `finish` runs before
    the check that none is left on the meta device (tied weights)."""
    params = dict(model.named_parameters())
    for key, tensor in tensors:
        name = names[key]
        param = params.get(name)
        if param is None:
            raise BadWeights(f"{where}: tensor {key!r} has no place in the model")
        value = convert(key, tensor)
        if tuple(value.shape) != tuple(param.shape):
            raise BadWeights(
                f"{where}: shape mismatch for {key!r}: the file has {tuple(value.shape)}, the "
                f"model (file shapes + --components config) expects {tuple(param.shape)}"
            )
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        module._parameters[attr] = nn.Parameter(value.to(dtype_for(value)), requires_grad=False)
    finish()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise BadWeights(
            f"{where}: {len(missing)} tensors missing (e.g. {missing[0]!r}); truncated export?"
        )


def load_transformer(
    info: WeightsFile, config: dict[str, Any], dtype: torch.dtype
) -> AuraFlowTransformer2DModel:
    """The transformer of a safetensors file, in `dtype` (fp8 files: fp8 storage)."""
    names = renamed_keys(info)
    with init_empty_weights():
        model = AuraFlowTransformer2DModel.from_config(config)
    fp8 = info.fp8_dtype is not None

    def dtype_for(tensor: torch.Tensor) -> torch.dtype:
        return tensor.dtype if fp8 and tensor.dtype in FP8 else dtype

    def read() -> Iterator[tuple[str, torch.Tensor]]:
        with safe_open(str(info.path), framework="pt") as file:
            for key in names:
                yield key, file.get_tensor(key)

    def convert(key: str, tensor: torch.Tensor) -> torch.Tensor:
        return convert_tensor(key[len(info.prefix) :], tensor)

    stream_into(model, names, read(), dtype_for, str(info.path), convert)
    if fp8:
        enable_fp8_storage(model, dtype)
    return model.eval()


def enable_fp8_storage(model: nn.Module, dtype: torch.dtype) -> None:
    """Layerwise casting on exactly the layers whose weight the file stores in fp8 (diffusers'
    default skip list would upcast the AdaLN modulation layers, a third of AuraFlow)."""
    storage = next(p.dtype for p in model.parameters() if p.dtype in FP8)
    keep = [
        f"^{re.escape(name)}$"
        for name, module in model.named_modules()
        if name
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dtype not in FP8
    ]
    apply_layerwise_casting(
        model,
        storage_dtype=storage,
        compute_dtype=dtype,
        skip_modules_pattern=tuple(keep) or ("(?!)",),
    )
    _upcast_unhooked(model, dtype)


def _upcast_unhooked(model: nn.Module, dtype: torch.dtype) -> None:
    """fp8 parameters that layerwise casting does not cover (it skips the positional grid,
    norms and parameters outside linear/conv layers) move to the compute dtype."""
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None and registry.get_hook("layerwise_casting") is not None:
            continue
        for name, param in list(module.named_parameters(recurse=False)):
            if param.dtype in FP8:
                module._parameters[name] = nn.Parameter(param.to(dtype), requires_grad=False)


__all__ = ["derive_config", "load_transformer", "renamed_keys", "stream_into"]
