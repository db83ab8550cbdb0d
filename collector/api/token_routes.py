"""API tokens over the API (admin): list, create, revoke.

The first admin token is made with ``meterd token create`` on the collector's host;
the API's answer to a create is the only time a token's secret is shown.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from collector.api.auth import TokenNotFound, caller, create_token, revoke_token
from collector.api.keys import CLOCK, SERVICE
from collector.api.pagination import TimePageQuery, decode_cursor, encode_cursor
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Role, Routes, body_of, query_of, respond
from collector.ledger.store import ApiToken
from common.records import from_us

routes = Routes(tag="tokens")

TOKEN = {"token_id": "the token's id (not its secret)"}

RoleName = Literal["viewer", "billing", "operator", "admin"]


class TokenOut(msgspec.Struct):
    """An API token as stored (its secret is never stored or shown again)."""

    token_id: str
    name: str
    role: RoleName | None
    scopes: list[Literal["ingest"]]
    created: datetime
    created_by: str
    revoked: datetime | None
    revoked_by: str | None


class TokenPage(msgspec.Struct):
    items: list[TokenOut]
    next_cursor: str | None


class NewToken(msgspec.Struct, forbid_unknown_fields=True):
    """A token to make: a role, scopes, or both."""

    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64,
                                      pattern=r"^[A-Za-z0-9][A-Za-z0-9 ._@:/-]*$")]
    role: RoleName | None = None
    scopes: list[Literal["ingest"]] = msgspec.field(default_factory=list)


class CreatedToken(msgspec.Struct):
    """The new token and its secret: shown this once."""

    token: TokenOut
    secret: str


def token_out(t: ApiToken) -> TokenOut:
    return TokenOut(
        token_id=t.token_id,
        name=t.name,
        role=t.role or None,  # type: ignore[arg-type]
        scopes=list(t.scopes),  # type: ignore[arg-type]
        created=from_us(t.created_us),
        created_by=t.created_by,
        revoked=from_us(t.revoked_us) if t.revoked_us is not None else None,
        revoked_by=t.revoked_by or None,
    )


@routes.get(
    "/v1/tokens",
    Role.ADMIN,
    summary="API tokens, revoked ones included",
    description="Filtered by creation time; oldest first.",
    query=TimePageQuery,
    response=TokenPage,
)
async def list_tokens(request: web.Request) -> web.StreamResponse:
    q = query_of(request, TimePageQuery)
    start, end = q.time_range()
    after = decode_cursor("tokens", q.cursor)
    if after is not None and not (
        isinstance(after, list) and len(after) == 2 and isinstance(after[0], int)
        and isinstance(after[1], str)
    ):
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
    tokens = [
        t for t in await request.app[SERVICE]().ledger.control.tokens()
        if start <= t.created_us < end
        and (after is None or (t.created_us, t.token_id) > (after[0], after[1]))
    ]
    page = tokens[: q.limit]
    return respond(
        TokenPage(
            items=[token_out(t) for t in page],
            next_cursor=(
                encode_cursor("tokens", [page[-1].created_us, page[-1].token_id])
                if len(tokens) > q.limit else None
            ),
        )
    )


@routes.post(
    "/v1/tokens",
    Role.ADMIN,
    summary="Make an API token",
    description="The answer holds the token's secret: it is shown only this once.",
    body=NewToken,
    response=CreatedToken,
    status=201,
    errors=(422,),
)
async def post_token(request: web.Request) -> web.StreamResponse:
    body = await body_of(request, NewToken)
    if body.role is None and not body.scopes:
        raise ApiProblem(ProblemType.INVALID_REQUEST, "a token needs a role, a scope, or both")
    token, secret = await create_token(
        request.app[SERVICE]().ledger.control,
        name=body.name,
        role=Role.parse(body.role) if body.role else None,
        scopes=tuple(body.scopes),
        actor=caller(request).actor,
        now_us=request.app[CLOCK](),
    )
    return respond(CreatedToken(token_out(token), secret), status=201)


@routes.post(
    "/v1/tokens/{token_id}/revoke",
    Role.ADMIN,
    summary="Revoke an API token, at once and for good",
    description="Revoking a revoked token changes nothing and answers it as it is.",
    path_params=TOKEN,
    response=TokenOut,
)
async def revoke(request: web.Request) -> web.StreamResponse:
    try:
        token = await revoke_token(
            request.app[SERVICE]().ledger.control,
            request.match_info["token_id"],
            actor=caller(request).actor,
            now_us=request.app[CLOCK](),
        )
    except TokenNotFound as exc:
        raise ApiProblem(ProblemType.TOKEN_NOT_FOUND, str(exc)) from None
    return respond(token_out(token))
