"""Errors of the REST API as ``application/problem+json`` (RFC 9457).

Every error the API answers, its own or aiohttp's (unknown path, wrong method, a body
past the size limit, malformed JSON), is a problem document whose ``type`` is a stable
URI naming what went wrong: clients branch on ``type``, never on ``title`` or
``detail``. The types are the members of :class:`ProblemType`; the OpenAPI document
lists them. Handlers raise :class:`ApiProblem`; the ``problems`` middleware in
:mod:`collector.api.app` renders it, and turns aiohttp's ``HTTPException``\\ s and
meterd's own errors into problems in that one place.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec
from aiohttp import web

PROBLEM_BASE = "https://meterd.dev/problems/"
PROBLEM_JSON = "application/problem+json"


class ProblemType(enum.Enum):
    """Each kind of error: its slug (the end of the ``type`` URI), status and title."""

    INVALID_REQUEST = ("invalid-request", 400, "The request is not valid")
    MALFORMED_JSON = ("malformed-json", 400, "The request body is not valid JSON")
    INVALID_CURSOR = ("invalid-cursor", 400, "The pagination cursor is not valid here")
    UNAUTHORIZED = ("unauthorized", 401, "A valid bearer token is required")
    FORBIDDEN = ("forbidden", 403, "The token's role does not allow this")
    NOT_FOUND = ("not-found", 404, "No such resource")
    ACCOUNT_NOT_FOUND = ("account-not-found", 404, "No such account")
    HOST_NOT_FOUND = ("host-not-found", 404, "No such host")
    TOKEN_NOT_FOUND = ("token-not-found", 404, "No such API token")
    WEBHOOK_NOT_FOUND = ("webhook-not-found", 404, "No such webhook subscription")
    METHOD_NOT_ALLOWED = ("method-not-allowed", 405, "The method is not allowed here")
    NOT_ACCEPTABLE = ("not-acceptable", 406, "No acceptable representation")
    CONFLICT = ("conflict", 409, "The request conflicts with the resource's state")
    PAYLOAD_TOO_LARGE = ("payload-too-large", 413, "The request body is too large")
    UNSUPPORTED_MEDIA_TYPE = ("unsupported-media-type", 415, "The body must be JSON")
    UNPROCESSABLE = ("unprocessable", 422, "The request cannot be carried out")
    INTERNAL = ("internal-error", 500, "Internal error")
    LEDGER_UNAVAILABLE = ("ledger-unavailable", 503, "The ledger is unavailable")
    NOT_READY = ("not-ready", 503, "The collector is not ready")

    def __init__(self, slug: str, status: int, title: str) -> None:
        self.slug = slug
        self.status = status
        self.title = title

    @property
    def uri(self) -> str:
        return PROBLEM_BASE + self.slug


class Problem(msgspec.Struct, kw_only=True):
    """An error (RFC 9457). ``type`` is stable per kind of error; ``detail`` says what
    exactly was wrong with this request."""

    type: str
    title: str
    status: int
    detail: str | None = None
    instance: str | None = None
    errors: list[str] | None = None


class ApiProblem(Exception):
    """Raised by handlers; rendered as a problem document by the middleware."""

    def __init__(
        self,
        kind: ProblemType,
        detail: str = "",
        *,
        errors: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail or kind.title)
        self.kind = kind
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


_encoder = msgspec.json.Encoder()


def problem_response(
    kind: ProblemType,
    detail: str = "",
    *,
    instance: str | None = None,
    errors: list[str] | None = None,
    headers: dict[str, str] | None = None,
    status: int | None = None,
) -> web.Response:
    body = Problem(
        type=kind.uri,
        title=kind.title,
        status=status or kind.status,
        detail=detail or None,
        instance=instance,
        errors=errors,
    )
    response = web.Response(
        body=_encoder.encode(body),
        status=status or kind.status,
        content_type=PROBLEM_JSON,
        headers=headers,
    )
    return response


# aiohttp's own HTTP errors (raised by the router and by body reading) by status.
_BY_STATUS: dict[int, ProblemType] = {
    400: ProblemType.INVALID_REQUEST,
    401: ProblemType.UNAUTHORIZED,
    403: ProblemType.FORBIDDEN,
    404: ProblemType.NOT_FOUND,
    405: ProblemType.METHOD_NOT_ALLOWED,
    406: ProblemType.NOT_ACCEPTABLE,
    409: ProblemType.CONFLICT,
    413: ProblemType.PAYLOAD_TOO_LARGE,
    415: ProblemType.UNSUPPORTED_MEDIA_TYPE,
    422: ProblemType.UNPROCESSABLE,
    503: ProblemType.NOT_READY,
}


def from_http_exception(exc: web.HTTPException, path: str) -> web.Response:
    """The problem document for an error aiohttp raised (no route, wrong method, ...)."""
    kind = _BY_STATUS.get(exc.status)
    headers: dict[str, str] = {}
    if isinstance(exc, web.HTTPMethodNotAllowed):
        headers["Allow"] = ", ".join(sorted(exc.allowed_methods))
    if kind is None:
        kind = ProblemType.INTERNAL if exc.status >= 500 else ProblemType.INVALID_REQUEST
        return problem_response(kind, exc.text or exc.reason, instance=path,
                                headers=headers, status=exc.status)
    detail = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else ""
    return problem_response(kind, detail, instance=path, headers=headers)


def problem_schema() -> dict[str, Any]:
    """The JSON Schema of a problem document, for the OpenAPI components."""
    return {
        "type": "object",
        "description": Problem.__doc__,
        "properties": {
            "type": {"type": "string", "enum": [k.uri for k in ProblemType]},
            "title": {"type": "string"},
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "detail": {"type": ["string", "null"]},
            "instance": {"type": ["string", "null"]},
            "errors": {"type": ["array", "null"], "items": {"type": "string"}},
        },
        "required": ["type", "title", "status"],
    }
