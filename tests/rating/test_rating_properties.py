"""Properties of rating that hold for every price: split-invariance, monotony, currency."""

from __future__ import annotations

import ast
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from collector.rating.engine import (
    billing_quantity,
    increment,
    rated_amount,
    to_billing_units,
    usage_amount,
)
from collector.rating.model import Price
from collector.rating.proration import Window
from collector.rating.quote import QuoteItem, QuoteRequest, quote, quote_document
from collector.rating.tariff import parse_tariff
from common.money import CONTEXT, exponent
from tests import strategies

ROOT = Path(__file__).resolve().parents[2]


def _telescoped(price: Price, parts: list[Decimal], exact: bool) -> Decimal:
    """Post each batch as the collector does, against a running counter in base units."""
    posted = Decimal(0)
    counter = Decimal(0)
    for part in parts:
        after = CONTEXT.add(counter, part)
        if exact:
            posted += increment(
                price, billing_quantity(price, counter), billing_quantity(price, after)
            )
        else:
            posted += increment(
                price, to_billing_units(price, counter), to_billing_units(price, after)
            )
        counter = after
    return posted


@given(price=strategies.metered_prices(), parts=strategies.batches(), exact=st.booleans())
def test_any_split_into_batches_sums_to_the_amount_of_the_whole(
    price: Price, parts: list[Decimal], exact: bool
) -> None:
    total = sum(parts, Decimal(0))
    quantity = billing_quantity(price, total) if exact else to_billing_units(price, total)
    assert _telescoped(price, parts, exact) == rated_amount(price, quantity)


@given(
    price=strategies.metered_prices(schemes=("per_unit", "graduated")),
    smaller=strategies.decimals(max_value=100_000, places=4),
    more=strategies.decimals(max_value=100_000, places=4),
)
def test_amount_never_decreases_as_usage_grows(
    price: Price, smaller: Decimal, more: Decimal
) -> None:
    larger = smaller + more
    assert usage_amount(price, smaller) <= usage_amount(price, larger)
    assert rated_amount(price, smaller) <= rated_amount(price, larger)


@given(
    document=strategies.metered_price_documents(),
    currency=strategies.currencies(),
    quantity=strategies.decimals(max_value=100_000, places=4),
)
def test_a_quote_keeps_the_currency_of_its_prices_and_its_minor_unit(
    document: dict[str, object], currency: str, quantity: Decimal
) -> None:
    tariff = parse_tariff({"prices": [{**document, "currency": currency}]}, "<test>")
    period = Window(datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC))
    request = QuoteRequest(period=period, items=(QuoteItem("p", quantity=quantity),))
    result = quote(tariff, request)
    document_out = quote_document(result)
    assert result.currency == currency
    assert document_out["currency"] == currency
    amount = Decimal(str(document_out["total"]))
    assert amount.as_tuple().exponent == -exponent(currency)
    assert isinstance(result.total, Decimal)


def _float_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            found.append(f"{path.name}:{node.lineno}: float literal {node.value!r}")
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "float":
            found.append(f"{path.name}:{node.lineno}: float() call")
        annotations: list[ast.expr] = []
        if isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
        if isinstance(node, ast.arg) and node.annotation is not None:
            annotations.append(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns:
            annotations.append(node.returns)
        for annotation in annotations:
            if "float" in ast.unparse(annotation):
                found.append(f"{path.name}:{node.lineno}: float annotation")
    return found


def test_no_float_on_the_rating_path() -> None:
    modules = sorted((ROOT / "collector" / "rating").glob("*.py"))
    modules.append(ROOT / "collector" / "tariff_cli.py")
    assert len(modules) > 5
    problems = [problem for module in modules for problem in _float_uses(module)]
    assert problems == []
