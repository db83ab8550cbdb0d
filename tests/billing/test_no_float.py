"""No float on billing's money path: the pure billing modules hold none."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_no_float import float_uses

BILLING = Path(__file__).resolve().parents[2] / "collector" / "billing"
PURE = ["periods.py", "settings.py", "compose.py", "reconcile.py", "document.py"]


@pytest.mark.parametrize("name", PURE)
def test_pure_billing_modules_use_no_float(name: str) -> None:
    assert float_uses(BILLING / name) == []
