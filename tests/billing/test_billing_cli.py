"""``meterd billing`` through the real dispatcher: the README's month, command by command."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from decimal import Decimal
from pathlib import Path

import pytest

from common.cli import main
from tests.billing.conftest import open_world
from tests.billing.scenario import (
    PRICEBOOK,
    berlin_march,
    collector_toml,
    kolkata_week,
    newyork_period,
)
from tests.billing.test_month import post

NOW = "--now=2026-04-03T12:00:00+02:00"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    code = main(list(argv))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out


def fails(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 1
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("meterd: error: ")
    return lines[0]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = collector_toml(tmp_path)

    async def usage() -> None:
        world = await open_world(path)
        try:
            for traffic in (berlin_march(), newyork_period(), kolkata_week()):
                await post(world, traffic)
        finally:
            await world.ledger.close()

    asyncio.run(usage())
    return path


def test_a_billing_month_from_the_command_line(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = f"--config={config}"
    closed = run(capsys, "billing", "close", c, NOW)
    assert closed.count("draft ") == 6
    assert "6 draft(s) stored" in closed
    assert len(run(capsys, "billing", "list", c, "--status=draft").splitlines()) == 6

    draft = json.loads(run(capsys, "billing", "preview", c, "--account=berlin",
                           "--period=2026-03-15", NOW))
    assert draft["status"] == "draft"
    assert draft["number"] is None
    page = run(capsys, "billing", "preview", c, "--account=berlin", "--period=2026-03-15",
               "--format=html", NOW)
    assert "DRAFT" in page
    assert "Berliner Kunde GmbH" in page
    request = tmp_path / "berlin-march.json"
    request.write_text(run(capsys, "billing", "preview", c, "--account=berlin",
                           "--period=2026-03-15", "--format=quote", NOW))
    quoted = json.loads(run(capsys, "tariff", "quote", str(PRICEBOOK), f"--input={request}"))
    assert quoted["total"] == draft["quote_total"] == draft["total"]

    finalized = run(capsys, "billing", "finalize", c, NOW, "--actor=cli:alice")
    assert "6 invoice(s) finalized" in finalized
    again = run(capsys, "billing", "finalize", c, "--account=berlin", "--period=2026-03-15", NOW)
    assert "already finalized" in again
    assert "0 invoice(s) finalized" in again
    [berlin] = [
        json.loads(line)
        for line in run(capsys, "billing", "list", c, "--account=berlin", "--json").splitlines()
    ]
    number = berlin["number"]
    assert berlin["total"] == draft["total"]
    assert "DRAFT" not in run(capsys, "billing", "show", number, c, "--format=html")
    assert json.loads(run(capsys, "billing", "show", number, c))["invoice_id"] == (
        berlin["invoice_id"]
    )

    out = tmp_path / "invoices.csv"
    run(capsys, "billing", "export", c, "--from=2026-04-01", "--to=2026-05-01", f"--out={out}")
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 6
    assert {r["type"] for r in rows} == {"invoice"}
    lines = list(csv.DictReader(io.StringIO(run(
        capsys, "billing", "export", c, "--what=lines", "--from=2026-04-01", "--to=2026-05-01"
    ))))
    for row in rows:
        mine = [Decimal(line["amount"]) for line in lines if line["number"] == row["number"]]
        assert sum(mine, Decimal(0)) == Decimal(row["subtotal"])

    credited = run(capsys, "billing", "credit", number, c, "--reason=outage on 20 March",
                   "--amount=10.00", "--now=2026-04-10T09:00:00+02:00")
    assert credited.startswith(f"credit note CN-0-000001 for invoice {number}: 11.90 EUR")
    rows = list(csv.DictReader(io.StringIO(run(
        capsys, "billing", "export", c, "--from=2026-04-01", "--to=2026-05-01"
    ))))
    assert [r["total"] for r in rows if r["type"] == "credit_note"] == ["-11.90"]
    assert "outage on 20 March" in run(capsys, "billing", "show", "CN-0-000001", c,
                                       "--format=html")

    assert run(capsys, "billing", "quarantine", "list", c) == ""
    assert "0 record(s) released" in run(capsys, "billing", "quarantine", "release", c, "--all")
    assert "clean" in run(capsys, "ledger", "verify", c)


def test_billing_mistakes_are_one_line_and_change_nothing(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    c = f"--config={config}"
    assert "can be finalized from 2026-04-03T00:00:00+02:00" in fails(
        capsys, "billing", "finalize", c, "--account=berlin", "--period=2026-03-15",
        "--now=2026-04-02T12:00:00+02:00",
    )
    assert "in the future" in fails(capsys, "billing", "close", c, "--now=2099-01-01T00:00:00Z")
    assert "no account 'paris'" in fails(capsys, "billing", "preview", c, "--account=paris")
    assert "no invoice 'INV-9-000001'" in fails(capsys, "billing", "show", "INV-9-000001", c)
    assert "give record ids, or --all" in fails(capsys, "billing", "quarantine", "release", c)
    assert "--amount" in fails(capsys, "billing", "credit", "INV-0-000001", c, "--reason=x",
                               "--amount=ten")
    assert run(capsys, "billing", "list", c) == ""
    bad = config.read_text().replace('coupon = "welcome10"', 'coupon = "welcome100"')
    config.write_text(bad)
    assert "accounts.berlin.coupons[0].coupon: no coupon 'welcome100'" in fails(
        capsys, "billing", "list", c
    )
