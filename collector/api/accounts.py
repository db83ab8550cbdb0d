"""Accounts, their billing settings, balances and usage totals.

Accounts and their billing settings are configured in the collector's TOML file
(``[accounts.<id>]``) and reloaded with SIGHUP; the API reads them as they are in
force and does not change them. ``settings`` is every key of the account's table,
with decimals as strings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import msgspec
from aiohttp import web

from collector import audit
from collector.api.keys import CONFIG, SERVICE
from collector.api.pagination import PageQuery, decode_cursor, encode_cursor
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Role, Routes, query_of, respond
from collector.api.schemas import DecimalText, dec
from collector.config import AccountConfig
from collector.ledger.journal import RECEIVABLE
from collector.ledger.store import LedgerStore

routes = Routes(tag="accounts")

ACCOUNT = {"account": "account id, as in `[accounts.<id>]` of the collector configuration"}


class Account(msgspec.Struct):
    """An account as configured."""

    id: str
    currency: str
    prices: list[str]
    settings: dict[str, Any]


class AccountPage(msgspec.Struct):
    items: list[Account]
    next_cursor: str | None


class Balance(msgspec.Struct):
    ledger_account: str
    currency: str
    amount: DecimalText


class Balances(msgspec.Struct):
    """Ledger balances of an account; ``receivable`` is what it owes, per currency."""

    account: str
    receivable: dict[str, DecimalText]
    balances: list[Balance]


class UsageTotal(msgspec.Struct):
    metric: str
    unit: str
    quantity: DecimalText
    records: int


class AccountUsage(msgspec.Struct):
    """All usage posted to an account, per metric, with its balances. For usage per
    time bucket, host or metric use ``GET /v1/usage``."""

    account: str
    usage: list[UsageTotal]
    balance: dict[str, DecimalText]
    ledger_balances: list[Balance]


def account_of(account_id: str, cfg: AccountConfig) -> Account:
    settings = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    return Account(
        id=account_id,
        currency=cfg.currency.lower(),
        prices=list(cfg.prices),
        settings=audit.plain(settings, f"accounts.{account_id}"),
    )


async def known_account(request: web.Request, account_id: str) -> LedgerStore:
    """The account's shard; ``account-not-found`` unless it is configured or has ledger
    history (an account removed from the configuration keeps its past)."""
    store = request.app[SERVICE]().ledger.for_account(account_id)
    if account_id in request.app[CONFIG]().raw.accounts:
        return store
    if await store.balances(account_id):
        return store
    raise ApiProblem(ProblemType.ACCOUNT_NOT_FOUND, f"account {account_id!r}")


def balances_of(balances: dict[tuple[str, str], Any]) -> list[Balance]:
    return [Balance(a, c, dec(v)) for (a, c), v in sorted(balances.items())]


@routes.get(
    "/v1/accounts",
    Role.VIEWER,
    summary="Accounts and their billing settings",
    description="From the collector configuration, in id order.",
    query=PageQuery,
    response=AccountPage,
)
async def list_accounts(request: web.Request) -> web.StreamResponse:
    q = query_of(request, PageQuery)
    after = decode_cursor("accounts", q.cursor)
    if after is not None and not isinstance(after, str):
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
    accounts = request.app[CONFIG]().raw.accounts
    ids = sorted(a for a in accounts if after is None or a > after)
    page = ids[: q.limit]
    more = len(ids) > q.limit
    return respond(
        AccountPage(
            items=[account_of(a, accounts[a]) for a in page],
            next_cursor=encode_cursor("accounts", page[-1]) if more else None,
        )
    )


@routes.get(
    "/v1/accounts/{account}",
    Role.VIEWER,
    summary="An account and its billing settings",
    path_params=ACCOUNT,
    response=Account,
)
async def get_account(request: web.Request) -> web.StreamResponse:
    account_id = request.match_info["account"]
    cfg = request.app[CONFIG]().raw.accounts.get(account_id)
    if cfg is None:
        raise ApiProblem(ProblemType.ACCOUNT_NOT_FOUND, f"account {account_id!r}")
    return respond(account_of(account_id, cfg))


@routes.get(
    "/v1/accounts/{account}/balances",
    Role.VIEWER,
    summary="An account's ledger balances",
    path_params=ACCOUNT,
    response=Balances,
)
async def account_balances(request: web.Request) -> web.StreamResponse:
    account_id = request.match_info["account"]
    store = await known_account(request, account_id)
    balances = await store.balances(account_id)
    return respond(
        Balances(
            account=account_id,
            receivable={c: dec(v) for (a, c), v in sorted(balances.items()) if a == RECEIVABLE},
            balances=balances_of(balances),
        )
    )


@routes.get(
    "/v1/accounts/{account}/usage",
    Role.VIEWER,
    summary="An account's rated usage per metric, and its balances",
    path_params=ACCOUNT,
    response=AccountUsage,
)
async def account_usage(request: web.Request) -> web.StreamResponse:
    account_id = request.match_info["account"]
    store = request.app[SERVICE]().ledger.for_account(account_id)
    usage = await store.usage(account_id)
    balances = await store.balances(account_id)
    if not usage and not balances and account_id not in request.app[CONFIG]().raw.accounts:
        raise ApiProblem(ProblemType.ACCOUNT_NOT_FOUND, f"account {account_id!r}")
    return respond(
        AccountUsage(
            account=account_id,
            usage=[UsageTotal(u.metric, u.unit, dec(u.quantity), u.records) for u in usage],
            balance={c: dec(v) for (a, c), v in sorted(balances.items()) if a == RECEIVABLE},
            ledger_balances=balances_of(balances),
        )
    )
