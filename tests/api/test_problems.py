"""Every error is application/problem+json with a stable type, aiohttp's own included."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from collector.api import build_app
from collector.api.app import MAX_BODY_BYTES
from collector.api.pagination import encode_cursor
from collector.api.registry import PUBLIC, Routes
from common.errors import StoreUnavailable
from tests.api.env import api_env, client

PROBLEM = "https://meterd.dev/problems/"


async def problem(response: Any, status: int, slug: str) -> dict[str, Any]:
    assert response.status == status, await response.text()
    assert response.content_type == "application/problem+json"
    body: dict[str, Any] = await response.json()
    assert body["type"] == PROBLEM + slug
    assert body["status"] == status
    assert body["title"]
    return body


@pytest.fixture
async def env(tmp_path: Path, pki_dir: Path) -> Any:
    async with api_env(tmp_path, pki_dir) as e:
        yield e


async def test_unknown_path_and_wrong_method(env: Any) -> None:
    async with client(env) as c:
        await problem(await c.get("/v1/nothing-here", headers=env.auth("admin")), 404, "not-found")
        await problem(await c.get("/nothing"), 404, "not-found")
        response = await c.delete("/v1/accounts", headers=env.auth("admin"))
        await problem(response, 405, "method-not-allowed")
        assert response.headers["Allow"] == "GET"


async def test_oversized_body_is_refused_and_makes_no_token(env: Any) -> None:
    async with client(env) as c:
        body = b'{"name": "' + b"x" * MAX_BODY_BYTES + b'", "role": "viewer"}'
        response = await c.post("/v1/tokens", data=io.BytesIO(body), headers={
            **env.auth("admin"), "Content-Type": "application/json"})
        await problem(response, 413, "payload-too-large")
        assert len(await env.ledger.control.tokens()) == 6


@pytest.mark.parametrize(
    ("body", "media", "status", "slug"),
    [
        (b'{"name": "x", "role": ', "application/json", 400, "malformed-json"),
        (b"\xff\xfe", "application/json", 400, "malformed-json"),
        (b'{"name": "x", "role": "emperor"}', "application/json", 400, "invalid-request"),
        (b'{"name": "x", "role": "viewer", "extra": 1}', "application/json", 400,
         "invalid-request"),
        (b'{"name": 7, "role": "viewer"}', "application/json", 400, "invalid-request"),
        (b"[]", "application/json", 400, "invalid-request"),
        (b'{"name": "x"}', "application/json", 400, "invalid-request"),  # no role, no scope
        (b"name=x", "application/x-www-form-urlencoded", 415, "unsupported-media-type"),
    ],
)
async def test_bad_bodies_change_nothing(
    env: Any, body: bytes, media: str, status: int, slug: str
) -> None:
    async with client(env) as c:
        response = await c.post("/v1/tokens", data=body,
                                headers={**env.auth("admin"), "Content-Type": media})
        found = await problem(response, status, slug)
        assert found["instance"] == "/v1/tokens"
    assert len(await env.ledger.control.tokens()) == 6
    audit = await env.ledger.control.audit_rows(from_us=0, to_us=2**62, after_seq=0, limit=None)
    assert [r.action for r in audit].count("token.create") == 6


@pytest.mark.parametrize(
    ("query", "slug"),
    [
        ("limit=0", "invalid-request"),
        ("limit=abc", "invalid-request"),
        ("limit=1001", "invalid-request"),
        ("from=yesterday", "invalid-request"),
        ("from=2026-11-01T00:00:00", "invalid-request"),  # no UTC offset
        ("from=2026-11-02T00:00:00Z&to=2026-11-01T00:00:00Z", "invalid-request"),
        ("bucket=week", "invalid-request"),
        ("colour=blue", "invalid-request"),
        ("cursor=not-a-cursor", "invalid-cursor"),
        (f"cursor={encode_cursor('audit', 3)}", "invalid-cursor"),  # another list's cursor
        (f"cursor={encode_cursor('usage:day', [1, 2])}", "invalid-cursor"),
    ],
)
async def test_bad_queries(env: Any, query: str, slug: str) -> None:
    async with client(env) as c:
        await problem(await c.get(f"/v1/usage?{query}", headers=env.auth("viewer")), 400, slug)


async def test_unknown_account_and_host(env: Any) -> None:
    async with client(env) as c:
        for path in ("/v1/accounts/initech", "/v1/accounts/initech/balances",
                     "/v1/accounts/initech/usage", "/v1/accounts/initech/entries"):
            await problem(await c.get(path, headers=env.auth("viewer")), 404, "account-not-found")
        for path in ("/v1/hosts/nowhere", "/v1/hosts/nowhere/assignments"):
            await problem(await c.get(path, headers=env.auth("viewer")), 404, "host-not-found")
        await problem(await c.post("/v1/tokens/nope/revoke", headers=env.auth("admin")),
                      404, "token-not-found")


async def test_store_outage_and_bugs_answer_problems_without_traces(env: Any) -> None:
    """What a handler raises reaches the client as a problem document: a store outage
    as 503 with Retry-After, a bug as 500 that shows nothing of its internals."""
    extra = Routes(tag="test")

    @extra.get("/v1/test/outage", PUBLIC, summary="Outage")
    async def outage(request: web.Request) -> web.StreamResponse:
        raise StoreUnavailable("shard0: connection refused")

    @extra.get("/v1/test/bug", PUBLIC, summary="Bug")
    async def bug(request: web.Request) -> web.StreamResponse:
        raise KeyError("secret-internal-name")

    app = build_app(lambda: env.service, env.fleet, lambda: env.config, tables=[extra])
    async with TestClient(TestServer(app)) as c:
        response = await c.get("/v1/test/outage")
        body = await problem(response, 503, "ledger-unavailable")
        assert "connection refused" in body["detail"]
        assert response.headers["Retry-After"] == "1"
        response = await c.get("/v1/test/bug")
        await problem(response, 500, "internal-error")
        assert "secret-internal-name" not in await response.text()
