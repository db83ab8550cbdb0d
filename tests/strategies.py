"""Hypothesis strategies shared by the test suite."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import strategies as st

from collector.rating.model import Price
from collector.rating.tariff import parse_tariff
from common.money import CURRENCY_EXPONENTS

# -- money and quantities ------------------------------------------------------------------


def currencies() -> st.SearchStrategy[str]:
    """Any ISO 4217 code meterd knows, exponents 0, 2, 3 and 4 included."""
    return st.sampled_from(sorted(CURRENCY_EXPONENTS))


def decimals(max_value: int = 10_000, places: int = 6) -> st.SearchStrategy[Decimal]:
    """Non-negative decimals with at most ``places`` fractional digits."""
    return st.integers(min_value=0, max_value=max_value * 10**places).map(
        lambda n: Decimal(n).scaleb(-places)
    )


def unit_amounts() -> st.SearchStrategy[Decimal]:
    """Prices per unit as price books write them: up to 6 decimal places."""
    return st.one_of(
        st.sampled_from([Decimal(0), Decimal("0.01"), Decimal("0.005"), Decimal("12.00")]),
        decimals(max_value=100, places=6),
    )


def base_quantities() -> st.SearchStrategy[Decimal]:
    """Quantities in a base unit (bytes, seconds, requests): whole or with a fraction."""
    return st.one_of(
        st.integers(min_value=0, max_value=5 * 10**12).map(Decimal),
        decimals(max_value=10**6, places=3),
    )


def batches() -> st.SearchStrategy[list[Decimal]]:
    """A period's usage as the batches it arrives in."""
    return st.lists(base_quantities(), min_size=1, max_size=12)


# -- prices --------------------------------------------------------------------------------


@st.composite
def tiers(draw: st.DrawFn, min_size: int = 1) -> list[dict[str, object]]:
    """Ascending tiers ending in ``"inf"``, each with a unit and maybe a flat amount."""
    bounds = draw(
        st.lists(decimals(max_value=50_000, places=2).filter(lambda d: d > 0),
                 min_size=min_size - 1, max_size=4, unique=True)
    )  # fmt: skip
    result: list[dict[str, object]] = []
    for bound in [*sorted(bounds), None]:
        tier: dict[str, object] = {"up_to": "inf" if bound is None else str(bound)}
        tier["unit_amount_decimal"] = str(draw(unit_amounts()))
        if draw(st.booleans()):
            tier["flat_amount_decimal"] = str(draw(decimals(max_value=50, places=2)))
        result.append(tier)
    return result


METERED_UNITS = ("GB", "GiB", "MB", "hour", "GiB-hour", "request")
_METRIC_OF_BASE = {
    "bytes": "net.tx_bytes",
    "seconds": "vm.running_seconds",
    "byte_seconds": "storage.used_byte_seconds",
    "requests": "s3.requests",
}


@st.composite
def metered_price_documents(
    draw: st.DrawFn,
    schemes: tuple[str, ...] = ("per_unit", "graduated", "volume"),
    currency: str | None = None,
) -> dict[str, object]:
    """A metered ``[[prices]]`` table, as a tariff file would hold it."""
    from collector.rating.units import UNITS

    unit = draw(st.sampled_from(METERED_UNITS))
    document: dict[str, object] = {
        "id": "p",
        "currency": currency or draw(currencies()),
        "metric": _METRIC_OF_BASE[UNITS[unit].base],
        "unit": unit,
        "recurring": {"interval": "month", "usage_type": "metered", "aggregate_usage": "sum"},
    }
    scheme = draw(st.sampled_from(schemes))
    if scheme == "per_unit":
        document["unit_amount_decimal"] = str(draw(unit_amounts()))
        if draw(st.booleans()):
            document["transform_quantity"] = {
                "divide_by": draw(st.integers(min_value=1, max_value=10_000)),
                "round": draw(st.sampled_from(["up", "down"])),
            }
    else:
        document["billing_scheme"] = "tiered"
        document["tiers_mode"] = scheme
        document["tiers"] = draw(tiers())
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        document["period_cap_decimal"] = str(draw(decimals(max_value=500, places=2)) + 1)
    if draw(st.integers(min_value=0, max_value=3)) == 0:
        document["rounding"] = draw(st.sampled_from(["half_up", "up", "down", "floor"]))
    return document


def price_from(document: dict[str, object]) -> Price:
    """The one price of a tariff holding only ``document``."""
    tariff = parse_tariff({"prices": [document]}, "<hypothesis>")
    return tariff.versions[str(document["id"])][0]


def metered_prices(
    schemes: tuple[str, ...] = ("per_unit", "graduated", "volume"),
) -> st.SearchStrategy[Price]:
    """Metered prices of the given billing schemes, in any currency."""
    return metered_price_documents(schemes=schemes).map(price_from)
