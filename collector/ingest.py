"""The gRPC ingest service: who is calling, what they may say, and back-pressure.

The host id comes from the verified client certificate, never from the request: a
record naming another host is rejected with its reason while the rest of the batch
goes on. Each record is validated on its own (schema, quantity, window, not too far
in the future of the collector's clock, not older than the maximum lateness); a bad
record gets ``REJECTED`` with a reason, never a failed call.

A certificate whose serial is on the deny list is refused with PERMISSION_DENIED
before anything is read. A call that would push the records in flight past the
configured bound is refused with RESOURCE_EXHAUSTED and a ``retry-after-ms`` trailer
instead of queueing without bound.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable

import grpc

from collector.config import IngestConfig
from collector.fleet import Fleet
from collector.ledger.service import LedgerService, Outcome
from common import logs
from common.errors import RecordError, SecurityError, StoreUnavailable
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import UsageRecord
from common.tls import PEER_CERTIFICATE_KEY, peer_certificate_serial, peer_host_id
from common.wire import from_proto

log = logs.get("collector.ingest")

DAY_US = 86_400 * 1_000_000

Ctx = grpc.aio.ServicerContext[pb.PushRequest, pb.PushResponse]

_OUTCOMES = {
    Outcome.ACCEPTED: pb.ACCEPTED,
    Outcome.HELD: pb.ACCEPTED,
    Outcome.DUPLICATE: pb.DUPLICATE,
}


@functools.lru_cache(maxsize=4096)
def _identity(certificates: tuple[bytes, ...]) -> tuple[str, int]:
    """Host id and serial of a verified peer certificate chain, parsed once per agent
    certificate rather than twice per call (the deny list is still checked per call)."""
    auth_context = {PEER_CERTIFICATE_KEY: certificates}
    return peer_host_id(auth_context), peer_certificate_serial(auth_context)


class IngestService(pb_grpc.IngestServicer):
    def __init__(
        self,
        service: Callable[[], LedgerService],
        config: IngestConfig,
        fleet: Fleet,
        denied_serials: Callable[[], frozenset[int]] = frozenset,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
    ) -> None:
        self._service = service
        self._config = config
        self._fleet = fleet
        self._denied_serials = denied_serials
        self._clock_us = clock_us
        self._in_flight = 0

    async def Push(
        self, request: pb.PushRequest, context: Ctx
    ) -> pb.PushResponse:
        try:
            host_id, serial = _identity(tuple(context.auth_context().get(PEER_CERTIFICATE_KEY, ())))
        except SecurityError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if serial in self._denied_serials():
            log.warning("denied_certificate_refused", host=host_id, serial=f"{serial:x}")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate serial {serial:x} of host {host_id!r} is on the deny list",
            )
        count = len(request.records)
        if count > self._config.max_batch_records:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"batch of {count} records exceeds the limit of {self._config.max_batch_records}",
            )
        # A lone call may always proceed (up to max_batch_records), so no batch starves.
        if self._in_flight and self._in_flight + count > self._config.max_in_flight_records:
            log.warning("ingest_overloaded", host=host_id, in_flight=self._in_flight)
            context.set_trailing_metadata((("retry-after-ms", str(self._config.retry_after_ms)),))
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "collector busy: retry after the delay"
            )
        self._in_flight += count
        try:
            return await self._push(request, context, host_id, serial)
        finally:
            self._in_flight -= count

    async def _push(
        self,
        request: pb.PushRequest,
        context: Ctx,
        host_id: str,
        serial: int,
    ) -> pb.PushResponse:
        now_us = self._clock_us()
        rejected: dict[str, str] = {}
        valid: list[UsageRecord] = []
        seen: dict[str, UsageRecord] = {}
        duplicates_in_batch: set[str] = set()
        ids: list[str] = []
        for message in request.records:
            ids.append(message.id)
            try:
                record = self._validate(message, host_id, now_us)
            except RecordError as exc:
                rejected[message.id] = str(exc)
                continue
            earlier = seen.get(record.id)
            if earlier is not None:
                if earlier != record:
                    rejected[message.id] = "id repeated in the batch with different contents"
                else:
                    duplicates_in_batch.add(record.id)
                continue
            seen[record.id] = record
            valid.append(record)
        try:
            outcomes = await self._service().post(valid, now_us) if valid else {}
        except StoreUnavailable as exc:
            log.error("batch_failed", host=host_id, records=len(valid), error=str(exc))
            await context.abort(grpc.StatusCode.UNAVAILABLE, "ledger unavailable; retry later")
        skew_us = now_us - request.sent_at_us if request.sent_at_us else 0
        response = pb.PushResponse(clock_skew_us=skew_us)
        ack = response.acks.add  # built in place: no message per ack copied in later
        for message_id in ids:
            reason = rejected.get(message_id)
            if reason is not None:
                ack(id=message_id, outcome=pb.REJECTED, reason=reason)
            elif (outcome := outcomes.get(message_id)) is not None:
                ack(id=message_id, outcome=_OUTCOMES[outcome])
        for record_id in duplicates_in_batch:
            ack(id=record_id, outcome=pb.DUPLICATE)
        accepted = sum(1 for o in outcomes.values() if o is not Outcome.DUPLICATE)
        self._fleet.seen(
            host_id,
            now_us=now_us,
            version=request.agent_version,
            backlog=request.backlog_records,
            skew_us=skew_us,
            accepted=accepted,
            rejected=len(rejected),
            last_seq=max((r.seq for r in valid), default=0),
            serial=serial,
        )
        log.info(
            "batch_ingested",
            host=host_id,
            records=len(request.records),
            accepted=accepted,
            duplicate=len(outcomes) - accepted + len(duplicates_in_batch),
            rejected=len(rejected),
            skew_ms=skew_us // 1000,
        )
        return response

    def _validate(self, message: pb.UsageRecord, host_id: str, now_us: int) -> UsageRecord:
        if message.host_id != host_id:
            raise RecordError(
                f"record names host {message.host_id!r} but the certificate is for {host_id!r}"
            )
        record = from_proto(message)
        tolerance_us = self._config.future_tolerance_seconds * 1_000_000
        if record.end_us > now_us + tolerance_us:
            raise RecordError(
                f"window ends {(record.end_us - now_us) // 1_000_000} s after the collector's"
                f" clock (tolerance {self._config.future_tolerance_seconds} s)"
            )
        if record.end_us < now_us - self._config.max_lateness_days * DAY_US:
            raise RecordError(
                f"window ended more than {self._config.max_lateness_days} days ago"
            )
        return record
