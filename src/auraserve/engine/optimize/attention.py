"""Attention: fused q/k/v projections, and the SDPA backend in order of preference."""

from __future__ import annotations

import functools
import inspect

import torch
from torch import nn

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.components import AuraFlowTransformer2DModel
from auraserve.engine.optimize.contexts import ContextFactory, add_forward_context

_PROJECTIONS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


def fuse_qkv(transformer: AuraFlowTransformer2DModel, options: EngineOptions, offload: str) -> str:
    if not options.fuse_qkv:
        return "fuse_qkv: off"
    if offload == "sequential":
        return "fuse_qkv: skipped (sequential offload keeps weights behind per-layer hooks)"
    if not hasattr(transformer, "fuse_qkv_projections"):
        return "fuse_qkv: skipped (this diffusers has no fuse_qkv_projections for AuraFlow)"
    transformer.fuse_qkv_projections()
    # diffusers keeps the unfused q/k/v layers next to the fused one (to allow unfusing):
    # 1.1 B parameters (2.2 GB in bf16) for v0.3 that the fused processor never reads.
    dropped = 0
    for module in transformer.modules():
        if not getattr(module, "fused_projections", False):
            continue
        for name in _PROJECTIONS:
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Module) and name in module._modules:
                dropped += sum(p.numel() for p in layer.parameters())
                del module._modules[name]
    return f"fuse_qkv: fused q/k/v projections; dropped {dropped:,} unfused parameters"


def sdpa_order(choice: str) -> list[str]:
    """Backends to try, best first, for an `sdpa_backend` other than "default"."""
    order = ["cudnn", "flash", "efficient", "math"]
    if choice == "auto":
        return order
    if choice == "math":
        return ["math"]  # the reference; it always applies, nothing to fall back to
    return [choice] + [name for name in order if name != choice]


def sdpa_context_factory(names: list[str]) -> ContextFactory:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }
    backends = [table[name] for name in names]
    if "set_priority" in inspect.signature(sdpa_kernel).parameters:  # torch ≥ 2.5
        return functools.partial(sdpa_kernel, backends, set_priority=True)
    return functools.partial(sdpa_kernel, backends)  # older: allowed set, torch's order


def apply_sdpa(
    transformer: AuraFlowTransformer2DModel, options: EngineOptions, device: torch.device
) -> str:
    choice = options.sdpa_backend
    if choice == "default":
        return "sdpa: torch's default backend choice"
    if device.type != "cuda":
        # CPU attention has two kernels: math and a flash-style one; torch picks flash where
        # it applies. Only those two can be asked for here.
        if choice in ("auto", "cudnn", "efficient"):
            return f"sdpa: {choice} kept torch's choice ({device.type} has only math and flash)"
        names = ["math"] if choice == "math" else ["flash", "math"]
    else:
        names = sdpa_order(choice)
    add_forward_context(transformer, sdpa_context_factory(names))
    return f"sdpa: backends in order of preference {', '.join(names)}"
