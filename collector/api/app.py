"""The app factory: every declared route, authentication, problem documents.

:data:`ROUTE_TABLES` lists the :class:`~collector.api.registry.Routes` of every module
that serves part of the API; :func:`build_app` adds them all to one aiohttp
application, checks each request's bearer token against the route's access, and turns
every error into ``application/problem+json``. The OpenAPI document is built from the
same tables when the app is made.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from collector.api import (
    accounts,
    audit_routes,
    billing_routes,
    events,
    fleet_routes,
    hosts,
    journal,
    meta,
    ops,
    reports,
    token_routes,
    ui,
    usage,
    webhook_routes,
    whoami,
)
from collector.api.auth import PRINCIPAL, authenticate
from collector.api.keys import BILLING, CLOCK, CONFIG, FLEET, OPENAPI, SERVICE, WEBHOOKS
from collector.api.openapi import build_document
from collector.api.problems import (
    ApiProblem,
    ProblemType,
    from_http_exception,
    problem_response,
)
from collector.api.registry import (
    AUTHENTICATED,
    PUBLIC,
    ROUTE,
    Route,
    Routes,
    access_label,
)
from collector.audit import now_us
from collector.billing.service import BillingService, billing_service
from collector.config import LoadedCollectorConfig
from collector.fleet import Fleet
from collector.ledger.service import LedgerService
from collector.pricing import AccountPrices
from collector.webhooks.service import WebhookService
from common import logs
from common.cli import meterd_version
from common.errors import MeterdError, StoreUnavailable, ValidationError

log = logs.get("api")

MAX_BODY_BYTES = 1024**2

# Every module serving part of the API, in the order their routes are added.
ROUTE_TABLES: tuple[Routes, ...] = (
    meta.routes,
    accounts.routes,
    usage.routes,
    journal.routes,
    hosts.routes,
    token_routes.routes,
    audit_routes.routes,
    webhook_routes.routes,
    billing_routes.routes,
    fleet_routes.routes,  # fleet health, /metrics, /readyz and CloudEvents ingest
    ops.routes,
    events.routes,
    reports.routes,  # revenue per month, an account's late adjustments
    whoami.routes,  # the caller's token, for any valid token
    ui.routes,  # the web dashboard's files (/ui, public: they hold no data)
)

_ROUTES: web.AppKey[dict[AbstractRoute, Route]] = web.AppKey("routes")

_BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="meterd"'}
_INVALID_TOKEN = {"WWW-Authenticate": 'Bearer realm="meterd", error="invalid_token"'}


@web.middleware
async def problems(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
    """Every error as a problem document, in this one place."""
    announced = request.content_length
    if announced is not None and announced > MAX_BODY_BYTES:
        # Refused from the header: never wait for a body that is too large anyway.
        return problem_response(
            ProblemType.PAYLOAD_TOO_LARGE,
            f"the body announces {announced} bytes; the limit is {MAX_BODY_BYTES}",
            instance=request.path,
        )
    try:
        response: web.StreamResponse = await handler(request)  # type: ignore[misc]
        return response
    except ApiProblem as exc:
        return problem_response(exc.kind, exc.detail, instance=request.path,
                                errors=exc.errors, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return from_http_exception(exc, request.path)
    except StoreUnavailable as exc:
        log.warning("api_ledger_unavailable", path=request.path, error=str(exc))
        return problem_response(ProblemType.LEDGER_UNAVAILABLE, str(exc), instance=request.path,
                                headers={"Retry-After": "1"})
    except ValidationError as exc:
        return problem_response(ProblemType.UNPROCESSABLE, str(exc), instance=request.path)
    except MeterdError as exc:
        log.error("api_error", path=request.path, error=str(exc))
        return problem_response(ProblemType.INTERNAL, str(exc), instance=request.path)
    except ConnectionResetError:
        # The client went away mid-request: there is no one left to answer.
        log.info("api_client_gone", method=request.method, path=request.path)
        raise
    except Exception:  # the API's edge: a bug still answers problem+json
        log.exception("api_internal_error", method=request.method, path=request.path)
        return problem_response(ProblemType.INTERNAL, instance=request.path)


@web.middleware
async def authorize(request: web.Request, handler: Callable[..., object]) -> web.StreamResponse:
    """Find the declared route, check the bearer token against its access."""
    route = request.app[_ROUTES].get(request.match_info.route)
    if route is not None:
        request[ROUTE] = route
        if route.access is not PUBLIC:
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise ApiProblem(ProblemType.UNAUTHORIZED, "send Authorization: Bearer <token>",
                                 headers=_BEARER_CHALLENGE)
            store = request.app[SERVICE]().ledger.control
            principal = await authenticate(store, token.strip())
            if principal is None:
                raise ApiProblem(ProblemType.UNAUTHORIZED, "the token is unknown or revoked",
                                 headers=_INVALID_TOKEN)
            if route.access is not AUTHENTICATED and not principal.may(route.access):
                raise ApiProblem(
                    ProblemType.FORBIDDEN,
                    f"{route.method} {route.path} needs {access_label(route.access)};"
                    f" this token has {principal.role.label if principal.role else 'no role'}",
                )
            request[PRINCIPAL] = principal
    response: web.StreamResponse = await handler(request)  # type: ignore[misc]
    return response


def declared_routes(tables: Sequence[Routes] = ROUTE_TABLES) -> list[Route]:
    routes = [r for table in tables for r in table.routes]
    seen: set[tuple[str, str]] = set()
    for r in routes:
        if (r.method, r.path) in seen:
            raise ValueError(f"{r.method} {r.path} is declared twice")
        seen.add((r.method, r.path))
    return routes


def current_billing(
    service: Callable[[], LedgerService], config: Callable[[], LoadedCollectorConfig]
) -> Callable[[], BillingService]:
    """The billing service of the ledger service and configuration in force, made once
    per pair (both are swapped whole on SIGHUP)."""
    made: list[tuple[LedgerService, LoadedCollectorConfig, BillingService]] = []

    def current() -> BillingService:
        svc, cfg = service(), config()
        if made and made[0][0] is svc and made[0][1] is cfg:
            return made[0][2]
        if not isinstance(svc.prices, AccountPrices):
            raise TypeError("the billing service needs the ledger service's tariff")
        billing = billing_service(cfg, svc, svc.prices.tariff)
        made[:] = [(svc, cfg, billing)]
        return billing

    return current


def build_app(
    service: Callable[[], LedgerService],
    fleet: Fleet,
    config: Callable[[], LoadedCollectorConfig],
    *,
    clock: Callable[[], int] = now_us,
    tables: Sequence[Routes] = ROUTE_TABLES,
    webhooks: WebhookService | None = None,
    billing: Callable[[], BillingService] | None = None,
) -> web.Application:
    """The REST API application. ``service`` and ``config`` return what is in force now
    (the daemon swaps both on SIGHUP). ``webhooks`` manages subscriptions; without one,
    one is made from the configuration's ``[webhooks]`` (a delivery worker then finds
    replays and re-enabled subscriptions at its next poll rather than at once).
    ``billing`` returns the billing service in force; without it, one is made from the
    ledger service and configuration in force, again whenever either changes."""
    app = web.Application(middlewares=[problems, authorize], client_max_size=MAX_BODY_BYTES)
    app[SERVICE] = service
    app[FLEET] = fleet
    app[CONFIG] = config
    app[CLOCK] = clock
    if webhooks is None:
        cfg = config()
        webhooks = WebhookService(service().ledger, cfg.raw.webhooks,
                                  cfg.path(cfg.raw.webhooks.secrets_key_file))
    app[WEBHOOKS] = webhooks
    app[BILLING] = billing or current_billing(service, config)
    declared = declared_routes(tables)
    by_route: dict[AbstractRoute, Route] = {}
    for route in declared:
        by_route[app.router.add_route(route.method, route.path, route.handler)] = route
    app[_ROUTES] = by_route
    app[OPENAPI] = meta.encode_document(build_document(declared, version=meterd_version()))
    return app
