"""The collector's composition root: build everything, serve, reload, stop.

Nothing here runs at import. :func:`run` opens the ledger stores, starts the gRPC
ingest server (mTLS, TLS 1.3 only) and the REST API, and serves until SIGTERM or
SIGINT. SIGHUP reloads the tariff, accounts and assignments; a file that fails to
load is refused with a log line and the previous configuration stays in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from aiohttp import web

from collector.api import build_app
from collector.config import LoadedCollectorConfig, load_collector_config, parse_listen
from collector.fleet import Fleet
from collector.ingest import IngestService
from collector.ledger.postgres_store import PostgresLedger
from collector.ledger.service import LedgerService, ShardedLedger
from collector.ledger.sqlite_store import SqliteLedger
from collector.ledger.store import LedgerStore
from collector.pricing import AccountPrices
from collector.rating.tariff import Tariff, parse_tariff_text
from collector.routing import Router
from common import logs
from common.errors import ConfigError, MeterdError
from common.pki import check_private_key_file
from common.proto import meterd_pb2_grpc as pb_grpc
from common.sdnotify import Notifier
from common.tls import grpc_server_credentials, restrict_grpc_to_tls13

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
    return LedgerService(ledger, Router(cfg.assignments), AccountPrices(tariff, cfg.terms))


@dataclass
class Running:
    """The live parts, swapped whole on reload."""

    config: LoadedCollectorConfig
    service: LedgerService


def to_us_now() -> int:
    return time.time_ns() // 1000


async def run(
    config_path: Path, ready_file: Path | None = None, notifier: Notifier | None = None
) -> int:
    restrict_grpc_to_tls13()
    if notifier is None:
        notifier = Notifier.from_environment(os.environ, os.getpid())
    cfg = load_collector_config(config_path)
    tls = cfg.raw.tls
    for key in (cfg.path(tls.key),):
        check_private_key_file(key)
    ledger = await open_ledger(cfg)
    try:
        state = Running(cfg, build_service(cfg, ledger))
        return await _serve(state, ledger, ready_file, notifier)
    finally:
        await ledger.close()


async def _serve(
    state: Running, ledger: ShardedLedger, ready_file: Path | None, notifier: Notifier
) -> int:
    cfg = state.config
    fleet = Fleet()
    released = await state.service.release_held(to_us_now())
    if released:
        log.info("held_records_released", records=released)

    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
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
    grpc_port = server.add_secure_port(f"{host}:{port}", credentials)
    await server.start()

    app = build_app(lambda: state.service, fleet, lambda: set(state.config.terms))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    api_host, api_port = parse_listen(cfg.raw.api.listen, str(cfg.source), "api.listen")
    site = web.TCPSite(runner, api_host, api_port)
    await site.start()
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
    watchdog = asyncio.create_task(notifier.feed_watchdog(), name="watchdog")
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
        await runner.cleanup()
    log.info("collector_stopped")
    return 0


def _reload(state: Running, ledger: ShardedLedger) -> None:
    try:
        cfg = load_collector_config(state.config.source)
        if cfg.raw.ledger != state.config.raw.ledger:
            log.warning("reload_ledger_ignored", reason="ledger storage changes need a restart")
        service = build_service(cfg, ledger)
    except MeterdError as exc:
        log.error("reload_refused", error=str(exc))
        return
    state.config, state.service = cfg, service
    log.info("configuration_reloaded", assignments=len(cfg.assignments),
             accounts=len(cfg.terms), denied_serials=len(cfg.denied_serials))
    asyncio.get_running_loop().create_task(_release_after_reload(service))


async def _release_after_reload(service: LedgerService) -> None:
    try:
        released = await service.release_held(to_us_now())
    except MeterdError as exc:
        log.error("held_release_failed", error=str(exc))
        return
    if released:
        log.info("held_records_released", records=released)
