"""Ulysses sequence parallelism for AuraFlow's transformer (`--parallel ulysses=N`).

DeepSpeed-Ulysses: each of the N ranks of a sequence group holds 1/N of the tokens through the
whole transformer; around every attention an all-to-all swaps sequence shards for head shards
(each rank then attends over the *whole* sequence with H/N of the heads) and a second one
swaps back. Everything outside attention (projections, norms, feed-forwards, AdaLN) works
token by token, so it runs on the shard unchanged.

What is split, and where:

* Text *and* image tokens are split (not text replicated). AuraFlow's text stream is 264
  tokens (256 T5 tokens + 8 register tokens), against 4096 image tokens at 1024²: replicating
  it would make every rank run the text half of each joint block and the text rows of every
  single block in full (about a fifth of a rank's work at N=4) and would need a third exchange
  (an all_gather of the text heads) per attention. Split, one all-to-all moves q, k and v of
  both streams at once.
* The split happens at the first joint block (a forward pre-hook), after the patch embedding,
  the positional embedding and the register tokens: the diffusers forward stays untouched.
  The single DiT blocks then concatenate each rank's *own* text and image shards; that
  per-rank [text, image] layout is a permutation of the full sequence, and attention has no
  notion of order (AuraFlow's positions are added at the patch embedding, there is no RoPE),
  so every token's output is the single-process one.
* Shards are equal (all_to_all needs equal pieces): a stream whose length does not divide by
  N is padded with zero tokens. Padded tokens are dropped from q, k and v after the exchange
  (so no real token attends to them) and get a zero attention output; everything else they
  go through is per token, so they never touch a real token.
* The image tokens are gathered (all_gather, exact) after `proj_out`, the last per-token layer,
  where a token is patch² x channels wide (16 values, not 3072): every rank ends with the full
  velocity, as the engine expects.

gloo (the CPU) has `all_to_all_single` in this torch, so the same exchange runs on the CPU
and on nccl; it only moves values, so the result is exact to the bit up to the changed order
of keys in the attention sum.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.distributed as dist
import torch.nn.functional as F

from auraserve.engine.optimize.attention import AttentionKernel, AuraFlowAttnProcessor
from auraserve.errors import ConfigError


@dataclass
class _Layout:
    """One transformer call's shard layout, set by the split hook, read by the processor."""

    text: int  # real text (+ register) tokens
    image: int  # real image tokens
    text_shard: int  # text tokens per rank, padding included
    image_shard: int  # image tokens per rank, padding included
    valid: torch.Tensor | None  # real positions of the gathered sequence; None: no padding


class SequenceSplit:
    """This rank's place in a sequence (Ulysses) group and the group's collectives."""

    def __init__(self, rank: int, world: int, group: Any = None) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside a group of {world}")
        self.rank = rank
        self.world = world
        self.group = group  # None: the default (world) group
        self.layout: _Layout | None = None

    # --- the exchanges ------------------------------------------------------------------------

    def seq_to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, L, heads, d), this rank's L tokens → (batch, world·L, heads/world, d), every
        rank's tokens (rank i's at [i·L, (i+1)·L)) for this rank's slice of the heads."""
        b, length, heads, d = x.shape
        n = self.world
        send = x.reshape(b, length, n, heads // n, d).permute(2, 0, 1, 3, 4).contiguous()
        recv = _all_to_all(send, self.group)
        return recv.permute(1, 0, 2, 3, 4).reshape(b, n * length, heads // n, d)

    def heads_to_seq(self, x: torch.Tensor) -> torch.Tensor:
        """The inverse: (batch, world·L, h, d) → (batch, L, world·h, d)."""
        b, total, heads, d = x.shape
        n = self.world
        length = total // n
        send = x.reshape(b, n, length, heads, d).permute(1, 0, 2, 3, 4).contiguous()
        recv = _all_to_all(send, self.group)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, length, n * heads, d)

    def gather_tokens(self, x: torch.Tensor, real: int) -> torch.Tensor:
        """(batch, shard, c) per rank → (batch, real, c), the ranks' shards in order."""
        return _all_gather(x.contiguous(), self.world, self.group)[:, :real]

    # --- the shard layout ---------------------------------------------------------------------

    def shard(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """This rank's `size` tokens of (batch, tokens, c), zero-padded to world·size."""
        pad = size * self.world - x.shape[1]
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x[:, self.rank * size : (self.rank + 1) * size]

    def plan(self, text: int, image: int, device: torch.device) -> _Layout:
        n = self.world
        text_shard, image_shard = -(-text // n), -(-image // n)
        valid = None
        if text_shard * n != text or image_shard * n != image:
            local = text_shard + image_shard
            positions = [
                i * local + j
                for i in range(n)
                for j in range(local)
                if _real(i, j, text_shard, text, image_shard, image)
            ]
            valid = torch.tensor(positions, dtype=torch.long, device=device)
        self.layout = _Layout(text, image, text_shard, image_shard, valid)
        return self.layout


def _real(rank: int, j: int, text_shard: int, text: int, image_shard: int, image: int) -> bool:
    """Whether position j of `rank`'s [text shard, image shard] holds a real token."""
    if j < text_shard:
        return rank * text_shard + j < text
    return rank * image_shard + j - text_shard < image


@torch.compiler.disable  # a graph break: the collectives run eagerly inside compiled blocks
def _all_to_all(send: torch.Tensor, group: Any) -> torch.Tensor:
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return recv


@torch.compiler.disable
def _all_gather(x: torch.Tensor, world: int, group: Any) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=1)


class UlyssesAttnProcessor(AuraFlowAttnProcessor):
    """Our processor (same projections, norms and kernel) with the attention core wrapped in
    the two all-to-alls; joint and single blocks alike, both see the per-rank [text, image]
    layout."""

    def __init__(self, kernel: AttentionKernel, split: SequenceSplit) -> None:
        super().__init__(kernel)
        self.split = split

    def _core(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> Any:
        split = self.split
        layout = split.layout
        if layout is None:
            raise RuntimeError("ulysses attention outside a split transformer call")
        # One exchange for q, k and v (stacked on the batch axis), not three.
        q, k, v = split.seq_to_heads(torch.cat([q, k, v])).chunk(3)
        if layout.valid is None:
            return split.heads_to_seq(self._attend(q, k, v, scale))
        valid = layout.valid
        q_real, k_real, v_real = (t.index_select(1, valid) for t in (q, k, v))
        out = self._attend(q_real, k_real, v_real, scale)
        full = out.new_zeros(q.shape[0], q.shape[1], *out.shape[2:])
        full.index_copy_(1, valid, out)
        return split.heads_to_seq(full)


def install_sequence_split(transformer: Any, split: SequenceSplit) -> None:
    """Make `transformer` (AuraFlowTransformer2DModel) compute this rank's tokens only:
    the split hook on the first joint block, our processor on every attention layer, the
    gather hook on `proj_out`."""
    heads = int(transformer.config.num_attention_heads)
    if heads % split.world:
        divisors = [d for d in range(2, heads + 1) if heads % d == 0]
        raise ConfigError(
            f"--parallel ulysses={split.world}: the model has {heads} attention heads; "
            f"ulysses must divide them ({', '.join(map(str, divisors))})"
        )
    blocks = transformer.joint_transformer_blocks
    if len(blocks) == 0:
        raise ConfigError("--parallel ulysses needs a transformer with joint (MMDiT) blocks")
    kernel = cast(AttentionKernel, getattr(transformer, "_auraserve_attention", "sdpa"))
    transformer.set_attn_processor(cast(Any, UlyssesAttnProcessor(kernel, split)))

    @torch.compiler.disable
    def split_tokens(
        module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        image, text = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        layout = split.plan(text.shape[1], image.shape[1], image.device)
        kwargs = dict(kwargs)
        kwargs["hidden_states"] = split.shard(image, layout.image_shard)
        kwargs["encoder_hidden_states"] = split.shard(text, layout.text_shard)
        return args, kwargs

    def gather_tokens(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        layout = split.layout
        assert layout is not None  # the split hook ran first in this call
        return split.gather_tokens(output, layout.image)

    blocks[0].register_forward_pre_hook(split_tokens, with_kwargs=True)
    transformer.proj_out.register_forward_hook(gather_tokens)


__all__ = ["SequenceSplit", "UlyssesAttnProcessor", "install_sequence_split"]
