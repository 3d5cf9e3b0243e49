"""float8 e4m3 weights with dynamically quantised activations in the blocks' linear layers:
torchao's kernels, or our own `torch._scaled_mm` layer (no extra dependency)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.components import AuraFlowTransformer2DModel
from auraserve.errors import ModelLoadError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
# Hopper and Ada (compute capability 8.9) have fp8 tensor cores; older GPUs do not.
FP8_MIN_CAPABILITY = (8, 9)


class Fp8Linear(nn.Module):
    """A bias-optional linear layer with float8 e4m3 weights and dynamically quantised inputs.

    Weights are scaled per output row (or per tensor) once; each input is scaled per row
    (token) or per tensor at every call; `torch._scaled_mm` multiplies in fp8 and rescales
    into the input's dtype. Under torch.compile the input quantisation (abs-max, divide,
    cast) fuses into one kernel, so the fp8 GEMM's speed is what remains.
    """

    # Buffers and the parameter, declared: nn.Module's __getattr__ would type them loosely.
    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor
    bias: nn.Parameter | None

    def __init__(
        self, linear: nn.Linear, *, rowwise: bool = True, fast_accum: bool = False
    ) -> None:
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


def fp8_target(name: str, module: nn.Module) -> bool:
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


def apply_fp8(
    transformer: AuraFlowTransformer2DModel,
    options: EngineOptions,
    device: torch.device,
    offload: str,
) -> str:
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
            if fp8_target(full, child):
                setattr(
                    module, child_name, Fp8Linear(child, rowwise=rowwise, fast_accum=fast_accum)
                )
                count += 1
    granularity = "per-row" if rowwise else "per-tensor"
    return f"fp8: native float8 e4m3 ({granularity} scales) in {count} linear layers"


def _torchao_quantizer() -> Callable[[AuraFlowTransformer2DModel], int]:
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

    def quantize(transformer: AuraFlowTransformer2DModel) -> int:
        targets = {name for name, m in transformer.named_modules() if fp8_target(name, m)}
        quantize_(
            transformer,
            Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
            filter_fn=lambda module, name: name in targets,
        )
        return len(targets)

    return quantize
