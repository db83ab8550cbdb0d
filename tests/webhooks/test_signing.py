"""Secrets: strong, sealed at rest under a key file; signatures a receiver can check."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from collector.webhooks.secretbox import SecretBox
from collector.webhooks.signing import new_secret, secret_key, signed_headers
from common.errors import SecurityError, ValidationError


def test_secrets_are_32_random_bytes_in_the_standard_form() -> None:
    secrets = {new_secret() for _ in range(50)}
    assert len(secrets) == 50
    for s in secrets:
        assert s.startswith("whsec_")
        assert len(base64.b64decode(s.removeprefix("whsec_"))) == 32
    with pytest.raises(ValidationError):
        secret_key("not-a-secret")


def test_a_receiver_verifies_the_signature_and_rejects_tampering_and_replays() -> None:
    secret = new_secret()
    body = b'{"type":"usage.late","data":{"q":"1.50"}}'
    now = int(time.time())
    headers = signed_headers(secret, "evt_1", now, body)
    assert headers["webhook-signature"].startswith("v1,")
    assert Webhook(secret).verify(body, headers) == {"type": "usage.late", "data": {"q": "1.50"}}
    with pytest.raises(WebhookVerificationError):  # the body changed on the way
        Webhook(secret).verify(body.replace(b"1.50", b"9.50"), headers)
    with pytest.raises(WebhookVerificationError):  # another subscription's secret
        Webhook(new_secret()).verify(body, headers)
    old = signed_headers(secret, "evt_1", now - 3600, body)
    with pytest.raises(WebhookVerificationError, match="too old"):  # a captured request replayed
        Webhook(secret).verify(body, old)


def test_sealed_secrets_open_only_with_their_key_and_subscription(tmp_path: Path) -> None:
    key_file = tmp_path / "webhook-secrets.key"
    box = SecretBox.load(key_file, create=True)
    assert key_file.stat().st_mode & 0o777 == 0o600
    secret = new_secret()
    sealed = box.seal("sub-1", secret)
    assert secret not in sealed
    assert SecretBox.load(key_file).unseal("sub-1", sealed) == secret
    with pytest.raises(SecurityError, match="moved from another subscription"):
        box.unseal("sub-2", sealed)
    other = SecretBox.load(tmp_path / "other.key", create=True)
    with pytest.raises(SecurityError, match="sealed with key"):
        other.unseal("sub-1", sealed)


def test_a_key_file_others_can_read_is_refused(tmp_path: Path) -> None:
    key_file = tmp_path / "webhook-secrets.key"
    SecretBox.load(key_file, create=True)
    os.chmod(key_file, 0o644)
    with pytest.raises(SecurityError, match="mode 0644"):
        SecretBox.load(key_file)
    with pytest.raises(SecurityError, match="does not exist"):
        SecretBox.load(tmp_path / "missing.key")


def test_a_key_file_that_cannot_be_made_is_one_clear_error(tmp_path: Path) -> None:
    not_a_folder = tmp_path / "tls"
    not_a_folder.write_text("a file where the key's folder should be")
    with pytest.raises(SecurityError, match="cannot create the webhook secrets key"):
        SecretBox.load(not_a_folder / "webhook-secrets.key", create=True)
