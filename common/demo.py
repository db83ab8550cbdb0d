"""``meterd demo``: the whole system on this machine, in a temporary folder.

Creates a CA, a collector certificate and an agent certificate; starts a real
collector (embedded SQLite ledger) and a real agent metering this machine as
separate processes talking gRPC over mutual TLS 1.3 on loopback; lets samples flow;
stops the agent (which takes a final sample and ships it); prints the account's rated
usage and balance from the REST API; stops the collector and removes the folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

from common import pki
from common.cli import EXIT_ERROR, EXIT_OK
from common.errors import MeterdError

# (price id, product, metric, billing unit, base units per billing unit, EUR per unit).
# Demo prices are steep on purpose, so that a few seconds of usage show whole cents.
DEMO_PRICES = (
    ("cpu", "Compute", "cpu.seconds", "second", 1, "0.02"),
    ("memory", "Memory", "mem.used_byte_seconds", "GiB-second", 2**30, "0.005"),
    ("egress", "Bandwidth", "net.tx_bytes", "MB", 10**6, "0.01"),
)


def demo_tariff() -> str:
    blocks = []
    for price_id, product, metric, unit, _, amount in DEMO_PRICES:
        blocks.append(
            f'[[prices]]\nid = "{price_id}"\nproduct = "{product}"\ncurrency = "eur"\n'
            f'metric = "{metric}"\nunit = "{unit}"\nbilling_scheme = "per_unit"\n'
            f'unit_amount_decimal = "{amount}"\nrecurring = {{ interval = "month", '
            f'usage_type = "metered", aggregate_usage = "sum" }}\n'
        )
    return "# Demo price book: metered compute, memory and traffic.\n\n" + "\n".join(blocks)


COLLECTOR_TOML = """\
tariff = "tariff.toml"

[tls]
cert = "pki/servers/localhost.pem"
key = "pki/servers/localhost.key"
ca = "pki/ca.pem"

[ingest]
listen = "127.0.0.1:0"

[api]
listen = "127.0.0.1:0"

[ledger]
sqlite_path = "ledger.db"

[accounts.demo]
currency = "eur"

[[assignments]]
host = "{host}"
account = "demo"
"""

AGENT_TOML = """\
collector = "127.0.0.1:{port}"
server_name = "localhost"
interval_seconds = "{interval}"
spool_path = "spool.db"

[tls]
cert = "pki/agents/{host}.pem"
key = "pki/agents/{host}.key"
ca = "pki/ca.pem"
"""


def register(subparsers: Any) -> None:
    demo = subparsers.add_parser(
        "demo", help="run a collector and an agent on this machine for a few seconds"
    )
    demo.add_argument("--seconds", type=int, default=6, help="how long samples flow (default 6)")
    demo.add_argument("--interval", default="1", help="sampling interval in seconds (default 1)")
    demo.add_argument("--keep", action="store_true", help="keep the temporary folder")
    demo.set_defaults(handler=run_demo)


def _meterd(*args: str) -> list[str]:
    return [sys.executable, "-m", "common.cli", *args]


def _wait_ready(path: Path, proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            ready: dict[str, Any] = json.loads(path.read_text())
            return ready
        if proc.poll() is not None:
            raise MeterdError(f"the collector exited early with status {proc.returncode}")
        time.sleep(0.05)
    raise MeterdError("the collector did not become ready in time")


def _stop(proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def run_demo(args: argparse.Namespace) -> int:
    if args.seconds < 1:
        raise MeterdError("--seconds must be at least 1")
    workdir = Path(tempfile.mkdtemp(prefix="meterd-demo-"))
    host = _host_id()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        pki.init_ca(workdir / "pki")
        pki.issue_server(workdir / "pki", "localhost", ip_addresses=["127.0.0.1"])
        pki.issue_agent(workdir / "pki", host)
        (workdir / "tariff.toml").write_text(demo_tariff())
        (workdir / "collector.toml").write_text(COLLECTOR_TOML.format(host=host))
        with (workdir / "collector.log").open("wb") as log_c:
            collector = subprocess.Popen(
                _meterd("collector", "run", "--config", "collector.toml", "--ready-file",
                        "ready.json"),
                cwd=workdir, stdout=log_c, stderr=log_c,
            )
        procs.append(collector)
        ready = _wait_ready(workdir / "ready.json", collector, 30)
        print(f"meterd demo: collector up (gRPC mTLS :{ready['grpc_port']}, "
              f"REST :{ready['api_port']}), folder {workdir}")
        (workdir / "agent.toml").write_text(
            AGENT_TOML.format(port=ready["grpc_port"], host=host, interval=args.interval)
        )
        with (workdir / "agent.log").open("wb") as log_a:
            agent = subprocess.Popen(
                _meterd("agent", "run", "--config", "agent.toml"), cwd=workdir, stdout=log_a,
                stderr=log_a,
            )
        procs.append(agent)
        print(f"meterd demo: agent for host {host!r} sampling every {args.interval} s "
              f"for {args.seconds} s ...")
        time.sleep(args.seconds)
        if agent.poll() is not None:
            raise MeterdError(f"the agent exited early with status {agent.returncode}; "
                              f"see {workdir / 'agent.log'}")
        if _stop(agent) != 0:
            raise MeterdError(f"the agent stopped with status {agent.returncode}")
        token = subprocess.run(  # the REST API wants a bearer token: a viewer's will do
            _meterd("token", "create", "--config", "collector.toml", "--name", "demo",
                    "--role", "viewer"),
            cwd=workdir, capture_output=True, text=True, check=False,
        )
        if token.returncode != 0:
            raise MeterdError(f"could not make an API token: {token.stderr.strip()}")
        report = _get(f"http://127.0.0.1:{ready['api_port']}/v1/accounts/demo/usage",
                      token.stdout.strip())
        _print_report(report)
        if not report["usage"]:
            raise MeterdError("no usage reached the ledger")
        return EXIT_OK
    except MeterdError as exc:
        print(f"meterd demo: failed: {exc}", file=sys.stderr)
        for name in ("collector.log", "agent.log"):
            log_path = workdir / name
            if log_path.exists():
                tail = log_path.read_text(errors="replace").splitlines()[-5:]
                print(f"--- last lines of {name}:", *tail, sep="\n", file=sys.stderr)
        return EXIT_ERROR
    finally:
        for proc in reversed(procs):
            _stop(proc)
        if args.keep:
            print(f"meterd demo: kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


def _host_id() -> str:
    name = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())
    return (name.strip("-.") or "demo-host")[:63]


def _get(url: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 (http://127.0.0.1)
        url, headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (loopback)
        data: dict[str, Any] = json.load(response)
        return data


def _print_report(report: dict[str, Any]) -> None:
    print(f"\nAccount {report['account']}: rated usage")
    print(f"  {'metric':<24} {'quantity':>24} {'unit':<13} {'records':>7}")
    for u in report["usage"]:
        print(f"  {u['metric']:<24} {u['quantity']:>24} {u['unit']:<13} {u['records']:>7}")
    print("\nBy hand: total per price x unit price, rounded half-even to the cent")
    usage = {u["metric"]: Decimal(u["quantity"]) for u in report["usage"]}
    total = Decimal(0)
    for _, product, metric, unit, per_unit, amount in DEMO_PRICES:
        quantity = usage.get(metric, Decimal(0)) / per_unit
        line = (quantity * Decimal(amount)).quantize(Decimal("0.01"), ROUND_HALF_EVEN)
        total += line
        print(f"  {product:<10} {quantity:>16.6f} {unit:<10} x {amount:>6} EUR = {line:>8} EUR")
    print("\nLedger balances (debit +, credit -)")
    for b in report["ledger_balances"]:
        print(f"  {b['ledger_account']:<24} {b['amount']:>14} {b['currency'].upper()}")
    owed = Decimal(report["balance"].get("eur", "0"))
    print(f"\nBalance owed: {owed:.2f} EUR (by hand: {total:.2f} EUR)")
    if owed != total:
        raise MeterdError(f"the ledger says {owed} but the usage prices to {total}")
