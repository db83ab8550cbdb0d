"""Rating usage into postings when a price changes within a period (pure)."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import Decimal

from collector.ledger.journal import records_digest
from collector.ledger.posting import rate_usage
from collector.ledger.store import Counter
from collector.pricing import AccountPrices, AccountTerms
from collector.rating.tariff import parse_tariff_text
from common.records import to_us
from tests.ledger.helpers import EGRESS_PRICE, record

# A second version of the egress price, in force from 15 November.
VERSIONED = EGRESS_PRICE + EGRESS_PRICE.replace('"0.013"', '"0.020"') + (
    'effective_from = "2026-11-15T00:00:00Z"\n'
)

BEFORE = to_us(datetime(2026, 11, 10, tzinfo=UTC))
AFTER = to_us(datetime(2026, 11, 20, tzinfo=UTC))


def prices() -> AccountPrices:
    return AccountPrices(parse_tariff_text(VERSIONED, "t.toml"), {"acme": AccountTerms("eur")})


def rate(records: list, counters: dict) -> tuple[Decimal, dict]:  # type: ignore[type-arg]
    batch = rate_usage(
        entry_id="e",
        account_id="acme",
        records=records,
        prices=prices(),
        counters=counters,
        now_us=0,
    )
    receivable = sum(
        (p.amount for p in batch.entry.postings if p.ledger_account == "receivable"), Decimal(0)
    )
    return receivable, batch.counters


def test_usage_before_a_new_version_keeps_its_price_in_one_batch() -> None:
    posted, counters = rate(
        [
            record(quantity="100000000000", at_us=AFTER),
            record(quantity="100000000000", at_us=BEFORE),
        ],
        {},
    )
    assert posted == Decimal("1.30") + Decimal("2.00")
    [counter] = counters.values()
    assert counter == Counter(Decimal("200000000000"), Decimal("3.30"))


def test_usage_before_a_new_version_keeps_its_price_across_batches() -> None:
    first, counters = rate([record(quantity="100000000000", at_us=BEFORE)], {})
    second, counters = rate([record(quantity="100000000000", at_us=AFTER)], counters)
    assert (first, second) == (Decimal("1.30"), Decimal("2.00"))


def test_within_one_version_pieces_add_up_to_the_rounded_total() -> None:
    counters: dict = {}  # type: ignore[type-arg]
    total = Decimal(0)
    for _ in range(7):  # 7 x 0.3 GB at 0.013: each piece alone would round to 0.00
        posted, counters = rate([record(quantity="300000000", at_us=BEFORE)], counters)
        total += posted
    assert total == Decimal("0.03")  # round(2.1 GB x 0.013 = 0.0273)


def test_records_digest_is_the_sha256_of_the_sorted_pairs() -> None:
    """Stored entries carry this digest and `meterd ledger verify` recomputes it: its
    definition must not drift, whatever order the pairs come in."""
    pairs = [("0190b-2", "2"), ("0190a-1", "1.5"), ("0190c-3", "0")]
    expected = hashlib.sha256(b"0190a-1=1.5;0190b-2=2;0190c-3=0;").hexdigest()
    assert records_digest(pairs) == expected
    assert records_digest(reversed(pairs)) == expected
    assert records_digest([]) == hashlib.sha256(b"").hexdigest()
