"""Value types shared by the API's JSON bodies."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated

import msgspec

from common.money import canonical_text

DecimalText = Annotated[
    str,
    msgspec.Meta(
        pattern=r"^-?[0-9]+(\.[0-9]+)?$",
        description="an exact decimal number as a string (never a JSON number)",
        examples=["12.345"],
    ),
]

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]


def dec(value: Decimal) -> str:
    """A decimal as :data:`DecimalText`."""
    return canonical_text(value)
