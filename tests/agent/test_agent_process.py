"""The long-running agent process and its shipping rounds.

``meterd agent run`` checks, then replaces itself (same pid) with ``python -m agent``,
which loads neither ``cryptography`` nor ``rich`` nor the collector; the daemon wakes
the shipper on its cadence and closes the channel it opened after each round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import agent.__main__ as entry
from agent import daemon
from agent.config import load_agent_config
from agent.sampler import FixedSource, Sampler
from agent.spool import Spool
from tests.harness import ROOT

UNREACHABLE = "127.0.0.1:9"  # discard port: nothing answers, the shipper keeps retrying


def write_config(tmp_path: Path, pki: Path, extra: str = "") -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'collector = "{UNREACHABLE}"\ninterval_seconds = "0.2"\n'
        f'spool_path = "{tmp_path}/spool.db"\n{extra}\n'
        f'[tls]\ncert = "{pki}/agents/host-a.pem"\nkey = "{pki}/agents/host-a.key"\n'
        f'ca = "{pki}/ca.pem"\n'
    )
    return path


def python_env(**changes: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def test_the_agent_process_keeps_its_pid_and_loads_no_startup_only_library(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = write_config(tmp_path, pki_dir)
    log_path = tmp_path / "agent.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "common.cli", "agent", "run", "--config", str(config)],
            cwd=tmp_path, stdout=log, stderr=log, env=python_env(MALLOC_ARENA_MAX=None),
        )
    try:
        deadline = time.monotonic() + 30
        while b'"agent_started"' not in log_path.read_bytes():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        argv = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[1:4] == [b"-P", b"-m", b"agent"]
        assert argv[argv.index(b"--host-id") + 1] == b"host-a"
        maps = Path(f"/proc/{proc.pid}/maps").read_text()
        assert "cygrpc" not in maps  # grpcio is the collector's; the agent speaks grpclib
        assert "cryptography" not in maps
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes().split(b"\0")
        assert b"MALLOC_ARENA_MAX=2" in environ
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line)["event"] for line in log_path.read_text().splitlines()]
    assert "agent_stopped" in events


def test_the_agent_process_imports_what_it_runs_and_nothing_else() -> None:
    code = (
        "import agent.__main__ as entry, sys, json\n"
        "entry.load_runtime()\n"
        "import common.logs\n"
        "print(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None)))\n"
    )
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True, env=python_env(), cwd="/")
    loaded = {name.partition(".")[0] for name in json.loads(out.stdout)}
    assert {"grpclib", "h2", "ssl", "psutil", "sqlite3", "structlog"} <= loaded
    # grpcio's C core is the collector's; rich is installed with the development tools
    # (structlog would import it).
    assert not loaded & {"grpc", "cryptography", "rich", "collector", "argparse"}


def test_the_agent_process_takes_exactly_its_four_options(tmp_path: Path) -> None:
    argv = entry.exec_argv(tmp_path / "agent.toml", "host-a", "1.0", "info")
    assert entry.parse_options(argv[4:]) == {
        "--config": str(tmp_path / "agent.toml"), "--host-id": "host-a", "--version": "1.0",
        "--log-level": "info",
    }
    assert entry.parse_options(argv[4:-2]) is None
    assert entry.parse_options([*argv[4:-1], "loud"]) is None
    assert entry.parse_options([*argv[4:-2], "--config", "again"]) is None
    result = subprocess.run([sys.executable, "-P", "-m", "agent", "--config"],
                            capture_output=True, text=True, env=python_env())
    assert result.returncode == 2
    assert result.stderr.startswith("usage: python -m agent")


def test_two_malloc_arenas_unless_the_operator_chose() -> None:
    assert entry.exec_environment({"PATH": "/bin"}) == {"PATH": "/bin", "MALLOC_ARENA_MAX": "2"}
    assert entry.exec_environment({"MALLOC_ARENA_MAX": "8"})["MALLOC_ARENA_MAX"] == "8"


# -- shipping cadence and channels ---------------------------------------------------


@pytest.fixture
def agent_state(tmp_path: Path, pki_dir: Path) -> Iterator[daemon.AgentState]:
    config = write_config(
        tmp_path, pki_dir, '[shipping]\ninterval_seconds = "60"\nbatch_max_records = 100'
    )
    cfg = load_agent_config(config)
    spool = Spool(tmp_path / "spool.db")
    try:
        yield daemon.AgentState(cfg, "host-a", spool, Sampler("host-a", FixedSource()))
    finally:
        spool.close()


def woken(agent: daemon.AgentState) -> bool:
    was = agent.wake.is_set()
    agent.wake.clear()
    return was


def test_shipper_wakes_for_the_first_records_then_on_its_interval(
    agent_state: daemon.AgentState,
) -> None:
    schedule = daemon._schedule_shipping
    schedule(agent_state, 0, 1000.0)  # a baseline sample: nothing to ship
    assert not woken(agent_state)
    schedule(agent_state, 10, 1000.2)
    assert woken(agent_state)  # the first records after start go at once
    schedule(agent_state, 10, 1030.0)
    assert not woken(agent_state)
    schedule(agent_state, 10, 1060.15)  # the sample nearest the due time (1060.2)
    assert woken(agent_state)
    schedule(agent_state, 10, 1070.0)
    assert not woken(agent_state)


def test_shipper_wakes_at_once_for_a_full_batch(agent_state: daemon.AgentState) -> None:
    schedule = daemon._schedule_shipping
    schedule(agent_state, 1, 0.0)
    assert woken(agent_state)
    schedule(agent_state, 60, 1.0)
    assert not woken(agent_state)
    schedule(agent_state, 40, 2.0)  # 100 waiting: batch_max_records
    assert woken(agent_state)


def test_a_zero_interval_ships_after_every_sample(
    tmp_path: Path, pki_dir: Path, agent_state: daemon.AgentState
) -> None:
    agent_state.config = load_agent_config(
        write_config(tmp_path, pki_dir, '[shipping]\ninterval_seconds = "0"')
    )
    for second in range(3):
        daemon._schedule_shipping(agent_state, 5, float(second))
        assert woken(agent_state)


def test_the_shipping_interval_cannot_be_negative(tmp_path: Path, pki_dir: Path) -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match=r"shipping\.interval_seconds"):
        load_agent_config(write_config(tmp_path, pki_dir, '[shipping]\ninterval_seconds = "-1"'))


@pytest.mark.parametrize("spool", ["a folder", "not a database"])
def test_a_spool_path_that_cannot_be_the_spool_is_refused_clearly(
    tmp_path: Path, pki_dir: Path, spool: str
) -> None:
    config = write_config(tmp_path, pki_dir)
    path = tmp_path / "spool.db"
    if spool == "a folder":
        path.mkdir()
        expected = f"spool_path: {path} exists and is not a file"
    else:
        path.write_bytes(b"usage records? no.\n" * 300)
        expected = f"spool_path: cannot open the spool {path}: file is not a database"
    before = sorted(p.name for p in tmp_path.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "common.cli", "agent", "run", "--config", str(config)],
        capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=60,
    )
    assert result.returncode == 1
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written beside it
    if spool != "a folder":
        assert path.read_bytes() == b"usage records? no.\n" * 300
