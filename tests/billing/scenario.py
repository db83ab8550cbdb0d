"""A billing month for three accounts in three time zones, on the example price book.

- ``berlin`` (Europe/Berlin, monthly from the 1st): March 2026 has the spring-forward
  change (743 hours). It holds the VPS bundle until the 16th, then changes to the
  dedicated plan with its 150 EUR minimum commitment; two SSD volumes from the 10th
  at noon, the dedicated setup fee, the ``welcome10`` coupon and German VAT. Its
  traffic feeds both the graduated ``egress`` price and the ``bw95`` burstable price.
- ``newyork`` (America/New_York, monthly from the 15th): the period 15 February to
  15 March holds the spring-forward change (671 hours). Hourly cloud servers from
  20 February, 09:30; snapshot storage and object-storage requests; the repeating
  ``migrate5`` coupon; Dutch VAT.
- ``kolkata`` (Asia/Kolkata, +05:30, every 7 days from Monday 2 March): two hourly
  servers all along, traffic, and Austrian VAT that prices already include.

Each account's records come with windows aligned to five minutes, some near its
period's edges, where the local and the UTC calendar disagree. The expected quote
requests are written out here by hand, from these same facts, independently of the
billing code, so a test can run ``meterd tariff quote`` on them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

from common.ids import new_id
from common.records import UsageRecord, to_us

PRICEBOOK = Path(__file__).resolve().parents[2] / "docs" / "examples" / "pricebook.toml"

GB = 10**9
GIB_HOUR = 2**30 * 3600


def at(text: str) -> int:
    return to_us(datetime.fromisoformat(text))


def collector_toml(workdir: Path, ledger: str = 'sqlite_path = "ledger.db"') -> Path:
    """The collector configuration of the scenario (its ledger as given)."""
    text = f"""
tariff = "{PRICEBOOK}"

[ledger]
{ledger}

[billing]
grace_hours = 48
issuer_name = "Example Hosting GmbH"
issuer_address = ["Hauptstrasse 1", "10115 Berlin"]
issuer_tax_id = "DE999999999"

[accounts.berlin]
currency = "eur"
name = "Berliner Kunde GmbH"
address = ["Unter den Linden 5", "10117 Berlin"]
time_zone = "Europe/Berlin"
anchor_day = 1
tax_jurisdiction = "DE"
tax_id = "DE123456789"
prices = ["egress", "bw95"]

[[accounts.berlin.plans]]
plan = "vps-s-bundle"
since = "2026-03-01T00:00:00+01:00"
until = "2026-03-16T00:00:00+01:00"

[[accounts.berlin.plans]]
plan = "dedicated-commit"
since = "2026-03-16T00:00:00+01:00"

[[accounts.berlin.addons]]
price = "ssd-100"
quantity = "2"
since = "2026-03-10T12:00:00+01:00"

[[accounts.berlin.addons]]
price = "dedi-ax-setup"
since = "2026-03-16T00:00:00+01:00"

[[accounts.berlin.coupons]]
coupon = "welcome10"
redeemed = "2026-03-01T00:00:00+01:00"

[accounts.newyork]
currency = "eur"
time_zone = "America/New_York"
anchor_day = 15
tax_jurisdiction = "NL"
prices = ["snapshots", "s3-requests"]

[[accounts.newyork.plans]]
plan = "cloud-hourly"
since = "2026-02-20T09:30:00-05:00"

[[accounts.newyork.coupons]]
coupon = "migrate5"
redeemed = "2026-01-20T00:00:00-05:00"

[accounts.kolkata]
currency = "eur"
time_zone = "Asia/Kolkata"
cycle = "custom"
interval = "7d"
anchor = "2026-03-02T00:00:00+05:30"
tax_jurisdiction = "AT"
prices = ["egress"]

[[accounts.kolkata.addons]]
price = "vps-m-hourly"
quantity = "2"

[[assignments]]
host = "host-berlin"
account = "berlin"

[[assignments]]
host = "host-newyork"
account = "newyork"

[[assignments]]
host = "host-kolkata"
account = "kolkata"
"""
    path = workdir / "collector.toml"
    path.write_text(text)
    return path


def record(host: str, metric: str, quantity: int, start_us: int, seconds: int = 300) -> UsageRecord:
    unit = {"net.tx_bytes": "bytes", "storage.snapshot_byte_seconds": "byte_seconds",
            "s3.requests": "requests", "cpu.seconds": "seconds"}[metric]
    return UsageRecord(
        id=new_id(), host_id=host, metric=metric, quantity=Decimal(quantity), unit=unit,
        start_us=start_us, end_us=start_us + seconds * 1_000_000, seq=1,
    )


@dataclass(frozen=True)
class Traffic:
    """Records of one account's period, and what a person computes from them."""

    records: tuple[UsageRecord, ...]

    def total(self, metric: str) -> Decimal:
        return sum((r.quantity for r in self.records if r.metric == metric), Decimal(0))

    def rates_mbit(self) -> list[str]:
        """Each 5-minute window's rate in Mbit/s: 8 * bytes / 300 s / 10^6."""
        by_window: dict[int, Decimal] = {}
        for r in self.records:
            if r.metric == "net.tx_bytes":
                by_window[r.start_us] = by_window.get(r.start_us, Decimal(0)) + r.quantity
        return [str(by_window[k] * 8 / 300 / 10**6) for k in sorted(by_window)]


def _berlin_times() -> Iterator[int]:
    start = datetime.fromisoformat("2026-03-01T02:00:00+01:00")
    for k in range(24):
        yield to_us(start + timedelta(hours=29 * k))
    yield at("2026-03-31T23:50:00+02:00")  # the last minutes of March in Berlin (UTC 21:50)


def berlin_march() -> Traffic:
    rows = [
        record("host-berlin", "net.tx_bytes", (3 + (7 * k) % 5) * GB + 123_456_789, t)
        for k, t in enumerate(_berlin_times())
    ]
    return Traffic(tuple(rows))


def berlin_april() -> Traffic:
    # 00:10 on 1 April in Berlin is still 31 March in UTC: it belongs to April here.
    return Traffic((
        record("host-berlin", "net.tx_bytes", 5 * GB, at("2026-04-01T00:10:00+02:00")),
        record("host-berlin", "net.tx_bytes", 6 * GB, at("2026-04-12T10:00:00+02:00")),
    ))


def newyork_period() -> Traffic:
    rows = [
        record("host-newyork", "storage.snapshot_byte_seconds", 1000 * (k + 1) * GIB_HOUR,
               at("2026-02-16T01:00:00-05:00") + k * 2 * 86_400_000_000, seconds=3600)
        for k in range(10)
    ]
    rows += [
        record("host-newyork", "s3.requests", 12_345,
               at("2026-02-21T12:00:00-05:00") + k * 86_400_000_000)
        for k in range(6)
    ]
    # 23:30 on 14 March in New York is 15 March in UTC: still this period.
    rows.append(record("host-newyork", "s3.requests", 12_345, at("2026-03-14T23:30:00-04:00")))
    return Traffic(tuple(rows))


def kolkata_week() -> Traffic:
    rows = [
        record("host-kolkata", "net.tx_bytes", 300 * GB + k * 7 * GB,
               at("2026-03-03T09:00:00+05:30") + k * 86_400_000_000)
        for k in range(5)
    ]
    return Traffic(tuple(rows))


# -- the quote requests, by hand ---------------------------------------------------------


def berlin_march_request(traffic: Traffic) -> dict[str, Any]:
    start, mid, end = "2026-03-01T00:00:00+01:00", "2026-03-16T00:00:00+01:00", (
        "2026-04-01T00:00:00+02:00"
    )
    bundle = {"start": start, "end": mid}
    return {
        "period": {"start": start, "end": end},
        "items": [
            {"price": "vps-s-monthly", "quantity": "1", "active": bundle},
            {"price": "ipv4", "quantity": "1", "active": bundle},
            {"price": "backups", "quantity": "1", "active": bundle},
            {"price": "dedi-ax-monthly", "quantity": "1", "active": {"start": mid, "end": end}},
            {"price": "ssd-100", "quantity": "2",
             "active": {"start": "2026-03-10T12:00:00+01:00", "end": end}},
            {"price": "dedi-ax-setup", "quantity": "1"},
            {"price": "egress", "quantity": str(traffic.total("net.tx_bytes") / GB)},
            {"price": "bw95", "samples": traffic.rates_mbit()},
        ],
        "plans": ["dedicated-commit"],
        "coupons": ["welcome10"],
        "tax_rates": ["de-vat"],
    }


def newyork_request(traffic: Traffic) -> dict[str, Any]:
    end = "2026-03-15T00:00:00-04:00"
    active = {"start": "2026-02-20T09:30:00-05:00", "end": end}
    snapshots = traffic.total("storage.snapshot_byte_seconds") / GIB_HOUR
    return {
        "period": {"start": "2026-02-15T00:00:00-05:00", "end": end},
        "items": [
            {"price": "vps-s-hourly", "quantity": "1", "active": active},
            {"price": "vps-m-hourly", "quantity": "1", "active": active},
            {"price": "s3-requests", "quantity": str(traffic.total("s3.requests"))},
            {"price": "snapshots", "quantity": str(snapshots)},
        ],
        "coupons": ["migrate5"],
        "tax_rates": ["nl-vat"],
    }


def kolkata_request(traffic: Traffic) -> dict[str, Any]:
    return {
        "period": {"start": "2026-03-02T00:00:00+05:30", "end": "2026-03-09T00:00:00+05:30"},
        "items": [
            {"price": "vps-m-hourly", "quantity": "2"},
            {"price": "egress", "quantity": str(traffic.total("net.tx_bytes") / GB)},
        ],
        "tax_rates": ["at-vat-incl"],
    }
