"""Webhook subscriptions as the CLI and the REST API manage them.

:class:`WebhookService` checks its input (raising :class:`ValidationError`, or
:class:`UnknownSubscription` for an id that does not exist, before anything changes),
applies the change on the control shard and appends its audit row
(:func:`collector.audit.append`: actions ``webhook.create``, ``webhook.enable``,
``webhook.disable``, ``webhook.remove``, ``webhook.replay``; target ``webhook/<id>``)
in the same transaction. A new subscription's secret is returned once, by
:meth:`WebhookService.create`, and never again: only its sealed form is stored.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from yarl import URL

from collector.audit import append
from collector.config import WebhooksConfig
from collector.ledger.service import ShardedLedger
from collector.ledger.store import LedgerTx
from collector.webhooks.payload import check_filters
from collector.webhooks.secretbox import SecretBox
from collector.webhooks.signing import new_secret
from collector.webhooks.state import (
    STATUSES,
    AuditHook,
    Delivery,
    Subscription,
    SubscriptionSummary,
    WebhookState,
    outbox_position,
)
from common.errors import ValidationError
from common.ids import new_id

MAX_URL_CHARS = 2048
MAX_DESCRIPTION_CHARS = 200
MAX_PAGE = 1000


class UnknownSubscription(ValidationError):
    """No webhook subscription has this id."""


@dataclass(frozen=True, slots=True)
class CreatedSubscription:
    subscription: Subscription
    secret: str  # shown once, at creation


def check_url(url: str, *, allow_plain_http: bool) -> str:
    """An endpoint URL: absolute https (or http on loopback, or anywhere when allowed),
    with a host and no credentials."""
    if len(url) > MAX_URL_CHARS:
        raise ValidationError(f"endpoint URL is longer than {MAX_URL_CHARS} characters")
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise ValidationError(f"endpoint URL {url!r} is not a URL ({exc})") from None
    if parsed.scheme not in ("https", "http") or not parsed.host:
        raise ValidationError(f"endpoint URL {url!r}: expected https://host/path")
    if parsed.user is not None or parsed.password is not None:
        raise ValidationError("endpoint URL must not carry credentials: the body is signed")
    if parsed.fragment:
        raise ValidationError("endpoint URL must not have a #fragment")
    if parsed.scheme == "http" and not allow_plain_http and not _loopback(parsed.host):
        raise ValidationError(
            f"endpoint URL {url!r}: plain http is accepted only on loopback; use https"
            " (or set [webhooks] allow_plain_http = true)"
        )
    return str(parsed)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _view(sub: Subscription) -> dict[str, Any]:
    """A subscription as the audit log records it (never its secret)."""
    return {"id": sub.id, "url": sub.url, "description": sub.description,
            "event_types": list(sub.event_types), "enabled": sub.enabled}


def _audit(
    actor: str, action: str, subscription_id: str, before: Any, after: Callable[[Any], Any]
) -> AuditHook:
    """The audit row of a change, appended in its transaction; ``after`` maps the
    change's result to the state recorded after it."""

    async def record(tx: LedgerTx, result: Any) -> None:
        await append(tx, actor, action, f"webhook/{subscription_id}", before, after(result),
                     at_us=time.time_ns() // 1000)

    return record


class WebhookService:
    def __init__(
        self,
        ledger: ShardedLedger,
        settings: WebhooksConfig,
        secrets_key_file: Path,
        *,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """``on_change`` is called after a replay or an enable (a worker's ``wake``)."""
        self.ledger = ledger
        self.settings = settings
        self.secrets_key_file = secrets_key_file
        self._on_change = on_change
        self._state: WebhookState | None = None

    async def state(self) -> WebhookState:
        if self._state is None:
            self._state = await WebhookState.open(self.ledger.control)
        return self._state

    async def create(
        self,
        url: str,
        *,
        event_types: Sequence[str] = (),
        description: str = "",
        enabled: bool = True,
        from_start: bool = False,
        actor: str,
    ) -> CreatedSubscription:
        """A new subscription, taking events written from now on (``from_start``: every
        event still in the outboxes as well)."""
        checked_url = check_url(url, allow_plain_http=self.settings.allow_plain_http)
        if isinstance(event_types, str):
            raise ValidationError("event types are a list of names, not one string")
        filters = check_filters(event_types)
        if len(description) > MAX_DESCRIPTION_CHARS:
            raise ValidationError(f"description is longer than {MAX_DESCRIPTION_CHARS} characters")
        box = SecretBox.load(self.secrets_key_file, create=True)
        state = await self.state()
        cursors = {}
        for store in self.ledger.stores:
            source, head = await outbox_position(store)
            cursors[source] = 0 if from_start else head
        sub = Subscription(new_id(), checked_url, description, filters, enabled,
                           time.time_ns() // 1000)
        secret = new_secret()
        await state.create(sub, box.seal(sub.id, secret), cursors,
                           _audit(actor, "webhook.create", sub.id, None, _view))
        self._changed()
        return CreatedSubscription(sub, secret)

    async def subscriptions(self) -> list[SubscriptionSummary]:
        return await (await self.state()).summaries()

    async def get(self, subscription_id: str) -> SubscriptionSummary:
        for summary in await self.subscriptions():
            if summary.subscription.id == subscription_id:
                return summary
        raise UnknownSubscription(f"no webhook subscription {subscription_id!r}")

    async def _existing(self, subscription_id: str) -> Subscription:
        sub = await (await self.state()).get(subscription_id)
        if sub is None:
            raise UnknownSubscription(f"no webhook subscription {subscription_id!r}")
        return sub

    async def set_enabled(self, subscription_id: str, enabled: bool, *, actor: str) -> Subscription:
        before = await self._existing(subscription_id)
        action = "webhook.enable" if enabled else "webhook.disable"
        after = await (await self.state()).set_enabled(
            subscription_id, enabled, _audit(actor, action, subscription_id, _view(before), _view)
        )
        if after is None:
            raise UnknownSubscription(f"no webhook subscription {subscription_id!r}")
        self._changed()
        return after

    async def remove(self, subscription_id: str, *, actor: str) -> None:
        """Delete the subscription, its cursors and its deliveries (dead letters too)."""
        before = await self._existing(subscription_id)
        removed = await (await self.state()).remove(
            subscription_id,
            _audit(actor, "webhook.remove", subscription_id, _view(before), lambda _: None),
        )
        if not removed:
            raise UnknownSubscription(f"no webhook subscription {subscription_id!r}")

    async def deliveries(
        self,
        subscription_id: str,
        *,
        status: str | None = None,
        after_seq: int = 0,
        limit: int = 100,
    ) -> list[Delivery]:
        """Deliveries in sequence order after ``after_seq`` (a cursor for paging)."""
        if status is not None and status not in STATUSES:
            raise ValidationError(
                f"unknown delivery status {status!r}: expected one of {', '.join(STATUSES)}"
            )
        if not 1 <= limit <= MAX_PAGE:
            raise ValidationError(f"limit must be between 1 and {MAX_PAGE}")
        await self._existing(subscription_id)
        return await (await self.state()).deliveries(
            subscription_id, status=status, after_seq=after_seq, limit=limit
        )

    async def replay(
        self,
        subscription_id: str,
        *,
        dead: bool = False,
        from_sequence: int | None = None,
        from_event: str | None = None,
        actor: str,
    ) -> int:
        """Send again, in sequence order, with fresh tries: the dead letters (``dead``),
        or every delivery from a sequence number or from an event's delivery on. The
        number of deliveries queued again. Receivers see the same ``webhook-id`` as
        before, so one that keeps the ids it processed will skip those it already has."""
        chosen = sum(1 for c in (dead, from_sequence is not None, from_event is not None) if c)
        if chosen != 1:
            raise ValidationError("replay what: the dead letters, from a sequence or from an"
                                  " event (exactly one)")
        if from_sequence is not None and from_sequence < 1:
            raise ValidationError("sequences start at 1")
        await self._existing(subscription_id)
        state = await self.state()
        start = from_sequence or 0
        if from_event is not None:
            found = await state.sequence_of(subscription_id, from_event)
            if found is None:
                raise ValidationError(
                    f"event {from_event!r} was never queued for subscription {subscription_id}"
                    " (it predates it, its filter skips it, or it was delivered and pruned)"
                )
            start = found
        what = {"dead": dead, "from_sequence": from_sequence, "from_event": from_event}
        queued = await state.replay(
            subscription_id, time.time_ns() // 1000, dead_only=dead, from_seq=start,
            audit=_audit(actor, "webhook.replay", subscription_id, what,
                         lambda n: {"queued": n}),
        )
        self._changed()
        return queued

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change()
