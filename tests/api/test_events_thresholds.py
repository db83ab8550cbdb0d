"""Usage posted through ``POST /v1/events`` is posted by the collector's own ledger
service with another router: it crosses balance thresholds like agent usage does, and
its calls share the service's posting transactions."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from collector.api import build_app
from collector.ledger.outbox import BALANCE_THRESHOLD_CROSSED
from collector.ledger.service import LedgerService
from collector.ledger.thresholds import BalanceThresholds
from collector.webhooks.state import outbox_after
from common.records import from_us
from tests.api.env import HOUR_US, api_env
from tests.ledger.helpers import router


def egress_event(event_id: str, clock_us: int, hours_ago: int) -> dict[str, object]:
    start = from_us(clock_us - (hours_ago + 1) * HOUR_US)
    end = from_us(clock_us - hours_ago * HOUR_US)
    return {
        "specversion": "1.0", "id": event_id, "source": "/network/flows",
        "type": "net.egress", "datacontenttype": "application/json",
        "data": {
            "host": "host-a", "metric": "net.tx_bytes", "quantity": "1000000000",
            "unit": "bytes", "window": {"start": start.isoformat(), "end": end.isoformat()},
        },
    }


async def test_usage_from_events_crosses_balance_thresholds_once(
    tmp_path: Path, pki_dir: Path
) -> None:
    async with api_env(tmp_path, pki_dir, seed=False) as env:
        limits = {"acme": BalanceThresholds.of("eur", [Decimal("0.02")])}
        service = LedgerService(env.ledger, router(), env.service.prices, limits)
        calls: list[tuple[str, int]] = []
        service.observe_calls = lambda shard, n: calls.append((shard, n))
        app = build_app(lambda: service, env.fleet, lambda: env.config,
                        clock=lambda: env.clock_us)
        headers = {**env.auth("ingest"), "Content-Type": "application/cloudevents+json"}
        async with TestClient(TestServer(app)) as client:
            for n, hours_ago in enumerate((3, 2, 2)):  # 1 GB = 0.013 EUR; the last repeats
                event = egress_event(f"flow-{min(n, 1)}", env.clock_us, hours_ago)
                response = await client.post("/v1/events", data=json.dumps(event),
                                             headers=headers)
                assert response.status == 200, await response.text()
        found = await outbox_after(env.ledger.for_account("acme"), 0, 100)
        crossed = [json.loads(e.data) for e in found
                   if e.event_type == BALANCE_THRESHOLD_CROSSED]
        assert [(c["threshold"], c["direction"], c["balance_before"], c["balance"])
                for c in crossed] == [("0.02", "up", "0.01", "0.03")]
        # One posting transaction per request (the repeat's inserts nothing), each
        # reported to the service's observer.
        assert calls == [(env.ledger.for_account("acme").name, 1)] * 3
