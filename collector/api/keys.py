"""Typed application state of the REST API (``web.AppKey``), set by the app factory.

The callables return what is in force now: the daemon swaps its ledger service and
configuration whole on SIGHUP, and the API reads them through these on every request.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from collector.billing.service import BillingService
from collector.config import LoadedCollectorConfig
from collector.fleet import Fleet
from collector.ledger.service import LedgerService
from collector.webhooks.service import WebhookService

SERVICE: web.AppKey[Callable[[], LedgerService]] = web.AppKey("service")
CONFIG: web.AppKey[Callable[[], LoadedCollectorConfig]] = web.AppKey("config")
FLEET = web.AppKey("fleet", Fleet)
# Microseconds since the epoch, now (the audit log's and tokens' clock).
CLOCK: web.AppKey[Callable[[], int]] = web.AppKey("clock")
WEBHOOKS = web.AppKey("webhooks", WebhookService)
# The billing service in force now (rebuilt when the ledger service or configuration is).
BILLING: web.AppKey[Callable[[], BillingService]] = web.AppKey("billing")
# The OpenAPI document, built once from the routes when the app is made.
OPENAPI: web.AppKey[bytes] = web.AppKey("openapi")
