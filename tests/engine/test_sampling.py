"""Samplers checked against mathematics: a data distribution whose flow is known exactly.

Data x0 ~ N(μ, s²) independently per dimension, noise n ~ N(0, 1), x_σ = σ·n + (1 − σ)·x0.
Then x_σ ~ N((1 − σ)μ, v(σ)) with v(σ) = (1 − σ)²s² + σ², Cov(x0, x_σ) = (1 − σ)s², and the
exact denoiser is the Gaussian posterior mean

    D(x, σ) = E[x0 | x_σ = x] = μ + (1 − σ)s²/v(σ) · (x − (1 − σ)μ).

The probability-flow ODE dx/dσ = (x − D(x, σ))/σ moves every point along its quantile of
the marginal, so from x(1) = z it is solved in closed form by

    x(σ) = (1 − σ)μ + √v(σ) · z,

which ends at μ + s·z: N(0, 1) noise is carried onto N(μ, s²) data. (Both facts are checked
below too, the first by Monte Carlo regression and the second against the ODE itself.)

Deterministic samplers must converge to x(σ_end) at their order; stochastic ones must land on
N(μ, s²) while actually using their fresh noise. Everything runs in float64 so that round-off
never limits a measured order.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from auraserve.core.samplers import SAMPLER_SPECS, SAMPLERS, SamplerSpec
from auraserve.engine import sampling
from auraserve.engine.sampling import (
    SAMPLER_NAMES,
    STOCHASTIC_SAMPLERS,
    NoiseSampler,
    sample,
    sampler_needs_noise,
)
from auraserve.engine.schedules import sigmas as make_sigmas

MU, S = 0.7, 0.5
DETERMINISTIC = [name for name in SAMPLERS if name not in STOCHASTIC_SAMPLERS]
STOCHASTIC = [name for name in SAMPLERS if name in STOCHASTIC_SAMPLERS]
UNIPC = ("uni_pc", "uni_pc_bh2")
UNIPC_FINAL_SIGMA = 0.001  # ComfyUI's UniPC stops here instead of at σ = 0


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """E[x0 | x_σ = x] for x0 ~ N(μ, s²)."""
    a = 1.0 - sigma
    return MU + a * S**2 / (a * a * S**2 + sigma**2) * (x - a * MU)


def exact_flow(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """The probability-flow ODE's solution at σ from x(1) = z."""
    a = 1.0 - sigma
    return a * MU + math.sqrt(a * a * S**2 + sigma**2) * z


class NoNoise(NoiseSampler):
    """A NoiseSampler that fails the test if a deterministic sampler draws from it."""

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        raise AssertionError("a deterministic sampler drew noise")


def no_noise(x: torch.Tensor) -> NoiseSampler:
    return NoNoise([torch.Generator() for _ in range(x.shape[0])], x.shape, dtype=x.dtype)


def seeded(seeds: list[int], row_shape: tuple[int, ...], dtype=torch.float64) -> NoiseSampler:
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return NoiseSampler(generators, (len(seeds), *row_shape), dtype=dtype)


@pytest.fixture(scope="module")
def z() -> torch.Tensor:
    """Starting noise x(1), float64."""
    return torch.randn(4, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def run_ode(name: str, sigmas: torch.Tensor, z: torch.Tensor) -> float:
    """Max error against the exact flow at the sigma the sampler really ends on."""
    start = float(sigmas[0])
    x = sample(name, gaussian_denoiser, exact_flow(z, start), sigmas, noise=no_noise(z))
    end = float(sigmas[-1])
    if end == 0.0 and name in UNIPC:
        end = UNIPC_FINAL_SIGMA
    return (x - exact_flow(z, end)).abs().max().item()


def orders(errors: list[float]) -> list[float]:
    """Empirical orders from errors at N, 2N, 4N, … steps."""
    return [math.log2(a / b) for a, b in itertools.pairwise(errors)]


# --- the test problem itself -------------------------------------------------------------


def test_denoiser_is_the_posterior_mean() -> None:
    # Least squares of x0 on x_σ over many draws recovers E[x0 | x_σ], which is affine here.
    g = torch.Generator().manual_seed(1)
    n = 400_000
    x0 = MU + S * torch.randn(n, generator=g, dtype=torch.float64)
    noise = torch.randn(n, generator=g, dtype=torch.float64)
    for sigma in (0.2, 0.5, 0.9):
        x = sigma * noise + (1 - sigma) * x0
        slope = torch.cov(torch.stack([x, x0]))[0, 1] / x.var()
        intercept = x0.mean() - slope * x.mean()
        probe = torch.tensor([0.0, 1.0], dtype=torch.float64)
        predicted = gaussian_denoiser(probe, sigma)
        assert predicted[1] - predicted[0] == pytest.approx(slope.item(), abs=0.01)
        assert predicted[0] == pytest.approx(intercept.item(), abs=0.01)


def test_exact_flow_solves_the_probability_flow_ode(z: torch.Tensor) -> None:
    for sigma in (0.05, 0.3, 0.6, 0.95):
        eps = 1e-6
        dx = (exact_flow(z, sigma + eps) - exact_flow(z, sigma - eps)) / (2 * eps)
        x = exact_flow(z, sigma)
        velocity = (x - gaussian_denoiser(x, sigma)) / sigma
        torch.testing.assert_close(dx, velocity, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(exact_flow(z, 1.0), z)
    torch.testing.assert_close(exact_flow(z, 0.0), MU + S * z)


# --- deterministic samplers: convergence to the exact flow at their order ---------------

# Measured on a uniform grid (ComfyUI's `simple` schedule at shift 1, exact for 1000/N steps)
# stopped at σ = 0.1, so no step jumps to σ = 0 (that special step is tested separately).
# lms and uni_pc are only second order here: ComfyUI starts lms with an Euler step and ends
# uni_pc with a first-order step without corrector, and a single step of local error O(h²)
# caps the global order at 2. Their higher-order cores are measured in the next test.
EXPECTED_ORDER = {
    "euler": (0.9, 1.1),
    "ddim": (0.9, 1.1),
    "heun": (1.9, 2.1),
    "dpm_2": (1.9, 2.1),
    "dpmpp_2m": (1.9, 2.1),
    "lms": (1.85, 2.1),
    "uni_pc": (1.85, 2.1),
    "uni_pc_bh2": (1.85, 2.1),
}


def truncated_simple(steps: int, sigma_end: float = 0.1) -> torch.Tensor:
    s = make_sigmas("simple", steps, 1.0).double()
    return s[s >= sigma_end - 1e-6]


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_converges_at_its_order(name: str, z: torch.Tensor) -> None:
    errors = [run_ode(name, truncated_simple(n), z) for n in (50, 100, 200)]
    low, high = EXPECTED_ORDER[name]
    for order in orders(errors):
        assert low <= order <= high, (errors, orders(errors))


def grid(body_steps: int, head: int, tail: bool, delta: float, end: float = 0.1) -> torch.Tensor:
    """A uniform grid from ~1 to ~end with `head` steps of size δ first and, if `tail`, one
    step of size δ last, so that the startup / final low-order steps contribute O(δ²)."""
    top, bottom = 1.0 - head * delta, end + (delta if tail else 0.0)
    body = torch.linspace(top, bottom, body_steps + 1, dtype=torch.float64).tolist()
    return torch.tensor(
        [1.0 - k * delta for k in range(head)] + body + ([end] if tail else []),
        dtype=torch.float64,
    )


@pytest.mark.parametrize(
    ("name", "head", "tail", "levels", "low"),
    [
        # 4th-order Adams–Bashforth once its Euler/AB2/AB3 start-up steps are tiny;
        # measured 4.01, 4.01
        ("lms", 3, False, (20, 40, 80), 3.8),
        # UniP-3 + UniC (order 4) once its first step and its first-order, corrector-less
        # last step are tiny; measured 3.76, 3.89 (bh1) and 3.88, 3.94 (bh2)
        ("uni_pc", 1, True, (320, 640, 1280), 3.6),
        ("uni_pc_bh2", 1, True, (320, 640, 1280), 3.6),
    ],
)
def test_higher_order_cores(
    name: str, head: int, tail: bool, levels: tuple[int, ...], low: float, z: torch.Tensor
) -> None:
    delta = 1e-5 if name == "lms" else 1e-9
    errors = [run_ode(name, grid(n, head, tail, delta), z) for n in levels]
    assert all(order >= low for order in orders(errors)), (errors, orders(errors))


@pytest.mark.parametrize("name", SAMPLERS)
def test_step_into_zero_lands_on_the_denoiser(name: str, z: torch.Tensor) -> None:
    # The step to σ = 0 is special in every sampler: Euler / x ← x0, never a division by 0.
    sigma = 0.6
    x = exact_flow(z, sigma)
    two_sigmas = torch.tensor([sigma, 0.0], dtype=torch.float64)
    out = sample(name, gaussian_denoiser, x, two_sigmas, noise=seeded([1] * 4, (32,)))
    expected = gaussian_denoiser(x, sigma)
    if name in UNIPC:  # one first-order UniPC step, to ComfyUI's σ = 0.001
        ratio = UNIPC_FINAL_SIGMA / sigma
        expected = ratio * x + (1 - ratio) * expected
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_full_schedule_to_zero_converges(name: str, z: torch.Tensor) -> None:
    # Ending at σ = 0, the last step is a first-order jump (and log-σ samplers keep step
    # ratios like 2, 3/2 near 0 at any N), so only an averaged order over 8× refinement is
    # asserted: ≥ 0.9 for first-order samplers, ≥ 1.5 for the rest.
    errors = [run_ode(name, make_sigmas("simple", n, 1.0).double(), z) for n in (25, 200)]
    averaged = math.log2(errors[0] / errors[1]) / 3
    assert averaged >= (0.9 if name in ("euler", "ddim") else 1.5), errors
    assert errors[1] <= (0.02 if name in ("euler", "ddim") else 1e-3), errors


def test_euler_is_diffusers_flow_match_euler() -> None:
    # x + (σ' − σ)·(x − x0)/σ is FlowMatchEulerDiscreteScheduler.step's x + (σ' − σ)·v.
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.73)
    scheduler.set_timesteps(12)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = x.clone()
    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])
        velocity = (reference - gaussian_denoiser(reference, sigma)) / sigma
        reference = scheduler.step(velocity, t, reference).prev_sample
    ours = sample("euler", gaussian_denoiser, x, make_sigmas("normal", 12, 1.73), noise=no_noise(x))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6)


def test_ddim_is_euler(z: torch.Tensor) -> None:
    s = make_sigmas("karras", 9, 1.73)
    a = sample("ddim", gaussian_denoiser, z, s, noise=no_noise(z))
    b = sample("euler", gaussian_denoiser, z, s, noise=no_noise(z))
    assert torch.equal(a, b)


# --- stochastic samplers: the right distribution, from fresh noise ------------------------


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_sampler_hits_the_data_distribution(name: str) -> None:
    # 20 rows × 1000 independent dimensions = 20 000 samples: the sample mean's standard
    # error is s/√n ≈ 0.0035 and the sample variance's s²·√(2/n) ≈ 0.0025. 500 steps of
    # AuraFlow's default schedule (normal, shift 1.73) keep the discretization bias below
    # 0.005 (euler_ancestral, the largest, is first order in the variance). Tolerances: 0.02
    # on both, over 5 standard errors beyond that bias.
    noise = seeded(list(range(100, 120)), (1000,), dtype=torch.float32)
    start = noise.draw()
    s = make_sigmas("normal", 500, 1.73)
    x = sample(name, gaussian_denoiser, start * float(s[0]), s, noise=noise)
    assert abs(x.mean().item() - MU) <= 0.02
    assert abs(x.var().item() - S**2) <= 0.02
    # The ODE maps the start noise onto the data monotonically (correlation 1); a sampler
    # that really injects fresh noise forgets its start (measured |corr| < 0.02).
    corr = torch.corrcoef(torch.stack([start.flatten(), x.flatten()]))[0, 1].item()
    assert abs(corr) < 0.2


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_variance_bias_shrinks_with_steps(name: str) -> None:
    noise_args = (list(range(200, 220)), (1000,))
    errors = []
    for steps in (10, 500):
        noise = seeded(*noise_args)
        s = make_sigmas("simple", steps, 1.0)
        x = sample(name, gaussian_denoiser, noise.draw() * float(s[0]), s, noise=noise)
        errors.append(abs(x.var().item() - S**2))
    assert errors[1] < errors[0] or errors[1] < 0.005, errors


# --- noise: seeds, batches, draws ----------------------------------------------------------


def test_noise_sampler_is_reproducible_per_seed() -> None:
    a, b = seeded([5, 6], (3, 4)), seeded([5, 6], (3, 4))
    for _ in range(3):
        assert torch.equal(a(0.5, 0.4), b(0.5, 0.4))
    c = seeded([5, 7], (3, 4))
    first, other = seeded([5, 6], (3, 4)).draw(), c.draw()
    assert torch.equal(first[0], other[0]) and not torch.equal(first[1], other[1])


def test_noise_is_drawn_in_float32_on_cpu_then_cast() -> None:
    wide = seeded([9], (16,), dtype=torch.float64).draw()
    narrow = torch.randn(16, generator=torch.Generator().manual_seed(9), dtype=torch.float32)
    assert wide.dtype == torch.float64
    assert torch.equal(wide[0], narrow.double())


def test_noise_sampler_like_and_select() -> None:
    x = torch.zeros(3, 2, 5, dtype=torch.float64)
    generators = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    noise = NoiseSampler.like(generators, x)
    assert noise.shape == (3, 2, 5) and noise.draw().dtype == torch.float64
    kept = noise.select([0, 2])
    reference = seeded([1, 3], (2, 5))
    reference.draw()  # `noise` already drew once from those generators
    assert torch.equal(kept.draw(), reference.draw())


def test_noise_sampler_rejects_a_wrong_generator_count() -> None:
    with pytest.raises(ValueError, match="one generator per row"):
        NoiseSampler([torch.Generator()], (2, 4))


@pytest.mark.parametrize("name", SAMPLERS)
def test_an_image_does_not_depend_on_its_batch(name: str) -> None:
    seeds, row = [11, 12, 13, 14], (4, 8, 8)
    s = make_sigmas("normal", 6, 1.73, sampler=name)

    def run(batch_seeds: list[int]) -> torch.Tensor:
        noise = seeded(batch_seeds, row, dtype=torch.float32)
        return sample(name, gaussian_denoiser, noise.draw() * float(s[0]), s, noise=noise)

    batch = run(seeds)
    for i, seed in enumerate(seeds):
        assert torch.equal(run([seed])[0], batch[i]), (name, i)
    assert torch.equal(run(seeds), batch)  # and the same seeds give the same images


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_draw_no_noise(name: str, z: torch.Tensor) -> None:
    sample(name, gaussian_denoiser, z, make_sigmas("beta", 7, 1.73), noise=no_noise(z))


def test_sampler_needs_noise() -> None:
    assert SAMPLER_NAMES == SAMPLERS
    assert {n for n in SAMPLERS if sampler_needs_noise(n)} == {
        "euler_ancestral",
        "dpm_2_ancestral",
        "dpmpp_2s_ancestral",
        "dpmpp_sde",
        "dpmpp_2m_sde",
        "dpmpp_3m_sde",
    }
    with pytest.raises(ValueError, match="unknown sampler"):
        sampler_needs_noise("euler_a")


# --- the records in core.samplers say what the implementations do ---------------------------


def test_every_record_has_an_implementation_and_every_implementation_a_record() -> None:
    assert sorted(sampling._SAMPLERS) == sorted(spec.name for spec in SAMPLER_SPECS)


class CountingNoise(NoiseSampler):
    draws = 0

    def draw(self) -> torch.Tensor:
        self.draws += 1
        return super().draw()


@pytest.mark.parametrize("spec", SAMPLER_SPECS, ids=lambda spec: spec.name)
@pytest.mark.parametrize("steps", [1, 2, 7])
def test_the_record_matches_what_the_sampler_does(spec: SamplerSpec, steps: int) -> None:
    calls = 0

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return gaussian_denoiser(x, sigma)

    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(3))
    noise = CountingNoise([torch.Generator().manual_seed(i) for i in (1, 2)], x.shape)
    s = make_sigmas("normal", steps, 1.73, sampler=spec.name)
    sample(spec.name, denoise, x, s, noise=noise)
    # A step makes model_calls_per_step calls; the last one, down to σ = 0, may save some.
    most = steps * spec.model_calls_per_step
    assert most - (spec.model_calls_per_step - 1) <= calls <= most, calls
    if steps > 1:  # a single step lands on σ = 0, where no sampler adds noise
        assert (noise.draws > 0) == spec.stochastic, noise.draws
    else:
        assert noise.draws == 0 or spec.stochastic


# --- the calling contract -------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_on_step_reports_every_step(name: str) -> None:
    calls: list[tuple[int, int]] = []
    sigmas_seen: list[float] = []
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(4))

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        assert type(sigma) is float
        sigmas_seen.append(sigma)
        return gaussian_denoiser(x, sigma)

    s = make_sigmas("normal", 5, 1.73)
    noise = seeded([1, 2], (16,), dtype=torch.float32)
    sample(name, denoise, x, s, noise=noise, on_step=lambda i, n: calls.append((i, n)))
    assert calls == [(i, 5) for i in range(1, 6)]
    assert all(0.0 < sigma <= 1.0 for sigma in sigmas_seen)


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "uni_pc", "dpmpp_sde"])
def test_on_step_can_abort(name: str) -> None:
    evaluations = 0

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        nonlocal evaluations
        evaluations += 1
        return gaussian_denoiser(x, sigma)

    def stop_after_two(step: int, total: int) -> None:
        if step == 2:
            raise KeyboardInterrupt("cancelled")

    x = torch.zeros(1, 4)
    s = make_sigmas("simple", 10, 1.0)
    noise = seeded([1], (4,), torch.float32)
    with pytest.raises(KeyboardInterrupt):
        sample(name, denoise, x, s, noise=noise, on_step=stop_after_two)
    assert evaluations <= 6  # two steps' worth, not ten


def test_half_precision_latents_are_sampled_in_float32() -> None:
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    dtypes: list[torch.dtype] = []

    def denoise(x: torch.Tensor, sigma: float) -> torch.Tensor:
        dtypes.append(x.dtype)
        return gaussian_denoiser(x, sigma).to(torch.bfloat16)  # a model may answer in bf16

    out = sample("heun", denoise, x, make_sigmas("normal", 4, 1.73), noise=no_noise(x))
    assert out.dtype == torch.float32
    assert set(dtypes) == {torch.float32}


@pytest.mark.parametrize(
    ("sigmas", "error"),
    [
        (torch.tensor([[1.0, 0.0]]), "1-D"),
        (torch.tensor([]), "1-D"),
        (torch.tensor([1.0, float("nan"), 0.0]), "finite"),
        (torch.tensor([1.5, 0.5, 0.0]), "within"),
        (torch.tensor([0.5, 0.7, 0.0]), "non-increasing"),
        (torch.tensor([1.0, 0.0, 0.0]), "only the last"),
    ],
)
def test_rejects_bad_sigmas(sigmas: torch.Tensor, error: str) -> None:
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=error):
        sample("euler", gaussian_denoiser, x, sigmas, noise=no_noise(x))


def test_rejects_unknown_sampler_and_wrong_denoiser_shape() -> None:
    x = torch.zeros(1, 2)
    s = make_sigmas("normal", 2, 1.0)
    with pytest.raises(ValueError, match="unknown sampler"):
        sample("euler_a", gaussian_denoiser, x, s, noise=no_noise(x))
    with pytest.raises(ValueError, match="shape"):
        sample("euler", lambda x, sigma: x[:, :1], x, s, noise=no_noise(x))


def test_single_sigma_is_no_step() -> None:
    x = torch.ones(1, 3)
    calls: list[tuple[int, int]] = []
    out = sample(
        "euler",
        gaussian_denoiser,
        x,
        torch.tensor([0.5]),
        noise=no_noise(x),
        on_step=lambda *a: calls.append(a),
    )
    assert torch.equal(out, x) and calls == []
