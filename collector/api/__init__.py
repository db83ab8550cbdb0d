"""The collector's REST API (aiohttp), under ``/v1``.

- :mod:`collector.api.app`: the app factory :func:`build_app` and :data:`ROUTE_TABLES`,
  the list of modules serving routes; authentication and problem documents.
- :mod:`collector.api.registry`: how a module declares its routes (method, path,
  role or scope, OpenAPI description) and reads typed queries and bodies.
- :mod:`collector.api.auth`: bearer tokens (hashes on the control shard), roles.
- :mod:`collector.api.problems`: ``application/problem+json`` with a stable ``type``.
- :mod:`collector.api.pagination`: opaque cursors and ``from``/``to`` filters.
- :mod:`collector.api.openapi`: ``/v1/openapi.json`` from the declared routes.

Amounts and quantities are decimal strings, never JSON numbers, so no client parses
money into a float by accident.
"""

from collector.api.app import build_app

__all__ = ["build_app"]
