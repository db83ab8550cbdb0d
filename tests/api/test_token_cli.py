"""``meterd token create|revoke|list``, and a revoked token refused at once by a running
collector."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from common.cli import main
from tests.harness import CollectorProcess, collector_config, meterd


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_create_list_revoke(
    tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = str(collector_config(tmp_path, pki_dir))
    code, out, err = run(capsys, "token", "create", "--config", config, "--name", "crm",
                         "--role", "billing", "--scope", "ingest")
    assert code == 0
    secret = out.strip()
    assert secret.startswith("mtd_")
    assert len(secret) == 47
    assert "shown only once" in err
    code, out, _ = run(capsys, "token", "list", "--config", config, "--json")
    (listed,) = [json.loads(line) for line in out.splitlines()]
    assert (listed["name"], listed["role"], listed["scopes"]) == ("crm", "billing", ["ingest"])
    assert listed["revoked_us"] is None
    assert secret not in out
    assert listed["created_by"].startswith("cli:")
    code, out, _ = run(capsys, "token", "revoke", "--config", config, listed["token_id"])
    assert code == 0
    assert "revoked token" in out
    code, out, _ = run(capsys, "token", "list", "--config", config)
    assert "revoked 20" in out
    # Only its hash is stored.
    assert secret.encode() not in (tmp_path / "ledger.db").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["create", "--name", "x"], "a token needs a role, a scope, or both"),
        (["create", "--name", "bad\nname", "--role", "admin"], "token name"),
        (["revoke", "0000"], "no API token with id '0000'"),
    ],
)
def test_mistakes_are_one_line_and_change_nothing(
    tmp_path: Path, pki_dir: Path, capsys: pytest.CaptureFixture[str], args: list[str],
    message: str,
) -> None:
    config = str(collector_config(tmp_path, pki_dir))
    code, out, err = run(capsys, "token", args[0], "--config", config, *args[1:])
    assert code == 1
    assert out == ""
    assert err.count("\n") == 1
    assert message in err
    code, out, _ = run(capsys, "token", "list", "--config", config)
    assert out == ""


def test_a_running_collector_refuses_a_revoked_token_at_once(
    tmp_path: Path, pki_dir: Path
) -> None:
    config = collector_config(tmp_path, pki_dir)
    with CollectorProcess(config) as collector:
        made = meterd("token", "create", "--config", str(config), "--name", "ops",
                      "--role", "viewer")
        assert made.returncode == 0, made.stderr
        secret = made.stdout.strip()

        def status() -> int:
            request = urllib.request.Request(
                f"http://127.0.0.1:{collector.api_port}/v1/accounts",
                headers={"Authorization": f"Bearer {secret}"},
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as r:  # noqa: S310 (loopback)
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                refused = exc
            with refused:  # its response holds the connection
                assert refused.headers["Content-Type"] == "application/problem+json"
                return refused.code

        assert status() == 200
        listed = meterd("token", "list", "--config", str(config), "--json")
        token_id = json.loads(listed.stdout.splitlines()[0])["token_id"]
        revoked = meterd("token", "revoke", "--config", str(config), token_id)
        assert revoked.returncode == 0, revoked.stderr
        assert status() == 401
