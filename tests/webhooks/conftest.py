"""A ledger of each kind for the webhook tests: the SQLite file and a PostgreSQL shard."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from collector.ledger.service import ShardedLedger
from tests.pg import Databases
from tests.webhooks.helpers import open_ledger


@pytest.fixture(params=["sqlite", "pg"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ShardedLedger]:
    databases: Databases | None = None
    if request.param != "sqlite":
        databases = Databases(request.getfixturevalue("pg_server"))
    opened = await open_ledger(request.param, tmp_path, databases)
    try:
        yield opened
    finally:
        await opened.close()
        if databases is not None:
            await databases.drop_all()
