"""Hosts: their assignments to accounts over time, and what their agent last reported.

Assignments are configured in the collector's TOML file (``[[assignments]]``, each with
an optional ``since`` and ``until``) and reloaded with SIGHUP; together they are a
host's assignment history: who was billed for it when. A host is known when an
assignment names it or its agent has shipped to the collectors. Fleet health (status
per agent, thresholds) has its own routes under ``/v1/fleet``.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from aiohttp import web

from collector.api.keys import CLOCK, CONFIG, FLEET
from collector.api.pagination import PageQuery, TimePageQuery, decode_cursor, encode_cursor
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Role, Routes, query_of, respond
from collector.ledger.store import AgentFacts
from collector.routing import FOREVER, Assignment
from common.records import from_us

routes = Routes(tag="hosts")

HOST = {"host": "host id (the common name of its agent's certificate)"}


class AssignmentOut(msgspec.Struct):
    """The account billed for a host (or one cgroup of it) from ``since`` (``null``:
    always) until ``until`` (exclusive; ``null``: open)."""

    host: str
    account: str
    cgroup: str
    since: datetime | None
    until: datetime | None


class Host(msgspec.Struct):
    """A host, the assignments in force now, and its agent's last report (``null``
    fields: its agent has not shipped yet)."""

    host_id: str
    assignments: list[AssignmentOut]
    last_seen: datetime | None
    version: str | None
    backlog_records: int | None
    clock_skew_ms: int | None
    records_accepted: int
    records_rejected: int


class HostPage(msgspec.Struct):
    # Named ``hosts`` rather than ``items`` for the clients written against the first
    # version of this route.
    hosts: list[Host]
    next_cursor: str | None


class AssignmentPage(msgspec.Struct):
    items: list[AssignmentOut]
    next_cursor: str | None


def assignment_out(a: Assignment) -> AssignmentOut:
    return AssignmentOut(
        host=a.host_id,
        account=a.account_id,
        cgroup=a.cgroup,
        since=from_us(a.start_us) if a.start_us > 0 else None,
        until=from_us(a.end_us) if a.end_us < FOREVER else None,
    )


def host_out(host_id: str, assignments: list[Assignment], facts: AgentFacts | None,
             now_us: int) -> Host:
    current = [a for a in assignments if a.start_us <= now_us < a.end_us]
    return Host(
        host_id=host_id,
        assignments=[assignment_out(a) for a in current],
        last_seen=from_us(facts.last_seen_us) if facts else None,
        version=facts.version if facts else None,
        backlog_records=facts.backlog_records if facts else None,
        clock_skew_ms=facts.clock_skew_us // 1000 if facts else None,
        records_accepted=facts.records_accepted if facts else 0,
        records_rejected=facts.records_rejected if facts else 0,
    )


def _by_host(request: web.Request) -> dict[str, list[Assignment]]:
    found: dict[str, list[Assignment]] = {}
    for a in request.app[CONFIG]().assignments:
        found.setdefault(a.host_id, []).append(a)
    return found


@routes.get(
    "/v1/hosts",
    Role.VIEWER,
    summary="Hosts, their current assignments and their agents' last reports",
    query=PageQuery,
    response=HostPage,
)
async def list_hosts(request: web.Request) -> web.StreamResponse:
    q = query_of(request, PageQuery)
    after = decode_cursor("hosts", q.cursor)
    if after is not None and not isinstance(after, str):
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
    assignments = _by_host(request)
    facts = request.app[FLEET].facts()
    ids = sorted(h for h in set(assignments) | set(facts) if after is None or h > after)
    page = ids[: q.limit]
    now = request.app[CLOCK]()
    return respond(
        HostPage(
            hosts=[host_out(h, assignments.get(h, []), facts.get(h), now) for h in page],
            next_cursor=encode_cursor("hosts", page[-1]) if len(ids) > q.limit else None,
        )
    )


def _known(request: web.Request, host_id: str) -> tuple[list[Assignment], AgentFacts | None]:
    assignments = _by_host(request).get(host_id, [])
    facts = request.app[FLEET].facts().get(host_id)
    if not assignments and facts is None:
        raise ApiProblem(ProblemType.HOST_NOT_FOUND, f"host {host_id!r}")
    return assignments, facts


@routes.get(
    "/v1/hosts/{host}",
    Role.VIEWER,
    summary="A host, its current assignments and its agent's last report",
    path_params=HOST,
    response=Host,
)
async def get_host(request: web.Request) -> web.StreamResponse:
    host_id = request.match_info["host"]
    assignments, facts = _known(request, host_id)
    return respond(host_out(host_id, assignments, facts, request.app[CLOCK]()))


@routes.get(
    "/v1/hosts/{host}/assignments",
    Role.VIEWER,
    summary="A host's assignment history",
    description="Assignments that overlap [from, to), oldest first.",
    path_params=HOST,
    query=TimePageQuery,
    response=AssignmentPage,
)
async def host_assignments(request: web.Request) -> web.StreamResponse:
    host_id = request.match_info["host"]
    q = query_of(request, TimePageQuery)
    start, end = q.time_range()
    assignments, _ = _known(request, host_id)
    kind = f"assignments:{host_id}"
    after = decode_cursor(kind, q.cursor)

    def key(a: Assignment) -> list[object]:
        return [a.start_us, a.end_us, a.cgroup, a.account_id]

    ordered = sorted(
        (a for a in assignments if a.start_us < end and a.end_us > start), key=key
    )
    if after is not None:
        if not isinstance(after, list) or len(after) != 4:
            raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
        ordered = [a for a in ordered if _after(key(a), after)]
    page = ordered[: q.limit]
    return respond(
        AssignmentPage(
            items=[assignment_out(a) for a in page],
            next_cursor=encode_cursor(kind, key(page[-1])) if len(ordered) > q.limit else None,
        )
    )


def _after(key: list[object], cursor: list[object]) -> bool:
    try:
        return tuple(key) > tuple(cursor)
    except TypeError:
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made"
                         ) from None
