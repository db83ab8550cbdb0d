"""Conversion between :class:`UsageRecord` and its protobuf messages, at the boundary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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


def to_columns(records: Sequence[UsageRecord]) -> pb.RecordColumns | None:
    """The records (at least one) as one :class:`pb.RecordColumns`, each distinct
    (metric, unit, labels) once in its series table, in order of first use; None when
    they are not all of one host (the column form names one)."""
    host_id = records[0].host_id
    if any(r.host_id != host_id for r in records):
        return None
    table: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
    series_table: list[pb.Series] = []
    series: list[int] = []
    for r in records:
        key = (r.metric, r.unit, tuple(sorted(r.labels.items())))
        index = table.get(key)
        if index is None:
            index = table[key] = len(series_table)
            series_table.append(pb.Series(metric=r.metric, unit=r.unit, labels=dict(r.labels)))
        series.append(index)
    return pb.RecordColumns(
        host_id=host_id,
        ids=[r.id for r in records],
        series=series,
        quantities=[r.quantity_text for r in records],
        start_us=[r.start_us for r in records],
        end_us=[r.end_us for r in records],
        seqs=[r.seq for r in records],
        series_table=series_table,
    )


def column_lengths_problem(columns: pb.RecordColumns) -> str:
    """Why the columns cannot be read as records (they differ in length), or ""."""
    lengths = {
        "ids": len(columns.ids),
        "series": len(columns.series),
        "quantities": len(columns.quantities),
        "start_us": len(columns.start_us),
        "end_us": len(columns.end_us),
        "seqs": len(columns.seqs),
    }
    if len(set(lengths.values())) == 1:
        return ""
    listed = ", ".join(f"{name} {length}" for name, length in lengths.items())
    return f"record columns differ in length ({listed}): one value per record in each"


def column_messages(columns: pb.RecordColumns) -> tuple[list[pb.UsageRecord], Mapping[int, str]]:
    """Each record of ``columns`` (of equal lengths) as its own message, in order, and
    the reason of each whose series index names no entry of the series table (its
    message then holds only its id and seq)."""
    table = columns.series_table
    host_id = columns.host_id
    messages: list[pb.UsageRecord] = []
    refused: dict[int, str] = {}
    rows = zip(
        columns.ids, columns.series, columns.quantities, columns.start_us, columns.end_us,
        columns.seqs, strict=True,
    )
    for index, (record_id, kind, quantity, start_us, end_us, seq) in enumerate(rows):
        if kind >= len(table):
            messages.append(pb.UsageRecord(id=record_id, seq=seq))
            refused[index] = (
                f"series {kind} is not in the batch's series table ({len(table)} entries)"
            )
            continue
        entry = table[kind]
        messages.append(pb.UsageRecord(
            id=record_id, host_id=host_id, metric=entry.metric, quantity=quantity,
            unit=entry.unit, start_us=start_us, end_us=end_us, seq=seq, labels=entry.labels,
        ))
    return messages, refused


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
