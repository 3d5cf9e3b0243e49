"""Regional `torch.compile` of the repeated transformer blocks, optionally with CUDA graphs."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator

import torch

from auraserve.core.engine_options import EngineOptions
from auraserve.engine.components import AuraFlowTransformer2DModel
from auraserve.engine.optimize.contexts import add_forward_context


def _has_cxx_compiler() -> bool:
    return any(shutil.which(name) for name in ("g++", "c++", "clang++"))


@contextlib.contextmanager
def _cudagraph_step() -> Iterator[None]:
    # Each transformer call starts a new CUDA-graph "iteration": the graphs may now overwrite
    # the outputs of the previous call, which nobody holds any more (the engine keeps only
    # the transformer's final output, computed outside the graphs).
    torch.compiler.cudagraph_mark_step_begin()
    yield


def apply_compile(
    transformer: AuraFlowTransformer2DModel,
    options: EngineOptions,
    device: torch.device,
    offload: str,
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
        add_forward_context(transformer, _cudagraph_step)
    shapes = "dynamic shapes" if options.compile_dynamic else "static shapes (per-size graphs)"
    note = f"; {'; '.join(notes)}" if notes else ""
    return (
        f"compile: {len(blocks)} blocks (regional), mode={mode}, {shapes}; compiles at the "
        f"first call of each block kind, so run warmup(){note}"
    )
