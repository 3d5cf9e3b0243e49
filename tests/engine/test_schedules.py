"""Sigma schedules checked against the formulas they implement, not against snapshots.

The reference values below are computed here, in plain Python from each scheduler's
definition (ComfyUI's ``ModelSamplingDiscreteFlow`` table ``shift((i + 1)/1000)``, its
sigma_min = shift(0.001) and sigma_max = 1), or written out by hand where the numbers are
clean. ``normal`` is additionally held to diffusers' FlowMatchEulerDiscreteScheduler, bit for bit.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from auraserve.core.samplers import SAMPLERS, SCHEDULERS, sampler_spec
from auraserve.engine import schedules
from auraserve.engine.schedules import MIN_SHIFT, SCHEDULER_NAMES, sigmas, time_shift

CONTRACT_STEPS = (1, 2, 3, 7, 10, 28, 100, 200)
CONTRACT_SHIFTS = (0.0, 0.001, 0.1, 0.5, 1.0, 1.116, 1.73, 3.0, 10.0)
# diffusers' float32 sigma_max is 1 ± an ulp or two for some shifts (1.116 gives 1 + 2⁻²³)
NORMAL_START_TOLERANCE = 2.5e-7


def shifted(t: float, shift: float) -> float:
    """The time shift, written independently of the module under test."""
    return shift * t / (1 + (shift - 1) * t)


def table(i: int, shift: float) -> float:
    """Entry i (0-based) of ComfyUI's 1000-entry flow sigma table."""
    return shifted((i + 1) / 1000, shift)


def with_zero(values: list[float]) -> list[float]:
    return [*values, 0.0]


def linspace(a: float, b: float, n: int) -> list[float]:
    return [a] if n == 1 else [a + (b - a) * k / (n - 1) for k in range(n)]


def assert_schedule(actual: torch.Tensor, expected: list[float], rtol: float = 1e-6) -> None:
    assert actual.dtype == torch.float32
    assert actual.shape == (len(expected),)
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=rtol, atol=1e-9)


# --- the contract every schedule keeps ---------------------------------------------------


def test_names_are_the_api_names() -> None:
    assert SCHEDULER_NAMES == SCHEDULERS
    assert set(schedules._SCHEDULERS) == set(SCHEDULERS)


@pytest.mark.parametrize("shift", CONTRACT_SHIFTS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_contract(scheduler: str, shift: float) -> None:
    for steps in CONTRACT_STEPS:
        s = sigmas(scheduler, steps, shift)
        label = f"{scheduler} steps={steps} shift={shift}"
        assert s.dtype == torch.float32, label
        assert s.shape == (steps + 1,), label
        assert torch.isfinite(s).all(), label
        assert s[-1].item() == 0.0, label
        assert (s[:-1] > 0).all(), label  # only the final sigma is 0: no zero-length tail
        assert (s[1:] <= s[:-1]).all(), label
        # the shifted maximum is time_shift(1) = 1 for every shift
        if scheduler == "normal":
            assert abs(s[0].item() - 1.0) <= NORMAL_START_TOLERANCE, label
        else:
            assert s[0].item() == 1.0, label


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_comfyui_discard_penultimate_rule(sampler: str) -> None:
    plain_next = sigmas("karras", 11, 1.73)
    with_rule = sigmas("karras", 10, 1.73, sampler=sampler)
    if sampler_spec(sampler).discard_penultimate_sigma:
        expected = torch.cat([plain_next[:-2], plain_next[-1:]])
    else:
        expected = sigmas("karras", 10, 1.73)
    assert torch.equal(with_rule, expected)
    assert with_rule.shape == (11,)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("nope", 10, 1.0), "unknown scheduler"),
        (("normal", 0, 1.0), "steps"),
        (("normal", 2.5, 1.0), "steps"),
        (("normal", 10, -0.1), "shift"),
        (("normal", 10, math.nan), "shift"),
        (("normal", 10, math.inf), "shift"),
    ],
)
def test_rejects_bad_arguments(args: tuple, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        sigmas(*args)


# --- time_shift -------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [0.001, 0.5, 1.0, 1.73, 3.0, 10.0])
def test_time_shift_formula_and_endpoints(shift: float) -> None:
    for t in (0.0, 0.001, 0.25, 0.5, 0.9, 1.0):
        assert time_shift(t, shift) == pytest.approx(shifted(t, shift), rel=1e-12, abs=0)
    assert time_shift(0.0, shift) == 0.0
    assert time_shift(1.0, shift) == pytest.approx(1.0, rel=1e-15)
    grid = torch.linspace(0, 1, 1001, dtype=torch.float64)
    out = time_shift(grid, shift)
    assert isinstance(out, torch.Tensor)
    assert (out[1:] > out[:-1]).all()
    assert isinstance(time_shift(grid.numpy(), shift), np.ndarray)


def test_time_shift_at_zero_is_the_minimum_shift_not_nan() -> None:
    # shift·σ/(1 + (shift − 1)·σ) is 0/0 at σ = 1 when shift = 0
    grid = torch.linspace(0, 1, 101, dtype=torch.float64)
    out = time_shift(grid, 0.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out, time_shift(grid, MIN_SHIFT))
    assert out[-1].item() == pytest.approx(1.0)
    assert out[50].item() == pytest.approx(shifted(0.5, MIN_SHIFT))  # ≈ 0.001: the limit's 0


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_shift_zero_is_the_minimum_shift(scheduler: str) -> None:
    s = sigmas(scheduler, 20, 0.0)
    assert torch.equal(s, sigmas(scheduler, 20, MIN_SHIFT))
    if scheduler in ("normal", "simple", "sgm_uniform", "ddim_uniform", "beta"):
        # these shift every step: nearly all the denoising happens in the first one
        assert s[1].item() < 0.1
    elif scheduler in ("karras", "exponential", "kl_optimal"):
        # these see the shift only through sigma_min = shift(0.001)
        assert s[-2].item() == pytest.approx(shifted(0.001, MIN_SHIFT), rel=1e-6)


# --- each scheduler against its formula --------------------------------------------------


def test_normal_formula() -> None:
    # shift(linspace(1000·σmax, 1000·σmin, n)/1000) with σmin = shift(0.001): shifted twice
    assert_schedule(sigmas("normal", 4, 1.0), [1.0, 0.667, 0.334, 0.001, 0.0])
    end = shifted(0.001, 3.0)
    expected = [shifted(t, 3.0) for t in linspace(1.0, end, 5)]
    assert_schedule(sigmas("normal", 5, 3.0), with_zero(expected))


@pytest.mark.parametrize("steps", [1, 2, 4, 20, 25, 28, 50, 100])
@pytest.mark.parametrize("shift", [0.5, 1.0, 1.116, 1.5, 1.73, 2.0, 3.0, 6.0, 10.0])
def test_normal_is_diffusers_bit_for_bit(steps: int, shift: float) -> None:
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)  # AuraFlow's scheduler config
    reference.set_timesteps(steps)
    ours = sigmas("normal", steps, shift)
    assert ours.dtype == reference.sigmas.dtype == torch.float32
    assert torch.equal(ours, reference.sigmas)


@pytest.mark.parametrize("shift", [0.01, 0.1, 0.3])
def test_normal_small_shift_pins_diffusers_start_to_one(shift: float) -> None:
    # Below shift 0.5 diffusers' first sigma drifts off 1 by amplified float32 round-off
    # (1.0000954 at shift 0.01); the rest of the schedule is still diffusers' exactly.
    reference = FlowMatchEulerDiscreteScheduler(shift=shift)
    reference.set_timesteps(20)
    ours = sigmas("normal", 20, shift)
    assert ours[0].item() == 1.0
    assert torch.equal(ours[1:], reference.sigmas[1:])


def test_simple_formula() -> None:
    # every (1000/steps)-th table entry from the top: table[999 − int(j·1000/steps)]
    assert_schedule(sigmas("simple", 4, 1.0), [1.0, 0.75, 0.5, 0.25, 0.0])
    assert_schedule(sigmas("simple", 4, 3.0), [1.0, 0.9, 0.75, 0.5, 0.0])
    assert_schedule(sigmas("simple", 3, 1.0), [1.0, 0.667, 0.334, 0.0])


def test_sgm_uniform_formula() -> None:
    # linspace over steps+1 points, the last (sigma_min) dropped, then 0
    assert_schedule(sigmas("sgm_uniform", 4, 1.0), [1.0, 0.75025, 0.5005, 0.25075, 0.0])
    end = shifted(0.001, 1.73)
    expected = [shifted(t, 1.73) for t in linspace(1.0, end, 7)[:-1]]
    assert_schedule(sigmas("sgm_uniform", 6, 1.73), with_zero(expected))


@pytest.mark.parametrize(("steps", "shift"), [(4, 1.0), (6, 1.73), (10, 3.0)])
def test_karras_formula(steps: int, shift: float) -> None:
    rho, lo = 7.0, table(0, shift) ** (1 / 7)
    ramp = linspace(0.0, 1.0, steps)
    expected = [(1 + r * (lo - 1)) ** rho for r in ramp]
    assert_schedule(sigmas("karras", steps, shift), with_zero(expected))


def test_exponential_formula() -> None:
    # log-uniform from sigma_max = 1 to sigma_min = shift(0.001)
    assert_schedule(sigmas("exponential", 4, 1.0), [1.0, 0.1, 0.01, 0.001, 0.0])
    lo = shifted(0.001, 3.0)
    assert_schedule(sigmas("exponential", 3, 3.0), [1.0, math.sqrt(lo), lo, 0.0])


def test_ddim_uniform_grid() -> None:
    # table indices 999 − round(j·998/(steps − 1)): from the top entry down to ComfyUI's
    # lowest DDIM entry, index 1 (= shift(0.002))
    assert_schedule(sigmas("ddim_uniform", 4, 1.0), [1.0, 0.667, 0.335, 0.002, 0.0])
    assert_schedule(sigmas("ddim_uniform", 1, 1.0), [1.0, 0.0])
    indices = [999 - round(j * 998 / 9) for j in range(10)]
    expected = [table(i, 3.0) for i in indices]
    assert_schedule(sigmas("ddim_uniform", 10, 3.0), with_zero(expected))


@pytest.mark.parametrize(("steps", "shift"), [(4, 1.0), (10, 1.73), (25, 3.0)])
def test_beta_formula(steps: int, shift: float) -> None:
    # table[rint(ppf(1 − j/steps; 0.6, 0.6)·999)], here with scipy's Beta quantiles
    quantiles = scipy.stats.beta.ppf(1 - np.arange(steps) / steps, 0.6, 0.6)
    expected = [table(int(i), shift) for i in np.rint(quantiles * 999)]
    assert_schedule(sigmas("beta", steps, shift), with_zero(expected))


def test_beta_matches_scipy_indices_for_every_api_step_count() -> None:
    # ComfyUI drops repeated indices; for 1…100 steps there are none, so nothing is dropped
    for steps in range(1, 101):
        quantiles = scipy.stats.beta.ppf(1 - np.arange(steps) / steps, 0.6, 0.6)
        expected = [int(i) for i in np.rint(quantiles * 999)]
        assert list(schedules._beta_indices(steps)) == expected, steps
        assert len(set(expected)) == steps


def test_beta_past_table_resolution_reads_between_entries() -> None:
    steps = 200  # rounding to the table would repeat entries here
    quantiles = scipy.stats.beta.ppf(1 - np.arange(steps) / steps, 0.6, 0.6)
    expected = [shifted((q * 999 + 1) / 1000, 1.73) for q in quantiles]
    assert_schedule(sigmas("beta", steps, 1.73), with_zero(expected))


@pytest.mark.parametrize("shift", [1.0, 1.73, 10.0])
def test_linear_quadratic_formula(shift: float) -> None:
    # Mochi: steps//2 linear steps to 0.025 then a quadratic to 1, reversed; shift-free
    assert_schedule(sigmas("linear_quadratic", 1, shift), [1.0, 0.0])
    assert_schedule(sigmas("linear_quadratic", 2, shift), [1.0, 0.975, 0.0])
    assert_schedule(sigmas("linear_quadratic", 3, shift), [1.0, 0.975, 0.71875, 0.0])
    assert_schedule(sigmas("linear_quadratic", 4, shift), [1.0, 0.9875, 0.975, 0.725, 0.0])


@pytest.mark.parametrize(("steps", "shift"), [(4, 1.0), (8, 1.73)])
def test_kl_optimal_formula(steps: int, shift: float) -> None:
    lo = table(0, shift)
    fractions = [j / (steps - 1) for j in range(steps)]
    expected = [math.tan(f * math.atan(lo) + (1 - f) * math.atan(1.0)) for f in fractions]
    assert_schedule(sigmas("kl_optimal", steps, shift), with_zero(expected))
    assert_schedule(sigmas("kl_optimal", 1, shift), [1.0, 0.0])  # ComfyUI: 0/0 here
