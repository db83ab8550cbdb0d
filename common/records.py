"""The usage record: one sampled quantity of one metric over a window on one host.

A record's id is a UUIDv7 fixed when the sample is taken, so every resend of the
same usage is the same record and the collector can drop duplicates by id.
Quantities are exact decimals in SI base units (bytes, seconds, byte_seconds).
Times are UTC, carried as integer microseconds since the Unix epoch.

Validation runs on every construction and is exact: a record is built only if every
rule holds. The common shapes are checked cheaply (a compiled pattern for the
canonical UUID text, one for plain decimal text that proves the quantity's range,
scale and digit count without arithmetic, label sets validated and frozen once per
distinct set); anything else takes the general path, which gives the same verdict
and the reason.
"""

from __future__ import annotations

import operator
import re
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from itertools import repeat
from types import MappingProxyType
from typing import overload

from common.errors import MoneyError, RecordError
from common.money import canonical_text, to_decimal

METRIC_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
HOST_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
UNITS = frozenset({"bytes", "seconds", "byte_seconds", "count", "requests"})
MAX_LABELS = 16
MAX_LABEL_TEXT = 256
MAX_QUANTITY_DIGITS = 40
MAX_QUANTITY = 10**30  # bytes, seconds or byte_seconds in one record: far above any real window
MAX_QUANTITY_SCALE = 18  # decimal places
MAX_STORED_SEQ = 2**63 - 1  # the ledgers store sequence numbers as signed 64-bit integers

# The canonical text of a UUID (what ``str(uuid.UUID(x))`` gives): lower-case hex, 8-4-4-4-12.
_UUID_TEXT = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# Plain decimal text that every quantity rule accepts: no sign, no exponent, no leading
# zeros, at most 30 integer digits (below 10^30) and 18 decimal places. Together with
# a length of at most 41 characters it also has at most 40 significant digits.
_PLAIN_QUANTITY = re.compile(r"(?:0|[1-9][0-9]{0,29})(?:\.[0-9]{1,18})?")
_PLAIN_QUANTITY_MAX_LEN = MAX_QUANTITY_DIGITS + 1
_uuid_text = _UUID_TEXT.fullmatch
_plain_quantity = _PLAIN_QUANTITY.fullmatch
# A batch's quantity column in one match: its texts joined by newlines (which the
# pattern does not admit, so the pieces between them are exactly the column's texts).
# Its id column is checked whole without a pattern (_uuid_column).
_PLAIN_QUANTITY_COLUMN = re.compile(
    f"{_PLAIN_QUANTITY.pattern}(?:\n{_PLAIN_QUANTITY.pattern})*"
).fullmatch

EMPTY_LABELS: Mapping[str, str] = MappingProxyType({})

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Windows end no later than the last microsecond a datetime can hold (year 9999), far
# inside the int64 the wire carries; seq is the wire's uint64.
MAX_US = 253_402_300_799_999_999
MAX_SEQ = 2**64 - 1


def to_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch for an aware datetime."""
    if moment.tzinfo is None:
        raise RecordError("timestamps must carry a time zone (UTC)")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """The UTC datetime for microseconds since the Unix epoch."""
    return _EPOCH + timedelta(microseconds=us)


def _id_problem(value: object) -> str:
    try:
        uuid.UUID(value)  # type: ignore[arg-type]
    except (ValueError, TypeError, AttributeError):
        return f"id {value!r} is not a UUID"
    return f"id {value!r} is not in canonical lower-case UUID form"


# Decimal text as the wire defines it: ASCII digits, an optional point, an optional
# minus (refused as negative with its own reason). No exponent, no spaces, no "+", no
# leading zeros, no underscores, no digits of other scripts: Decimal() would take all
# of those, and a quantity must read the same to every client that parses it.
_DECIMAL_TEXT = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?", re.ASCII)
# Label text may hold anything printable; control characters (U+0000 above all, which
# PostgreSQL cannot store) never come from a cgroup path or an interface name.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _checked_quantity(value: object) -> Decimal:
    """The general path: any accepted representation, each rule with its reason."""
    if isinstance(value, str) and not _DECIMAL_TEXT.fullmatch(value):
        raise RecordError(
            f"quantity {value[:64]!r} is not decimal text (ASCII digits and an optional point)"
        )
    try:
        quantity = to_decimal(value, "quantity")
    except MoneyError as exc:
        raise RecordError(str(exc)) from None
    if quantity.is_signed():
        raise RecordError(f"quantity {value} is negative")
    if quantity >= MAX_QUANTITY:
        raise RecordError("quantity is more than 10^30 base units")
    sign_digits_exponent = quantity.as_tuple()
    exponent = sign_digits_exponent.exponent
    if isinstance(exponent, int) and exponent < -MAX_QUANTITY_SCALE:
        raise RecordError(f"quantity has more than {MAX_QUANTITY_SCALE} decimal places")
    if len(sign_digits_exponent.digits) > MAX_QUANTITY_DIGITS:
        raise RecordError(f"quantity has more than {MAX_QUANTITY_DIGITS} digits")
    return quantity


def _frozen_labels(items: tuple[tuple[str, str], ...]) -> Mapping[str, str]:
    """A validated, read-only label set. A fleet repeats a few label sets, so each is
    checked and frozen once and the same read-only mapping is shared by its records."""
    frozen = _FROZEN_LABELS.get(items)
    if frozen is not None:
        return frozen
    if len(items) > MAX_LABELS:
        raise RecordError(f"more than {MAX_LABELS} labels")
    for key, value in items:
        if not isinstance(key, str) or not isinstance(value, str):
            raise RecordError(f"label {key!r}: keys and values must be text")
        if not key or len(key) > MAX_LABEL_TEXT or len(value) > MAX_LABEL_TEXT:
            raise RecordError(f"label {key!r} is empty or longer than {MAX_LABEL_TEXT}")
        if _CONTROL.search(key) or _CONTROL.search(value):
            raise RecordError(f"label {key!r} holds a control character")
    if len(_FROZEN_LABELS) >= _FROZEN_LABELS_MAX:
        _FROZEN_LABELS.clear()
    frozen = _FROZEN_LABELS[items] = MappingProxyType(dict(items))
    return frozen


_FROZEN_LABELS: dict[tuple[tuple[str, str], ...], Mapping[str, str]] = {}
_FROZEN_LABELS_MAX = 4096


def _labels(labels: Mapping[str, str]) -> Mapping[str, str]:
    if not labels:
        return EMPTY_LABELS
    # Keys and item lookups, not ``items()``: a protobuf map's ``items()`` is the slow
    # generic one, and one label (the common case) needs no sort.
    try:
        if len(labels) == 1:
            for key in labels:
                return _frozen_labels(((key, labels[key]),))
        return _frozen_labels(tuple(sorted([(key, labels[key]) for key in labels])))
    except TypeError:  # keys that do not sort, or values that cannot be hashed
        raise RecordError("labels must map text keys to text values") from None


# Host ids and metric names already found valid: a fleet repeats a few of each.
_VALID_HOSTS: set[str] = set()
_VALID_METRICS: set[str] = set()
_VALID_NAMES_MAX = 65_536


def _valid(known: set[str], pattern: re.Pattern[str], value: str) -> bool:
    if not pattern.fullmatch(value):
        return False
    if len(known) >= _VALID_NAMES_MAX:
        known.clear()
    known.add(value)
    return True


def _checked(
    record_id: object,
    host_id: object,
    metric: object,
    quantity: object,
    unit: object,
    start_us: object,
    end_us: object,
    seq: object,
    labels: Mapping[str, str],
) -> tuple[Decimal, str, Mapping[str, str]]:
    """Every rule of a record, in order, with its reason: the quantity as a Decimal, its
    canonical text when the input already was it (else ""), the frozen labels."""
    if type(record_id) is not str or not _uuid_text(record_id):
        raise RecordError(_id_problem(record_id))
    if not isinstance(host_id, str) or (
        host_id not in _VALID_HOSTS and not _valid(_VALID_HOSTS, HOST_ID, host_id)
    ):
        raise RecordError(f"host_id {host_id!r} is not a valid host id")
    if not isinstance(metric, str) or (
        metric not in _VALID_METRICS and not _valid(_VALID_METRICS, METRIC_NAME, metric)
    ):
        raise RecordError(f"metric {metric!r} is not a dotted lower-case name")
    text = ""
    if (
        type(quantity) is str
        and len(quantity) <= _PLAIN_QUANTITY_MAX_LEN
        and _plain_quantity(quantity)
    ):
        value = Decimal(quantity)
        if "." not in quantity or quantity[-1] != "0":  # already canonical: keep the text
            text = quantity
    else:
        value = _checked_quantity(quantity)
    if not isinstance(unit, str) or unit not in UNITS:
        raise RecordError(f"unit {unit!r} is not one of {sorted(UNITS)}")
    if not isinstance(start_us, int) or not isinstance(end_us, int):
        raise RecordError("window start and end must be integer microseconds")
    if start_us < 0 or end_us < start_us:
        raise RecordError("window end is before its start")
    if end_us > MAX_US:
        raise RecordError(f"window end {end_us} lies after the year 9999")
    if not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise RecordError(f"seq {seq!r} must be an integer from 0 to 2^64-1")
    return value, text, _labels(labels)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """A validated usage record. Construction fails with :class:`RecordError`."""

    id: str
    host_id: str
    metric: str
    quantity: Decimal
    unit: str
    start_us: int
    end_us: int
    seq: int
    labels: Mapping[str, str] = field(default_factory=dict)
    # The quantity's canonical text, once it has been needed (or known from the wire).
    _quantity_text: str = field(default="", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        quantity, text, labels = _checked(
            self.id, self.host_id, self.metric, self.quantity, self.unit, self.start_us,
            self.end_us, self.seq, self.labels,
        )
        object.__setattr__(self, "quantity", quantity)
        object.__setattr__(self, "_quantity_text", text)
        object.__setattr__(self, "labels", labels)

    @property
    def start(self) -> datetime:
        return from_us(self.start_us)

    @property
    def end(self) -> datetime:
        return from_us(self.end_us)

    @property
    def quantity_text(self) -> str:
        text = self._quantity_text
        if not text:
            text = canonical_text(self.quantity)
            object.__setattr__(self, "_quantity_text", text)
        return text


# The record's slots, set directly by :func:`build_record`.
_SLOTS = tuple(
    getattr(UsageRecord, name).__set__
    for name in ("id", "host_id", "metric", "quantity", "unit", "start_us", "end_us", "seq",
                 "labels", "_quantity_text")
)


def build_record(
    record_id: str,
    host_id: str,
    metric: str,
    quantity: Decimal | str,
    unit: str,
    start_us: int,
    end_us: int,
    seq: int,
    labels: Mapping[str, str],
) -> UsageRecord:
    """``UsageRecord(...)`` with the same checks (:func:`_checked`, so the same verdict
    and reason), assembled without the dataclass constructor's per-field detour: what
    the ingest path builds a record from the wire with."""
    value, text, frozen = _checked(
        record_id, host_id, metric, quantity, unit, start_us, end_us, seq, labels
    )
    record = _new(UsageRecord)
    s_id, s_host, s_metric, s_quantity, s_unit, s_start, s_end, s_seq, s_labels, s_text = _SLOTS
    s_id(record, record_id)
    s_host(record, host_id)
    s_metric(record, metric)
    s_quantity(record, value)
    s_unit(record, unit)
    s_start(record, start_us)
    s_end(record, end_us)
    s_seq(record, seq)
    s_labels(record, frozen)
    s_text(record, text)
    return record


_new = object.__new__


def _column_types(column: Sequence[object], *allowed: type) -> bool:
    """Whether every value of ``column`` is an instance of one of ``allowed``."""
    return all(issubclass(t, allowed) for t in set(map(type, column)))


def _text_column(column: Sequence[str], full: Callable[[str], object]) -> bool:
    """Whether every value is exactly a ``str`` and the values, joined by newlines,
    match ``full`` as a whole: one value per newline-separated piece."""
    if set(map(type, column)) != {str}:
        return False
    joined = "\n".join(column)
    return joined.count("\n") == len(column) - 1 and full(joined) is not None


_HEX_DIGITS = b"0123456789abcdef"
_UUID_LEN = 36
_UUID_DASHES = (8, 13, 18, 23)


def _uuid_column(column: Sequence[str]) -> bool:
    """Whether every value is exactly a ``str`` that :data:`_UUID_TEXT` matches, checked
    on the values joined by newlines (ten times faster than the pattern): ASCII of the
    length of ``n`` UUIDs and ``n - 1`` newlines, a newline after every 36 characters
    and a dash at each of a UUID's four dash positions, and nothing else in it but
    lowercase hexadecimal digits."""
    n = len(column)
    if set(map(type, column)) != {str}:
        return False
    joined = "\n".join(column)
    step = _UUID_LEN + 1
    if len(joined) != step * n - 1:
        return False
    try:
        raw = joined.encode("ascii")
    except UnicodeEncodeError:
        return False
    dashes = b"-" * n
    return (
        raw[_UUID_LEN::step] == b"\n" * (n - 1)
        and all(raw[p::step] == dashes for p in _UUID_DASHES)
        and raw.translate(None, _HEX_DIGITS) == b"----\n" * (n - 1) + b"----"
    )


def _names_valid(column: Sequence[object], known: set[str], pattern: re.Pattern[str]) -> bool:
    try:
        distinct = set(column)
    except TypeError:
        return False
    return all(
        isinstance(v, str) and (v in known or _valid(known, pattern, v)) for v in distinct
    )


def build_records(
    record_ids: Sequence[str],
    host_ids: Sequence[str],
    metrics: Sequence[str],
    quantities: Sequence[str],
    units: Sequence[str],
    starts_us: Sequence[int],
    ends_us: Sequence[int],
    seqs: Sequence[int],
    labels: Sequence[Mapping[str, str]],
) -> list[UsageRecord] | None:
    """The records of a batch given column by column (one value per record in each), or
    None unless every record is valid with its quantity in plain decimal text.

    The same rules as :func:`build_record`, checked a column at a time: a list is
    returned only if :func:`build_record` would build each record (equal to what it
    builds); on None the caller builds them one by one for each verdict and reason."""
    if not record_ids:
        return []
    if not (
        _names_valid(host_ids, _VALID_HOSTS, HOST_ID)
        and _names_valid(metrics, _VALID_METRICS, METRIC_NAME)
        and _units_valid(units)
    ):
        return None
    try:
        frozen = list(map(_labels, labels))
    except RecordError:
        return None
    n = len(record_ids)
    if not (
        len(host_ids) == len(metrics) == len(units) == len(frozen) == n
        and _columns_valid(record_ids, quantities, starts_us, ends_us, seqs, n)
    ):
        return None
    texts = [q if "." not in q or q[-1] != "0" else "" for q in quantities]
    return _made(
        n, record_ids, host_ids, metrics, list(map(Decimal, quantities)), units, starts_us,
        ends_us, seqs, frozen, texts,
    )


def build_series_batch(
    host_id: str,
    record_ids: Sequence[str],
    series: Sequence[int],
    series_table: Sequence[tuple[str, str, Mapping[str, str]]],
    quantities: Sequence[str],
    starts_us: Sequence[int],
    ends_us: Sequence[int],
    seqs: Sequence[int],
) -> SeriesBatch | None:
    """The records of one host whose metric, unit and labels are given once per series
    (``series_table[series[i]]`` is the (metric, unit, labels) of the i-th record), as a
    :class:`SeriesBatch`; None unless every record is valid with its quantity in plain
    decimal text and every index names an entry of the table. Each series is checked
    and its labels frozen once; the other columns are checked whole, the rules of
    :func:`build_record` (which then builds each record equal to the batch's)."""
    n = len(record_ids)
    if not n or len(series) != n or not _column_types(series, int):
        return None
    metrics_of, units_of, labels_of = [], [], []
    try:
        for metric, unit, labels in series_table:
            metrics_of.append(metric)
            units_of.append(unit)
            labels_of.append(_labels(labels))
    except RecordError:
        return None
    if not (
        min(series) >= 0
        and max(series) < len(series_table)
        and _names_valid((host_id,), _VALID_HOSTS, HOST_ID)
        and _names_valid(metrics_of, _VALID_METRICS, METRIC_NAME)
        and _units_valid(units_of)
        and _columns_valid(record_ids, quantities, starts_us, ends_us, seqs, n)
    ):
        return None
    return SeriesBatch(
        host_id, record_ids, series, metrics_of, units_of, labels_of, quantities,
        starts_us, ends_us, seqs,
    )


class SeriesBatch(Sequence[UsageRecord]):
    """Valid records of one host in column form, as :func:`build_series_batch` found
    them: one list per field, and the metric, unit and labels once per series.

    The ingest path reads it column by column (routing, the ledger's insert, rating);
    the :class:`UsageRecord` objects are made, all at once and equal to what
    :func:`build_record` builds, only when something reads the batch as a sequence.
    Its lists are its own and never change."""

    __slots__ = (
        "_records",
        "_texts",
        "ends_us",
        "host_id",
        "ids",
        "labels",
        "metrics",
        "quantities",
        "seqs",
        "series",
        "starts_us",
        "units",
        "values",
    )

    def __init__(
        self,
        host_id: str,
        ids: Sequence[str],
        series: Sequence[int],
        metrics: Sequence[str],
        units: Sequence[str],
        labels: Sequence[Mapping[str, str]],
        quantities: Sequence[str],
        starts_us: Sequence[int],
        ends_us: Sequence[int],
        seqs: Sequence[int],
    ) -> None:
        self.host_id = host_id
        self.ids = ids
        self.series = series  # per record: its index into metrics, units and labels
        self.metrics = metrics
        self.units = units
        self.labels = labels  # frozen label sets, shared by the records of each series
        self.quantities = quantities  # as received: plain decimal text
        self.values = list(map(Decimal, quantities))
        self.starts_us = starts_us
        self.ends_us = ends_us
        self.seqs = seqs
        self._texts: list[str] | None = None
        self._records: list[UsageRecord] | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> UsageRecord: ...

    @overload
    def __getitem__(self, index: slice) -> list[UsageRecord]: ...

    def __getitem__(self, index: int | slice) -> UsageRecord | list[UsageRecord]:
        return self.records()[index]

    def __iter__(self) -> Iterator[UsageRecord]:
        return iter(self.records())

    @property
    def quantity_texts(self) -> list[str]:
        """Each record's :attr:`UsageRecord.quantity_text`."""
        if self._texts is None:
            self._texts = [
                q if "." not in q or q[-1] != "0" else canonical_text(v)
                for q, v in zip(self.quantities, self.values, strict=True)
            ]
        return self._texts

    def records(self) -> list[UsageRecord]:
        """The records, made once."""
        if self._records is None:
            n = len(self.ids)
            series = self.series
            texts = [q if "." not in q or q[-1] != "0" else "" for q in self.quantities]
            self._records = _made(
                n, self.ids, list(repeat(self.host_id, n)),
                list(map(self.metrics.__getitem__, series)), self.values,
                list(map(self.units.__getitem__, series)), self.starts_us, self.ends_us,
                self.seqs, list(map(self.labels.__getitem__, series)), texts,
            )
        return self._records


def _columns_valid(
    record_ids: Sequence[str],
    quantities: Sequence[str],
    starts_us: Sequence[int],
    ends_us: Sequence[int],
    seqs: Sequence[int],
    n: int,
) -> bool:
    """Whether ``n`` records have valid ids, plain decimal quantities, windows and seqs,
    each column checked whole (every column of length ``n``, at least one)."""
    return bool(
        len(record_ids) == len(quantities) == len(starts_us) == len(ends_us) == len(seqs) == n
        and _uuid_column(record_ids)
        and _text_column(quantities, _PLAIN_QUANTITY_COLUMN)
        and max(map(len, quantities)) <= _PLAIN_QUANTITY_MAX_LEN
        and _column_types(starts_us, int)
        and _column_types(ends_us, int)
        and _column_types(seqs, int)
        and min(starts_us) >= 0
        and all(map(operator.le, starts_us, ends_us))
        and max(ends_us) <= MAX_US
        and min(seqs) >= 0
        and max(seqs) <= MAX_SEQ
    )


def _made(n: int, *columns: Sequence[object]) -> list[UsageRecord]:
    """``n`` records from one column per slot (in :data:`_SLOTS` order), unchecked."""
    records = list(map(_new, repeat(UsageRecord, n)))
    for setter, column in zip(_SLOTS, columns, strict=True):
        deque(map(setter, records, column), 0)  # each slot of every record, in C
    return records


def _units_valid(units: Sequence[object]) -> bool:
    try:
        distinct = set(units)
    except TypeError:
        return False
    return all(isinstance(u, str) and u in UNITS for u in distinct)
