"""Opt-in speed modes for AuraFlowEngine (issue 5), each measurable on its own.

`EngineOptions()` (every field at its default) changes nothing: the engine stays bit-identical
to diffusers on fp32 CPU. Each field switches on one optimisation; `apply_optimizations`
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

Order of application: fuse → fp8 (so the fused projection is what gets quantised) → SDPA
wrapper → compile (last: it must see the final modules) → VAE. Offload: with "sequential" the
weights live behind per-layer hooks, so only SDPA, VAE tiling and the text cache apply; with
"model" everything but fp8 and CUDA graphs does (graphs need weights at fixed addresses).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import shutil
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import torch
from diffusers import AuraFlowPipeline
from torch import nn

from auraserve.errors import ModelLoadError

SDPA_BACKENDS = ("default", "auto", "cudnn", "flash", "efficient", "math")
COMPILE_MODES = ("none", "blocks")
VAE_DTYPES = ("same", "bfloat16", "float16", "float32")
FP8_BACKENDS = ("torchao", "native")
FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Hopper and Ada (compute capability 8.9) have fp8 tensor cores; older GPUs do not.
FP8_MIN_CAPABILITY = (8, 9)
_VAE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineOptions:
    """Which optimisations an engine runs with. The defaults switch every one of them off."""

    fuse_qkv: bool = False
    # "default": torch's own choice, untouched. "auto": cuDNN, flash, efficient, math, in that
    # order of preference (cuDNN attention is the fastest on Hopper where it applies). A named
    # backend is preferred and the others stay as fallbacks.
    sdpa_backend: str = "default"
    compile: str = "none"  # "none" | "blocks" (regional compilation of the repeated blocks)
    # Dynamic shapes from the first compile: one graph serves every size and batch (only a
    # single-row batch is specialised); False compiles per shape (faster kernels, recompiles).
    compile_dynamic: bool = True
    autotune: bool = False  # inductor max-autotune; CUDA only; minutes of warm-up
    cuda_graphs: bool = False  # with compile="blocks" on CUDA
    vae_channels_last: bool = False
    vae_dtype: str = "same"  # "same" keeps the VAE's load-time dtype
    vae_tiling_above: int = 0  # tiled decode when width × height > this² (px); 0: never
    # Tile side in px when tiling (0: the VAE's own, 1024 for SDXL's). Larger tiles: fewer
    # seams and GroupNorm-statistics mismatches between tiles, more memory per tile.
    vae_tile_size: int = 0
    text_cache_size: int = 0  # prompt-embedding LRU entries; 0: no cache
    fp8: bool = False
    fp8_backend: str = "torchao"

    def __post_init__(self) -> None:
        _check_choice("sdpa_backend", self.sdpa_backend, SDPA_BACKENDS)
        _check_choice("compile", self.compile, COMPILE_MODES)
        _check_choice("vae_dtype", self.vae_dtype, VAE_DTYPES)
        _check_choice("fp8_backend", self.fp8_backend, FP8_BACKENDS)
        if self.vae_tiling_above < 0:
            raise ValueError("vae_tiling_above must be ≥ 0 (0 never tiles)")
        if self.vae_tile_size < 0 or self.vae_tile_size % 8:
            raise ValueError("vae_tile_size must be a multiple of 8 px (0: the VAE's own)")
        if self.text_cache_size < 0:
            raise ValueError("text_cache_size must be ≥ 0 (0 disables the cache)")
        if self.cuda_graphs and self.compile == "none":
            raise ValueError("cuda_graphs needs compile='blocks' (graphs are captured by it)")
        if self.autotune and self.compile == "none":
            raise ValueError("autotune needs compile='blocks'")

    @property
    def is_default(self) -> bool:
        return self == EngineOptions()

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def parse(cls, spec: str) -> EngineOptions:
        """A preset name, or comma-separated `field=value` pairs (both: `fast,fp8=1`).

        For command lines and config files: "fast", "fuse_qkv=1,compile=blocks",
        "fp8_native,text_cache_size=1024".
        """
        options = cls()
        known = {f.name: f for f in fields(cls)}
        for part in (p.strip() for p in spec.split(",")):
            if not part:
                continue
            if "=" not in part:
                if part not in PRESETS:
                    raise ValueError(f"unknown engine mode {part!r}; presets: {', '.join(PRESETS)}")
                preset = PRESETS[part]
                changed = {
                    name: getattr(preset, name)
                    for name in known
                    if getattr(preset, name) != getattr(EngineOptions(), name)
                }
                options = replace(options, **changed)
                continue
            name, _, raw = (s.strip() for s in part.partition("="))
            if name not in known:
                raise ValueError(f"unknown engine option {name!r}; known: {', '.join(known)}")
            options = replace(options, **{name: _coerce(raw, getattr(EngineOptions(), name))})
        return options


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")


def _coerce(raw: str, like: Any) -> Any:
    if isinstance(like, bool):
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, not {raw!r}")
    if isinstance(like, int):
        return int(raw)
    return raw


_FAST = EngineOptions(
    fuse_qkv=True,
    sdpa_backend="auto",
    compile="blocks",
    vae_channels_last=True,
    vae_dtype="bfloat16",
    vae_tiling_above=1536,
    text_cache_size=256,
)

#: Named modes: one per optimisation (each measurable alone), then the combinations.
PRESETS: dict[str, EngineOptions] = {
    "default": EngineOptions(),
    "fused_qkv": EngineOptions(fuse_qkv=True),
    "sdpa": EngineOptions(sdpa_backend="auto"),
    "compile": EngineOptions(compile="blocks"),
    "compile_cudagraphs": EngineOptions(compile="blocks", cuda_graphs=True),
    "vae": EngineOptions(vae_channels_last=True, vae_dtype="bfloat16", vae_tiling_above=1536),
    "text_cache": EngineOptions(text_cache_size=256),
    "fast": _FAST,
    "fast_cudagraphs": replace(_FAST, cuda_graphs=True),
    "fp8": replace(_FAST, fp8=True, fp8_backend="torchao"),
    "fp8_native": replace(_FAST, fp8=True, fp8_backend="native"),
}


# --------------------------------------------------------------------------------------------
# Quality measure
# --------------------------------------------------------------------------------------------


def psnr(a: Any, b: Any, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB between two images (PIL images or arrays of the same
    shape, 8-bit range by default); inf when they are identical.

    The acceptance bar for the speed modes: ≥ 35 dB against the unoptimised engine on the same
    seed for bf16 modes (differences invisible), ≥ 25 dB for fp8.
    """
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"images differ in shape: {x.shape} vs {y.shape}")
    mse = float(np.mean((x - y) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(peak * peak / mse)


# --------------------------------------------------------------------------------------------
# Applying
# --------------------------------------------------------------------------------------------


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
    log.append(_fuse_qkv(transformer, options, offload))
    log.append(_fp8(transformer, options, device, offload))
    log.append(_sdpa(transformer, options, device))
    log.append(_compile(transformer, options, device, offload))
    log += _vae(pipe, options, offload)
    log.append(
        f"text cache: up to {options.text_cache_size} prompt embeddings (LRU, exact)"
        if options.text_cache_size
        else "text cache: off"
    )
    transformer._auraserve_options = options
    return log


# --- fused QKV ----------------------------------------------------------------------------


def _fuse_qkv(transformer: nn.Module, options: EngineOptions, offload: str) -> str:
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
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj"):
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Module) and name in module._modules:
                dropped += sum(p.numel() for p in layer.parameters())
                del module._modules[name]
    return f"fuse_qkv: fused q/k/v projections; dropped {dropped:,} unfused parameters"


# --- fp8 --------------------------------------------------------------------------------------


class Fp8Linear(nn.Module):
    """A bias-optional linear layer with float8 e4m3 weights and dynamically quantised inputs.

    Weights are scaled per output row (or per tensor) once; each input is scaled per row
    (token) or per tensor at every call; `torch._scaled_mm` multiplies in fp8 and rescales
    into the input's dtype. Under torch.compile the input quantisation (abs-max, divide,
    cast) fuses into one kernel, so the fp8 GEMM's speed is what remains.
    """

    def __init__(self, linear: nn.Linear, *, rowwise: bool = True, fast_accum: bool = False):
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.rowwise = rowwise
        self.fast_accum = fast_accum
        weight = linear.weight.detach().float()
        if rowwise:
            amax = weight.abs().amax(dim=1, keepdim=True)  # (out, 1)
        else:
            amax = weight.abs().amax().reshape(1, 1)
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        quantised = (weight / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        self.register_buffer("weight_fp8", quantised)
        # _scaled_mm wants the second operand's row-wise scales as (1, out); a scalar else.
        self.register_buffer("weight_scale", scale.t().contiguous() if rowwise else scale[0, 0])
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        wide = flat.float()  # scale in fp32: bf16 division would lose the low bits first
        if self.rowwise:
            amax = wide.abs().amax(dim=1, keepdim=True)
        else:
            amax = wide.abs().amax()
        scale = (amax / FP8_MAX).clamp(min=1e-12)
        quantised = (wide / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        out = torch._scaled_mm(
            quantised,
            self.weight_fp8.t(),  # (in, out), column-major: the layout _scaled_mm requires
            scale_a=scale,
            scale_b=self.weight_scale,
            out_dtype=x.dtype,
            use_fast_accum=self.fast_accum,
        )
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        granularity = "row" if self.rowwise else "tensor"
        return f"in={self.in_features}, out={self.out_features}, fp8 e4m3, per-{granularity}"


def _fp8_target(name: str, module: nn.Module) -> bool:
    """The large GEMMs: attention projections and feed-forwards inside the repeated blocks.
    AdaLN modulation layers (…norm…linear) run on one timestep row: no gain, and they set
    every scale and gate, so they stay in bf16. fp8 GEMMs need both sizes divisible by 16."""
    if not isinstance(module, nn.Linear):
        return False
    if not name.startswith(("joint_transformer_blocks.", "single_transformer_blocks.")):
        return False
    if ".norm" in name:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def _fp8(transformer: nn.Module, options: EngineOptions, device: torch.device, offload: str) -> str:
    if not options.fp8:
        return "fp8: off"
    if options.fp8_backend == "torchao":
        quantize = _torchao_quantizer()  # raises a clear ModelLoadError without torchao
    if offload != "none":
        return f"fp8: skipped (not with offload={offload}: weights must stay on the GPU)"
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_MIN_CAPABILITY:
            return (
                f"fp8: skipped (GPU compute capability {capability[0]}.{capability[1]} has no "
                "fp8 tensor cores; needs 8.9 (Ada) or 9.0 (Hopper) or newer)"
            )
        if transformer.dtype != torch.bfloat16:
            return "fp8: skipped (fp8 GEMMs on CUDA produce bf16; load the model in bfloat16)"
    elif options.fp8_backend == "torchao":
        return (
            f"fp8: skipped (torchao float8 needs a CUDA GPU with compute capability ≥ 8.9, "
            f"not {device.type}; fp8_backend='native' also runs on the CPU)"
        )
    elif device.type != "cpu":
        return f"fp8: skipped (no fp8 matmul on {device.type})"
    if options.fp8_backend == "torchao":
        count = quantize(transformer)
        return f"fp8: torchao float8 dynamic quantisation (per-row) of {count} linear layers"
    # Per-row scales need Hopper (sm90) for _scaled_mm; Ada gets per-tensor scales.
    rowwise = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (9, 0)
    # Fast accumulation is what makes Hopper's fp8 GEMMs fast; the CPU kernel has none.
    fast_accum = device.type == "cuda"
    count = 0
    for name, module in list(transformer.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if _fp8_target(full, child):
                setattr(
                    module, child_name, Fp8Linear(child, rowwise=rowwise, fast_accum=fast_accum)
                )
                count += 1
    granularity = "per-row" if rowwise else "per-tensor"
    return f"fp8: native float8 e4m3 ({granularity} scales) in {count} linear layers"


def _torchao_quantizer() -> Callable[[nn.Module], int]:
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise ModelLoadError(
            "fp8 with fp8_backend='torchao' needs torchao, which is not installed: "
            "`pip install torchao` (a build matching your torch), or use fp8_backend='native'"
        ) from exc

    def quantize(transformer: nn.Module) -> int:
        targets = {name for name, m in transformer.named_modules() if _fp8_target(name, m)}
        quantize_(
            transformer,
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            filter_fn=lambda module, name: name in targets,
        )
        return len(targets)

    return quantize


# --- SDPA backend, and the per-call wrapper around the transformer ----------------------------


def _sdpa_order(choice: str) -> list[str]:
    order = ["cudnn", "flash", "efficient", "math"]
    if choice == "auto":
        return order
    if choice == "math":
        return ["math"]  # the reference; it always applies, nothing to fall back to
    return [choice] + [name for name in order if name != choice]


def _sdpa_context_factory(names: list[str]) -> Callable[[], Any]:
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


def _sdpa(transformer: nn.Module, options: EngineOptions, device: torch.device) -> str:
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
        names = _sdpa_order(choice)
    _add_forward_context(transformer, _sdpa_context_factory(names))
    return f"sdpa: backends in order of preference {', '.join(names)}"


def _add_forward_context(module: nn.Module, factory: Callable[[], Any]) -> None:
    """Run every forward of `module` inside `factory()`. Wraps whatever forward is current
    (diffusers', or an offload hook's), so it composes with accelerate either way round."""
    contexts: list[Callable[[], Any]] | None = getattr(module, "_auraserve_contexts", None)
    if contexts is None:
        contexts = []
        module._auraserve_contexts = contexts
        module._auraserve_inner_forward = module.forward
        module.forward = types.MethodType(_forward_in_contexts, module)
    contexts.append(factory)


def _forward_in_contexts(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    # One ExitStack per transformer call (25–50 per image): nothing next to a forward pass.
    with contextlib.ExitStack() as stack:
        for factory in self._auraserve_contexts:
            stack.enter_context(factory())
        return self._auraserve_inner_forward(*args, **kwargs)


@contextlib.contextmanager
def _cudagraph_step() -> Iterator[None]:
    # Each transformer call starts a new CUDA-graph "iteration": the graphs may now overwrite
    # the outputs of the previous call, which nobody holds any more (the engine keeps only
    # the transformer's final output, computed outside the graphs).
    torch.compiler.cudagraph_mark_step_begin()
    yield


# --- torch.compile ----------------------------------------------------------------------------


def _has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


def _compile(
    transformer: nn.Module, options: EngineOptions, device: torch.device, offload: str
) -> str:
    if options.compile == "none":
        return "compile: off"
    if offload == "sequential":
        return "compile: skipped (sequential offload hooks inside the blocks break graphs)"
    if device.type == "cpu" and not _has_cxx_compiler():
        return "compile: skipped (inductor on the CPU needs a C++ compiler; none on PATH)"
    if device.type not in ("cpu", "cuda"):
        return f"compile: skipped (not tried on {device.type})"
    notes: list[str] = []
    graphs = options.cuda_graphs
    if graphs and device.type != "cuda":
        graphs = False
        notes.append("CUDA graphs skipped (CUDA only)")
    elif graphs and offload != "none":
        graphs = False
        notes.append(f"CUDA graphs skipped (offload={offload} moves weights between calls)")
    autotune = options.autotune
    if autotune and device.type != "cuda":
        autotune = False
        notes.append("autotune skipped (CUDA only)")
    mode = {
        (False, False): "default",
        (True, False): "reduce-overhead",
        (False, True): "max-autotune-no-cudagraphs",
        (True, True): "max-autotune",
    }[(graphs, autotune)]
    blocks = [*transformer.joint_transformer_blocks, *transformer.single_transformer_blocks]
    for block in blocks:
        # Module.compile keeps the block object (state dict names, hooks) and compiles its
        # call; every block of one class shares the compiled graph, parameters are inputs.
        block.compile(mode=mode, dynamic=options.compile_dynamic)
    if graphs:
        _add_forward_context(transformer, _cudagraph_step)
    shapes = "dynamic shapes" if options.compile_dynamic else "static shapes (per-size graphs)"
    note = f"; {'; '.join(notes)}" if notes else ""
    return (
        f"compile: {len(blocks)} blocks (regional), mode={mode}, {shapes}; compiles at the "
        f"first call of each block kind, so run warmup(){note}"
    )


# --- VAE --------------------------------------------------------------------------------------


def _vae(pipe: AuraFlowPipeline, options: EngineOptions, offload: str) -> list[str]:
    vae = pipe.vae
    log: list[str] = []
    layout_ok = offload != "sequential"  # weights are on the meta device behind hooks
    if options.vae_dtype != "same":
        if layout_ok:
            # nn.Module.to, not ModelMixin.to: the latter warns about fp32 modules that SDXL's
            # VAE does not have.
            nn.Module.to(vae, dtype=_VAE_DTYPES[options.vae_dtype])
            log.append(f"vae: decodes in {options.vae_dtype}")
        else:
            log.append("vae: dtype kept (sequential offload)")
    channels_last = options.vae_channels_last and layout_ok
    if options.vae_channels_last:
        if channels_last:
            vae.to(memory_format=torch.channels_last)
            log.append("vae: channels-last weights and input")
        else:
            log.append("vae: channels-last skipped (sequential offload)")
    threshold = options.vae_tiling_above
    if threshold:
        if options.vae_tile_size:
            vae.tile_sample_min_size = options.vae_tile_size
            vae.tile_latent_min_size = options.vae_tile_size // pipe.vae_scale_factor
        log.append(
            f"vae: tiled decode above {threshold}² px (tiles of {vae.tile_sample_min_size} px, "
            f"overlap {vae.tile_overlap_factor:g})"
        )
    if channels_last or threshold:
        vae._auraserve_inner_decode = vae.decode
        vae._auraserve_decode_setup = (channels_last, threshold, pipe.vae_scale_factor)
        vae.decode = types.MethodType(_vae_decode, vae)
    return log or ["vae: unchanged"]


def _vae_decode(self: nn.Module, z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    channels_last, threshold, scale = self._auraserve_decode_setup
    if channels_last and z.dim() == 4:
        z = z.contiguous(memory_format=torch.channels_last)
    if threshold:
        pixels = z.shape[-2] * z.shape[-1] * scale * scale
        # diffusers tiles only latents larger than one tile, and only when use_tiling is on.
        if pixels > threshold * threshold:
            self.enable_tiling()
        else:
            self.disable_tiling()
    return self._auraserve_inner_decode(z, *args, **kwargs)


__all__ = [
    "COMPILE_MODES",
    "FP8_BACKENDS",
    "PRESETS",
    "SDPA_BACKENDS",
    "VAE_DTYPES",
    "EngineOptions",
    "Fp8Linear",
    "apply_optimizations",
    "offload_mode",
    "psnr",
]
