"""The prompt-embedding LRU cache (its use by the engine: tests/engine/optimize/test_apply.py)."""

from __future__ import annotations

import math

import pytest
import torch

from auraserve.engine.text_cache import TextEmbeddingCache


def test_text_cache_lru_bound() -> None:
    cache = TextEmbeddingCache(2)
    calls: list[str] = []

    def encode(text: str) -> torch.Tensor:
        calls.append(text)
        return torch.full((1,), float(len(calls)))

    a = cache.get_or_encode("a", 256, encode)
    cache.get_or_encode("b", 256, encode)
    assert cache.get_or_encode("a", 256, encode) is a  # hit: same tensor, "a" now most recent
    cache.get_or_encode("c", 256, encode)  # evicts "b", the least recently used
    assert ("a", 256) in cache and ("b", 256) not in cache and ("c", 256) in cache
    cache.get_or_encode("a", 128, encode)  # another max length is another entry
    assert calls == ["a", "b", "c", "a"]
    stats = cache.stats()
    assert (stats.hits, stats.misses, stats.evictions, stats.entries) == (1, 4, 2, 2)
    assert math.isclose(stats.hit_rate, 0.2)
    with pytest.raises(ValueError, match="at least one entry"):
        TextEmbeddingCache(0)
