"""An account's journal entries with their postings, in chain order.

``from``/``to`` filter on the time an entry was posted. Each entry carries its
position in the account's hash chain, its predecessor's hash and its own, so a client
can check the chain it reads.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
from aiohttp import web

from collector.api.accounts import ACCOUNT, known_account
from collector.api.pagination import TimePageQuery, encode_cursor, int_key
from collector.api.registry import Role, Routes, query_of, respond
from collector.api.schemas import DecimalText, dec
from common.records import from_us

routes = Routes(tag="journal")


class PostingOut(msgspec.Struct):
    ledger_account: str
    currency: str
    amount: DecimalText


class Entry(msgspec.Struct):
    """A balanced journal entry: its postings sum to zero per currency."""

    id: str
    account: str
    seq: int
    kind: str
    memo: str
    created: datetime
    records_digest: str
    prev_hash: str
    hash: str
    postings: list[PostingOut]


class EntryPage(msgspec.Struct):
    items: list[Entry]
    next_cursor: str | None


@routes.get(
    "/v1/accounts/{account}/entries",
    Role.VIEWER,
    summary="An account's journal entries and their postings",
    description=__doc__ or "",
    path_params=ACCOUNT,
    query=TimePageQuery,
    response=EntryPage,
)
async def account_entries(request: web.Request) -> web.StreamResponse:
    account_id = request.match_info["account"]
    q = query_of(request, TimePageQuery)
    start, end = q.time_range()
    kind = f"entries:{account_id}"
    store = await known_account(request, account_id)
    links = await store.journal_page(
        account_id, from_us=start, to_us=end, after_seq=int_key(kind, q.cursor),
        limit=q.limit + 1,
    )
    page, more = links[: q.limit], len(links) > q.limit
    return respond(
        EntryPage(
            items=[
                Entry(
                    id=link.entry.id,
                    account=account_id,
                    seq=link.chain_seq,
                    kind=link.entry.kind,
                    memo=link.entry.memo,
                    created=from_us(link.entry.created_us),
                    records_digest=link.entry.records_digest,
                    prev_hash=link.prev_hash,
                    hash=link.hash,
                    postings=[
                        PostingOut(p.ledger_account, p.currency, dec(p.amount))
                        for p in link.entry.postings
                    ],
                )
                for link in page
            ],
            next_cursor=encode_cursor(kind, page[-1].chain_seq) if more else None,
        )
    )
