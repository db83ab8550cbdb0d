"""Accounts to shards: a stable hash picks one of a fixed number of logical slots, and
configuration maps slot ranges to stores. Splitting a shard later moves slot ranges;
no account ever changes slot. Everything of one account lives on one shard."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from common.errors import ConfigError

SLOTS = 1024


def slot_of(key: str) -> int:
    """The logical slot of an account (or host) id: first 8 bytes of SHA-256, mod SLOTS."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") % SLOTS


def parse_slot_range(text: str, source: str, key: str) -> range:
    """``"0-511"`` (inclusive) or ``"7"`` as a range of slots."""
    try:
        if "-" in text:
            lo_text, hi_text = text.split("-", 1)
            lo, hi = int(lo_text), int(hi_text)
        else:
            lo = hi = int(text)
    except ValueError:
        expected = f"expected a slot range such as \"0-511\", got {text!r}"
        raise ConfigError(source, key, expected) from None
    if not 0 <= lo <= hi < SLOTS:
        raise ConfigError(source, key, f"slot range {text!r} must lie within 0-{SLOTS - 1}")
    return range(lo, hi + 1)


@dataclass(frozen=True)
class ShardMap:
    """Slot -> shard index. Every slot must be covered exactly once."""

    owner: tuple[int, ...]

    @classmethod
    def from_ranges(cls, ranges: Sequence[Sequence[range]], source: str, key: str) -> ShardMap:
        owner = [-1] * SLOTS
        for shard, shard_ranges in enumerate(ranges):
            for r in shard_ranges:
                for s in r:
                    if owner[s] != -1:
                        raise ConfigError(source, key, f"slot {s} is assigned to two shards")
                    owner[s] = shard
        missing = [s for s, o in enumerate(owner) if o == -1]
        if missing:
            raise ConfigError(source, key, f"slots {missing[0]}.. are assigned to no shard")
        return cls(tuple(owner))

    @classmethod
    def even(cls, shards: int) -> ShardMap:
        """Slots split into ``shards`` contiguous, nearly equal ranges."""
        return cls(tuple(s * shards // SLOTS for s in range(SLOTS)))

    def shard_of(self, account_id: str) -> int:
        return self.owner[slot_of(account_id)]
