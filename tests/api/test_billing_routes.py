"""A billing month through the API: preview, close, review, finalize, credit, export;
quarantined records listed and released once."""

from __future__ import annotations

from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import pytest

from tests.api.env import ApiEnv, api_env, client, seed_billing
from tests.api.test_resources import get, walk


@pytest.fixture
async def env(tmp_path: Path, pki_dir: Path) -> AsyncIterator[ApiEnv]:
    async with api_env(tmp_path, pki_dir) as e:
        yield e


async def test_a_month_from_preview_to_credit_note(env: ApiEnv) -> None:
    async with client(env) as c:
        billing = env.auth("billing")
        preview = await get(c, env, "/v1/accounts/acme/invoice-preview?at=2026-11-15T00:00:00Z")
        assert (preview["status"], preview["number"], preview["invoice_id"]) == (
            "draft", None, None)
        assert preview["period_start"] == "2026-11-01T00:00:00Z"
        assert preview["total"] == preview["document"]["total"]
        closed = await c.post("/v1/billing/close", json={}, headers=billing)
        assert closed.status == 200, await closed.text()
        drafts = (await closed.json())["items"]
        assert {(d["account"], d["status"]) for d in drafts} >= {("acme", "draft")}
        listed, _ = await walk(c, env, "/v1/invoices?status=draft&limit=1")
        assert {i["invoice_id"] for i in listed} == {d["invoice_id"] for d in drafts}

        at = {"at": "2026-11-15T00:00:00Z"}
        first = await c.post("/v1/accounts/acme/invoices/finalize", json=at, headers=billing)
        assert first.status == 201, await first.text()
        done = await first.json()
        invoice = done["invoice"]
        assert (done["created"], invoice["status"]) == (True, "finalized")
        assert done["draft_total"] == invoice["total"] == preview["total"]
        number = invoice["number"]
        again = await c.post("/v1/accounts/acme/invoices/finalize", json=at, headers=billing)
        assert again.status == 200
        assert (await again.json())["invoice"]["number"] == number
        december = await c.post("/v1/accounts/acme/invoices/finalize",
                                json={"at": "2026-12-15T00:00:00Z"}, headers=billing)
        assert december.status == 409
        assert (await december.json())["type"].endswith("/conflict")

        by_number = await get(c, env, f"/v1/invoices/{number}")
        assert by_number == await get(c, env, f"/v1/invoices/{invoice['invoice_id']}")
        html = await c.get(f"/v1/invoices/{number}/html", headers=env.auth("viewer"))
        assert html.content_type == "text/html"
        assert number in await html.text()

        credited = await c.post(f"/v1/invoices/{number}/credit-notes",
                                json={"reason": "outage on the 3rd", "amount": "0.01"},
                                headers=billing)
        assert credited.status == 201, await credited.text()
        note = await credited.json()
        assert Decimal(note["total"]) > 0
        assert (await get(c, env, "/v1/credit-notes?account=acme"))["items"] == [note]
        too_much = await c.post(f"/v1/invoices/{number}/credit-notes",
                                json={"reason": "again", "amount": "1000"}, headers=billing)
        assert too_much.status == 409

        csv = await c.get("/v1/exports/invoices.csv", headers=billing)
        assert csv.content_type == "text/csv"
        text = await csv.text()
        assert number in text
        assert note["number"] in text

        audit, _ = await walk(c, env, "/v1/audit", "admin")
        mine = [(r["action"], r["target"]) for r in audit
                if r["actor"] == f"token:billing/{env.token_ids['billing']}"]
        # One row per draft the close stored, committed with it; then the invoice's.
        closes = sorted(target for action, target in mine if action == "invoice.close")
        assert closes == sorted(f"invoice/{d['invoice_id']}" for d in drafts)
        assert mine[len(closes):] == [("invoice.finalize", f"invoice/{number}"),
                                      ("invoice.credit", f"invoice/{number}")]


async def test_unknown_invoice_and_account(env: ApiEnv) -> None:
    async with client(env) as c:
        missing = await c.get("/v1/invoices/INV-9-999999", headers=env.auth("viewer"))
        assert missing.status == 404
        assert (await missing.json())["type"].endswith("/not-found")
        nobody = await c.post("/v1/accounts/initech/invoices/finalize",
                              json={"at": "2026-11-15T00:00:00Z"}, headers=env.auth("billing"))
        assert nobody.status == 404
        assert (await nobody.json())["type"].endswith("/account-not-found")


async def test_quarantine_listed_and_released_once(env: ApiEnv) -> None:
    seeded = await seed_billing(env)
    async with client(env) as c:
        waiting = (await get(c, env, "/v1/quarantine"))["items"]
        assert [(q["record_id"], q["reason"], q["quantity"]) for q in waiting] == [
            (seeded.quarantined, "older than 90 days", "42")]
        operator = env.auth("operator")
        release = {"record_ids": [seeded.quarantined]}
        assert (await c.post("/v1/quarantine/release", json=release,
                             headers=env.auth("billing"))).status == 403
        released = await c.post("/v1/quarantine/release", json=release, headers=operator)
        assert released.status == 200, await released.text()
        assert await released.json() == {"records": [seeded.quarantined], "accepted": 1,
                                         "duplicate": 0, "held": 0}
        again = await c.post("/v1/quarantine/release", json=release, headers=operator)
        assert again.status == 404
        assert (await get(c, env, "/v1/quarantine"))["items"] == []
        done = (await get(c, env, "/v1/quarantine?released=true"))["items"]
        assert done[0]["released_by"] == f"token:operator/{env.token_ids['operator']}"
