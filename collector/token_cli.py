"""``meterd token create|revoke|list``: REST API tokens, on the collector's host.

The commands open the control shard named by the collector configuration (the first
PostgreSQL shard, or the embedded SQLite file) directly, so they work whether or not
the collector runs; a running collector sees a new or revoked token on its next
request. ``create`` prints the token's secret alone on stdout (shown this once; only
its hash is stored) and what was made on stderr::

    TOKEN=$(meterd token create --config /etc/meterd/collector.toml --name ops --role admin)

Each create and revoke is recorded in the audit log as ``cli:<user>``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import sys
from pathlib import Path
from typing import Any

from collector.api.auth import create_token, describe, revoke_token
from collector.api.registry import Role, Scope
from collector.audit import now_us
from collector.config import LoadedCollectorConfig, load_collector_config
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore
from common.cli import EXIT_OK
from common.records import from_us

DEFAULT_CONFIG = Path("/etc/meterd/collector.toml")


def register(subparsers: Any) -> None:
    token = subparsers.add_parser("token", help="make, revoke and list REST API tokens")
    sub = token.add_subparsers(metavar="ACTION", required=True)

    create = sub.add_parser("create", help="make a token; prints its secret once")
    create.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file")
    create.add_argument("--name", required=True, help="who or what the token is for")
    create.add_argument(
        "--role", choices=[r.label for r in Role], default=None,
        help="viewer < billing < operator < admin (each includes those before it)",
    )
    create.add_argument(
        "--scope", action="append", default=[], choices=[s.value for s in Scope],
        help="an extra permission: ingest (POST /v1/events); repeat for several",
    )
    create.set_defaults(handler=_create)

    revoke = sub.add_parser("revoke", help="revoke a token at once and for good")
    revoke.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file")
    revoke.add_argument("token_id", help="the token's id, as `meterd token list` shows it")
    revoke.set_defaults(handler=_revoke)

    listing = sub.add_parser("list", help="list tokens (never their secrets)")
    listing.add_argument(
        "--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file"
    )
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.set_defaults(handler=_list)


def cli_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"cli:{user}"


async def open_control(cfg: LoadedCollectorConfig) -> LedgerStore:
    """The control shard: the first PostgreSQL shard, or the embedded SQLite file."""
    if cfg.raw.ledger.shards:
        return await PostgresLedger.open(cfg.raw.ledger.shards[0].dsn, name="shard0",
                                         max_size=1)
    return await SqliteLedger.open(cfg.path(cfg.raw.ledger.sqlite_path))


def _create(args: argparse.Namespace) -> int:
    cfg = load_collector_config(args.config)
    role = Role.parse(args.role) if args.role else None

    async def create() -> int:
        store = await open_control(cfg)
        try:
            token, secret = await create_token(
                store, name=args.name, role=role, scopes=tuple(args.scope),
                actor=cli_actor(), now_us=now_us(),
            )
        finally:
            await store.close()
        print(secret)
        print(
            f"created token {token.token_id} {token.name!r} (role {token.role or 'none'},"
            f" scopes {','.join(token.scopes) or 'none'}); its secret above is shown only once",
            file=sys.stderr,
        )
        return EXIT_OK

    return asyncio.run(create())


def _revoke(args: argparse.Namespace) -> int:
    cfg = load_collector_config(args.config)

    async def revoke() -> int:
        store = await open_control(cfg)
        try:
            token = await revoke_token(store, args.token_id, actor=cli_actor(), now_us=now_us())
        finally:
            await store.close()
        assert token.revoked_us is not None
        print(f"revoked token {token.token_id} {token.name!r}"
              f" (since {from_us(token.revoked_us).isoformat()})")
        return EXIT_OK

    return asyncio.run(revoke())


def _list(args: argparse.Namespace) -> int:
    cfg = load_collector_config(args.config)

    async def listing() -> int:
        store = await open_control(cfg)
        try:
            tokens = await store.tokens()
        finally:
            await store.close()
        for t in tokens:
            if args.json:
                print(json.dumps(describe(t), sort_keys=True))
                continue
            state = (f"revoked {from_us(t.revoked_us).isoformat()}" if t.revoked_us is not None
                     else "active")
            print(f"{t.token_id}  {t.name:<20}  role={t.role or '-':<8}"
                  f"  scopes={','.join(t.scopes) or '-':<7}"
                  f"  created {from_us(t.created_us).isoformat()} by {t.created_by}  {state}")
        return EXIT_OK

    return asyncio.run(listing())
