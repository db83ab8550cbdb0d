"""``meterd agent ...`` commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, load_agent_config
from common import config
from common.cli import EXIT_ERROR, EXIT_OK
from common.records import from_us

DEFAULT_CONFIG = Path("/etc/meterd/agent.toml")


def register(subparsers: Any) -> None:
    agent = subparsers.add_parser("agent", help="run and inspect the metering agent")
    sub = agent.add_subparsers(metavar="ACTION", required=True)

    run = sub.add_parser("run", help="sample, spool and ship until stopped")
    run.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent TOML file")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.set_defaults(handler=_run)

    status = sub.add_parser("status", help="backlog, last shipment, errors, dead letters")
    status.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent TOML file")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(handler=_status)

    requeue = sub.add_parser("requeue", help="put dead-lettered records back in the queue")
    requeue.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent TOML file")
    requeue.add_argument("ids", nargs="*", help="record ids (default: all dead letters)")
    requeue.set_defaults(handler=_requeue)

    options = sub.add_parser("config-help", help="list every configuration key with its default")
    options.set_defaults(handler=lambda args: _config_help())

    check = sub.add_parser(
        "check", help="check configuration, certificates, spool and collector before starting"
    )
    check.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="agent TOML file")
    check.add_argument("--timeout", type=_seconds, default=5.0,
                       help="seconds to wait for the collector (default: %(default)s)")
    check.set_defaults(handler=_check)


def _run(args: argparse.Namespace) -> int:
    """Check, then become the agent process (:mod:`agent.__main__`) by ``exec``."""
    from agent.__main__ import exec_argv, exec_environment
    from agent.identity import check_identity
    from common.cli import meterd_version

    cfg = load_agent_config(args.config)
    host_id = check_identity(cfg)
    argv = exec_argv(args.config, host_id, meterd_version(), args.log_level)
    sys.stdout.flush()
    sys.stderr.flush()
    # Our own interpreter; returns only by raising OSError.
    os.execve(argv[0], argv, exec_environment(os.environ))  # noqa: S606


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0 and 3600, got {text!r}")
    return value


def _check(args: argparse.Namespace) -> int:
    from agent.check import run_checks

    findings = run_checks(args.config, timeout=args.timeout)
    for finding in findings:
        print(finding.line())
    return EXIT_OK if all(f.ok for f in findings) else EXIT_ERROR


def _config_help() -> int:
    for key, default, help_text in config.describe(AgentConfig):
        print(f"{key} = {default}\n    {help_text}")
    return EXIT_OK


def status_report(config_path: Path) -> dict[str, Any]:
    from agent.spool import Spool
    from common.pki import certificate_not_after, host_id_from_certificate

    cfg = load_agent_config(config_path)
    cert_path = cfg.path(cfg.raw.tls.cert)
    report: dict[str, Any] = {"config": str(config_path)}
    try:
        pem = cert_path.read_bytes()
        report["host_id"] = host_id_from_certificate(pem)
        report["certificate_expires"] = certificate_not_after(pem).isoformat()
    except OSError as exc:
        report["certificate_error"] = f"{cert_path}: {exc.strerror}"
    spool_path = cfg.path(cfg.raw.spool_path)
    if not spool_path.exists():
        report["spool"] = "not created yet (the agent has not run)"
        return report
    spool = Spool(spool_path, max_bytes=cfg.raw.spool_max_bytes)
    try:
        stats = spool.stats()
        now_us = time.time_ns() // 1000
        last_ship = spool.get_meta("last_ship_at_us")
        skew = spool.get_meta("clock_skew_us")
        report.update(
            backlog_records=stats.records,
            backlog_bytes=stats.bytes,
            spool_max_bytes=stats.max_bytes,
            oldest_backlog_age_s=(now_us - stats.oldest_start_us) // 1_000_000
            if stats.oldest_start_us is not None else None,
            dead_letters=stats.dead_letters,
            last_ship_at=from_us(int(last_ship)).isoformat() if last_ship else None,
            last_error=spool.get_meta("last_error") or None,
            clock_skew_ms=int(skew) // 1000 if skew else None,
        )
    finally:
        spool.close()
    return report


def _status(args: argparse.Namespace) -> int:
    report = status_report(args.config)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        width = max(len(k) for k in report)
        for key, value in report.items():
            print(f"{key:<{width}}  {'-' if value is None else value}")
    return EXIT_OK


def _requeue(args: argparse.Namespace) -> int:
    from agent.spool import Spool

    cfg = load_agent_config(args.config)
    spool = Spool(cfg.path(cfg.raw.spool_path), max_bytes=cfg.raw.spool_max_bytes)
    try:
        count = spool.requeue_dead_letters(args.ids or None)
    finally:
        spool.close()
    print(f"requeued {count} record(s)")
    return EXIT_OK
