"""SIGHUP reloads the tariff; a tariff that fails ``check`` is refused and the old one stays."""

from __future__ import annotations

import signal
import time
from decimal import Decimal
from pathlib import Path

from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.wire import to_proto
from tests.e2e.test_agent_process import wait_for_event
from tests.e2e.test_end_to_end import channel
from tests.harness import CollectorProcess, collector_config
from tests.ledger.helpers import TARIFF, record


async def send_gb(collector: CollectorProcess, pki: Path, gb: int) -> None:
    ch = channel(pki, "host-a", collector.target)
    try:
        now = time.time_ns() // 1000
        response = await pb_grpc.IngestStub(ch).Push(
            pb.PushRequest(
                records=[to_proto(record(quantity=str(gb * 10**9), at_us=now - 60_000_000))]
            ),
            timeout=10,
        )
    finally:
        await ch.close()
    assert {a.outcome for a in response.acks} == {pb.ACCEPTED}


def balance(collector: CollectorProcess) -> Decimal:
    return Decimal(collector.get("/v1/accounts/acme/usage")["balance"].get("eur", "0"))


async def test_broken_tariff_is_refused_and_a_good_one_applies(
    tmp_path: Path, pki_dir: Path
) -> None:
    with CollectorProcess(collector_config(tmp_path, pki_dir)) as collector:
        assert collector.proc is not None
        await send_gb(collector, pki_dir, 100)
        assert balance(collector) == Decimal("1.30")  # 100 GB at 0.013

        tariff = tmp_path / "tariff.toml"
        tariff.write_text(
            TARIFF.replace('unit_amount_decimal = "0.013"', "unit_amount_decimal = 0.5")
        )
        collector.proc.send_signal(signal.SIGHUP)
        [refused] = wait_for_event(collector.log, "reload_refused")
        assert "tariff.toml" in refused["error"]
        assert "float" in refused["error"]
        await send_gb(collector, pki_dir, 100)
        assert balance(collector) == Decimal("2.60")  # the old price still in force

        tariff.write_text(TARIFF.replace('"0.013"', '"0.020"'))
        collector.proc.send_signal(signal.SIGHUP)
        wait_for_event(collector.log, "configuration_reloaded")
        await send_gb(collector, pki_dir, 100)
        # Usage already posted keeps its price; the new price applies at the margin:
        # round(300 GB x 0.020) - round(200 GB x 0.020) = 2.00.
        assert balance(collector) == Decimal("4.60")
