"""Usage posted through ``POST /v1/events`` is routed with the assignments of the service
the API holds when the request arrives. A reload that assigns the event's host
releases the held records once every post routed with the old assignments is done;
the events API's posts must count as such posts, or an event held just after the
release read the held rows stays held though its host is assigned."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from collector.api import build_app
from collector.daemon import _release_after_reload
from collector.ledger.service import LedgerService, ShardedLedger
from collector.routing import Assignment
from common.records import from_us
from tests.api.env import HOUR_US, api_env
from tests.ledger.helpers import router
from tests.ledger.test_contract import Gated


async def test_a_reload_waits_for_an_events_post_routed_with_the_old_assignments(
    tmp_path: Path, pki_dir: Path
) -> None:
    async with api_env(tmp_path, pki_dir, seed=False) as env:
        gate, entered = asyncio.Event(), asyncio.Event()
        gate.set()
        gated = ShardedLedger([Gated(s, gate, entered) for s in env.ledger.stores],  # type: ignore[misc]
                              env.ledger.shard_map)
        old = LedgerService(gated, router(), env.service.prices)
        new = LedgerService(env.ledger, router(Assignment("host-z", "acme")), env.service.prices)
        app = build_app(lambda: old, env.fleet, lambda: env.config, clock=lambda: env.clock_us)
        end = from_us(env.clock_us - HOUR_US)
        event = {
            "specversion": "1.0", "id": "ip-7", "source": "/provisioning/ipam",
            "type": "ip.assigned", "datacontenttype": "application/json",
            "data": {
                "host": "host-z", "metric": "net.tx_bytes", "quantity": "1000000000",
                "unit": "bytes",
                "window": {"start": from_us(env.clock_us - 2 * HOUR_US).isoformat(),
                           "end": end.isoformat()},
            },
        }
        async with TestClient(TestServer(app)) as client:
            gate.clear()
            entered.clear()
            posting = asyncio.create_task(client.post(
                "/v1/events", data=json.dumps(event),
                headers={**env.auth("ingest"), "Content-Type": "application/cloudevents+json"},
            ))
            await asyncio.wait_for(entered.wait(), 10)  # routed (held), not yet committed
            release = asyncio.create_task(_release_after_reload(new, old))
            await asyncio.sleep(0.2)
            assert not release.done()
            gate.set()
            response = await posting
            answer = await response.json()
            assert response.status == 200, answer
            assert answer["results"][0]["outcome"] == "held"
            await asyncio.wait_for(release, 10)
        store = env.ledger.for_host("host-z")
        assert await store.held() == []
        assert [(u.metric, u.quantity, u.records) for u in await store.usage("acme")] == [
            ("net.tx_bytes", 1_000_000_000, 1)
        ]
