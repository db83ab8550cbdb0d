"""The collector's REST API (aiohttp): rated usage, balances and agent health as JSON.

Errors are ``application/problem+json`` (RFC 9457). Amounts and quantities are decimal
strings, never JSON numbers, so no client parses money into a float by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

from collector.fleet import Fleet
from collector.ledger.journal import RECEIVABLE
from collector.ledger.service import LedgerService
from common.errors import StoreUnavailable
from common.money import canonical_text
from common.records import from_us

SERVICE: web.AppKey[Callable[[], LedgerService]] = web.AppKey("service")
FLEET = web.AppKey("fleet", Fleet)
KNOWN_ACCOUNTS: web.AppKey[Callable[[], set[str]]] = web.AppKey("known_accounts")


def problem(status: int, kind: str, title: str, detail: str = "") -> web.Response:
    body: dict[str, Any] = {"type": f"https://meterd.dev/problems/{kind}", "title": title,
                            "status": status}
    if detail:
        body["detail"] = detail
    return web.json_response(body, status=status, content_type="application/problem+json")


async def account_usage(request: web.Request) -> web.Response:
    account = request.match_info["account"]
    service = request.app[SERVICE]()
    store = service.ledger.for_account(account)
    try:
        usage = await store.usage(account)
        balances = await store.balances(account)
    except StoreUnavailable as exc:
        return problem(503, "ledger-unavailable", "The ledger is unavailable", str(exc))
    if not usage and not balances and account not in request.app[KNOWN_ACCOUNTS]():
        return problem(404, "account-not-found", "No such account", f"account {account!r}")
    receivable = {c: canonical_text(v) for (a, c), v in balances.items() if a == RECEIVABLE}
    return web.json_response(
        {
            "account": account,
            "usage": [
                {"metric": u.metric, "unit": u.unit, "quantity": canonical_text(u.quantity),
                 "records": u.records}
                for u in usage
            ],
            "balance": receivable,
            "ledger_balances": [
                {"ledger_account": a, "currency": c, "amount": canonical_text(v)}
                for (a, c), v in sorted(balances.items())
            ],
        }
    )


async def hosts(request: web.Request) -> web.Response:
    fleet = request.app[FLEET]
    return web.json_response(
        {
            "hosts": [
                {
                    "host_id": a.host_id,
                    "last_seen": from_us(a.last_seen_us).isoformat(),
                    "version": a.version,
                    "backlog_records": a.backlog_records,
                    "clock_skew_ms": a.clock_skew_us // 1000,
                    "records_accepted": a.records_accepted,
                    "records_rejected": a.records_rejected,
                }
                for a in sorted(fleet.agents.values(), key=lambda a: a.host_id)
            ]
        }
    )


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


@web.middleware
async def problems(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return problem(exc.status, exc.reason.lower().replace(" ", "-"), exc.reason)


def build_app(
    service: Callable[[], LedgerService], fleet: Fleet, known_accounts: Callable[[], set[str]]
) -> web.Application:
    app = web.Application(middlewares=[problems], client_max_size=1024**2)
    app[SERVICE] = service
    app[FLEET] = fleet
    app[KNOWN_ACCOUNTS] = known_accounts
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/accounts/{account}/usage", account_usage)
    app.router.add_get("/v1/hosts", hosts)
    return app
