"""A real webhook receiver on loopback, ledgers of each kind, and a worker set up for tests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

from aiohttp import web
from standardwebhooks import Webhook

from collector.config import WebhooksConfig
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import ShardedLedger
from collector.ledger.sharding import ShardMap
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore
from collector.webhooks.secretbox import SecretBox
from collector.webhooks.service import WebhookService
from collector.webhooks.state import Delivery
from collector.webhooks.worker import DeliveryWorker
from tests.pg import Databases


def fast_settings(**overrides: Any) -> WebhooksConfig:
    """Tries a few milliseconds apart, polled often: the worker's logic at test speed."""
    values: dict[str, Any] = {
        "max_attempts": 1000,
        "backoff_base_seconds": Decimal("0.005"),
        "backoff_cap_seconds": Decimal("0.04"),
        "timeout_seconds": Decimal(30),
        "poll_interval_seconds": Decimal("0.02"),
        "concurrency": 4,
    }
    values.update(overrides)
    return WebhooksConfig(**values)


async def open_ledger(kind: str, tmp_path: Path, databases: Databases | None) -> ShardedLedger:
    """``sqlite`` (one file), ``pg`` (one shard) or ``pg2`` (two shards)."""
    stores: list[LedgerStore]
    if kind == "sqlite":
        stores = [await SqliteLedger.open(tmp_path / "ledger.db")]
    else:
        assert databases is not None
        count = 2 if kind == "pg2" else 1
        stores = [
            await PostgresLedger.open(await databases.create("meterd_wh"), name=f"shard{i}")
            for i in range(count)
        ]
    return ShardedLedger(stores, ShardMap.even(len(stores)))


def webhook_service(ledger: ShardedLedger, tmp_path: Path, **settings: Any) -> WebhookService:
    return WebhookService(ledger, fast_settings(**settings), tmp_path / "webhook-secrets.key")


def worker(ledger: ShardedLedger, tmp_path: Path, **settings: Any) -> DeliveryWorker:
    key = tmp_path / "webhook-secrets.key"
    return DeliveryWorker(ledger, fast_settings(**settings), lambda: SecretBox.load(key))


async def emit(ledger: ShardedLedger, event_type: str, account_id: str, **data: Any) -> str:
    async with ledger.for_event(account_id).transaction() as tx:
        return await tx.emit(event_type, account_id, data)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until ``check`` holds. The deadline only keeps a broken run from hanging; the
    tests assert what happened, never how fast."""
    deadline = time.monotonic() + 60
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"this never happened: {what}")
        await asyncio.sleep(0.01)


async def all_deliveries(svc: WebhookService, subscription_id: str) -> list[Delivery]:
    return await svc.deliveries(subscription_id, limit=1000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def webhook_id(self) -> str:
        return self.headers["webhook-id"]


@dataclass
class Receiver:
    """A webhook endpoint: a real aiohttp server on 127.0.0.1 that keeps every request.

    ``answer`` decides the status of each request; while ``gate`` is clear, requests
    wait inside the handler (a receiver that hangs).
    """

    port: int = field(default_factory=free_port)
    requests: list[Received] = field(default_factory=list)
    answer: Callable[[Received], int] = lambda _r: 204
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    entered: asyncio.Event = field(default_factory=asyncio.Event)
    in_flight: int = 0
    most_in_flight: int = 0
    _runner: web.AppRunner | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/meterd"

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks/meterd", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            self.gate.set()
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        received = Received({k.lower(): v for k, v in request.headers.items()},
                            await request.read())
        self.requests.append(received)
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            self.entered.set()
            await self.gate.wait()
            return web.Response(status=self.answer(received))
        finally:
            self.in_flight -= 1

    def verified(self, secret: str) -> list[dict[str, Any]]:
        """Every request's body, each checked as a receiver would: Standard Webhooks
        signature and timestamp (raises on the first that does not verify)."""
        hook = Webhook(secret)
        return [hook.verify(r.body, r.headers) for r in self.requests]


def first_seen(ids: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for i in ids:
        seen.setdefault(i)
    return list(seen)
