"""An LRU cache of prompt embeddings, for services that see the same prompts again and again.

The UMT5 text encoder of AuraFlow v0.3 (1.2 B parameters, 24 layers over 256 tokens) costs
about 0.6 TFLOP per text: a few milliseconds on an H200, a noticeable share of a small image,
and much more under CPU offload, where the encoder has to be moved to the GPU first. Negative
prompts repeat even more than prompts ("" and a handful of house styles), so with CFG the cache
saves at least half of the encoder work on a typical service.

Exactness: an entry is the tensor that the engine's encoding function returned for that text,
kept as is (same device, same dtype), so a hit returns the very same values a miss computes:
images do not change when the cache is on. The key is (text, max_tokens): the same text
truncated to another length is another embedding.

Memory: one entry is (1, max_tokens, d_model) in the text encoder's dtype: 256 × 2048 × 2 bytes
= 1 MiB for AuraFlow v0.3 in bf16 (2 MiB in fp32). The cache is bounded by entries, so 256
entries hold at most 256 MiB of GPU memory.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

CacheKey = tuple[str, int]


@dataclass(frozen=True)
class TextCacheStats:
    """Counters for metrics and the benchmark."""

    entries: int
    max_entries: int
    hits: int
    misses: int
    evictions: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


class TextEmbeddingCache:
    """LRU map (text, max_tokens) → embedding tensor, bounded by `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        if max_entries < 1:
            raise ValueError("a text cache needs room for at least one entry")
        self.max_entries = max_entries
        self._entries: OrderedDict[CacheKey, torch.Tensor] = OrderedDict()
        # The engine already serialises generate(); the lock keeps the cache safe on its own
        # too (a warm-up thread, a future multi-engine worker).
        self._lock = threading.Lock()
        self._hits = 0
        self._misses = 0
        self._evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: CacheKey) -> bool:
        return key in self._entries

    def get(self, key: CacheKey) -> torch.Tensor | None:
        """The cached embedding (and mark it recently used), or None; counts a hit or miss."""
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key: CacheKey, value: torch.Tensor) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
                self._evictions += 1

    def get_or_encode(
        self, text: str, max_tokens: int, encode: Callable[[str], torch.Tensor]
    ) -> torch.Tensor:
        """The embedding of `text`, computed with `encode(text)` on a miss and kept.

        Callers must treat the returned tensor as read-only: it is shared with later hits.
        (The engine only ever `expand`s and `cat`s embeddings, which never write in place.)
        """
        key = (text, max_tokens)
        cached = self.get(key)
        if cached is not None:
            return cached
        # Encoded outside the lock: a miss can take long (offloaded encoder), and two threads
        # racing on the same text just compute the same value twice.
        value = encode(text)
        self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def stats(self) -> TextCacheStats:
        with self._lock:
            return TextCacheStats(
                entries=len(self._entries),
                max_entries=self.max_entries,
                hits=self._hits,
                misses=self._misses,
                evictions=self._evictions,
            )


__all__ = ["CacheKey", "TextCacheStats", "TextEmbeddingCache"]
