"""The collector's configuration: one TOML file, loaded once into frozen dataclasses.

Every option has a default and a help line here; ``meterd collector config-help``
prints them. Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path

from collector.billing.periods import Cycle
from collector.billing.settings import AccountBilling, CouponRedemption, Subscription
from collector.ledger.sharding import SLOTS, ShardMap, parse_slot_range
from collector.ledger.thresholds import BalanceThresholds
from collector.pricing import AccountTerms
from collector.routing import FOREVER, Assignment
from common import config
from common.errors import ConfigError, MoneyError, ValidationError
from common.money import currency_code
from common.records import to_us


@dataclass(frozen=True)
class TlsConfig:
    cert: Path = config.option(Path("tls/collector.pem"), "server certificate (PEM)")
    key: Path = config.option(Path("tls/collector.key"), "server private key, mode 0600")
    ca: Path = config.option(Path("tls/ca.pem"), "CA that signs agent certificates")
    denied_serials: list[str] = config.option(
        factory=list,
        help="agent certificate serials refused at once, in hex as `openssl x509 -serial`"
        " prints them (a stolen key); reloaded on SIGHUP",
    )


@dataclass(frozen=True)
class IngestConfig:
    listen: str = config.option(
        "0.0.0.0:7443",
        "gRPC listen address (host:port)",
    )
    share_port: bool = config.option(
        False,
        "let other collector processes listen on the same address (SO_REUSEPORT; the"
        " kernel spreads agents' connections): one process per core, all on one ledger."
        " Off, a second collector on a busy address refuses to start",
    )
    max_batch_records: int = config.option(5000, "most records accepted in one call")
    max_in_flight_records: int = config.option(
        100_000, "records being processed at once; past it, RESOURCE_EXHAUSTED"
    )
    retry_after_ms: int = config.option(1000, "retry delay suggested with RESOURCE_EXHAUSTED")
    future_tolerance_seconds: int = config.option(
        300, "how far a record's window end may lie ahead of the collector's clock"
    )
    max_lateness_days: int = config.option(
        90, "records whose window ended longer ago than this are quarantined (billing)"
    )
    # --- sequences (collector.sequences) ---
    sequence_gap_grace_seconds: int = config.option(
        900,
        "a hole in a host's sequence numbers still open after this long is reported as a"
        " gap: usage that never arrived",
    )
    sequence_check_interval_seconds: int = config.option(
        30, "how often hosts' sequence numbers are checked for gaps"
    )
    # --- end sequences ---


@dataclass(frozen=True)
class ApiConfig:
    listen: str = config.option("127.0.0.1:8080", "REST API listen address (host:port)")
    tls: bool = config.option(
        False, "serve the REST API over TLS 1.3 only, with the [tls] certificate and key"
    )


@dataclass(frozen=True)
class ShardConfig:
    dsn: str = config.option(help="PostgreSQL DSN of this shard")
    slots: list[str] = config.option(
        factory=lambda: [f"0-{SLOTS - 1}"], help="slot ranges this shard owns, e.g. [\"0-511\"]"
    )


@dataclass(frozen=True)
class LedgerConfig:
    sqlite_path: Path = config.option(
        Path("ledger.db"), "embedded ledger file, used when no shards are configured"
    )
    shards: list[ShardConfig] = config.option(
        factory=list, help="PostgreSQL shards; empty means the embedded SQLite ledger"
    )
    ingest_transactions: int = config.option(
        4,
        "transactions posting ingested records at once, per shard (at most its pool's 10"
        " connections; SQLite: one). Calls that arrive while all are busy wait and then"
        " share one transaction: its round trips and commit are paid once for them all",
    )
    ingest_group_records: int = config.option(
        4000, "most records in one transaction that several calls share (a larger call goes"
        " alone)",
    )


@dataclass(frozen=True)
class AccountConfig:
    currency: str = config.option("eur", "ISO 4217 currency of the account")
    prices: list[str] = config.option(
        factory=list, help="price ids that rate this account; empty: all in its currency"
    )
    balance_thresholds: list[Decimal] = config.option(
        factory=list,
        help="receivable balances (decimal strings in the account's currency) whose crossing"
        " emits balance.threshold_crossed, e.g. [\"100.00\", \"500.00\"]",
    )
    # --- billing (collector.billing): settings read by account_billing() -------------
    name: str = config.option("", "customer name printed on invoices")
    address: list[str] = config.option(factory=list, help="address lines printed on invoices")
    time_zone: str = config.option("UTC", "IANA time zone billing periods are computed in")
    cycle: str = config.option(
        "monthly", 'billing cycle: "monthly" (from anchor_day), "hourly" or "custom"'
    )
    anchor_day: int = config.option(1, "monthly cycle: day of the month a period starts, 1-28")
    interval: str = config.option(
        "", 'custom cycle: period length, "<n>d" (calendar days) or "<n>h" (hours)'
    )
    anchor: str = config.option("", "custom cycle: an RFC 3339 instant a period starts on")
    tax_jurisdiction: str = config.option(
        "", "the tariff's tax rates with this jurisdiction apply (empty: no tax)"
    )
    tax_id: str = config.option("", "the customer's tax id, printed on invoices")
    plans: list[PlanConfig] = config.option(
        factory=list, help="plans the account holds: [[accounts.<id>.plans]]"
    )
    addons: list[AddonConfig] = config.option(
        factory=list, help="licensed or one-time prices held on their own"
    )
    coupons: list[CouponConfig] = config.option(
        factory=list, help="coupons redeemed, applied in this order"
    )
    # --- end billing ------------------------------------------------------------------


@dataclass(frozen=True)
class AssignmentConfig:
    host: str = config.option(help="host id (the CN of the agent's certificate)")
    account: str = config.option(help="account billed for the host's usage")
    cgroup: str = config.option("", "bill only records labelled with this cgroup")
    since: str = config.option("", "RFC 3339 instant the assignment starts (empty: always)")
    until: str = config.option("", "RFC 3339 instant it ends, exclusive (empty: open)")


# --- fleet health and /metrics (collector.fleet, collector.metrics) -------------------


@dataclass(frozen=True)
class FleetConfig:
    silent_after_seconds: Decimal = config.option(
        Decimal(300), "no batch from an agent for this long: silent (one agent.silent event)"
    )
    lagging_backlog_records: int = config.option(
        10_000, "an agent reporting at least this many records waiting in its spool: lagging"
    )
    skew_tolerance_seconds: Decimal = config.option(
        Decimal(2), "agent clock off by more than this (either way): skewed"
    )
    expiring_within_days: int = config.option(
        14, "agent certificate expiring within this many days (or expired): expiring"
    )
    persist_interval_seconds: Decimal = config.option(
        Decimal(5), "how often agent facts go to the control shard and silence is checked"
    )


@dataclass(frozen=True)
class MetricsConfig:
    require_token: bool = config.option(
        False, "ask for a bearer token (any role) on /metrics; off: open to scrapers"
    )


def _check_fleet(raw: FleetConfig, source: str) -> None:
    positive = ("silent_after_seconds", "skew_tolerance_seconds", "persist_interval_seconds")
    for name in positive:
        if getattr(raw, name) <= 0:
            raise ConfigError(source, f"fleet.{name}", "must be more than 0")
    for name in ("lagging_backlog_records", "expiring_within_days"):
        if getattr(raw, name) < 1:
            raise ConfigError(source, f"fleet.{name}", "must be at least 1")
    if raw.silent_after_seconds <= 2 * raw.persist_interval_seconds:
        raise ConfigError(
            source, "fleet.silent_after_seconds",
            "must be more than twice fleet.persist_interval_seconds (collectors share what"
            " they saw that often)",
        )


# --- end of fleet health and /metrics -------------------------------------------------


# --- webhooks (collector.webhooks) ----------------------------------------------------


@dataclass(frozen=True)
class WebhooksConfig:
    max_attempts: int = config.option(
        18, "tries per delivery; after the last failed one it moves to the dead letters"
    )
    backoff_base_seconds: Decimal = config.option(
        Decimal(5), "longest wait after the first failed try; doubles each try (full jitter)"
    )
    backoff_cap_seconds: Decimal = config.option(
        Decimal(21600), "longest wait between two tries"
    )
    timeout_seconds: Decimal = config.option(
        Decimal(10), "a receiver must accept a delivery within this (connect, send, answer)"
    )
    poll_interval_seconds: Decimal = config.option(
        Decimal(1), "how often the outboxes are read and due deliveries sent"
    )
    concurrency: int = config.option(
        8, "deliveries in flight at once; each subscription sends one at a time, in order"
    )
    keep_delivered_days: int = config.option(
        30, "delivered deliveries are forgotten after this many days (dead letters are kept)"
    )
    secrets_key_file: Path = config.option(
        Path("tls/webhook-secrets.key"),
        "key that encrypts subscription secrets in the database (mode 0600; created by"
        " `meterd webhook add` when missing; every collector needs the same file)",
    )
    allow_plain_http: bool = config.option(
        False, "accept http:// endpoints other than loopback (https:// is always accepted)"
    )


def _check_webhooks(raw: CollectorConfig, source: str) -> None:
    w = raw.webhooks
    for name in ("max_attempts", "concurrency", "keep_delivered_days"):
        if getattr(w, name) < 1:
            raise ConfigError(source, f"webhooks.{name}", "must be at least 1")
    for name in ("backoff_base_seconds", "backoff_cap_seconds", "timeout_seconds",
                 "poll_interval_seconds"):
        if getattr(w, name) <= 0:
            raise ConfigError(source, f"webhooks.{name}", "must be more than 0")
    if w.backoff_cap_seconds < w.backoff_base_seconds:
        raise ConfigError(source, "webhooks.backoff_cap_seconds",
                          "must be at least webhooks.backoff_base_seconds")
    for account_id, acc in raw.accounts.items():
        amounts = acc.balance_thresholds
        if len(set(amounts)) != len(amounts):
            raise ConfigError(source, f"accounts.{account_id}.balance_thresholds",
                              "each threshold may appear once")


def balance_thresholds(cfg: LoadedCollectorConfig) -> dict[str, BalanceThresholds]:
    """Each account's receivable balance thresholds, in its currency."""
    return {
        account_id: BalanceThresholds.of(cfg.terms[account_id].currency, acc.balance_thresholds)
        for account_id, acc in cfg.raw.accounts.items()
        if acc.balance_thresholds
    }


# --- end webhooks ----------------------------------------------------------------------


@dataclass(frozen=True)
class CollectorConfig:
    tariff: Path = config.option(Path("tariff.toml"), "tariff file (see docs/tariffs.md)")
    tls: TlsConfig = config.option(factory=TlsConfig, help="mTLS material")
    ingest: IngestConfig = config.option(factory=IngestConfig, help="gRPC ingest")
    api: ApiConfig = config.option(factory=ApiConfig, help="REST API")
    ledger: LedgerConfig = config.option(factory=LedgerConfig, help="ledger storage")
    accounts: dict[str, AccountConfig] = config.option(factory=dict, help="accounts by id")
    assignments: list[AssignmentConfig] = config.option(
        factory=list, help="host to account assignments"
    )
    fleet: FleetConfig = config.option(factory=FleetConfig, help="agent health thresholds")
    metrics: MetricsConfig = config.option(factory=MetricsConfig, help="the /metrics endpoint")
    webhooks: WebhooksConfig = config.option(
        factory=WebhooksConfig, help="webhook delivery (collector.webhooks)"
    )
    billing: BillingConfig = config.option(
        factory=lambda: BillingConfig(), help="closing periods and numbering invoices"
    )


@dataclass(frozen=True)
class LoadedCollectorConfig:
    """The configuration with paths resolved and derived values checked."""

    source: Path
    raw: CollectorConfig
    assignments: tuple[Assignment, ...]
    terms: dict[str, AccountTerms]
    shard_map: ShardMap
    denied_serials: frozenset[int]
    billing: dict[str, AccountBilling] = field(default_factory=dict)  # collector.billing

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else self.source.parent / p


def load_collector_config(path: Path) -> LoadedCollectorConfig:
    raw = config.load(CollectorConfig, path)
    source = str(path)
    terms: dict[str, AccountTerms] = {}
    billing: dict[str, AccountBilling] = {}
    for account_id, acc in raw.accounts.items():
        try:
            currency = currency_code(acc.currency)
        except MoneyError as exc:
            raise ConfigError(source, f"accounts.{account_id}.currency", str(exc)) from None
        billing[account_id] = account_billing(account_id, acc, currency, source)
        terms[account_id] = AccountTerms(
            currency, frozenset(acc.prices), billing[account_id].cycle
        )
    assignments = []
    for i, a in enumerate(raw.assignments):
        key = f"assignments[{i}]"
        if a.account not in raw.accounts:
            raise ConfigError(source, f"{key}.account", f"unknown account {a.account!r}")
        start = _instant(a.since, source, f"{key}.since", 0)
        end = _instant(a.until, source, f"{key}.until", FOREVER)
        if end <= start:
            raise ConfigError(source, f"{key}.until", "must be later than since")
        assignments.append(Assignment(a.host, a.account, start, end, a.cgroup))
    if raw.ledger.shards:
        ranges = [
            [parse_slot_range(r, source, f"ledger.shards[{i}].slots") for r in s.slots]
            for i, s in enumerate(raw.ledger.shards)
        ]
        shard_map = ShardMap.from_ranges(ranges, source, "ledger.shards")
    else:
        shard_map = ShardMap.even(1)
    _check_fleet(raw.fleet, source)
    _check_webhooks(raw, source)
    _check_billing(raw.billing, source)
    for field_name in (
        "max_batch_records", "max_in_flight_records", "sequence_check_interval_seconds"
    ):
        if getattr(raw.ingest, field_name) < 1:
            raise ConfigError(source, f"ingest.{field_name}", "must be at least 1")
    for field_name in ("ingest_transactions", "ingest_group_records"):
        if getattr(raw.ledger, field_name) < 1:
            raise ConfigError(source, f"ledger.{field_name}", "must be at least 1")
    if raw.ingest.sequence_gap_grace_seconds < 0:
        raise ConfigError(source, "ingest.sequence_gap_grace_seconds", "must not be negative")
    denied = set()
    for i, text in enumerate(raw.tls.denied_serials):
        try:
            denied.add(int(text.replace(":", ""), 16))
        except ValueError:
            raise ConfigError(
                source, f"tls.denied_serials[{i}]", f"expected a hexadecimal serial, got {text!r}"
            ) from None
    return LoadedCollectorConfig(
        path, raw, tuple(assignments), terms, shard_map, frozenset(denied), billing
    )


def _instant(text: str, source: str, key: str, default: int) -> int:
    if not text:
        return default
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(source, key, f"expected an RFC 3339 instant, got {text!r}") from None
    if moment.tzinfo is None:
        raise ConfigError(source, key, "the instant needs a UTC offset, e.g. Z or +01:00")
    return to_us(moment)


def parse_listen(text: str, source: str, key: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(source, key, f"expected host:port, got {text!r}")
    return host.strip("[]") or "0.0.0.0", int(port_text)  # noqa: S104 (the operator asked)





# --- billing (collector.billing): account billing settings and [billing] ------------------


@dataclass(frozen=True)
class PlanConfig:
    plan: str = config.option(help="plan id in the tariff")
    quantity: Decimal = config.option(Decimal(1), "how many of the plan (servers)")
    since: str = config.option("", "RFC 3339 instant the plan starts (empty: always)")
    until: str = config.option("", "RFC 3339 instant it ends, exclusive (empty: open)")


@dataclass(frozen=True)
class AddonConfig:
    price: str = config.option(help="licensed or one-time price id in the tariff")
    quantity: Decimal = config.option(Decimal(1), "how many (IP addresses, volumes)")
    since: str = config.option("", "RFC 3339 instant it starts (empty: always)")
    until: str = config.option("", "RFC 3339 instant it ends, exclusive (empty: open)")


@dataclass(frozen=True)
class CouponConfig:
    coupon: str = config.option(help="coupon id in the tariff")
    redeemed: str = config.option(help="RFC 3339 instant the coupon was redeemed")


@dataclass(frozen=True)
class BillingConfig:
    grace_hours: int = config.option(
        48, "closing a period waits this long after its end, for records that come late"
    )
    invoice_prefix: str = config.option(
        "INV", "invoice numbers are <prefix>-<shard>-<n>: one gapless series per shard"
    )
    credit_note_prefix: str = config.option("CN", "credit note numbers: <prefix>-<shard>-<n>")
    issuer_name: str = config.option("", "who issues the invoices (printed on them)")
    issuer_address: list[str] = config.option(factory=list, help="issuer's address lines")
    issuer_tax_id: str = config.option("", "issuer's tax id (printed on invoices)")


def _check_billing(raw: BillingConfig, source: str) -> None:
    if raw.grace_hours < 0:
        raise ConfigError(source, "billing.grace_hours", "must be 0 or more")
    for name in ("invoice_prefix", "credit_note_prefix"):
        value = getattr(raw, name)
        if not value or not value.replace("_", "").isalnum() or not value.isascii():
            raise ConfigError(
                source, f"billing.{name}", f"expected letters and digits, got {value!r}"
            )
    if raw.invoice_prefix == raw.credit_note_prefix:
        raise ConfigError(
            source, "billing.credit_note_prefix", "must differ from billing.invoice_prefix"
        )


def _interval(text: str, source: str, key: str) -> tuple[int, int]:
    """``"7d"`` -> (7, 0), ``"12h"`` -> (0, 12)."""
    number, unit = text[:-1], text[-1:]
    if not number.isdigit() or int(number) < 1 or unit not in ("d", "h"):
        raise ConfigError(
            source, key, f'expected a length such as "7d" (days) or "12h" (hours), got {text!r}'
        )
    return (int(number), 0) if unit == "d" else (0, int(number))


def account_billing(
    account_id: str, acc: AccountConfig, currency: str, source: str
) -> AccountBilling:
    """The billing settings of ``[accounts.<account_id>]``; every mistake names its key.
    How they relate to the tariff is checked where the tariff is loaded with them
    (:func:`collector.billing.settings.check_settings`)."""
    key = f"accounts.{account_id}"
    days = hours = anchor_us = 0
    if acc.cycle == "custom":
        if not acc.interval:
            raise ConfigError(source, f"{key}.interval", 'required with cycle = "custom"')
        days, hours = _interval(acc.interval, source, f"{key}.interval")
        if not acc.anchor:
            raise ConfigError(source, f"{key}.anchor", 'required with cycle = "custom"')
        anchor_us = _instant(acc.anchor, source, f"{key}.anchor", 0)
    else:
        for name in ("interval", "anchor"):
            if getattr(acc, name):
                raise ConfigError(source, f"{key}.{name}", 'only with cycle = "custom"')
    if acc.cycle not in ("monthly", "hourly", "custom"):
        raise ConfigError(
            source, f"{key}.cycle", f'expected "monthly", "hourly" or "custom", got {acc.cycle!r}'
        )
    if acc.cycle != "monthly" and acc.anchor_day != 1:
        raise ConfigError(source, f"{key}.anchor_day", 'only with cycle = "monthly"')
    try:
        cycle = Cycle(acc.cycle, acc.time_zone, acc.anchor_day, days, hours, anchor_us)
    except ValidationError as exc:
        name = "time_zone" if "time zone" in str(exc) else "anchor_day"
        raise ConfigError(source, f"{key}.{name}", str(exc)) from None

    def held(path: str, since: str, until: str, quantity: Decimal) -> tuple[int, int]:
        start = _instant(since, source, f"{path}.since", 0)
        end = _instant(until, source, f"{path}.until", FOREVER)
        if end <= start:
            raise ConfigError(source, f"{path}.until", "must be later than since")
        if quantity < 0:
            raise ConfigError(source, f"{path}.quantity", "must not be negative")
        return start, end

    plans = []
    for i, plan in enumerate(acc.plans):
        path = f"{key}.plans[{i}]"
        start, end = held(path, plan.since, plan.until, plan.quantity)
        plans.append(Subscription(path, plan=plan.plan, quantity=plan.quantity,
                                  since_us=start, until_us=end))  # fmt: skip
    addons = []
    for i, addon in enumerate(acc.addons):
        path = f"{key}.addons[{i}]"
        start, end = held(path, addon.since, addon.until, addon.quantity)
        addons.append(Subscription(path, price=addon.price, quantity=addon.quantity,
                                   since_us=start, until_us=end))  # fmt: skip
    coupons = []
    for i, coupon in enumerate(acc.coupons):
        path = f"{key}.coupons[{i}]"
        if not coupon.redeemed:
            raise ConfigError(source, f"{path}.redeemed", "required: when it was redeemed")
        redeemed = _instant(coupon.redeemed, source, f"{path}.redeemed", 0)
        coupons.append(CouponRedemption(path, coupon.coupon, redeemed))
    return AccountBilling(
        account_id=account_id,
        currency=currency,
        cycle=cycle,
        price_ids=frozenset(acc.prices),
        plans=tuple(plans),
        addons=tuple(addons),
        coupons=tuple(coupons),
        tax_jurisdiction=acc.tax_jurisdiction,
        tax_id=acc.tax_id,
        name=acc.name,
        address=tuple(acc.address),
    )


# --- end billing --------------------------------------------------------------------------
