"""The journal model: postings, balanced entries, and the hash chain. Pure values.

A journal entry belongs to one customer account and is a set of postings whose
amounts sum to zero per currency; an entry that does not balance cannot be
constructed. Entries are chained per customer account: each entry stores the hash of
its predecessor in that account's chain, and its own hash covers its predecessor's
hash and every field of the entry, so changing, removing or reordering any entry after
the fact breaks every later hash. ``meterd ledger verify`` recomputes the chains.

Ledger account names (the chart of accounts), one balance per customer account:

- ``receivable``           what the customer owes (debit, positive)
- ``revenue:<product>``    what was earned per product (credit, negative)
- ``tax_payable:<rate>``   tax collected for a jurisdiction (credit, negative)
- ``rounding``             explicit rounding differences (either sign)
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal

from common.errors import IntegrityError, ValidationError
from common.money import CONTEXT, canonical_text, currency_code, to_decimal

GENESIS_HASH = "0" * 64

RECEIVABLE = "receivable"


def revenue_account(product: str) -> str:
    return f"revenue:{product}"


@dataclass(frozen=True, slots=True)
class Posting:
    """One line of an entry: a signed amount on one ledger account in one currency."""

    ledger_account: str
    currency: str
    amount: Decimal

    def __post_init__(self) -> None:
        if not self.ledger_account or len(self.ledger_account) > 200:
            raise ValidationError("a posting needs a ledger account name of 1 to 200 characters")
        object.__setattr__(self, "currency", currency_code(self.currency))
        object.__setattr__(self, "amount", to_decimal(self.amount, "posting amount"))


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A balanced set of postings for one customer account.

    ``records_digest`` is the digest of the usage records the entry rates (see
    :func:`records_digest`), so the chain also covers which records were billed.
    An entry may have no postings when its records rated to zero (free tiers): the
    chain still covers those records.
    """

    id: str
    account_id: str
    kind: str
    memo: str
    created_us: int
    postings: tuple[Posting, ...]
    records_digest: str = ""

    def __post_init__(self) -> None:
        if not self.account_id:
            raise ValidationError("a journal entry needs an account")
        if self.kind not in ENTRY_KINDS:
            raise ValidationError(f"unknown journal entry kind {self.kind!r}")
        object.__setattr__(self, "postings", tuple(self.postings))
        unbalanced = {c: s for c, s in sums_by_currency(self.postings).items() if s != 0}
        if unbalanced:
            detail = ", ".join(f"{c}: {canonical_text(s)}" for c, s in sorted(unbalanced.items()))
            raise ValidationError(f"journal entry {self.id} does not balance ({detail})")


ENTRY_KINDS = frozenset({"usage", "adjustment", "credit_note", "rounding", "invoice"})


def sums_by_currency(postings: Iterable[Posting]) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = defaultdict(Decimal)
    for p in postings:
        totals[p.currency] = CONTEXT.add(totals[p.currency], p.amount)
    return dict(totals)


def records_digest(items: Iterable[tuple[str, str]]) -> str:
    """Digest of (record id, quantity text) pairs, order-independent."""
    # One update of the whole text: the same digest as one update per pair, at a
    # fraction of the calls.
    text = "".join([f"{record_id}={quantity};" for record_id, quantity in sorted(items)])
    return hashlib.sha256(text.encode()).hexdigest()


def entry_hash(entry: JournalEntry, chain_seq: int, prev_hash: str) -> str:
    """The hash that links ``entry`` at position ``chain_seq`` after ``prev_hash``."""
    h = hashlib.sha256()
    fields: Sequence[str] = (
        prev_hash,
        str(chain_seq),
        entry.id,
        entry.account_id,
        entry.kind,
        entry.memo,
        str(entry.created_us),
        entry.records_digest,
    )
    for f in fields:
        h.update(f.encode())
        h.update(b"\x1f")
    for p in sorted(entry.postings, key=lambda p: (p.ledger_account, p.currency, p.amount)):
        h.update(f"{p.ledger_account}\x1e{p.currency}\x1e{canonical_text(p.amount)}".encode())
        h.update(b"\x1d")
    return h.hexdigest()


@dataclass(frozen=True, slots=True)
class ChainLink:
    """A stored entry with its position and hashes, as read back for verification."""

    entry: JournalEntry
    chain_seq: int
    prev_hash: str
    hash: str


def verify_chain(links: Sequence[ChainLink]) -> list[str]:
    """Problems found in one account's chain (empty when intact), links in chain order."""
    problems: list[str] = []
    expected_prev = GENESIS_HASH
    for position, link in enumerate(links, start=1):
        where = f"account {link.entry.account_id} entry {link.entry.id} (#{link.chain_seq})"
        if link.chain_seq != position:
            problems.append(f"{where}: chain position {link.chain_seq}, expected {position}")
        if link.prev_hash != expected_prev:
            problems.append(f"{where}: predecessor hash does not match the previous entry")
        recomputed = entry_hash(link.entry, link.chain_seq, link.prev_hash)
        if recomputed != link.hash:
            problems.append(f"{where}: contents changed after posting (hash mismatch)")
        expected_prev = link.hash
    return problems


def check_balanced(entry_id: str, postings: Iterable[Posting]) -> None:
    """Raise :class:`IntegrityError` if stored postings of an entry do not balance."""
    unbalanced = {c: s for c, s in sums_by_currency(postings).items() if s != 0}
    if unbalanced:
        raise IntegrityError(f"entry {entry_id} does not balance: {unbalanced}")


def restore_entry(
    entry_id: str,
    account_id: str,
    kind: str,
    memo: str,
    created_us: int,
    postings: Sequence[Posting],
    digest: str,
) -> JournalEntry:
    """Rebuild a stored entry without the balance check, so verify can report a bad one."""
    entry = object.__new__(JournalEntry)
    for name, value in (
        ("id", entry_id),
        ("account_id", account_id),
        ("kind", kind),
        ("memo", memo),
        ("created_us", created_us),
        ("postings", tuple(postings)),
        ("records_digest", digest),
    ):
        object.__setattr__(entry, name, value)
    return entry
