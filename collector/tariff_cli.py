"""``meterd tariff``: check a tariff file and price a quote from it, without a server.

``meterd tariff check FILE`` validates a tariff (TOML, or JSON) and prints a short
summary, or every problem with its key path and exits 1.
``meterd tariff quote FILE --input QUOTE.json`` prices one invoice and prints it as
JSON. The format of both files is in ``docs/tariffs.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from collector.rating.document import TariffError
from collector.rating.model import Tariff
from collector.rating.quote import parse_quote_text, quote, quote_document
from collector.rating.tariff import parse_tariff_text
from common.cli import EXIT_ERROR, EXIT_OK
from common.errors import ConfigError


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meterd tariff`` and its subcommands."""
    parser = subparsers.add_parser(
        "tariff",
        help="check a tariff file and price quotes from it",
        description="Check tariff files and price invoices from them, without a server.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    check = commands.add_parser(
        "check",
        help="validate a tariff file and summarise it",
        description="Validate a tariff file (TOML, or JSON). Prints a short summary, or"
        " every problem with its key path and exits 1.",
    )
    check.add_argument("file", metavar="FILE", type=Path, help="tariff file")
    check.set_defaults(handler=_check)

    quote_parser = commands.add_parser(
        "quote",
        help="price one invoice from a tariff file and a quote request",
        description="Price one invoice: every amount is a decimal string in the"
        " currency's minor unit.",
    )
    quote_parser.add_argument("file", metavar="FILE", type=Path, help="tariff file")
    quote_parser.add_argument(
        "--input", metavar="QUOTE.json", type=Path, required=True, help="quote request"
    )
    quote_parser.set_defaults(handler=_quote)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "not UTF-8 text") from None


def _report(error: TariffError) -> int:
    for problem in error.errors:
        print(f"meterd: error: {problem}", file=sys.stderr)
    print(f"meterd: {_count(len(error.errors), 'problem')}", file=sys.stderr)
    return EXIT_ERROR


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"


def summary(tariff: Tariff) -> str:
    """One line describing what a tariff holds."""
    latest = [versions[-1] for versions in tariff.versions.values()]
    kinds = Counter(price.usage_type for price in latest)
    later = sum(len(versions) - 1 for versions in tariff.versions.values())
    currencies = ", ".join(sorted({price.currency for price in latest}))
    kinds_text = ", ".join(
        f"{kinds[kind]} {kind.replace('_', '-')}"
        for kind in ("licensed", "metered", "one_time")
        if kinds[kind]
    )
    parts = [
        f"{_count(len(latest), 'price')} in {currencies} ({kinds_text})",
        _count(later, "later version"),
        _count(len(tariff.plans), "plan"),
        _count(len(tariff.tax_rates), "tax rate"),
        _count(len(tariff.coupons), "coupon"),
    ]
    name = f"{tariff.name}: " if tariff.name else ""
    return name + ", ".join(parts)


def _check(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        tariff = parse_tariff_text(_read(path), str(path))
    except TariffError as exc:
        return _report(exc)
    print(f"{path}: ok: {summary(tariff)}")
    return EXIT_OK


def _quote(args: argparse.Namespace) -> int:
    path: Path = args.file
    request_path: Path = args.input
    try:
        tariff = parse_tariff_text(_read(path), str(path))
        request = parse_quote_text(_read(request_path), str(request_path))
        result = quote(tariff, request)
    except TariffError as exc:
        return _report(exc)
    print(json.dumps(quote_document(result), indent=2))
    return EXIT_OK
