"""Noise schedules (sigma sequences) for AuraFlow, under ComfyUI's scheduler names.

AuraFlow is a rectified-flow model: ``x_σ = σ·noise + (1 − σ)·x0`` with σ running from 1 (pure
noise) to 0 (data). Its time shift moves steps towards high noise::

    σ' = shift·σ / (1 + (shift − 1)·σ)

ComfyUI drives such a model through ``ModelSamplingDiscreteFlow`` ("CONST" prediction,
multiplier 1000). That object owns a 1000-entry table ``shift(i/1000)`` for i = 1…1000, with
``sigma_min = shift(0.001)`` and ``sigma_max = shift(1) = 1``; its ``timestep(σ)`` is ``1000·σ``
(it does *not* undo the shift) and its ``sigma(t)`` is ``shift(t/1000)``. Every scheduler here
reads that same table and those same endpoints:

===================  ==========================================================================
name                 follows (ComfyUI ``comfy/samplers.py`` unless noted)
===================  ==========================================================================
``normal``           ``normal_scheduler`` — but bit-for-bit diffusers, see below
``simple``           ``simple_scheduler``: every (1000/steps)-th table entry from the top
``sgm_uniform``      ``normal_scheduler(sgm=True)``: steps+1 points, the last dropped, then 0
``karras``           ``k_diffusion.sampling.get_sigmas_karras`` (rho = 7) on [sigma_min, max]
``exponential``      ``k_diffusion.sampling.get_sigmas_exponential`` on [sigma_min, sigma_max]
``ddim_uniform``     ``ddim_scheduler`` — with a different grid, see deviations
``beta``             ``beta_scheduler`` (alpha = beta = 0.6, arXiv:2407.12173)
``linear_quadratic`` ``linear_quadratic_schedule`` (Mochi; threshold 0.025, steps//2 linear)
``kl_optimal``       ``kl_optimal_scheduler`` (AUTOMATIC1111 PR 15608) on [sigma_min, max]
===================  ==========================================================================

``normal``: ComfyUI's ``normal_scheduler`` and diffusers' ``FlowMatchEulerDiscreteScheduler``
compute the same thing — both shift ``linspace(1000·sigma_max, 1000·sigma_min)/1000`` where
sigma_min is *already* shifted, so the low end is shifted twice. ComfyUI does it in float32
torch, diffusers in float64 numpy rounded once to float32; they agree to float32 round-off.
Because the diffusers AuraFlow pipeline is this project's reference, ``normal`` reproduces
diffusers bit for bit (``FlowMatchEulerDiscreteScheduler(shift=shift).set_timesteps(steps)``
then ``.sigmas``), including its float32 ``sigma_max`` that can sit an ulp or two off 1.

Deviations from ComfyUI, each forced by this module's contract (float32, length steps+1,
non-increasing, first value the shifted maximum, last value exactly 0, never NaN):

* ``ddim_uniform``: ComfyUI takes table indices 1, 1+k, 1+2k, … with k = 1000 // steps, so it
  never starts at the maximum (10 steps start at shift(0.902)) and yields steps+2 values when
  steps does not divide 1000 (7 steps give 8), and 1 step gives [shift(0.002), 0]. Here the
  grid keeps ComfyUI's lowest entry (index 1) and its uniform spacing in the table, but is
  stretched to reach the top entry: index ``999 − round(j·998/(steps−1))`` for j = 0…steps−1.
* ``kl_optimal`` with 1 step: ComfyUI divides by steps − 1 (NaN); here it is [sigma_max, 0].
* ``normal`` when diffusers' first sigma is not within float32 round-off of 1 (only for
  shift < 0.5, where diffusers' two float32-shifted endpoints amplify round-off by 1/shift²:
  1.013 at shift 0.001): that first value is pinned to exactly 1. ComfyUI's "sigma_min ≈ 0
  → one more step and no trailing 0" branch is not copied either: we always end at 0.
* ``beta``: ComfyUI rounds each Beta quantile to a table index and drops repeats, which
  shortens the schedule once repeats appear (from 139 steps on). Up to 138 steps (the API
  allows 100) nothing repeats and the values are ComfyUI's; beyond that the quantiles are used
  unrounded, reading the table between its entries. The Beta quantile function is computed
  here (no scipy at run time).
* Tables and formulas are evaluated in float64 and rounded once to float32, so values can
  differ from ComfyUI's float32 arithmetic in the last bit.

Shift: the API allows shift in [0, 10]. The shift map degenerates at 0 (0/0 at σ = 1, every
σ < 1 collapses to 0) and float32 round-off blows up as shift → 0, so shifts below
``MIN_SHIFT`` (1e-3) are treated as ``MIN_SHIFT``. That keeps every schedule finite and
strictly decreasing before its final 0 while behaving like the limit. For the schedulers that
shift every step (normal, simple, sgm_uniform, ddim_uniform, beta) shift 0 sends the first
step from σ = 1 to below 0.1 (0.02 for normal), the rest refining a nearly finished image;
karras, exponential and kl_optimal see the shift only through sigma_min (1e-6 at shift 0),
and linear_quadratic ignores it, exactly as in ComfyUI.

``sigmas(..., sampler=...)`` optionally applies ComfyUI's KSampler rule for dpm_2,
dpm_2_ancestral, uni_pc and uni_pc_bh2: compute steps+1 sigmas and drop the penultimate one.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import torch
from numpy.typing import ArrayLike

from auraserve.core.samplers import SAMPLER_SPECS, SCHEDULERS

SCHEDULER_NAMES: tuple[str, ...] = SCHEDULERS

#: Shifts below this are raised to it (see the module docstring).
MIN_SHIFT = 1e-3
#: ComfyUI's KSampler computes one extra sigma for these samplers and drops the penultimate
#: (`SamplerSpec.discard_penultimate_sigma`).
DISCARD_PENULTIMATE_SAMPLERS = frozenset(
    spec.name for spec in SAMPLER_SPECS if spec.discard_penultimate_sigma
)

_TRAIN_STEPS = 1000  # ModelSamplingDiscreteFlow's table size and timestep multiplier
_KARRAS_RHO = 7.0
_BETA_ALPHA = 0.6
_BETA_BETA = 0.6
_LQ_THRESHOLD_NOISE = 0.025
# diffusers' float32 sigma_max is 1 up to an ulp or two for shift >= 0.5; beyond this it is
# round-off amplified by a small shift, not a schedule, and we pin it to 1.
_NORMAL_START_TOLERANCE = 1e-6

SigmaT = TypeVar("SigmaT", float, torch.Tensor, np.ndarray)


def effective_shift(shift: float) -> float:
    """The shift actually used: ``shift`` raised to at least ``MIN_SHIFT``.

    Raises ValueError for a negative or non-finite shift (the API never sends one).
    """
    shift = float(shift)
    if not math.isfinite(shift) or shift < 0:
        raise ValueError(f"shift must be a finite number >= 0, got {shift!r}")
    return max(shift, MIN_SHIFT)


def time_shift(sigma: SigmaT, shift: float) -> SigmaT:
    """AuraFlow's time shift ``shift·σ / (1 + (shift − 1)·σ)`` for a float, tensor or array.

    Maps [0, 1] onto [0, 1] monotonically, fixing 0 and 1. ``shift`` below ``MIN_SHIFT``
    (including 0) is treated as ``MIN_SHIFT``, so the result is never NaN.
    """
    s = effective_shift(shift)
    if s == 1.0:  # ComfyUI's time_snr_shift short-circuits this too
        return sigma
    return s * sigma / (1 + (s - 1) * sigma)


def sigmas(scheduler: str, steps: int, shift: float, *, sampler: str | None = None) -> torch.Tensor:
    """The sigma schedule for ``steps`` steps: float32, shape (steps+1,), from the shifted
    maximum (1) down to exactly 0, non-increasing.

    ``sampler``, when given, applies ComfyUI's KSampler rule for the samplers in
    ``DISCARD_PENULTIMATE_SAMPLERS`` (one extra sigma computed, the penultimate dropped); the
    length stays steps+1. Raises ValueError for an unknown scheduler, steps < 1 or a bad shift.
    """
    make = _SCHEDULERS.get(scheduler)
    if make is None:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULER_NAMES}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    s = effective_shift(shift)
    discard = sampler in DISCARD_PENULTIMATE_SAMPLERS
    values = np.asarray(make(steps + 1 if discard else steps, s), dtype=np.float32)
    if discard:
        values = np.concatenate([values[:-2], values[-1:]])
    _check_schedule(values, scheduler, steps)
    return torch.from_numpy(values.copy())


def _check_schedule(values: np.ndarray, scheduler: str, steps: int) -> None:
    # A broken schedule silently ruins every image of a batch; fail loudly instead.
    problem = None
    if values.shape != (steps + 1,):
        problem = f"length {values.shape[0]}, expected {steps + 1}"
    elif not np.all(np.isfinite(values)):
        problem = "non-finite values"
    elif values[-1] != 0.0:
        problem = "does not end at 0"
    elif np.any(np.diff(values) > 0):
        problem = "not non-increasing"
    if problem is not None:
        raise RuntimeError(f"scheduler {scheduler!r} produced a bad schedule ({problem})")


# --- ComfyUI's ModelSamplingDiscreteFlow -----------------------------------------------------


@functools.lru_cache(maxsize=64)
def _table(shift: float) -> np.ndarray:
    """``shift(i/1000)`` for i = 1…1000, ascending, rounded once to float32 (read-only)."""
    t = np.arange(1, _TRAIN_STEPS + 1, dtype=np.float64) / _TRAIN_STEPS
    table = time_shift(t, shift).astype(np.float32)
    table.setflags(write=False)
    return table


def _sigma_min(shift: float) -> float:
    return float(_table(shift)[0])


def _sigma_max(shift: float) -> float:
    return float(_table(shift)[-1])


def _append_zero(values: ArrayLike) -> np.ndarray:
    return np.concatenate([np.asarray(values, dtype=np.float64), [0.0]])


# --- the schedulers ----------------------------------------------------------------------


def _normal(steps: int, shift: float) -> np.ndarray:
    """diffusers' FlowMatchEulerDiscreteScheduler(shift).set_timesteps(steps).sigmas, exactly."""
    # __init__: the training table in float32 torch; only its two ends are used later.
    ends = torch.tensor([float(_TRAIN_STEPS), 1.0], dtype=torch.float32) / _TRAIN_STEPS
    ends = shift * ends / (1 + (shift - 1) * ends)
    sigma_max, sigma_min = ends[0].item(), ends[1].item()
    # set_timesteps: float64 numpy, shifted a second time, rounded once to float32.
    timesteps = np.linspace(sigma_max * _TRAIN_STEPS, sigma_min * _TRAIN_STEPS, steps)
    s = timesteps / _TRAIN_STEPS
    s = shift * s / (1 + (shift - 1) * s)
    out = np.concatenate([s.astype(np.float32), np.zeros(1, dtype=np.float32)])
    if abs(float(out[0]) - 1.0) > _NORMAL_START_TOLERANCE:
        out[0] = 1.0
    return out


def _simple(steps: int, shift: float) -> np.ndarray:
    table = _table(shift)
    stride = len(table) / steps
    return _append_zero([table[-(1 + int(j * stride))] for j in range(steps)])


def _sgm_uniform(steps: int, shift: float) -> np.ndarray:
    start = _sigma_max(shift) * _TRAIN_STEPS  # ModelSamplingDiscreteFlow.timestep(σ) = 1000·σ
    end = _sigma_min(shift) * _TRAIN_STEPS
    timesteps = np.linspace(start, end, steps + 1)[:-1]
    return _append_zero(time_shift(timesteps / _TRAIN_STEPS, shift))


def _karras(steps: int, shift: float) -> np.ndarray:
    inv_min = _sigma_min(shift) ** (1 / _KARRAS_RHO)
    inv_max = _sigma_max(shift) ** (1 / _KARRAS_RHO)
    ramp = np.linspace(0.0, 1.0, steps)
    return _append_zero((inv_max + ramp * (inv_min - inv_max)) ** _KARRAS_RHO)


def _exponential(steps: int, shift: float) -> np.ndarray:
    log_sigmas = np.linspace(math.log(_sigma_max(shift)), math.log(_sigma_min(shift)), steps)
    return _append_zero(np.exp(log_sigmas))


def _ddim_uniform(steps: int, shift: float) -> np.ndarray:
    table = _table(shift)
    top, bottom = len(table) - 1, 1  # ComfyUI's DDIM grid starts at table index 1
    if steps == 1:
        return _append_zero([table[top]])
    span = top - bottom
    # round(j·span/(steps−1)) in exact integer arithmetic (half rounds up)
    indices = [top - (2 * j * span + (steps - 1)) // (2 * (steps - 1)) for j in range(steps)]
    return _append_zero(table[indices])


def _beta(steps: int, shift: float) -> np.ndarray:
    indices = _beta_indices(steps)
    if len(indices) == steps:
        return _append_zero(_table(shift)[list(indices)])
    # Past 138 steps rounding to the table repeats entries, and ComfyUI's de-duplication
    # would shorten the schedule. Use the same quantiles unrounded instead: table[i] is
    # shift((i + 1)/1000), so this is the table read between its entries.
    last = _TRAIN_STEPS - 1
    t = (np.asarray(_beta_quantiles(steps)) * last + 1) / _TRAIN_STEPS
    return _append_zero(time_shift(t, shift))


@functools.lru_cache(maxsize=128)
def _beta_quantiles(steps: int) -> tuple[float, ...]:
    """Beta(0.6, 0.6) quantiles at 1, 1 − 1/steps, …, 1/steps (ComfyUI's beta_scheduler)."""
    return tuple(_beta_ppf(1.0 - j / steps, _BETA_ALPHA, _BETA_BETA) for j in range(steps))


def _beta_indices(steps: int) -> tuple[int, ...]:
    """ComfyUI's table indices rint(quantile·999), consecutive repeats dropped as it does."""
    indices: list[int] = []
    for quantile in _beta_quantiles(steps):
        index = int(np.rint(quantile * (_TRAIN_STEPS - 1)))
        if not indices or index != indices[-1]:
            indices.append(index)
    return tuple(indices)


def _linear_quadratic(steps: int, shift: float) -> np.ndarray:
    # Mochi's schedule is defined on [0, 1] and scaled by sigma_max, so it ignores the shift
    # except through sigma_max (which is 1 for a flow model).
    if steps == 1:
        schedule = [1.0, 0.0]
    else:
        lin_steps = steps // 2
        quad_steps = steps - lin_steps
        noise = _LQ_THRESHOLD_NOISE
        linear = [i * noise / lin_steps for i in range(lin_steps)]
        step_diff = lin_steps - noise * steps
        quad_coef = step_diff / (lin_steps * quad_steps**2)
        lin_coef = noise / lin_steps - 2 * step_diff / quad_steps**2
        const = quad_coef * lin_steps**2
        quadratic = [quad_coef * i**2 + lin_coef * i + const for i in range(lin_steps, steps)]
        schedule = [1.0 - v for v in linear + quadratic + [1.0]]
    return np.asarray(schedule, dtype=np.float64) * _sigma_max(shift)


def _kl_optimal(steps: int, shift: float) -> np.ndarray:
    sigma_min, sigma_max = _sigma_min(shift), _sigma_max(shift)
    if steps == 1:
        return _append_zero([sigma_max])
    frac = np.arange(steps, dtype=np.float64) / (steps - 1)
    angles = frac * math.atan(sigma_min) + (1 - frac) * math.atan(sigma_max)
    return _append_zero(np.tan(angles))


_SCHEDULERS: dict[str, Callable[[int, float], np.ndarray]] = {
    "normal": _normal,
    "simple": _simple,
    "sgm_uniform": _sgm_uniform,
    "karras": _karras,
    "exponential": _exponential,
    "ddim_uniform": _ddim_uniform,
    "beta": _beta,
    "linear_quadratic": _linear_quadratic,
    "kl_optimal": _kl_optimal,
}


# --- the Beta distribution's quantile function (scipy.stats.beta.ppf without scipy) -------


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of the regularized incomplete beta function: Newton steps on the CDF, kept
    inside a shrinking bracket (bisecting whenever Newton would leave it)."""
    if q <= 0.0:
        return 0.0
    if q >= 1.0:
        return 1.0
    if a == b:
        # Symmetric: the median is exactly 1/2 (an even step count hits it, and ComfyUI then
        # rounds 499.5 half-to-even), and reflecting keeps both tails equally accurate.
        if q == 0.5:
            return 0.5
        if q > 0.5:
            return 1.0 - _beta_ppf(1.0 - q, a, b)
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    lo, hi, x = 0.0, 1.0, 0.5
    for _ in range(200):
        error = _beta_cdf(x, a, b) - q
        if error == 0.0:
            return x
        if error < 0:
            lo = x
        else:
            hi = x
        density = math.exp(log_norm + (a - 1) * math.log(x) + (b - 1) * math.log1p(-x))
        step = x - error / density
        x_next = step if lo < step < hi else 0.5 * (lo + hi)
        if x_next == x or abs(x_next - x) <= 1e-15 * x:
            return x_next
        x = x_next
    return x


def _beta_cdf(x: float, a: float, b: float) -> float:
    """Regularized incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = (
        math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    )
    # The continued fraction converges fast only left of the mode; use symmetry on the right.
    if x < (a + 1) / (a + b + 2):
        return math.exp(log_front) * _beta_continued_fraction(x, a, b) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(1.0 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b), evaluated with the modified Lentz method."""
    tiny, eps = 1e-300, 1e-16
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 500):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < eps:
            break
    return result
