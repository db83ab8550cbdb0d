"""The outbox: events written in the same transaction as the change that causes them.

Pure: validates and encodes an event; the stores write it (``LedgerTx.emit``) and the
delivery worker (:mod:`collector.webhooks`) sends it. Each shard has its own outbox,
numbered 1, 2, 3, ... without gaps in the order its transactions committed: on SQLite
one writer at a time holds the file, on PostgreSQL an emitting transaction takes the
shard's outbox head row (``outbox_head``) last, just before COMMIT, so the next one
waits for that commit before it numbers its events. Events of one account live on its
shard; events that belong to no account (``account_id == ""``, e.g. ``agent.silent``)
are written on the control shard.

Outbox rows never change (UPDATE is refused in the database); what happened to each
event on its way to a subscriber lives on the control shard, with the subscriptions.

``data`` is JSON: strings, integers, booleans, null, lists and objects with string
keys. Amounts and quantities are decimal strings; a ``float`` anywhere is refused, as
on every money path, and a ``Decimal`` is written as its exact decimal text.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from common.errors import ValidationError

INVOICE_FINALIZED = "invoice.finalized"
INVOICE_ADJUSTED = "invoice.adjusted"
INVOICE_CREDITED = "invoice.credited"
USAGE_LATE = "usage.late"
USAGE_QUARANTINED = "usage.quarantined"
AGENT_SILENT = "agent.silent"
BALANCE_THRESHOLD_CROSSED = "balance.threshold_crossed"

EVENT_TYPES: frozenset[str] = frozenset(
    {
        INVOICE_FINALIZED,
        INVOICE_ADJUSTED,
        INVOICE_CREDITED,
        USAGE_LATE,
        USAGE_QUARANTINED,
        AGENT_SILENT,
        BALANCE_THRESHOLD_CROSSED,
    }
)

MAX_DATA_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class OutboxEvent:
    """One committed outbox row, as the delivery worker reads it."""

    seq: int
    event_id: str
    event_type: str
    account_id: str
    data: str  # JSON text, exactly as emitted
    created_us: int


def check_event_type(event_type: str) -> str:
    if event_type not in EVENT_TYPES:
        raise ValidationError(
            f"unknown event type {event_type!r}: expected one of {', '.join(sorted(EVENT_TYPES))}"
        )
    return event_type


def encode_data(event_type: str, account_id: str, data: Mapping[str, Any]) -> str:
    """``data`` as compact JSON text (sorted keys), after checking the event is well formed.

    Raises :class:`ValidationError` for an unknown event type, an account id that is not
    a string, data that is not a JSON object, a float or any value JSON cannot hold.
    """
    check_event_type(event_type)
    if not isinstance(account_id, str):
        raise ValidationError(f"event {event_type}: account_id must be a string")
    if not isinstance(data, Mapping):
        raise ValidationError(f"event {event_type}: data must be a JSON object (a mapping)")
    plain = _plain(data, f"event {event_type}: data")
    text = json.dumps(plain, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    if len(text.encode()) > MAX_DATA_BYTES:
        raise ValidationError(f"event {event_type}: data is larger than {MAX_DATA_BYTES} bytes")
    return text


def _plain(value: Any, where: str) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        raise ValidationError(f"{where} is the float {value!r}: write amounts as decimal strings")
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise ValidationError(f"{where} is {value}: expected a finite decimal")
        return format(value, "f")
    if isinstance(value, Mapping):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValidationError(f"{where}: object keys must be strings, got {key!r}")
            out[key] = _plain(item, f"{where}.{key}")
        return out
    if isinstance(value, list | tuple):
        return [_plain(item, f"{where}[{i}]") for i, item in enumerate(value)]
    raise ValidationError(f"{where} is a {type(value).__name__}, which JSON cannot hold")
