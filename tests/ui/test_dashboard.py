"""The dashboard in Debian's Chromium against a real collector with seeded data."""

from __future__ import annotations

import csv
import re
import time
import urllib.error
import urllib.request
from collections import defaultdict
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import Select, WebDriverWait

from collector.api.ui import ASSETS
from tests.ui.conftest import (
    ACME_BALANCE,
    ACME_NET_BYTES,
    Dashboard,
    click,
    month_start,
    open_view,
    screenshot,
    wait_ready,
)

WAIT = 20


def rows(browser: WebDriver, selector: str) -> dict[str, WebElement]:
    return {
        r.get_attribute("data-host") or "": r
        for r in browser.find_elements(By.CSS_SELECTOR, selector)
    }


def grouped(digits: str) -> str:
    return f"{int(digits):,}"


def path_points(d: str) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in re.findall(r"[ML](-?[\d.]+) (-?[\d.]+)", d)]


def no_errors_and_same_origin(browser: WebDriver, dashboard: Dashboard) -> None:
    """No script error in the console, and nothing loaded from another origin."""
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert loaded
    assert all(url.startswith(dashboard.url + "/") for url in loaded), loaded


def requested(browser: WebDriver, dashboard: Dashboard) -> list[str]:
    """The paths and queries of the API requests this page made, in order."""
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    return [url.removeprefix(dashboard.url) for url in loaded if "/v1/" in url]


# --- serving ------------------------------------------------------------------------------


def get(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback)
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_the_dashboard_ships_every_file_it_loads_and_nothing_else(dashboard: Dashboard) -> None:
    status, headers, page = get(f"{dashboard.url}/ui")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    referenced = set(re.findall(r'(?:src|href)="/ui/([^"]+)"', page.decode()))
    for name in ASSETS:
        if name.endswith(".js"):
            status, headers, body = get(f"{dashboard.url}/ui/{name}")
            assert status == 200, name
            assert headers["Content-Type"].startswith("text/javascript")
            referenced |= set(re.findall(r'from "\./([^"]+)"', body.decode()))
    # Every module imported anywhere is served, and no file is listed that nothing loads.
    assert referenced <= set(ASSETS)
    assert set(ASSETS) - {"index.html"} <= referenced
    for name in ("routes.py", "__init__.py", "..%2Froutes.py", "missing.js"):
        status, headers, _ = get(f"{dashboard.url}/ui/{name}")
        assert status == 404, name
        assert headers["Content-Type"].startswith("application/problem+json")


# --- pure modules, run in the browser ------------------------------------------------------


def run_module(browser: WebDriver, dashboard: Dashboard, script: str) -> Any:
    browser.get(f"{dashboard.url}/ui")
    return browser.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Promise.all([import('/ui/decimal.js'), import('/ui/csv.js'), import('/ui/chart.js')])"
        f".then(([d, c, ch]) => done({script}))"
        ".catch(e => done('error: ' + e));"
    )


def test_amounts_are_added_and_shown_exactly(browser: WebDriver, dashboard: Dashboard) -> None:
    got = run_module(browser, dashboard, """[
        d.sum(["0.1", "0.2"]), d.sum(["1000000000000000000.01", "-0.02"]),
        d.group("-1234567.50"), d.money("22.5", "eur"), d.money("1500", "jpy"),
        d.money("0.125", "bhd"), d.money("3.14159", "eur"), d.negate("-0.0125"),
        d.compare("2.50", "2.5"), d.isDecimal("1e3")]""")
    assert got == [
        "0.3", "999999999999999999.99", "-1,234,567.50", "22.50 EUR", "1,500 JPY",
        "0.125 BHD", "3.14159 EUR", "0.0125", 0, False,
    ]


def test_csv_cells_are_quoted_and_formulas_defused(
    browser: WebDriver, dashboard: Dashboard
) -> None:
    got = run_module(browser, dashboard, """[
        c.cell('a,"b"'), c.cell("=HYPERLINK(1)"), c.cell("-12.50"), c.cell("-x"),
        c.cell("@sum"), c.toCsv(["h1", "h2"], [["1", null]])]""")
    assert got == ['"a,""b"""', "'=HYPERLINK(1)", "-12.50", "'-x", "'@sum", "h1,h2\r\n1,\r\n"]


def test_value_axes_get_round_ticks_that_cover_the_data(
    browser: WebDriver, dashboard: Dashboard
) -> None:
    got = run_module(browser, dashboard, """[
        ch.niceTicks(0, 450e9), ch.niceTicks(-3, 7), ch.formatTick(1.5e12)]""")
    assert got == [[0, 100e9, 200e9, 300e9, 400e9, 500e9], [-4, -2, 0, 2, 4, 6, 8], "1.5T"]


# --- signing in ---------------------------------------------------------------------------


def sign_in_form(browser: WebDriver, dashboard: Dashboard) -> WebElement:
    browser.get(f"{dashboard.url}/ui")
    browser.execute_script("sessionStorage.clear()")
    browser.get(f"{dashboard.url}/ui#/fleet")
    browser.refresh()
    return WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "form.sign-in")
    )


def test_sign_in_refuses_a_bad_token_keeps_a_good_one_in_the_tab_and_signs_out(
    browser: WebDriver, dashboard: Dashboard
) -> None:
    form = sign_in_form(browser, dashboard)
    field = form.find_element(By.ID, form.find_element(By.TAG_NAME, "label")
                              .get_attribute("for") or "")
    assert field.get_attribute("type") == "password"
    field.send_keys("mtd_" + "x" * 43, Keys.ENTER)
    alert = WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "form.sign-in [role=alert]")
    )
    assert "not accepted" in alert.text
    assert browser.execute_script("return sessionStorage.getItem('meterd.token')") is None

    field = browser.find_element(By.CSS_SELECTOR, "form.sign-in input[name=token]")
    field.send_keys(dashboard.token, Keys.ENTER)
    WebDriverWait(browser, WAIT).until(
        lambda d: d.execute_script("return document.getElementById('main').dataset.ready")
        == "fleet"
    )
    assert browser.execute_script("return sessionStorage.getItem('meterd.token')") == (
        dashboard.token
    )
    assert browser.execute_script("return localStorage.length") == 0
    # The token was checked with /v1/whoami, and the header names it and its role.
    who = browser.find_element(By.CSS_SELECTOR, "header.top .who")
    assert who.get_attribute("textContent") == "Signed in as dashboard · admin"
    assert who.get_attribute("data-role") == "admin"
    assert "/v1/whoami" in requested(browser, dashboard)

    click(browser, browser.find_element(By.CSS_SELECTOR, "button.sign-out"))
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element(By.CSS_SELECTOR, "form.sign-in"))
    assert browser.execute_script("return sessionStorage.getItem('meterd.token')") is None
    assert not browser.find_element(By.CSS_SELECTOR, "header.top").is_displayed()


def test_a_token_whose_role_may_not_see_the_fleet_is_told_so(
    browser: WebDriver, dashboard: Dashboard
) -> None:
    open_view(browser, dashboard, "/fleet", token=dashboard.viewer_token)
    alert = browser.find_element(By.CSS_SELECTOR, ".view-fleet .notice-error")
    assert "role" in alert.text
    assert "operator" in alert.text
    who = browser.find_element(By.CSS_SELECTOR, "header.top .who")
    assert who.get_attribute("data-role") == "viewer"
    assert who.is_displayed()


# --- fleet --------------------------------------------------------------------------------


def test_fleet_view_marks_silent_and_skewed_agents(
    browser: WebDriver, dashboard: Dashboard, screenshots: Path
) -> None:
    open_view(browser, dashboard, "/fleet")
    agents = rows(browser, "table.fleet-table tbody tr")
    assert set(agents) == {"web-1", "web-2", "web-3", "web-4", "db-1"}
    expected = {"db-1": "silent", "web-2": "skewed", "web-3": "lagging", "web-4": "expiring",
                "web-1": "healthy"}
    for host, status in expected.items():
        row = agents[host]
        assert row.get_attribute("data-status") == status
        badge = row.find_element(By.CSS_SELECTOR, ".badge")
        # Not colour alone: the word and an icon are in the badge.
        assert badge.text == status
        assert badge.find_element(By.CSS_SELECTOR, "svg.icon")
        marked = "attention" in (row.get_attribute("class") or "").split()
        assert marked == (status in ("silent", "skewed")), host
    assert "no batch received" in agents["db-1"].find_element(By.TAG_NAME, "th").text
    assert "+45" in agents["web-2"].text
    assert "25,000 records" in agents["web-3"].text
    # Silent first: the default order puts what needs a person at the top.
    order = [r.get_attribute("data-host") for r in
             browser.find_elements(By.CSS_SELECTOR, "table.fleet-table tbody tr")]
    assert order[0] == "db-1"
    counts = {
        b.get_attribute("data-status"): b.find_element(By.CSS_SELECTOR, ".count").text
        for b in browser.find_elements(By.CSS_SELECTOR, ".summary button[data-status]")
    }
    assert counts == dict.fromkeys(expected.values(), "1")
    assert "Needs attention: 1 silent, 1 skewed" in browser.find_element(
        By.CSS_SELECTOR, ".view-fleet .hint").text
    no_errors_and_same_origin(browser, dashboard)
    screenshot(browser, screenshots, "fleet")

    click(browser, browser.find_element(By.CSS_SELECTOR, ".summary button[data-status=silent]"))
    WebDriverWait(browser, WAIT).until(
        lambda d: set(rows(d, "table.fleet-table tbody tr")) == {"db-1"}
    )
    assert "status=silent" in browser.current_url
    assert browser.find_element(
        By.CSS_SELECTOR, ".summary button[data-status=silent]"
    ).get_attribute("aria-pressed") == "true"


def test_fleet_filters_and_sorts_from_the_keyboard(
    browser: WebDriver, dashboard: Dashboard
) -> None:
    open_view(browser, dashboard, "/fleet")
    # A fresh load (not a move from another view) starts at the top of the page.
    browser.refresh()
    wait_ready(browser, "fleet")
    browser.find_element(By.TAG_NAME, "body").send_keys(Keys.TAB)
    first = browser.switch_to.active_element
    assert first.text == "Skip to content"
    # The focused element is visibly marked.
    assert browser.execute_script(
        "return getComputedStyle(arguments[0]).outlineStyle", first) != "none"
    order = [first.text]
    for _ in range(5):
        browser.switch_to.active_element.send_keys(Keys.TAB)
        order.append(browser.switch_to.active_element.text)
    assert order == ["Skip to content", "meterd", "Fleet", "Account", "Revenue", "Sign out"]

    search = browser.find_element(By.CSS_SELECTOR, ".view-fleet input[name=q]")
    label = browser.find_element(By.CSS_SELECTOR, f"label[for='{search.get_attribute('id')}']")
    assert label.text == "Search"
    search.send_keys("web", Keys.ENTER)
    WebDriverWait(browser, WAIT).until(
        lambda d: set(rows(d, "table.fleet-table tbody tr"))
        == {"web-1", "web-2", "web-3", "web-4"}
    )
    host_sort = "//th/button[starts-with(normalize-space(.), 'Host')]"
    browser.find_element(By.XPATH, host_sort).send_keys(Keys.ENTER)
    WebDriverWait(browser, WAIT).until(
        lambda d: [r.get_attribute("data-host") for r in
                   d.find_elements(By.CSS_SELECTOR, "table.fleet-table tbody tr")]
        == ["web-1", "web-2", "web-3", "web-4"]
    )
    header = browser.find_element(By.XPATH, "//th[button[starts-with(normalize-space(.), 'Host')]]")
    assert header.get_attribute("aria-sort") == "ascending"
    # The sort button was drawn anew with the table; the focus is still on it.
    assert browser.switch_to.active_element.get_attribute("data-key") == "sort-host"
    browser.switch_to.active_element.send_keys(Keys.ENTER)
    WebDriverWait(browser, WAIT).until(
        lambda d: [r.get_attribute("data-host") for r in
                   d.find_elements(By.CSS_SELECTOR, "table.fleet-table tbody tr")]
        == ["web-4", "web-3", "web-2", "web-1"]
    )


# --- account ------------------------------------------------------------------------------


def test_account_view_charts_the_seeded_usage_and_shows_the_balance(
    browser: WebDriver, dashboard: Dashboard, screenshots: Path
) -> None:
    open_view(browser, dashboard, "/account/acme?range=24h&bucket=hour")
    balance = browser.find_element(By.CSS_SELECTOR, ".card.balance[data-currency=eur] .value")
    assert balance.text == f"{ACME_BALANCE} EUR"
    total = browser.find_element(By.CSS_SELECTOR, ".card[data-metric='net.tx_bytes'] .value")
    assert total.text == grouped(ACME_NET_BYTES)

    figure = browser.find_element(
        By.XPATH, "//figure[figcaption[starts-with(., 'net.tx_bytes')]]"
    )
    path = figure.find_element(By.CSS_SELECTOR, "path.series-line")
    points = path_points(path.get_attribute("d") or "")
    # One point per hour of the range: 24 hours back from the start of the current hour,
    # and the current one.
    assert len(points) == 25
    xs = [x for x, _ in points]
    assert xs == sorted(xs)
    # Seeded per hour, from 6 hours back to 1: 200, 300, 200, 450, 100, 250 GB.
    seeded = [y for _, y in points[-7:-1]]
    assert seeded.index(min(seeded)) == 3  # 450 GB is the highest point
    assert seeded[0] == seeded[2]  # 200 GB twice, at the same height
    assert points[-1][1] == points[0][1]  # no usage this hour or 24 hours ago: the baseline
    assert len(figure.find_elements(By.CSS_SELECTOR, "g.markers > *")) == 25
    no_errors_and_same_origin(browser, dashboard)
    screenshot(browser, screenshots, "account")
    click(browser, figure.find_element(By.CSS_SELECTOR, "details.chart-data summary"))
    cells = [c.text for c in figure.find_elements(By.CSS_SELECTOR, "details.chart-data td")]
    assert "450,000,000,000" in cells


def test_an_invoice_opens_with_its_lines_and_late_usage_is_shown(
    browser: WebDriver, dashboard: Dashboard, screenshots: Path
) -> None:
    open_view(browser, dashboard, "/account/acme?range=24h&bucket=hour")
    invoices = browser.find_element(By.CSS_SELECTOR, "table.invoices")
    finalized = invoices.find_element(
        By.XPATH, f".//tr[th[.='{dashboard.invoice_number}']]")
    assert "finalized" in finalized.text
    assert "1.30 EUR" in finalized.text
    click(browser, finalized.find_element(By.CSS_SELECTOR, "a.open-invoice"))
    article = WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.CSS_SELECTOR, "article.invoice"))
    # The opened invoice takes the focus, so a keyboard or screen reader user is there.
    assert browser.switch_to.active_element.text == f"Invoice {dashboard.invoice_number}"
    assert "invoice=" in browser.current_url
    lines = [[c.text for c in r.find_elements(By.CSS_SELECTOR, "th, td")]
             for r in article.find_elements(By.CSS_SELECTOR, "table.invoice-lines tbody tr")]
    assert lines == [["Bandwidth (egress)", "usage", "100 GB", "1.30 EUR"]]
    total = article.find_element(By.CSS_SELECTOR, "table.invoice-totals tr.total td")
    assert total.text == "1.30 EUR"
    screenshot(browser, screenshots, "invoice")

    late = browser.find_elements(By.CSS_SELECTOR, "table.adjustments tbody tr")
    assert len(late) == 1
    cells = [c.text for c in late[0].find_elements(By.CSS_SELECTOR, "th, td")]
    period = month_start(dashboard.hour_us, -2)
    assert cells[1:] == [
        "Bandwidth (egress)",
        f"{period:%Y-%m-%d} – {month_start(dashboard.hour_us, -1) - timedelta(days=1):%Y-%m-%d}",
        "—",
        "0.26 EUR",
    ]
    quarantined = browser.find_elements(By.CSS_SELECTOR, "table.quarantine tbody tr")
    assert [r.get_attribute("data-record") for r in quarantined] == [dashboard.quarantined]
    assert "maximum lateness" in quarantined[0].text
    no_errors_and_same_origin(browser, dashboard)
    # Late adjustments and quarantine come filtered by the API: one request each, and
    # no invoice document is read but the one opened.
    paths = requested(browser, dashboard)
    assert any(p.startswith("/v1/accounts/acme/adjustments?") for p in paths), paths
    assert any(p.startswith("/v1/quarantine?") and "account=acme" in p for p in paths), paths
    assert len([p for p in paths if p.startswith("/v1/invoices/")]) == 1, paths


def test_changing_the_bucket_redraws_the_same_usage(
    browser: WebDriver, dashboard: Dashboard
) -> None:
    open_view(browser, dashboard, "/account/acme?range=7d&bucket=hour")
    bucket = Select(browser.find_element(By.CSS_SELECTOR, ".view-account select[name=bucket]"))
    bucket.select_by_value("day")
    WebDriverWait(browser, WAIT).until(lambda d: "bucket=day" in d.current_url)
    WebDriverWait(browser, WAIT).until(
        lambda d: d.execute_script("return document.getElementById('main').dataset.ready")
        == "account" and d.find_elements(By.CSS_SELECTOR, "figure.chart")
    )
    total = browser.find_element(By.CSS_SELECTOR, ".card[data-metric='net.tx_bytes'] .value")
    assert total.text == grouped(ACME_NET_BYTES)
    figure = browser.find_element(
        By.XPATH, "//figure[figcaption[starts-with(., 'net.tx_bytes')]]"
    )
    assert "per day" in figure.find_element(By.TAG_NAME, "figcaption").text
    days = len(path_points(
        figure.find_element(By.CSS_SELECTOR, "path.series-line").get_attribute("d") or ""))
    assert days == 8  # 7 days back from today, and today


# --- revenue ------------------------------------------------------------------------------


def wait_for_file(directory: Path, pattern: str) -> Path:
    """A finished download: Chrome reserves the final name with an empty file while it
    writes ``*.crdownload``, then moves that onto it."""
    deadline = time.monotonic() + WAIT
    while True:
        found = [p for p in directory.glob(pattern) if p.stat().st_size > 0]
        if found and not list(directory.glob("*.crdownload")):
            return found[0]
        if time.monotonic() > deadline:
            raise AssertionError(f"no download matching {pattern}")
        time.sleep(0.1)


def test_revenue_view_charts_revenue_and_exports_what_it_shows(
    browser: WebDriver, dashboard: Dashboard, screenshots: Path, downloads: Path
) -> None:
    open_view(browser, dashboard, "/revenue?months=3")
    table = browser.find_element(By.CSS_SELECTOR, "table.revenue-table[data-currency=eur]")
    products = {
        c.get_attribute("data-product"): c.text
        for c in table.find_elements(By.CSS_SELECTOR, "tfoot td[data-product]")
    }
    # Posted this month: acme 1500 + 100 + 20 GB and globex 1000 GB at 0.013; acme 240 h
    # and globex 80 h at 0.0125.
    assert products == {"Bandwidth": "34.06", "Compute": "4.00"}
    assert table.find_element(By.CSS_SELECTOR, ".revenue-total").text == "38.06 EUR"
    bars = browser.find_elements(By.CSS_SELECTOR, "figure.chart-bar rect.bar")
    values = sorted(Decimal(b.get_attribute("data-value") or "") for b in bars)
    assert values == [4, Decimal("34.06")]
    trends = browser.find_elements(By.CSS_SELECTOR, "figure.chart-line")
    assert {f.find_element(By.TAG_NAME, "figcaption").text.split()[0] for f in trends} == {
        "cpu.seconds", "net.tx_bytes"}
    no_errors_and_same_origin(browser, dashboard)
    # Revenue is one report computed by the collector, not every account's journal.
    paths = requested(browser, dashboard)
    assert sum(p.startswith("/v1/reports/revenue?") for p in paths) == 1, paths
    assert not [p for p in paths if "/entries" in p], paths
    screenshot(browser, screenshots, "revenue")

    for old in downloads.glob("meterd-*.csv"):
        old.unlink()
    click(browser, browser.find_element(By.XPATH, "//button[.='Export revenue as CSV']"))
    with wait_for_file(downloads, "meterd-revenue-*.csv").open(newline="") as f:
        exported = list(csv.reader(f))
    month = time.strftime("%Y-%m", time.gmtime(dashboard.hour_us / 1e6))
    assert exported == [
        ["month", "product", "currency", "amount"],
        [month, "Bandwidth", "eur", "34.06"],
        [month, "Compute", "eur", "4.00"],
    ]
    click(browser, browser.find_element(By.XPATH, "//button[.='Export usage as CSV']"))
    with wait_for_file(downloads, "meterd-usage-*.csv").open(newline="") as f:
        usage = list(csv.reader(f))
    assert usage[0] == ["bucket_start", "metric", "unit", "account", "quantity"]
    # The seed may straddle a month boundary: add the months up.
    net: dict[tuple[str, str], int] = defaultdict(int)
    for _, metric, _, account, quantity in usage[1:]:
        net[(metric, account)] += int(quantity)
    assert net[("net.tx_bytes", "acme")] == int(ACME_NET_BYTES) + 120 * 10**9
    assert net[("net.tx_bytes", "globex")] == 1000 * 10**9
    assert net[("cpu.seconds", "acme")] == 864_000
    assert net[("cpu.seconds", "globex")] == 288_000


# --- phone --------------------------------------------------------------------------------


@pytest.fixture
def phone(browser: WebDriver) -> Any:
    browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    yield browser
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


@pytest.mark.parametrize("view", ["/fleet", "/account/acme?range=24h&bucket=hour", "/revenue"])
def test_every_view_fits_a_phone_screen(
    phone: WebDriver, dashboard: Dashboard, screenshots: Path, view: str
) -> None:
    open_view(phone, dashboard, view)
    phone.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    width = phone.execute_script("return window.innerWidth")
    assert width == 390
    # Nothing makes the page scroll sideways (wide tables scroll in their own box).
    assert phone.execute_script("return document.documentElement.scrollWidth") <= width
    if view == "/fleet":
        # Each agent is a card whose cells say what they are.
        cell = phone.find_element(By.CSS_SELECTOR, "tr[data-host=db-1] td[data-label='Last seen']")
        assert phone.execute_script(
            "return getComputedStyle(arguments[0], '::before').content", cell
        ) == '"Last seen: "'
        height = phone.execute_script("return document.documentElement.scrollHeight")
        phone.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": 390, "height": int(height), "deviceScaleFactor": 1, "mobile": True})
        phone.save_screenshot(str(screenshots / "fleet-phone.png"))

