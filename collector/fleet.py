"""Fleet health: what the collectors know of each agent, and what that says about it.

Every ingest call tells the collector an agent's version, the backlog in its spool,
its clock skew (collector clock minus the agent's send time), its verified client
certificate (serial and expiry), the dead letters it holds (when the agent reports
them; proto field ``dead_letters``) and the records accepted and rejected. The
:class:`Fleet` keeps the latest of these per host in memory; the ingest path only
touches memory.

Persistence and two collectors. A background task owned by the daemon calls
:meth:`Fleet.persist` every ``[fleet] persist_interval_seconds``: it upserts each host
seen since the last round (one row per host, at most once a round, never per batch)
into the control shard's fleet table, re-reads the table (so hosts that ship to
another collector, or were seen before a restart, are known here too), and claims
and announces newly silent agents. The merge rule of the table is in
:class:`collector.ledger.store.AgentFacts`; :func:`merge` applies the same rule in
memory, so a view is the table as last read plus what this collector saw since.

Status. Each agent gets one status, the first that holds in this order:

``silent``    no batch for ``silent_after_seconds``: usage is not reaching the ledger;
``expiring``  its certificate expires within ``expiring_within_days`` (or has expired):
              it will go silent when it does;
``skewed``    its clock is off by more than ``skew_tolerance_seconds`` either way:
              usage windows are stamped with the wrong time;
``lagging``   it reports at least ``lagging_backlog_records`` records in its spool;
``healthy``   none of these.

``conditions`` lists every one that holds, so a silent agent whose certificate is
also expiring says both.

The ``agent.silent`` event. When an agent has been silent for ``silent_after_seconds``,
one outbox event is emitted on the control shard, in the same transaction that marks
that silence announced (``silent_notified_us`` set to the ``last_seen_us`` it began
after); of two collectors checking at once only one can mark it, and a restart finds
the mark. An agent that ships again and later goes quiet again is announced again:
once per silence. A collector announces nothing until it has itself been up for
``silent_after_seconds``, so agents that buffered through an outage of every collector
are not all announced the moment one restarts.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from collector.config import FleetConfig
from collector.ledger.outbox import AGENT_SILENT
from collector.ledger.store import AgentFacts, LedgerStore
from common import logs
from common.errors import MeterdError, SecurityError
from common.pki import load_certificate
from common.records import from_us, to_us

log = logs.get("collector.fleet")

SECOND_US = 1_000_000
DAY_US = 86_400 * SECOND_US


class Status(enum.Enum):
    """An agent's health, most urgent first (see the module docstring)."""

    SILENT = "silent"
    EXPIRING = "expiring"
    SKEWED = "skewed"
    LAGGING = "lagging"
    HEALTHY = "healthy"


STATUSES: tuple[str, ...] = tuple(s.value for s in Status)


@dataclass(frozen=True, slots=True)
class Thresholds:
    """``[fleet]`` in microseconds and counts, as the status rules use them."""

    silent_after_us: int
    lagging_backlog_records: int
    skew_tolerance_us: int
    expiring_within_us: int

    @classmethod
    def of(cls, config: FleetConfig) -> Thresholds:
        return cls(
            silent_after_us=_us(config.silent_after_seconds),
            lagging_backlog_records=config.lagging_backlog_records,
            skew_tolerance_us=_us(config.skew_tolerance_seconds),
            expiring_within_us=config.expiring_within_days * DAY_US,
        )


def _us(seconds: Decimal) -> int:
    return int(seconds * SECOND_US)


def conditions(facts: AgentFacts, limits: Thresholds, now_us: int) -> tuple[Status, ...]:
    """Every status condition that holds for the agent, most urgent first."""
    found = []
    if now_us - facts.last_seen_us >= limits.silent_after_us:
        found.append(Status.SILENT)
    if facts.cert_expiry_us and facts.cert_expiry_us - now_us <= limits.expiring_within_us:
        found.append(Status.EXPIRING)
    if abs(facts.clock_skew_us) > limits.skew_tolerance_us:
        found.append(Status.SKEWED)
    if facts.backlog_records >= limits.lagging_backlog_records:
        found.append(Status.LAGGING)
    return tuple(found)


def merge(row: AgentFacts | None, update: AgentFacts) -> AgentFacts:
    """``update`` (counts are increments) merged into ``row`` (counts are totals), by the
    rule the stores' upsert applies (:class:`collector.ledger.store.AgentFacts`)."""
    if row is None:
        return update
    later = update if update.last_seen_us >= row.last_seen_us else row
    return AgentFacts(
        host_id=row.host_id,
        first_seen_us=min(row.first_seen_us, update.first_seen_us),
        last_seen_us=max(row.last_seen_us, update.last_seen_us),
        version=later.version,
        backlog_records=later.backlog_records,
        clock_skew_us=later.clock_skew_us,
        cert_serial=later.cert_serial,
        cert_expiry_us=later.cert_expiry_us,
        dead_letters=later.dead_letters,
        records_accepted=row.records_accepted + update.records_accepted,
        records_rejected=row.records_rejected + update.records_rejected,
        last_seq=max(row.last_seq, update.last_seq),
        silent_notified_us=row.silent_notified_us,
    )


@functools.lru_cache(maxsize=4096)
def certificate_expiry_us(pem: bytes) -> int:
    """The end of a PEM certificate's validity, microseconds since the epoch (0 if the
    certificate cannot be read: it was verified in the handshake, so that is a bug)."""
    try:
        return to_us(load_certificate(pem).not_valid_after_utc)
    except SecurityError:
        return 0


@dataclass
class AgentSeen:
    """What this collector saw of one agent; ``accepted``/``rejected`` not yet written
    to the control shard are kept apart (``pending_*``) so they are added once."""

    host_id: str
    first_seen_us: int = 0
    last_seen_us: int = 0
    version: str = ""
    backlog_records: int = 0
    clock_skew_us: int = 0
    records_accepted: int = 0
    records_rejected: int = 0
    last_seq: int = 0
    certificate_serial: int = 0
    cert_expiry_us: int = 0
    dead_letters: int | None = None
    pending_accepted: int = 0
    pending_rejected: int = 0
    dirty: bool = False

    def increment(self) -> AgentFacts:
        """This collector's sighting as an upsert row (counts are the pending increments)."""
        return AgentFacts(
            host_id=self.host_id,
            first_seen_us=self.first_seen_us,
            last_seen_us=self.last_seen_us,
            version=self.version,
            backlog_records=self.backlog_records,
            clock_skew_us=self.clock_skew_us,
            cert_serial=f"{self.certificate_serial:X}" if self.certificate_serial else "",
            cert_expiry_us=self.cert_expiry_us,
            dead_letters=self.dead_letters,
            records_accepted=self.pending_accepted,
            records_rejected=self.pending_rejected,
            last_seq=self.last_seq,
        )


@dataclass(frozen=True, slots=True)
class AgentHealth:
    """One agent in a fleet view: its merged facts, its status and every condition."""

    facts: AgentFacts
    status: Status
    conditions: tuple[Status, ...]


@dataclass
class Fleet:
    """The fleet as this collector knows it. Ingest calls :meth:`seen`; the daemon's
    task calls :meth:`persist`; the API and /metrics read :meth:`view`."""

    # The ``[fleet]`` settings in force (the daemon's follow SIGHUP reloads).
    settings: Callable[[], FleetConfig] = field(default=FleetConfig)
    clock_us: Callable[[], int] = field(default=lambda: time.time_ns() // 1000)
    agents: dict[str, AgentSeen] = field(default_factory=dict)
    # The control shard's rows as last read (empty until the first read).
    stored: dict[str, AgentFacts] = field(default_factory=dict)
    rounds: int = 0  # persist rounds completed
    silent_announced: int = 0  # agent.silent events this collector emitted
    started_us: int = -1  # when this collector started (its clock at construction)

    def __post_init__(self) -> None:
        if self.started_us < 0:
            self.started_us = self.clock_us()

    @property
    def config(self) -> FleetConfig:
        return self.settings()

    @property
    def thresholds(self) -> Thresholds:
        return Thresholds.of(self.config)

    def seen(
        self,
        host_id: str,
        *,
        now_us: int,
        version: str,
        backlog: int,
        skew_us: int,
        accepted: int,
        rejected: int,
        last_seq: int,
        serial: int,
        cert_expiry_us: int = 0,
        dead_letters: int | None = None,
    ) -> None:
        agent = self.agents.get(host_id)
        if agent is None:
            agent = self.agents[host_id] = AgentSeen(host_id, first_seen_us=now_us)
        agent.last_seen_us = now_us
        agent.version = version
        agent.backlog_records = backlog
        agent.clock_skew_us = skew_us
        agent.records_accepted += accepted
        agent.records_rejected += rejected
        agent.pending_accepted += accepted
        agent.pending_rejected += rejected
        agent.last_seq = max(agent.last_seq, last_seq)
        agent.certificate_serial = serial
        if cert_expiry_us:
            agent.cert_expiry_us = cert_expiry_us
        agent.dead_letters = dead_letters
        agent.dirty = True

    # -- reading ---------------------------------------------------------------------------

    def facts(self) -> dict[str, AgentFacts]:
        """Every known agent: the control shard's rows as last read, with what this
        collector saw since merged in."""
        merged = dict(self.stored)
        for host_id, agent in self.agents.items():
            if agent.dirty or host_id not in merged:
                merged[host_id] = merge(merged.get(host_id), agent.increment())
        return merged

    def view(self, now_us: int | None = None) -> list[AgentHealth]:
        """Every known agent with its status, by host id."""
        now = self.clock_us() if now_us is None else now_us
        limits = self.thresholds
        out = []
        for host_id in sorted(facts := self.facts()):
            found = conditions(facts[host_id], limits, now)
            out.append(AgentHealth(facts[host_id], found[0] if found else Status.HEALTHY, found))
        return out

    def by_status(self, now_us: int | None = None) -> dict[str, int]:
        counts = Counter(a.status.value for a in self.view(now_us))
        return {s: counts.get(s, 0) for s in STATUSES}

    # -- the control shard -------------------------------------------------------------------

    async def load(self, control: LedgerStore) -> None:
        """Read the control shard's fleet table (at start: the fleet before a restart)."""
        self.stored = {r.host_id: r for r in await control.fleet_agents()}

    async def persist(self, control: LedgerStore) -> list[str]:
        """One round: write what this collector saw since the last round, re-read the
        table and announce agents that went silent. Returns the hosts announced."""
        updates = {h: a.increment() for h, a in self.agents.items() if a.dirty}
        if updates:
            async with control.transaction() as tx:
                await tx.upsert_fleet_agents(list(updates.values()))
            for host_id, written in updates.items():
                self._written(self.agents[host_id], written)
        await self.load(control)
        announced = await self._announce_silent(control)
        self.rounds += 1
        return announced

    @staticmethod
    def _written(agent: AgentSeen, written: AgentFacts) -> None:
        agent.pending_accepted -= written.records_accepted
        agent.pending_rejected -= written.records_rejected
        # Seen again while the round was being written: still to write next round.
        agent.dirty = agent.last_seen_us != written.last_seen_us or bool(
            agent.pending_accepted or agent.pending_rejected
        )

    async def _announce_silent(self, control: LedgerStore) -> list[str]:
        now_us = self.clock_us()
        silent_before = now_us - self.thresholds.silent_after_us
        if self.started_us > silent_before:
            # Up for less than silent_after: agents that waited out a collector outage
            # have not had their chance to reconnect yet. No alarm storm after a restart.
            return []
        candidates = [
            r
            for r in self.stored.values()
            if r.last_seen_us < silent_before and r.silent_notified_us < r.last_seen_us
        ]
        if not candidates:
            return []
        announced: list[AgentFacts] = []
        async with control.transaction() as tx:
            for row in candidates:
                if await tx.claim_agent_silence(row.host_id, silent_before):
                    await tx.emit(AGENT_SILENT, "", silent_event(row, self.config, now_us))
                    announced.append(row)
        for row in announced:
            self.stored[row.host_id] = replace(row, silent_notified_us=row.last_seen_us)
            self.silent_announced += 1
            log.warning(
                "agent_silent", host=row.host_id, last_seen=from_us(row.last_seen_us).isoformat()
            )
        return [r.host_id for r in announced]

    async def run(self, control: LedgerStore) -> None:
        """The daemon's background task: a round every ``persist_interval_seconds`` until
        cancelled; a failed round is logged and the next one tries again."""
        while True:
            try:
                await self.persist(control)
            except MeterdError as exc:
                log.error("fleet_persist_failed", error=str(exc))
            await asyncio.sleep(float(self.config.persist_interval_seconds))  # not an amount


def silent_event(row: AgentFacts, config: FleetConfig, now_us: int) -> dict[str, Any]:
    """The ``data`` of an ``agent.silent`` event (JSON-ready; no floats)."""
    return {
        "host_id": row.host_id,
        "last_seen": from_us(row.last_seen_us).isoformat(),
        "detected_at": from_us(now_us).isoformat(),
        "silent_after_seconds": str(config.silent_after_seconds),
        "version": row.version,
        "backlog_records": row.backlog_records,
    }


def summary(agents: Iterable[AgentHealth]) -> Mapping[str, Any]:
    """Counts by status and by version."""
    items = list(agents)
    statuses = Counter(a.status.value for a in items)
    versions = Counter(a.facts.version for a in items)
    return {
        "agents": len(items),
        "by_status": {s: statuses.get(s, 0) for s in STATUSES},
        "by_version": dict(sorted(versions.items())),
    }
