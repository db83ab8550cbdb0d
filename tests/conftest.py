"""Shared fixtures: a real PostgreSQL server, fresh databases, TLS material."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from common.tls import restrict_grpc_to_tls13
from tests.pg import Databases, server_dsn

# gRPC reads its TLS cipher configuration when it is imported: every test process
# enforces TLS 1.3 here, before any test module imports grpc.
restrict_grpc_to_tls13()

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    with contextlib.ExitStack() as stack:
        dsn = server_dsn(stack)
        if dsn is None:
            if IN_CI:
                pytest.fail("PostgreSQL is required under CI and none could be reached or started")
            pytest.skip("no PostgreSQL server available (set METERD_TEST_PG)")
        yield dsn


@pytest.fixture
async def pg_databases(pg_server: str) -> AsyncIterator[Databases]:
    databases = Databases(pg_server)
    try:
        yield databases
    finally:
        await databases.drop_all()


@pytest.fixture(scope="session")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA with a collector certificate for 127.0.0.1/localhost and agents host-a, host-b."""
    from common import pki

    root = tmp_path_factory.mktemp("pki")
    pki.init_ca(root)
    pki.issue_server(root, "localhost", ip_addresses=["127.0.0.1"])
    pki.issue_agent(root, "host-a")
    pki.issue_agent(root, "host-b")
    return root
