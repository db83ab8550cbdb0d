"""The audit log over the API (admin): every change made through the API or the CLI."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import msgspec
from aiohttp import web

from collector.api.keys import SERVICE
from collector.api.pagination import TimePageQuery, encode_cursor, int_key
from collector.api.registry import Role, Routes, query_of, respond
from common.records import from_us

routes = Routes(tag="audit")


class AuditEntry(msgspec.Struct):
    """Who changed what, when, and the state before and after (``null``: none). ``hash``
    covers every field and ``prev_hash``, the hash of the row before it."""

    seq: int
    at: datetime
    actor: str
    action: str
    target: str
    before: Any
    after: Any
    prev_hash: str
    hash: str


class AuditPage(msgspec.Struct):
    items: list[AuditEntry]
    next_cursor: str | None


@routes.get(
    "/v1/audit",
    Role.ADMIN,
    summary="The audit log, oldest first",
    query=TimePageQuery,
    response=AuditPage,
)
async def audit_log(request: web.Request) -> web.StreamResponse:
    q = query_of(request, TimePageQuery)
    start, end = q.time_range()
    rows = await request.app[SERVICE]().ledger.control.audit_rows(
        from_us=start, to_us=end, after_seq=int_key("audit", q.cursor), limit=q.limit + 1
    )
    page = rows[: q.limit]
    return respond(
        AuditPage(
            items=[
                AuditEntry(
                    seq=r.seq,
                    at=from_us(r.at_us),
                    actor=r.actor,
                    action=r.action,
                    target=r.target,
                    before=json.loads(r.before),
                    after=json.loads(r.after),
                    prev_hash=r.prev_hash,
                    hash=r.hash,
                )
                for r in page
            ],
            next_cursor=encode_cursor("audit", page[-1].seq) if len(rows) > q.limit else None,
        )
    )
