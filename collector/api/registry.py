"""Routes of the REST API, each with who may call it and its OpenAPI description.

A module that serves part of the API keeps one :class:`Routes` and declares each
route on it with the method, the path, the access it needs and its description::

    routes = Routes(tag="accounts")

    @routes.get(
        "/v1/accounts/{account}",
        Role.VIEWER,
        summary="An account and its billing settings",
        path_params={"account": "account id"},
        response=Account,
    )
    async def get_account(request: web.Request) -> web.StreamResponse:
        ...
        return respond(Account(...))

and lists that ``Routes`` in :data:`collector.api.app.ROUTE_TABLES`. The app factory
adds every declared route to aiohttp, the auth middleware enforces its access, and
``/v1/openapi.json`` is generated from the same declarations, so a route cannot be
served undocumented or documented without being served (a test walks both ways).

Access is a :class:`Role` (``viewer < billing < operator < admin``: a role includes
those below it), the :class:`Scope` ``ingest`` (held by tokens made for event
ingest, whatever their role), :data:`AUTHENTICATED` (any valid token, whatever its
role and scopes: who am I) or :data:`PUBLIC` (no token: health, the OpenAPI
document).

Query strings and JSON bodies are declared as ``msgspec.Struct`` types and read with
:func:`query_of` and :func:`body_of`, which refuse a type other than the declared
one, so the description and the code cannot drift apart. Invalid input becomes a
problem document (``invalid-request`` or ``malformed-json``) before the handler goes on.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypedDict, TypeVar, Unpack

import msgspec
from aiohttp import web

from collector.api.problems import ApiProblem, ProblemType

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Method = Literal["GET", "POST", "PUT", "PATCH", "DELETE"]
S = TypeVar("S", bound=msgspec.Struct)


class Role(enum.IntEnum):
    """What a token may do; each role includes every role below it."""

    VIEWER = 1  # read accounts, usage, balances, journal, hosts, invoices
    BILLING = 2  # invoices: preview, finalize, credit notes; quarantine release
    OPERATOR = 3  # fleet health, agents, webhook deliveries
    ADMIN = 4  # API tokens, the audit log, webhook subscriptions

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.upper()]
        except KeyError:
            raise ValueError(
                f"unknown role {text!r}: expected one of {', '.join(r.label for r in cls)}"
            ) from None


class Scope(enum.Enum):
    """A permission outside the role ladder, granted to a token explicitly."""

    INGEST = "ingest"  # POST usage events (CloudEvents)


class _Open(enum.Enum):
    PUBLIC = "public"
    AUTHENTICATED = "token"


PUBLIC: Final = _Open.PUBLIC
AUTHENTICATED: Final = _Open.AUTHENTICATED
Access = Role | Scope | _Open


def access_label(access: Access) -> str:
    if isinstance(access, Role):
        return access.label
    if isinstance(access, Scope):
        return f"scope:{access.value}"
    return access.value


@dataclass(frozen=True)
class Response:
    """One documented outcome of an operation: a status, a schema, a media type."""

    status: int
    description: str
    schema: type[Any] | None = None
    media_type: str = "application/json"


@dataclass(frozen=True)
class Operation:
    """The OpenAPI description of one route."""

    summary: str
    description: str = ""
    tags: tuple[str, ...] = ()
    path_params: Mapping[str, str] = field(default_factory=dict)
    query: type[msgspec.Struct] | None = None
    body: type[msgspec.Struct] | None = None
    responses: tuple[Response, ...] = ()
    # Error statuses this operation may answer besides the ones every route may
    # (400 invalid request, 401/403 when it needs a token, 404 when it has path
    # parameters, 413 when it takes a body, 503 ledger unavailable, 500).
    errors: tuple[int, ...] = ()


@dataclass(frozen=True)
class Route:
    method: Method
    path: str
    access: Access
    operation: Operation
    handler: Handler

    @property
    def operation_id(self) -> str:
        return self.handler.__name__


class _Summary(TypedDict):
    summary: str


class RouteOptions(_Summary, total=False):
    """The keywords of :meth:`Routes.route` after method, path and access."""

    description: str
    path_params: Mapping[str, str] | None
    query: type[msgspec.Struct] | None
    body: type[msgspec.Struct] | None
    response: Any
    status: int
    response_description: str
    media_type: str
    extra_responses: tuple[Response, ...]
    errors: tuple[int, ...]
    tags: tuple[str, ...]


class Routes:
    """The routes one module declares."""

    def __init__(self, tag: str = "") -> None:
        self.tag = tag
        self.routes: list[Route] = []

    def route(
        self,
        method: Method,
        path: str,
        access: Access,
        *,
        summary: str,
        description: str = "",
        path_params: Mapping[str, str] | None = None,
        query: type[msgspec.Struct] | None = None,
        body: type[msgspec.Struct] | None = None,
        response: type[Any] | None = None,
        status: int = 200,
        response_description: str = "",
        media_type: str = "application/json",
        extra_responses: tuple[Response, ...] = (),
        errors: tuple[int, ...] = (),
        tags: tuple[str, ...] = (),
    ) -> Callable[[Handler], Handler]:
        """Declare a route; ``response`` is the schema of the success answer (``None``
        with status 204 for an empty one)."""
        params = dict(path_params or {})
        named = {p.strip("{}") for p in path.split("/") if p.startswith("{")}
        if named != set(params):
            raise ValueError(f"{method} {path}: describe exactly the path parameters {named}")
        operation = Operation(
            summary=summary,
            description=description,
            tags=tags or ((self.tag,) if self.tag else ()),
            path_params=params,
            query=query,
            body=body,
            responses=(
                Response(status, response_description or summary, response, media_type),
                *extra_responses,
            ),
            errors=errors,
        )

        def register(handler: Handler) -> Handler:
            self.routes.append(Route(method, path, access, operation, handler))
            return handler

        return register

    def get(
        self, path: str, access: Access, **kw: Unpack[RouteOptions]
    ) -> Callable[[Handler], Handler]:
        return self.route("GET", path, access, **kw)

    def post(
        self, path: str, access: Access, **kw: Unpack[RouteOptions]
    ) -> Callable[[Handler], Handler]:
        return self.route("POST", path, access, **kw)

    def delete(
        self, path: str, access: Access, **kw: Unpack[RouteOptions]
    ) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, access, **kw)


# The route each aiohttp route was made from, and the caller, kept on the request.
ROUTE = web.RequestKey("route", Route)


def route_of(request: web.Request) -> Route:
    try:
        return request[ROUTE]
    except KeyError:
        raise RuntimeError(f"{request.path}: no declared route") from None


def query_of(request: web.Request, kind: type[S]) -> S:
    """The query string as the declared ``kind``; ``invalid-request`` when it does not fit."""
    declared = route_of(request).operation.query
    if declared is not kind:
        raise RuntimeError(f"{request.path}: query declared as {declared}, read as {kind}")
    try:
        return msgspec.convert(dict(request.query), kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ApiProblem(ProblemType.INVALID_REQUEST, f"query: {exc}") from None


async def body_of(request: web.Request, kind: type[S]) -> S:
    """The JSON body as the declared ``kind``: ``malformed-json`` when it is not JSON,
    ``invalid-request`` when it does not fit, ``payload-too-large`` past the limit,
    ``unsupported-media-type`` when it is sent as anything but JSON. No body reads as
    ``{}`` (a body type whose fields all have defaults)."""
    declared = route_of(request).operation.body
    if declared is not kind:
        raise RuntimeError(f"{request.path}: body declared as {declared}, read as {kind}")
    raw = await request.read()
    media = request.content_type
    if raw and not (media == "application/json" or media.endswith("+json")):
        raise ApiProblem(ProblemType.UNSUPPORTED_MEDIA_TYPE, f"got {media or 'no media type'}")
    try:
        return msgspec.json.decode(raw or b"{}", type=kind)
    except msgspec.ValidationError as exc:
        raise ApiProblem(ProblemType.INVALID_REQUEST, f"body: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ApiProblem(ProblemType.MALFORMED_JSON, str(exc)) from None


_encoder = msgspec.json.Encoder()


def respond(value: Any, status: int = 200, headers: Mapping[str, str] | None = None
            ) -> web.Response:
    """A JSON answer from a ``msgspec.Struct`` (or anything msgspec encodes)."""
    return web.Response(
        body=_encoder.encode(value),
        status=status,
        content_type="application/json",
        headers=headers,
    )
