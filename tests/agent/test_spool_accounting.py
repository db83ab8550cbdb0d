"""The spool's size accounting: each record's share of the bound and the running total."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from agent.spool import ROW_OVERHEAD, Spool, record_size
from common.ids import new_id
from common.records import MAX_LABEL_TEXT, MAX_US, UsageRecord
from common.wire import to_proto

T0_US = 1_700_000_000_000_000

label_text = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=MAX_LABEL_TEXT)


@given(
    quantity=st.decimals(min_value=0, max_value=10**29 - 1, places=6, allow_nan=False),
    start_us=st.integers(min_value=0, max_value=MAX_US // 2),
    length_us=st.integers(min_value=0, max_value=MAX_US // 2),
    seq=st.integers(min_value=0, max_value=2**64 - 1),
    host=st.sampled_from(["h", "host-a", "x" * 128]),
    metric=st.sampled_from(["net.rx_bytes", "a.b", "disk.used_byte_seconds" + ".x" * 80]),
    labels=st.dictionaries(label_text.filter(bool), label_text, max_size=16),
)
def test_record_size_is_the_encoded_size_plus_the_row_overhead(
    quantity: Decimal, start_us: int, length_us: int, seq: int, host: str, metric: str,
    labels: dict[str, str],
) -> None:
    record = UsageRecord(
        id=new_id(), host_id=host, metric=metric, quantity=quantity, unit="bytes",
        start_us=start_us, end_us=start_us + length_us, seq=seq, labels=labels,
    )
    assert record_size(record) == to_proto(record).ByteSize() + ROW_OVERHEAD


def rec(seq: int, labels: dict[str, str] | None = None) -> UsageRecord:
    return UsageRecord(
        id=new_id(), host_id="host-a", metric="net.rx_bytes", quantity=Decimal(seq * 1000),
        unit="bytes", start_us=T0_US + seq, end_us=T0_US + seq + 10, seq=seq,
        labels={"interface": "eth0"} if labels is None else labels,
    )


def test_bytes_count_only_the_records_an_append_actually_stored(tmp_path: Path) -> None:
    with Spool(tmp_path / "s.db") as spool:
        stored = [rec(0), rec(1)]
        dead = rec(2)
        spool.append([*stored, dead])
        spool.dead_letter([(r.id, "refused") for r in spool.next_batch(10, 10**9)
                           if r.id == dead.id])
        spool.release([r.id for r in stored])
        new = [rec(3, {"cgroup": "machine.slice/vm-ä.scope"}), rec(4, {})]
        # Already stored, dead-lettered, new, and a repeat inside the same batch.
        spool.append([stored[0], dead, new[0], new[1], new[0]])
        expected = sum(record_size(r) for r in [*stored, *new])
        assert spool.stats().records == 4
        assert spool.stats().bytes == expected
    with Spool(tmp_path / "s.db") as spool:
        assert spool.stats().bytes == expected


def test_acknowledging_frees_exactly_the_bytes_of_the_records_it_deleted(
    tmp_path: Path,
) -> None:
    with Spool(tmp_path / "s.db") as spool:
        records = [rec(i) for i in range(5)]
        spool.append(records)
        batch = spool.next_batch(3, 10**9)
        acked = [batch[0].id, batch[2].id, batch[0].id, new_id()]  # repeat and unknown
        assert spool.acknowledge(acked) == 2
        assert spool.stats().records == 3
        assert spool.stats().bytes == sum(record_size(r) for r in (records[1], *records[3:]))
        assert spool.stats().in_flight == 1
