"""The spool: durability, delivery marks, dead letters and exact compaction."""

from __future__ import annotations

import itertools
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.spool import HOUR_US, Spool
from common.ids import new_id
from common.money import CONTEXT
from common.records import UsageRecord
from common.wire import to_proto

T0_US = 1_700_000_000_000_000 - 1_700_000_000_000_000 % HOUR_US
ETH0 = {"interface": "eth0"}


def rec(
    seq: int,
    quantity: Decimal | int = 1,
    *,
    metric: str = "net.rx_bytes",
    labels: Mapping[str, str] | None = None,
    start_us: int | None = None,
    length_us: int = 10_000_000,
    host: str = "host-a",
) -> UsageRecord:
    start = T0_US + seq * length_us if start_us is None else start_us
    return UsageRecord(
        id=new_id(), host_id=host, metric=metric, quantity=Decimal(quantity),
        unit="bytes" if metric.endswith("bytes") else "seconds",
        start_us=start, end_us=start + length_us, seq=seq,
        labels=ETH0 if labels is None else labels,
    )


def key(r: UsageRecord) -> tuple[str, str, str, tuple[tuple[str, str], ...]]:
    return (r.host_id, r.metric, r.unit, tuple(sorted(r.labels.items())))


def exact_sum(values: Iterable[Decimal]) -> Decimal:
    """A sum in the project's 50-digit context (the ambient one rounds at 28 digits)."""
    total = Decimal(0)
    for value in values:
        total = CONTEXT.add(total, value)
    return total


def totals(records: Iterable[UsageRecord]) -> dict[tuple[object, ...], Decimal]:
    grouped: dict[tuple[object, ...], list[Decimal]] = {}
    for r in records:
        grouped.setdefault(key(r), []).append(r.quantity)
    return {k: exact_sum(v) for k, v in grouped.items()}


def everything(spool: Spool) -> list[UsageRecord]:
    """All queued records, without leaving any of them marked in flight."""
    records = spool.next_batch(10**9, 10**12)
    spool.release(r.id for r in records)
    return records


# -- durability and basics -----------------------------------------------------------


def test_spool_uses_wal_with_full_sync(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    try:
        conn = spool._conn
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        spool.close()


def test_state_is_stored_with_the_records_and_kept_when_an_append_carries_none(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path / "s.db") as spool:
        assert spool.load_state() is None
        spool.append([rec(0)], {"next_seq": 1, "counters": [{"value": "12.5"}]})
        spool.append([rec(1)])
    with Spool(tmp_path / "s.db") as spool:
        assert spool.load_state() == {"next_seq": 1, "counters": [{"value": "12.5"}]}
        assert spool.stats().records == 2


def test_appending_the_same_record_again_changes_nothing(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        records = [rec(i) for i in range(3)]
        spool.append(records)
        before = spool.stats()
        spool.append(records)
        assert spool.stats() == before
        assert [r.id for r in everything(spool)] == [r.id for r in records]


def test_records_come_back_exactly_as_stored(tmp_path: Path) -> None:
    record = rec(7, Decimal("123.000000001"), metric="cpu.seconds",
                 labels={"cgroup": "machine.slice/vm-ä.scope", "region": "eu"})
    with Spool(tmp_path / "s.db") as spool:
        spool.append([record])
    with Spool(tmp_path / "s.db") as spool:
        assert everything(spool) == [record]


def test_meta_values_round_trip(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        assert spool.get_meta("last_error") is None
        spool.set_meta("last_error", "UNAVAILABLE: connection refused")
        spool.set_meta("last_error", "")
        spool.set_meta("clock_skew_us", "-1500")
        assert spool.get_meta("last_error") == ""
        assert spool.get_meta("clock_skew_us") == "-1500"


def test_closed_spool_refuses_work(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s.db")
    spool.close()
    with pytest.raises(sqlite3.ProgrammingError):
        spool.append([rec(0)])


# -- delivery ------------------------------------------------------------------------


def test_next_batch_is_oldest_first_and_bounded_by_count(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        records = [rec(i) for i in range(10)]
        spool.append(records[:4])
        spool.append(records[4:])
        assert spool.next_batch(3, 10**9) == records[:3]
        assert spool.stats().in_flight == 3
        assert spool.next_batch(5, 10**9) == records[:5]  # unanswered ones come back first


def test_next_batch_is_bounded_by_encoded_bytes_but_returns_at_least_one(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        records = [rec(i) for i in range(1, 6)]  # seq 0 would encode one byte shorter
        spool.append(records)
        size = to_proto(records[0]).ByteSize()
        assert all(to_proto(r).ByteSize() == size for r in records)
        assert spool.next_batch(100, size * 2 + size // 2) == records[:2]
        assert spool.next_batch(100, size * 3) == records[:3]
        assert spool.next_batch(100, 1) == records[:1]


def test_acknowledge_deletes_and_counts_only_stored_records(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        records = [rec(i) for i in range(4)]
        spool.append(records)
        batch = spool.next_batch(2, 10**9)
        assert spool.acknowledge([r.id for r in batch] + [new_id()]) == 2
        assert spool.acknowledge([batch[0].id]) == 0
        stats = spool.stats()
        assert (stats.records, stats.in_flight) == (2, 0)
        assert stats.oldest_start_us == records[2].start_us
        assert everything(spool) == records[2:]


def test_bytes_follow_appends_acks_and_reopening(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        spool.append([rec(i) for i in range(6)])
        full = spool.stats().bytes
        spool.acknowledge([r.id for r in spool.next_batch(3, 10**9)])
        half = spool.stats().bytes
        assert 0 < half < full
    with Spool(tmp_path / "s.db") as spool:
        assert spool.stats().bytes == half
        spool.acknowledge([r.id for r in spool.next_batch(10, 10**9)])
        assert (spool.stats().bytes, spool.stats().records) == (0, 0)


# -- dead letters --------------------------------------------------------------------


def test_rejected_records_become_dead_letters_with_reason_and_can_be_requeued(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path / "s.db", clock_us=lambda: 42) as spool:
        records = [rec(i) for i in range(4)]
        spool.append(records)
        spool.next_batch(4, 10**9)
        moved = spool.dead_letter([(records[1].id, "metric not allowed"),
                                   (records[2].id, "host_id mismatch"),
                                   (new_id(), "unknown")])
        assert moved == 2
        dead = {d.record.id: (d.reason, d.dead_at_us) for d in spool.dead_letters()}
        assert dead == {records[1].id: ("metric not allowed", 42),
                        records[2].id: ("host_id mismatch", 42)}
        assert [d.record for d in spool.dead_letters()] == records[1:3]
        assert spool.stats().dead_letters == 2
        assert [r.id for r in spool.next_batch(10, 10**9)] == [records[0].id, records[3].id]

        spool.append([records[1]])  # a resend of a rejected record is not queued again
        assert spool.stats().records == 2

        assert spool.requeue_dead_letters([records[2].id]) == 1
        assert [d.record.id for d in spool.dead_letters()] == [records[1].id]
        assert spool.requeue_dead_letters() == 1
        stats = spool.stats()
        assert (stats.records, stats.dead_letters) == (4, 0)
        assert {r.id for r in spool.next_batch(10, 10**9)} == {r.id for r in records}


# -- compaction ----------------------------------------------------------------------


def test_full_spool_compacts_oldest_records_into_coarser_windows_with_exact_totals(
    tmp_path: Path,
) -> None:
    ids = iter(new_id() for _ in range(1000))
    with Spool(tmp_path / "s.db", max_bytes=8_000, id_factory=lambda: next(ids)) as spool:
        sevenths = [(Decimal(i) / 7).quantize(Decimal("1E-18")) for i in range(60)]
        appended = [rec(i, sevenths[i] if i % 2 else i, length_us=600_000_000)
                    for i in range(60)]  # ten minutes each: ten hours
        for i in range(0, 60, 3):
            spool.append(appended[i:i + 3])
        stored = everything(spool)
        stats = spool.stats()
    assert stats.bytes <= 8_000
    assert not stats.full
    assert len(stored) < len(appended)
    assert totals(stored) == totals(appended)
    assert stored[-1] == appended[-1]  # the newest usage keeps its resolution
    merged = [r for r in stored if r.end_us - r.start_us > 600_000_000]
    assert merged
    for r in merged:
        sources = [a for a in appended if r.start_us <= a.start_us and a.end_us <= r.end_us]
        assert r.seq == sources[-1].seq
        assert r.quantity == exact_sum(a.quantity for a in sources)
    windows = sorted((r.start_us, r.end_us) for r in stored)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))


def test_in_flight_records_are_never_compacted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    with Spool(path, max_bytes=6_000) as spool:
        spool.append([rec(i) for i in range(10)])
        in_flight = spool.next_batch(4, 10**9)
    with Spool(path, max_bytes=6_000) as spool:  # the mark survives a restart
        more = [rec(i) for i in range(10, 60)]
        for i in range(0, 50, 5):
            spool.append(more[i:i + 5])
        stored = spool.next_batch(10**9, 10**12)
        assert len(stored) < 60
        assert stored[:4] == in_flight
        for r in stored[4:]:
            assert r.start_us >= in_flight[-1].end_us
        assert spool.acknowledge(r.id for r in in_flight) == 4
        rest = spool.next_batch(10**9, 10**12)
    assert sum(r.quantity for r in rest) == 56


def test_released_records_may_be_compacted_again(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_bytes=4_000) as spool:
        spool.append([rec(i) for i in range(10)])
        batch = spool.next_batch(10, 10**9)
        assert spool.release(r.id for r in batch) == 10
        assert spool.stats().in_flight == 0
        spool.append([rec(i) for i in range(10, 30)])
        stored = everything(spool)
    assert stored[0].id not in {r.id for r in batch}
    assert sum(r.quantity for r in stored) == 30


def test_spool_that_cannot_compact_keeps_appending_and_says_it_is_full(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db", max_bytes=3_000) as spool:
        distinct = [rec(i, labels={"interface": f"tap{i}"}) for i in range(40)]
        for i in range(0, 40, 4):
            spool.append(distinct[i:i + 4])
        stats = spool.stats()
        assert stats.full
        assert stats.records == 40
        assert stats.bytes > 3_000
        assert {r.id for r in everything(spool)} == {r.id for r in distinct}


series_keys = st.sampled_from([
    ("net.rx_bytes", {"interface": "eth0"}),
    ("net.rx_bytes", {"interface": "eth1"}),
    ("cpu.seconds", {}),
    ("cpu.seconds", {"cgroup": "machine.slice/vm-a.scope"}),
])
quantities = st.decimals(min_value=0, max_value=10**12, places=9, allow_nan=False)
steps = st.lists(
    st.tuples(series_keys, quantities, st.integers(min_value=1, max_value=3 * HOUR_US),
              st.integers(min_value=0, max_value=3)),
    min_size=1, max_size=120,
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=steps, max_bytes=st.integers(min_value=2_000, max_value=12_000))
def test_compaction_keeps_totals_exact_and_in_flight_records_intact(
    steps: list[tuple[tuple[str, dict[str, str]], Decimal, int, int]], max_bytes: int
) -> None:
    appended: list[UsageRecord] = []
    ends: dict[str, int] = {}
    acked: list[UsageRecord] = []
    in_flight: dict[str, UsageRecord] = {}
    with (
        tempfile.TemporaryDirectory() as tmp,
        Spool(Path(tmp) / "s.db", max_bytes=max_bytes) as spool,
    ):
        for seq, ((metric, labels), quantity, length, action) in enumerate(steps):
            name = metric + repr(sorted(labels.items()))
            start = ends.get(name, T0_US)
            ends[name] = start + length
            record = rec(seq, quantity, metric=metric, labels=labels,
                         start_us=start, length_us=length)
            spool.append([record])
            appended.append(record)
            if action == 1:
                for r in spool.next_batch(3, 10**9):
                    in_flight[r.id] = r
            elif action == 2 and in_flight:
                done = list(in_flight.values())[:2]
                assert spool.acknowledge(r.id for r in done) == len(done)
                acked += done
                for r in done:
                    del in_flight[r.id]
        stored = spool.next_batch(10**9, 10**12)
        spool.release(r.id for r in stored)
    by_id = {r.id: r for r in stored}
    for r in in_flight.values():
        assert by_id[r.id] == r
    assert totals(stored + acked) == totals(appended)
    assert len({r.id for r in stored + acked}) == len(stored) + len(acked)


# -- crash durability ----------------------------------------------------------------

WRITER = r"""
import sys
from pathlib import Path
from agent.spool import Spool
from common.ids import new_id
from common.money import CONTEXT
from common.records import UsageRecord

spool = Spool(Path(sys.argv[1]))
state = spool.load_state()
n = 0 if state is None else state["n"] + 1
while True:
    records = [
        UsageRecord(id=new_id(), host_id="host-a", metric="net.rx_bytes", quantity=n,
                    unit="bytes", start_us=n * 10, end_us=n * 10 + 10, seq=2 * n + i,
                    labels={"interface": f"eth{i}"})
        for i in range(2)
    ]
    spool.append(records, {"n": n})
    print(n, records[0].id, records[1].id, flush=True)
    n += 1
"""


def test_every_committed_record_survives_sigkill_and_state_matches_records(
    tmp_path: Path,
) -> None:
    path = tmp_path / "spool.db"
    reported: dict[int, tuple[str, str]] = {}
    for kill_after in (5, 40, 17):
        with subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        ) as child:
            assert child.stdout is not None
            seen = 0
            while seen < kill_after:
                line = child.stdout.readline()
                assert line, "the writer stopped before it was killed"
                n, a, b = line.split()
                reported[int(n)] = (a, b)
                seen += 1
            os.kill(child.pid, signal.SIGKILL)
            child.wait()
            for line in child.stdout:
                n, a, b = line.split()
                reported[int(n)] = (a, b)
        assert child.returncode == -signal.SIGKILL

        with Spool(path) as spool:
            state = spool.load_state()
            stored = spool.next_batch(10**9, 10**12)
            spool.release(r.id for r in stored)
        assert state is not None
        last = state["n"]
        assert isinstance(last, int)
        assert last >= max(reported)
        ids = {r.id for r in stored}
        assert all(a in ids and b in ids for a, b in reported.values())
        assert sorted(r.seq for r in stored) == list(range(2 * (last + 1)))
