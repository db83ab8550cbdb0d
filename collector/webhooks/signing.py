"""Signing deliveries the Standard Webhooks way (https://www.standardwebhooks.com).

Each request carries::

    webhook-id:        the event id (the same on every retry and replay)
    webhook-timestamp: Unix seconds when this attempt was signed
    webhook-signature: v1,<base64 of HMAC-SHA256(key, "<id>.<timestamp>.<body>")>

where ``key`` is the base64-decoded part of the subscription secret after ``whsec_``.
A receiver recomputes the HMAC over the exact body bytes, compares in constant time,
and rejects a timestamp too far from its clock (five minutes, by the standard's
libraries): a captured request replayed later fails. The scheme is a few lines of
``hmac``; the tests check it with the ``standardwebhooks`` library, as a receiver would.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets

from common.errors import ValidationError

SECRET_PREFIX = "whsec_"  # noqa: S105 (the standard's prefix, not a secret)
SECRET_BYTES = 32


def new_secret() -> str:
    """A new subscription secret: ``whsec_`` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def secret_key(secret: str) -> bytes:
    """The HMAC key of a ``whsec_...`` secret."""
    if not secret.startswith(SECRET_PREFIX):
        raise ValidationError(f"a webhook secret starts with {SECRET_PREFIX!r}")
    try:
        key = base64.b64decode(secret[len(SECRET_PREFIX):], validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("a webhook secret is base64 after its prefix") from None
    if len(key) < 24:
        raise ValidationError("a webhook secret holds at least 24 bytes")
    return key


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` header value for one attempt."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature(secret, msg_id, timestamp, body),
    }
