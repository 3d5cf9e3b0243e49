"""Opt-in speed modes for AuraFlowEngine, each measurable on its own.

`EngineOptions()` (`auraserve.core.engine_options`, torch-free; every field at its default)
changes nothing: the engine stays bit-identical to diffusers on fp32 CPU. Each field switches
on one optimisation; `apply_optimizations`
applies them to a loaded pipeline in a fixed order and returns a log line per field saying
what was applied, or what was skipped and why (a mode that cannot run where the engine runs,
e.g. CUDA graphs on the CPU, is skipped with a reason instead of failing the worker start).

What each does, and where it runs:

==================  ==================================================  =====================
field               what                                                CPU / CUDA
==================  ==================================================  =====================
fuse_qkv            diffusers' `fuse_qkv_projections`: one (3d × d)     both
                    matmul instead of three for q, k, v (and for the
                    text stream of joint blocks); the unfused copies
                    are dropped so memory does not grow
sdpa_backend        `torch.nn.attention.sdpa_kernel` around the         CPU: math / flash
                    transformer, with a priority list (cuDNN first for  only; others keep
                    "auto") that falls back per call to the next        torch's choice
                    backend that can take the shapes
compile="blocks"    regional `torch.compile`: each repeated block       both (CPU needs a
                    (4 joint + 32 single) is compiled, all of one kind  C++ compiler)
                    sharing one graph, so warm-up compiles 2 graphs,
                    not a 36-block model
compile_dynamic     dynamic shapes (default on): new sizes and batch    both
                    sizes reuse the graphs instead of recompiling
autotune            inductor max-autotune (Triton GEMM search; long     CUDA only
                    compile)
cuda_graphs         compile mode "reduce-overhead" (CUDA graph trees,   CUDA only, offload
                    one graph per block kind and shape), with a step    "none" only
                    marker per transformer call
vae_channels_last   VAE weights and input in channels-last (NHWC):      both (pays on CUDA)
                    the layout cuDNN's fastest conv kernels want
vae_dtype           decode in this dtype (bf16 keeps fp32's range, so   both
                    SDXL's VAE does not overflow as it does in fp16)
vae_tiling_above    tiled decode when width × height > this² px         both
vae_tile_size       tile side when tiling (0: the VAE's, 1024 px)       both
text_cache_size     LRU cache of prompt embeddings (engine-level, see   both
                    `text_cache`); exact
fp8                 float8 e4m3 weights, dynamically quantised          torchao: CUDA ≥ 8.9;
                    activations, in the blocks' linear layers (AdaLN    native: CPU, and
                    modulation stays bf16); fp8_backend "torchao"       CUDA ≥ 8.9
                    (Float8DynamicActivationFloat8WeightConfig, per
                    row) or "native" (our `torch._scaled_mm` layer,
                    no extra dependency)
==================  ==================================================  =====================

One module per concern: `attention` (fused q/k/v, SDPA backends), `fp8`, `compile`
(regional compile, CUDA graphs) and `vae`; this package orders them.

step_cache (with cache_threshold, cache_warmup, cache_max_skip) is applied per batch by the
engine, not here: `step_cache` hooks the block lists once and `AuraFlowEngine` opens a
per-batch cache. It is lossy; every image's fidelity label names it.

attention="auto" installs our AuraFlow attention processor (`attention`): FlashAttention-3 on
Hopper with flash_attn_interface installed, cuDNN attention elsewhere on CUDA, torch SDPA on
the CPU (bit-identical); the kernel is chosen once at load and shown in /v2/workers.

Order of application: fuse → fp8 (so the fused projection is what gets quantised) →
attention processor (after fusing, which installs diffusers' fused one) → SDPA
wrapper → compile (last: it must see the final modules) → VAE. Offload: with "sequential" the
weights live behind per-layer hooks, so only SDPA, VAE tiling and the text cache apply; with
"model" everything but fp8 and CUDA graphs does (graphs need weights at fixed addresses).
"""

from __future__ import annotations

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.components import AuraFlowPipeline
from auraserve.engine.optimize.attention import apply_attention, apply_sdpa, fuse_qkv
from auraserve.engine.optimize.compile import apply_compile
from auraserve.engine.optimize.fp8 import Fp8Linear, apply_fp8
from auraserve.engine.optimize.vae import apply_vae


def offload_mode(pipe: AuraFlowPipeline) -> str:
    """ "sequential" when accelerate hooks sit on the transformer's layers, "model" when one
    sits on the transformer itself, else "none"."""
    transformer = pipe.transformer
    if any(hasattr(m, "_hf_hook") for m in transformer.modules() if m is not transformer):
        return "sequential"
    if hasattr(transformer, "_hf_hook"):
        return "model"
    return "none"


def apply_optimizations(pipe: AuraFlowPipeline, options: EngineOptions) -> list[str]:
    """Apply `options` to `pipe` in place; returns one log line per optimisation.

    Call once per pipeline, after weights are placed (on the device, or behind offload
    hooks). Applying the same options again is a no-op; other options on an already
    optimised pipeline raise ValueError (fused or quantised weights cannot be undone).
    Raises ModelLoadError when fp8 with the torchao backend is asked for and torchao is not
    installed.
    """
    if options.is_default:
        return []  # touch nothing: the default engine stays bit-identical to diffusers
    transformer = pipe.transformer
    previous = getattr(transformer, "_auraserve_options", None)
    if previous is not None:
        if previous == options:
            return ["optimisations already applied to this pipeline"]
        raise ValueError("this pipeline was already optimised with other options; load a new one")
    device = pipe._execution_device
    offload = offload_mode(pipe)
    log: list[str] = []
    log.append(fuse_qkv(transformer, options, offload))
    log.append(apply_fp8(transformer, options, device, offload))
    line, kernel = apply_attention(transformer, options, device)
    if options.attention != "diffusers":  # a line only when asked for (log lines keep their places)
        log.append(line)
    transformer._auraserve_attention = kernel
    log.append(apply_sdpa(transformer, options, device))
    log.append(apply_compile(transformer, options, device, offload))
    log += apply_vae(pipe, options, offload)
    log.append(
        f"text cache: up to {options.text_cache_size} prompt embeddings (LRU, exact)"
        if options.text_cache_size
        else "text cache: off"
    )
    transformer._auraserve_options = options
    return log


__all__ = ["Fp8Linear", "apply_optimizations", "offload_mode"]
