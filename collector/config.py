"""The collector's configuration: one TOML file, loaded once into frozen dataclasses.

Every option has a default and a help line here; ``meterd collector config-help``
prints them. Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from collector.ledger.sharding import SLOTS, ShardMap, parse_slot_range
from collector.pricing import AccountTerms
from collector.routing import FOREVER, Assignment
from common import config
from common.errors import ConfigError, MoneyError
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
    max_batch_records: int = config.option(5000, "most records accepted in one call")
    max_in_flight_records: int = config.option(
        100_000, "records being processed at once; past it, RESOURCE_EXHAUSTED"
    )
    retry_after_ms: int = config.option(1000, "retry delay suggested with RESOURCE_EXHAUSTED")
    future_tolerance_seconds: int = config.option(
        300, "how far a record's window end may lie ahead of the collector's clock"
    )
    max_lateness_days: int = config.option(
        90, "records whose window ended longer ago than this are rejected"
    )


@dataclass(frozen=True)
class ApiConfig:
    listen: str = config.option("127.0.0.1:8080", "REST API listen address (host:port)")


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


@dataclass(frozen=True)
class AccountConfig:
    currency: str = config.option("eur", "ISO 4217 currency of the account")
    prices: list[str] = config.option(
        factory=list, help="price ids that rate this account; empty: all in its currency"
    )


@dataclass(frozen=True)
class AssignmentConfig:
    host: str = config.option(help="host id (the CN of the agent's certificate)")
    account: str = config.option(help="account billed for the host's usage")
    cgroup: str = config.option("", "bill only records labelled with this cgroup")
    since: str = config.option("", "RFC 3339 instant the assignment starts (empty: always)")
    until: str = config.option("", "RFC 3339 instant it ends, exclusive (empty: open)")


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


@dataclass(frozen=True)
class LoadedCollectorConfig:
    """The configuration with paths resolved and derived values checked."""

    source: Path
    raw: CollectorConfig
    assignments: tuple[Assignment, ...]
    terms: dict[str, AccountTerms]
    shard_map: ShardMap
    denied_serials: frozenset[int]

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else self.source.parent / p


def load_collector_config(path: Path) -> LoadedCollectorConfig:
    raw = config.load(CollectorConfig, path)
    source = str(path)
    terms: dict[str, AccountTerms] = {}
    for account_id, acc in raw.accounts.items():
        try:
            currency = currency_code(acc.currency)
        except MoneyError as exc:
            raise ConfigError(source, f"accounts.{account_id}.currency", str(exc)) from None
        terms[account_id] = AccountTerms(currency, frozenset(acc.prices))
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
    for field_name in ("max_batch_records", "max_in_flight_records"):
        if getattr(raw.ingest, field_name) < 1:
            raise ConfigError(source, f"ingest.{field_name}", "must be at least 1")
    denied = set()
    for i, text in enumerate(raw.tls.denied_serials):
        try:
            denied.add(int(text.replace(":", ""), 16))
        except ValueError:
            raise ConfigError(
                source, f"tls.denied_serials[{i}]", f"expected a hexadecimal serial, got {text!r}"
            ) from None
    return LoadedCollectorConfig(
        path, raw, tuple(assignments), terms, shard_map, frozenset(denied)
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



