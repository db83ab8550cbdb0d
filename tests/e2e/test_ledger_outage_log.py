"""While PostgreSQL is down the collector's log stays structured: one JSON object per
line (asyncpg's reconnect failures included), never a bare traceback."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.wire import to_proto
from tests.e2e.test_end_to_end import channel, samples
from tests.harness import CollectorProcess, collector_config
from tests.pg import Databases, throwaway_cluster
from tests.reliability.faults import PgServer

pytestmark = pytest.mark.pg


@pytest.fixture
def cluster() -> Iterator[PgServer]:
    with contextlib.ExitStack() as stack:
        try:
            dsn = stack.enter_context(throwaway_cluster())
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            pytest.skip(f"cannot start a throwaway PostgreSQL cluster: {exc}")
        yield PgServer(dsn)


async def push(pki: Path, target: str, seed: int) -> pb.PushResponse | grpc.StatusCode:
    ch = channel(pki, "host-a", target)
    try:
        request = pb.PushRequest(records=[to_proto(r) for r in samples("host-a", 3, seed)])
        return await pb_grpc.IngestStub(ch).Push(request, timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    finally:
        await ch.close()


def test_postgres_down_is_logged_as_json_lines(
    cluster: PgServer, tmp_path: Path, pki_dir: Path
) -> None:
    dsn = asyncio.run(Databases(cluster.admin_dsn).create())
    config = collector_config(
        tmp_path, pki_dir, ledger=f'[[ledger.shards]]\ndsn = "{dsn}"\nslots = ["0-1023"]'
    )
    with CollectorProcess(config) as collector:
        answer = asyncio.run(push(pki_dir, collector.target, 1))
        assert isinstance(answer, pb.PushResponse)
        cluster.stop()
        deadline = time.monotonic() + 30
        while '"asyncpg_logged"' not in collector.log.read_text():
            assert asyncio.run(push(pki_dir, collector.target, 2)) == grpc.StatusCode.UNAVAILABLE
            assert time.monotonic() < deadline, collector.log.read_text()
            time.sleep(0.2)
    lines = collector.log.read_text().splitlines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    pool = [e for e in events if e["event"] == "asyncpg_logged"]
    assert pool[0]["logger"] == "asyncpg.pool"
    assert pool[0]["error"]
    assert not any("Traceback" in line for line in lines)
