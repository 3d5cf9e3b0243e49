"""A sampler's state at a step boundary, and its byte form for the media store.

A `SamplerState` holds everything `engine.sampling.sample` needs to go on after step ``step``
as if it had never stopped: the latents, the sampler's history buffers (dpmpp_2m's last
denoised, lms's derivatives, the multistep SDE samplers' (denoised, h) pairs, UniPC's
(σ, denoised) list) and where every row's noise generator stands. Resuming from it is bit
for bit the uninterrupted run (tests/engine/test_checkpoint.py).

Bytes: a safetensors file. Tensors are stored exactly (latents and buffers in their own
dtype, float lists as float64, generator states as uint8); the safetensors metadata carries
one JSON header under ``auraserve.checkpoint``: format version, sampler, scheduler, step,
total steps, the schedule (its float values round-trip exactly through JSON), latent shape
and dtype, each buffer's kind, and the digest of the request parameters that produced it,
so a checkpoint of another request, model schedule or sampler is refused, never mixed in.
The header and the digest live in the torch-free `engine.checkpoint_format`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from auraserve.engine.checkpoint_format import (
    FORMAT_VERSION,
    HEADER_KEY,
    CheckpointMismatch,
    read_header,
)

#: A history buffer: one tensor (or None before it exists), a list of tensors, or of floats.
Buffer = torch.Tensor | list[torch.Tensor] | list[float] | None


@dataclass(frozen=True)
class SamplerState:
    """Sampling state after ``step`` finished steps (1 ≤ step < total).

    ``sigmas`` is the schedule the sampler was given (before any sampler-internal change such
    as the SDE samplers' first-σ offset). ``noise_state`` stacks each row's CPU generator
    state (rows × n uint8), None when the run had no generators to save. ``scheduler`` and
    ``request_digest`` are the caller's labels; `engine.sampling` leaves them empty.
    """

    sampler: str
    step: int
    sigmas: tuple[float, ...]
    x: torch.Tensor
    buffers: Mapping[str, Buffer] = field(default_factory=dict)
    noise_state: torch.Tensor | None = None
    scheduler: str = ""
    request_digest: str = ""

    @property
    def total(self) -> int:
        return len(self.sigmas) - 1

    def labelled(self, *, scheduler: str, request_digest: str) -> SamplerState:
        return replace(self, scheduler=scheduler, request_digest=request_digest)

    # -- bytes ---------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        tensors: dict[str, torch.Tensor] = {"x": self.x.detach().cpu().contiguous()}
        kinds: dict[str, Any] = {}
        for name, value in self.buffers.items():
            if value is None:
                kinds[name] = "none"
            elif isinstance(value, torch.Tensor):
                kinds[name] = "tensor"
                tensors[f"buffer.{name}"] = value.detach().cpu().contiguous()
            elif all(isinstance(item, torch.Tensor) for item in value):
                kinds[name] = ["tensors", len(value)]
                for k, item in enumerate(value):
                    assert isinstance(item, torch.Tensor)
                    tensors[f"buffer.{name}.{k}"] = item.detach().cpu().contiguous()
            else:
                kinds[name] = "floats"
                tensors[f"buffer.{name}"] = torch.tensor(
                    [float(v) for v in value], dtype=torch.float64
                )
        if self.noise_state is not None:
            tensors["noise_state"] = self.noise_state.detach().cpu().contiguous()
        header = {
            "version": FORMAT_VERSION,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "step": self.step,
            "total": self.total,
            "sigmas": list(self.sigmas),
            "shape": list(self.x.shape),
            "dtype": str(self.x.dtype).removeprefix("torch."),
            "buffers": kinds,
            "request_digest": self.request_digest,
        }
        data: bytes = save_tensors(tensors, metadata={HEADER_KEY: json.dumps(header)})
        return data

    @classmethod
    def from_bytes(cls, data: bytes, *, request_digest: str | None = None) -> SamplerState:
        """Parse a checkpoint; with ``request_digest``, refuse one made for other parameters."""
        header = read_header(data)
        if header.get("version") != FORMAT_VERSION:
            raise CheckpointMismatch(
                f"checkpoint format version {header.get('version')!r}, "
                f"this engine reads {FORMAT_VERSION}"
            )
        if request_digest is not None and header.get("request_digest") != request_digest:
            raise CheckpointMismatch("checkpoint belongs to other request parameters")
        try:
            tensors = load_tensors(data)
            buffers: dict[str, Buffer] = {}
            for name, kind in header["buffers"].items():
                if kind == "none":
                    buffers[name] = None
                elif kind == "tensor":
                    buffers[name] = tensors[f"buffer.{name}"]
                elif kind == "floats":
                    buffers[name] = [float(v) for v in tensors[f"buffer.{name}"].tolist()]
                else:
                    buffers[name] = [tensors[f"buffer.{name}.{k}"] for k in range(int(kind[1]))]
            state = cls(
                sampler=str(header["sampler"]),
                step=int(header["step"]),
                sigmas=tuple(float(s) for s in header["sigmas"]),
                x=tensors["x"],
                buffers=buffers,
                noise_state=tensors.get("noise_state"),
                scheduler=str(header["scheduler"]),
                request_digest=str(header["request_digest"]),
            )
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise CheckpointMismatch(f"malformed checkpoint: {exc}") from exc
        if list(state.x.shape) != header["shape"] or not 1 <= state.step < state.total:
            raise CheckpointMismatch("malformed checkpoint: header and tensors disagree")
        return state

    def check_resumes(self, sampler: str, sigmas: Sequence[float], x: torch.Tensor) -> None:
        """Raise `CheckpointMismatch` unless this state continues ``sampler`` on ``sigmas``
        from latents shaped and typed like ``x``."""
        if self.sampler != sampler:
            raise CheckpointMismatch(f"checkpoint is for sampler {self.sampler!r}, not {sampler!r}")
        if tuple(sigmas) != self.sigmas:
            raise CheckpointMismatch("checkpoint was made on another schedule")
        if self.x.shape != x.shape or self.x.dtype != x.dtype:
            raise CheckpointMismatch(
                f"checkpoint latents are {tuple(self.x.shape)} {self.x.dtype}, "
                f"this run's {tuple(x.shape)} {x.dtype}"
            )


__all__ = ["FORMAT_VERSION", "Buffer", "CheckpointMismatch", "SamplerState", "read_header"]
