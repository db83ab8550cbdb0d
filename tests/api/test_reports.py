"""The routes the dashboard reads: quarantine by account, revenue per month across
shards, an account's late adjustments, and who a token is."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from collector.api.keys import BILLING
from collector.billing.quarantine import quarantine_records
from tests.api.env import DAY_US, ApiEnv, api_env, client, seed_billing
from tests.api.test_resources import get, walk
from tests.ledger.helpers import T0, record
from tests.pg import Databases

DECEMBER_2 = T0 + 29 * DAY_US  # T0 is 3 November 2026, 12:00 UTC


@pytest.fixture
async def env(tmp_path: Path, pki_dir: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path, pki_dir) as e:
        yield e


async def test_quarantine_filtered_by_account_keeps_time_range_and_cursor(env: ApiEnv) -> None:
    old = T0 - 100 * DAY_US
    acme = [record("host-a", quantity=str(n), at_us=old + n, seq=100 + n) for n in (1, 2)]
    globex = record("host-b", quantity="7", at_us=old, seq=200)
    reasons = {r.id: "older than 90 days" for r in [*acme, globex]}
    await quarantine_records(env.service, acme[:1], reasons, T0)
    await quarantine_records(env.service, [acme[1], globex], reasons, T0 + DAY_US)
    async with client(env) as c:
        mine, pages = await walk(c, env, "/v1/quarantine?account=acme&limit=1")
        assert sorted(q["record_id"] for q in mine) == sorted(r.id for r in acme)
        assert {q["account"] for q in mine} == {"acme"}
        assert pages == 2
        theirs = (await get(c, env, "/v1/quarantine?account=globex"))["items"]
        assert [q["record_id"] for q in theirs] == [globex.id]
        later = (await get(c, env, "/v1/quarantine?account=acme&from=2026-11-04T00:00:00Z"
                           ))["items"]
        assert [q["record_id"] for q in later] == [acme[1].id]
        assert (await get(c, env, "/v1/quarantine?account=initech"))["items"] == []
        everyone = (await get(c, env, "/v1/quarantine"))["items"]
        assert len(everyone) == 3


async def revenue_of(env: ApiEnv, query: str = "") -> list[tuple[str, str, str, str]]:
    async with client(env) as c:
        report = await get(c, env, "/v1/reports/revenue" + query)
    return [(i["month"], i["product"], i["currency"], i["amount"]) for i in report["items"]]


async def test_revenue_per_month_and_product_equals_the_revenue_postings(
    env: ApiEnv,
) -> None:
    # November (seeded): acme 1.875 GB and 1 h, globex 0.7 GB, posted in November.
    assert await revenue_of(env) == [
        ("2026-11", "Bandwidth", "eur", "0.03"),
        ("2026-11", "Compute", "eur", "0.01"),
    ]
    revenue = Decimal(0)
    for account in ("acme", "globex"):
        balances = await env.ledger.for_account(account).balances(account)
        revenue -= sum((v for (a, _), v in balances.items() if a.startswith("revenue:")),
                       Decimal(0))
    assert revenue == Decimal("0.04")
    # 10 GB more, posted in December: December's row; November's stays.
    await env.service.post([record("host-b", quantity="10000000000", at_us=DECEMBER_2,
                                   seq=50)], DECEMBER_2 + 60_000_000)
    assert await revenue_of(env) == [
        ("2026-11", "Bandwidth", "eur", "0.03"),
        ("2026-11", "Compute", "eur", "0.01"),
        ("2026-12", "Bandwidth", "eur", "0.13"),
    ]
    assert await revenue_of(env, "?from=2026-12-01T00:00:00Z") == [
        ("2026-12", "Bandwidth", "eur", "0.13")]
    assert await revenue_of(env, "?to=2026-12-01T00:00:00%2B01:00") == [
        ("2026-11", "Bandwidth", "eur", "0.03"), ("2026-11", "Compute", "eur", "0.01")]
    async with client(env) as c:
        backwards = await c.get("/v1/reports/revenue?from=2026-12-01T00:00:00Z"
                                "&to=2026-11-01T00:00:00Z", headers=env.auth("viewer"))
        assert backwards.status == 400


@pytest.mark.pg
async def test_revenue_is_summed_on_each_shard_and_merged(
    tmp_path: Path, pki_dir: Path, pg_databases: Databases
) -> None:
    shards = ""
    for i in range(2):
        dsn = await pg_databases.create()
        shards += f'[[ledger.shards]]\ndsn = "{dsn}"\nslots = ["{i * 512}-{i * 512 + 511}"]\n'
    async with api_env(tmp_path, pki_dir, ledger=shards) as env:
        assert env.ledger.for_account("acme") is not env.ledger.for_account("globex")
        # Bandwidth is earned on both shards (0.02 + 0.01): one row, added up.
        assert await revenue_of(env) == [
            ("2026-11", "Bandwidth", "eur", "0.03"),
            ("2026-11", "Compute", "eur", "0.01"),
        ]


async def adjustments(env: ApiEnv, query: str = "") -> list[dict[str, str]]:
    async with client(env) as c:
        found, _ = await walk(c, env, "/v1/accounts/acme/adjustments" + query)
    return found


async def test_late_adjustments_of_an_account_as_they_stand_and_as_issued(
    env: ApiEnv,
) -> None:
    seeded = await seed_billing(env)  # acme's November is finalized
    assert await adjustments(env) == []
    # Usage of November arriving in December is billed on December's invoice.
    late = [record("host-a", quantity="1000000000", at_us=T0 + DAY_US, seq=60),
            record("host-a", "cpu.seconds", quantity="3600", at_us=T0 + DAY_US, seq=61)]
    await env.service.post(late, env.clock_us)
    found = await adjustments(env, "?limit=1")
    november = ("2026-11-01T00:00:00Z", "2026-12-01T00:00:00Z")
    # November held 1.875 GB (0.02) and 1 h (0.01): 2.875 GB is 0.04, 2 h is 0.02 (half
    # even from 0.025), so the late usage adds 0.02 and 0.01.
    assert [(a["kind"], a["price"], a["product"], (a["origin_start"], a["origin_end"]),
             a["quantity"], a["amount"]) for a in found] == [
        ("late_usage", "cpu", "Compute", november, None, "0.01"),
        ("late_usage", "egress", "Bandwidth", november, None, "0.02"),
    ]
    assert {(a["invoice_id"], a["number"], a["status"], a["period_start"]) for a in found} == {
        (None, None, "draft", "2026-12-01T00:00:00Z")}
    assert await adjustments(env, "?to=2026-12-01T00:00:00Z") == []

    # Once December is finalized, its invoice carries them as issued.
    env.clock_us = T0 + 64 * DAY_US  # 6 January 2027
    done = await env.app[BILLING]().finalize("acme", DECEMBER_2, env.clock_us, actor="test")
    assert done.invoice.number != seeded.invoice
    issued = await adjustments(env, "?from=2026-12-01T00:00:00Z")
    assert [(a["number"], a["status"], a["amount"]) for a in issued] == [
        (done.invoice.number, "finalized", "0.01"), (done.invoice.number, "finalized", "0.02")]
    assert issued == [
        {**a, "invoice_id": done.invoice.invoice_id, "number": done.invoice.number,
         "status": "finalized"} for a in found]
    async with client(env) as c:
        unknown = await c.get("/v1/accounts/initech/adjustments", headers=env.auth("viewer"))
        assert unknown.status == 404
        assert (await unknown.json())["type"].endswith("/account-not-found")


async def test_whoami_names_any_valid_token_and_refuses_the_rest(env: ApiEnv) -> None:
    async with client(env) as c:
        for who, role, scopes in (("viewer", "viewer", []), ("admin", "admin", []),
                                  ("ingest", None, ["ingest"])):
            me = await get(c, env, "/v1/whoami", who)
            assert me == {"token_id": env.token_ids[who], "name": who, "role": role,
                          "scopes": scopes}
        for who in ("revoked", "bad"):
            refused = await c.get("/v1/whoami", headers=env.auth(who))
            assert refused.status == 401
        assert (await c.get("/v1/whoami")).status == 401
