"""Webhook subscriptions and their deliveries (:mod:`collector.webhooks`).

Operators read subscriptions and deliveries and replay them; admins create, enable,
disable and remove subscriptions (they decide where event data goes). A new
subscription's signing secret is in the answer to its creation and never again. Every
change is in the audit log (``webhook.create``, ``.enable``, ``.disable``,
``.remove``, ``.replay``).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from aiohttp import web

from collector.api.auth import caller
from collector.api.keys import WEBHOOKS
from collector.api.pagination import (
    PageQuery,
    TimePageQuery,
    decode_cursor,
    encode_cursor,
    int_key,
)
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Role, Routes, body_of, query_of, respond
from collector.webhooks.service import UnknownSubscription
from collector.webhooks.state import Delivery, SubscriptionSummary
from common.records import from_us

routes = Routes(tag="webhooks")

SUBSCRIPTION = {"subscription_id": "the subscription's id"}

DeliveryStatus = Literal["pending", "delivered", "dead"]


class Subscription(msgspec.Struct):
    """Where events go: ``event_types`` filters them (empty: every type); the counts
    are of its deliveries."""

    id: str
    url: str
    description: str
    event_types: list[str]
    enabled: bool
    created: datetime
    pending: int
    delivered: int
    dead: int
    last_delivered: datetime | None
    sequences: int


class SubscriptionPage(msgspec.Struct):
    items: list[Subscription]
    next_cursor: str | None


class NewSubscription(msgspec.Struct, forbid_unknown_fields=True):
    """An endpoint (https; plain http on loopback only unless configured) and the
    event types it wants (``invoice.finalized``, a group such as ``invoice.*``, or
    ``*``; none: every type). ``from_start`` also sends every event still in the
    outboxes; otherwise it takes events written from now on."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    event_types: list[Annotated[str, msgspec.Meta(min_length=1, max_length=100)]] = (
        msgspec.field(default_factory=list)
    )
    description: Annotated[str, msgspec.Meta(max_length=200)] = ""
    enabled: bool = True
    from_start: bool = False


class CreatedSubscription(msgspec.Struct):
    """The new subscription and its signing secret: shown this once."""

    subscription: Subscription
    secret: str


class DeliveryOut(msgspec.Struct):
    """One event queued for one subscription, in the subscription's sequence."""

    seq: int
    event_id: str
    event_type: str
    account: str
    status: DeliveryStatus
    attempts: int
    next_attempt: datetime | None
    last_attempt: datetime | None
    last_status: int | None
    last_error: str
    delivered: datetime | None
    payload: Any


class DeliveryPage(msgspec.Struct):
    items: list[DeliveryOut]
    next_cursor: str | None


class DeliveryQuery(PageQuery, kw_only=True, forbid_unknown_fields=True):
    status: DeliveryStatus | None = None


class Replay(msgspec.Struct, forbid_unknown_fields=True):
    """What to send again: the dead letters (``dead``), or every delivery from a
    sequence number or from an event's delivery on (exactly one of the three)."""

    dead: bool = False
    from_sequence: Annotated[int, msgspec.Meta(ge=1)] | None = None
    from_event: Annotated[str, msgspec.Meta(min_length=1, max_length=100)] | None = None


class Replayed(msgspec.Struct):
    queued: int


def _time(us: int) -> datetime | None:
    return from_us(us) if us else None


def subscription_out(s: SubscriptionSummary) -> Subscription:
    sub = s.subscription
    return Subscription(
        id=sub.id,
        url=sub.url,
        description=sub.description,
        event_types=list(sub.event_types),
        enabled=sub.enabled,
        created=from_us(sub.created_us),
        pending=s.pending,
        delivered=s.delivered,
        dead=s.dead,
        last_delivered=_time(s.last_delivered_us),
        sequences=s.sequences,
    )


def delivery_out(d: Delivery) -> DeliveryOut:
    try:
        payload = json.loads(d.body)
    except ValueError:
        payload = d.body
    return DeliveryOut(
        seq=d.seq,
        event_id=d.event_id,
        event_type=d.event_type,
        account=d.account_id,
        status=d.status,  # type: ignore[arg-type]
        attempts=d.attempts,
        next_attempt=_time(d.next_attempt_us) if d.status == "pending" else None,
        last_attempt=_time(d.last_attempt_us),
        last_status=d.last_status or None,
        last_error=d.last_error,
        delivered=_time(d.delivered_us),
        payload=payload,
    )


def _not_found(exc: UnknownSubscription) -> ApiProblem:
    return ApiProblem(ProblemType.WEBHOOK_NOT_FOUND, str(exc))


@routes.get(
    "/v1/webhooks",
    Role.OPERATOR,
    summary="Webhook subscriptions",
    description="Filtered by creation time; oldest first.",
    query=TimePageQuery,
    response=SubscriptionPage,
)
async def list_webhooks(request: web.Request) -> web.StreamResponse:
    q = query_of(request, TimePageQuery)
    start, end = q.time_range()
    after = decode_cursor("webhooks", q.cursor)
    if after is not None and not (
        isinstance(after, list) and len(after) == 2 and isinstance(after[0], int)
        and isinstance(after[1], str)
    ):
        raise ApiProblem(ProblemType.INVALID_CURSOR, "the cursor is not one this API made")
    summaries = sorted(
        (
            s for s in await request.app[WEBHOOKS].subscriptions()
            if start <= s.subscription.created_us < end
            and (after is None
                 or (s.subscription.created_us, s.subscription.id) > (after[0], after[1]))
        ),
        key=lambda s: (s.subscription.created_us, s.subscription.id),
    )
    page = summaries[: q.limit]
    last = page[-1].subscription if page else None
    return respond(
        SubscriptionPage(
            items=[subscription_out(s) for s in page],
            next_cursor=(encode_cursor("webhooks", [last.created_us, last.id])
                         if last and len(summaries) > q.limit else None),
        )
    )


@routes.post(
    "/v1/webhooks",
    Role.ADMIN,
    summary="Subscribe an endpoint to events",
    description=NewSubscription.__doc__ or "",
    body=NewSubscription,
    response=CreatedSubscription,
    status=201,
    errors=(422,),
)
async def create_webhook(request: web.Request) -> web.StreamResponse:
    body = await body_of(request, NewSubscription)
    service = request.app[WEBHOOKS]
    created = await service.create(
        body.url, event_types=body.event_types, description=body.description,
        enabled=body.enabled, from_start=body.from_start, actor=caller(request).actor,
    )
    summary = await service.get(created.subscription.id)
    return respond(CreatedSubscription(subscription_out(summary), created.secret), status=201)


@routes.get(
    "/v1/webhooks/{subscription_id}",
    Role.OPERATOR,
    summary="A webhook subscription and its delivery counts",
    path_params=SUBSCRIPTION,
    response=Subscription,
)
async def get_webhook(request: web.Request) -> web.StreamResponse:
    try:
        summary = await request.app[WEBHOOKS].get(request.match_info["subscription_id"])
    except UnknownSubscription as exc:
        raise _not_found(exc) from None
    return respond(subscription_out(summary))


async def _set_enabled(request: web.Request, enabled: bool) -> web.StreamResponse:
    service = request.app[WEBHOOKS]
    subscription_id = request.match_info["subscription_id"]
    try:
        await service.set_enabled(subscription_id, enabled, actor=caller(request).actor)
        summary = await service.get(subscription_id)
    except UnknownSubscription as exc:
        raise _not_found(exc) from None
    return respond(subscription_out(summary))


@routes.post(
    "/v1/webhooks/{subscription_id}/enable",
    Role.ADMIN,
    summary="Resume deliveries to a subscription",
    path_params=SUBSCRIPTION,
    response=Subscription,
)
async def enable_webhook(request: web.Request) -> web.StreamResponse:
    return await _set_enabled(request, True)


@routes.post(
    "/v1/webhooks/{subscription_id}/disable",
    Role.ADMIN,
    summary="Pause deliveries to a subscription (events keep queueing)",
    path_params=SUBSCRIPTION,
    response=Subscription,
)
async def disable_webhook(request: web.Request) -> web.StreamResponse:
    return await _set_enabled(request, False)


@routes.delete(
    "/v1/webhooks/{subscription_id}",
    Role.ADMIN,
    summary="Remove a subscription with its queued deliveries and dead letters",
    path_params=SUBSCRIPTION,
    status=204,
    response_description="Removed",
)
async def remove_webhook(request: web.Request) -> web.StreamResponse:
    try:
        await request.app[WEBHOOKS].remove(request.match_info["subscription_id"],
                                           actor=caller(request).actor)
    except UnknownSubscription as exc:
        raise _not_found(exc) from None
    return web.Response(status=204)


@routes.get(
    "/v1/webhooks/{subscription_id}/deliveries",
    Role.OPERATOR,
    summary="A subscription's deliveries, in sequence order",
    path_params=SUBSCRIPTION,
    query=DeliveryQuery,
    response=DeliveryPage,
)
async def webhook_deliveries(request: web.Request) -> web.StreamResponse:
    q = query_of(request, DeliveryQuery)
    subscription_id = request.match_info["subscription_id"]
    kind = f"deliveries:{subscription_id}"
    try:
        found = await request.app[WEBHOOKS].deliveries(
            subscription_id, status=q.status, after_seq=int_key(kind, q.cursor),
            limit=min(q.limit + 1, 1000),
        )
    except UnknownSubscription as exc:
        raise _not_found(exc) from None
    page = found[: q.limit]
    # The service answers at most 1000: a full page of 1000 may have more after it.
    more = len(found) > q.limit or len(found) == q.limit == 1000
    return respond(
        DeliveryPage(
            items=[delivery_out(d) for d in page],
            next_cursor=encode_cursor(kind, page[-1].seq) if more else None,
        )
    )


@routes.post(
    "/v1/webhooks/{subscription_id}/replay",
    Role.OPERATOR,
    summary="Send deliveries again, in order, with fresh tries",
    description=Replay.__doc__ or "",
    path_params=SUBSCRIPTION,
    body=Replay,
    response=Replayed,
    errors=(422,),
)
async def replay_webhook(request: web.Request) -> web.StreamResponse:
    body = await body_of(request, Replay)
    try:
        queued = await request.app[WEBHOOKS].replay(
            request.match_info["subscription_id"], dead=body.dead,
            from_sequence=body.from_sequence, from_event=body.from_event,
            actor=caller(request).actor,
        )
    except UnknownSubscription as exc:
        raise _not_found(exc) from None
    return respond(Replayed(queued))
