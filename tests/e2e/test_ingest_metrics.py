"""The ingest metrics count each answer's acks by outcome and its rejections by reason.
The ingest service hands the interceptor those counts with its answer, so that a
thousand acks are not read back one by one; they must be what the acks say."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from collector.config import IngestConfig
from collector.fleet import Fleet
from collector.ingest import IngestService
from collector.ingest_metrics import IngestMetricsInterceptor, observe_acks
from collector.ledger.sqlite_store import SqliteLedger
from collector.metrics import Metrics
from common.proto import meterd_pb2 as pb
from common.records import UsageRecord
from tests.e2e.test_end_to_end import samples
from tests.e2e.test_ingest_policy import push
from tests.ledger.helpers import service
from tests.tlsutil import serve_ingest

DAY_US = 86_400_000_000


def counts(metrics: Metrics) -> dict[str, float]:
    found = {}
    for family in metrics.registry.collect():
        if family.name in ("meterd_ingest_records", "meterd_ingest_rejects"):
            for s in family.samples:
                if s.name.endswith("_total"):
                    found[f"{s.name}{sorted(s.labels.items())}"] = s.value
    return found


async def test_the_counts_an_answer_gives_are_those_of_its_acks(
    tmp_path: Path, pki_dir: Path
) -> None:
    store = await SqliteLedger.open(tmp_path / "ledger.db")
    metrics, from_acks = Metrics(), Metrics()
    ingest = IngestService(lambda: service([store]), IngestConfig(), Fleet())
    server, port = await serve_ingest(ingest, pki_dir, [IngestMetricsInterceptor(metrics)])
    try:
        first = samples("host-a", 6, 1)
        fresh, later, earlier = samples("host-a", 3, 5)
        old = dataclasses.replace(earlier, start_us=earlier.start_us - 100 * DAY_US,
                                  end_us=earlier.end_us - 100 * DAY_US)
        ahead = dataclasses.replace(later, end_us=time.time_ns() // 1000 + DAY_US)
        batches: list[list[UsageRecord]] = [
            first,  # all new: the answer made from the acks' wire form
            first[:3] + samples("host-a", 2, 2),  # a resend: duplicates and new records
            [  # rejected for two reasons, one repeated in the batch, one quarantined
                *samples("host-a", 2, 3), samples("host-b", 1, 4)[0], ahead, fresh, fresh, old,
            ],
        ]
        outcomes = []
        for batch in batches:
            response = await push(pki_dir, "host-a", f"localhost:{port}", batch)
            observe_acks(from_acks, response)
            outcomes.append([a.outcome for a in response.acks])
        assert outcomes[1].count(pb.DUPLICATE) == 3
        assert [outcomes[2].count(o) for o in (pb.ACCEPTED, pb.DUPLICATE, pb.REJECTED)] == [
            4, 1, 2
        ]
        assert counts(metrics) == counts(from_acks)
        assert sum(v for k, v in counts(metrics).items() if "records_total" in k) == 6 + 5 + 7
    finally:
        await server.stop(None)
        await store.close()
