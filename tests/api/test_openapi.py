"""/v1/openapi.json and the routes aiohttp serves describe the same API."""

from __future__ import annotations

from pathlib import Path

import pytest

from collector.api.app import declared_routes
from collector.api.registry import AUTHENTICATED, PUBLIC, Role, Routes, Scope
from tests.api.env import api_env, client

METHODS = {"get", "post", "put", "patch", "delete"}


async def test_every_served_route_is_documented_and_every_documented_one_served(
    tmp_path: Path, pki_dir: Path
) -> None:
    async with api_env(tmp_path, pki_dir, seed=False) as env, client(env) as c:
        response = await c.get("/v1/openapi.json")
        assert response.status == 200
        document = await response.json()
    served = {
        (r.method.lower(), r.resource.canonical)
        for r in env.app.router.routes()
        if r.resource is not None
    }
    documented = {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }
    assert served == documented
    assert document["openapi"].startswith("3.1")
    # Every operation names who may call it, every protected one its 401, and every one
    # that a valid token may still be refused (a role or scope it lacks) its 403.
    for route in declared_routes():
        operation = document["paths"][route.path][route.method.lower()]
        assert operation["x-meterd-access"]
        assert operation["operationId"] == route.operation_id
        if route.access is not PUBLIC:
            assert "401" in operation["responses"]
            assert operation["security"] == [{"bearer": []}]
        if isinstance(route.access, Role | Scope):
            assert "403" in operation["responses"]
        if route.access is AUTHENTICATED:
            assert "403" not in operation["responses"]


def test_a_route_must_describe_its_path_parameters() -> None:
    routes = Routes()
    with pytest.raises(ValueError, match="thing"):
        routes.get("/v1/things/{thing}", PUBLIC, summary="A thing")


def test_operation_ids_are_unique() -> None:
    ids = [r.operation_id for r in declared_routes()]
    assert len(ids) == len(set(ids))
