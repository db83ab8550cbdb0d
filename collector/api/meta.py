"""``/healthz`` and ``/v1/openapi.json``: open to everyone, no token."""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec
from aiohttp import web

from collector.api.keys import OPENAPI
from collector.api.registry import PUBLIC, Routes, respond

routes = Routes(tag="meta")


class Health(msgspec.Struct):
    """The process is up and serving HTTP."""

    status: Literal["ok"]


def encode_document(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=1, sort_keys=False).encode("utf-8")


@routes.get("/healthz", PUBLIC, summary="Liveness: the process serves HTTP", response=Health)
async def healthz(request: web.Request) -> web.StreamResponse:
    return respond(Health("ok"))


@routes.get(
    "/v1/openapi.json",
    PUBLIC,
    summary="This API's OpenAPI 3.1 document",
    description="Generated from the same declarations that route requests.",
    response=dict[str, Any],
)
async def openapi_document(request: web.Request) -> web.StreamResponse:
    return web.Response(body=request.app[OPENAPI], content_type="application/json")
