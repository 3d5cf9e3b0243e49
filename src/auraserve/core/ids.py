"""Identifiers. Job ids are UUIDv7 (time-ordered, like the hosted API's `019d…` ids), so they
sort by creation and keep B-tree inserts local; secrets come from `secrets`."""

from __future__ import annotations

import os
import secrets
import time
import uuid


def uuid7() -> str:
    """RFC 9562 UUID version 7: 48-bit millisecond timestamp, then 74 random bits."""
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76  # version
    value |= ((rand >> 62) & 0xFFF) << 64  # rand_a, 12 bits
    value |= 0b10 << 62  # variant
    value |= rand & ((1 << 62) - 1)  # rand_b, 62 bits
    return str(uuid.UUID(int=value))


def short_id(prefix: str, nbytes: int = 8) -> str:
    return f"{prefix}_{secrets.token_hex(nbytes)}"
