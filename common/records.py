"""The usage record: one sampled quantity of one metric over a window on one host.

A record's id is a UUIDv7 fixed when the sample is taken, so every resend of the
same usage is the same record and the collector can drop duplicates by id.
Quantities are exact decimals in SI base units (bytes, seconds, byte_seconds).
Times are UTC, carried as integer microseconds since the Unix epoch.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from types import MappingProxyType

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

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def to_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch for an aware datetime."""
    if moment.tzinfo is None:
        raise RecordError("timestamps must carry a time zone (UTC)")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    """The UTC datetime for microseconds since the Unix epoch."""
    return _EPOCH + timedelta(microseconds=us)


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

    def __post_init__(self) -> None:
        try:
            parsed = uuid.UUID(self.id)
        except (ValueError, TypeError, AttributeError):
            raise RecordError(f"id {self.id!r} is not a UUID") from None
        if str(parsed) != self.id:
            raise RecordError(f"id {self.id!r} is not in canonical lower-case UUID form")
        if not isinstance(self.host_id, str) or not HOST_ID.fullmatch(self.host_id):
            raise RecordError(f"host_id {self.host_id!r} is not a valid host id")
        if not isinstance(self.metric, str) or not METRIC_NAME.fullmatch(self.metric):
            raise RecordError(f"metric {self.metric!r} is not a dotted lower-case name")
        try:
            quantity = to_decimal(self.quantity, "quantity")
        except MoneyError as exc:
            raise RecordError(str(exc)) from None
        if quantity < 0:
            raise RecordError(f"quantity {self.quantity} is negative")
        exponent = quantity.as_tuple().exponent
        if quantity >= MAX_QUANTITY:
            raise RecordError("quantity is more than 10^30 base units")
        if isinstance(exponent, int) and exponent < -MAX_QUANTITY_SCALE:
            raise RecordError(f"quantity has more than {MAX_QUANTITY_SCALE} decimal places")
        if len(quantity.as_tuple().digits) > MAX_QUANTITY_DIGITS:
            raise RecordError(f"quantity has more than {MAX_QUANTITY_DIGITS} digits")
        object.__setattr__(self, "quantity", quantity)
        if self.unit not in UNITS:
            raise RecordError(f"unit {self.unit!r} is not one of {sorted(UNITS)}")
        if not isinstance(self.start_us, int) or not isinstance(self.end_us, int):
            raise RecordError("window start and end must be integer microseconds")
        if self.start_us < 0 or self.end_us < self.start_us:
            raise RecordError("window end is before its start")
        if not isinstance(self.seq, int) or self.seq < 0:
            raise RecordError(f"seq {self.seq!r} must be a non-negative integer")
        labels = dict(self.labels)
        if len(labels) > MAX_LABELS:
            raise RecordError(f"more than {MAX_LABELS} labels")
        for key, value in labels.items():
            if not key or len(key) > MAX_LABEL_TEXT or len(value) > MAX_LABEL_TEXT:
                raise RecordError(f"label {key!r} is empty or longer than {MAX_LABEL_TEXT}")
        object.__setattr__(self, "labels", MappingProxyType(dict(sorted(labels.items()))))

    @property
    def start(self) -> datetime:
        return from_us(self.start_us)

    @property
    def end(self) -> datetime:
        return from_us(self.end_us)

    @property
    def quantity_text(self) -> str:
        return canonical_text(self.quantity)
