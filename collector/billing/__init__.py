"""Billing: periods, invoices, reconciliation with the ledger, late usage, credit notes.

The pure part takes values and returns values (an import-linter contract in
``pyproject.toml`` keeps it free of I/O):

- :mod:`~collector.billing.periods`: an account's billing periods, in its time zone
  and on its cycle (monthly on an anchor day, hourly, or a custom interval).
- :mod:`~collector.billing.settings`: an account's billing settings (plans and add-ons
  with effective ranges, coupons, tax jurisdiction) and their check against a tariff.
- :mod:`~collector.billing.compose`: one invoice from the period's usage, the tariff
  and the settings, priced by :func:`collector.rating.quote.quote`.
- :mod:`~collector.billing.reconcile`: the journal entries that make the ledger equal
  the invoice to the minor unit, and the checks ``meterd ledger verify`` runs.
- :mod:`~collector.billing.document`: invoices and credit notes as JSON documents,
  printable HTML and CSV.

The rest does I/O: :mod:`~collector.billing.attribution` (run by the ingest path in
each posting transaction), :mod:`~collector.billing.service` (the async service the
REST API and ``meterd billing`` call), :mod:`~collector.billing.verify` and
:mod:`~collector.billing.quarantine`.
"""
