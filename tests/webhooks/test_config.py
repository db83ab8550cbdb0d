"""The [webhooks] section and balance thresholds: defaults, and one clear line per mistake."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from collector.config import balance_thresholds, load_collector_config
from common.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "collector.toml"
    path.write_text(text)
    return path


def test_defaults_and_thresholds(tmp_path: Path) -> None:
    cfg = load_collector_config(write(tmp_path, """
[accounts.acme]
currency = "EUR"
balance_thresholds = ["500.00", "100.00"]

[accounts.globex]
"""))
    w = cfg.raw.webhooks
    assert (w.max_attempts, w.backoff_base_seconds, w.backoff_cap_seconds) == (
        18, Decimal(5), Decimal(21600)
    )
    limits = balance_thresholds(cfg)
    assert set(limits) == {"acme"}
    assert limits["acme"].currency == "eur"
    assert limits["acme"].amounts == (Decimal("100.00"), Decimal("500.00"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[webhooks]\nmax_attempts = 0", "webhooks.max_attempts: must be at least 1"),
        ("[webhooks]\ntimeout_seconds = 1.5", "webhooks.timeout_seconds: expected a decimal"
         " string such as \"1.5\", got a float"),
        ("[webhooks]\nbackoff_base_seconds = \"60\"\nbackoff_cap_seconds = \"10\"",
         "webhooks.backoff_cap_seconds: must be at least webhooks.backoff_base_seconds"),
        ("[webhooks]\npoll_interval_seconds = \"0\"",
         "webhooks.poll_interval_seconds: must be more than 0"),
        ("[webhooks]\nretries = 3", "webhooks.retries: unknown key"),
        ("[accounts.acme]\nbalance_thresholds = [100.0]",
         "accounts.acme.balance_thresholds[0]: expected a decimal string"),
        ("[accounts.acme]\nbalance_thresholds = [\"100\", \"100.00\"]",
         "accounts.acme.balance_thresholds: each threshold may appear once"),
    ],
)
def test_mistakes_name_the_key(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_collector_config(path)
    assert str(caught.value).startswith(f"{path}: {message}")
