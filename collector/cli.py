"""``meterd collector ...`` and ``meterd ledger ...`` commands."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from collector import config as collector_config
from collector.config import CollectorConfig, load_collector_config
from common import config, logs
from common.cli import EXIT_ERROR, EXIT_OK

if TYPE_CHECKING:
    from collector.sequences import HostSequences

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

    gaps = sub.add_parser(
        "gaps", help="hosts' sequence gaps: usage sampled that never reached the ledger"
    )
    gaps.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="collector TOML file")
    gaps.add_argument("--host", default=None, help="only this host")
    gaps.add_argument("--json", action="store_true", help="print JSON instead of text")
    gaps.set_defaults(handler=_gaps)

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
    # billing: the accounts' plans, add-ons, coupons and taxes against the tariff
    from collector.billing.settings import check_settings
    from collector.rating.document import TariffError

    source = str(args.config)
    problems = [e for b in cfg.billing.values() for e in check_settings(tariff, b, source)]
    if problems:
        raise TariffError(problems)
    print(f"{args.config}: ok ({len(cfg.terms)} accounts, {len(cfg.assignments)} assignments,"
          f" {len(cfg.raw.ledger.shards) or 'embedded'} ledger shard(s), tariff {tariff!s:.60})")
    return EXIT_OK


def _config_help(args: argparse.Namespace) -> int:
    for key, default, help_text in config.describe(CollectorConfig):
        print(f"{key} = {default}\n    {help_text}")
    return EXIT_OK


def _verify(args: argparse.Namespace) -> int:
    from collector.daemon import build_service, open_ledger
    from collector.ledger.verify import verify_ledger

    async def verify() -> int:
        cfg = collector_config.load_collector_config(args.config)
        ledger = await open_ledger(cfg)
        try:
            prices = build_service(cfg, ledger).prices  # the counters are checked with them
            report = await verify_ledger(list(ledger.stores), prices)
        finally:
            await ledger.close()
        for problem in report.problems:
            print(f"VIOLATION {problem}")
        status = "clean" if report.ok else f"{len(report.problems)} violation(s)"
        waiting = (f" (and {report.audit_staged} waiting on their shards: appended at the"
                   " next change there or the collector's start)"
                   if report.audit_staged else "")
        print(f"ledger verify: {report.shards} shard(s), {report.accounts} account(s),"
              f" {report.entries} entries, {report.counters} running counters,"
              f" {report.audit_rows} audit log rows{waiting}: {status}")
        return EXIT_OK if report.ok else EXIT_ERROR

    return asyncio.run(verify())


def _gaps(args: argparse.Namespace) -> int:
    """Exit 0 when no host has a gap, 1 when any has (so monitoring can run it)."""
    from collector.daemon import open_ledger
    from collector.sequences import Sequences

    async def report() -> int:
        cfg = collector_config.load_collector_config(args.config)
        ledger = await open_ledger(cfg)
        try:
            sequences = Sequences(ledger, cfg.raw.ingest.sequence_gap_grace_seconds)
            hosts = await sequences.hosts(args.host)
        finally:
            await ledger.close()
        gaps = [gap for h in hosts for gap in h.gaps]
        if args.json:
            print(json.dumps([_host_json(h) for h in hosts], indent=2))
        else:
            for h in hosts:
                print(f"{h.host_id} epoch {h.epoch or '-'}: seqs accounted for up to"
                      f" {h.watermark} (highest {h.highest}), {h.missing} missing"
                      f" of which {sum(g.count for g in h.gaps)} in gaps")
                for g in h.gaps:
                    print(f"GAP {g.host_id} epoch {g.epoch or '-'} seqs {g.first}-{g.last}"
                          f" ({g.count} missing) open since {_when(g.since_us)},"
                          f" reported {_when(g.detected_us)}")
            print(f"collector gaps: {len(hosts)} host epoch(s), {len(gaps)} gap(s)")
        return EXIT_ERROR if gaps else EXIT_OK

    return asyncio.run(report())


def _when(us: int) -> str:
    from common.records import from_us

    return from_us(us).isoformat(timespec="seconds").replace("+00:00", "Z")


def _host_json(h: HostSequences) -> dict[str, Any]:
    return {
        "host": h.host_id, "epoch": h.epoch, "start": h.start, "watermark": h.watermark,
        "highest": h.highest, "missing": h.missing, "first_seen": _when(h.first_us),
        "updated": _when(h.updated_us),
        "gaps": [
            {"first": g.first, "last": g.last, "missing": g.count,
             "open_since": _when(g.since_us), "reported": _when(g.detected_us)}
            for g in h.gaps
        ],
    }
