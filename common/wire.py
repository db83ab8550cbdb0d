"""Conversion between :class:`UsageRecord` and its protobuf message, at the boundary."""

from __future__ import annotations

from common.errors import RecordError
from common.proto import meterd_pb2 as pb
from common.records import UsageRecord, build_record


def to_proto(record: UsageRecord) -> pb.UsageRecord:
    return pb.UsageRecord(
        id=record.id,
        host_id=record.host_id,
        metric=record.metric,
        quantity=record.quantity_text,
        unit=record.unit,
        start_us=record.start_us,
        end_us=record.end_us,
        seq=record.seq,
        labels=dict(record.labels),
    )


def from_proto(message: pb.UsageRecord) -> UsageRecord:
    """A validated record, or :class:`RecordError` with the reason.

    Each field is read from the message once and checked once, by the record's own
    rules (:func:`common.records.build_record`); the label map is handed over as it is
    (a sorted, frozen copy is kept).
    """
    quantity = message.quantity
    if not quantity:
        raise RecordError("quantity is missing")
    return build_record(
        message.id,
        message.host_id,
        message.metric,
        quantity,
        message.unit,
        message.start_us,
        message.end_us,
        message.seq,
        message.labels,
    )
