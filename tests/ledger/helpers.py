"""Building blocks for ledger tests: a test tariff, records, and ledgers of each kind."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal

from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import LedgerService, ShardedLedger
from collector.ledger.sharding import ShardMap
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore
from collector.pricing import AccountPrices, AccountTerms
from collector.rating.tariff import parse_tariff_text
from collector.routing import Assignment, Router
from common.ids import new_id
from common.records import UsageRecord, to_us

EGRESS_PRICE = """
[[prices]]
id = "egress"
product = "Bandwidth"
currency = "eur"
metric = "net.tx_bytes"
unit = "GB"
billing_scheme = "per_unit"
unit_amount_decimal = "0.013"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""

TARIFF = EGRESS_PRICE + """
[[prices]]
id = "cpu"
product = "Compute"
currency = "eur"
metric = "cpu.seconds"
unit = "hour"
billing_scheme = "per_unit"
unit_amount_decimal = "0.0125"
recurring = { interval = "month", usage_type = "metered", aggregate_usage = "sum" }
"""

T0 = to_us(datetime(2026, 11, 3, 12, 0, tzinfo=UTC))


def prices() -> AccountPrices:
    tariff = parse_tariff_text(TARIFF, "test-tariff.toml")
    return AccountPrices(tariff, {"acme": AccountTerms("eur"), "globex": AccountTerms("eur")})


def router(*extra: Assignment) -> Router:
    return Router([Assignment("host-a", "acme"), Assignment("host-b", "globex"), *extra])


def record(
    host: str = "host-a",
    metric: str = "net.tx_bytes",
    quantity: str = "1000000000",
    at_us: int = T0,
    seq: int = 1,
    **labels: str,
) -> UsageRecord:
    unit = {"net.tx_bytes": "bytes", "cpu.seconds": "seconds"}.get(metric, "bytes")
    return UsageRecord(
        id=new_id(),
        host_id=host,
        metric=metric,
        quantity=Decimal(quantity),
        unit=unit,
        start_us=at_us,
        end_us=at_us + 10_000_000,
        seq=seq,
        labels=labels,
    )


async def open_stores(kind: str, tmp_path: object, databases: object | None) -> list[LedgerStore]:
    if kind == "sqlite":
        from pathlib import Path

        assert isinstance(tmp_path, Path)
        return [await SqliteLedger.open(tmp_path / "ledger.db")]
    assert databases is not None
    count = 1 if kind == "pg" else 4
    return [
        await PostgresLedger.open(await databases.create(), name=f"shard{i}")  # type: ignore[attr-defined]
        for i in range(count)
    ]


def service(stores: Sequence[LedgerStore], rt: Router | None = None) -> LedgerService:
    ledger = ShardedLedger(list(stores), ShardMap.even(len(stores)))
    return LedgerService(ledger, rt or router(), prices())


async def receivable(svc: LedgerService, account: str) -> Decimal:
    balances = await svc.ledger.for_account(account).balances(account)
    return balances.get(("receivable", "eur"), Decimal(0))
