"""Subscription secrets at rest: encrypted with a key that lives in a file, not the database.

The worker needs each subscription's secret in clear to sign with it, so it cannot be
stored as a one-way hash the way API tokens are. It is stored sealed instead:
AES-256-GCM under a 32-byte key read from ``[webhooks] secrets_key_file`` (mode 0600,
refused if group or others may read it), with the subscription id as associated data
so a sealed secret cannot be moved to another subscription. A copy of the database
(a backup, a replica, a dump) therefore does not reveal any secret; the key file does,
so treat it like a TLS private key, and give every collector of one ledger the same
file. ``meterd webhook add`` creates the file when it is missing.

Sealed form: ``v1:<key id>:<base64(nonce || ciphertext)>``; the key id (the first 16
hex digits of the key's SHA-256) names the key a secret was sealed with, so a wrong
key file is reported as such.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from common.errors import SecurityError
from common.pki import check_private_key_file

KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = "v1"


class SecretBox:
    def __init__(self, key: bytes, path: Path) -> None:
        if len(key) != KEY_BYTES:
            raise SecurityError(f"webhook secrets key {path}: expected {KEY_BYTES} bytes")
        self._aead = AESGCM(key)
        self.path = path
        self.key_id = hashlib.sha256(key).hexdigest()[:16]

    @classmethod
    def load(cls, path: Path, *, create: bool = False) -> SecretBox:
        """The key in ``path`` (base64 text); with ``create``, a new key if there is none."""
        if create and not path.exists():
            try:
                cls._create(path)
            except OSError as exc:
                raise SecurityError(
                    f"cannot create the webhook secrets key {path}: {exc.strerror}"
                ) from None
        check_private_key_file(path)
        try:
            key = base64.b64decode(path.read_text(encoding="ascii").strip(), validate=True)
        except (OSError, UnicodeDecodeError, binascii.Error, ValueError):
            raise SecurityError(
                f"webhook secrets key {path}: expected {KEY_BYTES} bytes in base64"
            ) from None
        return cls(key, path)

    @staticmethod
    def _create(path: Path) -> None:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        with contextlib.suppress(FileExistsError):  # another process made it first
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(base64.b64encode(key).decode() + "\n")
                f.flush()
                os.fsync(f.fileno())

    def seal(self, subscription_id: str, secret: str) -> str:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._aead.encrypt(nonce, secret.encode(), subscription_id.encode())
        return f"{VERSION}:{self.key_id}:{base64.b64encode(nonce + sealed).decode()}"

    def unseal(self, subscription_id: str, sealed: str) -> str:
        version, key_id, payload = [*sealed.split(":", 2), "", ""][:3]
        if version != VERSION:
            raise SecurityError(f"webhook subscription {subscription_id}: unknown secret format")
        if key_id != self.key_id:
            raise SecurityError(
                f"webhook subscription {subscription_id}: its secret was sealed with key"
                f" {key_id}, but {self.path} holds key {self.key_id}"
            )
        try:
            raw = base64.b64decode(payload, validate=True)
            plain = self._aead.decrypt(
                raw[:NONCE_BYTES], raw[NONCE_BYTES:], subscription_id.encode()
            )
        except (binascii.Error, ValueError, InvalidTag):
            raise SecurityError(
                f"webhook subscription {subscription_id}: its sealed secret does not open"
                f" with {self.path} (altered, or moved from another subscription)"
            ) from None
        return plain.decode()
