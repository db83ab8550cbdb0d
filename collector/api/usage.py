"""Usage per time bucket, account, host and metric.

A record counts in the bucket (and the ``from``/``to`` range) of its window's start;
buckets are UTC minutes, hours, days or calendar months. Each row sums the quantities
(exactly, in the metric's base unit) and counts the records of one bucket, account,
host, metric and unit. Without ``account`` the query runs on every shard and the rows
are merged in key order.
"""

from __future__ import annotations

import asyncio
import heapq
from datetime import datetime
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from collector.api.keys import SERVICE
from collector.api.pagination import TimePageQuery, decode_cursor, encode_cursor
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Role, Routes, query_of, respond
from collector.api.schemas import DecimalText, dec
from collector.ledger.store import BUCKETS, LedgerStore, UsageBucket, UsageKey, UsageQuery
from common.records import HOST_ID, METRIC_NAME, from_us, to_us

routes = Routes(tag="usage")

Filter = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Bucket = Literal["minute", "hour", "day", "month"]


HostFilter = Annotated[
    str, msgspec.Meta(pattern=HOST_ID.pattern, max_length=128, description="only this host")
]
MetricFilter = Annotated[
    str, msgspec.Meta(pattern=METRIC_NAME.pattern, max_length=200,
                      description="only this metric")
]


class UsageParams(TimePageQuery, kw_only=True, forbid_unknown_fields=True):
    account: Annotated[Filter, msgspec.Meta(description="only this account")] | None = None
    host: HostFilter | None = None
    metric: MetricFilter | None = None
    bucket: Annotated[Bucket, msgspec.Meta(description="width of a time bucket (UTC)")] = "day"


class UsageRow(msgspec.Struct):
    """Usage of one account, host, metric and unit in one time bucket [start, end)."""

    start: datetime
    end: datetime
    account: str
    host: str
    metric: str
    unit: str
    quantity: DecimalText
    records: int


class UsagePage(msgspec.Struct):
    items: list[UsageRow]
    next_cursor: str | None


def bucket_end(bucket: str, start_us: int) -> int:
    width = BUCKETS[bucket]
    if width:
        return start_us + width
    start = from_us(start_us)
    year, month = (start.year + 1, 1) if start.month == 12 else (start.year, start.month + 1)
    return to_us(start.replace(year=year, month=month, day=1))


def _usage_key(raw: object) -> UsageKey | None:
    if raw is None:
        return None
    if (
        isinstance(raw, list)
        and len(raw) == 5
        and isinstance(raw[0], int)
        and all(isinstance(x, str) for x in raw[1:])
    ):
        return (raw[0], raw[1], raw[2], raw[3], raw[4])
    raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")


@routes.get(
    "/v1/usage",
    Role.VIEWER,
    summary="Usage per time bucket, account, host and metric",
    description=__doc__ or "",
    query=UsageParams,
    response=UsagePage,
)
async def usage_series(request: web.Request) -> web.StreamResponse:
    q = query_of(request, UsageParams)
    start, end = q.time_range()
    kind = f"usage:{q.bucket}"
    query = UsageQuery(
        bucket=q.bucket,
        from_us=start,
        to_us=end,
        account_id=q.account,
        host_id=q.host,
        metric=q.metric,
        after=_usage_key(decode_cursor(kind, q.cursor)),
        limit=q.limit + 1,
    )
    ledger = request.app[SERVICE]().ledger
    stores: list[LedgerStore] = (
        [ledger.for_account(q.account)] if q.account is not None else list(ledger.stores)
    )
    parts = await asyncio.gather(*(s.usage_series(query) for s in stores))
    rows: list[UsageBucket] = list(heapq.merge(*parts, key=lambda b: b.key))[: q.limit + 1]
    page, more = rows[: q.limit], len(rows) > q.limit
    return respond(
        UsagePage(
            items=[
                UsageRow(
                    start=from_us(b.start_us),
                    end=from_us(bucket_end(q.bucket, b.start_us)),
                    account=b.account_id,
                    host=b.host_id,
                    metric=b.metric,
                    unit=b.unit,
                    quantity=dec(b.quantity),
                    records=b.records,
                )
                for b in page
            ],
            next_cursor=encode_cursor(kind, list(page[-1].key)) if more else None,
        )
    )
