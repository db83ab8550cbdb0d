"""``meterd collector ...`` and ``meterd ledger ...`` commands."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

from collector import config as collector_config
from collector.config import CollectorConfig, load_collector_config
from common import config, logs
from common.cli import EXIT_ERROR, EXIT_OK

DEFAULT_CONFIG = Path("/etc/meterd/collector.toml")


def register(subparsers: Any) -> None:
    collector = subparsers.add_parser("collector", help="run and inspect the collector")
    sub = collector.add_subparsers(metavar="ACTION", required=True)

    run = sub.add_parser("run", help="serve gRPC ingest and the REST API until stopped")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file")
    run.add_argument("--ready-file", type=Path, default=None,
                     help="write {pid, grpc_port, api_port} as JSON here once serving")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=_run)

    check = sub.add_parser("check-config", help="load the configuration and report errors")
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file")
    check.set_defaults(handler=_check_config)

    options = sub.add_parser("config-help", help="list every configuration key with its default")
    options.set_defaults(handler=_config_help)

    ledger = subparsers.add_parser("ledger", help="inspect the ledger")
    lsub = ledger.add_subparsers(metavar="ACTION", required=True)
    verify = lsub.add_parser(
        "verify", help="check hash chains, balanced entries, balances and duplicates on every shard"
    )
    verify.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file")
    verify.set_defaults(handler=_verify)


def _run(args: argparse.Namespace) -> int:
    from collector.daemon import run

    logs.configure(args.log_level)
    return asyncio.run(run(args.config, args.ready_file))


def _check_config(args: argparse.Namespace) -> int:
    from collector.daemon import load_tariff

    cfg = load_collector_config(args.config)
    tariff = load_tariff(cfg.path(cfg.raw.tariff))
    print(f"{args.config}: ok ({len(cfg.terms)} accounts, {len(cfg.assignments)} assignments,"
          f" {len(cfg.raw.ledger.shards) or 'embedded'} ledger shard(s), tariff {tariff!s:.60})")
    return EXIT_OK


def _config_help(args: argparse.Namespace) -> int:
    for key, default, help_text in config.describe(CollectorConfig):
        print(f"{key} = {default}\n    {help_text}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from collector.daemon import open_ledger
    from collector.ledger.verify import verify_ledger

    async def verify() -> int:
        cfg = collector_config.load_collector_config(args.config)
        ledger = await open_ledger(cfg)
        try:
            report = await verify_ledger(list(ledger.stores))
        finally:
            await ledger.close()
        for problem in report.problems:
            print(f"VIOLATION {problem}")
        status = "clean" if report.ok else f"{len(report.problems)} violation(s)"
        print(f"ledger verify: {report.shards} shard(s), {report.accounts} account(s),"
              f" {report.entries} entries: {status}")
        return EXIT_OK if report.ok else EXIT_ERROR

    return asyncio.run(verify())
