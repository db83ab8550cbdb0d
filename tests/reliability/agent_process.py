"""A real agent process whose usage is known exactly: for crash tests only.

``meterd agent run`` samples psutil, whose totals a test cannot know beforehand. This
script runs the agent's own loop (:func:`agent.daemon._serve`: the sampling loop, the
shipper, the signal handling and the final sample on SIGTERM) with the real
:class:`~agent.sampler.Sampler`, :class:`~agent.spool.Spool` and
:class:`~agent.shipper.Shipper`, built from a real agent TOML file. Only the source of
raw values differs: a :class:`~agent.sampler.FixedSource` whose counters are set,
each cycle, from a JSON file that the test process advances (it plays the kernel).
Usage sampled is then exactly the counters' advance, which the test knows.

Observation hooks, none changing behaviour:

- every id the collector acknowledged is appended to ``--ack-log`` (one per line)
  before the spool deletes it, so the test can check that nothing acknowledged is
  missing from the ledger;
- ``--spool-max-bytes`` sets the spool bound below the configuration's 1 MiB floor,
  so a test can fill the spool in seconds;
- ``--batch-log`` appends every batch the shipper takes from the spool, as the
  base64 of a serialized ``PushRequest`` (one line, one write), so a test can deliver
  the very same batches again (a duplicate storm);
- ``--read-seconds`` makes each read of the source take that long (a slow source:
  NVML, thousands of cgroups), so a signal can land in the middle of a sample.

Run as ``python -m tests.reliability.agent_process --config agent.toml --counters
counters.json --ack-log acks.log``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import inspect
import json
import os
import time
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent import daemon
from agent.config import load_agent_config
from agent.counters import Boot, Readings
from agent.sampler import FixedSource, Sampler
from agent.spool import Spool
from common import logs
from common.pki import check_private_key_file, host_id_from_certificate
from common.proto import meterd_pb2 as pb
from common.records import UsageRecord
from common.wire import to_proto


class CounterFileSource:
    """A host source: a :class:`FixedSource` whose counters are loaded from a file.

    The file is ``{"boot_id": ..., "counters": [{"metric", "labels", "value"}]}``,
    replaced atomically by the test; each read sets the fixed source's counters from it.
    ``read_seconds`` makes each read take that long first, as a slow source would.
    """

    def __init__(self, path: Path, read_seconds: float = 0.0) -> None:
        self.path = path
        self.read_seconds = read_seconds
        self.fixed = FixedSource()

    def boot(self) -> Boot:
        return self.fixed.boot()

    def read(self, metrics: AbstractSet[str]) -> Readings:
        if self.read_seconds:
            time.sleep(self.read_seconds)  # a slow source: NVML, thousands of cgroups
        data = json.loads(self.path.read_text())
        self.fixed.boot_id = data["boot_id"]
        for item in data["counters"]:
            self.fixed.counter(item["metric"], Decimal(item["value"]), item["labels"])
        return self.fixed.read(metrics)


class AckLoggingSpool(Spool):
    """The real spool, plus an append-only log of acknowledged ids (and, optionally, of
    the batches handed to the shipper)."""

    def __init__(
        self, path: Path, *, ack_log: Path, batch_log: Path | None = None, **options: Any
    ) -> None:
        super().__init__(path, **options)
        self._ack_fd = os.open(ack_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._batch_fd = (
            -1 if batch_log is None
            else os.open(batch_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        )

    def next_batch(self, max_records: int, max_bytes: int) -> list[UsageRecord]:
        batch = super().next_batch(max_records, max_bytes)
        if batch and self._batch_fd >= 0:
            request = pb.PushRequest(records=[to_proto(r) for r in batch])
            os.write(self._batch_fd, base64.b64encode(request.SerializeToString()) + b"\n")
        return batch

    def acknowledge(self, ids: Iterable[str]) -> int:
        wanted = list(ids)
        if wanted:
            # One write(2): a kill -9 cannot leave half of it; the page cache keeps it.
            os.write(self._ack_fd, "".join(f"{i}\n" for i in wanted).encode())
        return super().acknowledge(wanted)

    def close(self) -> None:
        super().close()
        for fd in (self._ack_fd, self._batch_fd):
            if fd >= 0:
                os.close(fd)
        self._ack_fd = self._batch_fd = -1


async def run(
    config_path: Path,
    counters: Path,
    ack_log: Path,
    max_bytes: int | None = None,
    read_seconds: float = 0.0,
    batch_log: Path | None = None,
) -> int:
    """:func:`agent.daemon.run`, with the counter-file source instead of psutil."""
    cfg = load_agent_config(config_path)
    tls = cfg.raw.tls
    check_private_key_file(cfg.path(tls.key))
    host_id = host_id_from_certificate(cfg.path(tls.cert).read_bytes())
    spool_path = cfg.path(cfg.raw.spool_path)
    spool_path.parent.mkdir(parents=True, exist_ok=True)
    spool = await asyncio.to_thread(
        AckLoggingSpool, spool_path, ack_log=ack_log, batch_log=batch_log,
        max_bytes=max_bytes if max_bytes is not None else cfg.raw.spool_max_bytes,
    )
    try:
        state = await asyncio.to_thread(spool.load_state)
        sampler = Sampler(
            host_id,
            CounterFileSource(counters, read_seconds),
            metrics=cfg.raw.metrics.enabled or None,
            labels=cfg.raw.metrics.labels,
            state=state,
        )
        agent = daemon.AgentState(cfg, host_id, spool, sampler)
        link = daemon.open_link(cfg)
        try:
            return await daemon._serve(agent, link, **_serve_extras())
        finally:
            await link.close()
            agent.sampler.close()
    finally:
        await asyncio.to_thread(spool.close)


def _serve_extras() -> dict[str, Any]:
    """Keyword arguments :func:`agent.daemon._serve` takes besides the agent and the
    channel: a no-op systemd notifier where it takes one (the daemon gained it while
    this suite was written; either version runs here)."""
    if "notifier" not in inspect.signature(daemon._serve).parameters:
        return {}
    from common.sdnotify import Notifier  # type: ignore[import-not-found,unused-ignore]

    return {"notifier": Notifier()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--counters", type=Path, required=True)
    parser.add_argument("--ack-log", type=Path, required=True)
    parser.add_argument("--spool-max-bytes", type=int, default=None)
    parser.add_argument("--read-seconds", type=float, default=0.0)
    parser.add_argument("--batch-log", type=Path, default=None)
    args = parser.parse_args()
    logs.configure("info")
    return asyncio.run(
        run(args.config, args.counters, args.ack_log, args.spool_max_bytes, args.read_seconds,
            args.batch_log)
    )


if __name__ == "__main__":
    raise SystemExit(main())
