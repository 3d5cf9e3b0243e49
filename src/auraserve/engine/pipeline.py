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
  (`engine.pos_embed`) instead of crashing; sizes inside it run diffusers' code;
* each image is VAE-decoded on its own (a batch-1 decode keeps VAE memory flat and makes the
  pixels independent of how many images share the batch).

Batch independence: on fp32 CPU a request's images are bit-identical whether it runs alone or
with others. Two details make that hold: the timestep is passed as a single row (every row
shares σ) so the small timestep-MLP matmuls never change shape with the batch, and text
encoding and VAE decoding run per request / per image. On GPUs, cuBLAS may still pick
different kernels for different batch sizes, so there equality is to rounding, not to the bit.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from auraserve.core.engine_options import EngineOptions
from auraserve.core.presets import DEFAULT_WEIGHTS
from auraserve.core.request import SIZE_MULTIPLE, GenerationRequest, check_one_batch
from auraserve.core.samplers import SAMPLERS, SCHEDULERS
from auraserve.engine.base import CancelCheck, JobResult, StepCallback
from auraserve.engine.checkpoint import CheckpointMismatch, SamplerState
from auraserve.engine.checkpoint_format import request_digest
from auraserve.engine.components import AuraFlowPipeline
from auraserve.engine.expand import OfflineExpander, PromptExpander, TokenBudget, expand_prompt
from auraserve.engine.img2img import encode_image, noised, start_sigmas
from auraserve.engine.loading import load_pipeline
from auraserve.engine.lora import LoraOptions, LoraSlots, check_same_loras
from auraserve.engine.optimize import apply_optimizations, step_cache
from auraserve.engine.pos_embed import install_pos_embed_interpolation
from auraserve.engine.preview import preview_png
from auraserve.engine.sampling import NoiseSampler, sample
from auraserve.engine.schedules import sigmas as make_sigmas
from auraserve.engine.text_cache import TextEmbeddingCache
from auraserve.errors import JobCancelled, UnsupportedRequest

if TYPE_CHECKING:
    from auraserve.engine.parallel import RowSplit

MAX_TOKENS = 256  # AuraFlow was trained with 256 T5 tokens; diffusers' default too
# Stochastic samplers' noise for image i comes from a generator seeded with
# seed + i + this offset, so it never replays the initial-noise stream (seeded seed + i).
SAMPLER_NOISE_SEED_OFFSET = 0x5EED_0F_A0_F10
PREVIEW_SIZE = 256  # px, the longer side of a live preview
# on_preview(step, previews): previews[r][i] is request r's image i as a small JPEG.
# on_checkpoint(r, data): request r's sampler checkpoint (engine.checkpoint) as bytes.
CheckpointCallback = Callable[[int, bytes], None]
PreviewCallback = Callable[[int, list[list[bytes]]], None]

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
    init_image: Image.Image | None = None  # image-to-image input, decoded by the worker

    @property
    def uses_cfg(self) -> bool:
        return self.request.guidance_scale > 1.0


class AuraFlowEngine:
    """The `Engine` implementation for AuraFlow (see module docstring)."""

    #: generate takes checkpoint_every_steps/on_checkpoint/resume_from and previews.
    supports_checkpoints = True

    def __init__(
        self,
        pipe: AuraFlowPipeline,
        *,
        description: str,
        is_test_model: bool = False,
        expander: PromptExpander | None = None,
        max_rows: int | None = None,
        options: EngineOptions | None = None,
        lora: LoraOptions | None = None,
    ) -> None:
        """`max_rows` caps the rows of one transformer forward (uncond and cond rows count
        alike); a bigger batch runs in chunks, trading speed for bounded activation memory.
        None runs the whole batch at once.

        `options` switches on speed modes (`engine.optimize`); they are applied to `pipe` in
        place, here, and `optimization_log` says what was applied or skipped. None (or
        `EngineOptions()`) leaves the pipeline untouched.

        `lora` enables LoRA adapters per request (`engine.lora`); its slots are added before
        the speed modes, so a compiled transformer hot-swaps adapters without recompiling.
        None: requests with adapters FAIL."""
        if max_rows is not None and max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.pipe = pipe
        self.description = description
        self.is_test_model = is_test_model
        self.expander: PromptExpander = expander or OfflineExpander()
        self.max_rows = max_rows
        self._lock = threading.Lock()
        # Set by a rank of a parallel group (`engine.parallel`): the transformer's rows are
        # split across the group's processes, the rest of the engine runs whole on each.
        self.row_split: RowSplit | None = None
        install_pos_embed_interpolation(pipe)
        self.options = options or EngineOptions()
        self.lora = LoraSlots(pipe, lora, self.options) if lora is not None else None
        self.optimization_log: list[str] = apply_optimizations(pipe, self.options)
        # /v2/workers shows the description: say what runs when it is not diffusers' default.
        self.attention_kernel: str = getattr(pipe.transformer, "_auraserve_attention", "sdpa")
        notes: list[str] = []
        if self.options.attention != "diffusers":
            notes.append(f"attention {self.attention_kernel}")
        if self.options.step_cache != "none":
            notes.append(f"step cache {self.options.step_cache}@{self.options.cache_threshold:g}")
        if notes:
            self.description = f"{description}; {', '.join(notes)}"
        self.cache_settings = step_cache.CacheSettings.from_options(self.options)
        self._cache: step_cache.StepCache | None = None
        self._cache_rows: list[list[int]] = []
        # Lossy storage of the checkpoint itself ({"option": "fp8_weights", "storage": …} or
        # {"option": "quantized_weights", "types": [...]}); `load_engine` fills it from the
        # loader. It is on every image's fidelity label.
        self.weights_lossy: list[dict[str, Any]] = []
        if self.cache_settings is not None:
            self.optimization_log.append(step_cache.install(pipe.transformer))
        if self.lora is not None:
            self.optimization_log.append(self.lora.log_line)
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
        init_images: Sequence[Image.Image | None] | None = None,
        checkpoint_every_steps: int = 0,
        on_checkpoint: CheckpointCallback | None = None,
        resume_from: Sequence[bytes] | None = None,
        preview_every_steps: int = 0,
        on_preview: PreviewCallback | None = None,
        previews_wanted: Callable[[], bool] | None = None,
        checkpoint_wanted: Callable[[], bool] | None = None,
    ) -> list[JobResult]:
        """Run a batch (see `engine.base.Engine.generate`), optionally resumable and previewed.

        ``on_checkpoint(r, bytes)`` gets request r's sampler state (`engine.checkpoint`: its
        images' rows) after every ``checkpoint_every_steps``-th step but the last, for every
        request not cancelled. ``resume_from`` holds one such checkpoint per request, all of
        the same step (taken in this batch or in any other: rows are independent), and gives
        the same images, bit for bit on fp32 CPU, as the run that was never interrupted;
        ``on_step`` then reports only the steps run now. A checkpoint of other request
        parameters (`checkpoint_format.request_digest`), sampler, schedule, size or step
        raises `CheckpointMismatch`, and so does any resume while a step cache runs for the
        batch: its per-row residuals (tens of MB per image) are not in checkpoints, so such
        batches never write one either. ``on_preview(step, previews)``
        gets, after every ``preview_every_steps``-th step but the last, one JPEG per image per
        request: the step's x0 estimate through `engine.preview`'s latent → RGB projection;
        with ``previews_wanted``, only at the steps where it answers True (nobody watching: no
        preview is made). Likewise ``checkpoint_wanted`` gates checkpoints (the worker's clock:
        a state is serialised only when one is due).
        Exceptions from either callback abort the batch, as ``on_step``'s do.
        """
        if not requests:
            return []
        _check_batch(requests)
        if checkpoint_every_steps < 0 or preview_every_steps < 0:
            raise ValueError("checkpoint_every_steps and preview_every_steps must be ≥ 0")
        fixed_lossy = [*self.weights_lossy, *self.options.exact().lossy()]
        if fixed_lossy and any(request.exact for request in requests):
            # fp8 and quantised weights are in the loaded model: no per-job way around them.
            names = ", ".join(str(item["option"]) for item in fixed_lossy)
            raise UnsupportedRequest(
                f"exact: this server's model runs with {names}, which cannot be turned off "
                "per request; send without exact=true to accept it"
            )
        inits = list(init_images) if init_images is not None else [None] * len(requests)
        if len(inits) != len(requests):
            raise ValueError("init_images needs one entry per request")
        for request, init in zip(requests, inits, strict=True):
            if request.image is not None and init is None:
                raise UnsupportedRequest("image: the input image was not loaded")
        hooks = _Hooks(
            preview_every=preview_every_steps, on_preview=on_preview, wanted=previews_wanted
        )
        if (on_checkpoint is not None and checkpoint_every_steps) or resume_from is not None:
            digests = tuple(
                request_digest(r, init if r.image is not None else None)
                for r, init in zip(requests, inits, strict=True)
            )
            resume = None
            if resume_from is not None:
                if len(resume_from) != len(requests):
                    raise ValueError("resume_from needs one checkpoint per request")
                resume = SamplerState.join(
                    [
                        SamplerState.from_bytes(data, request_digest=digest)
                        for data, digest in zip(resume_from, digests, strict=True)
                    ]
                )
            hooks = replace(
                hooks,
                checkpoint_wanted=checkpoint_wanted,
                checkpoint_every=checkpoint_every_steps,
                on_checkpoint=on_checkpoint,
                resume=resume,
                digests=digests,
            )
        with self._lock, torch.inference_mode():
            if self.lora is not None:
                self.lora.activate(requests)
            elif check_same_loras(requests):
                raise UnsupportedRequest("LoRA adapters are not enabled on this server")
            started = time.perf_counter()
            try:
                results = self._generate(list(requests), on_step, cancelled, inits, hooks)
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
        inits: Sequence[Image.Image | None],
        hooks: _Hooks,
    ) -> list[JobResult]:
        rows = [self._prepare(request) for request in requests]
        self._cache = None
        for row, init in zip(rows, inits, strict=True):
            row.init_image = init if row.request.image is not None else None
        dropped: set[int] = set()
        check = _cancel_checker(cancelled, len(rows), dropped)
        check()
        latents = self._sample(rows, on_step, check, hooks, dropped)
        return self._decode(rows, latents, dropped)

    def _prepare(self, request: GenerationRequest) -> _Row:
        row = _Row(request=request, prompt_used=request.prompt)
        if request.expand_prompt:
            # Measured with the model's own tokenizer, as _truncation_warnings measures.
            budget = TokenBudget(count=self._token_count, limit=MAX_TOKENS)
            row.prompt_used, row.warnings = expand_prompt(
                self.expander, request.prompt, request.seed, budget
            )
        self._encode(row)
        return row

    def _token_count(self, text: str) -> int:
        """Ids the tokenizer gives `text`, its final </s> included (what the window holds)."""
        return len(self.pipe.tokenizer(text, truncation=False).input_ids)

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

    def _init_latents(self, rows: list[_Row]) -> torch.Tensor:
        """The input image's latent for every image of every row (one encode per request)."""
        parts = []
        for row in rows:
            if row.init_image is None:
                raise UnsupportedRequest("image: the input image was not loaded")
            request = row.request
            latent = encode_image(self.pipe, row.init_image, request.width, request.height)
            parts.append(latent.expand(request.num_images, -1, -1, -1))
        return torch.cat(parts).to(self.device)

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
        hooks: _Hooks,
        dropped: set[int],
    ) -> torch.Tensor:
        first = rows[0].request
        # sampler= applies ComfyUI's KSampler rule (dpm_2, uni_pc: penultimate sigma dropped).
        sigmas = make_sigmas(first.scheduler, first.steps, first.shift, sampler=first.sampler)
        noise = self._initial_noise(rows)
        if first.image is not None:  # image-to-image (engine.img2img): the batch key fixes it
            sigmas = start_sigmas(sigmas, first.strength)
            if hooks.resume is not None:  # the checkpoint holds the latents: no VAE encode
                x = noise
            else:
                x = noised(self._init_latents(rows), noise, sigmas[0])
                if len(sigmas) == 1:  # strength 0: no step, the VAE round trip
                    return x
        else:
            # Flow matching's x_σ = σ·noise + (1-σ)·x0: an empty latent starts at σ_max·noise.
            x = noise * sigmas[0].to(noise.device)
        denoise = self._denoiser(rows)
        cache = self._cache
        if cache is not None and hooks.resume is not None:
            raise CheckpointMismatch("cannot resume a batch that runs with a step cache")
        latest: list[torch.Tensor] = []  # the last x0 estimate, for previews
        if hooks.on_preview is not None and hooks.preview_every:
            denoise = _recording(denoise, latest)

        def step_done(step: int, steps: int) -> None:
            if cache is not None:
                cache.completed_steps = step
            if on_step is not None:
                on_step(step, steps)
            if (
                latest
                and hooks.on_preview
                and step % hooks.preview_every == 0
                and step < steps
                and (hooks.wanted is None or hooks.wanted())
            ):
                hooks.on_preview(step, self._previews(rows, latest[0]))
            check_cancel()

        on_state: Callable[[SamplerState], None] | None = None
        if hooks.on_checkpoint is not None and hooks.checkpoint_every and cache is None:
            write = hooks.on_checkpoint
            counts = [row.request.num_images for row in rows]

            def on_state(state: SamplerState) -> None:
                if state.step % hooks.checkpoint_every:
                    return
                if hooks.checkpoint_wanted is not None and not hooks.checkpoint_wanted():
                    return
                for r, part in enumerate(state.split(counts)):
                    if r not in dropped:
                        digest = hooks.digests[r]
                        write(
                            r,
                            part.labelled(
                                scheduler=first.scheduler, request_digest=digest
                            ).to_bytes(),
                        )

        return sample(
            first.sampler,
            denoise,
            x,
            sigmas,
            noise=self._sampler_noise(rows, x),
            on_step=step_done,
            on_state=on_state,
            resume_from=hooks.resume,
        )

    def _previews(self, rows: list[_Row], denoised: torch.Tensor) -> list[list[bytes]]:
        previews: list[list[bytes]] = []
        offset = 0
        for row in rows:
            n = row.request.num_images
            previews.append(
                [
                    preview_png(denoised[i], size=PREVIEW_SIZE, image_format="jpeg")
                    for i in range(offset, offset + n)
                ]
            )
            offset += n
        return previews

    def _denoiser(self, rows: list[_Row]) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """x0 estimate for the whole batch: one transformer pass over [uncond rows, cond rows]."""
        device, dtype = self.device, self.dtype
        counts = [row.request.num_images for row in rows]
        cond = torch.cat(
            [row.embeds.expand(n, -1, -1) for row, n in zip(rows, counts, strict=True)]
        )
        cfg_index: list[int] = []
        scales: list[float] = []
        uncond_parts: list[torch.Tensor] = []
        offset = 0
        for row, n in zip(rows, counts, strict=True):
            if row.negative_embeds is not None:
                cfg_index += range(offset, offset + n)
                scales += [row.request.guidance_scale] * n
                uncond_parts.append(row.negative_embeds.expand(n, -1, -1))
            offset += n
        context = torch.cat([*uncond_parts, cond]).to(device, dtype)
        index = torch.tensor(cfg_index, dtype=torch.long, device=device)
        scale = torch.tensor(scales, dtype=torch.float32, device=device).view(-1, 1, 1, 1)
        n_uncond = len(cfg_index)
        self._cache = self._new_cache(rows, context.shape[0], n_uncond)
        forward = (
            self._chunked_forward(context, self._cache)
            if self.row_split is None  # a parallel rank never has a step cache (install)
            else self.row_split.wrap(self._chunked_forward, context)
        )

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

    def _new_cache(self, rows: list[_Row], size: int, n_uncond: int) -> step_cache.StepCache | None:
        """The batch's step cache (None without one, or when every job asked for exact
        output: the worker never batches exact jobs with others)."""
        if self.cache_settings is None or any(row.request.exact for row in rows):
            return None
        # Which transformer rows are each request's (its uncond rows, then its cond rows).
        self._cache_rows = []
        uncond = 0
        offset = n_uncond
        for row in rows:
            n = row.request.num_images
            mine = list(range(offset, offset + n))
            if row.negative_embeds is not None:
                mine += range(uncond, uncond + n)
                uncond += n
            offset += n
            self._cache_rows.append(mine)
        return step_cache.StepCache(self.cache_settings, size)

    def _chunked_forward(
        self, context: torch.Tensor, cache: step_cache.StepCache | None = None
    ) -> Callable[[torch.Tensor, float], torch.Tensor]:
        """The transformer's velocity for every row, at most `max_rows` rows per call."""
        transformer = self.pipe.transformer
        limit = self.max_rows or context.shape[0]

        def call(x: torch.Tensor, i: int, timestep: torch.Tensor, sigma: float) -> torch.Tensor:
            with cache.session(transformer, i, sigma) if cache else contextlib.nullcontext():
                out: torch.Tensor = transformer(
                    x[i : i + limit],
                    encoder_hidden_states=context[i : i + limit],
                    timestep=timestep,
                    return_dict=False,
                )[0]
            return out

        def forward(x: torch.Tensor, sigma: float) -> torch.Tensor:
            # One timestep row for all: same σ everywhere, and batch-size-independent matmuls.
            timestep = torch.full((1,), sigma, device=x.device, dtype=x.dtype)
            parts = [call(x, i, timestep, sigma) for i in range(0, x.shape[0], limit)]
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
                    fidelity=self._fidelity(index),
                )
            )
        return results

    def _fidelity(self, index: int) -> dict[str, Any]:
        """How request `index` of the batch was computed (see `JobResult.fidelity`)."""
        lossy = list(self.weights_lossy)
        cache = self._cache
        for item in self.options.lossy():
            if item["option"] == "step_cache":
                if cache is None:
                    continue  # an exact job: the cache did not run for its batch
                computed, skipped = cache.row_stats(self._cache_rows[index])
                if not skipped:
                    continue  # every call of this job ran in full: its images are exact
                item = {**item, "skipped_calls": skipped, "transformer_calls": computed + skipped}
            lossy.append(item)
        return {"exact": True} if not lossy else {"exact": False, "lossy": lossy}

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


@dataclass(frozen=True)
class _Hooks:
    """generate's checkpoint and preview arguments, checked and parsed."""

    checkpoint_every: int = 0
    on_checkpoint: CheckpointCallback | None = None
    resume: SamplerState | None = None
    digests: tuple[str, ...] = ()  # checkpoint_format.request_digest of each request
    preview_every: int = 0
    on_preview: PreviewCallback | None = None
    wanted: Callable[[], bool] | None = None
    checkpoint_wanted: Callable[[], bool] | None = None


def _recording(
    denoise: Callable[[torch.Tensor, float], torch.Tensor], latest: list[torch.Tensor]
) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """``denoise`` that also keeps its last output in ``latest`` (previews show it)."""

    def run(x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = denoise(x, sigma)
        latest[:] = [out]
        return out

    return run


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
    """A mixed batch is the caller's bug (ValueError: the jobs ERROR); a request the model
    cannot run is the client's (`UnsupportedRequest`: the job FAILS). The API validates
    requests already; this is the engine's own word, checked before any work starts. What
    the batch shares (size, steps, sampler, ...) is read from its first request."""
    check_one_batch(requests)
    first = requests[0]
    if first.width % SIZE_MULTIPLE or first.height % SIZE_MULTIPLE:
        raise UnsupportedRequest(f"width and height must be multiples of {SIZE_MULTIPLE}")
    if first.sampler not in SAMPLERS:
        raise UnsupportedRequest(f"unknown sampler {first.sampler!r}")
    if first.scheduler not in SCHEDULERS:
        raise UnsupportedRequest(f"unknown scheduler {first.scheduler!r}")
    if first.steps < 1:
        raise UnsupportedRequest(f"steps must be an integer ≥ 1, not {first.steps!r}")
    if not math.isfinite(first.shift) or first.shift < 0:
        raise UnsupportedRequest(f"shift must be a finite number ≥ 0, not {first.shift!r}")


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


def load_engine(
    weights: str = DEFAULT_WEIGHTS,
    *,
    components: str = DEFAULT_WEIGHTS,
    device: str = "auto",
    dtype: str = "auto",
    offload: str = "none",
    expander: PromptExpander | None = None,
    max_rows: int | None = None,
    options: EngineOptions | None = None,
    lora: LoraOptions | None = None,
) -> AuraFlowEngine:
    """Load AuraFlow and wrap it in an engine.

    `weights`, `components`, `device`, `dtype` and `offload` (and the memory each offload mode
    needs): see
    `engine.loading.load_pipeline`; failures raise `ModelLoadError` with one line that says why
    and what to do. `expander` (default: the offline one) serves `expand_prompt`; `max_rows`
    bounds the rows of one transformer forward (see `AuraFlowEngine`). `options`: opt-in speed
    modes (`auraserve.core.engine_options.EngineOptions`), applied after the weights are
    placed; None changes nothing. Compiled modes compile lazily: call `engine.warmup(sizes)`
    before serving. `lora`: per-request LoRA adapters (`engine.lora.LoraOptions`).
    """
    loaded = load_pipeline(
        weights, components=components, device=device, dtype=dtype, offload=offload
    )
    engine = AuraFlowEngine(
        loaded.pipe,
        description=loaded.description,
        is_test_model=loaded.is_test_model,
        expander=expander,
        max_rows=max_rows,
        options=options,
        lora=lora,
    )
    engine.weights_lossy = list(loaded.weights_lossy)
    return engine


__all__ = [
    "MAX_TOKENS",
    "SAMPLER_NOISE_SEED_OFFSET",
    "AuraFlowEngine",
    "load_engine",
]
