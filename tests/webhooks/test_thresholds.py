"""balance.threshold_crossed: once per crossing, in the posting transaction."""

from __future__ import annotations

import itertools
import json
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from collector.ledger.outbox import BALANCE_THRESHOLD_CROSSED
from collector.ledger.service import LedgerService, Outcome, ShardedLedger
from collector.ledger.thresholds import DOWN, UP, BalanceThresholds, crossings
from collector.webhooks.state import outbox_after
from tests.ledger.helpers import T0, prices, record, router

LIMITS = BalanceThresholds.of("eur", [Decimal("0.05"), Decimal("0.10"), Decimal("0.02")])


def test_crossings_up_and_down_in_the_order_passed() -> None:
    assert crossings(LIMITS, Decimal("0.01"), Decimal("0.07")) == [
        (Decimal("0.02"), UP), (Decimal("0.05"), UP)
    ]
    assert crossings(LIMITS, Decimal("0.12"), Decimal("0.02")) == [
        (Decimal("0.10"), DOWN), (Decimal("0.05"), DOWN)
    ]
    assert crossings(LIMITS, Decimal("0.05"), Decimal("0.09")) == []  # at 0.05 already
    assert crossings(LIMITS, Decimal("0.04"), Decimal("0.05")) == [(Decimal("0.05"), UP)]
    assert crossings(LIMITS, Decimal("0.05"), Decimal("0.05")) == []


cents = st.integers(min_value=-2000, max_value=2000).map(lambda n: Decimal(n) / 100)


@settings(deadline=None)  # no timing in tests; the machine is shared
@given(st.lists(cents, min_size=1, max_size=30), st.lists(cents, max_size=5))
def test_each_threshold_is_crossed_once_per_change_of_side(
    path: list[Decimal], amounts: list[Decimal]
) -> None:
    limits = BalanceThresholds.of("eur", amounts)
    events = []
    balance = Decimal(0)
    for after in path:
        events += crossings(limits, balance, after)
        balance = after
    for t in limits.amounts:
        sides = [b >= t for b in [Decimal(0), *path]]
        changes = [DOWN if above else UP for above, now in itertools.pairwise(sides)
                   if above != now]
        assert [d for x, d in events if x == t] == changes


async def threshold_events(ledger: ShardedLedger) -> list[dict[str, str]]:
    found = await outbox_after(ledger.for_account("acme"), 0, 100)
    assert {e.event_type for e in found} <= {BALANCE_THRESHOLD_CROSSED}
    assert {e.account_id for e in found} <= {"acme"}
    return [json.loads(e.data) for e in found]


async def test_usage_crossing_thresholds_emits_once_per_crossing(ledger: ShardedLedger) -> None:
    svc = LedgerService(ledger, router(), prices(), {"acme": LIMITS})
    gb = "1000000000"  # 1 GB egress = 0.013 EUR

    first = [record(quantity=gb)]  # 0.013 -> 0.01: nothing crossed
    await svc.post(first, T0)
    assert await threshold_events(ledger) == []

    await svc.post([record(quantity=gb, at_us=T0 + 10**7)], T0)  # 0.026 -> 0.03: 0.02
    await svc.post(first, T0)  # the same batch again: a duplicate, changes nothing
    many = [record(quantity=gb, at_us=T0 + n * 10**7) for n in range(2, 8)]
    outcomes = await svc.post(many, T0)  # 8 GB = 0.104 -> 0.10: crosses 0.05 and 0.10
    assert set(outcomes.values()) == {Outcome.ACCEPTED}
    events = await threshold_events(ledger)
    described = [(e["threshold"], e["direction"], e["balance_before"], e["balance"])
                 for e in events]
    assert described == [
        ("0.02", "up", "0.01", "0.03"),
        ("0.05", "up", "0.03", "0.10"),
        ("0.10", "up", "0.03", "0.10"),
    ]
    assert {e["currency"] for e in events} == {"eur"}
    entries = [link.entry.id async for link in ledger.for_account("acme").chain("acme")]
    assert [e["entry_id"] for e in events] == [entries[1], entries[2], entries[2]]

    # globex has no thresholds: its usage emits nothing.
    await svc.post([record(host="host-b", quantity="9" + gb)], T0)
    assert len(await outbox_after(ledger.for_account("globex"), 0, 100)) == (
        3 if ledger.for_account("globex") is ledger.for_account("acme") else 0
    )
