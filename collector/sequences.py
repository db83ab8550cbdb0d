"""Sequence gaps: telling usage that never arrived apart from zero usage.

Every record an agent makes gets the next number of its host's sequence. The collector
keeps, per host and *epoch*, the set of numbers accounted for, and a hole in that set
below the highest number seen that stays open past a grace period is a **gap**: usage
that was sampled and never reached the ledger.

Accounted for
    A seq is accounted for once the collector has answered for its record with a
    definite outcome: accepted, duplicate, held (host not assigned yet) or rejected
    (the agent dead-letters it: it is visible there, not lost). The agent's spool
    compaction merges old records of one series into one record that keeps the seq of
    the last one merged; the seqs of the others (interleaved with other series' seqs)
    vanish legitimately. The agent stores them as ranges and sends them in
    ``PushRequest.retired_seqs`` until a call carrying them is answered; they are
    accounted for as *retired*.

Epochs
    A seq space belongs to one spool: the agent names it with ``seq_epoch`` (a UUIDv7
    made when its spool is created) and ``seq_epoch_start`` (the first seq of the space:
    0 for a new spool). An agent whose spool was lost starts a new epoch at seq 0, which
    is neither a huge gap nor a run of duplicates: each epoch is tracked on its own.
    Holes left open in an old epoch stay gaps (that spool's unsent records are gone);
    what the lost spool held after its last delivered seq cannot be counted, so a new
    epoch is logged (``sequence_epoch_started``) and listed for the host. Seqs below an
    epoch's start are not tracked. An agent that reports no epoch is tracked under the
    empty epoch, from the lowest seq seen.

Storage and two collectors
    The seen-set lives on the host's shard (:meth:`ShardedLedger.for_host`), as merged
    ranges: everything below the first range's end (the watermark) is accounted for,
    and above it only the holes cost space. Each ingest call adds its seqs with one
    statement (a PostgreSQL ``int8multirange`` union; the same read-merge-write in the
    SQLite file), written in the call's own posting transaction when that is the host's
    shard and the only shard the call touches, otherwise in a transaction of its own
    after every shard committed: seqs are marked only once their records' outcomes are
    durable, and an acknowledgement is sent only after they are marked. Unions commute,
    so two collectors behind a load balancer build the same set, and it survives a
    restart.

Detection
    A background task (:meth:`Sequences.run`) compares, shard by shard, the current
    holes with the holes it stored last time: a hole keeps the time it was first seen
    (``since_us``) through any shrinking or splitting, and once it is older than
    ``[ingest] sequence_gap_grace_seconds`` it is a gap, logged once as
    ``sequence_gap_detected`` (and ``sequence_gap_closed`` if its seqs arrive after
    all). Of two collectors only one checks a shard at a time.

Reading gaps: :meth:`Sequences.gaps` and :meth:`Sequences.hosts` (the REST API's fleet
health), and ``meterd collector gaps``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from collector.ledger.service import ShardedLedger
from collector.ledger.store import (
    LedgerStore,
    SeqHole,
    SeqMarks,
    SeqTrack,
    merge_seq_ranges,
    seq_holes_of,
)
from common import logs
from common.errors import MeterdError
from common.records import MAX_STORED_SEQ

log = logs.get("collector.sequences")

SECOND_US = 1_000_000
MAX_EPOCH_TEXT = 64
MAX_RETIRED_RANGES = 100_000

Ranges = list[tuple[int, int]]
"""Half-open ranges ``[lo, hi)`` of seqs, ascending, disjoint and not touching."""


# -- the range algebra (pure) -------------------------------------------------------------


def ranges_of(seqs: Iterable[int]) -> Ranges:
    """The merged ranges covering ``seqs``."""
    ordered = sorted(set(seqs))
    if ordered and ordered[-1] - ordered[0] == len(ordered) - 1:
        return [(ordered[0], ordered[-1] + 1)]  # distinct integers spanning no more: a run
    out: Ranges = []
    for seq in ordered:
        if out and out[-1][1] == seq:
            out[-1] = (out[-1][0], seq + 1)
        else:
            out.append((seq, seq + 1))
    return out


def watermark(seen: Sequence[tuple[int, int]], start: int | None) -> int:
    """The first seq not accounted for: everything from the start below it is."""
    if not seen:
        return 0 if start is None else start
    lo = seen[0][0] if start is None else start
    return seen[0][1] if seen[0][0] <= lo else lo


@dataclass(frozen=True, slots=True)
class HoleChanges:
    """One detector round on one shard: the holes to store, and what changed."""

    holes: list[SeqHole]
    detected: list[SeqHole]  # holes that became gaps in this round
    closed: list[SeqHole]  # gaps whose seqs all arrived since the last round


def reconcile_holes(
    current: Sequence[SeqHole], stored: Sequence[SeqHole], now_us: int, grace_us: int
) -> HoleChanges:
    """Carry each current hole's history over from the stored holes it overlaps: the
    earliest ``since_us`` and, if any of them was already a gap, its ``detected_us``.
    ``current`` holes carry ``since_us = now_us`` and no detection."""
    by_track: dict[tuple[str, str], list[SeqHole]] = {}
    for old in stored:
        by_track.setdefault((old.host_id, old.epoch), []).append(old)
    holes: list[SeqHole] = []
    detected: list[SeqHole] = []
    still_open: set[tuple[str, str, int]] = set()
    for hole in current:
        since, detected_at = hole.since_us, None
        for old in by_track.get((hole.host_id, hole.epoch), ()):
            if old.lo < hole.hi and hole.lo < old.hi:
                still_open.add((old.host_id, old.epoch, old.lo))
                since = min(since, old.since_us)
                if old.detected_us is not None and (
                    detected_at is None or old.detected_us < detected_at
                ):
                    detected_at = old.detected_us
        new = SeqHole(hole.host_id, hole.epoch, hole.lo, hole.hi, since, detected_at)
        if detected_at is None and now_us - since >= grace_us:
            new = SeqHole(hole.host_id, hole.epoch, hole.lo, hole.hi, since, now_us)
            detected.append(new)
        holes.append(new)
    closed = [
        old for old in stored
        if old.detected_us is not None and (old.host_id, old.epoch, old.lo) not in still_open
    ]
    return HoleChanges(holes, detected, closed)


# -- what an ingest call reports ------------------------------------------------------------


def seq_marks(
    host_id: str,
    epoch: str,
    start: int | None,
    seqs: Iterable[int],
    retired: Iterable[tuple[int, int]],
    at_us: int,
) -> SeqMarks:
    """What one ingest call accounts for: the seqs of the records it answered for and
    the ``retired`` inclusive (first, last) ranges, merged; seqs below ``start`` (not
    tracked) and past what the stores hold are left out. The stores keep half-open
    ranges of signed 64-bit integers, whose end cannot pass 2^63-1: so the last seq a
    record may carry, 2^63-1 itself, is stored with its record but not tracked."""
    top = MAX_STORED_SEQ
    ranges = merge_seq_ranges(
        ranges_of(s for s in seqs if s < top),
        ((first, min(last + 1, top)) for first, last in retired if first <= last),
    )
    if start is not None:
        ranges = [(max(lo, start), hi) for lo, hi in ranges if hi > start]
    return SeqMarks(host_id, epoch, start, ranges, at_us)


def check_epoch(epoch: str, start: int | None, retired: Sequence[tuple[int, int]]) -> str:
    """Why a call's sequence metadata is unusable, or "" when it is fine."""
    if len(epoch) > MAX_EPOCH_TEXT or not (epoch.isascii() and epoch.isprintable()):
        return f"seq_epoch must be at most {MAX_EPOCH_TEXT} printable ASCII characters"
    if start is not None and start > MAX_STORED_SEQ:
        return "seq_epoch_start is past 2^63-1"
    if len(retired) > MAX_RETIRED_RANGES:
        return f"more than {MAX_RETIRED_RANGES} retired seq ranges in one call"
    for first, last in retired:
        if first > last:
            return f"retired seq range {first}-{last} ends before it starts"
    return ""


# -- reading and checking -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SequenceGap:
    """Seqs ``first`` to ``last`` (inclusive) of one host's epoch never arrived."""

    host_id: str
    epoch: str
    first: int
    last: int
    since_us: int  # when a later seq first showed the hole
    detected_us: int  # when the grace ran out

    @property
    def count(self) -> int:
        return self.last - self.first + 1


@dataclass(frozen=True, slots=True)
class HostSequences:
    """What the collector knows of one host's epoch."""

    host_id: str
    epoch: str
    start: int | None  # the first seq expected (None: the lowest seen)
    watermark: int  # every seq from the start below this one is accounted for
    highest: int | None  # the highest seq accounted for
    missing: int  # seqs below ``highest`` not accounted for (pending or gaps)
    gaps: tuple[SequenceGap, ...]  # holes open past the grace
    first_us: int  # when the epoch was first seen
    updated_us: int  # when a seq of it was last accounted for


def _host_view(track: SeqTrack, gaps: Sequence[SequenceGap]) -> HostSequences:
    holes = seq_holes_of(track.seen, track.start)
    return HostSequences(
        host_id=track.host_id,
        epoch=track.epoch,
        start=track.start,
        watermark=watermark(track.seen, track.start),
        highest=track.seen[-1][1] - 1 if track.seen else None,
        missing=sum(hi - lo for lo, hi in holes),
        gaps=tuple(gaps),
        first_us=track.first_us,
        updated_us=track.updated_us,
    )


def _gap(hole: SeqHole) -> SequenceGap:
    assert hole.detected_us is not None
    return SequenceGap(
        hole.host_id, hole.epoch, hole.lo, hole.hi - 1, hole.since_us, hole.detected_us
    )


class Sequences:
    """Gap detection and reading over every shard of the ledger."""

    def __init__(self, ledger: ShardedLedger, grace_seconds: int) -> None:
        self.ledger = ledger
        self.grace_us = grace_seconds * SECOND_US

    async def gaps(self, host_id: str | None = None) -> list[SequenceGap]:
        """Gaps found so far and still open, by host, epoch and seq."""
        gaps: list[SequenceGap] = []
        for store in self._stores(host_id):
            gaps += [_gap(h) for h in await store.seq_holes(host_id) if h.detected_us is not None]
        return sorted(gaps, key=lambda g: (g.host_id, g.epoch, g.first))

    async def hosts(self, host_id: str | None = None) -> list[HostSequences]:
        """Every host's epochs (the most recently active first for each host)."""
        out: list[HostSequences] = []
        for store in self._stores(host_id):
            gaps: dict[tuple[str, str], list[SequenceGap]] = {}
            for hole in await store.seq_holes(host_id):
                if hole.detected_us is not None:
                    gaps.setdefault((hole.host_id, hole.epoch), []).append(_gap(hole))
            for track in await store.seq_tracks(host_id):
                out.append(_host_view(track, gaps.get((track.host_id, track.epoch), [])))
        return sorted(out, key=lambda h: (h.host_id, -h.updated_us, h.epoch))

    async def check(self, now_us: int) -> list[SequenceGap]:
        """One detector round on every shard; the gaps found in it (each logged once)."""
        found: list[SequenceGap] = []
        for store in self.ledger.stores:
            async with store.transaction() as tx:
                if not await tx.claim_seq_check():
                    continue  # another collector is checking this shard right now
                current = [
                    SeqHole(host, epoch, lo, hi, now_us, None)
                    for host, epoch, lo, hi in await tx.current_seq_holes()
                ]
                stored = await tx.stored_seq_holes()
                changes = reconcile_holes(current, stored, now_us, self.grace_us)
                if changes.holes != list(stored):
                    await tx.replace_seq_holes(changes.holes)
            for hole in changes.detected:
                gap = _gap(hole)
                found.append(gap)
                log.warning(
                    "sequence_gap_detected", host=gap.host_id, epoch=gap.epoch,
                    first_seq=gap.first, last_seq=gap.last, missing=gap.count,
                    open_s=(now_us - gap.since_us) // SECOND_US, shard=store.name,
                )
            for hole in changes.closed:
                log.info(
                    "sequence_gap_closed", host=hole.host_id, epoch=hole.epoch,
                    first_seq=hole.lo, last_seq=hole.hi - 1, shard=store.name,
                )
        return found

    async def run(self, interval_seconds: float, clock_us: Callable[[], int]) -> None:
        """Check every ``interval_seconds`` until cancelled; a failed round is logged
        and the next one goes ahead."""
        while True:
            await asyncio.sleep(interval_seconds)
            try:
                await self.check(clock_us())
            except MeterdError as exc:
                log.error("sequence_check_failed", error=str(exc))

    def _stores(self, host_id: str | None) -> list[LedgerStore]:
        if host_id is not None:
            return [self.ledger.for_host(host_id)]
        return list(self.ledger.stores)
