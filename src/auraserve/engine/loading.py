"""Loading AuraFlow: weights from a Hugging Face id, a local directory or the tiny test model;
device and dtype resolution; placement on the device or behind offload hooks.

Every failure is a `ModelLoadError` with one line that says why and what to do, raised before
the process starts serving (a worker that cannot load must not accept jobs).
"""

from __future__ import annotations

import logging
import os
import platform
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch

from auraserve.core.presets import DEFAULT_WEIGHTS, TINY_MODEL
from auraserve.engine.components import AuraFlowPipeline
from auraserve.engine.pos_embed import install_pos_embed_interpolation
from auraserve.engine.tiny import build_tiny_pipeline
from auraserve.engine.weights.components import dtype_kwargs
from auraserve.engine.weights.loader import load_file
from auraserve.errors import ModelLoadError

logger = logging.getLogger(__name__)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OFFLOAD_MODES = ("none", "model", "sequential")
#: The one map from a dtype's name (settings, options, bench flags) to torch's dtype.
DTYPES: dict[str, torch.dtype] = {
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float32": torch.float32,
}


@dataclass(frozen=True)
class LoadedPipeline:
    """A pipeline placed where it runs, with what the engine reports about it."""

    pipe: AuraFlowPipeline
    #: e.g. "fal/AuraFlow-v0.3 (cuda, bfloat16)", with ", offload=model" when offloaded.
    description: str
    #: The tiny random-weight model (also when saved and loaded back from a directory).
    is_test_model: bool
    #: Lossy storage of the weights themselves (fp8, GGUF quants): fidelity-label items.
    weights_lossy: list[dict[str, Any]] = field(default_factory=list)


def device_name(device: torch.device) -> str:
    """A human name for reports: the GPU model on CUDA, else the processor."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    return platform.processor() or platform.machine()


def resolve_device(name: str) -> torch.device:
    """auto → cuda, else mps, else cpu. An explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
        raise ModelLoadError(
            f"device cuda requested but torch ({torch.__version__}, {build}) sees no GPU; "
            "use --device cpu or install a CUDA build of torch"
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError("device mps requested but it is not available; use --device cpu")
    if name not in ("cuda", "mps", "cpu"):
        raise ModelLoadError(f"unknown device {name!r}; use auto, cuda, mps or cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto → bfloat16 on CUDA (float16 on GPUs without bf16), float32 on CPU and MPS."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use auto, bfloat16, float16 or float32")
    return DTYPES[name]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or exc.__class__.__name__
    return text.splitlines()[0][:300]


def _hub_offline() -> bool:
    value = os.environ.get("HF_HUB_OFFLINE", "")
    return value.upper() in ("1", "ON", "YES", "TRUE")


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: fails in a second or three without a network,
    where huggingface_hub would retry for much longer."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _no_weights_hint(weights: str) -> str:
    name = weights.rsplit("/", 1)[-1]
    return (
        f"pass a local directory with --model /path/to/{name}, or --model {TINY_MODEL} "
        "for the test model"
    )


_dtype_kwargs = dtype_kwargs


def _load_local(directory: Path, dtype: torch.dtype) -> AuraFlowPipeline:
    if not (directory / "model_index.json").is_file():
        raise ModelLoadError(
            f"{directory} is not a diffusers model directory (no model_index.json); download "
            f"one with `huggingface-cli download {DEFAULT_WEIGHTS} --local-dir {directory}`"
        )
    try:
        return AuraFlowPipeline.from_pretrained(
            directory, local_files_only=True, **_dtype_kwargs(dtype)
        )
    except Exception as exc:
        raise ModelLoadError(
            f"cannot load AuraFlow from {directory}: {_first_line(exc)}; check that it holds "
            "transformer/, text_encoder/, tokenizer/, vae/ and scheduler/"
        ) from exc


def _load_hub(repo_id: str, dtype: torch.dtype) -> AuraFlowPipeline:
    try:  # the local cache first: no network, no waiting
        return AuraFlowPipeline.from_pretrained(
            repo_id, local_files_only=True, **_dtype_kwargs(dtype)
        )
    except Exception as exc:
        cache_error = exc
    if _hub_offline():
        raise ModelLoadError(
            f"cannot load {repo_id}: not in the Hugging Face cache and HF_HUB_OFFLINE is set; "
            + _no_weights_hint(repo_id)
        ) from cache_error
    if not _hub_reachable():
        raise ModelLoadError(
            f"cannot download {repo_id}: no network; " + _no_weights_hint(repo_id)
        ) from cache_error
    logger.info("downloading %s from the Hugging Face Hub (many GB; first time only)", repo_id)
    try:
        return AuraFlowPipeline.from_pretrained(repo_id, **_dtype_kwargs(dtype))
    except Exception as exc:
        raise ModelLoadError(
            f"cannot download {repo_id}: {_first_line(exc)}; " + _no_weights_hint(repo_id)
        ) from exc


def _load_pipeline(
    weights: str, components: str, dtype: torch.dtype
) -> tuple[AuraFlowPipeline, str, list[dict[str, Any]]]:
    """The pipeline, a few words on the weights' format for the engine's description, and
    the weights' lossy storage (fp8, GGUF quants) for the fidelity label."""
    if weights == TINY_MODEL:
        pipe = build_tiny_pipeline()  # built in float32
        return (pipe if dtype == torch.float32 else pipe.to(dtype=dtype)), "", []
    path = Path(weights).expanduser()
    if path.is_dir():
        return _load_local(path, dtype), "", []
    if path.is_file():
        return load_file(path, components, dtype)
    looks_like_path = (
        weights.startswith(("/", ".", "~")) or weights.count("/") > 1 or "\\" in weights
    )
    if looks_like_path:
        raise ModelLoadError(
            f"model path {weights} does not exist (a diffusers directory or a weights file); "
            + _no_weights_hint(DEFAULT_WEIGHTS)
        )
    if not _HUB_ID.match(weights):
        raise ModelLoadError(
            f"model {weights!r} is neither a local directory, a Hugging Face id (owner/name) "
            f"nor '{TINY_MODEL}'; e.g. --model {DEFAULT_WEIGHTS}"
        )
    return _load_hub(weights, dtype), "", []


def _is_toy(pipe: AuraFlowPipeline) -> bool:
    """The tiny model, also when saved and loaded back from a directory."""
    config = pipe.transformer.config
    return int(config.num_attention_heads) * int(config.attention_head_dim) <= 64


def _place(pipe: AuraFlowPipeline, device: torch.device, offload: str) -> str:
    """Move weights to the device or install offload hooks; returns the mode in effect."""
    if offload != "none" and device.type == "cpu":
        logger.warning("offload=%s does nothing on the CPU; ignoring it", offload)
        offload = "none"
    if offload == "none":
        pipe.to(device)
    elif offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return offload


def load_pipeline(
    weights: str = DEFAULT_WEIGHTS,
    *,
    components: str = DEFAULT_WEIGHTS,
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "none",
) -> LoadedPipeline:
    """Load AuraFlow's pipeline and place it (`engine.pipeline.load_engine` wraps it).

    `weights`: a Hugging Face id (default fal/AuraFlow-v0.3; the local cache is tried first,
    then a download if the hub is reachable), a local diffusers-format directory, one weights
    file (.safetensors in AuraFlow's original, ComfyUI's or diffusers' layout, bf16/fp16/fp32
    or float8; all-in-one files with the text encoder and VAE; GGUF quants: see
    `engine.weights`), or "tiny" (random-weight test model built in code). Failures raise
    `ModelLoadError` with one line that says why and what to do.

    `components`: for a single file, where what it lacks comes from (tokenizer, scheduler,
    text encoder and VAE unless inside, the transformer's head split): a diffusers folder or
    hub id. Ignored for folders and hub ids, which hold everything.

    `device`: auto picks cuda, then mps, then cpu. `dtype`: auto is bfloat16 on CUDA (float16 on
    GPUs without bf16) and float32 on CPU/MPS. In float16 the VAE is kept in float32, because
    SDXL's VAE overflows in fp16.

    `offload` and the memory each mode needs for AuraFlow v0.3 in bf16 (parameters: transformer
    6.86 B = 12.8 GiB, UMT5 text encoder 1.22 B = 2.3 GiB, VAE 84 M = 0.16 GiB; activations at
    1024² and batch 1 with CFG add roughly 1–3 GiB, more for larger sizes and batches):

    * "none": everything on the GPU: ≈ 15.3 GiB of weights, plan on 18–20 GiB of VRAM.
    * "model": `enable_model_cpu_offload`: one whole component on the GPU at a time, the
      transformer being the largest: ≈ 13 GiB weights, plan on 15–16 GiB of VRAM and ≈ 16 GiB
      of system RAM; costs a transformer↔CPU transfer per batch (seconds).
    * "sequential": `enable_sequential_cpu_offload`: each layer streams in as it runs; the
      largest is a joint block (≈ 0.65 GiB), so 2–4 GiB of VRAM suffice, at several times the
      run time. Needs ≈ 16 GiB of system RAM.
    On the CPU, offload modes are ignored (with a warning).

    The positional-grid interpolation (`engine.pos_embed`) is installed here, before offload
    hooks capture the patch embedding's forward.
    """
    if offload not in OFFLOAD_MODES:  # checked before minutes of loading, not after
        raise ModelLoadError(f"unknown offload mode {offload!r}; use none, model or sequential")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    pipe, weights_format, weights_lossy = _load_pipeline(weights, components, torch_dtype)
    if torch_dtype == torch.float16:
        pipe.vae.to(torch.float32)
    install_pos_embed_interpolation(pipe)  # before offload hooks capture forward()
    try:
        mode = _place(pipe, torch_device, offload)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"not enough GPU memory to hold {weights} with offload={offload}; try "
            "--offload model (≈ 16 GiB VRAM) or --offload sequential (≈ 4 GiB), see "
            "engine/loading.py"
        ) from exc
    except ImportError as exc:  # offload needs accelerate
        raise ModelLoadError(f"offload={offload} needs accelerate: {_first_line(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    suffix = f", offload={mode}" if mode != "none" else ""
    return LoadedPipeline(
        pipe=pipe,
        description=f"{weights} ({weights_format}{torch_device.type}, {dtype_name}{suffix})",
        is_test_model=weights == TINY_MODEL or _is_toy(pipe),
        weights_lossy=weights_lossy,
    )


__all__ = [
    "DTYPES",
    "OFFLOAD_MODES",
    "LoadedPipeline",
    "device_name",
    "load_pipeline",
    "resolve_device",
    "resolve_dtype",
]
