"""No money or quantity passes through float on the pure path.

Static: the pure modules contain no float literal, no ``float(...)`` call and no
``float`` annotation. Dynamic: every entry point for money refuses a float.
"""

from __future__ import annotations

import ast
from decimal import Decimal
from pathlib import Path

import pytest

from common.errors import MoneyError, RecordError
from common.money import Money, to_decimal
from common.records import UsageRecord

ROOT = Path(__file__).resolve().parent.parent
PURE = [
    ROOT / "common" / "money.py",
    ROOT / "common" / "records.py",
    ROOT / "common" / "wire.py",
    ROOT / "collector" / "ledger" / "journal.py",
    ROOT / "collector" / "ledger" / "posting.py",
    ROOT / "collector" / "pricing.py",
    *sorted((ROOT / "collector" / "rating").glob("*.py")),
]


def float_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, float):
            found.append(f"{path.name}:{node.lineno} float literal {node.value!r}")
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "float"
        ):
            found.append(f"{path.name}:{node.lineno} float() call")
        elif (
            isinstance(node, ast.Name) and node.id == "float" and not isinstance(node.ctx, ast.Load)
        ):
            found.append(f"{path.name}:{node.lineno} float rebound")
        elif isinstance(node, (ast.arg, ast.AnnAssign)) and _annotated_float(node.annotation):
            found.append(f"{path.name}:{node.lineno} float annotation")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _annotated_float(
            node.returns
        ):
            found.append(f"{path.name}:{node.lineno} returns float")
    return found


def _annotated_float(annotation: ast.expr | None) -> bool:
    if annotation is None:
        return False
    return any(isinstance(n, ast.Name) and n.id == "float" for n in ast.walk(annotation)) or (
        isinstance(annotation, ast.Constant) and "float" in str(annotation.value)
    )


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(ROOT)))
def test_pure_module_has_no_float(path: Path) -> None:
    assert float_uses(path) == []


def test_the_scanner_finds_floats(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("x: float = 0.1\ndef f(a: float) -> float:\n    return float(a)\n")
    assert len(float_uses(sample)) == 5


@pytest.mark.parametrize("value", [0.1, 1.0, float("nan"), True])
def test_money_refuses_floats_and_booleans(value: object) -> None:
    with pytest.raises(MoneyError):
        to_decimal(value, "amount")
    with pytest.raises(MoneyError):
        Money(value, "eur")  # type: ignore[arg-type]


def test_money_refuses_mixing_currencies() -> None:
    with pytest.raises(MoneyError, match="eur with usd"):
        Money(Decimal(1), "eur") + Money(Decimal(1), "usd")


def test_record_refuses_a_float_quantity() -> None:
    with pytest.raises(RecordError, match="float"):
        UsageRecord(
            id="0190d9a4-3c2e-7000-8000-000000000000",
            host_id="h",
            metric="net.tx_bytes",
            quantity=0.5,
            unit="bytes",
            start_us=0,
            end_us=1,
            seq=0,
        )  # type: ignore[arg-type]
