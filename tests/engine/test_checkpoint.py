"""Sampler checkpoints: every sampler on every scheduler resumes bit for bit, through bytes.

The denoiser is a cheap deterministic nonlinear function of (x, σ) that mixes pixels, so
each sampler's history and noise really shape the result; float32 on the CPU, batch of two
rows with their own noise generators. The end-to-end checks through the pipeline are in
test_pipeline_checkpoint.py.
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load, save

from auraserve.engine.checkpoint import FORMAT_VERSION, Buffer, CheckpointMismatch, SamplerState
from auraserve.engine.checkpoint_format import read_header
from auraserve.engine.sampling import SAMPLER_NAMES, STOCHASTIC_SAMPLERS, NoiseSampler, sample
from auraserve.engine.schedules import SCHEDULER_NAMES
from auraserve.engine.schedules import sigmas as make_sigmas

STEPS = 5
SHAPE = (2, 4, 4, 4)
# Samplers whose next step reads more than x (what a checkpoint must carry besides latents).
WITH_HISTORY = ("lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m_sde", "uni_pc", "uni_pc_bh2")


def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.tanh(0.8 * x + sigma) * (1 - sigma) + 0.1 * x.roll(1, -1)


def noise() -> NoiseSampler:
    return NoiseSampler([torch.Generator().manual_seed(s) for s in (11, 12)], SHAPE)


def start() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def run(
    sampler: str, sigmas: torch.Tensor, resume: SamplerState | None = None
) -> tuple[torch.Tensor, list[bytes]]:
    """The result and the checkpoint bytes written at every step."""
    states: list[bytes] = []
    out = sample(
        sampler,
        denoiser,
        start(),
        sigmas,
        noise=noise(),
        on_state=lambda state: states.append(state.to_bytes()),
        resume_from=resume,
    )
    return out, states


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("sampler", SAMPLER_NAMES)
def test_resume_from_every_step_is_bit_identical(sampler: str, scheduler: str) -> None:
    sigmas = make_sigmas(scheduler, STEPS, 1.73, sampler=sampler)
    reference, states = run(sampler, sigmas)
    assert len(states) == len(sigmas) - 2  # every step but the last
    for k, data in enumerate(states, start=1):
        state = SamplerState.from_bytes(data)
        assert state.step == k
        resumed, later = run(sampler, sigmas, resume=state)
        assert torch.equal(resumed, reference), f"resumed after step {k}"
        # The resumed run's own checkpoints are the uninterrupted run's, byte for byte.
        assert later == states[k:]


def _zeroed(value: Buffer) -> Buffer:
    if isinstance(value, torch.Tensor):
        return torch.zeros_like(value)
    if value is None:
        return None
    return [torch.zeros_like(v) if isinstance(v, torch.Tensor) else v for v in value]


@pytest.mark.parametrize("sampler", WITH_HISTORY)
def test_history_is_what_makes_the_resume_exact(sampler: str) -> None:
    """Zeroing the history buffers changes the result (the test above can fail), and a
    checkpoint without them is refused, not guessed around."""
    sigmas = make_sigmas("normal", STEPS, 1.73)
    reference, states = run(sampler, sigmas)
    state = SamplerState.from_bytes(states[2])
    assert state.buffers
    zeroed = {name: _zeroed(value) for name, value in state.buffers.items()}
    resumed, _ = run(sampler, sigmas, resume=replace(state, buffers=zeroed))
    assert not torch.equal(resumed, reference)
    with pytest.raises(CheckpointMismatch, match="lacks"):
        run(sampler, sigmas, resume=replace(state, buffers={}))


@pytest.mark.parametrize("sampler", sorted(STOCHASTIC_SAMPLERS))
def test_noise_position_is_what_makes_a_stochastic_resume_exact(sampler: str) -> None:
    sigmas = make_sigmas("normal", STEPS, 1.73)
    reference, states = run(sampler, sigmas)
    state, earlier = SamplerState.from_bytes(states[1]), SamplerState.from_bytes(states[0])
    resumed, _ = run(sampler, sigmas, resume=replace(state, noise_state=earlier.noise_state))
    assert not torch.equal(resumed, reference)
    with pytest.raises(CheckpointMismatch, match="noise position"):
        run(sampler, sigmas, resume=replace(state, noise_state=None))


def test_header_says_what_the_checkpoint_is() -> None:
    sigmas = make_sigmas("karras", STEPS, 1.73)
    _, states = run("dpmpp_3m_sde", sigmas)
    state = SamplerState.from_bytes(states[2]).labelled(scheduler="karras", request_digest="d1")
    header = read_header(state.to_bytes())
    assert header["version"] == FORMAT_VERSION
    assert (header["sampler"], header["scheduler"], header["step"]) == ("dpmpp_3m_sde", "karras", 3)
    assert (header["total"], header["shape"], header["dtype"]) == (STEPS, list(SHAPE), "float32")
    assert header["sigmas"] == [float(s) for s in sigmas.tolist()]
    assert header["buffers"] == {"denoised": ["tensors", 2], "h": "floats"}
    assert header["request_digest"] == "d1"


def test_other_requests_versions_and_garbage_are_refused() -> None:
    sigmas = make_sigmas("normal", STEPS, 1.73)
    _, states = run("euler_ancestral", sigmas)
    data = SamplerState.from_bytes(states[0]).labelled(scheduler="normal", request_digest="a")
    raw = data.to_bytes()
    assert SamplerState.from_bytes(raw, request_digest="a").step == 1
    with pytest.raises(CheckpointMismatch, match="other request"):
        SamplerState.from_bytes(raw, request_digest="b")
    with pytest.raises(CheckpointMismatch, match="not an auraserve"):
        SamplerState.from_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(CheckpointMismatch, match="not an auraserve"):
        SamplerState.from_bytes(b"")
    meta = read_header(raw)
    meta["version"] = FORMAT_VERSION + 1
    future = save(load(raw), metadata={"auraserve.checkpoint": json.dumps(meta)})
    with pytest.raises(CheckpointMismatch, match="version"):
        SamplerState.from_bytes(future)


def test_a_state_resumes_only_its_own_run() -> None:
    sigmas = make_sigmas("normal", STEPS, 1.73)
    _, states = run("dpmpp_2m", sigmas)
    state = SamplerState.from_bytes(states[0])
    with pytest.raises(CheckpointMismatch, match="sampler"):
        run("lms", sigmas, resume=state)
    with pytest.raises(CheckpointMismatch, match="schedule"):
        run("dpmpp_2m", make_sigmas("karras", STEPS, 1.73), resume=state)
    with pytest.raises(CheckpointMismatch, match="latents"):
        sample(
            "dpmpp_2m", denoiser, torch.zeros(1, 4, 4, 4), sigmas, noise=noise(), resume_from=state
        )


def test_on_step_counts_only_the_steps_run_after_a_resume() -> None:
    sigmas = make_sigmas("normal", STEPS, 1.73)
    _, states = run("heun", sigmas)
    seen: list[tuple[int, int]] = []
    sample(
        "heun",
        denoiser,
        start(),
        sigmas,
        noise=noise(),
        on_step=lambda step, total: seen.append((step, total)),
        resume_from=SamplerState.from_bytes(states[1]),
    )
    assert seen == [(3, STEPS), (4, STEPS), (5, STEPS)]


def test_noise_state_needs_one_row_per_generator() -> None:
    sampler = noise()
    state = sampler.get_state()
    assert state.shape[0] == 2 and state.dtype == torch.uint8
    first = sampler.draw()
    sampler.set_state(state)
    assert torch.equal(sampler.draw(), first)
    with pytest.raises(ValueError, match="rows"):
        sampler.set_state(state[:1])


@pytest.mark.parametrize("sampler", ["dpmpp_3m_sde", "uni_pc", "lms", "dpm_2_ancestral"])
def test_rows_split_and_join_back_into_the_same_run(sampler: str) -> None:
    """A batch state split per request (one row each) and joined again resumes exactly; a row
    resumed alone equals its row of the batch (rows are independent)."""
    sigmas = make_sigmas("beta", STEPS, 1.73, sampler=sampler)
    reference, states = run(sampler, sigmas)
    state = SamplerState.from_bytes(states[1])
    first, second = (SamplerState.from_bytes(p.to_bytes()) for p in state.split([1, 1]))
    assert first.x.shape[0] == 1 and first.noise_state is not None
    resumed, _ = run(sampler, sigmas, resume=SamplerState.join([first, second]))
    assert torch.equal(resumed, reference)

    alone = sample(
        sampler,
        denoiser,
        start()[1:],
        sigmas,
        noise=NoiseSampler([torch.Generator().manual_seed(12)], (1, *SHAPE[1:])),
        resume_from=second,
    )
    assert torch.equal(alone, reference[1:])

    later = SamplerState.from_bytes(states[2]).split([1, 1])[1]
    with pytest.raises(CheckpointMismatch, match="same step"):
        SamplerState.join([first, later])
    with pytest.raises(ValueError, match="rows"):
        state.split([1, 2])
