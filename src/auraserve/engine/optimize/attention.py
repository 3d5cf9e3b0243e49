"""Attention: fused q/k/v projections, and the SDPA backend in order of preference."""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable
from typing import Any, cast

import torch
import torch.nn.functional as F
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


# --- the attention processor ------------------------------------------------------------------
#
# diffusers' AuraFlow processors call F.scaled_dot_product_attention directly (its
# `set_attention_backend` dispatcher does not reach them), so the kernel is chosen here, in our
# own processor: FlashAttention-3 where its Hopper kernels are installed and the GPU is sm_90,
# cuDNN attention through SDPA on other CUDA GPUs, and plain SDPA elsewhere. On the CPU it runs
# the very same operations as diffusers' processors: bit-identical.

AttentionKernel = str  # "flash3" | "cudnn" | "sdpa"


def _flash3() -> Callable[..., Any] | None:
    try:
        from flash_attn_interface import flash_attn_func  # FlashAttention-3 (hopper/ build)
    except Exception:  # not installed, or built for another torch/CUDA: not usable here
        return None
    return cast("Callable[..., Any]", flash_attn_func)


def choose_kernel(device: torch.device) -> tuple[AttentionKernel, str]:
    """The kernel for `device`, with the reason, chosen once at load."""
    if device.type != "cuda":
        return "sdpa", f"{device.type}: torch's SDPA (as diffusers)"
    major, minor = torch.cuda.get_device_capability(device)
    if major == 9 and _flash3() is not None:
        return "flash3", f"sm_{major}{minor} with flash_attn_interface installed"
    reason = "not Hopper" if major != 9 else "flash_attn_interface (FlashAttention-3) missing"
    return "cudnn", f"sm_{major}{minor}, {reason}: cuDNN attention via SDPA, others as fallback"


class AuraFlowAttnProcessor:
    """diffusers' AuraFlowAttnProcessor2_0 and its fused twin in one, with a chosen kernel."""

    def __init__(self, kernel: AttentionKernel) -> None:
        self.kernel = kernel
        self._flash = _flash3() if kernel == "flash3" else None
        self._context: ContextFactory | None = (
            sdpa_context_factory(sdpa_order("cudnn")) if kernel == "cudnn" else None
        )

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        """q, k, v: (batch, tokens, heads, head_dim) → same layout."""
        if self._flash is not None and q.dtype in (torch.float16, torch.bfloat16):
            out = self._flash(q, k, v, softmax_scale=scale, causal=False)
            return out[0] if isinstance(out, tuple) else out
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        with self._context() if self._context is not None else contextlib.nullcontext():
            out = F.scaled_dot_product_attention(
                q, k, v, dropout_p=0.0, scale=scale, is_causal=False
            )
        return out.transpose(1, 2)

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        """Attention over the whole joint sequence, (batch, tokens, heads, head_dim) in and
        out: the seam a sequence-parallel processor (`engine.ulysses`) wraps."""
        return self._attend(q, k, v, scale)

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        batch = hidden_states.shape[0]
        fused = hasattr(attn, "to_qkv") and "to_q" not in attn._modules
        if fused:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (
                attn.to_q(hidden_states),
                attn.to_k(hidden_states),
                attn.to_v(hidden_states),
            )
        if encoder_hidden_states is not None:
            if fused:
                e_q, e_k, e_v = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                e_q = attn.add_q_proj(encoder_hidden_states)
                e_k = attn.add_k_proj(encoder_hidden_states)
                e_v = attn.add_v_proj(encoder_hidden_states)
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if encoder_hidden_states is not None:
            e_q = e_q.view(batch, -1, attn.heads, head_dim)
            e_k = e_k.view(batch, -1, attn.heads, head_dim)
            e_v = e_v.view(batch, -1, attn.heads, head_dim)
            if attn.norm_added_q is not None:
                e_q = attn.norm_added_q(e_q)
            if attn.norm_added_k is not None:
                e_k = attn.norm_added_k(e_k)
            query = torch.cat([e_q, query], dim=1)
            key = torch.cat([e_k, key], dim=1)
            value = torch.cat([e_v, value], dim=1)
        out = self._core(query, key, value, attn.scale)
        out = out.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        if encoder_hidden_states is not None:
            text_len = encoder_hidden_states.shape[1]
            out, encoder_out = out[:, text_len:], out[:, :text_len]
        out = attn.to_out[1](attn.to_out[0](out))
        if encoder_hidden_states is not None:
            return out, attn.to_add_out(encoder_out)
        return out


def apply_attention(
    transformer: AuraFlowTransformer2DModel, options: EngineOptions, device: torch.device
) -> tuple[str, str]:
    """Install our processor on every attention layer; (log line, kernel name)."""
    if options.attention == "diffusers":
        return "attention: diffusers' processor (torch SDPA)", "sdpa"
    kernel, why = choose_kernel(device)
    if options.attention != "auto":
        kernel, why = options.attention, "asked for by attention="
        if kernel == "flash3" and _flash3() is None:
            raise ValueError("attention=flash3: flash_attn_interface is not installed")
    processor = AuraFlowAttnProcessor(kernel)
    transformer.set_attn_processor(cast(Any, processor))  # diffusers types a closed union
    return f"attention: {kernel} ({why})", kernel
