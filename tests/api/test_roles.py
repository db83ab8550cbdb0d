"""Who may call what: every declared route with every role, no token, a bad token and
a revoked token."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.api.app import declared_routes
from collector.api.registry import AUTHENTICATED, PUBLIC, Role, Route, Scope
from tests.api.env import PRINCIPALS, api_env, client

RANK = {r.label: r for r in Role}


def allowed(route: Route, who: str) -> bool:
    if route.access is PUBLIC:
        return True
    if route.access is AUTHENTICATED:
        return who in PRINCIPALS
    if who == "ingest":
        return route.access is Scope.INGEST
    if who in RANK and isinstance(route.access, Role):
        return RANK[who] >= route.access
    return False


def concrete(path: str) -> str:
    return path.replace("{", "x-").replace("}", "")


async def test_every_route_admits_exactly_the_roles_it_declares(
    tmp_path: Path, pki_dir: Path
) -> None:
    routes = declared_routes()
    assert routes
    async with api_env(tmp_path, pki_dir, seed=False) as env, client(env) as c:
        seen: dict[tuple[str, str, str], int] = {}
        for route in routes:
            for who in (*PRINCIPALS, "none", "bad", "revoked"):
                headers = {} if who == "none" else env.auth(who)
                response = await c.request(
                    route.method, concrete(route.path), headers=headers,
                    json={} if route.method != "GET" else None,
                )
                seen[(route.method, route.path, who)] = response.status
                if allowed(route, who):
                    assert response.status not in (401, 403), (route.path, who)
                    assert response.status != 500, (route.method, route.path, await response.text())
                elif who in ("none", "bad", "revoked"):
                    assert response.status == 401, (route.path, who)
                    assert response.content_type == "application/problem+json"
                    body = await response.json()
                    assert body["type"] == "https://meterd.dev/problems/unauthorized"
                    assert response.headers["WWW-Authenticate"].startswith("Bearer")
                else:
                    assert response.status == 403, (route.method, route.path, who)
                    body = await response.json()
                    assert body["type"] == "https://meterd.dev/problems/forbidden"
        assert len(seen) == len(routes) * 8


@pytest.mark.parametrize("header", ["Basic YWRtaW46YWRtaW4=", "Bearer", "Bearer  ", "mtd_x"])
async def test_malformed_authorization_is_unauthorized(
    tmp_path: Path, pki_dir: Path, header: str
) -> None:
    async with api_env(tmp_path, pki_dir, seed=False) as env, client(env) as c:
        response = await c.get("/v1/accounts", headers={"Authorization": header})
        assert response.status == 401
        assert (await response.json())["type"].endswith("/unauthorized")


async def test_a_revoked_token_is_refused_on_the_next_request(
    tmp_path: Path, pki_dir: Path
) -> None:
    async with api_env(tmp_path, pki_dir, seed=False) as env, client(env) as c:
        secret = await env.token("soon-gone", Role.VIEWER)
        headers = {"Authorization": f"Bearer {secret}"}
        assert (await c.get("/v1/accounts", headers=headers)).status == 200
        revoked = await c.post(f"/v1/tokens/{env.token_ids['soon-gone']}/revoke",
                               headers=env.auth("admin"))
        assert revoked.status == 200
        assert (await revoked.json())["revoked_by"].startswith("token:admin/")
        again = await c.get("/v1/accounts", headers=headers)
        assert again.status == 401
