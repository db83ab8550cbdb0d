"""The agent's composition root: sample on a monotonic schedule, spool, ship.

Nothing here runs at import. :func:`run` loads the configuration, checks the key,
takes the host id from the agent's own certificate, opens the spool, restores the
sampler's counters from it and starts two tasks: the sampling loop (each cycle's
records and the sampler's state are committed to the spool in one transaction
before anything else happens to them) and the shipper. SIGHUP reloads the
interval, metric set, labels and cgroups without losing a sample: the new sampler
starts from the old one's state. SIGTERM or SIGINT takes a final sample, ships for
up to ``final_flush_seconds`` and leaves the rest in the spool for next time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from agent.cgroups import CgroupSource
from agent.config import LoadedAgentConfig, load_agent_config
from agent.sampler import NameFilter, NvmlSource, PsutilSource, Sampler, Source
from agent.shipper import Shipper, ShipperSettings
from agent.spool import Spool
from common import logs
from common.cli import meterd_version
from common.errors import MeterdError
from common.pki import check_private_key_file, host_id_from_certificate
from common.sdnotify import Notifier
from common.tls import grpc_channel_credentials, restrict_grpc_to_tls13

log = logs.get("agent")


def build_sampler(
    cfg: LoadedAgentConfig, host_id: str, state: dict[str, object] | None
) -> Sampler:
    m = cfg.raw.metrics
    host = PsutilSource(
        interfaces=NameFilter(exclude=tuple(m.interfaces_exclude)),
        mounts=NameFilter(exclude=tuple(m.mounts_exclude)),
        devices=NameFilter(exclude=tuple(m.devices_exclude)),
    )
    sources: list[Source] = []
    if cfg.raw.cgroups.patterns:
        sources.append(CgroupSource(cfg.raw.cgroups.patterns, root=cfg.raw.cgroups.root))
    gpu = NvmlSource.open()
    if gpu is not None:
        sources.append(gpu)
    return Sampler(
        host_id,
        host,
        sources=sources,
        metrics=m.enabled or None,
        labels=m.labels,
        state=state,
    )


def shipper_settings(cfg: LoadedAgentConfig) -> ShipperSettings:
    s = cfg.raw.shipping
    # Durations are not money: float seconds are what asyncio and gRPC take.
    return ShipperSettings(
        batch_max_records=s.batch_max_records,
        batch_max_bytes=s.batch_max_bytes,
        deadline_seconds=float(s.deadline_seconds),
        backoff_initial_seconds=float(s.backoff_initial_seconds),
        backoff_max_seconds=float(s.backoff_max_seconds),
    )


def open_channel(cfg: LoadedAgentConfig) -> grpc.aio.Channel:
    tls = cfg.raw.tls
    credentials = grpc_channel_credentials(cfg.path(tls.cert), cfg.path(tls.key), cfg.path(tls.ca))
    shipping = cfg.raw.shipping
    # gRPC reconnects on its own schedule (up to 120 s by default); keep it within the
    # shipper's own backoff so a returning collector is found as soon as we retry.
    options: list[tuple[str, object]] = [
        ("grpc.max_send_message_length", 16 * 1024 * 1024),
        ("grpc.initial_reconnect_backoff_ms", int(shipping.backoff_initial_seconds * 1000)),
        ("grpc.min_reconnect_backoff_ms", int(shipping.backoff_initial_seconds * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(shipping.backoff_max_seconds * 1000)),
    ]
    if cfg.raw.server_name:
        options.append(("grpc.ssl_target_name_override", cfg.raw.server_name))
    return grpc.aio.secure_channel(cfg.raw.collector, credentials, options=options)


@dataclass
class AgentState:
    config: LoadedAgentConfig
    host_id: str
    spool: Spool
    sampler: Sampler
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    reload_requested: bool = False


def _request_reload(agent: AgentState) -> None:
    agent.reload_requested = True
    agent.interrupt.set()


async def run(config_path: Path, notifier: Notifier | None = None) -> int:
    restrict_grpc_to_tls13()
    if notifier is None:
        notifier = Notifier.from_environment(os.environ, os.getpid())
    cfg = load_agent_config(config_path)
    tls = cfg.raw.tls
    check_private_key_file(cfg.path(tls.key))
    host_id = host_id_from_certificate(cfg.path(tls.cert).read_bytes())
    spool_path = cfg.path(cfg.raw.spool_path)
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    spool = await asyncio.to_thread(Spool, spool_path, max_bytes=cfg.raw.spool_max_bytes)
    try:
        state = await asyncio.to_thread(spool.load_state)
        sampler = build_sampler(cfg, host_id, state)
        agent = AgentState(cfg, host_id, spool, sampler)
        channel = open_channel(cfg)
        try:
            return await _serve(agent, channel, notifier)
        finally:
            await channel.close(grace=None)
            agent.sampler.close()
    finally:
        await asyncio.to_thread(spool.close)


async def _sample_once(agent: AgentState) -> int:
    sampler = agent.sampler  # one sampler for the cycle: its records go with its state
    records = await asyncio.to_thread(sampler.sample)
    await asyncio.to_thread(agent.spool.append, records, sampler.state())
    agent.wake.set()
    if records:
        log.debug("sample_spooled", records=len(records))
    return len(records)


async def _sampling_loop(agent: AgentState, stop: asyncio.Event) -> None:
    """Sample until ``stop`` is set, never interrupting a cycle.

    A cycle runs in a worker thread that a cancellation would not stop: cancelling it
    would advance the sampler's counters and throw away their records. So the loop is
    never cancelled; it finishes the cycle in progress and returns. A reload asked for
    by SIGHUP is applied between cycles.
    """
    next_at = time.monotonic()
    while not stop.is_set():
        if agent.reload_requested:
            agent.reload_requested = False
            _reload(agent)
        try:
            await _sample_once(agent)
        except (MeterdError, OSError) as exc:
            log.error("sample_failed", error=str(exc))
        interval = float(agent.config.raw.interval_seconds)
        next_at += interval
        now = time.monotonic()
        if next_at < now:  # overslept (suspend, overload): keep the cadence, skip no usage
            next_at = now
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(agent.interrupt.wait(), timeout=next_at - now)
        agent.interrupt.clear()


async def _serve(
    agent: AgentState, channel: grpc.aio.Channel, notifier: Notifier | None = None
) -> int:
    if notifier is None:
        notifier = Notifier()  # run outside a service manager: notifications are no-ops
    shipper = Shipper(agent.spool, channel, shipper_settings(agent.config), meterd_version())
    shipper.wake = agent.wake
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    def request_stop() -> None:
        stop.set()
        agent.interrupt.set()

    loop.add_signal_handler(signal.SIGTERM, request_stop)
    loop.add_signal_handler(signal.SIGINT, request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: _request_reload(agent))
    sampling = asyncio.create_task(_sampling_loop(agent, stop), name="sampling")
    shipping = asyncio.create_task(shipper.run(), name="shipping")
    log.info("agent_started", host=agent.host_id, collector=agent.config.raw.collector,
             interval_s=str(agent.config.raw.interval_seconds))
    notifier.ready(f"metering host {agent.host_id}, shipping to {agent.config.raw.collector}")
    watchdog = asyncio.create_task(notifier.feed_watchdog(), name="watchdog")
    try:
        done, _ = await asyncio.wait(
            [sampling, shipping, asyncio.create_task(stop.wait(), name="stop")],
            return_when=asyncio.FIRST_COMPLETED,
        )
        for task in done:
            if task is not sampling and task is not shipping:
                continue
            task.result()  # a crashed loop is a bug: surface it
    finally:
        notifier.stopping("taking a final sample and shipping what it can")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        watchdog.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watchdog
        request_stop()
        await sampling  # finishes the cycle in progress, then returns
        shipping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await shipping
    final = await _sample_once(agent)
    flush = float(agent.config.raw.shipping.final_flush_seconds)
    try:
        shipped = await asyncio.wait_for(shipper.drain(), timeout=flush)
    except TimeoutError:
        shipped = -1
    stats = await asyncio.to_thread(agent.spool.stats)
    log.info("agent_stopped", final_sample_records=final, shipped_on_stop=shipped,
             left_in_spool=stats.records)
    return 0


def _reload(agent: AgentState) -> None:
    try:
        cfg = load_agent_config(agent.config.source)
        sampler = build_sampler(cfg, agent.host_id, agent.sampler.state())
    except (MeterdError, OSError) as exc:
        log.error("reload_refused", error=str(exc))
        return
    if cfg.raw.collector != agent.config.raw.collector or cfg.raw.tls != agent.config.raw.tls:
        log.warning("reload_partial", reason="collector address and TLS changes need a restart")
    old = agent.sampler
    agent.config, agent.sampler = cfg, sampler
    old.close()
    log.info("configuration_reloaded", interval_s=str(cfg.raw.interval_seconds),
             metrics=sorted(sampler.metrics))


