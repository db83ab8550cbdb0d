"""Ship spooled records to the collector: ack first, delete after.

One batch at a time, bounded by count and bytes, so memory stays bounded whatever
the backlog. Each call has a deadline. Failures that may pass (collector down,
network cut, deadline exceeded, RESOURCE_EXHAUSTED) are retried with exponential
backoff, full jitter and a cap (tenacity); when the collector says how long to wait
(``retry-after-ms``), the agent waits at least that long. Per record, ``accepted``
and ``duplicate`` delete it from the spool; ``rejected`` moves it to dead letters
with the reason, never to be retried blindly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_never,
    wait_random_exponential,
)

from agent.spool import Spool
from agent.transport import CollectorLink, PushFailed
from common import logs
from common.proto import meterd_pb2 as pb
from common.wire import to_columns, to_proto

log = logs.get("agent.shipper")

RETRYABLE = frozenset(
    {
        "UNAVAILABLE",
        "DEADLINE_EXCEEDED",
        "RESOURCE_EXHAUSTED",
        "ABORTED",
        "INTERNAL",
        "UNKNOWN",
        "CANCELLED",
    }
)


MAX_RETIRED_RANGES = 10_000  # retired seq ranges per call (the collector takes 100,000)


class ShipFailed(Exception):
    """A batch was not acknowledged; retry after ``retry_after`` seconds at the least."""

    def __init__(self, message: str, retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


# How long an agent sends rows to a collector that answered none of a batch of columns.
ROWS_RETRY_US = 3600 * 1_000_000


@dataclass(frozen=True)
class ShipperSettings:
    batch_max_records: int = 1000
    batch_max_bytes: int = 1024 * 1024
    deadline_seconds: float = 10.0
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 60.0


@dataclass(frozen=True)
class BatchResult:
    acked: int
    rejected: int
    clock_skew_us: int


class Shipper:
    def __init__(
        self,
        spool: Spool,
        link: CollectorLink,
        settings: ShipperSettings,
        version: str,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        self._spool = spool
        self._link = link
        self._settings = settings
        self._version = version
        self._clock_us = clock_us
        self.wake = asyncio.Event()
        # Until then (µs) batches go as rows: a collector answered none of a batch sent
        # as columns (see ship_batch).
        self._rows_until_us = 0

    async def ship_batch(self) -> BatchResult | None:
        """Send one batch; None when the spool is empty. Raises :class:`ShipFailed`."""
        s = self._settings
        batch = await asyncio.to_thread(
            self._spool.next_batch, s.batch_max_records, s.batch_max_bytes
        )
        if not batch:
            return None
        stats = await asyncio.to_thread(self._spool.stats)
        # Sequence numbers (collector.sequences): the spool's epoch, and the seqs its
        # compaction merged away, sent until a call carrying them is answered.
        epoch, epoch_start = self._spool.seq_epoch
        retired = (
            await asyncio.to_thread(self._spool.retired_seqs, MAX_RETIRED_RANGES)
            if self._spool.has_retired_seqs else []
        )
        # The column form (each series of the batch once) unless the collector has
        # shown lately that it does not read it; a batch of several hosts can only go
        # as rows.
        columns = None if self._clock_us() < self._rows_until_us else to_columns(batch)
        request = pb.PushRequest(
            records=[] if columns is not None else [to_proto(r) for r in batch],
            columns=columns,
            agent_version=self._version,
            sent_at_us=self._clock_us(),
            backlog_records=stats.records,
            dead_letters=stats.dead_letters,
            seq_epoch=epoch,
            seq_epoch_start=epoch_start,
            retired_seqs=[pb.SeqRange(first=first, last=last) for _, first, last in retired],
        )
        try:
            response = await self._link.push(request, s.deadline_seconds)
        except PushFailed as exc:
            # The rows stay marked in flight: after a deadline the collector may have
            # committed them, so they are resent with the same ids (never compacted).
            message = str(exc)
            await asyncio.to_thread(self._spool.set_meta, "last_error", message)
            if exc.code in RETRYABLE:
                raise ShipFailed(message, exc.retry_after) from None
            # Anything else (a certificate refused, a bug) is not fixed by waiting less.
            raise ShipFailed(message, s.backoff_max_seconds) from None
        if retired:
            await asyncio.to_thread(self._spool.forget_retired_seqs, [r[0] for r in retired])
        if columns is not None and not response.acks:
            # A collector older than the column form reads no record from it and answers
            # none: the batch goes again as rows, and so does every batch for an hour.
            # Then columns are tried again, so an agent finds an upgraded collector
            # without a restart, at the cost of one unanswered call an hour if not.
            self._rows_until_us = self._clock_us() + ROWS_RETRY_US
            log.warning("collector_reads_rows_only", records=len(batch),
                        columns_again_in_s=ROWS_RETRY_US // 1_000_000)
        acked = [a.id for a in response.acks if a.outcome in (pb.ACCEPTED, pb.DUPLICATE)]
        rejected = [(a.id, a.reason) for a in response.acks if a.outcome == pb.REJECTED]
        if acked:
            await asyncio.to_thread(self._spool.acknowledge, acked)
        if rejected:
            await asyncio.to_thread(self._spool.dead_letter, rejected)
            for record_id, reason in rejected:
                log.warning("record_rejected", record=record_id, reason=reason)
        answered = {a.id for a in response.acks}
        unanswered = [r.id for r in batch if r.id not in answered]
        if unanswered:
            await asyncio.to_thread(self._spool.release, unanswered)
        await asyncio.to_thread(self._record_success, response.clock_skew_us)
        log.info("batch_shipped", records=len(batch), acked=len(acked), rejected=len(rejected),
                 backlog=max(stats.records - len(acked) - len(rejected), 0))
        return BatchResult(len(acked), len(rejected), response.clock_skew_us)

    def _record_success(self, skew_us: int) -> None:
        self._spool.set_meta("last_ship_at_us", str(self._clock_us()))
        self._spool.set_meta("clock_skew_us", str(skew_us))
        self._spool.set_meta("last_error", "")

    async def drain(self) -> int:
        """Ship until the spool is empty, retrying with backoff; the records acked."""
        total = 0
        async for attempt in self._retrying():
            with attempt:
                while (result := await self.ship_batch()) is not None:
                    total += result.acked + result.rejected
        return total

    async def run(self) -> None:
        """Ship forever: drain, then wait to be woken by the sampler."""
        while True:
            await self.drain()
            await self.wake.wait()
            self.wake.clear()

    def _retrying(self) -> AsyncRetrying:
        s = self._settings
        jitter = wait_random_exponential(
            multiplier=s.backoff_initial_seconds, max=s.backoff_max_seconds
        )

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            floor = exc.retry_after if isinstance(exc, ShipFailed) else 0.0
            return max(float(jitter(state)), floor)

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("ship_failed", error=str(exc), attempt=state.attempt_number,
                        retry_in_s=round(state.upcoming_sleep, 3))

        return AsyncRetrying(
            retry=retry_if_exception_type(ShipFailed),
            wait=wait,
            stop=stop_never,
            before_sleep=before_sleep,
            reraise=True,
        )

