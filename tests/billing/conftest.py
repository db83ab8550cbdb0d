"""A billing world: the scenario's configuration over a real ledger of each kind."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import pytest

from collector.billing.service import BillingService, billing_service
from collector.config import LoadedCollectorConfig, load_collector_config
from collector.daemon import build_service, load_tariff, open_ledger
from collector.ledger.service import LedgerService, ShardedLedger
from tests.billing.scenario import collector_toml
from tests.pg import Databases


@dataclass
class World:
    cfg: LoadedCollectorConfig
    ledger: ShardedLedger
    service: LedgerService
    billing: BillingService

    async def receivable(self, account: str) -> Decimal:
        balances = await self.ledger.for_account(account).balances(account)
        return balances.get(("receivable", "eur"), Decimal(0))


async def open_world(config: Path) -> World:
    cfg = load_collector_config(config)
    ledger = await open_ledger(cfg)
    service = build_service(cfg, ledger)
    tariff = load_tariff(cfg.path(cfg.raw.tariff))
    return World(cfg, ledger, service, billing_service(cfg, service, tariff))


async def _world(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[World]:
    databases: Databases | None = None
    if request.param == "sqlite":
        config = collector_toml(tmp_path)
    else:
        databases = Databases(request.getfixturevalue("pg_server"))
        dsns = [await databases.create() for _ in range(2 if request.param == "pg2" else 1)]
        slots = ["0-511", "512-1023"] if len(dsns) == 2 else ["0-1023"]
        config = collector_toml(
            tmp_path,
            "\n".join(
                f'[[ledger.shards]]\ndsn = "{dsn}"\nslots = ["{s}"]\n'
                for dsn, s in zip(dsns, slots, strict=True)
            ),
        )
    opened = await open_world(config)
    try:
        yield opened
    finally:
        await opened.ledger.close()
        if databases is not None:
            await databases.drop_all()


@pytest.fixture(params=["sqlite", "pg2"])
async def world(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    """The scenario on the embedded SQLite file, or on two PostgreSQL shards."""
    async for opened in _world(request, tmp_path):
        yield opened


@pytest.fixture(params=["sqlite", "pg"])
async def world1(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[World]:
    """The scenario on the embedded SQLite file, or on one PostgreSQL shard."""
    async for opened in _world(request, tmp_path):
        yield opened
