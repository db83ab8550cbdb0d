"""What ``meterd ledger verify`` checks of billing, on one shard.

- Every usage entry's period postings add up to its receivable posting (the record of
  which invoice carries which usage matches the journal), and none points to a missing
  entry.
- Every finalized invoice: its document is the one its journal entry was chained with
  (the digest in the entry's memo), it adds up (lines, subtotal, discounts, taxes,
  adjustments, total), and the receivable postings of its period (the usage carried by
  it, its rounding entry and its invoice entry) equal its total to the minor unit.
- Every credit note: chained the same way, adds up, posts ``-total`` to receivable,
  and the credit notes of an invoice never exceed it.
- Each shard's number series has no gaps: invoices (and credit notes) are numbered
  1, 2, 3, ... with none missing or repeated.
"""

from __future__ import annotations

import json
from collections import defaultdict
from decimal import Decimal

from collector.billing.document import credit_note_arithmetic, digest, invoice_arithmetic
from collector.billing.reconcile import (
    credit_note_memo,
    invoice_memo,
    receivable_of,
    rounding_memo,
)
from collector.ledger.journal import JournalEntry
from collector.ledger.store import InvoiceQuery, LedgerStore
from common.money import CONTEXT


def _gaps(kind: str, numbers: list[str]) -> list[str]:
    series: dict[str, list[int]] = defaultdict(list)
    for number in numbers:
        name, _, n = number.rpartition("-")
        series[name].append(int(n))
    problems = []
    for name, values in sorted(series.items()):
        if sorted(values) != list(range(1, len(values) + 1)):
            problems.append(f"{kind} numbers of series {name} are not 1..{len(values)}, no gaps")
    return problems


async def billing_problems(store: LedgerStore) -> list[str]:
    """Every billing inconsistency on ``store`` (empty when there is none)."""
    problems: list[str] = []
    entries: dict[str, JournalEntry] = {}
    for account_id in await store.accounts():
        async for link in store.chain(account_id):
            entries[link.entry.id] = link.entry
    by_entry, by_period = await store.period_posting_totals()
    for entry_id in sorted(by_entry):
        entry = entries.get(entry_id)
        if entry is None:
            problems.append(f"period postings of entry {entry_id}: the entry is missing")
        elif entry.kind != "usage":
            problems.append(f"period postings of entry {entry_id}: it is not a usage entry")
    for entry in entries.values():
        if entry.kind != "usage":
            continue
        currencies = {p.currency for p in entry.postings}
        posted = Decimal(0)
        for currency in sorted(currencies):
            posted = CONTEXT.add(posted, receivable_of(entry.postings, currency))
        carried = by_entry.get(entry.id, Decimal(0))
        if posted != carried:
            problems.append(
                f"account {entry.account_id} entry {entry.id}: receivable {posted} but its"
                f" period postings add up to {carried}"
            )

    invoices = await store.invoices(InvoiceQuery(status="finalized"))
    totals: dict[str, Decimal] = {}
    for invoice in invoices:
        where = f"invoice {invoice.number} (account {invoice.account_id})"
        document = json.loads(invoice.document)
        totals[invoice.invoice_id] = Decimal(document["total"])
        if digest(document) != invoice.digest:
            problems.append(f"{where}: its document does not match its digest")
        if digest(json.loads(invoice.quote_request)) != document["quote_request_sha256"]:
            problems.append(f"{where}: its quote request does not match the document")
        if Decimal(document["total"]) != invoice.total:
            problems.append(f"{where}: stored total {invoice.total}, document {document['total']}")
        problems += [f"{where}: {p}" for p in invoice_arithmetic(document)]
        entry = entries.get(invoice.entry_id)
        if entry is None:
            problems.append(f"{where}: its journal entry {invoice.entry_id} is missing")
            continue
        label = f"{document['period']['start']}/{document['period']['end']}"
        if entry.memo != invoice_memo(invoice.number or "", label, invoice.digest):
            problems.append(f"{where}: its journal entry was chained with another document")
        ledger = CONTEXT.add(
            by_period.get((invoice.account_id, invoice.period_start_us), Decimal(0)),
            receivable_of(entry.postings, invoice.currency),
        )
        if invoice.rounding_entry_id:
            rounding = entries.get(invoice.rounding_entry_id)
            if rounding is None or rounding.memo != rounding_memo(invoice.number or ""):
                problems.append(f"{where}: its rounding entry is missing or changed")
            else:
                ledger = CONTEXT.add(ledger, receivable_of(rounding.postings, invoice.currency))
        if ledger != Decimal(document["total"]):
            problems.append(
                f"{where}: total {document['total']} {invoice.currency} but the ledger holds"
                f" {ledger} for its period"
            )

    credited: dict[str, Decimal] = defaultdict(Decimal)
    notes = await store.credit_notes()
    for note in notes:
        where = f"credit note {note.number} (account {note.account_id})"
        document = json.loads(note.document)
        if digest(document) != note.digest:
            problems.append(f"{where}: its document does not match its digest")
        problems += [f"{where}: {p}" for p in credit_note_arithmetic(document)]
        entry = entries.get(note.entry_id)
        memo = credit_note_memo(note.number, document["invoice"]["number"], note.digest)
        if entry is None or entry.memo != memo:
            problems.append(
                f"{where}: its journal entry is missing or was chained with another document"
            )
        elif receivable_of(entry.postings, note.currency) != -note.total:
            problems.append(f"{where}: total {note.total} but its entry posts another amount")
        credited[note.invoice_id] = CONTEXT.add(credited[note.invoice_id], note.total)
    for invoice_id, amount in credited.items():
        total = totals.get(invoice_id)
        if total is None:
            problems.append(f"credit notes of invoice {invoice_id}: no such finalized invoice")
        elif amount > total:
            problems.append(f"invoice {invoice_id}: credited {amount}, more than its {total}")
    problems += _gaps("invoice", [i.number or "" for i in invoices])
    problems += _gaps("credit note", [n.number for n in notes])
    return problems

