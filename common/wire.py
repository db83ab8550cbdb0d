"""Conversion between :class:`UsageRecord` and its protobuf message, at the boundary."""

from __future__ import annotations

from common.errors import RecordError
from common.proto import meterd_pb2 as pb
from common.records import UsageRecord


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
    """A validated record, or :class:`RecordError` with the reason."""
    if not message.quantity:
        raise RecordError("quantity is missing")
    return UsageRecord(
        id=message.id,
        host_id=message.host_id,
        metric=message.metric,
        quantity=message.quantity,  # type: ignore[arg-type]  # validated as decimal text
        unit=message.unit,
        start_us=message.start_us,
        end_us=message.end_us,
        seq=message.seq,
        labels=dict(message.labels),
    )
