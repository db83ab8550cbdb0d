"""Real processes for end-to-end tests: a collector started with ``meterd collector run``.

The collector runs as its own process on loopback with real mTLS, so tests can stop
it, kill it with SIGKILL and restart it on the same ledger.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.ledger.helpers import TARIFF


def collector_config(
    workdir: Path,
    pki_dir: Path,
    *,
    ledger: str = "",
    assignments: str = "",
    extra: str = "",
) -> Path:
    """Write a collector config (SQLite ledger unless ``ledger`` says otherwise)."""
    (workdir / "tariff.toml").write_text(TARIFF)
    assignments = assignments or (
        '[[assignments]]\nhost = "host-a"\naccount = "acme"\n\n'
        '[[assignments]]\nhost = "host-b"\naccount = "globex"\n'
    )
    text = f"""
tariff = "tariff.toml"
{extra}
[tls]
cert = "{pki_dir}/servers/localhost.pem"
key = "{pki_dir}/servers/localhost.key"
ca = "{pki_dir}/ca.pem"

[ingest]
listen = "127.0.0.1:0"

[api]
listen = "127.0.0.1:0"

[ledger]
{ledger or 'sqlite_path = "ledger.db"'}

[accounts.acme]
currency = "eur"

[accounts.globex]
currency = "eur"

{assignments}
"""
    path = workdir / "collector.toml"
    path.write_text(text)
    return path


def dies_with_us(args: list[str]) -> list[str]:
    """``args`` run so that the kernel kills the process when the thread that starts it
    ends (PR_SET_PDEATHSIG through util-linux's ``setpriv``, which then becomes the
    command, same pid): a test run that is killed leaves no collector or agent behind.
    Only from the main thread, which lives as long as the run; elsewhere, as given."""
    if threading.current_thread() is not threading.main_thread() or not shutil.which("setpriv"):
        return args
    return ["setpriv", "--pdeathsig", "KILL", "--", *args]


class CollectorProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.workdir = config.parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.api_port = 0
        self.log = self.workdir / "collector.log"
        self._api_token = ""

    def start(self, timeout: float = 30) -> CollectorProcess:
        ready = self.workdir / "ready.json"
        ready.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                dies_with_us([
                    sys.executable,
                    "-m",
                    "common.cli",
                    "collector",
                    "run",
                    "--config",
                    str(self.config),
                    "--ready-file",
                    str(ready),
                ]),
                cwd=self.workdir,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"collector exited: {self.log.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("collector not ready in time")
            time.sleep(0.05)
        info = json.loads(ready.read_text())
        self.grpc_port, self.api_port = info["grpc_port"], info["api_port"]
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(30)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def get(self, path: str) -> Any:
        """GET an API path with an admin token (made on first use, kept for restarts)."""
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.api_port}{path}",
            headers={"Authorization": f"Bearer {self.api_token()}"},
        )
        with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 (http://127.0.0.1)
            return json.load(r)

    def api_token(self) -> str:
        if not self._api_token:
            self._api_token = make_api_token(self.config, role="admin")
        return self._api_token

    def __enter__(self) -> CollectorProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


ROOT = Path(__file__).resolve().parent.parent


def meterd(
    *args: str, cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run the ``meterd`` console script as a user would."""
    exe = shutil.which("meterd", path=str(Path(sys.executable).parent)) or "meterd"
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )


def make_api_token(config: Path, *, role: str | None = "admin", scopes: tuple[str, ...] = (),
                   name: str = "tests") -> str:
    """An API token made straight in the control shard of ``config``'s ledger, as
    ``meterd token create`` does (in a thread: callers may be inside an event loop)."""
    from collector.api.auth import create_token
    from collector.api.registry import Role
    from collector.audit import now_us
    from collector.config import load_collector_config
    from collector.token_cli import open_control

    async def create() -> str:
        store = await open_control(load_collector_config(config))
        try:
            _, secret = await create_token(
                store, name=name, role=Role.parse(role) if role else None, scopes=scopes,
                actor="cli:tests", now_us=now_us(),
            )
        finally:
            await store.close()
        return secret

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, create()).result()
