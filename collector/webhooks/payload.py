"""What a receiver gets: the JSON body of a delivery, and which events a subscription takes.

Body (UTF-8 JSON, the same bytes on every retry and replay of a delivery)::

    {"type": "invoice.finalized",          the event type
     "timestamp": "2026-12-01T00:00:03.120511Z",   when the event was written (UTC)
     "id": "0193...",                      the event id, also the webhook-id header
     "account_id": "acme",                 "" for events of no account (agent.silent)
     "sequence": 42,                       1, 2, 3, ... per subscription, no gaps
     "data": {...}}                        the event's data; amounts are decimal strings

A subscription's filter is a list of event types, ``group.*`` patterns (``invoice.*``)
or ``*``; an empty list takes every event.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence

from collector.ledger.outbox import EVENT_TYPES, OutboxEvent
from common.errors import ValidationError
from common.records import from_us


def delivery_body(event: OutboxEvent, sequence: int) -> str:
    moment = from_us(event.created_us).isoformat(timespec="microseconds")
    return json.dumps(
        {
            "type": event.event_type,
            "timestamp": moment.replace("+00:00", "Z"),
            "id": event.event_id,
            "account_id": event.account_id,
            "sequence": sequence,
            "data": json.loads(event.data),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


def check_filters(filters: Iterable[str]) -> tuple[str, ...]:
    """The filter, checked: each entry names a known event type, a group or ``*``."""
    groups = {t.split(".", 1)[0] for t in EVENT_TYPES}
    checked = []
    for item in filters:
        known = item == "*" or item in EVENT_TYPES
        if not known and not (item.endswith(".*") and item[:-2] in groups):
            raise ValidationError(
                f"unknown event type {item!r}: expected one of {', '.join(sorted(EVENT_TYPES))},"
                f" a group such as 'invoice.*', or '*'"
            )
        if item not in checked:
            checked.append(item)
    return tuple(checked)


def matches(filters: Sequence[str], event_type: str) -> bool:
    if not filters:
        return True
    group = event_type.split(".", 1)[0] + ".*"
    return any(f in ("*", event_type, group) for f in filters)
