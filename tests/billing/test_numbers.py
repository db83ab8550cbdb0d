"""Invoice numbers under concurrent finalization, on a real PostgreSQL shard.

Two billing services with connection pools of their own (as two collectors or a
collector and the CLI would be) finalize a dozen accounts at once; two of those
finalizations fail after taking their number. The numbers that exist are still 1, 2,
3, ... without a gap, and finalizing one period from both services at once makes one
invoice.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import pytest

from collector.billing.service import Finalized
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import InvoiceQuery, LedgerStore
from collector.ledger.verify import verify_ledger
from common.errors import IntegrityError
from tests.billing.conftest import World, open_world
from tests.billing.scenario import PRICEBOOK, at
from tests.pg import Databases

ACCOUNTS = [f"acct{n:02d}" for n in range(12)]
FAILING = ("acct03", "acct07")
APRIL_3 = at("2026-04-03T12:00:00+00:00")
MARCH = at("2026-03-15T00:00:00+00:00")

INJECTED_FAILURE = f"""
CREATE FUNCTION fail_some() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.status = 'finalized' AND NEW.account_id IN {FAILING} THEN
        RAISE EXCEPTION 'injected failure after the number was taken';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER fail_some BEFORE INSERT OR UPDATE ON invoices
    FOR EACH ROW EXECUTE FUNCTION fail_some();
"""


def config(tmp_path: Path, dsn: str) -> Path:
    accounts = "".join(
        f'[accounts.{a}]\ncurrency = "eur"\n\n[[accounts.{a}.addons]]\nprice = "ipv4"\n'
        f'quantity = "{n + 1}"\nsince = "2026-03-01T00:00:00Z"\n\n'
        for n, a in enumerate(ACCOUNTS)
    )
    path = tmp_path / "collector.toml"
    path.write_text(f'tariff = "{PRICEBOOK}"\n\n[ledger]\n[[ledger.shards]]\ndsn = "{dsn}"\n\n'
                    f"{accounts}")
    return path


async def test_invoice_numbers_have_no_gaps_under_concurrent_finalization(
    tmp_path: Path, pg_databases: Databases
) -> None:
    dsn = await pg_databases.create()
    path = config(tmp_path, dsn)
    one, two = await open_world(path), await open_world(path)
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute(INJECTED_FAILURE)

        async def finalize(world: World, account: str) -> Finalized:
            return await world.billing.finalize(account, MARCH, APRIL_3, actor="test")

        results = await asyncio.gather(
            *(finalize((one, two)[n % 2], a) for n, a in enumerate(ACCOUNTS)),
            return_exceptions=True,
        )
        failed = [a for a, r in zip(ACCOUNTS, results, strict=True) if isinstance(r, Exception)]
        errors = {a: repr(r) for a, r in zip(ACCOUNTS, results, strict=True)
                  if isinstance(r, Exception)}
        assert failed == list(FAILING), errors
        numbers = sorted(r.invoice.number for r in results if isinstance(r, Finalized))
        assert numbers == [f"INV-0-{n:06d}" for n in range(1, 11)]

        await conn.execute("DROP TRIGGER fail_some ON invoices")
        await conn.close()
        twice = await asyncio.gather(finalize(one, "acct03"), finalize(two, "acct03"))
        assert sorted(r.created for r in twice) == [False, True]
        assert twice[0].invoice.stored == twice[1].invoice.stored
        last = await finalize(two, "acct07")
        assert {twice[0].invoice.number, last.invoice.number} == {"INV-0-000011", "INV-0-000012"}
        stored = await one.billing.invoices(InvoiceQuery(status="finalized"))
        assert len(stored) == 12
        assert (await verify_ledger(list(one.ledger.stores))).ok
    finally:
        await one.ledger.close()
        await two.ledger.close()


async def test_the_first_numbers_of_new_series_taken_at_once_all_succeed(
    pg_databases: Databases,
) -> None:
    """Four transactions over two pools take the first numbers of a new series at once.

    Each series is new, so all four try to create it: one does, the others count on in
    its row, and none fails on the series name that they all insert.
    """
    dsn = await pg_databases.create()
    stores = [await PostgresLedger.open(dsn, name="a"), await PostgresLedger.open(dsn, name="b")]
    try:
        async def take(store: LedgerStore, kind: str) -> tuple[str, int]:
            async with store.transaction() as tx:
                return await tx.next_number(kind, f"S-{kind}")

        for n in range(200):
            kind = f"kind{n}"
            taken = await asyncio.gather(*(take(s, kind) for s in stores * 2))
            assert sorted(taken) == [(f"S-{kind}", k) for k in (1, 2, 3, 4)]
    finally:
        for store in stores:
            await store.close()


@pytest.mark.parametrize("kind", ["sqlite", "pg"])
async def test_a_series_name_held_by_another_kind_of_number_is_refused(
    kind: str, tmp_path: Path, pg_databases: Databases
) -> None:
    store: LedgerStore = (await SqliteLedger.open(tmp_path / "ledger.db") if kind == "sqlite"
                          else await PostgresLedger.open(await pg_databases.create()))
    try:
        async with store.transaction() as tx:
            assert await tx.next_number("invoice", "X-0") == ("X-0", 1)
        with pytest.raises(IntegrityError, match="'X-0' for credit_note numbers is already"
                                                 " held by invoice numbers"):
            async with store.transaction() as tx:
                await tx.next_number("credit_note", "X-0")
        assert await store.number_series() == {"invoice": "X-0"}
        async with store.transaction() as tx:
            assert await tx.next_number("invoice", "X-0") == ("X-0", 2)
    finally:
        await store.close()
