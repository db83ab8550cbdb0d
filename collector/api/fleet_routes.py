"""Fleet health: every agent's status, and the fleet in numbers (``/v1/fleet``).

What the statuses mean and where their thresholds come from is in
:mod:`collector.fleet`. Each agent also lists its open sequence gaps
(:mod:`collector.sequences`): usage it sampled that never reached the ledger. The view
is the control shard's fleet table as the collector last read it (every ``[fleet]
persist_interval_seconds``) with what this collector saw since, so every collector
sharing the ledger answers alike within that interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from collector.api.keys import CLOCK, FLEET, SERVICE
from collector.api.pagination import PageQuery, decode_cursor, encode_cursor
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Role, Routes, query_of, respond
from collector.fleet import DAY_US, AgentHealth, Fleet, Status, summary
from collector.sequences import SequenceGap as FoundGap
from collector.sequences import Sequences
from common.records import from_us

routes = Routes(tag="fleet")

StatusName = Literal["healthy", "lagging", "silent", "skewed", "expiring"]
SortKey = Literal["host", "last_seen", "status", "backlog", "skew", "cert_expiry"]

_NAMES: dict[Status, StatusName] = {
    Status.SILENT: "silent",
    Status.EXPIRING: "expiring",
    Status.SKEWED: "skewed",
    Status.LAGGING: "lagging",
    Status.HEALTHY: "healthy",
}
_STATUS_RANK = {s: i for i, s in enumerate(Status)}  # most urgent first


class Certificate(msgspec.Struct):
    """The agent's verified client certificate as last presented."""

    serial: str
    expires_at: datetime | None
    days_left: int | None


class SequenceGap(msgspec.Struct):
    """Seqs ``first_seq`` to ``last_seq`` of one spool (``epoch``) that never arrived:
    open since ``since``, reported as a gap at ``detected_at`` (see
    :mod:`collector.sequences`)."""

    epoch: str
    first_seq: int
    last_seq: int
    missing: int
    since: datetime
    detected_at: datetime


class Agent(msgspec.Struct):
    """One agent: its status (the most urgent condition, or ``healthy``), every condition
    that holds, and what it last reported. ``silent_announced``: the agent.silent event
    of its current silence has been emitted. ``sequence_gaps``: usage it sampled that
    never reached the ledger."""

    host_id: str
    status: StatusName
    conditions: list[StatusName]
    first_seen: datetime
    last_seen: datetime
    seconds_since_seen: int
    version: str
    backlog_records: int
    clock_skew_ms: int
    certificate: Certificate
    dead_letters: int | None
    records_accepted: int
    records_rejected: int
    last_seq: int
    silent_announced: bool
    sequence_gaps: list[SequenceGap]


class AgentPage(msgspec.Struct):
    items: list[Agent]
    next_cursor: str | None


class Thresholds(msgspec.Struct):
    """The ``[fleet]`` thresholds in force."""

    silent_after_seconds: str
    lagging_backlog_records: int
    skew_tolerance_seconds: str
    expiring_within_days: int


class FleetSummary(msgspec.Struct):
    """The fleet in numbers."""

    agents: int
    by_status: dict[str, int]
    by_version: dict[str, int]
    thresholds: Thresholds
    generated_at: datetime


class AgentQuery(PageQuery, kw_only=True, forbid_unknown_fields=True):
    status: Annotated[StatusName, msgspec.Meta(description="only agents with this status")
                      ] | None = None
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=200,
                                         description="only agents of this version")
                       ] | None = None
    sort: Annotated[SortKey, msgspec.Meta(description="order of the list")] = "host"
    order: Annotated[Literal["asc", "desc"], msgspec.Meta(description="ascending or not")
                     ] = "asc"


def agent_out(agent: AgentHealth, now_us: int, gaps: Sequence[FoundGap] = ()
              ) -> Agent:
    f = agent.facts
    expires = f.cert_expiry_us or None
    return Agent(
        host_id=f.host_id,
        status=_NAMES[agent.status],
        conditions=[_NAMES[c] for c in agent.conditions],
        first_seen=from_us(f.first_seen_us),
        last_seen=from_us(f.last_seen_us),
        seconds_since_seen=max(0, (now_us - f.last_seen_us) // 1_000_000),
        version=f.version,
        backlog_records=f.backlog_records,
        clock_skew_ms=f.clock_skew_us // 1000,
        certificate=Certificate(
            serial=f.cert_serial,
            expires_at=from_us(expires) if expires else None,
            days_left=(expires - now_us) // DAY_US if expires else None,
        ),
        dead_letters=f.dead_letters,
        records_accepted=f.records_accepted,
        records_rejected=f.records_rejected,
        last_seq=f.last_seq,
        silent_announced=f.silent_notified_us == f.last_seen_us > 0,
        sequence_gaps=[
            SequenceGap(g.epoch, g.first, g.last, g.count, from_us(g.since_us),
                        from_us(g.detected_us))
            for g in gaps
        ],
    )



def _sort_value(agent: AgentHealth, sort: str) -> Any:
    f = agent.facts
    if sort == "last_seen":
        return f.last_seen_us
    if sort == "status":
        return _STATUS_RANK[agent.status]
    if sort == "backlog":
        return f.backlog_records
    if sort == "skew":
        return abs(f.clock_skew_us)
    if sort == "cert_expiry":
        return f.cert_expiry_us
    return ""


def _fleet(request: web.Request) -> Fleet:
    return request.app[FLEET]


async def _gaps(request: web.Request, host_id: str | None
                ) -> dict[str, list[FoundGap]]:
    """Open sequence gaps by host (of one host, or of all: one query per shard)."""
    found: dict[str, list[FoundGap]] = {}
    ledger = request.app[SERVICE]().ledger
    for gap in await Sequences(ledger, 0).gaps(host_id):
        found.setdefault(gap.host_id, []).append(gap)
    return found


@routes.get(
    "/v1/fleet/agents",
    Role.OPERATOR,
    summary="Every agent with its health status",
    description=(
        "Filter with `status` and `version`; order with `sort` (`host`, `last_seen`,"
        " `status` (most urgent first), `backlog`, `skew` (by size), `cert_expiry`) and"
        " `order`. Ties are broken by host id, in the same order."
    ),
    query=AgentQuery,
    response=AgentPage,
)
async def list_agents(request: web.Request) -> web.StreamResponse:
    q = query_of(request, AgentQuery)
    now = request.app[CLOCK]()
    kind = f"fleet:{q.sort}:{q.order}"
    after = decode_cursor(kind, q.cursor)
    agents = [
        a for a in _fleet(request).view(now)
        if (q.status is None or a.status.value == q.status)
        and (q.version is None or a.facts.version == q.version)
    ]

    def key(a: AgentHealth) -> list[Any]:
        return [_sort_value(a, q.sort), a.facts.host_id]

    agents.sort(key=key, reverse=q.order == "desc")
    if after is not None:
        if not (isinstance(after, list) and len(after) == 2 and isinstance(after[1], str)):
            raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
        try:
            agents = [
                a for a in agents
                if (key(a) > after if q.order == "asc" else key(a) < after)
            ]
        except TypeError:
            raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made"
                             ) from None
    page = agents[: q.limit]
    gaps = await _gaps(request, None) if page else {}
    return respond(
        AgentPage(
            items=[agent_out(a, now, gaps.get(a.facts.host_id, ())) for a in page],
            next_cursor=encode_cursor(kind, key(page[-1])) if len(agents) > q.limit else None,
        )
    )


@routes.get(
    "/v1/fleet/agents/{host}",
    Role.OPERATOR,
    summary="One agent's health",
    path_params={"host": "host id (the common name of its agent's certificate)"},
    response=Agent,
)
async def get_agent(request: web.Request) -> web.StreamResponse:
    host_id = request.match_info["host"]
    now = request.app[CLOCK]()
    for agent in _fleet(request).view(now):
        if agent.facts.host_id == host_id:
            gaps = await _gaps(request, host_id)
            return respond(agent_out(agent, now, gaps.get(host_id, ())))
    raise ApiProblem(ProblemType.HOST_NOT_FOUND, f"no agent {host_id!r} has shipped yet")


@routes.get(
    "/v1/fleet/summary",
    Role.OPERATOR,
    summary="The fleet in numbers: agents by status and by version, the thresholds",
    response=FleetSummary,
)
async def fleet_summary(request: web.Request) -> web.StreamResponse:
    fleet = _fleet(request)
    now = request.app[CLOCK]()
    counts = summary(fleet.view(now))
    c = fleet.config
    return respond(
        FleetSummary(
            agents=counts["agents"],
            by_status=counts["by_status"],
            by_version=counts["by_version"],
            thresholds=Thresholds(
                silent_after_seconds=str(c.silent_after_seconds),
                lagging_backlog_records=c.lagging_backlog_records,
                skew_tolerance_seconds=str(c.skew_tolerance_seconds),
                expiring_within_days=c.expiring_within_days,
            ),
            generated_at=from_us(now),
        )
    )
