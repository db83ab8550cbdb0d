"""Real processes for end-to-end tests: a collector started with ``meterd collector run``.

The collector runs as its own process on loopback with real mTLS, so tests can stop
it, kill it with SIGKILL and restart it on the same ledger.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
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


class CollectorProcess:
    def __init__(self, config: Path) -> None:
        self.config = config
        self.workdir = config.parent
        self.proc: subprocess.Popen[bytes] | None = None
        self.grpc_port = 0
        self.api_port = 0
        self.log = self.workdir / "collector.log"

    def start(self, timeout: float = 30) -> CollectorProcess:
        ready = self.workdir / "ready.json"
        ready.unlink(missing_ok=True)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "common.cli",
                    "collector",
                    "run",
                    "--config",
                    str(self.config),
                    "--ready-file",
                    str(ready),
                ],
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
        with urllib.request.urlopen(f"http://127.0.0.1:{self.api_port}{path}", timeout=10) as r:
            return json.load(r)

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
