"""Samplers for AuraFlow under ComfyUI's names, driving a denoiser ``(x, σ) → x0``.

The model is a rectified flow: ``x_σ = σ·noise + (1 − σ)·x0``, velocity ``v = noise − x0``,
denoised estimate ``x0 = x − σ·v``. Its probability-flow ODE is ``dx/dσ = (x − x0(x, σ))/σ``,
the same equation k-diffusion integrates for ``x = x0 + σ·noise``; that is why ComfyUI can run
most k-diffusion samplers on flow models unchanged, and why the code below mostly mirrors
ComfyUI's ``comfy/k_diffusion/sampling.py`` line by line. What differs for a flow model is how
noise is put back in, and ComfyUI (``model_sampling`` is ``CONST``) switches those samplers to
rectified-flow versions, which are the ones followed here:

==========================  =================================================================
sampler                     follows (``comfy/k_diffusion/sampling.py`` unless noted)
==========================  =================================================================
``euler``                   ``sample_euler``: x ← x + (σ' − σ)·(x − x0)/σ, which is exactly
                            diffusers' FlowMatchEuler step x + (σ' − σ)·v
``euler_ancestral``         ``sample_euler_ancestral_RF`` (eta = 1)
``heun``                    ``sample_heun`` (Euler on the step to σ = 0)
``dpm_2``                   ``sample_dpm_2`` (Euler on the step to σ = 0)
``dpm_2_ancestral``         ``sample_dpm_2_ancestral_RF`` (eta = 1)
``lms``                     ``sample_lms`` (order 4; x ← x0 on the step to σ = 0)
``dpmpp_2s_ancestral``      ``sample_dpmpp_2s_ancestral_RF`` (eta = 1)
``dpmpp_sde``               ``sample_dpmpp_sde`` with half-log-SNR λ = log((1 − σ)/σ), r = 1/2
``dpmpp_2m``                ``sample_dpmpp_2m`` (λ = −log σ, as ComfyUI uses for every model)
``dpmpp_2m_sde``            ``sample_dpmpp_2m_sde`` (midpoint, flow half-log-SNR)
``dpmpp_3m_sde``            ``sample_dpmpp_3m_sde`` (flow half-log-SNR)
``ddim``                    ComfyUI's ``ddim`` *is* ``euler`` for a flow model (it only adds
                            random inpainting noise), so it is the same code here
``uni_pc`` / ``uni_pc_bh2`` ``comfy/extra_samplers/uni_pc.py`` ``sample_unipc`` (B(h) = h /
                            B(h) = e^h − 1): multistep, order min(3, steps − 1), data
                            prediction, lower-order final steps, no corrector on the last
                            step, and a final σ = 0 replaced by σ = 0.001
==========================  =================================================================

The SDE samplers move a first σ of 1 (where the flow log-SNR is −∞) to 1 − 1e-4, as ComfyUI's
``offset_first_sigma_for_snr`` does.

Deviations from ComfyUI:

* ``dpmpp_sde`` takes its noise from the ``NoiseSampler`` instead of a torchsde Brownian tree
  (no torchsde dependency). Per step it draws two independent normals and combines them into
  the tree's two normalized increments, over [σ_half, σ] and [σ', σ], with the tree's exact
  joint law (the second contains the first). The values differ from torchsde's for the same
  seed; the distribution is the same. ``dpmpp_2m_sde``/``dpmpp_3m_sde`` only ever ask the tree
  for disjoint intervals, whose increments are independent normals, so one draw each is the
  same law too.
* ComfyUI's first-sigma offset is ``shift(1 − 1e-4)``, which needs the model's shift; this
  module is not given it and uses ``1 − 1e-4``, the shift-1 value. The two are within 1e-4 for
  0.5 ≤ shift ≤ 10 (AuraFlow uses 1.73); at shift 0.1 ComfyUI's is 0.999. Either way the
  first SDE step evaluates the model on pure noise just below σ = 1.
* ``uni_pc`` with a single step: ComfyUI's order becomes 0 and it returns the (rescaled) noise;
  here it is one first-order step (the UniPC predictor, which is an Euler step).
* ``dpmpp_2s_ancestral``: ComfyUI tests ``σ == 1`` to avoid the infinite log-SNR of the first
  step; here ``σ >= 1``, because a float32 schedule can start an ulp above 1.
* All step coefficients are computed in float64 from Python floats; ``lms`` integrates its
  Lagrange polynomials exactly (Gauss–Legendre) instead of with ``scipy.integrate.quad``.
* ``sample`` returns ``x`` at the last sigma and does not apply ComfyUI's
  ``inverse_noise_scaling`` (a division by 1 − σ_last, which is 1 for schedules ending at 0).
* ComfyUI's KSampler drops the penultimate sigma for dpm_2, dpm_2_ancestral, uni_pc and
  uni_pc_bh2; that is a schedule choice, available as ``schedules.sigmas(..., sampler=name)``.

Every sampler calls the denoiser with σ as a Python float, works in float32 (or the latents'
own dtype if wider) and calls ``on_step(i, total)`` after step i = 1…total, total =
len(sigmas) − 1. An exception from ``on_step`` propagates and aborts sampling.

Step checkpoints (`engine.checkpoint`): at the end of each step a sampler hands its latents
and the history its next steps read to ``done(i, x, **buffers)``, which can snapshot them
(``on_state``); a run started with ``resume_from`` reads them back through ``done`` and
starts at the saved step. Every sampler keeps all its state in those names, never in-place
updates of saved tensors, so a snapshot stays valid after the step that made it.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from auraserve.core.samplers import SAMPLER_SPECS, SAMPLERS, sampler_spec
from auraserve.engine.base import StepCallback
from auraserve.engine.checkpoint import Buffer, CheckpointMismatch, SamplerState

# Derived from the records in core.samplers (one per sampler); `_SAMPLERS` below is the
# engine's half, and tests/engine/test_sampling.py holds it complete against them.
SAMPLER_NAMES: tuple[str, ...] = SAMPLERS
STOCHASTIC_SAMPLERS: frozenset[str] = frozenset(s.name for s in SAMPLER_SPECS if s.stochastic)

#: (x, sigma) -> x0 estimate, same shape as x.
Denoiser = Callable[[torch.Tensor, float], torch.Tensor]

_ETA = 1.0  # ComfyUI's default for every ancestral / SDE sampler
_S_NOISE = 1.0
_LMS_ORDER = 4
_SNR_OFFSET = 1e-4  # offset_first_sigma_for_snr's percent_offset
_UNIPC_FINAL_SIGMA = 0.001
_SIGMA_SLACK = 1e-6  # float32 schedules may start an ulp or two above 1


def sampler_needs_noise(name: str) -> bool:
    """Whether ``name`` draws fresh noise while sampling (ancestral and SDE samplers)."""
    return sampler_spec(name).stochastic


class NoiseSampler:
    """Standard normal noise shaped like the latents, one CPU generator per batch row.

    Each row is drawn in float32 on the CPU from its own generator and only then moved to the
    target device and dtype, so an image depends only on its own seed — not on the rest of its
    batch, nor on the device it runs on.
    """

    def __init__(
        self,
        generators: Sequence[torch.Generator],
        shape: Sequence[int],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = tuple(int(n) for n in shape)
        if not shape or shape[0] != len(generators):
            raise ValueError(f"shape {shape} needs one generator per row, got {len(generators)}")
        for generator in generators:
            if generator.device.type != "cpu":
                raise ValueError("NoiseSampler needs CPU generators (same noise on any device)")
        self._generators = tuple(generators)
        self._row_shape = shape[1:]
        self.device = torch.device(device)
        self.dtype = dtype

    @classmethod
    def like(cls, generators: Sequence[torch.Generator], x: torch.Tensor) -> NoiseSampler:
        """A sampler whose draws match ``x``'s shape, device and dtype."""
        return cls(generators, x.shape, device=x.device, dtype=x.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._generators), *self._row_shape)

    def draw(self) -> torch.Tensor:
        """One fresh draw for every row (advances every generator by the same amount)."""
        rows = [
            torch.randn(self._row_shape, generator=generator, dtype=torch.float32)
            for generator in self._generators
        ]
        return torch.stack(rows).to(device=self.device, dtype=self.dtype)

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        """Noise for the step σ → σ'. The interval is ignored: draws are independent."""
        return self.draw()

    def get_state(self) -> torch.Tensor:
        """Where every row's stream stands: (rows, n) uint8, one generator state per row."""
        return torch.stack([generator.get_state() for generator in self._generators])

    def set_state(self, state: torch.Tensor) -> None:
        """Move every row's generator to a position read by `get_state` (same row count)."""
        if state.ndim != 2 or state.shape[0] != len(self._generators):
            raise ValueError(
                f"noise state for {state.shape[0] if state.ndim else 0} rows, "
                f"this sampler has {len(self._generators)}"
            )
        for generator, row in zip(self._generators, state, strict=True):
            # A copy of its own: set_state reads a view's storage from its start (crashes).
            generator.set_state(row.to(dtype=torch.uint8, device="cpu").clone())

    def select(self, rows: Sequence[int]) -> NoiseSampler:
        """The same generators (not copies) for a subset of rows, e.g. after dropping some."""
        generators = [self._generators[i] for i in rows]
        return NoiseSampler(
            generators, (len(generators), *self._row_shape), device=self.device, dtype=self.dtype
        )


def sample(
    sampler: str,
    denoise: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    noise: NoiseSampler,
    on_step: StepCallback | None = None,
    on_state: Callable[[SamplerState], None] | None = None,
    resume_from: SamplerState | None = None,
) -> torch.Tensor:
    """Run ``sampler`` from latents ``x`` (at ``sigmas[0]``) down the schedule ``sigmas``.

    Returns the latents at ``sigmas[-1]`` — the final x0 for a schedule ending at 0 (as every
    ``schedules.sigmas`` schedule does) — in float32, or in ``x``'s dtype if that is wider.
    ``noise`` is only drawn from by the samplers where ``sampler_needs_noise`` is true.

    ``on_state`` gets a `SamplerState` at the end of every step but the last (after
    ``on_step``), holding references to the live tensors: serialize it in the callback.
    ``resume_from`` continues from such a state instead of from ``x`` (which then only gives
    the shape and dtype to check against): the state's step is skipped, its latents, history
    and noise positions restored (``noise``'s generators are set to the saved states), and
    the result equals the uninterrupted run's bit for bit. `CheckpointMismatch` if the state
    belongs to another sampler, schedule or latent shape.
    """
    run = _SAMPLERS.get(sampler)
    if run is None:
        raise ValueError(f"unknown sampler {sampler!r}; expected one of {SAMPLER_NAMES}")
    sigma_list = _validated_sigmas(sigmas)
    x = x.to(dtype=_working_dtype(x.dtype))
    if resume_from is not None:
        resume_from.check_resumes(sampler, sigma_list, x)
        if resume_from.noise_state is not None:
            noise.set_state(resume_from.noise_state)
        elif sampler_needs_noise(sampler):
            raise CheckpointMismatch(f"checkpoint lacks {sampler}'s noise position")
        x = resume_from.x.to(device=x.device)
    if len(sigma_list) < 2:
        return x
    progress = _Done(sampler, sigma_list, x.device, noise, on_step, on_state, resume_from)
    with torch.no_grad():
        return run(_Model(denoise, x), x, sigma_list, noise, progress)


# --- plumbing ----------------------------------------------------------------------------


class _Done:
    """A sampler run's step bookkeeping: the step it starts at (0, or a resumed state's),
    the history it restores, and what happens when step i (0-based) ends — ``on_step`` and,
    when asked for, a `SamplerState` of the latents and the history buffers a sampler names.
    """

    def __init__(
        self,
        sampler: str,
        sigmas: list[float],
        device: torch.device,
        noise: NoiseSampler,
        on_step: StepCallback | None,
        on_state: Callable[[SamplerState], None] | None,
        resume: SamplerState | None,
    ) -> None:
        self._sampler = sampler
        self._sigmas = tuple(sigmas)
        self._device = device
        self._noise = noise
        self._on_step = on_step
        self._on_state = on_state
        self._restored: dict[str, Buffer] = dict(resume.buffers) if resume is not None else {}
        self.start = resume.step if resume is not None else 0

    def steps(self, sigmas: list[float]) -> list[tuple[int, float, float]]:
        """(i, σ_i, σ_{i+1}) for the steps still to run."""
        return [(i, sigmas[i], sigmas[i + 1]) for i in range(self.start, len(sigmas) - 1)]

    def _get(self, name: str) -> Buffer:
        if self.start and name not in self._restored:
            raise CheckpointMismatch(f"checkpoint lacks {self._sampler}'s buffer {name!r}")
        return self._restored.get(name)

    def tensor(self, name: str) -> torch.Tensor | None:
        value = self._get(name)
        if value is None or isinstance(value, torch.Tensor):
            return None if value is None else value.to(self._device)
        raise CheckpointMismatch(f"checkpoint buffer {name!r} is not one tensor")

    def tensors(self, name: str) -> list[torch.Tensor]:
        value = self._get(name) or []
        if isinstance(value, torch.Tensor) or not all(isinstance(v, torch.Tensor) for v in value):
            raise CheckpointMismatch(f"checkpoint buffer {name!r} is not a list of tensors")
        return [v.to(self._device) for v in value if isinstance(v, torch.Tensor)]

    def floats(self, name: str) -> list[float]:
        value = self._get(name) or []
        if isinstance(value, torch.Tensor) or not all(isinstance(v, float) for v in value):
            raise CheckpointMismatch(f"checkpoint buffer {name!r} is not a list of floats")
        return [float(v) for v in value if isinstance(v, float)]

    def __call__(self, index: int, x: torch.Tensor, **buffers: Buffer) -> None:
        finished, total = index + 1, len(self._sigmas) - 1
        if self._on_step is not None:
            self._on_step(finished, total)
        if self._on_state is not None and finished < total:
            self._on_state(
                SamplerState(
                    sampler=self._sampler,
                    step=finished,
                    sigmas=self._sigmas,
                    x=x,
                    buffers=buffers,
                    noise_state=self._noise.get_state(),
                )
            )


class _Run(Protocol):
    def __call__(
        self, model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
    ) -> torch.Tensor: ...


class _Model:
    """The caller's denoiser, with its output checked and cast to the working dtype."""

    def __init__(self, denoise: Denoiser, like: torch.Tensor) -> None:
        self._denoise = denoise
        self._shape = like.shape
        self._dtype = like.dtype

    def __call__(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        out = self._denoise(x, float(sigma))
        if out.shape != self._shape:
            raise ValueError(
                f"denoiser returned shape {tuple(out.shape)}, expected {tuple(self._shape)}"
            )
        return out.to(dtype=self._dtype)


def _working_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision latents lose the small per-step increments; ComfyUI samples in float32.
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _validated_sigmas(sigmas: torch.Tensor) -> list[float]:
    if sigmas.ndim != 1 or sigmas.numel() == 0:
        raise ValueError("sigmas must be a non-empty 1-D tensor")
    values = [float(s) for s in sigmas.detach().cpu().tolist()]
    if not all(math.isfinite(s) and 0.0 <= s <= 1.0 + _SIGMA_SLACK for s in values):
        raise ValueError("sigmas must be finite and within [0, 1]")
    if any(b > a for a, b in itertools.pairwise(values)):
        raise ValueError("sigmas must be non-increasing")
    if any(s == 0.0 for s in values[:-1]):
        raise ValueError("only the last sigma may be 0")
    return values


def _noise_like(
    noise: NoiseSampler, x: torch.Tensor, sigma: float, sigma_next: float
) -> torch.Tensor:
    return noise(sigma, sigma_next).to(device=x.device, dtype=x.dtype)


def _to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE; for a flow model this is the velocity."""
    return (x - denoised) / sigma


# --- first-order and Heun-type samplers --------------------------------------------------


def _euler(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    for i, sigma, sigma_next in done.steps(sigmas):
        d = _to_d(x, sigma, model(x, sigma))
        x = x + d * (sigma_next - sigma)
        done(i, x)
    return x


def _heun(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    for i, sigma, sigma_next in done.steps(sigmas):
        d = _to_d(x, sigma, model(x, sigma))
        dt = sigma_next - sigma
        if sigma_next == 0:  # the corrector would divide by σ' = 0: plain Euler
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigma_next, model(x_2, sigma_next))
            x = x + (d + d_2) / 2 * dt
        done(i, x)
    return x


def _log_midpoint(a: float, b: float) -> float:
    """ComfyUI's σ_mid = exp(lerp(log a, log b, ½)), the geometric mean."""
    log_a = math.log(a)
    return math.exp(log_a + 0.5 * (math.log(b) - log_a))


def _dpm_2(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    for i, sigma, sigma_next in done.steps(sigmas):
        d = _to_d(x, sigma, model(x, sigma))
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_next)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigma_next - sigma)
        done(i, x)
    return x


def _lms(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    history = done.tensors("history")  # latest derivative last
    for i, sigma, sigma_next in done.steps(sigmas):
        denoised = model(x, sigma)
        history = [*history, _to_d(x, sigma, denoised)][-_LMS_ORDER:]
        if sigma_next == 0:
            x = denoised
        else:
            order = min(i + 1, _LMS_ORDER)
            for j in range(order):
                x = x + _lms_coefficient(sigmas, i, j, order) * history[-1 - j]
        done(i, x, history=history)
    return x


_GAUSS_NODES, _GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(_LMS_ORDER)  # exact to degree 7


def _lms_coefficient(sigmas: list[float], i: int, j: int, order: int) -> float:
    """∫ over [σ_i, σ_{i+1}] of the Lagrange basis polynomial for node σ_{i−j} on nodes
    σ_i … σ_{i−order+1} (k-diffusion's linear_multistep_coeff, integrated exactly)."""
    nodes = [sigmas[i - k] for k in range(order)]

    def basis(tau: float) -> float:
        value = 1.0
        for k, node in enumerate(nodes):
            if k != j:
                value *= (tau - node) / (nodes[j] - node)
        return value

    lo, hi = sigmas[i], sigmas[i + 1]
    half, mid = (hi - lo) / 2, (hi + lo) / 2
    return half * sum(
        w * basis(mid + half * t) for t, w in zip(_GAUSS_NODES, _GAUSS_WEIGHTS, strict=True)
    )


# --- rectified-flow ancestral samplers ---------------------------------------------------


def _rf_ancestral_step(sigma: float, sigma_next: float) -> tuple[float, float, float]:
    """ComfyUI's RF ancestral split of σ → σ': (σ_down, rescale, renoise).

    Step deterministically to σ_down < σ', then ``x ← rescale·x + renoise·ε`` lands exactly on
    the flow marginal at σ': rescale = (1 − σ')/(1 − σ_down) fixes the signal part and renoise
    tops the noise up to σ'.
    """
    sigma_down = sigma_next * (1 + (sigma_next / sigma - 1) * _ETA)
    alpha_next, alpha_down = 1 - sigma_next, 1 - sigma_down
    # ≥ 0 in exact arithmetic (σ_down ≤ σ'); clamp away round-off
    renoise_sq = sigma_next**2 - (sigma_down * alpha_next / alpha_down) ** 2
    return sigma_down, alpha_next / alpha_down, math.sqrt(max(renoise_sq, 0.0))


def _renoise(
    x: torch.Tensor,
    rescale: float,
    renoise: float,
    noise: NoiseSampler,
    sigma: float,
    sigma_next: float,
) -> torch.Tensor:
    return rescale * x + _noise_like(noise, x, sigma, sigma_next) * (_S_NOISE * renoise)


def _euler_ancestral(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    for i, sigma, sigma_next in done.steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            sigma_down, rescale, renoise = _rf_ancestral_step(sigma, sigma_next)
            ratio = sigma_down / sigma
            x = ratio * x + (1 - ratio) * denoised  # Euler step to σ_down
            x = _renoise(x, rescale, renoise, noise, sigma, sigma_next)
        done(i, x)
    return x


def _dpm_2_ancestral(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    for i, sigma, sigma_next in done.steps(sigmas):
        d = _to_d(x, sigma, model(x, sigma))
        sigma_down, rescale, renoise = _rf_ancestral_step(sigma, sigma_next)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigma)
        else:
            sigma_mid = _log_midpoint(sigma, sigma_down)
            x_2 = x + d * (sigma_mid - sigma)
            d_2 = _to_d(x_2, sigma_mid, model(x_2, sigma_mid))
            x = x + d_2 * (sigma_down - sigma)
            x = _renoise(x, rescale, renoise, noise, sigma, sigma_next)
        done(i, x)
    return x


def _dpmpp_2s_ancestral(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    for i, sigma, sigma_next in done.steps(sigmas):
        denoised = model(x, sigma)
        sigma_down, rescale, renoise = _rf_ancestral_step(sigma, sigma_next)
        if sigma_next == 0:
            x = x + _to_d(x, sigma, denoised) * (sigma_down - sigma)
        else:
            if sigma >= 1.0:  # log-SNR is −∞ at σ = 1; ComfyUI takes this fixed midpoint
                sigma_s = 0.9999
            else:
                lam, lam_down = _flow_half_log_snr(sigma), _flow_half_log_snr(sigma_down)
                sigma_s = _flow_sigma(lam + 0.5 * (lam_down - lam))
            ratio_s = sigma_s / sigma
            u = ratio_s * x + (1 - ratio_s) * denoised
            denoised_2 = model(u, sigma_s)
            ratio_down = sigma_down / sigma
            x = ratio_down * x + (1 - ratio_down) * denoised_2
            x = _renoise(x, rescale, renoise, noise, sigma, sigma_next)
        done(i, x)
    return x


# --- DPM-Solver++ samplers ---------------------------------------------------------------


def _flow_half_log_snr(sigma: float) -> float:
    """λ = log(α/σ) = log((1 − σ)/σ) for the flow x = (1 − σ)·x0 + σ·noise."""
    return math.log((1 - sigma) / sigma)


def _flow_sigma(half_log_snr: float) -> float:
    return 1 / (1 + math.exp(half_log_snr))


def _offset_first_sigma(sigmas: list[float]) -> list[float]:
    """Move a first σ ≥ 1 (infinite log-SNR) just below 1, as ComfyUI does for flow models."""
    if len(sigmas) > 1 and sigmas[0] >= 1:
        return [1 - _SNR_OFFSET, *sigmas[1:]]
    return sigmas


def _ancestral_step(sigma_from: float, sigma_to: float) -> tuple[float, float]:
    """k-diffusion's get_ancestral_step in variance-exploding σ (here σ/α): (down, up)."""
    sigma_up = _ETA * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2)
    sigma_up = min(sigma_to, sigma_up)
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def _dpmpp_2m(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    old_denoised = done.tensor("old_denoised")
    for i, sigma, sigma_next in done.steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:  # h = ∞: the exponential integrator lands on the denoised value
            x = denoised
        else:
            h = math.log(sigma / sigma_next)  # in λ = −log σ
            ratio = sigma_next / sigma  # e^{−h}
            if old_denoised is not None:
                r = math.log(sigmas[i - 1] / sigma) / h
                denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            else:
                denoised_d = denoised
            x = ratio * x + (1 - ratio) * denoised_d
        old_denoised = denoised
        done(i, x, old_denoised=old_denoised)
    return x


def _dpmpp_sde(
    model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
) -> torch.Tensor:
    sigmas = _offset_first_sigma(sigmas)
    for i, sigma, sigma_next in done.steps(sigmas):
        denoised = model(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            x = _dpmpp_sde_step(model, x, denoised, sigma, sigma_next, noise)
        done(i, x)
    return x


def _dpmpp_sde_step(
    model: _Model,
    x: torch.Tensor,
    denoised: torch.Tensor,
    sigma: float,
    sigma_next: float,
    noise: NoiseSampler,
) -> torch.Tensor:
    """One DPM-Solver++ SDE step (r = ½): a noisy half step to evaluate the model at, then
    the full noisy step using that evaluation."""
    r = 0.5
    lam_s, lam_t = _flow_half_log_snr(sigma), _flow_half_log_snr(sigma_next)
    lam_s1 = lam_s + r * (lam_t - lam_s)
    sigma_s1 = _flow_sigma(lam_s1)
    alpha_s, alpha_s1, alpha_t = 1 - sigma, 1 - sigma_s1, 1 - sigma_next

    noise_half, noise_full = _brownian_pair(noise, x, sigma, sigma_s1, sigma_next)

    down, up = _ancestral_step(math.exp(-lam_s), math.exp(-lam_s1))
    h_ = -math.log(down) - lam_s
    x_2 = (alpha_s1 / alpha_s) * math.exp(-h_) * x - alpha_s1 * math.expm1(-h_) * denoised
    x_2 = x_2 + noise_half * (alpha_s1 * _S_NOISE * up)
    denoised_2 = model(x_2, sigma_s1)

    down, up = _ancestral_step(math.exp(-lam_s), math.exp(-lam_t))
    h_ = -math.log(down) - lam_s
    fac = 1 / (2 * r)
    denoised_d = (1 - fac) * denoised + fac * denoised_2
    x = (alpha_t / alpha_s) * math.exp(-h_) * x - alpha_t * math.expm1(-h_) * denoised_d
    return x + noise_full * (alpha_t * _S_NOISE * up)


def _brownian_pair(
    noise: NoiseSampler, x: torch.Tensor, sigma: float, sigma_mid: float, sigma_next: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized Brownian increments over [σ_mid, σ] and [σ', σ] (σ' < σ_mid < σ).

    ComfyUI reads both from one Brownian tree, so the second contains the first. Two
    independent draws a, b give exactly that joint law: the first is a, the second
    (√Δ₁·a + √Δ₂·b)/√(Δ₁ + Δ₂) with Δ₁ = σ − σ_mid, Δ₂ = σ_mid − σ'.
    """
    first = _noise_like(noise, x, sigma, sigma_mid)
    rest = _noise_like(noise, x, sigma_mid, sigma_next)
    d1, d2 = max(sigma - sigma_mid, 0.0), max(sigma_mid - sigma_next, 0.0)
    if d1 + d2 == 0:
        return first, first
    return first, (math.sqrt(d1) * first + math.sqrt(d2) * rest) / math.sqrt(d1 + d2)


def _dpmpp_multistep_sde(order: int) -> _Run:
    """DPM-Solver++(2M) SDE (midpoint) or (3M) SDE, in the flow's half-log-SNR."""

    def run(
        model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
    ) -> torch.Tensor:
        sigmas = _offset_first_sigma(sigmas)
        # (denoised, h), latest first
        previous = list(zip(done.tensors("denoised"), done.floats("h"), strict=True))
        for i, sigma, sigma_next in done.steps(sigmas):
            denoised = model(x, sigma)
            if sigma_next == 0:
                x = denoised
                h = previous[0][1] if previous else math.nan  # ComfyUI leaves h unchanged
            else:
                h = _flow_half_log_snr(sigma_next) - _flow_half_log_snr(sigma)
                x = _dpmpp_sde_update(x, denoised, previous, sigma, sigma_next, h, order)
                x = x + _noise_like(noise, x, sigma, sigma_next) * (
                    sigma_next * math.sqrt(-math.expm1(-2 * h * _ETA)) * _S_NOISE
                )
            previous = [(denoised, h), *previous][: order - 1]
            done(i, x, denoised=[d for d, _ in previous], h=[step_h for _, step_h in previous])
        return x

    return run


def _dpmpp_sde_update(
    x: torch.Tensor,
    denoised: torch.Tensor,
    previous: list[tuple[torch.Tensor, float]],
    sigma: float,
    sigma_next: float,
    h: float,
    order: int,
) -> torch.Tensor:
    """The deterministic part of a DPM-Solver++(2M/3M) SDE step, before its fresh noise."""
    h_eta = h * (_ETA + 1)
    alpha_t = 1 - sigma_next
    phi_1 = -math.expm1(-h_eta)
    x = (sigma_next / sigma) * math.exp(-h * _ETA) * x + alpha_t * phi_1 * denoised
    if order == 2 and previous:  # 2M SDE, midpoint variant
        old, h_last = previous[0]
        x = x + 0.5 * alpha_t * phi_1 * (h / h_last) * (denoised - old)
    elif order == 3 and len(previous) == 2:
        (d_1, h_1), (d_2, h_2) = previous
        r0, r1 = h_1 / h, h_2 / h
        d1_0 = (denoised - d_1) / r0
        d1_1 = (d_1 - d_2) / r1
        d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
        d2 = (d1_0 - d1_1) / (r0 + r1)
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        phi_3 = phi_2 / h_eta - 0.5
        x = x + (alpha_t * phi_2) * d1 - (alpha_t * phi_3) * d2
    elif order == 3 and previous:  # 3M starts as 2M (the exponential-integrator form)
        old, h_1 = previous[0]
        phi_2 = math.expm1(-h_eta) / h_eta + 1
        x = x + (alpha_t * phi_2) * (denoised - old) / (h_1 / h)
    return x


# --- UniPC -------------------------------------------------------------------------------


def _uni_pc(variant: str) -> _Run:
    """UniPC (Zhao et al. 2023) as ComfyUI runs it: multistep UniP predictor + UniC corrector
    on the data prediction, λ = −log σ (ComfyUI's VP wrapper reduces to exactly this)."""

    def run(
        model: _Model, x: torch.Tensor, sigmas: list[float], noise: NoiseSampler, done: _Done
    ) -> torch.Tensor:
        ts = list(sigmas)
        if ts[-1] == 0:  # λ = ∞ at σ = 0; ComfyUI stops at σ = 0.001 instead
            ts[-1] = _UNIPC_FINAL_SIGMA
        steps = len(ts) - 1
        order = max(1, min(3, steps - 1))
        # (σ, denoised), latest last
        if done.start == 0:
            history = [(ts[0], model(x, ts[0]))]
        else:
            history = list(zip(done.floats("sigma"), done.tensors("denoised"), strict=True))
        for i in range(done.start + 1, steps + 1):
            if i < order:  # warm-up: step i runs at order i
                step_order, correct = i, True
            else:  # lower order for the final steps, and no corrector on the last one
                step_order, correct = min(order, steps + 1 - i), i < steps
            x, denoised = _unipc_step(model, x, history, ts[i], step_order, correct, variant)
            if i < steps:
                if denoised is None:
                    denoised = model(x, ts[i])
                history = [*history, (ts[i], denoised)][-order:]
            done(i - 1, x, sigma=[s for s, _ in history], denoised=[d for _, d in history])
        return x

    return run


def _unipc_step(
    model: _Model,
    x: torch.Tensor,
    history: list[tuple[float, torch.Tensor]],
    sigma_next: float,
    order: int,
    correct: bool,
    variant: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """ComfyUI's multistep_uni_pc_bh_update (predict_x0) written for x = x0 + σ·ε scaling.

    Returns the new x and, when the corrector ran, the model's x0 at the new point (which the
    next step reuses, so the corrector costs no extra evaluation)."""
    sigma, denoised = history[-1]
    h = math.log(sigma / sigma_next)
    rks: list[float] = []
    diffs: list[torch.Tensor] = []  # D1s
    for k in range(1, order):
        sigma_k, denoised_k = history[-(k + 1)]
        rk = math.log(sigma / sigma_k) / h
        rks.append(rk)
        diffs.append((denoised_k - denoised) / rk)
    rks.append(1.0)

    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rows, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        rows.append([rk ** (k - 1) for rk in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial

    x_base = (sigma_next / sigma) * x - h_phi_1 * denoised
    x_next = x_base
    if diffs:
        rhos_p = [0.5] if order == 2 else _solve([r[:-1] for r in rows[:-1]], b[:-1])
        x_next = x_base - b_h * _weighted_sum(rhos_p, diffs)
    if not correct:
        return x_next, None

    denoised_next = model(x_next, sigma_next)
    rhos_c = [0.5] if order == 1 else _solve(rows, b)
    correction = rhos_c[-1] * (denoised_next - denoised)
    if diffs:
        correction = correction + _weighted_sum(rhos_c[:-1], diffs)
    return x_base - b_h * correction, denoised_next


def _solve(matrix: list[list[float]], rhs: list[float]) -> list[float]:
    solution = torch.linalg.solve(
        torch.tensor(matrix, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
    )
    return [float(v) for v in solution]


def _weighted_sum(weights: Sequence[float], tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    total = weights[0] * tensors[0]
    for weight, tensor in zip(weights[1:], tensors[1:], strict=False):
        total = total + weight * tensor
    return total


_SAMPLERS: dict[str, _Run] = {
    "euler": _euler,
    "euler_ancestral": _euler_ancestral,
    "heun": _heun,
    "dpm_2": _dpm_2,
    "dpm_2_ancestral": _dpm_2_ancestral,
    "lms": _lms,
    "dpmpp_2s_ancestral": _dpmpp_2s_ancestral,
    "dpmpp_sde": _dpmpp_sde,
    "dpmpp_2m": _dpmpp_2m,
    "dpmpp_2m_sde": _dpmpp_multistep_sde(order=2),
    "dpmpp_3m_sde": _dpmpp_multistep_sde(order=3),
    "ddim": _euler,  # ComfyUI: ksampler("euler", inpaint_options={"random": True})
    "uni_pc": _uni_pc("bh1"),
    "uni_pc_bh2": _uni_pc("bh2"),
}
