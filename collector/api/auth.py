"""Bearer API tokens: create, revoke, authenticate.

A token is ``mtd_`` followed by 43 characters (32 random bytes, base64url). Only its
SHA-256 is stored, on the control shard (a slow password hash adds nothing for a
256-bit random secret); the token itself is shown once, when it is made. Each token
has a name, a role (``viewer``, ``billing``, ``operator`` or ``admin``; see
:class:`collector.api.registry.Role`) and optional scopes (``ingest``); a token made
only to send usage events may hold the ``ingest`` scope and no role.

Every request looks its token up in the database: nothing is cached, so a revoked
token is refused from the next request on, in every collector sharing the ledger.
Revocation is permanent (the database refuses to un-revoke or delete a token).

Agents never hold API tokens: they authenticate to the gRPC ingest port with their
mTLS client certificate, and the REST API accepts only bearer tokens, so an agent's
certificate and key open nothing here.

Creating and revoking a token writes an audit row in the same transaction.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass

from aiohttp import web

from collector import audit
from collector.api.registry import Role, Scope
from collector.ledger.store import ApiToken, LedgerStore
from common.errors import ValidationError
from common.ids import new_id

TOKEN_PREFIX = "mtd_"  # noqa: S105 (a prefix, not a secret)
_TOKEN_RE = re.compile(r"mtd_[A-Za-z0-9_-]{43}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._@:/-]{0,63}")


class TokenError(ValidationError):
    """A token request that cannot be carried out (bad name, unknown id, ...)."""


class TokenNotFound(TokenError):
    pass


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's id, name, role and scopes."""

    token_id: str
    name: str
    role: Role | None
    scopes: frozenset[Scope]

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"token:{self.name}/{self.token_id}"

    def may(self, access: Role | Scope) -> bool:
        if isinstance(access, Scope):
            return access in self.scopes
        return self.role is not None and self.role >= access


PRINCIPAL = web.RequestKey("principal", Principal)


def caller(request: web.Request) -> Principal:
    """The authenticated caller of a route that needs a token."""
    return request[PRINCIPAL]


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def new_secret() -> str:
    raw = secrets.token_bytes(32)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def parse_scopes(texts: list[str]) -> tuple[str, ...]:
    known = {s.value for s in Scope}
    for text in texts:
        if text not in known:
            raise TokenError(f"unknown scope {text!r}: expected one of {', '.join(sorted(known))}")
    return tuple(sorted(set(texts)))


def principal_of(token: ApiToken) -> Principal:
    role = Role.parse(token.role) if token.role else None
    return Principal(token.token_id, token.name, role, frozenset(Scope(s) for s in token.scopes))


def describe(token: ApiToken) -> dict[str, object]:
    """A token as the audit log and ``token list`` show it (never its secret)."""
    return {
        "token_id": token.token_id,
        "name": token.name,
        "role": token.role,
        "scopes": list(token.scopes),
        "created_us": token.created_us,
        "created_by": token.created_by,
        "revoked_us": token.revoked_us,
        "revoked_by": token.revoked_by,
    }


async def create_token(
    store: LedgerStore,
    *,
    name: str,
    role: Role | None,
    scopes: tuple[str, ...],
    actor: str,
    now_us: int,
) -> tuple[ApiToken, str]:
    """Make a token; returns it as stored and its secret (to show once)."""
    if not _NAME_RE.fullmatch(name):
        raise TokenError(
            f"token name {name!r}: 1 to 64 characters, letters, digits, space and ._@:/-"
        )
    scopes = parse_scopes(list(scopes))
    if role is None and not scopes:
        raise TokenError("a token needs a role, a scope, or both")
    secret = new_secret()
    token = ApiToken(
        token_id=new_id(),
        name=name,
        role=role.label if role else "",
        scopes=scopes,
        created_us=now_us,
        created_by=actor,
    )
    async with store.transaction() as tx:
        await tx.insert_token(token, hash_token(secret))
        await audit.append(tx, actor, "token.create", f"token/{token.token_id}", None,
                           describe(token), at_us=now_us)
    return token, secret


async def revoke_token(store: LedgerStore, token_id: str, *, actor: str, now_us: int) -> ApiToken:
    """Revoke a token (at once and for good); revoking a revoked token changes nothing."""
    async with store.transaction() as tx:
        before = await tx.get_token(token_id)
        if before is None:
            raise TokenNotFound(f"no API token with id {token_id!r}")
        if before.revoked_us is not None:
            return before
        await tx.revoke_token(token_id, now_us, actor)
        after = await tx.get_token(token_id)
        assert after is not None
        await audit.append(tx, actor, "token.revoke", f"token/{token_id}", describe(before),
                           describe(after), at_us=now_us)
    return after


async def authenticate(store: LedgerStore, token: str) -> Principal | None:
    """The caller a bearer token names, or ``None`` for an unknown or revoked token."""
    if not _TOKEN_RE.fullmatch(token):
        return None
    found = await store.find_token(hash_token(token))
    if found is None or found.revoked_us is not None:
        return None
    return principal_of(found)
