"""The agent's composition root: sample on a monotonic schedule, spool, ship.

Nothing here runs at import. :func:`run` loads the configuration, checks the key and
takes the host id from the agent's own certificate (unless ``meterd agent run`` did
that before starting this process: :mod:`agent.__main__`), opens the spool, restores
the sampler's counters from it and starts two tasks: the sampling loop (each cycle's
records and the sampler's state are committed to the spool in one transaction
before anything else happens to them) and the shipper. SIGHUP reloads the
interval, metric set, labels, cgroups and shipping cadence without losing a sample:
the new sampler starts from the old one's state. SIGTERM or SIGINT takes a final
sample, ships for up to ``final_flush_seconds`` and leaves the rest in the spool for
next time.

Shipping cadence. Records are durable once spooled, so they need not leave at once:
the sampling loop wakes the shipper for the first records after start, then every
``[shipping] interval_seconds`` (default 60; 0 ships after every sample), and at once
when a full batch (``batch_max_records``) is waiting. Each shipping round ships until
the spool is empty, retrying with backoff while the collector is away, over one
connection (:mod:`agent.transport`) that stays open between rounds: idle, it costs
no CPU (no thread, no timer), and one that broke, or went silent past a call's
deadline, is dropped and replaced at the next call.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from agent.cgroups import CgroupSource
from agent.config import LoadedAgentConfig, load_agent_config
from agent.sampler import NameFilter, NvmlSource, PsutilSource, Sampler, Source
from agent.shipper import Shipper, ShipperSettings
from agent.spool import Spool
from agent.transport import CollectorLink
from common import logs
from common.errors import ConfigError, MeterdError
from common.sdnotify import Notifier

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


def open_link(cfg: LoadedAgentConfig) -> CollectorLink:
    """A connection to the collector with the agent's certificate, trusting only the CA.

    The files are read as they are: :func:`agent.identity.check_identity` has checked
    them before (and needs ``cryptography`` to, which this process does not load).
    """
    tls = cfg.raw.tls
    return CollectorLink.open(
        cfg.raw.collector, ca=cfg.path(tls.ca), cert=cfg.path(tls.cert),
        key=cfg.path(tls.key), server_name=cfg.raw.server_name,
    )


def package_version() -> str:
    """meterd's installed version (``meterd agent run`` passes it to the agent process,
    which then need not load ``importlib.metadata``)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("meterd")
    except PackageNotFoundError:
        return "0+unknown"


@dataclass
class AgentState:
    config: LoadedAgentConfig
    host_id: str
    spool: Spool
    sampler: Sampler
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    interrupt: asyncio.Event = field(default_factory=asyncio.Event)
    reload_requested: bool = False
    unshipped: int = 0  # records spooled since the shipper was last woken
    last_wake: float | None = None  # monotonic time the shipper was last woken


def _request_reload(agent: AgentState) -> None:
    agent.reload_requested = True
    agent.interrupt.set()


async def run(
    config_path: Path,
    notifier: Notifier | None = None,
    *,
    host_id: str | None = None,
    version: str | None = None,
) -> int:
    """Run the agent until SIGTERM or SIGINT. Without ``host_id`` the start-up checks
    (:func:`agent.identity.check_identity`) run here first."""
    if notifier is None:
        notifier = Notifier.from_environment(os.environ, os.getpid())
    cfg = load_agent_config(config_path)
    if host_id is None:
        from agent.identity import check_identity

        host_id = check_identity(cfg)
    spool_path = cfg.path(cfg.raw.spool_path)
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    if spool_path.exists() and not spool_path.is_file():
        raise ConfigError(str(cfg.source), "spool_path", f"{spool_path} exists and is not a "
                          "file: name the spool's file (e.g. /var/lib/meterd/agent/spool.db)")
    try:
        spool = await asyncio.to_thread(Spool, spool_path, max_bytes=cfg.raw.spool_max_bytes)
    except sqlite3.Error as exc:  # not a database, locked, unreadable, ...
        raise ConfigError(str(cfg.source), "spool_path",
                          f"cannot open the spool {spool_path}: {exc}") from None
    try:
        state = await asyncio.to_thread(spool.load_state)
        sampler = build_sampler(cfg, host_id, state)
        agent = AgentState(cfg, host_id, spool, sampler)
        try:
            link = open_link(cfg)
            try:
                return await _serve(agent, link, notifier, version=version)
            finally:
                await link.close()
        finally:
            agent.sampler.close()
    finally:
        await asyncio.to_thread(spool.close)


async def _sample_once(agent: AgentState) -> int:
    sampler = agent.sampler  # one sampler for the cycle: its records go with its state

    def cycle() -> int:  # one hop to the worker thread for the whole cycle
        records = sampler.sample()
        agent.spool.append(records, sampler.state())
        return len(records)

    count = await asyncio.to_thread(cycle)
    _schedule_shipping(agent, count, time.monotonic())
    if count:
        log.debug("sample_spooled", records=count)
    return count


def _schedule_shipping(agent: AgentState, added: int, now: float) -> None:
    """Wake the shipper when records are due: the first ones after start at once, then
    every ``[shipping] interval_seconds`` (at the sample nearest that time), or as soon
    as a full batch (``batch_max_records``) is waiting."""
    agent.unshipped += added
    if not agent.unshipped:
        return
    shipping = agent.config.raw.shipping
    half_cycle = float(agent.config.raw.interval_seconds) / 2
    if (
        agent.last_wake is None
        or agent.unshipped >= shipping.batch_max_records
        or now + half_cycle >= agent.last_wake + float(shipping.interval_seconds)
    ):
        agent.wake.set()
        agent.unshipped = 0
        agent.last_wake = now


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


async def _ship_round(agent: AgentState, link: CollectorLink, version: str) -> int:
    """Ship until the spool is empty (retrying with backoff); the records answered."""
    shipper = Shipper(agent.spool, link, shipper_settings(agent.config), version)
    return await shipper.drain()


async def _shipping_loop(agent: AgentState, link: CollectorLink, version: str) -> None:
    """Ship what is spooled, then wait until the sampling loop says records are due."""
    while True:
        await _ship_round(agent, link, version)
        await agent.wake.wait()
        agent.wake.clear()


async def _serve(
    agent: AgentState,
    link: CollectorLink,
    notifier: Notifier | None = None,
    *,
    version: str | None = None,
) -> int:
    """Sample and ship until SIGTERM or SIGINT, then take a final sample and flush.

    ``link`` is the connection to the collector; the caller closes it.
    """
    if notifier is None:
        notifier = Notifier()  # run outside a service manager: notifications are no-ops
    if version is None:
        version = package_version()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # One worker thread for every blocking call (sampling, spool): they are short and
    # the agent gains nothing from running them in parallel, while each extra thread
    # costs its own stack and malloc arena.
    loop.set_default_executor(ThreadPoolExecutor(1, thread_name_prefix="meterd-agent"))
    def request_stop() -> None:
        stop.set()
        agent.interrupt.set()

    loop.add_signal_handler(signal.SIGTERM, request_stop)
    loop.add_signal_handler(signal.SIGINT, request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: _request_reload(agent))
    sampling = asyncio.create_task(_sampling_loop(agent, stop), name="sampling")
    shipping = asyncio.create_task(_shipping_loop(agent, link, version), name="shipping")
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
        shipped = await asyncio.wait_for(_ship_round(agent, link, version), timeout=flush)
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


