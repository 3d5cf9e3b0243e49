"""AuraFlowEngine: runs AuraFlow with our own sampling loop over diffusers' components.

diffusers' `AuraFlowPipeline.__call__` is used only as a reference: it supports one scheduler,
one guidance scale per call and crashes above its learned positional grid. We keep the pipeline
object for its components and its `encode_prompt`, and drive the transformer ourselves:

* prompts are encoded per request exactly as `AuraFlowPipeline.encode_prompt` does (it *is*
  that method), 256 tokens max; a longer prompt is truncated and the job gets a warning;
* every image of every request in the batch is one row of one transformer batch; CFG rows
  (negative prompts) join the same forward pass, and each row gets its own guidance scale;
  requests with guidance_scale ≤ 1 contribute no unconditional row at all;
* initial noise is drawn on the CPU per image from `torch.Generator("cpu").manual_seed(seed+i)`
  in diffusers' shape and order, so euler/normal on fp32 CPU reproduces diffusers' pipeline;
* sigmas come from `engine.schedules`, the loop from `engine.sampling`; stochastic samplers
  draw their extra noise from a second per-image CPU generator seeded with
  `seed + i + SAMPLER_NOISE_SEED_OFFSET` (mod 2**64), so results never depend on the batch;
* sizes beyond the transformer's learned positional grid interpolate the grid
  (`install_pos_embed_interpolation`) instead of crashing; sizes inside it run diffusers' code;
* each image is VAE-decoded on its own (a batch-1 decode keeps VAE memory flat and makes the
  pixels independent of how many images share the batch).

Batch independence: on fp32 CPU a request's images are bit-identical whether it runs alone or
with others. Two details make that hold: the timestep is passed as a single row (every row
shares σ) so the small timestep-MLP matmuls never change shape with the batch, and text
encoding and VAE decoding run per request / per image. On GPUs, cuBLAS may still pick
different kernels for different batch sizes, so there equality is to rounding, not to the bit.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
import types
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from diffusers import AuraFlowPipeline
from diffusers.models.transformers.auraflow_transformer_2d import AuraFlowPatchEmbed
from PIL import Image
from torch.nn.functional import interpolate

from auraserve.core.presets import DEFAULT_WEIGHTS, TINY_MODEL
from auraserve.core.request import SIZE_MULTIPLE, GenerationRequest
from auraserve.core.samplers import SAMPLERS, SCHEDULERS
from auraserve.engine.base import CancelCheck, JobResult, StepCallback
from auraserve.engine.expand import OfflineExpander, PromptExpander, expand_prompt
from auraserve.engine.optimize import EngineOptions, apply_optimizations
from auraserve.engine.sampling import NoiseSampler, sample
from auraserve.engine.schedules import sigmas as make_sigmas
from auraserve.engine.text_cache import TextEmbeddingCache
from auraserve.engine.tiny import build_tiny_pipeline
from auraserve.errors import JobCancelled, ModelLoadError

logger = logging.getLogger(__name__)

MAX_TOKENS = 256  # AuraFlow was trained with 256 T5 tokens; diffusers' default too
# Stochastic samplers' noise for image i comes from a generator seeded with
# seed + i + this offset, so it never replays the initial-noise stream (seeded seed + i).
SAMPLER_NOISE_SEED_OFFSET = 0x5EED_0F_A0_F10
# Mode used to stretch the learned positional grid past its size; ComfyUI uses bilinear.
POS_EMBED_INTERPOLATION = "bilinear"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
OFFLOAD_MODES = ("none", "model", "sequential")
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# --------------------------------------------------------------------------------------------
# Positional-embedding interpolation
# --------------------------------------------------------------------------------------------


def _grid_side(patch_embed: AuraFlowPatchEmbed) -> int:
    return int(patch_embed.pos_embed_max_size**0.5)


def _interpolated_pos_embed(
    patch_embed: AuraFlowPatchEmbed, h_p: int, w_p: int, dtype: torch.dtype
) -> torch.Tensor:
    """ComfyUI's rule: stretch the square grid to max(h, w) per side, then crop the centre."""
    grid = _grid_side(patch_embed)
    table = patch_embed.pos_embed[:, : grid * grid].float()
    dim = table.shape[-1]
    side = max(h_p, w_p)
    square = table.reshape(1, grid, grid, dim).permute(0, 3, 1, 2)
    square = interpolate(square, size=(side, side), mode=POS_EMBED_INTERPOLATION)
    top, left = (side - h_p) // 2, (side - w_p) // 2
    crop = square[:, :, top : top + h_p, left : left + w_p]
    return crop.permute(0, 2, 3, 1).reshape(1, h_p * w_p, dim).to(dtype)


def _pos_embed_forward(self: AuraFlowPatchEmbed, latent: torch.Tensor) -> torch.Tensor:
    _, _, height, width = latent.shape
    h_p, w_p = height // self.patch_size, width // self.patch_size
    grid = _grid_side(self)
    if h_p <= grid and w_p <= grid:
        # Inside the learned grid: diffusers' own code, so results stay bit-identical.
        return AuraFlowPatchEmbed.forward(self, latent)
    batch, channels = latent.shape[:2]
    patches = latent.view(batch, channels, h_p, self.patch_size, w_p, self.patch_size)
    patches = patches.permute(0, 2, 4, 1, 3, 5).flatten(-3).flatten(1, 2)
    tokens = self.proj(patches)
    return tokens + _interpolated_pos_embed(self, h_p, w_p, tokens.dtype)


def install_pos_embed_interpolation(pipe: AuraFlowPipeline) -> None:
    """Let the transformer take sizes beyond its learned grid (1536 px for v0.3).

    Replaces the patch-embed module's forward on this instance only. Must run before any
    accelerate offload hook wraps the module (hooks capture `forward` when installed).
    """
    patch_embed = pipe.transformer.pos_embed
    if getattr(patch_embed, "_auraserve_interpolates", False):
        return
    patch_embed.forward = types.MethodType(_pos_embed_forward, patch_embed)
    patch_embed._auraserve_interpolates = True


def max_grid_pixels(pipe: AuraFlowPipeline) -> int:
    """Largest side in pixels the learned positional grid covers without interpolation."""
    return (
        _grid_side(pipe.transformer.pos_embed)
        * pipe.transformer.config.patch_size
        * pipe.vae_scale_factor
    )


# --------------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """One request of the batch, with everything the loop needs about it."""

    request: GenerationRequest
    prompt_used: str
    warnings: list[str] = field(default_factory=list)
    embeds: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (1, 256, d)
    negative_embeds: torch.Tensor | None = None  # (1, 256, d); None without CFG

    @property
    def uses_cfg(self) -> bool:
        return self.request.guidance_scale > 1.0


class AuraFlowEngine:
    """The `Engine` implementation for AuraFlow (see module docstring)."""

    def __init__(
        self,
        pipe: AuraFlowPipeline,
        *,
        description: str,
        is_test_model: bool = False,
        expander: PromptExpander | None = None,
        max_rows: int | None = None,
        options: EngineOptions | None = None,
    ) -> None:
        """`max_rows` caps the rows of one transformer forward (uncond and cond rows count
        alike); a bigger batch runs in chunks, trading speed for bounded activation memory.
        None runs the whole batch at once.

        `options` switches on speed modes (`engine.optimize`); they are applied to `pipe` in
        place, here, and `optimization_log` says what was applied or skipped. None (or
        `EngineOptions()`) leaves the pipeline untouched."""
        if max_rows is not None and max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.pipe = pipe
        self.description = description
        self.is_test_model = is_test_model
        self.expander: PromptExpander = expander or OfflineExpander()
        self.max_rows = max_rows
        self._lock = threading.Lock()
        install_pos_embed_interpolation(pipe)
        self.options = options or EngineOptions()
        self.optimization_log: list[str] = apply_optimizations(pipe, self.options)
        self.text_cache: TextEmbeddingCache | None = (
            TextEmbeddingCache(self.options.text_cache_size)
            if self.options.text_cache_size
            else None
        )

    @property
    def device(self) -> torch.device:
        return self.pipe._execution_device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipe.transformer.dtype

    # -- public --------------------------------------------------------------------------

    def generate(
        self,
        requests: Sequence[GenerationRequest],
        *,
        on_step: StepCallback | None = None,
        cancelled: CancelCheck | None = None,
    ) -> list[JobResult]:
        if not requests:
            return []
        _check_batch(requests)
        with self._lock, torch.inference_mode():
            started = time.perf_counter()
            try:
                results = self._generate(list(requests), on_step, cancelled)
            finally:
                self.pipe.maybe_free_model_hooks()  # offload modes: park weights back on CPU
            elapsed = time.perf_counter() - started
        for result in results:
            result.engine_seconds = elapsed
        return results

    def warmup(self, sizes: Sequence[tuple[int, int]], steps: int = 2) -> float:
        """Run a short generation at each (width, height) so that compilation, CUDA-graph
        capture and kernel selection happen now, at worker start, not in a user's request.
        Returns the seconds it took.

        Per size: one request with CFG (2 rows per forward) and one without (1 row), because
        torch.compile specialises a batch of one; dynamic shapes cover every other row
        count. Sizes need not pass API validation (the tiny model warms up at 64 px).
        """
        started = time.perf_counter()
        for width, height in sizes:
            for guidance in (2.0, 1.0):
                self.generate([_warmup_request(width, height, steps, guidance)])
        return time.perf_counter() - started

    # -- steps -----------------------------------------------------------------------------

    def _generate(
        self,
        requests: list[GenerationRequest],
        on_step: StepCallback | None,
        cancelled: CancelCheck | None,
    ) -> list[JobResult]:
        rows = [self._prepare(request) for request in requests]
        dropped: set[int] = set()
        check = _cancel_checker(cancelled, len(rows), dropped)
        check()
        latents = self._sample(rows, on_step, check)
        return self._decode(rows, latents, dropped)

    def _prepare(self, request: GenerationRequest) -> _Row:
        row = _Row(request=request, prompt_used=request.prompt)
        if request.expand_prompt:
            row.prompt_used, row.warnings = expand_prompt(
                self.expander, request.prompt, request.seed
            )
        self._encode(row)
        return row

    def _encode(self, row: _Row) -> None:
        """Encode with diffusers' own `encode_prompt` (one request at a time: the text
        encoder then sees the same batch shape whether or not the request is batched)."""
        request = row.request
        row.warnings += _truncation_warnings(self.pipe.tokenizer, row.prompt_used, "prompt")
        if row.uses_cfg and request.negative_prompt:
            row.warnings += _truncation_warnings(
                self.pipe.tokenizer, request.negative_prompt, "negative prompt"
            )
        if self.text_cache is not None:
            # Each text on its own, as encode_prompt does internally (batch 1 per text), so
            # a cached embedding is the same tensor the uncached path would compute.
            row.embeds = self.text_cache.get_or_encode(
                row.prompt_used, MAX_TOKENS, self._encode_text
            )
            row.negative_embeds = (
                self.text_cache.get_or_encode(
                    request.negative_prompt or "", MAX_TOKENS, self._encode_text
                )
                if row.uses_cfg
                else None
            )
            return
        embeds, _, negative, _ = self.pipe.encode_prompt(
            prompt=row.prompt_used,
            negative_prompt=request.negative_prompt,
            do_classifier_free_guidance=row.uses_cfg,
            num_images_per_prompt=1,
            device=self.device,
            max_sequence_length=MAX_TOKENS,
        )
        row.embeds, row.negative_embeds = embeds, negative

    def _encode_text(self, text: str) -> torch.Tensor:
        """One text, exactly as encode_prompt encodes a prompt (and, for the same string, its
        negative prompt: both are tokenised to 256 ids and encoded with batch 1)."""
        embeds: torch.Tensor = self.pipe.encode_prompt(
            prompt=text,
            negative_prompt=None,
            do_classifier_free_guidance=False,
            num_images_per_prompt=1,
            device=self.device,
            max_sequence_length=MAX_TOKENS,
        )[0]
        return embeds

    def _initial_noise(self, rows: list[_Row]) -> torch.Tensor:
        """diffusers' `randn_tensor` with one CPU generator and batch 1: exactly
        `torch.randn((1, C, H/8, W/8), generator=g)`. One generator per image keeps every
        image's noise independent of its neighbours in the batch."""
        first = rows[0].request
        shape = (
            1,
            self.pipe.transformer.config.in_channels,
            first.height // self.pipe.vae_scale_factor,
            first.width // self.pipe.vae_scale_factor,
        )
        noise = [
            torch.randn(shape, generator=_cpu_generator(seed), dtype=torch.float32)
            for row in rows
            for seed in row.request.seeds
        ]
        return torch.cat(noise).to(self.device)

    def _sampler_noise(self, rows: list[_Row], x: torch.Tensor) -> NoiseSampler:
        generators = [
            _cpu_generator((seed + SAMPLER_NOISE_SEED_OFFSET) % 2**64)
            for row in rows
            for seed in row.request.seeds
        ]
        return NoiseSampler.like(generators, x)

    def _sample(
        self,
        rows: list[_Row],
        on_step: StepCallback | None,
        check_cancel: Callable[[], None],
    ) -> torch.Tensor:
        first = rows[0].request
        # sampler= applies ComfyUI's KSampler rule (dpm_2, uni_pc: penultimate sigma dropped).
        sigmas = make_sigmas(first.scheduler, first.steps, first.shift, sampler=first.sampler)
        noise = self._initial_noise(rows)
        # Flow matching's x_σ = σ·noise + (1-σ)·x0, so an empty latent starts at σ_max·noise.
        x = noise * sigmas[0].to(noise.device)
        denoise = self._denoiser(rows)

        def step_done(step: int, steps: int) -> None:
            if on_step is not None:
                on_step(step, steps)
            check_cancel()

        return sample(
            first.sampler,
            denoise,
            x,
            sigmas,
            noise=self._sampler_noise(rows, x),
            on_step=step_done,
        )

    def _denoiser(self, rows: list[_Row]) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """x0 estimate for the whole batch: one transformer pass over [uncond rows, cond rows]."""
        device, dtype = self.device, self.dtype
        counts = [row.request.num_images for row in rows]
        cond = torch.cat([row.embeds.expand(n, -1, -1) for row, n in zip(rows, counts)])
        cfg_index: list[int] = []
        scales: list[float] = []
        uncond_parts: list[torch.Tensor] = []
        offset = 0
        for row, n in zip(rows, counts):
            if row.negative_embeds is not None:
                cfg_index += range(offset, offset + n)
                scales += [row.request.guidance_scale] * n
                uncond_parts.append(row.negative_embeds.expand(n, -1, -1))
            offset += n
        context = torch.cat([*uncond_parts, cond]).to(device, dtype)
        index = torch.tensor(cfg_index, dtype=torch.long, device=device)
        scale = torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        n_uncond = len(cfg_index)
        forward = self._chunked_forward(context)

        def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
            x_in = x.to(dtype)
            if n_uncond:
                x_in = torch.cat([x_in.index_select(0, index), x_in])
            v = forward(x_in, float(sigma)).float()
            if n_uncond:
                v_uncond, v = v[:n_uncond], v[n_uncond:].clone()
                v_cond = v.index_select(0, index)
                v.index_copy_(0, index, v_uncond + scale * (v_cond - v_uncond))
            return x - float(sigma) * v

        return denoise

    def _chunked_forward(
        self, context: torch.Tensor
    ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """The transformer's velocity for every row, at most `max_rows` rows per call."""
        transformer = self.pipe.transformer
        limit = self.max_rows or context.shape[0]

        def forward(x: torch.Tensor, sigma: float) -> torch.Tensor:
            # One timestep row for all: same σ everywhere, and batch-size-independent matmuls.
            timestep = torch.full((1,), sigma, device=x.device, dtype=x.dtype)
            parts = [
                transformer(
                    x[i : i + limit],
                    encoder_hidden_states=context[i : i + limit],
                    timestep=timestep,
                    return_dict=False,
                )[0]
                for i in range(0, x.shape[0], limit)
            ]
            return parts[0] if len(parts) == 1 else torch.cat(parts)

        return forward

    def _decode(
        self, rows: list[_Row], latents: torch.Tensor, dropped: set[int]
    ) -> list[JobResult]:
        results: list[JobResult] = []
        offset = 0
        for index, row in enumerate(rows):
            request = row.request
            images: list[Image.Image] = []
            if index not in dropped:
                for i in range(request.num_images):
                    images.append(self._decode_one(latents[offset + i : offset + i + 1]))
            offset += request.num_images
            results.append(
                JobResult(
                    images=images,
                    seeds=request.seeds,
                    width=request.width,
                    height=request.height,
                    prompt_used=row.prompt_used,
                    cancelled=index in dropped,
                    warnings=row.warnings,
                )
            )
        return results

    def _decode_one(self, latent: torch.Tensor) -> Image.Image:
        vae = self.pipe.vae
        latent = latent.float() / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None) is not None:
            latent = latent + vae.config.shift_factor
        # In fp16 mode the VAE was upcast to fp32 at load time (SDXL's VAE overflows in fp16).
        image = vae.decode(latent.to(vae.dtype), return_dict=False)[0]
        pil: list[Image.Image] = self.pipe.image_processor.postprocess(image, output_type="pil")
        return pil[0]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _cpu_generator(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def _warmup_request(width: int, height: int, steps: int, guidance: float) -> GenerationRequest:
    # model_construct: warm-up sizes may lie below the API's minimum (tests, the tiny model).
    return GenerationRequest.model_construct(
        model="warmup",
        prompt="warm-up",
        negative_prompt="",
        num_images=1,
        guidance_scale=guidance,
        steps=steps,
        width=width,
        height=height,
        seed=0,
        shift=1.73,
        sampler="euler",
        scheduler="normal",
        output_format="png",
        output_quality=80,
        expand_prompt=False,
    )


def _check_batch(requests: Sequence[GenerationRequest]) -> None:
    first = requests[0]
    key = (first.width, first.height, first.steps, first.sampler, first.scheduler, first.shift)
    for request in requests[1:]:
        other = (
            request.width,
            request.height,
            request.steps,
            request.sampler,
            request.scheduler,
            request.shift,
        )
        if other != key:
            raise ValueError(
                "a batch must share width, height, steps, sampler, scheduler and shift"
            )
    if first.width % SIZE_MULTIPLE or first.height % SIZE_MULTIPLE:
        raise ValueError(f"width and height must be multiples of {SIZE_MULTIPLE}")
    if first.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {first.sampler!r}")
    if first.scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {first.scheduler!r}")


def _cancel_checker(
    cancelled: CancelCheck | None, size: int, dropped: set[int]
) -> Callable[[], None]:
    """Collects cancelled request indexes into `dropped`; raises once all are gone."""

    def check() -> None:
        if cancelled is None:
            return
        dropped.update(i for i in cancelled() if 0 <= i < size)
        if len(dropped) == size:
            raise JobCancelled("every request of the batch was cancelled")

    return check


def _truncation_warnings(tokenizer: Any, text: str, what: str) -> list[str]:
    """The same test diffusers applies (ids beyond max length, counting the final </s>)."""
    ids: list[int] = tokenizer(text, truncation=False).input_ids
    if len(ids) <= MAX_TOKENS:
        return []
    dropped = tokenizer.decode(ids[MAX_TOKENS - 1 : -1], skip_special_tokens=True).strip()
    preview = dropped if len(dropped) <= 120 else dropped[:117] + "..."
    return [
        f"{what} is {len(ids)} tokens; AuraFlow reads the first {MAX_TOKENS}, "
        f"so this end was ignored: {preview!r}"
    ]


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    """A human name for reports: the GPU model on CUDA, else the processor."""
    if device.type == "cuda":
        return str(torch.cuda.get_device_name(device))
    import platform

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
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; use auto, bfloat16, float16 or float32")
    return _DTYPES[name]


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


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Newer diffusers renamed from_pretrained's `torch_dtype` to `dtype` (and warns on the
    old name); older ones only know `torch_dtype`."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


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
    except Exception as exc:  # noqa: BLE001 — any loader failure becomes one clear line
        raise ModelLoadError(
            f"cannot load AuraFlow from {directory}: {_first_line(exc)}; check that it holds "
            "transformer/, text_encoder/, tokenizer/, vae/ and scheduler/"
        ) from exc


def _load_hub(repo_id: str, dtype: torch.dtype) -> AuraFlowPipeline:
    try:  # the local cache first: no network, no waiting
        return AuraFlowPipeline.from_pretrained(
            repo_id, local_files_only=True, **_dtype_kwargs(dtype)
        )
    except Exception as exc:  # noqa: BLE001
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
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"cannot download {repo_id}: {_first_line(exc)}; " + _no_weights_hint(repo_id)
        ) from exc


def _load_pipeline(weights: str, dtype: torch.dtype) -> AuraFlowPipeline:
    if weights == TINY_MODEL:
        pipe = build_tiny_pipeline()  # built in float32
        return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)
    path = Path(weights).expanduser()
    if path.is_dir():
        return _load_local(path, dtype)
    looks_like_path = (
        weights.startswith(("/", ".", "~")) or weights.count("/") > 1 or "\\" in weights
    )
    if looks_like_path:
        raise ModelLoadError(
            f"model directory {weights} does not exist; " + _no_weights_hint(DEFAULT_WEIGHTS)
        )
    if not _HUB_ID.match(weights):
        raise ModelLoadError(
            f"model {weights!r} is neither a local directory, a Hugging Face id (owner/name) "
            f"nor '{TINY_MODEL}'; e.g. --model {DEFAULT_WEIGHTS}"
        )
    return _load_hub(weights, dtype)


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


def load_engine(
    weights: str = DEFAULT_WEIGHTS,
    *,
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "none",
    expander: PromptExpander | None = None,
    max_rows: int | None = None,
    options: EngineOptions | None = None,
) -> AuraFlowEngine:
    """Load AuraFlow and wrap it in an engine.

    `weights`: a Hugging Face id (default fal/AuraFlow-v0.3; the local cache is tried first,
    then a download if the hub is reachable), a local diffusers-format directory, or "tiny"
    (random-weight test model built in code). Failures raise `ModelLoadError` with one line
    that says why and what to do.

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

    `expander` (default: the offline one) serves `expand_prompt`; `max_rows` bounds the rows of
    one transformer forward (see `AuraFlowEngine`). `options`: opt-in speed modes
    (`engine.optimize.EngineOptions`), applied after the weights are placed; None changes
    nothing. Compiled modes compile lazily: call `engine.warmup(sizes)` before serving.
    """
    if offload not in OFFLOAD_MODES:  # checked before minutes of loading, not after
        raise ModelLoadError(f"unknown offload mode {offload!r}; use none, model or sequential")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    pipe = _load_pipeline(weights, torch_dtype)
    if torch_dtype == torch.float16:
        pipe.vae.to(torch.float32)
    install_pos_embed_interpolation(pipe)  # before offload hooks capture forward()
    try:
        mode = _place(pipe, torch_device, offload)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(
            f"not enough GPU memory to hold {weights} with offload={offload}; try "
            "--offload model (≈ 16 GiB VRAM) or --offload sequential (≈ 4 GiB), see load_engine"
        ) from exc
    except ImportError as exc:  # offload needs accelerate
        raise ModelLoadError(f"offload={offload} needs accelerate: {_first_line(exc)}") from exc
    pipe.set_progress_bar_config(disable=True)
    dtype_name = str(torch_dtype).removeprefix("torch.")
    suffix = f", offload={mode}" if mode != "none" else ""
    return AuraFlowEngine(
        pipe,
        description=f"{weights} ({torch_device.type}, {dtype_name}{suffix})",
        is_test_model=weights == TINY_MODEL or _is_toy(pipe),
        expander=expander,
        max_rows=max_rows,
        options=options,
    )


__all__ = [
    "MAX_TOKENS",
    "OFFLOAD_MODES",
    "POS_EMBED_INTERPOLATION",
    "SAMPLER_NOISE_SEED_OFFSET",
    "AuraFlowEngine",
    "install_pos_embed_interpolation",
    "load_engine",
    "max_grid_pixels",
    "resolve_device",
    "resolve_dtype",
]
