"""``meterd webhook ...`` on the embedded ledger: the secret once, clear errors, audited."""

from __future__ import annotations

import asyncio
import getpass
import json
from pathlib import Path

import pytest

from collector.ledger.sqlite_store import SqliteLedger
from common.cli import main


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text('[ledger]\nsqlite_path = "ledger.db"\n\n[accounts.acme]\ncurrency = "eur"\n')
    return path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["webhook", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_webhook_commands(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(config)]
    code, out, _ = run(capsys, "add", *c, "https://hooks.example.com/meterd", "--event",
                       "invoice.*", "--event", "agent.silent", "--description", "billing", "--json")
    assert code == 0
    created = json.loads(out)
    sub_id, secret = created["id"], created["secret"]
    assert secret.startswith("whsec_")
    assert created["event_types"] == ["invoice.*", "agent.silent"]
    key_file = config.parent / "tls" / "webhook-secrets.key"  # the default, made by add
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.parent.stat().st_mode & 0o777 == 0o700

    for bad, message in [
        (["http://10.0.0.5/hook"], "plain http is accepted only on loopback"),
        (["https://user:pw@hooks.example.com/"], "must not carry credentials"),
        (["ftp://hooks.example.com/"], "expected https://host/path"),
        (["https://hooks.example.com/", "--event", "invoice.paid"], "unknown event type"),
    ]:
        code, out, err = run(capsys, "add", *c, *bad)
        assert code == 1
        assert err.count("\n") == 1
        assert message in err
        assert out == ""

    code, out, _ = run(capsys, "list", *c, "--json")
    [listed] = [json.loads(line) for line in out.splitlines()]
    assert listed["id"] == sub_id
    assert (listed["enabled"], listed["pending"], listed["dead"]) == (True, 0, 0)
    assert secret not in out
    code, out, _ = run(capsys, "list", *c)
    assert secret not in out
    assert "https://hooks.example.com/meterd" in out

    assert run(capsys, "deliveries", *c, sub_id)[1] == "no deliveries\n"
    assert run(capsys, "replay", *c, sub_id, "--dead")[1].startswith("0 deliveries queued again")
    assert run(capsys, "disable", *c, sub_id)[1] == f"subscription {sub_id} disabled\n"
    assert run(capsys, "enable", *c, sub_id)[1] == f"subscription {sub_id} enabled\n"

    code, _, err = run(capsys, "replay", *c, sub_id, "--from-event", "nope")
    assert code == 1
    assert "was never queued" in err
    code, _, err = run(capsys, "remove", *c, "no-such-id")
    assert code == 1
    assert "no webhook subscription 'no-such-id'" in err

    assert run(capsys, "remove", *c, sub_id)[0] == 0
    assert run(capsys, "list", *c)[1] == "no webhook subscriptions\n"

    async def audit() -> list[tuple[str, str, str]]:
        store = await SqliteLedger.open(config.parent / "ledger.db")
        try:
            rows = await store.audit_rows(from_us=0, to_us=2**62, after_seq=0, limit=None)
        finally:
            await store.close()
        return [(r.actor, r.action, r.target) for r in rows]

    actor = f"cli:{getpass.getuser()}"
    target = f"webhook/{sub_id}"
    assert asyncio.run(audit()) == [
        (actor, action, target)
        for action in ("webhook.create", "webhook.replay", "webhook.disable",
                       "webhook.enable", "webhook.remove")
    ]
