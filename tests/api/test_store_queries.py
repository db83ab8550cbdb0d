"""The REST API's store queries, tokens and audit log keep the same promises on the
embedded SQLite file and on PostgreSQL."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest

from collector.api.auth import authenticate, create_token, hash_token, revoke_token
from collector.api.registry import Role
from collector.audit import AuditLog, verify_audit_log
from collector.ledger.service import LedgerService
from collector.ledger.store import LedgerStore, UsageBucket, UsageQuery
from collector.ledger.verify import verify_ledger
from common.errors import ValidationError
from tests.api.env import DAY_US, HOUR_US, seed_usage
from tests.ledger.helpers import T0, open_stores, service
from tests.pg import Databases

EVER = (-(2**62), 2**62)


@pytest.fixture(params=["sqlite", "pg"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[LedgerStore]:
    databases: Databases | None = None
    if request.param != "sqlite":
        databases = Databases(request.getfixturevalue("pg_server"))
    (opened,) = await open_stores(request.param, tmp_path, databases)
    try:
        yield opened
    finally:
        await opened.close()
        if databases is not None:
            await databases.drop_all()


@pytest.fixture
async def seeded(store: LedgerStore) -> LedgerService:
    svc = service([store])
    await seed_usage(svc, T0 + DAY_US)
    return svc


def rows(found: list[UsageBucket]) -> list[tuple[object, ...]]:
    return [(b.start_us, b.account_id, b.host_id, b.metric, b.quantity, b.records)
            for b in found]


async def test_usage_per_bucket_is_exact(store: LedgerStore, seeded: LedgerService) -> None:
    day0 = T0 - 12 * HOUR_US  # 2026-11-03T00:00Z
    days = rows(await store.usage_series(UsageQuery("day", *EVER)))
    assert days == [
        (day0, "acme", "host-a", "cpu.seconds", Decimal(3600), 1),
        (day0, "acme", "host-a", "net.tx_bytes", Decimal(1_750_000_000), 3),
        (day0, "globex", "host-b", "net.tx_bytes", Decimal(700_000_000), 1),
        (day0 + DAY_US, "acme", "host-a", "net.tx_bytes", Decimal(125_000_000), 1),
        (day0 + 30 * DAY_US, "acme", "host-a", "net.tx_bytes", Decimal(1), 1),
    ]
    hours = rows(await store.usage_series(
        UsageQuery("hour", *EVER, account_id="acme", metric="net.tx_bytes")))
    assert [(h[0], h[4], h[5]) for h in hours] == [
        (T0, Decimal(1_500_000_000), 2),
        (T0 + 2 * HOUR_US, Decimal(250_000_000), 1),
        (T0 + DAY_US, Decimal(125_000_000), 1),
        (T0 + 30 * DAY_US, Decimal(1), 1),
    ]
    nov, dec = day0 - 2 * DAY_US, day0 + 28 * DAY_US  # 2026-11-01, 2026-12-01
    months = rows(await store.usage_series(UsageQuery("month", *EVER, host_id="host-a")))
    assert [(m[0], m[3], m[4]) for m in months] == [
        (nov, "cpu.seconds", Decimal(3600)),
        (nov, "net.tx_bytes", Decimal(1_875_000_000)),
        (dec, "net.tx_bytes", Decimal(1)),
    ]
    minutes = rows(await store.usage_series(
        UsageQuery("minute", T0, T0 + HOUR_US, account_id="acme")))
    assert [(m[0], m[3]) for m in minutes] == [
        (T0, "cpu.seconds"), (T0, "net.tx_bytes"), (T0 + 30 * 60_000_000, "net.tx_bytes")]


async def test_usage_pages_resume_after_their_key(
    store: LedgerStore, seeded: LedgerService
) -> None:
    everything = await store.usage_series(UsageQuery("hour", *EVER, limit=100))
    assert len(everything) == 6
    pages, after = [], None
    while True:
        page = await store.usage_series(UsageQuery("hour", *EVER, after=after, limit=3))
        if not page:
            break
        pages.extend(page)
        after = page[-1].key
    assert pages == everything


async def test_journal_pages(store: LedgerStore, seeded: LedgerService) -> None:
    entries = await store.journal_page("acme", from_us=EVER[0], to_us=EVER[1], after_seq=0,
                                       limit=100)
    assert [e.chain_seq for e in entries] == [1, 2, 3, 4, 5, 6]
    assert all(sum(p.amount for p in e.entry.postings) == 0 for e in entries)
    assert entries[0].entry.postings  # the first gigabyte is rated and posted
    chain = [link async for link in store.chain("acme")]
    assert entries == chain
    tail = await store.journal_page("acme", from_us=EVER[0], to_us=EVER[1], after_seq=4,
                                    limit=1)
    assert [e.chain_seq for e in tail] == [5]
    created = entries[0].entry.created_us
    assert await store.journal_page("acme", from_us=created + 1, to_us=EVER[1], after_seq=0,
                                    limit=10) == []


async def test_tokens_hash_only_revoke_once(store: LedgerStore) -> None:
    token, secret = await create_token(store, name="crm", role=Role.BILLING, scopes=("ingest",),
                                       actor="cli:root", now_us=T0)
    assert (await store.find_token(hash_token(secret))) == token
    principal = await authenticate(store, secret)
    assert principal is not None
    assert principal.role is Role.BILLING
    assert await authenticate(store, secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    revoked = await revoke_token(store, token.token_id, actor="cli:root", now_us=T0 + 1)
    assert revoked.revoked_us == T0 + 1
    assert await authenticate(store, secret) is None
    again = await revoke_token(store, token.token_id, actor="cli:root", now_us=T0 + 2)
    assert again == revoked
    refused = (sqlite3.IntegrityError, asyncpg.exceptions.InsufficientPrivilegeError)
    for sql in ("UPDATE api_tokens SET revoked_us = NULL", "DELETE FROM api_tokens",
                "UPDATE api_tokens SET role = 'admin'"):
        with pytest.raises(refused):
            await _execute(store, sql)
    assert await store.tokens() == [revoked]
    actions = [r.action for r in await store.audit_rows(from_us=EVER[0], to_us=EVER[1],
                                                        after_seq=0, limit=None)]
    assert actions == ["token.create", "token.revoke"]


async def test_audit_log_is_chained_and_append_only(store: LedgerStore) -> None:
    log = AuditLog(store, clock=iter(range(T0, T0 + 10)).__next__)
    first = await log.record("cli:root", "invoice.finalize", "invoice/1",
                             {"total": Decimal("12.30")}, {"total": Decimal("12.30"), "n": 1})
    assert first.seq == 1
    assert first.before == '{"total":"12.3"}'
    await log.record("token:ops/x", "webhook.create", "webhook/2", None, {"url": "https://e"})
    await log.record("token:ops/x", "webhook.delete", "webhook/2", {"url": "https://e"}, None)
    assert await verify_audit_log(store) == (3, [])
    refused = (sqlite3.IntegrityError, asyncpg.exceptions.InsufficientPrivilegeError)
    for sql in ("UPDATE audit_log SET actor = 'someone-else'", "DELETE FROM audit_log"):
        with pytest.raises(refused):
            await _execute(store, sql)
    with pytest.raises(ValidationError, match="float"):
        await log.record("cli:root", "x.y", "z", None, {"amount": 1.5})
    # Past the triggers (an owner with direct database access), a change is still found.
    await _tamper(store, "UPDATE audit_log SET after_json = '{\"url\":\"https://evil\"}'"
                         " WHERE seq = 2")
    count, problems = await verify_audit_log(store)
    assert count == 3
    assert problems == ["audit log row 2: its content does not match its hash (changed after"
                        " it was recorded)"]
    report = await verify_ledger([store])
    assert report.audit_rows == 3
    assert any("audit log row 2" in p for p in report.problems)


async def _execute(store: LedgerStore, sql: str) -> None:
    async with store.transaction() as tx:
        conn = getattr(tx, "_conn", None)
        if conn is not None:
            await conn.execute(sql)
        else:
            await store._run(store.conn.execute, sql)  # type: ignore[attr-defined]


async def _tamper(store: LedgerStore, sql: str) -> None:
    """Change a row the way only someone bypassing the triggers could."""
    async with store.transaction() as tx:
        conn = getattr(tx, "_conn", None)
        if conn is not None:
            await conn.execute("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only")
            await conn.execute(sql)
            await conn.execute("ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only")
        else:
            def run() -> None:
                c = store.conn  # type: ignore[attr-defined]
                c.execute("DROP TRIGGER audit_log_no_update")
                c.execute(sql)
            await store._run(run)  # type: ignore[attr-defined]
