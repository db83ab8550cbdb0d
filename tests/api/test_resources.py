"""The resources the API serves, read back against what was configured and posted."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from tests.api.env import ApiEnv, api_env, client
from tests.pg import Databases


@pytest.fixture
async def env(tmp_path: Path, pki_dir: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path, pki_dir) as e:
        yield e


async def get(c: TestClient[Any, Any], env: ApiEnv, path: str, who: str = "viewer") -> Any:
    response = await c.get(path, headers=env.auth(who))
    assert response.status == 200, await response.text()
    assert response.content_type == "application/json"
    return await response.json()


async def walk(c: TestClient[Any, Any], env: ApiEnv, path: str, who: str = "viewer"
               ) -> tuple[list[Any], int]:
    """Every item of a paginated list, and the number of pages it took."""
    items: list[Any] = []
    pages = 0
    cursor = None
    sep = "&" if "?" in path else "?"
    while True:
        page = await get(c, env, path + (f"{sep}cursor={cursor}" if cursor else ""), who)
        pages += 1
        items.extend(page["items"] if "items" in page else page["hosts"])
        cursor = page["next_cursor"]
        if cursor is None:
            return items, pages


async def test_accounts_and_their_settings(env: ApiEnv) -> None:
    async with client(env) as c:
        accounts, pages = await walk(c, env, "/v1/accounts?limit=1")
        assert [a["id"] for a in accounts] == ["acme", "globex"]
        assert pages == 2
        acme = await get(c, env, "/v1/accounts/acme")
        assert acme == accounts[0]
        assert acme["currency"] == "eur"
        assert acme["settings"]["currency"] == "eur"
        balances = await get(c, env, "/v1/accounts/acme/balances")
        # egress 1.875 GB at 0.013 = 0.024375 -> 0.02; CPU 1 h at 0.0125 -> 0.01
        assert balances["receivable"] == {"eur": "0.03"}
        assert {(b["ledger_account"], b["amount"]) for b in balances["balances"]} == {
            ("receivable", "0.03"), ("revenue:Bandwidth", "-0.02"), ("revenue:Compute", "-0.01")}
        usage = await get(c, env, "/v1/accounts/acme/usage")
        assert usage["balance"] == {"eur": "0.03"}
        assert [(u["metric"], u["quantity"], u["records"]) for u in usage["usage"]] == [
            ("cpu.seconds", "3600", 1), ("net.tx_bytes", "1875000001", 5)]


async def test_usage_series_filters_and_pages(env: ApiEnv) -> None:
    async with client(env) as c:
        days, pages = await walk(c, env, "/v1/usage?bucket=day&limit=2")
        assert pages == 3
        assert [(d["start"], d["account"], d["metric"], d["quantity"]) for d in days] == [
            ("2026-11-03T00:00:00Z", "acme", "cpu.seconds", "3600"),
            ("2026-11-03T00:00:00Z", "acme", "net.tx_bytes", "1750000000"),
            ("2026-11-03T00:00:00Z", "globex", "net.tx_bytes", "700000000"),
            ("2026-11-04T00:00:00Z", "acme", "net.tx_bytes", "125000000"),
            ("2026-12-03T00:00:00Z", "acme", "net.tx_bytes", "1"),
        ]
        assert days[0]["end"] == "2026-11-04T00:00:00Z"
        months = (await get(c, env, "/v1/usage?bucket=month&account=acme&metric=net.tx_bytes"
                                    "&from=2026-11-01T00:00:00%2B01:00"))["items"]
        assert [(m["start"], m["end"], m["quantity"], m["records"]) for m in months] == [
            ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z", "1875000000", 4),
            ("2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z", "1", 1),
        ]
        hours = (await get(c, env, "/v1/usage?bucket=hour&host=host-b"))["items"]
        assert [(h["start"], h["account"], h["host"]) for h in hours] == [
            ("2026-11-03T13:00:00Z", "globex", "host-b")]
        # The cursor of one bucket width is refused by another.
        first = await get(c, env, "/v1/usage?bucket=day&limit=1")
        response = await c.get(f"/v1/usage?bucket=hour&cursor={first['next_cursor']}",
                               headers=env.auth("viewer"))
        assert response.status == 400


@pytest.mark.pg
async def test_usage_across_two_postgresql_shards(
    tmp_path: Path, pki_dir: Path, pg_databases: Databases
) -> None:
    shards = ""
    for i in range(2):
        dsn = await pg_databases.create()
        shards += f'[[ledger.shards]]\ndsn = "{dsn}"\nslots = ["{i * 512}-{i * 512 + 511}"]\n'

    sqlite_dir = tmp_path / "sqlite"
    sqlite_dir.mkdir()
    async with api_env(sqlite_dir, pki_dir) as one, client(one) as c:
        expected, _ = await walk(c, one, "/v1/usage?bucket=hour")
    pg_dir = tmp_path / "pg"
    pg_dir.mkdir()
    async with api_env(pg_dir, pki_dir, ledger=shards) as two:
        # acme and globex live on different shards: the query fans out and merges.
        assert two.ledger.for_account("acme") is not two.ledger.for_account("globex")
        async with client(two) as c:
            found, pages = await walk(c, two, "/v1/usage?bucket=hour&limit=1")
            assert pages == len(expected)
            assert found == expected
            entries, _ = await walk(c, two, "/v1/accounts/globex/entries?limit=1")
            assert [e["seq"] for e in entries] == [1]


async def test_journal_entries_with_postings(env: ApiEnv) -> None:
    async with client(env) as c:
        entries, pages = await walk(c, env, "/v1/accounts/acme/entries?limit=4")
        assert pages == 2
        assert [e["seq"] for e in entries] == [1, 2, 3, 4, 5, 6]
        assert entries[1]["prev_hash"] == entries[0]["hash"]
        first = entries[0]
        assert {(p["ledger_account"], p["amount"]) for p in first["postings"]} == {
            ("receivable", "0.01"), ("revenue:Bandwidth", "-0.01")}
        before = await get(c, env, f"/v1/accounts/acme/entries?to={first['created']}")
        assert before["items"] == []
        since = await get(c, env, f"/v1/accounts/acme/entries?from={first['created']}")
        assert [e["seq"] for e in since["items"]] == [1, 2, 3, 4, 5, 6]


async def test_hosts_and_assignment_history(env: ApiEnv) -> None:
    async with client(env) as c:
        hosts, _ = await walk(c, env, "/v1/hosts?limit=1")
        assert [h["host_id"] for h in hosts] == ["host-a", "host-b"]
        a = hosts[0]
        assert a["version"] == "1.2.3"
        assert a["clock_skew_ms"] == -2
        assert [x["account"] for x in a["assignments"]] == ["acme"]
        assert hosts[1]["last_seen"] is None
        assert await get(c, env, "/v1/hosts/host-a") == a
        history = await get(c, env, "/v1/hosts/host-b/assignments")
        assert history["items"] == [{"host": "host-b", "account": "globex", "cgroup": "",
                                     "since": None, "until": None}]


async def test_tokens_over_the_api_are_audited(env: ApiEnv) -> None:
    async with client(env) as c:
        response = await c.post("/v1/tokens", json={"name": "crm", "role": "billing",
                                                    "scopes": ["ingest"]},
                                headers=env.auth("admin"))
        assert response.status == 201
        made = await response.json()
        assert made["token"]["role"] == "billing"
        secret = made["secret"]
        accounts = await c.get("/v1/accounts", headers={"Authorization": f"Bearer {secret}"})
        assert accounts.status == 200
        tokens, _ = await walk(c, env, "/v1/tokens?limit=2", "admin")
        assert "secret" not in tokens[0]
        assert [t["name"] for t in tokens][-1] == "crm"
        assert [t["name"] for t in tokens if t["revoked"]] == ["revoked"]
        audit, _ = await walk(c, env, "/v1/audit?limit=3", "admin")
        assert [r["seq"] for r in audit] == list(range(1, len(audit) + 1))
        last = audit[-1]
        assert last["action"] == "token.create"
        assert last["actor"] == f"token:admin/{env.token_ids['admin']}"
        assert last["before"] is None
        assert last["after"]["name"] == "crm"
        assert last["prev_hash"] == audit[-2]["hash"]


async def test_webhook_subscriptions_over_the_api(env: ApiEnv) -> None:
    async with client(env) as c:
        admin, operator = env.auth("admin"), env.auth("operator")
        made = await c.post("/v1/webhooks", headers=admin, json={
            "url": "http://127.0.0.1:9/hooks", "event_types": ["invoice.*"],
            "description": "billing system"})
        assert made.status == 201, await made.text()
        body = await made.json()
        assert body["secret"]
        sub = body["subscription"]
        assert (sub["event_types"], sub["enabled"], sub["pending"]) == (["invoice.*"], True, 0)
        path = f"/v1/webhooks/{sub['id']}"
        assert (await get(c, env, "/v1/webhooks", "operator"))["items"] == [sub]
        assert "secret" not in await get(c, env, path, "operator")
        disabled = await c.post(f"{path}/disable", headers=admin)
        assert (await disabled.json())["enabled"] is False
        assert (await c.post(f"{path}/disable", headers=operator)).status == 403
        assert (await get(c, env, f"{path}/deliveries?status=dead", "operator"))["items"] == []
        replayed = await c.post(f"{path}/replay", headers=operator, json={"dead": True})
        assert await replayed.json() == {"queued": 0}
        both = await c.post(f"{path}/replay", headers=operator,
                            json={"dead": True, "from_sequence": 1})
        assert both.status == 422
        bad = await c.post("/v1/webhooks", headers=admin, json={"url": "http://example.com/x"})
        assert bad.status == 422  # plain http off loopback
        assert (await c.delete(path, headers=admin)).status == 204
        assert (await c.get(path, headers=operator)).status == 404
        audit, _ = await walk(c, env, "/v1/audit", "admin")
        assert [r["action"] for r in audit if r["target"] == f"webhook/{sub['id']}"] == [
            "webhook.create", "webhook.disable", "webhook.replay", "webhook.remove"]
