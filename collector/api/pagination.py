"""Cursor pagination and time-range filters shared by every list of the API.

A list answers at most ``limit`` items (default 100, at most 1000) and
``next_cursor``: pass it back as ``cursor`` for the next page; it is ``null`` on the
last page. A cursor is opaque (base64url of the list's name and the last key sent):
it resumes exactly after that key however the data grows meanwhile, and a cursor
from one list is refused by another (``invalid-cursor``).

Time-based lists take ``from`` (inclusive) and ``to`` (exclusive), RFC 3339 instants
with a UTC offset; either may be left out.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Annotated, Any

import msgspec

from collector.api.problems import ApiProblem, ProblemType
from common.records import to_us

MIN_US = -(2**62)
MAX_US = 2**62

Instant = Annotated[
    datetime, msgspec.Meta(tz=True, description="RFC 3339 instant with a UTC offset")
]
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000, description="most items in one page")]
Cursor = Annotated[
    str,
    msgspec.Meta(
        max_length=1024, pattern="^[A-Za-z0-9_-]+$",
        description="`next_cursor` of the previous page",
    ),
]


class PageQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The query of a paginated list: ``limit`` and ``cursor``."""

    limit: Limit = 100
    cursor: Cursor | None = None


class TimePageQuery(PageQuery, kw_only=True, forbid_unknown_fields=True):
    """The query of a paginated list of time-based things: adds ``from`` and ``to``."""

    from_: Instant | None = msgspec.field(default=None, name="from")
    to: Instant | None = None

    def time_range(self) -> tuple[int, int]:
        """[from, to) in microseconds; the whole timeline for what was left out."""
        start = MIN_US if self.from_ is None else max(MIN_US, to_us(self.from_))
        end = MAX_US if self.to is None else min(MAX_US, to_us(self.to))
        if end < start:
            raise ApiProblem(ProblemType.INVALID_REQUEST, "`to` is earlier than `from`")
        return start, end


def encode_cursor(kind: str, key: Any) -> str:
    text = json.dumps([kind, key], separators=(",", ":"))
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(kind: str, cursor: str | None) -> Any:
    """The key a cursor of the list ``kind`` resumes after (``None`` without a cursor)."""
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        tag, key = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made"
                         ) from None
    if tag != kind:
        raise ApiProblem(ProblemType.INVALID_CURSOR, f"this cursor belongs to another list ({tag})")
    return key


def int_key(kind: str, cursor: str | None) -> int:
    """A cursor whose key is one integer (a sequence number); 0 without a cursor."""
    key = decode_cursor(kind, cursor)
    if key is None:
        return 0
    if not isinstance(key, int) or isinstance(key, bool):
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
    return key
