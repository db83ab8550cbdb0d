"""CloudEvents to usage records: the record id, the data shape, what is refused and why."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from collector.cloudevents import (
    EVENTS_NAMESPACE,
    EventError,
    EventRouter,
    binary_event,
    events_of,
    record_id,
    to_usage,
)
from collector.config import IngestConfig
from collector.routing import Assignment, Router
from common.records import to_us
from tests.ledger.helpers import T0

NOW = T0 + 3_600_000_000
LIMITS = IngestConfig()
ACCOUNTS = {"acme", "globex"}


def event(**changes: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "specversion": "1.0",
        "id": "ip-assign-42",
        "source": "/provisioning/ipam",
        "type": "com.example.ip.assigned",
        "time": "2026-11-03T12:30:00Z",
        "data": {
            "account": "acme",
            "metric": "ip.dedicated_seconds",
            "quantity": "3600",
            "unit": "seconds",
            "window": {"start": "2026-11-03T12:00:00Z", "end": "2026-11-03T13:00:00Z"},
        },
    }
    data = changes.pop("data", None)
    base.update(changes)
    if data is not None:
        base["data"] = {**base["data"], **data}
        base["data"] = {k: v for k, v in base["data"].items() if v is not None}
    return base


def usage(e: object) -> Any:
    return to_usage(e, now_us=NOW, limits=LIMITS, accounts=ACCOUNTS)


def test_an_event_becomes_a_usage_record_with_a_stable_id() -> None:
    u = usage(event())
    r = u.record
    name = json.dumps(["/provisioning/ipam", "ip-assign-42"], separators=(",", ":"))
    assert r.id == str(uuid.uuid5(EVENTS_NAMESPACE, name)) == record_id(u.source, u.event_id)
    assert (r.host_id, r.metric, r.quantity, r.unit, r.seq) == (
        "account_acme", "ip.dedicated_seconds", Decimal(3600), "seconds", 0)
    assert r.start_us == T0
    assert r.end_us == T0 + 3_600_000_000
    assert dict(r.labels) == {"ce_id": "ip-assign-42", "ce_source": "/provisioning/ipam",
                              "ce_type": "com.example.ip.assigned"}
    assert usage(event(type="other")).record.id == r.id  # source and id decide
    assert usage(event(source="/backup")).record.id != r.id
    assert usage(event(id="ip-assign-43")).record.id != r.id
    # Fixed for good (the README's example): a new derivation would let an event sent
    # before an upgrade and again after it be counted twice.
    assert r.id == "8df87c3b-e256-5b0c-a326-a0eefff1912a"
    # The pair is encoded unambiguously: no two (source, id) pairs share a name.
    assert record_id("a/b", "c") != record_id("a", "b/c")


def test_usage_of_a_host_is_routed_like_agent_records() -> None:
    u = usage(event(data={"account": None, "host": "web-042", "labels": {"cgroup": "vm-1"}}))
    router = EventRouter(Router([Assignment("web-042", "globex", cgroup="vm-1")]), ACCOUNTS)
    assert u.record.host_id == "web-042"
    assert router.account_for(u.record) == "globex"
    assert router.account_for(usage(event()).record) == "acme"


def test_usage_beyond_the_maximum_lateness_is_marked_for_quarantine() -> None:
    old = usage(event(data={"window": {"start": "2025-01-01T00:00:00Z",
                                       "end": "2025-01-01T01:00:00Z"}}))
    assert old.late
    assert not usage(event()).late


def test_without_a_window_the_usage_is_the_events_instant() -> None:
    r = usage(event(data={"window": None})).record
    assert r.start_us == r.end_us == to_us(datetime(2026, 11, 3, 12, 30, tzinfo=UTC))


@pytest.mark.parametrize(
    ("bad", "reason", "says"),
    [
        ([1, 2], "invalid_event", "JSON object"),
        (event(specversion="0.3"), "invalid_event", "specversion"),
        (event(id=""), "invalid_event", "'id'"),
        (event(source=None), "invalid_event", "'source'"),
        (event(type=7), "invalid_event", "'type'"),
        (event(datacontenttype="text/plain"), "invalid_event", "datacontenttype"),
        (event(data_base64="AAAA"), "invalid_event", "data_base64"),
        (event(time="yesterday"), "invalid_data", "RFC 3339"),
        (event(data={"quantity": 1.5}), "invalid_data", "decimal text"),
        (event(data={"quantity": 3600}), "invalid_data", "decimal text"),
        (event(data={"quantity": "-1"}), "invalid_data", "negative"),
        (event(data={"quantity": "NaN"}), "invalid_data", "quantity"),
        (event(data={"host": "web-1"}), "invalid_data", "exactly one of host and account"),
        (event(data={"account": None}), "invalid_data", "exactly one of host and account"),
        (event(data={"account": "nobody"}), "unknown_account", "not a configured account"),
        (event(data={"metric": "Bad Metric"}), "invalid_data", "metric"),
        (event(data={"unit": "furlongs"}), "invalid_data", "unit"),
        (event(data={"amount": "1"}), "invalid_data", "unknown member 'amount'"),
        (event(data={"labels": {"ce_id": "x"}}), "invalid_data", "ce_id"),
        (event(data={"labels": {"k": 1}}), "invalid_data", "labels"),
        (event(data={"window": {"start": "2026-11-03T13:00:00Z",
                                "end": "2026-11-03T12:00:00Z"}}), "invalid_data", "before"),
        (event(data={"window": {"start": "2026-11-03T12:00:00"}}), "invalid_data", "window"),
        (event(data={"window": None}, time=None), "invalid_data", "window or the event's time"),
        (event(data={"window": {"start": "2027-01-01T00:00:00Z",
                                "end": "2027-01-01T01:00:00Z"}}), "future", "after"),
    ],
)
def test_a_bad_event_is_refused_with_its_reason(bad: object, reason: str, says: str) -> None:
    with pytest.raises(EventError) as caught:
        usage(bad)
    assert caught.value.reason == reason
    assert says in str(caught.value)


def test_content_modes() -> None:
    one = json.dumps(event()).encode()
    assert events_of("application/cloudevents+json; charset=utf-8", {}, one) == ([event()], False)
    batch = json.dumps([event(), event(id="2")]).encode()
    assert events_of("application/cloudevents-batch+json", {}, batch)[1] is True
    assert events_of("application/json", {}, batch)[1] is True
    assert events_of("application/json", {}, one) == ([event()], False)
    with pytest.raises(EventError, match="a batch must be a JSON array"):
        events_of("application/cloudevents-batch+json", {}, one)
    with pytest.raises(EventError, match="not JSON"):
        events_of("application/cloudevents+json", {}, b"{nope")
    with pytest.raises(EventError, match="not JSON"):
        events_of("application/cloudevents+json", {}, b'{"q": NaN}')
    with pytest.raises(EventError) as caught:
        events_of("text/plain", {}, one)
    assert caught.value.reason == "unsupported_media_type"


def test_binary_mode_reads_percent_encoded_headers() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "b%201", "ce-source": "/x", "ce-type": "t",
               "Content-Type": "application/json"}
    e = binary_event("application/json", headers, json.dumps(event()["data"]).encode())
    assert e["id"] == "b 1"
    assert usage(e).record.metric == "ip.dedicated_seconds"
    with pytest.raises(EventError):
        binary_event("text/plain", headers, b"x")
