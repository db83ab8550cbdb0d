"""Prometheus metrics of one collector process, served at ``/metrics``.

Every metric lives in the registry of one :class:`Metrics` (made by the daemon), not
in prometheus_client's global registry, so two collectors in one test process keep
their numbers apart.

==========================================  =========  ================================
metric                                      type       labels
==========================================  =========  ================================
``meterd_ingest_records_total``             counter    ``source`` (``grpc`` for agents,
                                                       ``cloudevents``), ``outcome``
                                                       (``accepted``, ``duplicate``,
                                                       ``rejected``)
``meterd_ingest_rejects_total``             counter    ``source``, ``reason``
``meterd_ingest_calls_total``               counter    ``code``: the gRPC status of each
                                                       Push call (``OK``, or why it was
                                                       refused: ``RESOURCE_EXHAUSTED``,
                                                       ``PERMISSION_DENIED``, ...)
``meterd_ingest_ack_latency_seconds``       histogram  from receiving a batch to
                                                       answering it, after its commit
``meterd_ledger_transaction_seconds``       histogram  ``shard``, ``outcome``
                                                       (``commit``, ``rollback``)
``meterd_outbox_lag_seconds``               gauge      ``shard``: age of the oldest
                                                       event not yet queued for every
                                                       webhook subscription
``meterd_outbox_pending_events``            gauge      ``shard``: how many such events
``meterd_webhook_pending_deliveries``       gauge      queued deliveries not yet made
``meterd_webhook_oldest_pending_seconds``   gauge      age of the event of the oldest
``meterd_fleet_agents``                     gauge      ``status``
``meterd_fleet_rounds_total``               counter    fleet persist rounds completed
``meterd_fleet_silent_events_total``        counter    agent.silent events emitted here
==========================================  =========  ================================

The outbox numbers are read from the stores when ``/metrics`` is scraped (two cheap
queries per shard); with no webhook subscription nothing waits and they are 0.

The ingest rate is ``rate(meterd_ingest_records_total[5m])``. Reject reasons are a
closed set (:data:`REJECT_REASONS`), never the free text sent to the agent, so the
number of series stays bounded.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from collector.fleet import STATUSES, Fleet
from collector.ledger.service import ShardedLedger
from collector.webhooks.state import PENDING, WebhookState, outbox_after, outbox_position, unit
from common import logs

log = logs.get("collector.metrics")

LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
# Calls per posting transaction: 1 is a call posted alone.
CALLS_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# Reject reasons, found in the reason text the collector sends with each rejected
# record (the first match wins); anything else is ``invalid``.
REJECT_REASONS: tuple[tuple[str, str], ...] = (
    ("record names host", "wrong_host"),
    ("after the collector's clock", "future"),
    ("id repeated in the batch", "conflicting_id"),
    ("is past 2^63-1", "seq_out_of_range"),
)


def reject_reason(text: str) -> str:
    """The bounded label for a reject reason text."""
    for needle, reason in REJECT_REASONS:
        if needle in text:
            return reason
    return "invalid"


@dataclass(frozen=True, slots=True)
class OutboxBacklog:
    """What waits in the outboxes, as :attr:`Metrics.outbox_probe` reports it."""

    shards: tuple[tuple[str, int, float], ...] = ()  # (shard, events, oldest age in s)
    pending_deliveries: int = 0
    oldest_delivery_seconds: float = 0.0


OutboxProbe = Callable[[], Awaitable[OutboxBacklog]]


def outbox_probe(ledger: ShardedLedger, clock_us: Callable[[], int]) -> OutboxProbe:
    """A probe reading each shard's outbox against the webhook subscriptions' cursors
    (:mod:`collector.webhooks.state`) and the pending deliveries on the control shard."""

    async def probe() -> OutboxBacklog:
        now = clock_us()
        state = WebhookState(ledger.control)
        shards = []
        for store in ledger.stores:
            source, head = await outbox_position(store)
            floor = await state.cursor_floor(source)
            waiting = [] if floor is None else await outbox_after(store, floor, 1)
            events = max(0, head - floor) if floor is not None else 0
            age = (now - waiting[0].created_us) / 1e6 if waiting else 0.0
            shards.append((store.name, events, max(age, 0.0)))
        async with unit(ledger.control) as sql:
            rows = await sql.fetch(
                "SELECT count(*), min(event_id) FROM webhook_deliveries WHERE status = $1",
                PENDING,
            )
        count, oldest_event = rows[0]
        oldest = 0.0
        if oldest_event:
            oldest = max(0.0, (now - uuid7_time_us(oldest_event)) / 1e6)
        return OutboxBacklog(tuple(shards), int(count), oldest)

    return probe


def uuid7_time_us(text: str) -> int:
    """The millisecond timestamp of a UUIDv7 (an outbox event id), in microseconds."""
    return (uuid.UUID(text).int >> 80) * 1000


class Metrics:
    """The collector's metrics; the ingest interceptor, the stores and the CloudEvents
    route record into it, and ``/metrics`` renders it."""

    def __init__(self, fleet: Fleet | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.records = Counter(
            "meterd_ingest_records", "Usage records by source and how they were answered",
            ["source", "outcome"], registry=self.registry,
        )
        self.rejects = Counter(
            "meterd_ingest_rejects", "Rejected usage records by source and reason",
            ["source", "reason"], registry=self.registry,
        )
        self.calls = Counter(
            "meterd_ingest_calls", "gRPC Push calls by status code", ["code"],
            registry=self.registry,
        )
        self.ack_latency = Histogram(
            "meterd_ingest_ack_latency_seconds",
            "From receiving a batch to answering it (after its commit)",
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.transactions = Histogram(
            "meterd_ledger_transaction_seconds", "Ledger units of work by shard and outcome",
            ["shard", "outcome"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.transaction_calls = Histogram(
            "meterd_ingest_transaction_calls",
            "Ingest calls posted by each committed posting transaction, by shard (more than"
            " one when calls waited for one of the shard's [ledger] ingest_transactions)",
            ["shard"], buckets=CALLS_BUCKETS, registry=self.registry,
        )
        for outcome in ("accepted", "duplicate", "rejected"):
            for source in ("grpc", "cloudevents"):
                self.records.labels(source, outcome)
        self.outbox = OutboxBacklog()
        self.outbox_probe: OutboxProbe | None = None
        self.registry.register(_Snapshot(self, fleet))

    # -- recording ---------------------------------------------------------------------------

    def count_records(self, source: str, outcomes: Mapping[str, int]) -> None:
        for outcome, n in outcomes.items():
            if n:
                self.records.labels(source, outcome).inc(n)

    def count_rejects(self, source: str, reasons: Iterable[str]) -> None:
        for reason in reasons:
            self.rejects.labels(source, reason).inc()

    def observe_calls(self, shard: str, calls: int) -> None:
        self.transaction_calls.labels(shard).observe(calls)

    def observe_transaction(self, shard: str, seconds: float, committed: bool) -> None:
        self.transactions.labels(shard, "commit" if committed else "rollback").observe(seconds)

    # -- rendering ---------------------------------------------------------------------------

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition in the format the ``Accept`` header asks for (the Prometheus text
        format 0.0.4 by default, or OpenMetrics) and its content type, after asking the
        outbox probe (if any) for fresh numbers."""
        if self.outbox_probe is not None:
            try:
                self.outbox = await self.outbox_probe()
            except Exception as exc:  # noqa: BLE001 (a scrape still answers; the numbers go)
                log.warning("outbox_probe_failed", error=f"{type(exc).__name__}: {exc}")
                self.outbox = OutboxBacklog()
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _Snapshot(Collector):
    """Values read when scraped: agents by status, fleet rounds, the outbox backlog."""

    def __init__(self, metrics: Metrics, fleet: Fleet | None) -> None:
        self._metrics = metrics
        self._fleet = fleet

    def collect(self) -> Iterable[Metric]:
        if self._fleet is not None:
            agents = GaugeMetricFamily("meterd_fleet_agents", "Agents by status",
                                       labels=["status"])
            for status, n in self._fleet.by_status().items():
                agents.add_metric([status], n)
            yield agents
            yield CounterMetricFamily("meterd_fleet_rounds", "Fleet persist rounds completed",
                                      value=self._fleet.rounds)
            yield CounterMetricFamily(
                "meterd_fleet_silent_events", "agent.silent events emitted by this collector",
                value=self._fleet.silent_announced,
            )
        lag = GaugeMetricFamily("meterd_outbox_lag_seconds",
                                "Age of the oldest outbox event not yet delivered",
                                labels=["shard"])
        pending = GaugeMetricFamily("meterd_outbox_pending_events",
                                    "Outbox events not yet delivered", labels=["shard"])
        backlog = self._metrics.outbox
        for shard, events, age in backlog.shards:
            lag.add_metric([shard], age)
            pending.add_metric([shard], events)
        yield lag
        yield pending
        yield GaugeMetricFamily("meterd_webhook_pending_deliveries",
                                "Webhook deliveries queued and not yet made",
                                value=backlog.pending_deliveries)
        yield GaugeMetricFamily("meterd_webhook_oldest_pending_seconds",
                                "Age of the event of the oldest pending webhook delivery",
                                value=backlog.oldest_delivery_seconds)


__all__ = ["STATUSES", "Metrics", "OutboxBacklog", "reject_reason"]
