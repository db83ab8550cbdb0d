"""``meterd billing``: close periods, review, finalize, export and correct invoices.

The commands open the ledger named by the collector configuration directly (the
embedded SQLite file or the PostgreSQL shards), so they work whether or not the
collector runs. Every change (close, finalize, credit, quarantine release) is recorded
in the audit log as ``cli:<user>`` (or ``--actor``).

``--now`` runs a command as if the clock showed that instant (to close or finalize a
past period exactly as it would have been then); it cannot lie in the future.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from collector.billing.document import render_html
from collector.billing.service import BillingService, Invoice, billing_service
from collector.config import LoadedCollectorConfig, load_collector_config
from collector.ledger.store import INVOICE_STATUSES, InvoiceQuery
from common.cli import EXIT_OK
from common.errors import ValidationError
from common.money import canonical_text
from common.records import from_us, to_us

DEFAULT_CONFIG = Path("/etc/meterd/collector.toml")


def register(subparsers: Any) -> None:
    billing = subparsers.add_parser(
        "billing",
        help="close periods, finalize, export and correct invoices",
        description="Invoices from the ledger: close, preview, finalize, list, show, export,"
        " credit, and records in quarantine.",
    )
    sub = billing.add_subparsers(metavar="ACTION", required=True)

    def command(name: str, help_text: str, handler: Callable[..., Any]) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = sub.add_parser(
            name, help=help_text, description=help_text
        )
        parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                            help="collector TOML file")
        parser.set_defaults(handler=handler)
        return parser

    close = command("close", "store a draft invoice for every period whose grace window has"
                    " passed and that is not finalized", _close)
    close.add_argument("--account", action="append", default=None,
                       help="only this account (repeat for several)")
    _changes(close)

    preview = command("preview", "an account's invoice as it stands now (stores nothing)",
                      _preview)
    preview.add_argument("--account", required=True, help="account id")
    preview.add_argument("--period", default=None,
                         help="a date or instant within the period (default: now)")
    _format(preview)
    _now(preview)

    finalize = command("finalize", "finalize invoices: one period of an account, or every"
                       " stored draft whose grace window has passed", _finalize)
    finalize.add_argument("--account", default=None, help="account id")
    finalize.add_argument("--period", default=None,
                          help="a date or instant within the period (with --account)")
    _changes(finalize)

    listing = command("list", "list invoices", _list)
    listing.add_argument("--account", default=None, help="account id")
    listing.add_argument("--status", choices=INVOICE_STATUSES, default=None)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")

    show = command("show", "one invoice or credit note, by number or id", _show)
    show.add_argument("ref", metavar="NUMBER", help="invoice or credit note number (or id)")
    _format(show)

    export = command("export", "finalized invoices and credit notes issued in a range, as CSV",
                     _export)
    export.add_argument("--what", choices=("invoices", "lines"), default="invoices",
                        help="one row per document, or one per line")
    export.add_argument("--from", dest="start", required=True,
                        help="issued at or after: a date (UTC midnight) or an instant")
    export.add_argument("--to", dest="end", required=True, help="issued before")
    export.add_argument("--account", default=None, help="only this account")
    export.add_argument("--out", type=Path, default=None, help="write here (default: stdout)")

    credit = command("credit", "issue a credit note against a finalized invoice", _credit)
    credit.add_argument("ref", metavar="NUMBER", help="the invoice's number (or id)")
    credit.add_argument("--reason", required=True, help="why (printed on the credit note)")
    credit.add_argument("--amount", default=None,
                        help="amount before exclusive tax (default: all that is left)")
    _changes(credit)

    quarantine = sub.add_parser("quarantine", help="records beyond the maximum lateness")
    qsub = quarantine.add_subparsers(metavar="ACTION", required=True)
    qlist = qsub.add_parser("list", help="records in quarantine, with their reason")
    qlist.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file")
    qlist.add_argument("--host", default=None, help="only this host's records")
    qlist.add_argument("--released", action="store_true", help="include released records")
    qlist.add_argument("--json", action="store_true", help="one JSON object per line")
    qlist.set_defaults(handler=_quarantine_list)
    release = qsub.add_parser("release", help="post quarantined records (each billed once)")
    release.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                         help="collector TOML file")
    release.add_argument("record_ids", metavar="RECORD_ID", nargs="*", help="records to release")
    release.add_argument("--all", action="store_true", help="every record in quarantine")
    release.add_argument("--host", default=None, help="with --all: only this host's records")
    _changes(release)
    release.set_defaults(handler=_release)


def _now(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--now", default=None,
                        help="act as if the clock showed this RFC 3339 instant (not later"
                        " than the real one)")


def _changes(parser: argparse.ArgumentParser) -> None:
    _now(parser)
    parser.add_argument("--actor", default=None,
                        help="who is acting, for the audit log (default: cli:<user>)")


def _format(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=("json", "html", "quote"), default="json",
                        help="the document as JSON, a printable HTML page, or (invoices)"
                        " the `meterd tariff quote` request it is priced from")


# -- running a command --------------------------------------------------------------------


def _actor(args: argparse.Namespace) -> str:
    if getattr(args, "actor", None):
        return str(args.actor)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


def _instant(text: str, option: str) -> int:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValidationError(
            f"{option}: expected a date (2026-03-01) or an RFC 3339 instant, got {text!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return to_us(moment)


def _now_us(args: argparse.Namespace) -> int:
    clock = time.time_ns() // 1000
    text = getattr(args, "now", None)
    if text is None:
        return clock
    at = _instant(text, "--now")
    if at > clock:
        raise ValidationError("--now: that instant lies in the future; billing acts on the past")
    return at


def _run(
    args: argparse.Namespace, work: Callable[[BillingService], Awaitable[int]]
) -> int:
    from collector.daemon import build_service, load_tariff, open_ledger

    async def run() -> int:
        cfg: LoadedCollectorConfig = load_collector_config(args.config)
        tariff = load_tariff(cfg.path(cfg.raw.tariff))
        ledger = await open_ledger(cfg)
        try:
            service = billing_service(cfg, build_service(cfg, ledger), tariff)
            return await work(service)
        finally:
            await ledger.close()

    return asyncio.run(run())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _line(invoice: Invoice) -> str:
    doc = invoice.document
    period = doc["period"]
    return (
        f"{invoice.status:<9} {invoice.number or '-':<16} {invoice.account_id:<16} "
        f"{period['start']} .. {period['end']}  {doc['total']:>12} {doc['currency'].upper()}"
    )


# -- commands -----------------------------------------------------------------------------


def _close(args: argparse.Namespace) -> int:
    async def work(service: BillingService) -> int:
        drafts = await service.close(_now_us(args), actor=_actor(args), account_ids=args.account)
        for draft in drafts:
            print(_line(draft))
        print(f"{len(drafts)} draft(s) stored; review them with `meterd billing list"
              " --status draft` and `meterd billing preview`")
        return EXIT_OK

    return _run(args, work)


def _preview(args: argparse.Namespace) -> int:
    async def work(service: BillingService) -> int:
        now = _now_us(args)
        at = now if args.period is None else service.period_at(args.account, args.period).start_us
        if args.format == "quote":
            _print_json(await service.quote_request(args.account, at))
            return EXIT_OK
        invoice = await service.preview(args.account, at)
        _output(invoice.document, args.format, invoice.stored.quote_request)
        return EXIT_OK

    return _run(args, work)


def _output(document: dict[str, Any], fmt: str, quote_request: str = "") -> None:
    if fmt == "html":
        print(render_html(document))
    elif fmt == "quote":
        if not quote_request:
            raise ValidationError("only an invoice has a quote request")
        _print_json(json.loads(quote_request))
    else:
        _print_json(document)


def _finalize(args: argparse.Namespace) -> int:
    async def work(service: BillingService) -> int:
        now, actor = _now_us(args), _actor(args)
        if args.account is not None and args.period is not None:
            at = service.period_at(args.account, args.period).start_us
            results = [await service.finalize(args.account, at, now, actor=actor)]
        elif args.period is not None:
            raise ValidationError("--period needs --account")
        else:
            accounts = None if args.account is None else [args.account]
            results = await service.finalize_drafts(now, actor=actor, account_ids=accounts)
        for result in results:
            note = "" if result.created else "  (already finalized: the same invoice)"
            if result.draft_total is not None and result.draft_total != result.invoice.total:
                note = f"  (the draft said {canonical_text(result.draft_total)})"
            print(_line(result.invoice) + note)
        print(f"{sum(r.created for r in results)} invoice(s) finalized")
        return EXIT_OK

    return _run(args, work)


def _list(args: argparse.Namespace) -> int:
    async def work(service: BillingService) -> int:
        if args.account is not None:
            service.account(args.account)
        invoices = await service.invoices(InvoiceQuery(account_id=args.account,
                                                       status=args.status))
        for invoice in invoices:
            if args.json:
                print(json.dumps(invoice.document, ensure_ascii=False, sort_keys=True))
            else:
                print(_line(invoice))
        return EXIT_OK

    return _run(args, work)


def _show(args: argparse.Namespace) -> int:
    async def work(service: BillingService) -> int:
        notes = await service.credit_notes(ref=args.ref)
        if notes:
            _output(notes[0].document, args.format)
            return EXIT_OK
        invoice = await service.invoice(args.ref)
        _output(invoice.document, args.format, invoice.stored.quote_request)
        return EXIT_OK

    return _run(args, work)


def _export(args: argparse.Namespace) -> int:
    start, end = _instant(args.start, "--from"), _instant(args.end, "--to")
    if end <= start:
        raise ValidationError("--to must be later than --from")

    async def work(service: BillingService) -> int:
        text = await service.export_csv(args.what, start, end, account_id=args.account)
        if args.out is None:
            sys.stdout.write(text)
        else:
            args.out.write_text(text, encoding="utf-8")
            rows = text.count("\r\n") - 1
            print(f"{args.out}: {rows} row(s)", file=sys.stderr)
        return EXIT_OK

    return _run(args, work)


def _credit(args: argparse.Namespace) -> int:
    amount: Decimal | None = None
    if args.amount is not None:
        try:
            amount = Decimal(args.amount)
        except InvalidOperation:
            raise ValidationError(f"--amount: expected a decimal such as 12.50, got {args.amount!r}"
                                  ) from None
        if not amount.is_finite():
            raise ValidationError(f"--amount: expected a finite decimal, got {args.amount!r}")

    async def work(service: BillingService) -> int:
        note = await service.credit(args.ref, reason=args.reason, amount=amount,
                                    now_us=_now_us(args), actor=_actor(args))
        doc = note.document
        print(f"credit note {note.number} for invoice {doc['invoice']['number']}:"
              f" {doc['total']} {doc['currency'].upper()} ({doc['reason']})")
        return EXIT_OK

    return _run(args, work)


def _quarantine_list(args: argparse.Namespace) -> int:
    async def work(service: BillingService) -> int:
        for q in await service.quarantined(args.host, released=args.released):
            r = q.record
            row = {
                "id": r.id, "host_id": r.host_id, "account": q.account_id, "metric": r.metric,
                "quantity": r.quantity_text, "unit": r.unit,
                "start": from_us(r.start_us).isoformat(), "end": from_us(r.end_us).isoformat(),
                "reason": q.reason, "received": from_us(q.received_us).isoformat(),
                "released": from_us(q.released_us).isoformat() if q.released_us else None,
                "released_by": q.released_by or None,
            }
            if args.json:
                print(json.dumps(row, sort_keys=True))
            else:
                state = f"released {row['released']} by {q.released_by}" if q.released_us else ""
                print(f"{r.id} {r.host_id} {q.account_id or '-'} {r.metric} {r.quantity_text}"
                      f" {r.unit} {row['start']} .. {row['end']}: {q.reason} {state}".rstrip())
        return EXIT_OK

    return _run(args, work)


def _release(args: argparse.Namespace) -> int:
    if args.all == bool(args.record_ids):
        raise ValidationError("give record ids, or --all (not both)")
    if args.host is not None and not args.all:
        raise ValidationError("--host goes with --all")

    async def work(service: BillingService) -> int:
        ids = None if args.all else args.record_ids
        result = await service.release(ids, _now_us(args), actor=_actor(args), host_id=args.host)
        print(f"{len(result.record_ids)} record(s) released: {result.accepted} posted,"
              f" {result.duplicate} already posted, {result.held} held (host unassigned)")
        return EXIT_OK

    return _run(args, work)
