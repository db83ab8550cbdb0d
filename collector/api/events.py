"""``POST /v1/events``: usage from other systems as CloudEvents 1.0.

The event format, the ``data`` shape and how an event becomes a usage record are in
:mod:`collector.cloudevents`. Each event is posted through
:meth:`~collector.ledger.service.LedgerService.post` like agent records (deduplicated by
record id, rated, journaled in one transaction per shard); the answer comes after the
commit.

One event (structured or binary mode): 200 with its outcome (``accepted``,
``duplicate``, ``held`` while its host has no assignment, or ``quarantined`` when its
window ended beyond the maximum lateness), or 400 (``invalid-request``) saying what is
wrong with it. A batch: 200 with one result per event, in order, each one of those or
``rejected`` with its error; the valid events are posted whatever the others hold. A
body that is not JSON, or not an event or an array of events, is refused whole. Needs a
token with the ``ingest`` scope.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec
from aiohttp import web

from collector.api.keys import CLOCK, CONFIG, SERVICE
from collector.api.ops import metrics_of
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import Routes, Scope, respond
from collector.api.schemas import DecimalText
from collector.billing.quarantine import quarantine_records
from collector.cloudevents import (
    EventError,
    EventRouter,
    EventUsage,
    events_of,
    late_reason,
    to_usage,
    unique_by_record,
)
from collector.ledger.service import Outcome
from common import logs

log = logs.get("api.events")

routes = Routes(tag="events")

Text = Annotated[str, msgspec.Meta(min_length=1)]


class Window(msgspec.Struct, forbid_unknown_fields=True):
    start: datetime
    end: datetime


class UsageData(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """What was used: by a host (billed to whoever holds it then) or by an account."""

    account: str | None = None
    host: str | None = None
    metric: Annotated[str, msgspec.Meta(examples=["ip.dedicated_seconds"])]
    quantity: DecimalText
    unit: Literal["bytes", "seconds", "byte_seconds", "count", "requests"]
    window: Window | None = None
    labels: dict[str, str] | None = None


class CloudEvent(msgspec.Struct, kw_only=True):
    """A CloudEvents 1.0 event (JSON format) whose ``data`` is a usage report. Send it as
    ``application/cloudevents+json``, an array of them as
    ``application/cloudevents-batch+json`` (or either as ``application/json``), or in
    binary mode (``ce-*`` headers, ``data`` as the body)."""

    specversion: Literal["1.0"]
    id: Text
    source: Text
    type: Text
    time: datetime | None = None
    subject: str | None = None
    datacontenttype: str | None = None
    data: UsageData


Result = Literal["accepted", "duplicate", "held", "quarantined", "rejected"]


class EventResult(msgspec.Struct):
    """What became of one event: ``record_id`` is the usage record it became."""

    index: int
    source: str | None
    id: str | None
    record_id: str | None
    outcome: Result
    error: str | None = None


class EventsAnswer(msgspec.Struct):
    results: list[EventResult]
    accepted: int
    duplicate: int
    held: int
    quarantined: int
    rejected: int


_OUTCOMES: dict[Outcome, Result] = {
    Outcome.ACCEPTED: "accepted",
    Outcome.DUPLICATE: "duplicate",
    Outcome.HELD: "held",
}


@routes.post(
    "/v1/events",
    Scope.INGEST,
    summary="Report usage as CloudEvents (one, or a batch)",
    description=(
        "Deduplicated by `source` and `id`: the same event sent again is answered"
        " `duplicate` and counted once. A batch answers 200 with one result per event."
    ),
    body=CloudEvent,
    response=EventsAnswer,
)
async def post_events(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    config = request.app[CONFIG]()
    try:
        events, batch = events_of(request.headers.get("Content-Type", ""), request.headers, body)
    except EventError as exc:
        kind = (ProblemType.UNSUPPORTED_MEDIA_TYPE if exc.reason == "unsupported_media_type"
                else ProblemType.INVALID_REQUEST)
        raise ApiProblem(kind, str(exc)) from None
    limit = config.raw.ingest.max_batch_records
    if len(events) > limit:
        raise ApiProblem(ProblemType.INVALID_REQUEST,
                         f"batch of {len(events)} events exceeds the limit of {limit}")
    now_us = request.app[CLOCK]()
    results: dict[int, EventResult] = {}
    valid: list[tuple[int, EventUsage]] = []
    reasons: list[str] = []

    def reject(index: int, error: EventError) -> None:
        event = events[index]
        source = event.get("source") if isinstance(event, dict) else None
        event_id = event.get("id") if isinstance(event, dict) else None
        results[index] = EventResult(
            index, source if isinstance(source, str) else None,
            event_id if isinstance(event_id, str) else None, None, "rejected", str(error),
        )
        reasons.append(error.reason)

    for index, event in enumerate(events):
        try:
            valid.append((index, to_usage(event, now_us=now_us, limits=config.raw.ingest,
                                          accounts=config.terms)))
        except EventError as exc:
            reject(index, exc)
    if not batch and results:
        metrics_of(request.app).count_rejects("cloudevents", reasons)
        metrics_of(request.app).count_records("cloudevents", {"rejected": 1})
        raise ApiProblem(ProblemType.INVALID_REQUEST, results[0].error or "invalid event")
    unique, repeats = unique_by_record(valid, reject)
    service = request.app[SERVICE]()
    events_service = service.routed_by(EventRouter(service.router, config.terms))
    timely = [u.record for _, u in unique if not u.late]
    late = [u.record for _, u in unique if u.late]
    outcomes: dict[str, Outcome] = {}
    if timely:
        async with service.busy():  # routed with this service's assignments
            outcomes = await events_service.post(timely, now_us)
    if late:
        reason = late_reason(config.raw.ingest)
        kept = await quarantine_records(events_service, late,
                                        dict.fromkeys((r.id for r in late), reason), now_us)
        outcomes.update({i: o for i, o in kept.items() if o is Outcome.DUPLICATE})
        quarantined = {i for i, o in kept.items() if o is not Outcome.DUPLICATE}
    else:
        quarantined = set()
    for index, usage in unique:
        rid = usage.record.id
        outcome: Result = "quarantined" if rid in quarantined else _OUTCOMES[outcomes[rid]]
        results[index] = EventResult(index, usage.source, usage.event_id, rid, outcome)
    for index, first in repeats.items():
        original = results[first]
        results[index] = EventResult(index, original.source, original.id, original.record_id,
                                     "duplicate")
    ordered = [results[i] for i in range(len(events))]
    counts = {r: sum(1 for x in ordered if x.outcome == r)
              for r in ("accepted", "duplicate", "held", "quarantined", "rejected")}
    metrics = metrics_of(request.app)
    metrics.count_records("cloudevents", {
        "accepted": counts["accepted"] + counts["held"] + counts["quarantined"],
        "duplicate": counts["duplicate"],
        "rejected": counts["rejected"],
    })
    metrics.count_rejects("cloudevents", reasons)
    log.info("events_ingested", events=len(events), batch=batch, **counts)
    return respond(EventsAnswer(ordered, counts["accepted"], counts["duplicate"], counts["held"],
                                counts["quarantined"], counts["rejected"]))
