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

    # -- rows ----------------------------------------------------------------------------

    def split(self, counts: Sequence[int]) -> list[SamplerState]:
        """One state per request of a batch, ``counts[r]`` rows each (its images).

        Every tensor here has one row per image (latents, per-image history, one generator
        per image); float lists (step sizes, σ) belong to the schedule, which a batch shares.
        A request's rows never depend on the others' (per-image generators, per-row
        guidance), so a request can resume alone or in another batch (`join`).
        """
        if sum(counts) != self.x.shape[0] or any(n < 1 for n in counts):
            raise ValueError(f"counts {list(counts)} do not cover {self.x.shape[0]} rows")
        parts: list[SamplerState] = []
        start = 0
        for n in counts:
            rows = slice(start, start + n)
            parts.append(
                replace(
                    self,
                    x=self.x[rows],
                    buffers={k: _rows(v, rows) for k, v in self.buffers.items()},
                    noise_state=None if self.noise_state is None else self.noise_state[rows],
                )
            )
            start += n
        return parts

    @classmethod
    def join(cls, parts: Sequence[SamplerState]) -> SamplerState:
        """The batch state of per-request states that stand at the same point of the same
        run (sampler, schedule, step, shared floats); `CheckpointMismatch` otherwise."""
        if not parts:
            raise ValueError("nothing to join")
        first = parts[0]
        for part in parts[1:]:
            same = (part.sampler, part.sigmas, part.step) == (
                first.sampler,
                first.sigmas,
                first.step,
            )
            if not same or part.buffers.keys() != first.buffers.keys():
                raise CheckpointMismatch("checkpoints of one batch must stand at the same step")
        if len(parts) == 1:
            return first
        buffers: dict[str, Buffer] = {}
        for name, value in first.buffers.items():
            values = [part.buffers[name] for part in parts]
            if value is None or isinstance(value, torch.Tensor):
                if any(v is None for v in values):
                    if any(v is not None for v in values):
                        raise CheckpointMismatch(f"buffer {name!r} is set in only some parts")
                    buffers[name] = None
                else:
                    buffers[name] = torch.cat([_tensor(v) for v in values])
            elif all(isinstance(v, float) for v in value):
                if any(v != value for v in values):  # NaN never equals: refuse, never mix
                    raise CheckpointMismatch(f"buffer {name!r} differs between parts")
                buffers[name] = value
            else:
                lists = [_tensor_list(v) for v in values]
                if len({len(items) for items in lists}) != 1:
                    raise CheckpointMismatch(f"buffer {name!r} has different lengths")
                buffers[name] = [torch.cat(items) for items in zip(*lists, strict=True)]
        states = [part.noise_state for part in parts]
        noise = None
        if all(state is not None for state in states):
            noise = torch.cat([_tensor(state) for state in states])
        elif any(state is not None for state in states):
            raise CheckpointMismatch("noise positions are set in only some parts")
        return replace(
            first,
            x=torch.cat([part.x for part in parts]),
            buffers=buffers,
            noise_state=noise,
            request_digest="",
        )

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


def _rows(value: Buffer, rows: slice) -> Buffer:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value[rows]
    if all(isinstance(v, torch.Tensor) for v in value):
        return [_tensor(v)[rows] for v in value]
    return [v for v in value if isinstance(v, float)]  # the schedule's: shared by every row


def _tensor(value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise CheckpointMismatch("checkpoint buffers of different kinds")
    return value


def _tensor_list(value: Buffer) -> list[torch.Tensor]:
    if not isinstance(value, list):
        raise CheckpointMismatch("checkpoint buffers of different kinds")
    return [_tensor(v) for v in value]


__all__ = ["FORMAT_VERSION", "Buffer", "CheckpointMismatch", "SamplerState", "read_header"]
