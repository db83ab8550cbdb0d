"""sd_notify over real AF_UNIX datagram sockets, and the daemons that speak it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.sdnotify import Notifier
from tests.harness import ROOT, CollectorProcess, collector_config

# A bound on waiting for a datagram that should come, so a broken daemon fails the
# test instead of hanging it. Nothing is asserted about how long anything takes.
RECEIVE_LIMIT_S = 60


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A bound datagram socket standing in for the service manager, and its address."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(RECEIVE_LIMIT_S)
    try:
        yield sock, str(path)
    finally:
        sock.close()


def receive(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def receive_until(sock: socket.socket, line: str) -> list[str]:
    """Every datagram up to and including the first that carries ``line``."""
    seen = []
    while True:
        message = receive(sock)
        seen.append(message)
        if line in message.split("\n"):
            return seen


def test_without_notify_socket_nothing_is_sent() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "1000000"}, pid=123)
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    assert notifier.ready("serving") is False
    assert notifier.watchdog() is False


def test_ready_and_status_reach_a_path_socket(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": path}, pid=os.getpid())
    assert notifier.ready("serving on 7443") is True
    assert receive(sock) == "READY=1\nSTATUS=serving on 7443"
    assert notifier.stopping() is True
    assert receive(sock) == "STOPPING=1"
    assert notifier.status("line one\nline two") is True
    assert receive(sock) == "STATUS=line one"


def test_abstract_socket_named_with_at_sign() -> None:
    name = f"meterd-test-{secrets.token_hex(8)}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(RECEIVE_LIMIT_S)
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": f"@{name}"}, pid=1)
        assert notifier.watchdog() is True
        assert receive(sock) == "WATCHDOG=1"


def test_a_socket_nobody_listens_on_is_reported_not_raised(tmp_path: Path) -> None:
    notifier = Notifier.from_environment(
        {"NOTIFY_SOCKET": str(tmp_path / "gone.sock")}, pid=os.getpid()
    )
    assert notifier.enabled
    assert notifier.ready() is False


def test_relative_socket_path_is_ignored_like_sd_notify_does() -> None:
    assert not Notifier.from_environment({"NOTIFY_SOCKET": "notify.sock"}, pid=1).enabled


def test_watchdog_interval_is_half_the_timeout_and_only_for_its_pid() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environment(env, pid=42).watchdog_interval == 15.0
    assert Notifier.from_environment({**env, "WATCHDOG_PID": "42"}, pid=42).watchdog_usec
    assert Notifier.from_environment({**env, "WATCHDOG_PID": "41"}, pid=42).watchdog_usec is None
    assert Notifier.from_environment({**env, "WATCHDOG_USEC": "0"}, pid=42).watchdog_usec is None
    assert Notifier.from_environment({**env, "WATCHDOG_USEC": "x"}, pid=42).watchdog_usec is None


def test_a_line_that_is_not_an_assignment_is_a_bug(listener: tuple[socket.socket, str]) -> None:
    _, path = listener
    notifier = Notifier(path)
    with pytest.raises(ValueError, match="VAR=value"):
        notifier.notify("READY")
    with pytest.raises(ValueError, match="VAR=value"):
        notifier.notify("STATUS=a\nREADY=1")


async def test_feed_watchdog_pings_until_cancelled(listener: tuple[socket.socket, str]) -> None:
    sock, path = listener
    notifier = Notifier.from_environment(
        {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "20000"}, pid=os.getpid()
    )
    task = asyncio.create_task(notifier.feed_watchdog())
    try:
        pings = [await asyncio.to_thread(receive, sock) for _ in range(3)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert pings == ["WATCHDOG=1"] * 3


async def test_feed_watchdog_returns_when_there_is_no_watchdog(
    listener: tuple[socket.socket, str],
) -> None:
    _, path = listener
    await asyncio.wait_for(Notifier(path).feed_watchdog(), timeout=RECEIVE_LIMIT_S)


def test_collector_reports_ready_watchdog_and_stopping(
    tmp_path: Path, pki_dir: Path, listener: tuple[socket.socket, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sock, path = listener
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    collector = CollectorProcess(collector_config(tmp_path, pki_dir)).start()
    try:
        ready = receive_until(sock, "READY=1")[-1]
        assert f"ingest on port {collector.grpc_port}" in ready
        assert "WATCHDOG=1" in receive_until(sock, "WATCHDOG=1")[-1]
    finally:
        assert collector.stop() == 0
    assert "STOPPING=1" in receive_until(sock, "STOPPING=1")[-1].split("\n")


def test_agent_reports_ready_watchdog_and_stopping(
    tmp_path: Path, pki_dir: Path, listener: tuple[socket.socket, str]
) -> None:
    sock, path = listener
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
collector = "127.0.0.1:9"
interval_seconds = 1
spool_path = "spool/spool.db"

[tls]
cert = "{pki_dir}/agents/host-a.pem"
key = "{pki_dir}/agents/host-a.key"
ca = "{pki_dir}/ca.pem"

[shipping]
final_flush_seconds = "0.2"
"""
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "NOTIFY_SOCKET": path,
        "WATCHDOG_USEC": "200000",
    }
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "agent", "run", "--config", str(config)],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        ready = receive_until(sock, "READY=1")[-1]
        assert "metering host host-a, shipping to 127.0.0.1:9" in ready
        receive_until(sock, "WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        receive_until(sock, "STOPPING=1")
        _, stderr = proc.communicate(timeout=RECEIVE_LIMIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr.decode()[-2000:]
