"""A real collector API app over a real ledger, seeded with usage, tokens and agents."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from collector.api import build_app
from collector.api.auth import create_token, revoke_token
from collector.api.keys import BILLING
from collector.api.registry import Role
from collector.billing.quarantine import quarantine_records
from collector.config import LoadedCollectorConfig, load_collector_config
from collector.daemon import build_service, open_ledger
from collector.fleet import Fleet
from collector.ledger.service import LedgerService, ShardedLedger
from tests.harness import collector_config
from tests.ledger.helpers import T0, record

HOUR_US = 3_600_000_000
DAY_US = 24 * HOUR_US

# Who calls: every role, a token with the ingest scope only, and three that fail.
PRINCIPALS = ("viewer", "billing", "operator", "admin", "ingest")


@dataclass
class ApiEnv:
    config: LoadedCollectorConfig
    ledger: ShardedLedger
    service: LedgerService
    fleet: Fleet
    app: web.Application
    tokens: dict[str, str] = field(default_factory=dict)  # principal -> secret
    token_ids: dict[str, str] = field(default_factory=dict)
    clock_us: int = T0 + 40 * DAY_US

    def auth(self, who: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[who]}"}

    async def token(self, name: str, role: Role | None, scopes: tuple[str, ...] = ()) -> str:
        token, secret = await create_token(
            self.ledger.control, name=name, role=role, scopes=scopes, actor="cli:tests",
            now_us=self.clock_us,
        )
        self.tokens[name] = secret
        self.token_ids[name] = token.token_id
        return secret


# Usage seeded by :func:`seed_usage`: (host, metric, quantity, offset from T0 in µs).
SEEDED = (
    ("host-a", "net.tx_bytes", "1000000000", 0),
    ("host-a", "net.tx_bytes", "500000000", 30 * 60_000_000),
    ("host-a", "net.tx_bytes", "250000000", 2 * HOUR_US),
    ("host-a", "net.tx_bytes", "125000000", DAY_US),
    ("host-a", "net.tx_bytes", "1", 30 * DAY_US),
    ("host-a", "cpu.seconds", "3600", 0),
    ("host-b", "net.tx_bytes", "700000000", HOUR_US),
)


async def seed_usage(service: LedgerService, now_us: int) -> None:
    for seq, (host, metric, quantity, offset) in enumerate(SEEDED, start=1):
        await service.post([record(host, metric, quantity, at_us=T0 + offset, seq=seq)], now_us)


@dataclass(frozen=True)
class SeededBilling:
    invoice: str  # number of acme's finalized November invoice
    credit_note: str
    quarantined: str  # record id


async def seed_billing(env: ApiEnv) -> SeededBilling:
    """A quarantined record, November closed, acme's invoice finalized and credited."""
    late = record("host-a", "net.tx_bytes", "42", at_us=T0 - 100 * DAY_US, seq=99)
    await quarantine_records(env.service, [late], {late.id: "older than 90 days"},
                             env.clock_us)
    billing = env.app[BILLING]()
    await billing.close(env.clock_us, actor="cli:tests")
    done = await billing.finalize("acme", T0, env.clock_us, actor="cli:tests")
    number = done.invoice.number
    assert number is not None
    note = await billing.credit(number, reason="goodwill", amount=Decimal("0.01"),
                                now_us=env.clock_us, actor="cli:tests")
    return SeededBilling(number, note.number, late.id)


@contextlib.asynccontextmanager
async def api_env(
    workdir: Path, pki_dir: Path, *, ledger: str = "", seed: bool = True
) -> AsyncIterator[ApiEnv]:
    cfg = load_collector_config(collector_config(workdir, pki_dir, ledger=ledger))
    sharded = await open_ledger(cfg)
    try:
        service = build_service(cfg, sharded)
        fleet = Fleet()
        env = ApiEnv(cfg, sharded, service, fleet, web.Application())
        env.app = build_app(lambda: service, fleet, lambda: cfg, clock=lambda: env.clock_us)
        for role in Role:
            await env.token(role.label, role)
        await env.token("ingest", None, ("ingest",))
        await env.token("revoked", Role.ADMIN)
        await revoke_token(sharded.control, env.token_ids["revoked"], actor="cli:tests",
                           now_us=env.clock_us)
        env.tokens["bad"] = "mtd_" + "A" * 43
        if seed:
            await seed_usage(service, T0 + DAY_US)
            fleet.seen("host-a", now_us=env.clock_us, version="1.2.3", backlog=4,
                       skew_us=-1500, accepted=6, rejected=0, last_seq=6, serial=0x1F)
        yield env
    finally:
        await sharded.close()


@contextlib.asynccontextmanager
async def client(env: ApiEnv) -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(env.app)) as c:
        yield c
