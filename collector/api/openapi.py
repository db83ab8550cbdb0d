"""``/v1/openapi.json``: the OpenAPI 3.1 document, generated from the declared routes.

Schemas come from the ``msgspec.Struct`` types the routes declare (msgspec writes
JSON Schema 2020-12, the dialect of OpenAPI 3.1); query strings are expanded into one
parameter per field. Every operation lists the errors it can answer as problem
documents, and the access it needs in ``x-meterd-access`` and in its description.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from collector.api.problems import PROBLEM_JSON, ProblemType, problem_schema
from collector.api.registry import AUTHENTICATED, PUBLIC, Role, Route, Scope, access_label

REF = "#/components/schemas/{name}"

_ERROR_DESCRIPTIONS = {
    400: "The query, path or body is not valid (invalid-request, malformed-json, invalid-cursor)",
    401: "No bearer token, or one that is unknown or revoked (unauthorized)",
    403: "The token's role or scope does not allow this (forbidden)",
    404: "No such resource (not-found and the resource's own *-not-found types)",
    409: "The request conflicts with the resource's state (conflict)",
    413: "The body is larger than the limit (payload-too-large)",
    415: "The body is not JSON (unsupported-media-type)",
    422: "The request is valid but cannot be carried out (unprocessable)",
    500: "Internal error (internal-error)",
    503: "A ledger shard is unavailable (ledger-unavailable); try again later",
}


def _access_text(route: Route) -> str:
    access = route.access
    if access is PUBLIC:
        return "No token needed."
    if access is AUTHENTICATED:
        return "Needs a valid token, whatever its role and scopes."
    if isinstance(access, Scope):
        return f"Needs a token with the `{access.value}` scope."
    assert isinstance(access, Role)
    above = [r.label for r in Role if r >= access]
    return f"Needs a token with role {', '.join(f'`{r}`' for r in above)}."


def _strip_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter is absent or a string: drop the ``null`` branch and default."""
    schema = {k: v for k, v in schema.items() if not (k == "default" and v is None)}
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        rest = [b for b in branches if b != {"type": "null"}]
        if len(rest) == 1:
            merged = {k: v for k, v in schema.items() if k != "anyOf"}
            merged.update(rest[0])
            return merged
        schema["anyOf"] = rest
    return schema


def _query_parameters(
    query: type[msgspec.Struct], components: dict[str, Any]
) -> list[dict[str, Any]]:
    (ref,), defs = msgspec.json.schema_components([query], ref_template=REF)
    name = ref["$ref"].rsplit("/", 1)[1]
    own = defs.pop(name)
    components.update(defs)
    required = set(own.get("required", ()))
    params = []
    for prop, schema in own.get("properties", {}).items():
        schema = _strip_null(dict(schema))
        description = schema.pop("description", "")
        schema.pop("title", None)
        param: dict[str, Any] = {
            "name": prop,
            "in": "query",
            "required": prop in required,
            "schema": schema,
        }
        if description:
            param["description"] = description
        params.append(param)
    return params


def build_document(routes: Sequence[Route], *, version: str) -> dict[str, Any]:
    body_types: list[Any] = []
    for route in routes:
        op = route.operation
        if op.body is not None:
            body_types.append(op.body)
        body_types.extend(r.schema for r in op.responses if r.schema is not None)
    refs, components = msgspec.json.schema_components(body_types, ref_template=REF)
    ref_of = dict(zip([id(t) for t in body_types], refs, strict=True))
    components["Problem"] = problem_schema()

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        op = route.operation
        parameters: list[dict[str, Any]] = [
            {"name": name, "in": "path", "required": True, "description": text,
             "schema": {"type": "string", "minLength": 1, "maxLength": 200}}
            for name, text in op.path_params.items()
        ]
        if op.query is not None:
            parameters += _query_parameters(op.query, components)
        responses: dict[str, Any] = {}
        for r in op.responses:
            answer: dict[str, Any] = {"description": r.description}
            if r.schema is not None:
                answer["content"] = {r.media_type: {"schema": ref_of[id(r.schema)]}}
            responses[str(r.status)] = answer
        errors = {400, 500, 503, *op.errors}
        if route.access is not PUBLIC:
            errors.add(401)
        if isinstance(route.access, Role | Scope):
            errors.add(403)
        if op.path_params:
            errors.add(404)
        if op.body is not None:
            errors |= {413, 415}
        for status in sorted(errors):
            responses.setdefault(
                str(status),
                {
                    "description": _ERROR_DESCRIPTIONS[status],
                    "content": {PROBLEM_JSON: {"schema": {"$ref": REF.format(name="Problem")}}},
                },
            )
        description = "\n\n".join(x for x in (op.description, _access_text(route)) if x)
        operation: dict[str, Any] = {
            "operationId": route.operation_id,
            "summary": op.summary,
            "description": description,
            "tags": list(op.tags),
            "parameters": parameters,
            "responses": responses,
            "security": [] if route.access is PUBLIC else [{"bearer": []}],
            "x-meterd-access": access_label(route.access),
        }
        if op.body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[id(op.body)]}},
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation

    return {
        "openapi": "3.1.0",
        "info": {
            "title": "meterd collector API",
            "version": version,
            "description": (
                "Usage, balances, journal, hosts, invoices and fleet health of a meterd "
                "collector. Amounts and quantities are decimal strings. Errors are "
                "application/problem+json; their `type` is one of the URIs listed in the "
                "Problem schema. Lists are paginated with an opaque `cursor` (pass "
                "`next_cursor` back) and time-based lists filter with `from` (inclusive) "
                "and `to` (exclusive), RFC 3339 instants."
            ),
        },
        "paths": dict(sorted(paths.items())),
        "components": {
            "schemas": dict(sorted(components.items())),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "An API token from `meterd token create`.",
                }
            },
        },
        "x-meterd-problem-types": {k.uri: k.title for k in ProblemType},
    }
