"""The dashboard's browser tests: Debian's Chromium, headless, driven by Selenium through
the system's chromedriver, against a real collector process seeded over mTLS.

Nothing is downloaded: the browser and driver are the ``chromium`` and
``chromium-driver`` packages (``.ci/run`` installs them when missing), and Selenium is
given both paths, so Selenium Manager never runs. Without them the tests are skipped,
except under CI (``CI=true``), where that fails the run.

Screenshots of each view go to ``$METERD_UI_ARTIFACTS`` when it is set (the README's
pictures: ``METERD_UI_ARTIFACTS=docs/screenshots .venv/bin/pytest tests/ui``), and to
a pytest temporary directory otherwise (its path is printed with ``-s``).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from common import pki
from common.ids import new_id
from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import UsageRecord
from common.tls import grpc_channel_credentials
from common.wire import to_proto
from tests.harness import CollectorProcess, collector_config, meterd

IN_CI = os.environ.get("CI", "").lower() == "true"
HOUR_US = 3_600_000_000
GB = 10**9
SILENT_AFTER_SECONDS = 4
SKEW_SECONDS = 45
DESKTOP = (1280, 900)

# Hosts, their accounts, and what each one's agent reports.
ASSIGNMENTS = {
    "web-1": "acme",  # healthy
    "web-2": "acme",  # clock 45 s behind: skewed
    "web-3": "globex",  # 25 000 records waiting in its spool: lagging
    "web-4": "globex",  # certificate valid for 5 more days: expiring
    "db-1": "globex",  # ships once, then stops: silent
}
SHORT_LIVED = {"web-4": 5}

# Seeded usage: (host, metric, hours before the current hour, quantity in base units).
USAGE = [
    ("web-1", "net.tx_bytes", 6, 150 * GB),
    ("web-1", "net.tx_bytes", 5, 300 * GB),
    ("web-1", "net.tx_bytes", 4, 200 * GB),
    ("web-1", "net.tx_bytes", 3, 450 * GB),
    ("web-1", "net.tx_bytes", 2, 100 * GB),
    ("web-1", "net.tx_bytes", 1, 250 * GB),
    ("web-2", "net.tx_bytes", 6, 50 * GB),
    *[("web-1", "cpu.seconds", h, 144_000) for h in range(1, 7)],
    ("web-3", "net.tx_bytes", 2, 1000 * GB),
    ("db-1", "cpu.seconds", 1, 288_000),
]
# Every amount is a whole number of cents at 0.013 EUR/GB and 0.0125 EUR/hour, so the
# balances are the same however the records fall into billing periods.
ACME_NET_BYTES = "1500000000000"  # 1500 GB
# Two months back: 100 GB invoiced, then 20 GB more arriving after the invoice.
BILLED_BYTES = 100 * GB
LATE_BYTES = 20 * GB
# This month: 1500 GB x 0.013 + 240 h x 0.0125 = 22.50; two months back 100 GB, then 20 GB
# more: 1.30 + 0.26.
ACME_BALANCE = "24.06"
GLOBEX_BALANCE = "14.00"  # 1000 GB x 0.013 + 80 h x 0.0125


def artifacts_dir(factory: pytest.TempPathFactory) -> Path:
    configured = os.environ.get("METERD_UI_ARTIFACTS")
    if configured:
        path = Path(configured)
        path.mkdir(parents=True, exist_ok=True)
        return path
    return factory.mktemp("ui-artifacts")


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = artifacts_dir(tmp_path_factory)
    print(f"dashboard screenshots: {path}")
    return path


def find_chromium() -> tuple[str, str] | None:
    """Debian's Chromium and its chromedriver, or None."""
    browser = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="session")
def chromium() -> tuple[str, str]:
    found = find_chromium()
    if found is None:
        message = ("Chromium is missing: apt-get install chromium chromium-driver "
                   "(the browser tests never download one)")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return found


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(chromium: tuple[str, str], downloads: Path) -> Iterator[WebDriver]:
    binary, driver_path = chromium
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI containers run as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--disable-extensions",
        "--disable-background-networking",
        "--no-first-run",
        "--lang=en-US",
        "--force-device-scale-factor=1",
        "--window-size=1280,900",
    ):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {
        "download.default_directory": str(downloads),
        "download.prompt_for_download": False,
    })
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def channel(pki_dir: Path, host: str, target: str) -> grpc.Channel:
    creds = grpc_channel_credentials(
        pki_dir / "agents" / f"{host}.pem", pki_dir / "agents" / f"{host}.key",
        pki_dir / "ca.pem",
    )
    return grpc.secure_channel(target, creds)


@dataclass
class Dashboard:
    """A running collector with seeded usage and agents, and tokens to sign in with."""

    collector: CollectorProcess
    token: str
    viewer_token: str
    hour_us: int  # start of the hour the seed was made in
    stop: threading.Event = field(default_factory=threading.Event)
    invoice_number: str = ""  # acme's finalized invoice
    quarantined: str = ""  # the id of acme's quarantined record

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.collector.api_port}"

    def api(self, path: str, body: Any = None) -> Any:
        """GET ``path``, or POST ``body`` as JSON to it, with the admin token."""
        request = urllib.request.Request(  # noqa: S310 (http on loopback)
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 (loopback)
            return json.load(r)


def push(stub: Any, host: str, records: list[UsageRecord], **fields: Any) -> pb.PushResponse:
    request = pb.PushRequest(records=[to_proto(r) for r in records], agent_version="1.4.2",
                             **fields)
    return stub.Push(request, timeout=10)


def sent_at(host: str) -> int:
    """The agent's wall clock: web-2's runs behind."""
    skew = SKEW_SECONDS * 1_000_000 if host == "web-2" else 0
    return time.time_ns() // 1000 - skew


def report(host: str) -> dict[str, Any]:
    return {
        "sent_at_us": sent_at(host),
        "backlog_records": 25_000 if host == "web-3" else 3,
        "dead_letters": 0,
    }


def keep_shipping(stubs: dict[str, Any], stop: threading.Event) -> None:
    """What running agents do: call in again and again (every host but db-1)."""
    while not stop.wait(0.5):
        for host, stub in stubs.items():
            try:
                push(stub, host, [], **report(host))
            except grpc.RpcError:
                if stop.is_set():
                    return


def wait_for(predicate: Any, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def month_start(at_us: int, months: int) -> datetime:
    """The first instant of the UTC calendar month ``months`` from the one holding at_us."""
    at = datetime.fromtimestamp(at_us / 1e6, UTC)
    index = at.year * 12 + at.month - 1 + months
    return datetime(index // 12, index % 12 + 1, 1, tzinfo=UTC)


def usage(host: str, metric: str, at: datetime, quantity: int, seq: int) -> UsageRecord:
    start = int(at.timestamp()) * 1_000_000
    return UsageRecord(
        id=new_id(), host_id=host, metric=metric, quantity=Decimal(quantity),
        unit="bytes" if metric == "net.tx_bytes" else "seconds",
        start_us=start, end_us=start + 10_000_000, seq=seq,
    )


def bill_an_earlier_period(env: Dashboard, stub: Any) -> None:
    """acme: usage two months back, its invoice finalized, then late usage of that month
    (an adjustment on the current invoice), and a record too old to post (quarantined)."""
    period = month_start(env.hour_us, -2)
    period_end = month_start(env.hour_us, -1)
    on_time = usage("web-1", "net.tx_bytes", period_end - timedelta(days=2), BILLED_BYTES, 100)
    assert push(stub, "web-1", [on_time]).acks[0].outcome == pb.ACCEPTED
    done = env.api("/v1/accounts/acme/invoices/finalize",
                   {"at": (period + timedelta(days=1)).isoformat()})
    env.invoice_number = done["invoice"]["number"]
    late = usage("web-1", "net.tx_bytes", period_end - timedelta(days=1), LATE_BYTES, 101)
    too_old = usage("web-1", "cpu.seconds",
                    datetime.fromtimestamp(env.hour_us / 1e6, UTC) - timedelta(days=100),
                    7200, 102)
    answer = push(stub, "web-1", [late, too_old])
    assert [a.outcome for a in answer.acks] == [pb.ACCEPTED, pb.ACCEPTED], answer
    env.quarantined = too_old.id


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    work = tmp_path_factory.mktemp("dashboard")
    pki_dir = work / "pki"
    pki.init_ca(pki_dir)
    pki.issue_server(pki_dir, "localhost", ip_addresses=["127.0.0.1"])
    for host in ASSIGNMENTS:
        days = {"days": SHORT_LIVED[host]} if host in SHORT_LIVED else {}
        pki.issue_agent(pki_dir, host, **days)
    assignments = "\n".join(
        f'[[assignments]]\nhost = "{h}"\naccount = "{a}"\n' for h, a in ASSIGNMENTS.items()
    )
    config = collector_config(
        work, pki_dir, assignments=assignments,
        extra=f'[fleet]\nsilent_after_seconds = "{SILENT_AFTER_SECONDS}"\n'
        'persist_interval_seconds = "0.5"\n',
    )
    collector = CollectorProcess(config).start()
    channels = {host: channel(pki_dir, host, collector.target) for host in ASSIGNMENTS}
    stop = threading.Event()
    shipper: threading.Thread | None = None
    try:
        stubs = {host: pb_grpc.IngestStub(ch) for host, ch in channels.items()}
        hour_us = time.time_ns() // 1000 // HOUR_US * HOUR_US
        # db-1 first: the seconds the rest of the seeding takes count towards its silence.
        for host in ("db-1", *(h for h in ASSIGNMENTS if h != "db-1")):
            records = [
                UsageRecord(
                    id=new_id(), host_id=host, metric=metric, quantity=Decimal(quantity),
                    unit="bytes" if metric == "net.tx_bytes" else "seconds",
                    start_us=hour_us - hours * HOUR_US + 60_000_000,
                    end_us=hour_us - hours * HOUR_US + 70_000_000,
                    seq=seq,
                )
                for seq, (h, metric, hours, quantity) in enumerate(USAGE)
                if h == host
            ]
            answer = push(stubs[host], host, records, **report(host))
            assert {a.outcome for a in answer.acks} <= {pb.ACCEPTED}, answer
        made = meterd("token", "create", "--config", str(config), "--name", "dashboard",
                      "--role", "admin")
        assert made.returncode == 0, made.stderr
        viewer = meterd("token", "create", "--config", str(config), "--name", "viewer",
                        "--role", "viewer")
        assert viewer.returncode == 0, viewer.stderr
        env = Dashboard(collector, made.stdout.strip(), viewer.stdout.strip(), hour_us, stop)
        bill_an_earlier_period(env, stubs["web-1"])
        shipper = threading.Thread(
            target=keep_shipping,
            args=({h: s for h, s in stubs.items() if h != "db-1"}, stop),
            name="agents",
        )
        shipper.start()

        def db1_silent() -> bool:
            try:
                return bool(env.api("/v1/fleet/agents/db-1")["status"] == "silent")
            except urllib.error.HTTPError:
                return False

        wait_for(db1_silent, "db-1 to be reported silent")
        yield env
    finally:
        stop.set()
        if shipper is not None:
            shipper.join()
        for ch in channels.values():
            ch.close()
        collector.stop()


# --- page helpers -----------------------------------------------------------------------


def open_view(browser: WebDriver, dashboard: Dashboard, fragment: str, token: str = "") -> None:
    """Load the dashboard at ``#fragment``, signed in with ``token`` (default: admin), and
    wait until the view has rendered."""
    browser.set_window_size(*DESKTOP)
    # A page of the origin that runs no script, to set the token before the dashboard
    # starts (so it never calls the API with the token of an earlier test).
    browser.get(f"{dashboard.url}/ui/style.css")
    browser.execute_script(
        "sessionStorage.setItem('meterd.token', arguments[0]);", token or dashboard.token
    )
    browser.get_log("browser")  # what earlier pages logged is theirs, not this view's
    browser.get(f"{dashboard.url}/ui#{fragment}")
    wait_ready(browser, fragment.strip("/").split("/")[0].split("?")[0])


def screenshot(browser: WebDriver, directory: Path, name: str) -> Path:
    """The whole page (not only the window) as ``name``.png."""
    width = browser.get_window_size()["width"]
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(width, max(int(height) + 140, 600))
    path = directory / f"{name}.png"
    browser.save_screenshot(str(path))
    return path


def wait_ready(browser: WebDriver, view: str) -> None:
    WebDriverWait(browser, 20).until(
        lambda d: d.execute_script("return document.getElementById('main').dataset.ready")
        == view
    )


def click(browser: WebDriver, element: Any) -> None:
    """Scroll an element to the middle of the window, then click it as a user would."""
    browser.execute_script(
        "arguments[0].scrollIntoView({block: 'center', behavior: 'instant'})", element
    )
    element.click()
