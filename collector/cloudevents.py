"""Usage from other systems as CloudEvents 1.0 (JSON event format).

A provisioning system that assigns a dedicated IP, or a backup service that took a
backup, reports the usage as a CloudEvent; ``POST /v1/events`` turns each event into a
usage record and posts it through :meth:`collector.ledger.service.LedgerService.post`,
the path agent records take: deduplicated, rated against the tariff and journaled.

Content modes (CloudEvents HTTP binding):

* structured, one event: ``Content-Type: application/cloudevents+json``, the event
  as a JSON object;
* batch: ``Content-Type: application/cloudevents-batch+json``, a JSON array of events;
* binary, one event: attributes in ``ce-*`` headers, ``Content-Type: application/json``
  and the ``data`` object as the body.

``Content-Type: application/json`` without ``ce-*`` headers is taken as an event (a JSON
object) or a batch (an array), so clients generated from the OpenAPI document work.

The event. ``specversion`` must be ``"1.0"``; ``id``, ``source`` and ``type`` are
non-empty strings (any ``type``: it is the producer's name for what happened);
``time``, when given, is an RFC 3339 instant; ``datacontenttype``, when given, is
JSON; ``data_base64`` is refused. ``data`` is an object with exactly these members::

    {
      "account": "acme",             # or "host": "web-042" (exactly one of the two)
      "metric": "ip.dedicated_seconds",  # a dotted lower-case name, as the tariff prices
      "quantity": "3600",            # decimal text (a JSON string, never a number)
      "unit": "seconds",             # bytes, seconds, byte_seconds, count, requests
      "window": {"start": "2026-11-05T10:00:00Z", "end": "2026-11-05T11:00:00Z"},
      "labels": {"ip": "203.0.113.9"}  # optional, at most 13
    }

``window`` is optional when the event has a ``time``: the usage is then the instant
``time`` (a window of zero length). Unknown members are refused, so a misspelt one
cannot be silently ignored.

How an event becomes a usage record:

* record id: ``uuid5(EVENTS_NAMESPACE, json.dumps([source, id]))`` where
  ``EVENTS_NAMESPACE = uuid5(NAMESPACE_URL, "https://meterd.dev/cloudevents")`` and the
  JSON text is compact (``separators=(",", ":")``, ``ensure_ascii=False``). The same
  ``source`` and ``id`` always give the same record id, and the ledger's unique
  record id drops the second copy: an event sent again, by the same or another
  collector, is answered ``duplicate`` and counted once. Its data are not compared.
* host: ``data.host``, routed to an account by the ``[[assignments]]`` as agent
  records are (held, not dropped, while the host has none); or, for ``data.account``,
  the pseudo-host ``account_<account>``, which bills that account directly (the
  account must be configured). Host names cannot contain ``_``, so no real host
  collides with it; do not give an agent such a name.
* labels: ``data.labels`` plus ``ce_source``, ``ce_id`` and ``ce_type``, so every
  record leads back to its event;
* seq 0; the window is checked as agent records' are: one ending more than ``[ingest]
  future_tolerance_seconds`` ahead of the collector's clock is refused; one that ended
  more than ``max_lateness_days`` ago is quarantined with its reason
  (:mod:`collector.billing.quarantine`), not dropped.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any
from urllib.parse import unquote

import msgspec

from collector.config import IngestConfig
from collector.routing import Router
from common.errors import MoneyError, RecordError, ValidationError
from common.money import to_decimal
from common.records import HOST_ID, UsageRecord, to_us

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"

EVENTS_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://meterd.dev/cloudevents")
ACCOUNT_HOST_PREFIX = "account_"
EVENT_LABELS = ("ce_source", "ce_id", "ce_type")

DAY_US = 86_400 * 1_000_000
_DATA_KEYS = frozenset({"account", "host", "metric", "quantity", "unit", "window", "labels"})
_JSON_MEDIA = re.compile(r"^application/([a-z0-9.+-]*\+)?json$")


class EventError(ValidationError):
    """An event that cannot be taken, with a short ``reason`` label for metrics."""

    def __init__(self, message: str, reason: str = "invalid_event") -> None:
        super().__init__(message)
        self.reason = reason


def record_id(source: str, event_id: str) -> str:
    """The usage record id of the event (``source``, ``id``): stable, see the module."""
    name = json.dumps([source, event_id], separators=(",", ":"), ensure_ascii=False)
    return str(uuid.uuid5(EVENTS_NAMESPACE, name))


def account_host(account: str) -> str:
    return ACCOUNT_HOST_PREFIX + account


# -- decoding -----------------------------------------------------------------------------


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def decode_json(body: bytes) -> Any:
    """JSON text to values; numbers with a fraction become ``Decimal``, never float."""
    try:
        return json.loads(body, parse_float=Decimal, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as exc:
        raise EventError(f"the body is not JSON: {exc}") from None


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def events_of(content_type: str, headers: Mapping[str, str], body: bytes
              ) -> tuple[list[Any], bool]:
    """The events of a request and whether it is a batch. Raises :class:`EventError` when
    the body does not fit its content mode (the whole request is refused then)."""
    media = media_type(content_type)
    if media == BATCH:
        events = decode_json(body)
        if not isinstance(events, list):
            raise EventError("a batch must be a JSON array of events")
        return events, True
    if media == STRUCTURED:
        return [decode_json(body)], False
    if "ce-specversion" in {k.lower() for k in headers}:
        return [binary_event(media, headers, body)], False
    if media == JSON:
        # Plain JSON without ce-* headers: an event, or an array of them, by its shape.
        decoded = decode_json(body)
        return (decoded, True) if isinstance(decoded, list) else ([decoded], False)
    raise EventError(f"unsupported content type {content_type!r}", "unsupported_media_type")


def binary_event(media: str, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """An event in binary content mode: ``ce-*`` headers (percent-decoded) and the body."""
    if not _JSON_MEDIA.match(media):
        raise EventError(f"binary mode needs JSON data, got content type {media!r}",
                         "unsupported_media_type")
    event: dict[str, Any] = {}
    for name, value in headers.items():
        lower = name.lower()
        if lower.startswith("ce-") and len(lower) > 3:
            event[lower[3:]] = unquote(value)
    event["datacontenttype"] = media
    event["data"] = decode_json(body) if body else None
    return event


# -- validation and mapping ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EventUsage:
    """One valid event and the usage record it becomes."""

    source: str
    event_id: str
    record: UsageRecord
    late: bool = False  # beyond the maximum lateness: to quarantine


def _text(event: Mapping[str, Any], name: str) -> str:
    value = event.get(name)
    if not isinstance(value, str) or not value:
        raise EventError(f"attribute {name!r} must be a non-empty string")
    return value


def _instant(value: object, what: str) -> int:
    if not isinstance(value, str):
        raise EventError(f"{what} must be an RFC 3339 string", "invalid_data")
    try:
        moment = msgspec.convert(value, datetime)
    except msgspec.ValidationError:
        raise EventError(f"{what} {value!r} is not an RFC 3339 instant", "invalid_data") from None
    if moment.tzinfo is None:
        raise EventError(f"{what} {value!r} needs a UTC offset (e.g. Z)", "invalid_data")
    return to_us(moment)


def to_usage(
    event: object,
    *,
    now_us: int,
    limits: IngestConfig,
    accounts: Collection[str],
) -> EventUsage:
    """Validate one event and map it to its usage record; :class:`EventError` says why not."""
    if not isinstance(event, Mapping):
        raise EventError("an event must be a JSON object")
    if event.get("specversion") != SPECVERSION:
        raise EventError(f"specversion must be {SPECVERSION!r}, got {event.get('specversion')!r}")
    event_id = _text(event, "id")
    source = _text(event, "source")
    kind = _text(event, "type")
    content = _text(event, "datacontenttype") if "datacontenttype" in event else None
    if content is not None and not _JSON_MEDIA.match(media_type(content)):
        raise EventError(f"datacontenttype must be JSON, got {content!r}")
    if "data_base64" in event:
        raise EventError("data_base64 is not accepted: send data as a JSON object")
    when = event.get("time")
    time_us = _instant(when, "time") if when is not None else None
    data = event.get("data")
    if not isinstance(data, Mapping):
        raise EventError("data must be a JSON object", "invalid_data")
    unknown = sorted(set(data) - _DATA_KEYS)
    if unknown:
        raise EventError(f"data has unknown member {unknown[0]!r}; expected"
                         f" {', '.join(sorted(_DATA_KEYS))}", "invalid_data")
    host_id = _host_of(data, accounts)
    quantity = data.get("quantity")
    if not isinstance(quantity, str):
        raise EventError("data.quantity must be decimal text (a JSON string such as \"1.5\")",
                         "invalid_data")
    start_us, end_us = _window(data.get("window"), time_us)
    late = _is_late(end_us, now_us, limits)
    labels = data.get("labels", {})
    if not isinstance(labels, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
    ):
        raise EventError("data.labels must be an object of strings", "invalid_data")
    clash = sorted(set(labels) & set(EVENT_LABELS))
    if clash:
        raise EventError(f"data.labels may not set {clash[0]!r}", "invalid_data")
    try:
        record = UsageRecord(
            id=record_id(source, event_id),
            host_id=host_id,
            metric=_str(data.get("metric"), "data.metric"),
            quantity=_quantity(quantity),
            unit=_str(data.get("unit"), "data.unit"),
            start_us=start_us,
            end_us=end_us,
            seq=0,
            labels={**labels, "ce_source": source, "ce_id": event_id, "ce_type": kind},
        )
    except RecordError as exc:
        raise EventError(str(exc), "invalid_data") from None
    return EventUsage(source, event_id, record, late)


def _quantity(text: str) -> Decimal:
    try:
        return to_decimal(text, "data.quantity")
    except MoneyError as exc:
        raise EventError(str(exc), "invalid_data") from None


def _str(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise EventError(f"{what} must be a string", "invalid_data")
    return value


def _host_of(data: Mapping[str, Any], accounts: Collection[str]) -> str:
    host, account = data.get("host"), data.get("account")
    if (host is None) == (account is None):
        raise EventError("data must name exactly one of host and account", "invalid_data")
    if host is not None:
        if not isinstance(host, str) or not HOST_ID.fullmatch(host):
            raise EventError(f"data.host {host!r} is not a valid host id", "invalid_data")
        return host
    if not isinstance(account, str) or account not in accounts:
        raise EventError(f"data.account {account!r} is not a configured account",
                         "unknown_account")
    pseudo = account_host(account)
    if not HOST_ID.fullmatch(pseudo):
        raise EventError(
            f"account {account!r} cannot be addressed by events (its id has characters"
            " other than letters, digits, '.', '_' and '-', or is too long): name a host",
            "invalid_data",
        )
    return pseudo


def _window(window: object, time_us: int | None) -> tuple[int, int]:
    if window is None:
        if time_us is None:
            raise EventError("give data.window or the event's time", "invalid_data")
        return time_us, time_us
    if not isinstance(window, Mapping) or set(window) != {"start", "end"}:
        raise EventError("data.window must be an object with start and end", "invalid_data")
    start = _instant(window["start"], "data.window.start")
    end = _instant(window["end"], "data.window.end")
    if end < start:
        raise EventError("data.window ends before it starts", "invalid_data")
    return start, end


def _is_late(end_us: int, now_us: int, limits: IngestConfig) -> bool:
    """Refuse a window ending too far ahead; tell whether it ended beyond the lateness."""
    if end_us > now_us + limits.future_tolerance_seconds * 1_000_000:
        raise EventError(
            f"window ends {(end_us - now_us) // 1_000_000} s after the collector's clock"
            f" (tolerance {limits.future_tolerance_seconds} s)", "future",
        )
    return end_us < now_us - limits.max_lateness_days * DAY_US


def late_reason(limits: IngestConfig) -> str:
    return (f"window ended more than {limits.max_lateness_days} days ago (the maximum"
            " lateness): quarantined until an operator releases it")


# -- routing -------------------------------------------------------------------------------------


class EventRouter(Router):
    """The agents' router, plus the pseudo-host ``account_<id>`` of each account."""

    def __init__(self, base: Router, accounts: Collection[str]) -> None:
        super().__init__(())
        self._base = base
        self._accounts = {account_host(a): a for a in accounts}

    def account_for(self, record: UsageRecord) -> str | None:
        account = self._accounts.get(record.host_id)
        return account if account is not None else self._base.account_for(record)

    def hosts(self) -> list[str]:
        return self._base.hosts()


def unique_by_record(
    usages: Sequence[tuple[int, EventUsage]],
    reject: Callable[[int, EventError], None],
) -> tuple[list[tuple[int, EventUsage]], dict[int, int]]:
    """Events of one batch with distinct record ids, and each repeat's index mapped to
    the index of its first copy (a repeat with other contents is rejected)."""
    first: dict[str, tuple[int, EventUsage]] = {}
    unique: list[tuple[int, EventUsage]] = []
    repeats: dict[int, int] = {}
    for index, usage in usages:
        earlier = first.get(usage.record.id)
        if earlier is None:
            first[usage.record.id] = (index, usage)
            unique.append((index, usage))
        elif earlier[1].record != usage.record:
            reject(index, EventError("source and id repeated in the batch with other contents",
                                     "conflicting_id"))
        else:
            repeats[index] = earlier[0]
    return unique, repeats
