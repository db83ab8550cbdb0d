"""The gRPC ingest service: who is calling, what they may say, and back-pressure.

The host id comes from the verified client certificate, never from the request: a
record naming another host is rejected with its reason while the rest of the batch
goes on. Each record is validated on its own (schema, quantity, window, not too far
in the future of the collector's clock); a bad record gets ``REJECTED`` with a reason,
never a failed call. A record whose window ended longer ago than the maximum lateness
is quarantined with its reason and answered ``ACCEPTED`` (see
:mod:`collector.billing.quarantine`): nothing is dropped. The common batch, every
record of it valid, new in the batch and on time, is checked a column at a time
(:func:`common.records.build_records`); any other goes record by record, so each
refused record gets its own reason.

A request carries its records in one of two forms: a message per record
(``records``), or column by column (``columns``, what the agent sends: each metric,
unit and label set once per series of the batch, read and checked once, see
:class:`common.records.SeriesBatch`). Columns of different lengths, or both
forms in one request, refuse the call with INVALID_ARGUMENT; a record whose series
index names no series is rejected with its reason.

Every call also accounts for its seqs (the host's sequence numbers of the records it
answers for, and the ranges the agent's spool compaction retired): see
:mod:`collector.sequences`. They are written with the call's postings, so an
acknowledgement is sent only once the seqs it covers are recorded; call metadata that
cannot be tracked (an epoch that is not short printable text, a retired range that
ends before it starts) refuses the call with INVALID_ARGUMENT.

A certificate whose serial is on the deny list is refused with PERMISSION_DENIED
before anything is read. A call that would push the records in flight past the
configured bound is refused with RESOURCE_EXHAUSTED and a ``retry-after-ms`` trailer
instead of queueing without bound.
"""

from __future__ import annotations

import functools
import operator
import time
from collections.abc import Callable, Mapping, Sequence

import grpc

from collector.billing.quarantine import quarantine_records
from collector.config import IngestConfig
from collector.fleet import Fleet, certificate_expiry_us
from collector.ingest_metrics import ANSWERED, Answered
from collector.ledger.service import LedgerService, Outcome
from collector.sequences import check_epoch, seq_marks
from common import logs
from common.errors import RecordError, SecurityError, StoreUnavailable
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import (
    MAX_STORED_SEQ,
    SeriesBatch,
    UsageRecord,
    build_records,
    build_series_batch,
)
from common.tls import PEER_CERTIFICATE_KEY, peer_certificate_serial, peer_host_id
from common.wire import column_lengths_problem, column_messages, from_proto

log = logs.get("collector.ingest")

DAY_US = 86_400 * 1_000_000

Ctx = grpc.aio.ServicerContext[pb.PushRequest, pb.PushResponse]

# A record message's fields in the order of :func:`common.records.build_records`.
_FIELDS = tuple(
    operator.attrgetter(name)
    for name in ("id", "host_id", "metric", "quantity", "unit", "start_us", "end_us", "seq",
                 "labels")
)

# One ACCEPTED acknowledgement on the wire, split around its record id: a canonical
# UUID text is 36 ASCII characters, the length the framing before it holds.
_TEMPLATE_ID = "00000000-0000-0000-0000-000000000000"
_ACK_HEAD, _ACK_TAIL = (
    pb.PushResponse(acks=[pb.RecordAck(id=_TEMPLATE_ID, outcome=pb.ACCEPTED)])
    .SerializeToString()
    .decode("ascii")
    .split(_TEMPLATE_ID)
)


def _accepted_acks(ids: list[str]) -> bytes:
    """A PushResponse's wire form holding one ACCEPTED acknowledgement per id, in
    order: ``ids`` (at least one) must be canonical UUID texts, as
    :meth:`IngestService._whole_batch` has checked them. Parsing this costs a fraction
    of adding the acknowledgements one by one."""
    return (_ACK_HEAD + (_ACK_TAIL + _ACK_HEAD).join(ids) + _ACK_TAIL).encode("ascii")


_OUTCOMES = {
    Outcome.ACCEPTED: pb.ACCEPTED,
    Outcome.HELD: pb.ACCEPTED,
    Outcome.DUPLICATE: pb.DUPLICATE,
}


@functools.lru_cache(maxsize=4096)
def _identity(certificates: tuple[bytes, ...]) -> tuple[str, int, int]:
    """Host id, serial and expiry (µs) of a verified peer certificate chain, parsed once
    per agent certificate rather than per call (the deny list is still checked per call)."""
    auth_context = {PEER_CERTIFICATE_KEY: certificates}
    host_id, serial = peer_host_id(auth_context), peer_certificate_serial(auth_context)
    return host_id, serial, certificate_expiry_us(certificates[0])


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
            host_id, serial, expires_us = _identity(
                tuple(context.auth_context().get(PEER_CERTIFICATE_KEY, ()))
            )
        except SecurityError as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if serial in self._denied_serials():
            log.warning("denied_certificate_refused", host=host_id, serial=f"{serial:x}")
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate serial {serial:x} of host {host_id!r} is on the deny list",
            )
        if request.HasField("columns"):
            problem = column_lengths_problem(request.columns)
            if request.records:
                problem = "a request carries its records as `records` or as `columns`, not both"
            if problem:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
            count = len(request.columns.ids)
        else:
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
            return await self._push(request, context, host_id, serial, expires_us)
        finally:
            self._in_flight -= count

    async def _push(
        self,
        request: pb.PushRequest,
        context: Ctx,
        host_id: str,
        serial: int,
        expires_us: int = 0,
    ) -> pb.PushResponse:
        now_us = self._clock_us()
        epoch = request.seq_epoch
        epoch_start = request.seq_epoch_start if request.HasField("seq_epoch_start") else None
        retired = [(r.first, r.last) for r in request.retired_seqs]
        problem = check_epoch(epoch, epoch_start, retired)
        if problem:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        config = self._config
        latest_end = now_us + config.future_tolerance_seconds * 1_000_000
        earliest_end = now_us - config.max_lateness_days * DAY_US
        ids: list[str] = []  # per message, in order: each gets one acknowledgement
        rejected: dict[int, str] = {}  # message index -> reason
        repeated: list[int] = []  # message indexes that repeat an earlier record exactly
        valid: Sequence[UsageRecord] = []  # checked, to post
        late: list[UsageRecord] = []  # beyond the maximum lateness (collector.billing)
        seqs: list[int] = []  # of every message that will be answered for
        messages: Sequence[pb.UsageRecord] = request.records
        refused: Mapping[int, str] = {}  # message index -> reason, known before validation
        fast: tuple[list[str], Sequence[UsageRecord], list[int]] | None
        if request.HasField("columns"):
            columns = request.columns
            fast = self._whole_columns(columns, host_id, latest_end, earliest_end)
            if fast is None:
                messages, refused = column_messages(columns)
        else:
            fast = self._whole_batch(request, host_id, latest_end, earliest_end)
        if fast is not None:
            ids, valid, seqs = fast
        else:
            one_by_one: list[UsageRecord] = []
            valid = one_by_one
            self._one_by_one(messages, refused, host_id, latest_end, earliest_end, now_us,
                             ids, rejected, repeated, one_by_one, late, seqs)
        marks = seq_marks(host_id, epoch, epoch_start, seqs, retired, now_us)
        outcomes: dict[str, Outcome] = {}
        if late:  # --- billing: kept with their reason until an operator releases them ---
            too_late = (
                f"window ended more than {config.max_lateness_days} days ago (the maximum"
                " lateness): quarantined until an operator releases it"
            )
            try:
                outcomes = await quarantine_records(
                    self._service(), late, dict.fromkeys((r.id for r in late), too_late), now_us
                )
            except StoreUnavailable as exc:
                log.error("batch_failed", host=host_id, records=len(late), error=str(exc))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "ledger unavailable; retry later")
        if valid or marks.ranges:
            try:
                outcomes |= await self._service().post(valid, now_us, marks)
            except StoreUnavailable as exc:
                log.error("batch_failed", host=host_id, records=len(valid), error=str(exc))
                await context.abort(grpc.StatusCode.UNAVAILABLE, "ledger unavailable; retry later")
        if marks.new_epoch:
            log.info("sequence_epoch_started", host=host_id, epoch=epoch, start=epoch_start)
        skew_us = now_us - request.sent_at_us if request.sent_at_us else 0
        # A send time so absurd that the difference leaves int64 must not fail a call
        # whose records are already posted: answer the largest skew the reply can carry.
        skew_us = max(-(2**63), min(skew_us, 2**63 - 1))
        duplicate = list(outcomes.values()).count(Outcome.DUPLICATE)
        if fast is not None and not duplicate and len(outcomes) == len(ids):
            # The whole batch accepted (or held): its acks parsed from their wire form.
            response = pb.PushResponse.FromString(_accepted_acks(ids))
            response.clock_skew_us = skew_us
        else:
            response = self._response(skew_us, ids, outcomes, rejected, repeated)
        accepted = len(outcomes) - duplicate
        rejected_count = len(rejected) - len(repeated)
        ANSWERED.set(Answered(  # the acks by outcome, for the metrics (collector.ingest_metrics)
            accepted, duplicate + len(repeated), rejected_count,
            tuple(reason for reason in rejected.values() if reason),
        ))
        self._fleet.seen(
            host_id,
            now_us=now_us,
            version=request.agent_version,
            backlog=request.backlog_records,
            skew_us=skew_us,
            accepted=accepted,
            rejected=rejected_count,
            last_seq=max(seqs) if fast is not None else max((r.seq for r in valid), default=0),
            serial=serial,
            cert_expiry_us=expires_us,
            dead_letters=request.dead_letters if request.HasField("dead_letters") else None,
        )
        log.info(
            "batch_ingested",
            host=host_id,
            records=len(ids),
            accepted=accepted,
            duplicate=duplicate + len(repeated),
            rejected=rejected_count,
            quarantined=len(late),
            skew_ms=skew_us // 1000,
        )
        return response

    @staticmethod
    def _response(
        skew_us: int,
        ids: list[str],
        outcomes: dict[str, Outcome],
        rejected: dict[int, str],
        repeated: list[int],
    ) -> pb.PushResponse:
        """One acknowledgement per message, in order."""
        response = pb.PushResponse(clock_skew_us=skew_us)
        ack = response.acks.add  # built in place: no message per ack copied in later
        if rejected or repeated:
            for index in repeated:
                rejected[index] = ""  # answered DUPLICATE below
            for index, message_id in enumerate(ids):
                reason = rejected.get(index)
                if reason is None:
                    ack(id=message_id, outcome=_OUTCOMES[outcomes[message_id]])
                elif reason:
                    ack(id=message_id, outcome=pb.REJECTED, reason=reason)
                else:
                    ack(id=message_id, outcome=pb.DUPLICATE)
        else:
            for message_id in ids:
                ack(id=message_id, outcome=_OUTCOMES[outcomes[message_id]])
        return response

    @staticmethod
    def _whole_batch(
        request: pb.PushRequest, host_id: str, latest_end: int, earliest_end: int
    ) -> tuple[list[str], list[UsageRecord], list[int]] | None:
        """The common batch, checked a column at a time: (ids, records, seqs) when every
        record is valid, of the caller's host, unique in the batch, within the future
        tolerance and the maximum lateness; otherwise None (see :meth:`_one_by_one`)."""
        messages = list(request.records)
        if not messages:
            return None
        ids, hosts, metrics, quantities, units, starts, ends, seqs, labels = (
            list(map(field, messages)) for field in _FIELDS
        )
        count = len(ids)
        if (
            hosts.count(host_id) != count
            or max(ends) > latest_end
            or min(ends) < earliest_end
            or max(seqs) > MAX_STORED_SEQ
        ):
            return None
        records = build_records(
            ids, hosts, metrics, quantities, units, starts, ends, seqs, labels
        )
        if records is None or len(set(ids)) != count:
            return None
        return ids, records, seqs

    @staticmethod
    def _whole_columns(
        columns: pb.RecordColumns, host_id: str, latest_end: int, earliest_end: int
    ) -> tuple[list[str], SeriesBatch, list[int]] | None:
        """:meth:`_whole_batch` for a batch in column form (columns of equal lengths):
        each series checked once, each column read whole, the records kept in column
        form (:class:`SeriesBatch`)."""
        ids = list(columns.ids)
        if not ids or columns.host_id != host_id:
            return None
        ends, seqs = list(columns.end_us), list(columns.seqs)
        if max(ends) > latest_end or min(ends) < earliest_end or max(seqs) > MAX_STORED_SEQ:
            return None
        batch = build_series_batch(
            host_id,
            ids,
            list(columns.series),
            [(s.metric, s.unit, s.labels) for s in columns.series_table],
            list(columns.quantities),
            list(columns.start_us),
            ends,
            seqs,
        )
        if batch is None or len(set(ids)) != len(ids):
            return None
        return ids, batch, seqs

    def _one_by_one(
        self,
        messages: Sequence[pb.UsageRecord],
        refused: Mapping[int, str],
        host_id: str,
        latest_end: int,
        earliest_end: int,
        now_us: int,
        ids: list[str],
        rejected: dict[int, str],
        repeated: list[int],
        valid: list[UsageRecord],
        late: list[UsageRecord],
        seqs: list[int],
    ) -> None:
        """Each record on its own, with its reason when it is refused (any batch that
        :meth:`_whole_batch` does not take); ``refused`` are rejected with their reason."""
        validate = self._validate
        first: dict[str, UsageRecord] = {}
        for index, message in enumerate(messages):
            ids.append(message.id)
            reason = refused.get(index)
            if reason is not None:
                rejected[index] = reason
                seqs.append(message.seq)
                continue
            try:
                record = validate(message, host_id, latest_end, earliest_end, now_us)
            except RecordError as exc:
                rejected[index] = str(exc)
                seqs.append(message.seq)
                continue
            earlier = first.get(record.id)
            if earlier is None:
                first[record.id] = record
                seqs.append(record.seq)
                # --- billing: beyond the maximum lateness: quarantined, not rejected ---
                if record.end_us < earliest_end:
                    late.append(record)
                    continue
                # --- end billing ---------------------------------------------------------
                valid.append(record)
            elif earlier == record:
                repeated.append(index)
            else:
                rejected[index] = "id repeated in the batch with different contents"
                seqs.append(message.seq)

    def _validate(
        self,
        message: pb.UsageRecord,
        host_id: str,
        latest_end: int,
        earliest_end: int,
        now_us: int,
    ) -> UsageRecord:
        if message.host_id != host_id:
            raise RecordError(
                f"record names host {message.host_id!r} but the certificate is for {host_id!r}"
            )
        record = from_proto(message)
        if record.end_us > latest_end:
            raise RecordError(
                f"window ends {(record.end_us - now_us) // 1_000_000} s after the collector's"
                f" clock (tolerance {self._config.future_tolerance_seconds} s)"
            )
        if record.seq > MAX_STORED_SEQ:
            raise RecordError(f"seq {record.seq} is past 2^63-1, the most the ledger stores")
        return record
