"""The collector's composition root: build everything, serve, reload, stop.

Nothing here runs at import. :func:`run` opens the ledger stores, starts the gRPC
ingest server (mTLS, TLS 1.3 only) and the REST API, and serves until SIGTERM or
SIGINT. SIGHUP reloads the tariff, accounts and assignments; a file that fails to
load is refused with a log line and the previous configuration stays in force.

The billing service is built with the ledger service, at start-up and on each reload,
so accounts' billing settings that contradict the tariff (a plan or price it lacks)
stop start-up with one line naming file and key, or refuse the reload, rather than
failing only when a billing route is called. The REST API's webhook service wakes the
delivery worker when a subscription is created, re-enabled or replayed, so those
deliveries go out at once rather than at the worker's next poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from collector.api import build_app
from collector.api.ops import METRICS
from collector.audit import AuditLog
from collector.billing.service import BillingService, billing_service
from collector.config import (
    LoadedCollectorConfig,
    balance_thresholds,
    load_collector_config,
    parse_listen,
)
from collector.fleet import Fleet
from collector.ingest import IngestService
from collector.ingest_metrics import IngestMetricsInterceptor
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import LedgerService, ShardedLedger
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore
from collector.ledger.timing import observe_transactions
from collector.metrics import Metrics, outbox_probe
from collector.pricing import AccountPrices
from collector.rating.tariff import Tariff, parse_tariff_text
from collector.routing import Router
from collector.sequences import Sequences
from collector.webhooks.secretbox import SecretBox
from collector.webhooks.service import WebhookService
from collector.webhooks.worker import DeliveryWorker
from common import logs
from common.errors import ConfigError, MeterdError
from common.pki import check_private_key_file
from common.proto import meterd_pb2_grpc as pb_grpc
from common.sdnotify import Notifier
from common.tls import grpc_server_credentials, restrict_grpc_to_tls13, server_ssl_context

log = logs.get("collector")

MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def load_tariff(path: Path) -> Tariff:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the tariff file ({exc.strerror})") from None
    return parse_tariff_text(text, str(path))


async def open_ledger(cfg: LoadedCollectorConfig) -> ShardedLedger:
    stores: list[LedgerStore] = []
    try:
        if cfg.raw.ledger.shards:
            for i, shard in enumerate(cfg.raw.ledger.shards):
                stores.append(await PostgresLedger.open(shard.dsn, name=f"shard{i}"))
        else:
            stores.append(await SqliteLedger.open(cfg.path(cfg.raw.ledger.sqlite_path)))
    except BaseException:
        for store in stores:
            await store.close()
        raise
    return ShardedLedger(stores, cfg.shard_map)


def build_service(cfg: LoadedCollectorConfig, ledger: ShardedLedger) -> LedgerService:
    tariff = load_tariff(cfg.path(cfg.raw.tariff))
    return LedgerService(
        ledger, Router(cfg.assignments), AccountPrices(tariff, cfg.terms), balance_thresholds(cfg),
        group_records=cfg.raw.ledger.ingest_group_records,
        group_transactions=cfg.raw.ledger.ingest_transactions,
    )


def delivery_worker(cfg: LoadedCollectorConfig, ledger: ShardedLedger) -> DeliveryWorker:
    """The webhook delivery worker (settings from ``[webhooks]``; a restart applies
    changes to them)."""
    key_file = cfg.path(cfg.raw.webhooks.secrets_key_file)
    return DeliveryWorker(ledger, cfg.raw.webhooks, lambda: SecretBox.load(key_file))


def build_billing(cfg: LoadedCollectorConfig, service: LedgerService) -> BillingService:
    """The billing service over ``service``, its accounts' settings checked against the
    tariff the service rates with (:class:`~common.errors.ConfigError` naming the key)."""
    if not isinstance(service.prices, AccountPrices):
        raise TypeError("the billing service needs the ledger service's tariff")
    return billing_service(cfg, service, service.prices.tariff)


@dataclass
class Running:
    """The live parts, swapped whole on reload."""

    config: LoadedCollectorConfig
    service: LedgerService
    billing: BillingService


# Tracked objects allocated (net) between two young collections of the cyclic
# garbage collector: Python's default of 700 runs one every 700 records in flight.
GC_YOUNG_THRESHOLD = 20_000


def calm_garbage_collector() -> None:
    """Collect and freeze what start-up built (configuration, tariff, modules: kept for
    the life of the process) so that full collections no longer walk it, and let the
    ingest path's short-lived records pile up for longer between young collections
    (reference counting frees them; only cycles wait for the collector)."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def to_us_now() -> int:
    return time.time_ns() // 1000


async def run(
    config_path: Path, ready_file: Path | None = None, notifier: Notifier | None = None
) -> int:
    restrict_grpc_to_tls13()
    logs.capture_library_logs()  # asyncpg's reconnect tracebacks, asyncio's: one JSON line each
    if notifier is None:
        notifier = Notifier.from_environment(os.environ, os.getpid())
    cfg = load_collector_config(config_path)
    tls = cfg.raw.tls
    for key in (cfg.path(tls.key),):
        check_private_key_file(key)
    ledger = await open_ledger(cfg)
    try:
        service = build_service(cfg, ledger)
        state = Running(cfg, service, build_billing(cfg, service))
        calm_garbage_collector()
        return await _serve(state, ledger, ready_file, notifier)
    finally:
        await ledger.close()


async def _serve(
    state: Running, ledger: ShardedLedger, ready_file: Path | None, notifier: Notifier
) -> int:
    cfg = state.config
    # Fleet health and metrics (collector.fleet, collector.metrics): see _api_tls below.
    fleet = Fleet(lambda: state.config.raw.fleet)
    metrics = Metrics(fleet)
    metrics.outbox_probe = outbox_probe(ledger, to_us_now)
    for store in ledger.stores:
        observe_transactions(store, metrics.observe_transaction)
    state.service.observe_calls = metrics.observe_calls
    api_tls = _api_tls(cfg)
    try:
        await fleet.load(ledger.control)
    except MeterdError as exc:
        log.error("fleet_load_failed", error=str(exc))
    released = await state.service.release_held(to_us_now())
    if released:
        log.info("held_records_released", records=released)
    try:  # audit rows a stopped billing command left on an account's shard
        relayed = await AuditLog.for_ledger(ledger).relay_all(ledger.stores)
    except MeterdError as exc:
        log.error("audit_relay_failed", error=str(exc))
    else:
        if relayed:
            log.info("audit_rows_relayed", rows=relayed)

    server = grpc.aio.server(
        interceptors=[IngestMetricsInterceptor(metrics)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            # gRPC sets SO_REUSEPORT unless told not to: a second collector (another
            # ledger, an old configuration) would then take half the agents silently.
            ("grpc.so_reuseport", 1 if cfg.raw.ingest.share_port else 0),
        ]
    )
    pb_grpc.add_IngestServicer_to_server(  # type: ignore[no-untyped-call]
        IngestService(
            lambda: state.service,
            cfg.raw.ingest,
            fleet,
            denied_serials=lambda: state.config.denied_serials,
        ),
        server,
    )
    host, port = parse_listen(cfg.raw.ingest.listen, str(cfg.source), "ingest.listen")
    credentials = grpc_server_credentials(
        cfg.path(cfg.raw.tls.cert), cfg.path(cfg.raw.tls.key), cfg.path(cfg.raw.tls.ca)
    )
    try:
        grpc_port = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:  # gRPC's way of saying the address cannot be bound
        raise ConfigError(
            str(cfg.source), "ingest.listen",
            f"cannot listen on {cfg.raw.ingest.listen!r}: the address is in use or not this "
            "host's (is another collector there? collectors of one ledger share an address "
            "when each sets [ingest] share_port = true)",
        ) from None
    await server.start()

    webhooks = delivery_worker(cfg, ledger)  # webhooks: started below, stopped at the end
    subscriptions = WebhookService(ledger, cfg.raw.webhooks,
                                   cfg.path(cfg.raw.webhooks.secrets_key_file),
                                   on_change=webhooks.wake)
    app = build_app(lambda: state.service, fleet, lambda: state.config,
                    webhooks=subscriptions, billing=lambda: state.billing)
    app[METRICS] = metrics
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:  # the API cannot listen: stop the gRPC server too, and name the key
        api_host, api_port = parse_listen(cfg.raw.api.listen, str(cfg.source), "api.listen")
        site = web.TCPSite(runner, api_host, api_port, ssl_context=api_tls)
        await site.start()
    except BaseException as exc:
        await server.stop(grace=None)
        await runner.cleanup()
        if isinstance(exc, OSError):
            reason = exc.strerror or str(exc)
            raise ConfigError(str(cfg.source), "api.listen",
                              f"cannot listen on {cfg.raw.api.listen!r}: {reason}") from None
        raise
    api_port = runner.addresses[0][1]

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: _reload(state, ledger))
    log.info("collector_started", grpc_port=grpc_port, api_port=api_port,
             ledger=[s.name for s in ledger.stores])
    if ready_file is not None:
        tmp = ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "grpc_port": grpc_port,
                                   "api_port": api_port}))
        tmp.replace(ready_file)
    notifier.ready(f"ingest on port {grpc_port}, API on port {api_port}")
    webhooks.start()
    watchdog = asyncio.create_task(notifier.feed_watchdog(), name="watchdog")
    fleet_task = asyncio.create_task(fleet.run(ledger.control), name="fleet")
    # Sequence gaps (collector.sequences): checked in the background, every shard.
    sequences = Sequences(ledger, cfg.raw.ingest.sequence_gap_grace_seconds)
    sequences_task = asyncio.create_task(
        sequences.run(cfg.raw.ingest.sequence_check_interval_seconds, to_us_now),
        name="sequences",
    )
    try:
        await stop.wait()
    finally:
        log.info("collector_stopping")
        notifier.stopping("draining gRPC calls")
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await server.stop(grace=5)
        fleet_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fleet_task
        sequences_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sequences_task
        with contextlib.suppress(MeterdError):
            await fleet.persist(ledger.control)  # what was seen since the last round
        await runner.cleanup()
        await webhooks.stop()
    log.info("collector_stopped")
    return 0


def _storage(cfg: LoadedCollectorConfig) -> tuple[object, ...]:
    """Where the ledger is: what a reload cannot change."""
    return (cfg.raw.ledger.sqlite_path, cfg.raw.ledger.shards)


def _reload(state: Running, ledger: ShardedLedger) -> None:
    try:
        cfg = load_collector_config(state.config.source)
        if _storage(cfg) != _storage(state.config):
            log.warning("reload_ledger_ignored", reason="ledger storage changes need a restart")
        service = build_service(cfg, ledger)  # with the new ingest_* settings of [ledger]
        service.observe_calls = state.service.observe_calls
        billing = build_billing(cfg, service)
    except MeterdError as exc:
        log.error("reload_refused", error=str(exc))
        return
    old = state.service
    state.config, state.service, state.billing = cfg, service, billing
    log.info("configuration_reloaded", assignments=len(cfg.assignments),
             accounts=len(cfg.terms), denied_serials=len(cfg.denied_serials))
    asyncio.get_running_loop().create_task(_release_after_reload(service, old))


async def _release_after_reload(service: LedgerService, old: LedgerService) -> None:
    """Post the held records that the new assignments cover, once the posts still
    routed with the old ones are done: one of them may hold records after this read
    the held rows (its calls retry a failure, so it ends)."""
    await old.settled()
    try:
        released = await service.release_held(to_us_now())
    except MeterdError as exc:
        log.error("held_release_failed", error=str(exc))
        return
    if released:
        log.info("held_records_released", records=released)


# --- REST API over TLS ------------------------------------------------------------------


def _api_tls(cfg: LoadedCollectorConfig) -> ssl.SSLContext | None:
    """With ``[api] tls = true``: a TLS 1.3-only context with the collector's certificate
    (the one agents verify), so the REST API is served as HTTPS; no client certificate is
    asked for (callers authenticate with bearer tokens)."""
    if not cfg.raw.api.tls:
        return None
    return server_ssl_context(cfg.path(cfg.raw.tls.cert), cfg.path(cfg.raw.tls.key))
