"""``meterd pki``: create the CA and issue agent and collector certificates."""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path

from common import pki
from common.cli import EXIT_OK


def _days(text: str) -> int:
    try:
        days = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of days") from None
    if days < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1 day")
    return days


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IP address") from None


def _report(what: str, paths: pki.CertPaths) -> None:
    print(f"{what} certificate: {paths.cert}")
    print(f"{what} private key: {paths.key}")
    print(f"serial: {paths.serial:x}")


def _init(args: argparse.Namespace) -> int:
    _report("CA", pki.init_ca(args.directory, name=args.name, days=args.days))
    return EXIT_OK


def _issue_agent(args: argparse.Namespace) -> int:
    _report("agent", pki.issue_agent(args.directory, args.host_id, days=args.days))
    return EXIT_OK


def _issue_server(args: argparse.Namespace) -> int:
    paths = pki.issue_server(
        args.directory, args.dns_name, days=args.days, ip_addresses=args.ip
    )
    _report("server", paths)
    return EXIT_OK


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``meterd pki`` and its subcommands."""
    parser = subparsers.add_parser(
        "pki",
        help="create the CA and issue agent and collector certificates",
        description="Create the meterd CA and issue certificates for agents and collectors."
        " Private keys are written with mode 0600.",
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    init = commands.add_parser(
        "init",
        help="create a new CA in DIR (ca.pem, ca.key)",
        description="Create a new CA in DIR: ca.pem and ca.key. Refuses to overwrite an"
        " existing CA.",
    )
    init.add_argument("directory", metavar="DIR", type=Path, help="PKI directory")
    init.add_argument("--name", default="meterd CA", help="CA common name (default: %(default)s)")
    init.add_argument(
        "--days", type=_days, default=pki.DEFAULT_CA_DAYS,
        help="validity in days (default: %(default)s)",
    )
    init.set_defaults(handler=_init)

    agent = commands.add_parser(
        "issue-agent",
        help="issue an agent client certificate for HOST_ID",
        description="Issue an agent client certificate whose identity is HOST_ID, signed by"
        " the CA in DIR: DIR/agents/HOST_ID.pem and .key.",
    )
    agent.add_argument("directory", metavar="DIR", type=Path, help="PKI directory with the CA")
    agent.add_argument("host_id", metavar="HOST_ID", help="the host this agent meters")
    agent.add_argument(
        "--days", type=_days, default=pki.DEFAULT_LEAF_DAYS,
        help="validity in days (default: %(default)s)",
    )
    agent.set_defaults(handler=_issue_agent)

    server = commands.add_parser(
        "issue-server",
        help="issue a collector server certificate for DNS_NAME",
        description="Issue a collector server certificate for DNS_NAME (a DNS name or an IP"
        " address), signed by the CA in DIR: DIR/servers/DNS_NAME.pem and .key.",
    )
    server.add_argument("directory", metavar="DIR", type=Path, help="PKI directory with the CA")
    server.add_argument("dns_name", metavar="DNS_NAME", help="name clients connect to")
    server.add_argument(
        "--ip", type=_ip, action="append", default=[], metavar="IP",
        help="also valid for this IP address (repeatable)",
    )
    server.add_argument(
        "--days", type=_days, default=pki.DEFAULT_LEAF_DAYS,
        help="validity in days (default: %(default)s)",
    )
    server.set_defaults(handler=_issue_server)
