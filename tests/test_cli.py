"""User mistakes get one clear line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from common.cli import main
from tests.harness import collector_config, meterd


def one_line_error(result: object) -> str:
    stderr = result.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    return lines[0]


def test_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    version = meterd("--version")  # the console script, as installed
    assert version.returncode == 0
    assert version.stdout.startswith("meterd ")
    assert "usage: meterd ledger verify" in meterd("ledger", "verify", "--help").stdout
    for command in (  # the same parser, without a process each
        ["agent"],
        ["collector"],
        ["ledger"],
        ["pki"],
        ["tariff"],
        ["demo"],
        ["agent", "run"],
        ["agent", "status"],
        ["collector", "run"],
        ["pki", "issue-agent"],
    ):
        with pytest.raises(SystemExit) as exit_:
            main([*command, "--help"])
        assert exit_.value.code == 0, command
        assert "usage:" in capsys.readouterr().out, command


def test_bad_flag() -> None:
    result = meterd("collector", "run", "--no-such-flag")
    assert result.returncode == 2
    assert "unrecognized arguments: --no-such-flag" in one_line_error(result)


def test_missing_config_file(tmp_path: Path) -> None:
    result = meterd("collector", "run", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert one_line_error(result) == f"meterd: error: {tmp_path / 'nope.toml'}: file not found"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ingest]\nlisten = 7443\n", "ingest.listen: expected a string, got int 7443"),
        ('[ingest]\nlisen = "x"\n', "ingest.lisen: unknown key"),
        ('[accounts.acme]\ncurrency = "eurx"\n', "accounts.acme.currency: unknown currency"),
        (
            '[[assignments]]\nhost = "h"\naccount = "nobody"\n',
            "assignments[0].account: unknown account 'nobody'",
        ),
        ("tariff = [\n", "not valid TOML"),
        (
            '[ledger]\n[[ledger.shards]]\ndsn = "postgresql://x"\nslots = ["0-99"]\n',
            "ledger.shards: slots 100.. are assigned to no shard",
        ),
    ],
)
def test_bad_collector_config_names_file_key_and_expectation(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    result = meterd("collector", "check-config", "--config", str(path))
    assert result.returncode == 1
    line = one_line_error(result)
    assert line.startswith(f"meterd: error: {path}: ")
    assert message in line


def test_bad_agent_config(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text("interval_seconds = 0.5\n")
    result = meterd("agent", "status", "--config", str(path))
    assert result.returncode == 1
    assert 'interval_seconds: expected a decimal string such as "0.5", got a float' in (
        one_line_error(result)
    )


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_collector_refuses_a_key_others_can_read(tmp_path: Path, pki_dir: Path, mode: int) -> None:
    import shutil

    keys = tmp_path / "pki"
    shutil.copytree(pki_dir, keys)
    key = keys / "servers" / "localhost.key"
    os.chmod(key, mode)
    config = collector_config(tmp_path, keys)
    result = meterd("collector", "run", "--config", str(config), timeout=30)
    assert result.returncode == 1
    line = one_line_error(result)
    assert str(key) in line
    assert oct(mode)[2:] in line


def test_agent_refuses_a_key_others_can_read(tmp_path: Path, pki_dir: Path) -> None:
    key = tmp_path / "agent.key"
    key.write_bytes((pki_dir / "agents" / "host-a.key").read_bytes())
    os.chmod(key, 0o644)
    config = tmp_path / "agent.toml"
    config.write_text(
        f'spool_path = "{tmp_path}/spool.db"\n[tls]\ncert = "{pki_dir}/agents/host-a.pem"\n'
        f'key = "{key}"\nca = "{pki_dir}/ca.pem"\n'
    )
    result = meterd("agent", "run", "--config", str(config), timeout=30)
    assert result.returncode == 1
    assert str(key) in one_line_error(result)
    assert not (tmp_path / "spool.db").exists()
