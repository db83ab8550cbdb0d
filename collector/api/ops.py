"""Operations: ``/readyz`` and ``/metrics`` (``/healthz`` is in :mod:`collector.api.meta`).

``/readyz`` is ready (200) only when every ledger shard answers a trivial query within
:data:`READY_TIMEOUT_SECONDS`; otherwise it answers 503 (``not-ready``) naming each
shard that did not. A load balancer or Kubernetes readiness probe takes a collector
out of rotation while one of its shards is down: agents then ship to another
collector, or wait in their spool.

``/metrics`` serves the Prometheus exposition (:mod:`collector.metrics`) in the format
the scraper's ``Accept`` header asks for. It is open by default, like most exporters,
because scrapers rarely carry credentials and the numbers name no account; it shows
shard names, host counts per status and rates. With ``[metrics] require_token = true``
it wants a bearer token like the rest of the API (any role; a token with only the
``ingest`` scope is refused), which Prometheus sends with
``authorization: {credentials: <token>}`` in its scrape configuration.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Literal

import msgspec
from aiohttp import web

from collector.api.auth import authenticate
from collector.api.keys import CONFIG, FLEET, SERVICE
from collector.api.problems import ApiProblem, ProblemType
from collector.api.registry import PUBLIC, Role, Routes, respond
from collector.ledger.store import LedgerStore
from collector.metrics import Metrics

routes = Routes(tag="operations")

# The collector's metrics; the daemon sets it. An app made without it (in tests)
# serves a registry of its own with the fleet gauges and nothing recorded.
METRICS = web.AppKey("metrics", Metrics)
_unrecorded: weakref.WeakKeyDictionary[web.Application, Metrics] = weakref.WeakKeyDictionary()

READY_TIMEOUT_SECONDS = 2.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


class ShardState(msgspec.Struct):
    name: str
    ready: bool
    error: str | None = None


class Ready(msgspec.Struct):
    """Every shard answered."""

    status: Literal["ready"]
    shards: list[ShardState]


async def _probe(store: LedgerStore) -> ShardState:
    try:
        await asyncio.wait_for(store.ping(), READY_TIMEOUT_SECONDS)
    except TimeoutError:
        return ShardState(store.name, False, f"no answer within {READY_TIMEOUT_SECONDS} s")
    except Exception as exc:  # noqa: BLE001 (whatever keeps a shard from answering: not ready)
        return ShardState(store.name, False, f"{type(exc).__name__}: {exc}")
    return ShardState(store.name, True)


@routes.get(
    "/readyz",
    PUBLIC,
    summary="Readiness: every ledger shard answers",
    description="503 `not-ready`, with each shard that did not answer, otherwise.",
    response=Ready,
)
async def readyz(request: web.Request) -> web.StreamResponse:
    stores = request.app[SERVICE]().ledger.stores
    states = list(await asyncio.gather(*(_probe(s) for s in stores)))
    down = [s for s in states if not s.ready]
    if down:
        raise ApiProblem(
            ProblemType.NOT_READY,
            f"{len(down)} of {len(states)} ledger shards do not answer",
            errors=[f"{s.name}: {s.error}" for s in down],
            headers={"Retry-After": "1"},
        )
    return respond(Ready("ready", states))


def metrics_of(app: web.Application) -> Metrics:
    metrics = app.get(METRICS)
    if metrics is None:
        metrics = _unrecorded.get(app)
        if metrics is None:
            metrics = _unrecorded[app] = Metrics(app[FLEET])
    return metrics


@routes.get(
    "/metrics",
    PUBLIC,
    summary="Prometheus metrics",
    description=(
        "The Prometheus text format (or OpenMetrics when the `Accept` header asks for it)."
        " Open unless `[metrics] require_token` is set; then it needs a bearer token with"
        " any role."
    ),
    response=str,
    media_type=PROMETHEUS_TEXT,
    errors=(401, 403),
)
async def metrics(request: web.Request) -> web.StreamResponse:
    if request.app[CONFIG]().raw.metrics.require_token:
        await _require_token(request)
    body, content_type = await metrics_of(request.app).render(request.headers.get("Accept", ""))
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _require_token(request: web.Request) -> None:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiProblem(ProblemType.UNAUTHORIZED, "send Authorization: Bearer <token>",
                         headers={"WWW-Authenticate": 'Bearer realm="meterd"'})
    principal = await authenticate(request.app[SERVICE]().ledger.control, token.strip())
    if principal is None:
        raise ApiProblem(
            ProblemType.UNAUTHORIZED, "the token is unknown or revoked",
            headers={"WWW-Authenticate": 'Bearer realm="meterd", error="invalid_token"'},
        )
    if not principal.may(Role.VIEWER):
        raise ApiProblem(ProblemType.FORBIDDEN, "/metrics needs a token with a role")


__all__ = ["METRICS", "metrics_of", "routes"]
