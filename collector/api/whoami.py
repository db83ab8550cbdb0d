"""``/v1/whoami``: the token a request is made with, for any valid token.

A client (the dashboard's sign-in) checks a token with it and learns what the token
may do without trying routes: its id, name, role (``null`` for a token that holds only
scopes) and scopes. Never the secret, which is not stored.
"""

from __future__ import annotations

from typing import Literal, cast

import msgspec
from aiohttp import web

from collector.api.auth import caller
from collector.api.registry import AUTHENTICATED, Routes, respond

routes = Routes(tag="tokens")

RoleName = Literal["viewer", "billing", "operator", "admin"]
ScopeName = Literal["ingest"]


class WhoAmI(msgspec.Struct):
    """The caller's token. A role includes every role below it
    (viewer < billing < operator < admin)."""

    token_id: str
    name: str
    role: RoleName | None
    scopes: list[ScopeName]


@routes.get(
    "/v1/whoami",
    AUTHENTICATED,
    summary="The token this request is made with: id, name, role and scopes",
    description=__doc__ or "",
    response=WhoAmI,
)
async def whoami(request: web.Request) -> web.StreamResponse:
    principal = caller(request)
    return respond(
        WhoAmI(
            token_id=principal.token_id,
            name=principal.name,
            role=cast(RoleName, principal.role.label) if principal.role else None,
            scopes=sorted(s.value for s in principal.scopes),
        )
    )
