"""A batch checked a column at a time gets the verdicts of its records checked one by
one: records equal to theirs when every one is valid, and nothing otherwise."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st

from common.errors import RecordError
from common.proto import meterd_pb2 as pb
from common.records import UsageRecord, build_record, build_records, build_series_batch
from tests.test_records import ids, labels, quantities

rows = st.tuples(
    st.one_of(ids, st.uuids().map(str), st.uuids().map(str)),
    st.sampled_from(["host-a", "host-b", "bad host"]),
    st.sampled_from(["net.tx_bytes", "cpu.seconds", "x"]),
    st.one_of(quantities, st.sampled_from(["0", "1", "1.5", "1.50", "12345678901234567890"])),
    st.sampled_from(["bytes", "seconds", "furlongs"]),
    st.integers(-1, 3),
    st.integers(-1, 3),
    st.integers(-1, 3),
    st.one_of(labels, st.just({}), st.just({"cgroup": "a"})),
)


def one_by_one(batch: list[tuple[object, ...]]) -> list[UsageRecord] | None:
    try:
        return [build_record(*row) for row in batch]  # type: ignore[arg-type]
    except RecordError:
        return None


@given(st.lists(rows, min_size=1, max_size=4))
def test_a_batch_gets_the_verdicts_of_its_records(batch: list[tuple[object, ...]]) -> None:
    columns = [list(column) for column in zip(*batch, strict=True)]
    built = build_records(*columns)
    expected = one_by_one(batch)
    if built is None:  # the caller then goes record by record
        plain = all(
            isinstance(q, str) and q == q.strip() and q.replace(".", "", 1).isdigit()
            and q[0] != "-" and (q == "0" or not q.startswith("0")) and "e" not in q
            and len(q) <= 30 and len(q.partition(".")[2]) <= 18
            for q in columns[3]
        )
        assert expected is None or not plain
        return
    assert expected is not None
    assert built == expected
    assert [r.quantity_text for r in built] == [r.quantity_text for r in expected]
    assert all(a.labels is b.labels for a, b in zip(built, expected, strict=True))


series_entries = st.tuples(
    st.sampled_from(["net.tx_bytes", "cpu.seconds", "x"]),
    st.sampled_from(["bytes", "seconds", "furlongs"]),
    st.one_of(labels, st.just({}), st.just({"cgroup": "a"})),
)
series_rows = st.tuples(
    st.one_of(ids, st.uuids().map(str), st.uuids().map(str)),
    st.integers(0, 3),  # an index into the table, which may have fewer entries
    st.one_of(quantities, st.sampled_from(["0", "1", "1.5", "1.50", "12345678901234567890"])),
    st.integers(-1, 3),
    st.integers(-1, 3),
    st.integers(-1, 3),
)


@given(
    st.sampled_from(["host-a", "bad host"]),
    st.lists(series_entries, min_size=1, max_size=3),
    st.lists(series_rows, min_size=1, max_size=4),
)
def test_a_batch_by_series_gets_the_verdicts_of_its_records(
    host: str,
    table: list[tuple[str, str, dict[str, str]]],
    batch: list[tuple[str, int, str, int, int, int]],
) -> None:
    record_ids, kinds, amounts, starts, ends, seqs = (list(c) for c in zip(*batch, strict=True))
    batch_ = build_series_batch(host, record_ids, kinds, table, amounts, starts, ends, seqs)
    built = None if batch_ is None else list(batch_)
    if any(k >= len(table) for k in kinds):
        assert built is None  # the caller rejects those records with their own reason
        return
    rows = [(i, host, table[k][0], q, table[k][1], s, e, n, table[k][2])
            for i, k, q, s, e, n in batch]
    expected = one_by_one(rows)
    if built is None:  # the caller then goes record by record
        plain = all(
            q == q.strip() and q.replace(".", "", 1).isdigit() and "e" not in q
            and (q == "0" or not q.startswith("0")) and len(q) <= 30
            and len(q.partition(".")[2]) <= 18
            for q in amounts
        )
        # A series no record uses is checked too: a bad one sends the batch that way.
        unused_bad = any(
            one_by_one([(str(uuid.uuid4()), host, m, "1", u, 0, 0, 0, lab)]) is None
            for j, (m, u, lab) in enumerate(table) if j not in kinds
        )
        assert expected is None or not plain or unused_bad
        return
    assert expected is not None
    assert batch_ is not None
    assert built == expected
    assert [r.quantity_text for r in built] == [r.quantity_text for r in expected]
    assert all(a.labels is b.labels for a, b in zip(built, expected, strict=True))
    # The columns the ingest path reads say what the records say.
    assert batch_.quantity_texts == [r.quantity_text for r in expected]
    assert batch_.values == [r.quantity for r in expected]
    assert [batch_.labels[k] for k in batch_.series] == [r.labels for r in expected]
    assert len(batch_) == len(expected)
    assert batch_[-1] == expected[-1]


def near_misses(text: str) -> list[str]:
    """``text`` with one character replaced, inserted or removed, or two neighbours
    swapped, at every position."""
    found = []
    for at in range(len(text) + 1):
        for c in ("-", "\n", "0", "f", "g", "A", "F", "\u00e9", "\u0661", " "):
            found += [text[:at] + c + text[at + 1:], text[:at] + c + text[at:]]
        found.append(text[:at] + text[at + 1:])
        found.append(text[:at] + text[at + 1:at + 2] + text[at:at + 1] + text[at + 2:])
    return found


def test_the_id_column_check_agrees_with_the_pattern() -> None:
    from common.records import _UUID_TEXT, _uuid_column

    def agrees(column: list[str]) -> bool:
        return _uuid_column(column) == all(_UUID_TEXT.fullmatch(v) for v in column)

    good, other = str(uuid.uuid4()), str(uuid.uuid4())
    assert _uuid_column([good])
    assert _uuid_column([good, other, good])
    for miss in near_misses(good):  # first, in the middle, last, alone
        for column in ([miss], [miss, other], [other, miss, good], [good, other, miss]):
            assert agrees(column), column
    # The newline between two ids moved: lengths that add up, dashes where they were.
    joined = f"{good}\n{other}\n{good}"
    for shift in range(-36, 37):
        cut = 36 + shift
        moved = joined[:36] + joined[37:]
        column = [moved[:cut], *moved[cut:].split("\n")]
        assert agrees(column), column
    assert not _uuid_column([good, 36])  # type: ignore[list-item]
    assert not _uuid_column([good.upper()])


def test_acks_from_their_wire_form_equal_acks_added_one_by_one() -> None:
    from collector.ingest import _accepted_acks

    record_ids = [str(uuid.uuid4()) for _ in range(3)]
    added = pb.PushResponse(clock_skew_us=-7)
    for record_id in record_ids:
        added.acks.add(id=record_id, outcome=pb.ACCEPTED)
    parsed = pb.PushResponse.FromString(_accepted_acks(record_ids))
    parsed.clock_skew_us = -7
    assert parsed == added
    assert parsed.SerializeToString() == added.SerializeToString()
