"""Step caching: skip most of the transformer on calls where its first block says little changed.

Two methods, both decided by the first block (First-Block Cache, as in ParaAttention and
cache-dit's DBCache with Fn=1, Bn=0):

* ``fbcache``: at each transformer call the first joint block runs for every row; its
  image-stream residual (output − input) is compared with the one recorded at that row's last
  full computation. Where the relative L1 change is below ``cache_threshold``, the other blocks
  are skipped for that row and the residual they added last time (final hidden − first-block
  hidden) is added back instead.
* ``taylorseer``: the same decision, but a skipped row gets a first-order forecast of that
  residual in σ (TaylorSeer's idea: features move smoothly along the trajectory), from the
  last two full computations of that row.

Why our own and not cache-dit (which lists AuraFlow): cache-dit patches diffusers'
``Pipeline.__call__`` and keeps one cache context per pipeline call with one decision for the
whole batch (the mean change over every row), and counts one transformer call per inference
step. Our engine runs its own loop with 14 samplers (heun, dpm_2, dpmpp_2s… call the model
twice per step, at other σ), batches unrelated jobs into one forward, and must not let one
job's change decide another's skip. Here the state is per row of one `generate` call, the
decision is per row, and the forecast variable is σ, so any number of calls per step works.

Hooking: the transformer's two block lists get a subclass whose ``__iter__`` yields the plain
blocks unless a cache session is active, so diffusers' own forward (pos-embed interpolation,
offload hooks, SDPA contexts, LoRA scale) runs unchanged and compiled blocks stay the same
modules. Rows a call skips are carried through the later blocks untouched; rows it computes
run those blocks as a smaller batch (batch-independent on fp32 CPU, see engine.pipeline).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from auraserve.core.engine_options import EngineOptions

Block = Callable[..., Any]


@dataclass(frozen=True)
class CacheSettings:
    method: str  # "fbcache" | "taylorseer"
    threshold: float
    warmup_steps: int
    max_skip: int  # consecutive skipped calls per row before a forced compute; 0: no limit

    @classmethod
    def from_options(cls, options: EngineOptions) -> CacheSettings | None:
        if options.step_cache == "none":
            return None
        return cls(
            method=options.step_cache,
            threshold=options.cache_threshold,
            warmup_steps=options.cache_warmup,
            max_skip=options.cache_max_skip,
        )


class _CachedBlocks(nn.ModuleList):
    """A ModuleList whose iteration is redirected while a cache session runs."""

    def __iter__(self) -> Iterator[Any]:
        session: _Session | None = self.__dict__.get("_step_cache_session")
        blocks = list(self._modules.values())
        if session is None:
            return iter(blocks)
        return iter(session.wrap(self, blocks))


def install(transformer: nn.Module) -> str:
    """Make the transformer's block lists cacheable (idempotent). Nothing changes until a
    `StepCache` session is opened."""
    for name in ("joint_transformer_blocks", "single_transformer_blocks"):
        blocks = getattr(transformer, name)
        if type(blocks) is nn.ModuleList:
            blocks.__class__ = _CachedBlocks
    return "step cache: hooks on the block lists (per-row state per batch)"


class StepCache:
    """One batch's cache state: per transformer row (its position in the denoiser's batch)."""

    def __init__(self, settings: CacheSettings, rows: int) -> None:
        self.settings = settings
        self.rows = rows
        self.completed_steps = 0
        self.computed = [0] * rows  # transformer calls where the row ran every block
        self.skipped = [0] * rows  # calls where it ran only the first block
        self._consecutive = [0] * rows
        self._first_ref: list[torch.Tensor | None] = [None] * rows
        self._residual: list[torch.Tensor | None] = [None] * rows
        self._slope: list[torch.Tensor | None] = [None] * rows
        self._sigma: list[float] = [0.0] * rows

    @contextlib.contextmanager
    def session(self, transformer: nn.Module, row_start: int, sigma: float) -> Iterator[None]:
        joint = transformer.joint_transformer_blocks
        single = transformer.single_transformer_blocks
        if not isinstance(joint, _CachedBlocks) or not isinstance(single, _CachedBlocks):
            raise RuntimeError("step cache not installed on this transformer")
        last = single if len(single) else joint
        session = _Session(self, row_start, sigma, joint, last)
        joint.__dict__["_step_cache_session"] = session
        single.__dict__["_step_cache_session"] = session
        try:
            yield
        finally:
            joint.__dict__.pop("_step_cache_session", None)
            single.__dict__.pop("_step_cache_session", None)

    # -- decisions, per row --------------------------------------------------------------

    def _decide(self, g: int, residual: torch.Tensor) -> bool:
        """True: skip the remaining blocks for global row g."""
        s = self.settings
        ref = self._first_ref[g]
        if (
            ref is None
            or self._residual[g] is None
            or self.completed_steps < s.warmup_steps
            or (s.max_skip and self._consecutive[g] >= s.max_skip)
            or s.threshold <= 0
        ):
            return False
        change = (residual.float() - ref.float()).abs().mean() / ref.float().abs().mean()
        return bool(change < s.threshold)  # NaN compares False: compute

    def _record(self, g: int, residual: torch.Tensor, sigma: float) -> None:
        previous = self._residual[g]
        taylor = self.settings.method == "taylorseer"
        if taylor and previous is not None and sigma != self._sigma[g]:
            self._slope[g] = (residual - previous) / (sigma - self._sigma[g])
        self._residual[g] = residual
        self._sigma[g] = sigma

    def _forecast(self, g: int, sigma: float) -> torch.Tensor:
        residual = self._residual[g]
        assert residual is not None
        slope = self._slope[g]
        if slope is None:
            return residual
        return residual + slope * (sigma - self._sigma[g])

    def row_stats(self, rows: list[int]) -> tuple[int, int]:
        """(computed, skipped) transformer calls summed over `rows`."""
        return sum(self.computed[g] for g in rows), sum(self.skipped[g] for g in rows)


class _Session:
    """One transformer call of a `StepCache` (rows row_start … row_start + batch − 1)."""

    def __init__(
        self, cache: StepCache, row_start: int, sigma: float, first_list: nn.Module, last: nn.Module
    ) -> None:
        self.cache = cache
        self.row_start = row_start
        self.sigma = sigma
        self.first_list = first_list
        self.last_list = last
        self.h0: torch.Tensor | None = None  # image hidden after the first block
        self.text_len = 0
        self.compute: torch.Tensor | None = None  # local row indexes that run every block
        self.skip: list[int] = []
        self.n = 0

    def wrap(self, owner: nn.Module, blocks: list[nn.Module]) -> list[Block]:
        joint = owner is self.first_list
        wrapped: list[Block] = []
        for i, block in enumerate(blocks):
            if joint and i == 0:
                wrapped.append(self._first(block))
            else:
                wrapped.append(self._later(block, joint))
        if owner is self.last_list and wrapped:
            wrapped[-1] = self._finishing(wrapped[-1], joint)
        return wrapped

    def _first(self, block: nn.Module) -> Block:
        def run(hidden_states: torch.Tensor, **kwargs: Any) -> Any:
            text, image = block(hidden_states=hidden_states, **kwargs)
            residual = image - hidden_states
            cache = self.cache
            self.n = image.shape[0]
            skip: list[int] = []
            compute: list[int] = []
            for j in range(self.n):
                g = self.row_start + j
                if cache._decide(g, residual[j]):
                    skip.append(j)
                else:
                    compute.append(j)
                    cache._first_ref[g] = residual[j].clone()
            self.skip = skip
            self.compute = torch.tensor(compute, dtype=torch.long, device=image.device)
            self.h0 = image
            self.text_len = text.shape[1]
            return text, image

        return run

    def _later(self, block: nn.Module, joint: bool) -> Block:
        def run(hidden_states: torch.Tensor, **kwargs: Any) -> Any:
            if not self.skip:
                return block(hidden_states=hidden_states, **kwargs)
            idx = self.compute
            assert idx is not None
            if joint:
                text = kwargs.pop("encoder_hidden_states")
                if idx.numel() == 0:
                    return text, hidden_states
                t_sub, h_sub = block(
                    hidden_states=hidden_states.index_select(0, idx),
                    encoder_hidden_states=text.index_select(0, idx),
                    **kwargs,
                )
                return text.index_copy(0, idx, t_sub), hidden_states.index_copy(0, idx, h_sub)
            if idx.numel() == 0:
                return hidden_states
            out = block(hidden_states=hidden_states.index_select(0, idx), **kwargs)
            return hidden_states.index_copy(0, idx, out)

        return run

    def _finishing(self, inner: Block, joint: bool) -> Block:
        def run(*args: Any, **kwargs: Any) -> Any:
            out = inner(*args, **kwargs)
            if joint:
                text, image = out
                image = self._finish(image.clone())
                return text, image
            combined = out.clone()
            combined[:, self.text_len :] = self._finish(combined[:, self.text_len :])
            return combined

        return run

    def _finish(self, image: torch.Tensor) -> torch.Tensor:
        """Record the computed rows' residual; add the cached (or forecast) one to the rest."""
        cache, h0 = self.cache, self.h0
        assert h0 is not None
        skipped = set(self.skip)
        for j in range(self.n):
            g = self.row_start + j
            if j in skipped:
                image[j] = h0[j] + cache._forecast(g, self.sigma).to(image.dtype)
                cache.skipped[g] += 1
                cache._consecutive[g] += 1
            else:
                cache._record(g, image[j] - h0[j], self.sigma)
                cache.computed[g] += 1
                cache._consecutive[g] = 0
        return image
