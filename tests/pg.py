"""A real PostgreSQL server for tests, and fresh databases on it that are dropped after.

Where the server comes from, in order: ``METERD_TEST_PG`` (a DSN of a role that may
create databases); else ``postgresql://postgres@127.0.0.1:5432`` when it answers;
else a throwaway cluster started from the machine's PostgreSQL binaries (initdb,
pg_ctl), removed at the end of the run. With none of these the PostgreSQL tests are
skipped, except under CI (``CI=true``), where that fails the run.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg

DEFAULT_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _answers(dsn: str) -> bool:
    import asyncio

    async def probe() -> bool:
        try:
            conn = await asyncpg.connect(dsn, timeout=3)
        except (OSError, asyncpg.PostgresError, TimeoutError):
            return False
        await conn.close()
        return True

    # The first test to need a server may already run inside an event loop: probe
    # from a thread of our own, with its own loop.
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, probe()).result()


def _pg_bin() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).parent
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        for version in sorted(root.iterdir(), reverse=True):
            if (version / "bin" / "pg_ctl").exists():
                return version / "bin"
    return None


@contextlib.contextmanager
def throwaway_cluster() -> Iterator[str]:
    bindir = _pg_bin()
    if bindir is None:
        raise RuntimeError("no PostgreSQL binaries found")
    tmp = Path(tempfile.mkdtemp(prefix="meterd-pg-"))
    data = tmp / "data"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_as: list[str] = []
    if os.geteuid() == 0:
        # initdb refuses to run as root: run the cluster as an unprivileged user.
        shutil.chown(tmp, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*run_as, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *run_as,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(tmp / "log"),
            "-o",
            f"-p {port} -k {tmp} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*run_as, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            check=False,
            capture_output=True,
        )
        shutil.rmtree(tmp, ignore_errors=True)


def server_dsn(stack: contextlib.ExitStack) -> str | None:
    """The admin DSN of a server to use, or None when there is none."""
    explicit = os.environ.get("METERD_TEST_PG")
    if explicit:
        return explicit
    if _answers(DEFAULT_DSN):
        return DEFAULT_DSN
    if _pg_bin() is not None:
        return stack.enter_context(throwaway_cluster())
    return None


def with_database(admin_dsn: str, name: str) -> str:
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{name}"


class Databases:
    """Creates uniquely named databases on one server and drops them all at the end."""

    def __init__(self, admin_dsn: str) -> None:
        self.admin_dsn = admin_dsn
        self.created: list[str] = []

    async def create(self, prefix: str = "meterd_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        return with_database(self.admin_dsn, name)

    async def drop_all(self) -> None:
        if not self.created:
            return
        conn = await asyncpg.connect(self.admin_dsn)
        try:
            for name in self.created:
                await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
        self.created.clear()
