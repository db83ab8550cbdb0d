"""The agent's configuration: one TOML file, loaded once into frozen dataclasses.

``meterd agent config-help`` prints every key with its default and help line.
Relative paths are resolved against the configuration file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from agent.cgroups import check_pattern
from agent.counters import check_metrics
from common import config
from common.errors import ConfigError, MeterdError


@dataclass(frozen=True)
class AgentTls:
    cert: Path = config.option(Path("tls/agent.pem"), "agent certificate; its CN is the host id")
    key: Path = config.option(Path("tls/agent.key"), "agent private key, mode 0600")
    ca: Path = config.option(Path("tls/ca.pem"), "CA that signed the collector's certificate")


@dataclass(frozen=True)
class ShippingConfig:
    interval_seconds: Decimal = config.option(
        Decimal(60),
        "ship spooled records this often (0: after every sample); the first records after "
        "start, and a full batch (batch_max_records), go at once",
    )
    batch_max_records: int = config.option(1000, "most records in one call")
    batch_max_bytes: int = config.option(1024 * 1024, "most encoded bytes in one call")
    deadline_seconds: Decimal = config.option(Decimal(10), "deadline of one call")
    backoff_initial_seconds: Decimal = config.option(Decimal("0.5"), "first retry delay scale")
    backoff_max_seconds: Decimal = config.option(Decimal(60), "longest retry delay")
    final_flush_seconds: Decimal = config.option(
        Decimal(5), "on stop, how long to keep shipping before leaving the rest in the spool"
    )


@dataclass(frozen=True)
class MetricsConfig:
    enabled: list[str] = config.option(
        factory=list, help="metric names to sample; empty: every host metric"
    )
    labels: dict[str, str] = config.option(factory=dict, help="labels added to every record")
    interfaces_exclude: list[str] = config.option(
        factory=lambda: ["lo"], help="network interfaces not metered (glob patterns)"
    )
    mounts_exclude: list[str] = config.option(factory=list, help="mount points not metered")
    devices_exclude: list[str] = config.option(
        factory=lambda: ["loop*", "ram*"], help="block devices not metered"
    )


@dataclass(frozen=True)
class CgroupsConfig:
    root: Path = config.option(Path("/sys/fs/cgroup"), "cgroup v2 mount point")
    patterns: list[str] = config.option(
        factory=list,
        help="cgroups metered as tenants, e.g. [\"machine.slice/*\", "
        "\"system.slice/docker-*.scope\"]",
    )


@dataclass(frozen=True)
class AgentConfig:
    collector: str = config.option("127.0.0.1:7443", "collector gRPC address (host:port)")
    server_name: str = config.option(
        "", "name to verify in the collector's certificate (default: the collector host)"
    )
    interval_seconds: Decimal = config.option(Decimal(10), "sampling interval")
    spool_path: Path = config.option(
        Path("/var/lib/meterd/agent/spool.db"), "the durable spool (SQLite)"
    )
    spool_max_bytes: int = config.option(256 * 1024 * 1024, "spool size before compaction")
    tls: AgentTls = config.option(factory=AgentTls, help="mTLS material")
    shipping: ShippingConfig = config.option(factory=ShippingConfig, help="shipping")
    metrics: MetricsConfig = config.option(factory=MetricsConfig, help="host metrics")
    cgroups: CgroupsConfig = config.option(factory=CgroupsConfig, help="cgroup v2 tenants")


@dataclass(frozen=True)
class LoadedAgentConfig:
    source: Path
    raw: AgentConfig

    def path(self, p: Path) -> Path:
        return p if p.is_absolute() else self.source.parent / p


def load_agent_config(path: Path) -> LoadedAgentConfig:
    raw = config.load(AgentConfig, path)
    source = str(path)
    if raw.interval_seconds < Decimal("0.1"):
        raise ConfigError(source, "interval_seconds", "must be at least 0.1 seconds")
    if str(raw.spool_path) in ("", "."):  # Path("") is the configuration's own folder
        raise ConfigError(source, "spool_path", "must name the spool's file, not a folder")
    if raw.spool_max_bytes < 1024 * 1024:
        raise ConfigError(source, "spool_max_bytes", "must be at least 1048576 (1 MiB)")
    host, sep, port = raw.collector.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ConfigError(source, "collector", f"expected host:port, got {raw.collector!r}")
    for i, pattern in enumerate(raw.cgroups.patterns):
        try:
            check_pattern(pattern, source)
        except MeterdError as exc:
            raise ConfigError(source, f"cgroups.patterns[{i}]", str(exc)) from None
    if raw.metrics.enabled:
        try:
            check_metrics(raw.metrics.enabled)
        except MeterdError as exc:
            raise ConfigError(source, "metrics.enabled", str(exc)) from None
    if raw.shipping.interval_seconds < 0:
        raise ConfigError(source, "shipping.interval_seconds", "must be 0 or more seconds")
    for name in ("batch_max_records", "batch_max_bytes"):
        if getattr(raw.shipping, name) < 1:
            raise ConfigError(source, f"shipping.{name}", "must be at least 1")
    return LoadedAgentConfig(path, raw)
