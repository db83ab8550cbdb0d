"""The fleet health routes (filter, sort and pages, the summary, sequence gaps) and
who may read /metrics."""

from __future__ import annotations

from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from collector.api import build_app
from collector.api.auth import create_token
from collector.api.registry import Role
from collector.config import load_collector_config
from collector.daemon import build_service, open_ledger
from collector.fleet import DAY_US, SECOND_US, Fleet
from collector.sequences import Sequences, seq_marks
from tests.api.env import api_env, client
from tests.harness import collector_config
from tests.ledger.helpers import T0


async def test_agents_are_filtered_sorted_paged_and_show_their_sequence_gaps(
    tmp_path: Path, pki_dir: Path
) -> None:
    async with api_env(tmp_path, pki_dir, seed=False) as env, client(env) as c:
        now = env.clock_us
        ops = env.auth("operator")
        expiry = now + 365 * DAY_US
        for host, seen_ago, backlog, skew in (
            ("host-a", 0, 0, 0),
            ("host-b", 10 * 60 * SECOND_US, 0, 0),  # past silent_after (300 s by default)
            ("host-c", 0, 50_000, 0),  # lagging
            ("host-d", 0, 0, -30 * SECOND_US),  # skewed
        ):
            env.fleet.seen(host, now_us=now - seen_ago, version="2.0" if host != "host-d"
                           else "1.9", backlog=backlog, skew_us=skew, accepted=1, rejected=0,
                           last_seq=5, serial=0xABC, cert_expiry_us=expiry)

        # host-a accounted for seqs 1 and 5 of its spool: 2 to 4 never arrived.
        store = env.ledger.for_host("host-a")
        async with store.transaction() as tx:
            await tx.account_seqs(seq_marks("host-a", "e1", None, [1, 5], [], now))
        await Sequences(env.ledger, 0).check(now)

        r = await c.get("/v1/fleet/agents/host-a", headers=ops)
        assert r.status == 200, await r.text()
        agent = await r.json()
        assert agent["status"] == "healthy"
        assert agent["certificate"] == {"serial": "ABC", "expires_at": agent["certificate"][
            "expires_at"], "days_left": 365}
        assert [(g["epoch"], g["first_seq"], g["last_seq"], g["missing"])
                for g in agent["sequence_gaps"]] == [("e1", 2, 4, 3)]

        r = await c.get("/v1/fleet/agents?sort=status", headers=ops)
        items = (await r.json())["items"]
        assert [(a["host_id"], a["status"]) for a in items] == [
            ("host-b", "silent"), ("host-d", "skewed"), ("host-c", "lagging"),
            ("host-a", "healthy")]
        assert next(a for a in items if a["host_id"] == "host-a")["sequence_gaps"]

        r = await c.get("/v1/fleet/agents?version=2.0&sort=last_seen&order=desc&limit=2",
                        headers=ops)
        page = await r.json()
        assert [a["host_id"] for a in page["items"]] == ["host-c", "host-a"]  # ties: by host
        r = await c.get(f"/v1/fleet/agents?version=2.0&sort=last_seen&order=desc&limit=2"
                        f"&cursor={page['next_cursor']}", headers=ops)
        rest = await r.json()
        assert ([a["host_id"] for a in rest["items"]], rest["next_cursor"]) == (["host-b"], None)

        r = await c.get("/v1/fleet/agents?status=lagging", headers=ops)
        assert [a["host_id"] for a in (await r.json())["items"]] == ["host-c"]

        r = await c.get("/v1/fleet/summary", headers=ops)
        summary = await r.json()
        assert summary["by_status"] == {"silent": 1, "expiring": 0, "skewed": 1,
                                        "lagging": 1, "healthy": 1}
        assert summary["by_version"] == {"1.9": 1, "2.0": 3}

        r = await c.get("/v1/fleet/agents/nobody", headers=ops)
        assert (r.status, (await r.json())["type"]) == (
            404, "https://meterd.dev/problems/host-not-found")
        r = await c.get("/v1/fleet/summary", headers=env.auth("viewer"))
        assert r.status == 403


async def test_metrics_are_open_unless_the_configuration_asks_for_a_token(
    tmp_path: Path, pki_dir: Path
) -> None:
    (tmp_path / "open").mkdir()
    async with api_env(tmp_path / "open", pki_dir, seed=False) as env, client(env) as c:
        r = await c.get("/metrics")
        assert r.status == 200
        assert "meterd_fleet_agents" in await r.text()

    closed = tmp_path / "closed"
    closed.mkdir()
    path = collector_config(closed, pki_dir, extra="[metrics]\nrequire_token = true\n")
    cfg = load_collector_config(path)
    ledger = await open_ledger(cfg)
    try:
        service = build_service(cfg, ledger)
        app = build_app(lambda: service, Fleet(), lambda: cfg)
        _, viewer = await create_token(ledger.control, name="prom", role=Role.VIEWER, scopes=(),
                                       actor="cli:tests", now_us=T0)
        _, ingest = await create_token(ledger.control, name="crm", role=None,
                                       scopes=("ingest",), actor="cli:tests", now_us=T0)
        async with TestClient(TestServer(app)) as c:
            assert (await c.get("/metrics")).status == 401
            r = await c.get("/metrics", headers={"Authorization": f"Bearer {ingest}"})
            assert r.status == 403
            r = await c.get("/metrics", headers={"Authorization": f"Bearer {viewer}"})
            assert r.status == 200
            names = {f.name for f in text_string_to_metric_families(await r.text())}
            assert {"meterd_ingest_records", "meterd_fleet_agents"} <= names
    finally:
        await ledger.close()
