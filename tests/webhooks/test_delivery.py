"""Delivery to a real receiver on loopback: at least once, in order, signed, retried,
dead-lettered and replayed; and never in the way of ingest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import aiohttp
import pytest

from collector.ledger.outbox import AGENT_SILENT, USAGE_LATE
from collector.ledger.service import ShardedLedger
from collector.ledger.thresholds import BalanceThresholds
from collector.webhooks.state import DEAD, DELIVERED, PENDING, outbox_after
from tests.ledger.helpers import T0, prices, receivable, record, router
from tests.pg import Databases
from tests.webhooks.helpers import (
    Received,
    Receiver,
    all_deliveries,
    emit,
    eventually,
    first_seen,
    open_ledger,
    webhook_service,
    worker,
)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        await r.stop()


async def test_receiver_down_then_up_gets_every_event_in_order_signed(
    ledger: ShardedLedger, tmp_path: Path, receiver: Receiver
) -> None:
    svc = webhook_service(ledger, tmp_path)
    created = await svc.create(receiver.url, actor="test")
    sub_id = created.subscription.id
    emitted = []
    for i in range(8):
        account = ("acme", "globex", "")[i % 3]
        kind = AGENT_SILENT if not account else USAGE_LATE
        emitted.append(await emit(ledger, kind, account, n=i))
    # Two workers, as two collectors would run them, against a receiver that is down.
    workers = [worker(ledger, tmp_path), worker(ledger, tmp_path)]
    for w in workers:
        w.start()
    try:

        async def head_retried() -> bool:
            found = await all_deliveries(svc, sub_id)
            return bool(found) and found[0].attempts >= 3

        await eventually(head_retried, "the first delivery tried three times")
        down = await all_deliveries(svc, sub_id)
        assert "ClientConnectorError" in down[0].last_error
        # In order: nothing after the first delivery is tried while it fails.
        assert all(d.attempts == 0 for d in down[1:])

        await receiver.start()

        async def all_delivered() -> bool:
            return all(d.status == DELIVERED for d in await all_deliveries(svc, sub_id))

        await eventually(all_delivered, "every delivery acknowledged")
    finally:
        for w in workers:
            await w.stop()
    bodies = receiver.verified(created.secret)  # every signature checks out
    assert first_seen([b["id"] for b in bodies]) == emitted
    assert [b["sequence"] for b in bodies] == sorted(b["sequence"] for b in bodies)
    assert sorted({b["sequence"] for b in bodies}) == list(range(1, 9))
    assert all(r.webhook_id == b["id"] for r, b in zip(receiver.requests, bodies, strict=True))
    assert receiver.most_in_flight == 1  # one subscription, one delivery at a time
    assert bodies[0]["type"] == USAGE_LATE
    assert bodies[0]["data"] == {"n": 0}
    assert bodies[2]["type"] == AGENT_SILENT
    assert bodies[2]["account_id"] == ""


async def test_events_of_several_shards_and_of_no_account_are_all_delivered(
    pg_server: str, tmp_path: Path, receiver: Receiver
) -> None:
    databases = Databases(pg_server)
    ledger = await open_ledger("pg2", tmp_path, databases)
    try:
        names = [f"acct{i}" for i in range(20)]
        on_0 = next(a for a in names if ledger.shard_map.shard_of(a) == 0)
        on_1 = next(a for a in names if ledger.shard_map.shard_of(a) == 1)
        svc = webhook_service(ledger, tmp_path)
        created = await svc.create(receiver.url, actor="test")
        await receiver.start()
        emitted: dict[str, list[str]] = {on_0: [], on_1: [], "": []}
        for i in range(9):
            account = (on_0, on_1, "")[i % 3]
            event_type = AGENT_SILENT if not account else USAGE_LATE
            emitted[account].append(await emit(ledger, event_type, account, n=i))
        # Events of no account are written on the control shard, the others on theirs.
        control = {e.event_id for e in await outbox_after(ledger.control, 0, 100)}
        other = {e.event_id for e in await outbox_after(ledger.stores[1], 0, 100)}
        assert set(emitted[""]) | set(emitted[on_0]) == control
        assert set(emitted[on_1]) == other
        w = worker(ledger, tmp_path)
        w.start()
        try:
            sub_id = created.subscription.id

            async def all_delivered() -> bool:
                found = await all_deliveries(svc, sub_id)
                return len(found) == 9 and all(d.status == DELIVERED for d in found)

            await eventually(all_delivered, "nine deliveries acknowledged")
        finally:
            await w.stop()
        bodies = receiver.verified(created.secret)
        seen = first_seen([b["id"] for b in bodies])
        assert sorted(seen) == sorted(i for ids in emitted.values() for i in ids)
        for ids in emitted.values():  # each shard's events in commit order
            assert [i for i in seen if i in ids] == ids
        assert sorted({b["sequence"] for b in bodies}) == list(range(1, 10))
    finally:
        await ledger.close()
        await databases.drop_all()


async def test_a_retried_delivery_carries_the_same_event_id_and_body(
    ledger: ShardedLedger, tmp_path: Path, receiver: Receiver
) -> None:
    seen: set[str] = set()

    def fail_first_time(r: Received) -> int:
        # The receiver processes each request, but its first answer per event is lost
        # (a 500), as when a proxy times out after the work was done.
        webhook_id = r.webhook_id
        if webhook_id in seen:
            return 200
        seen.add(webhook_id)
        return 500

    receiver.answer = fail_first_time
    await receiver.start()
    svc = webhook_service(ledger, tmp_path)
    created = await svc.create(receiver.url, event_types=["usage.*"], actor="test")
    emitted = [await emit(ledger, USAGE_LATE, "acme", n=i) for i in range(4)]
    await emit(ledger, AGENT_SILENT, "", host="web-1")  # not taken by the filter
    w = worker(ledger, tmp_path)
    w.start()
    try:

        async def all_delivered() -> bool:
            found = await all_deliveries(svc, created.subscription.id)
            return len(found) == 4 and all(d.status == DELIVERED for d in found)

        await eventually(all_delivered, "four deliveries acknowledged")
    finally:
        await w.stop()
    bodies = receiver.verified(created.secret)
    assert [r.webhook_id for r in receiver.requests] == [e for e in emitted for _ in (1, 2)]
    for first, again in zip(receiver.requests[::2], receiver.requests[1::2], strict=True):
        assert first.webhook_id == again.webhook_id
        assert first.body == again.body
    assert [b["id"] for b in bodies] == [r.webhook_id for r in receiver.requests]
    assert {d.attempts for d in await all_deliveries(svc, created.subscription.id)} == {2}


async def test_dead_letters_after_the_limit_then_replay_delivers_them(
    ledger: ShardedLedger, tmp_path: Path, receiver: Receiver
) -> None:
    receiver.answer = lambda _r: 503
    await receiver.start()
    svc = webhook_service(ledger, tmp_path, max_attempts=3)
    created = await svc.create(receiver.url, actor="test")
    sub_id = created.subscription.id
    emitted = [await emit(ledger, USAGE_LATE, "acme", n=i) for i in range(3)]
    w = worker(ledger, tmp_path, max_attempts=3)
    w.start()
    try:

        async def all_dead() -> bool:
            found = await all_deliveries(svc, sub_id)
            return len(found) == 3 and all(d.status == DEAD for d in found)

        await eventually(all_dead, "three dead letters")
        dead = await svc.deliveries(sub_id, status=DEAD)
        assert [(d.event_id, d.attempts, d.last_status) for d in dead] == [
            (e, 3, 503) for e in emitted
        ]
        # Each tried exactly three times, in order: one dead letter does not block the next.
        assert [r.webhook_id for r in receiver.requests] == [e for e in emitted for _ in "abc"]

        receiver.answer = lambda _r: 200
        receiver.requests.clear()
        assert await svc.replay(sub_id, dead=True, actor="test") == 3

        async def all_delivered() -> bool:
            found = await all_deliveries(svc, sub_id)
            return all(d.status == DELIVERED for d in found)

        await eventually(all_delivered, "the dead letters delivered after replay")
        assert [r.webhook_id for r in receiver.requests] == emitted

        # Replay from a sequence, and from an event: again in order, from there on.
        receiver.requests.clear()
        assert await svc.replay(sub_id, from_sequence=2, actor="test") == 2
        await eventually(all_delivered, "replay from sequence 2 delivered")
        assert await svc.replay(sub_id, from_event=emitted[2], actor="test") == 1
        await eventually(all_delivered, "replay from the third event delivered")
        assert [r.webhook_id for r in receiver.requests] == [emitted[1], emitted[2], emitted[2]]
    finally:
        await w.stop()
    receiver.verified(created.secret)
    audit = await ledger.control.audit_rows(from_us=0, to_us=2**62, after_seq=0, limit=None)
    assert [(a.action, a.target) for a in audit] == [
        ("webhook.create", f"webhook/{sub_id}"),
        *[("webhook.replay", f"webhook/{sub_id}")] * 3,
    ]


async def test_a_receiver_that_hangs_does_not_hold_up_ingest(
    ledger: ShardedLedger, tmp_path: Path, receiver: Receiver
) -> None:
    from collector.ledger.service import LedgerService, Outcome

    thresholds = {"acme": BalanceThresholds.of("eur", [Decimal(f"0.{n:02}") for n in range(1, 41)])}
    ingest = LedgerService(ledger, router(), prices(), thresholds)
    receiver.gate.clear()  # every request waits inside the receiver until released
    await receiver.start()
    svc = webhook_service(ledger, tmp_path)
    created = await svc.create(receiver.url, actor="test")
    w = worker(ledger, tmp_path, timeout_seconds=Decimal(600))
    w.start()
    try:
        # 1 GB egress = 0.013 EUR: each batch crosses at least one 0.01 threshold.
        first = await ingest.post([record(quantity="1000000000")], T0)
        assert set(first.values()) == {Outcome.ACCEPTED}
        # The first event's delivery is stuck inside the receiver (60 s: only a guard).
        await asyncio.wait_for(receiver.entered.wait(), 60)
        for n in range(1, 25):
            batch = [record(quantity="1000000000", at_us=T0 + n * 10_000_000)]
            outcomes = await ingest.post(batch, T0 + n)
            assert set(outcomes.values()) == {Outcome.ACCEPTED}
        # Every batch was posted, rated and its events written while the receiver hung.
        assert await receivable(ingest, "acme") == Decimal("0.32")  # 25 GB * 0.013
        assert receiver.in_flight == 1
        assert len(receiver.requests) == 1
        receiver.gate.set()

        async def all_delivered() -> bool:
            found = await all_deliveries(svc, created.subscription.id)
            return len(found) == 32 and all(d.status == DELIVERED for d in found)

        await eventually(all_delivered, "every threshold event delivered once released")
    finally:
        await w.stop()
    bodies = receiver.verified(created.secret)
    assert [b["data"]["threshold"] for b in bodies] == [f"0.{n:02}" for n in range(1, 33)]
    assert all(b["type"] == "balance.threshold_crossed" for b in bodies)


async def test_pending_deliveries_wait_while_a_subscription_is_disabled(
    ledger: ShardedLedger, tmp_path: Path, receiver: Receiver
) -> None:
    await receiver.start()
    svc = webhook_service(ledger, tmp_path)
    created = await svc.create(receiver.url, enabled=False, actor="test")
    sub_id = created.subscription.id
    event = await emit(ledger, USAGE_LATE, "acme", n=1)
    w = worker(ledger, tmp_path)
    async with aiohttp.ClientSession() as session:  # the worker's rounds, one at a time
        await w.poll(session)
        await w.settle()
        assert [(d.status, d.attempts) for d in await all_deliveries(svc, sub_id)] == [
            (PENDING, 0)
        ]
        assert receiver.requests == []
        await svc.set_enabled(sub_id, True, actor="test")
        await w.poll(session)
        await w.settle()
    assert [d.status for d in await all_deliveries(svc, sub_id)] == [DELIVERED]
    assert [r.webhook_id for r in receiver.requests] == [event]
