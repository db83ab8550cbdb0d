"""Record validation is exact: the cheap checks and the general ones give the same
verdict, the same reason and the same record."""

from __future__ import annotations

import re
import uuid
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from common.errors import RecordError
from common.money import canonical_text, to_decimal
from common.proto import meterd_pb2 as pb
from common.records import MAX_SEQ, MAX_US, UsageRecord, build_record
from common.wire import from_proto, to_proto

ID = "0190a7c2-7d40-7b3e-9c6a-1234567890ab"

ids = st.one_of(
    st.uuids().map(str),
    st.uuids().map(lambda u: str(u).upper()),
    st.uuids().map(lambda u: u.hex),
    st.uuids().map(lambda u: "{" + str(u) + "}"),
    st.text(max_size=40),
)
quantities = st.one_of(
    st.decimals(allow_nan=False, allow_infinity=False).map(str),
    st.decimals(min_value=0, max_value=10**31, places=20).map(str),
    st.from_regex(r"[ +-]?[0-9]{0,32}(\.[0-9]{0,20})?([eE][+-]?[0-9]{1,3})?", fullmatch=True),
    st.text(alphabet="0123456789.-e_ ", max_size=45),
)
labels = st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3)


def outcome(make: object, *args: object) -> tuple[str, UsageRecord | None]:
    try:
        return "", make(*args)  # type: ignore[operator]
    except RecordError as exc:
        return str(exc), None


@given(ids, st.sampled_from(["host-a", "bad host", ""]), st.sampled_from(["net.tx_bytes", "x"]),
       quantities, st.sampled_from(["bytes", "furlongs"]), st.integers(-1, 3),
       st.integers(-1, 3), st.integers(-1, 3), labels)
def test_build_record_and_the_constructor_agree(
    record_id: str, host: str, metric: str, quantity: str, unit: str, start: int, end: int,
    seq: int, label_set: dict[str, str],
) -> None:
    args = (record_id, host, metric, quantity, unit, start, end, seq, label_set)
    reason, built = outcome(build_record, *args)
    assert outcome(UsageRecord, *args) == (reason, built)
    if built is not None:
        assert built.quantity_text == canonical_text(built.quantity)
        assert built.quantity == to_decimal(quantity)
        assert str(uuid.UUID(record_id)) == record_id


@given(quantities)
def test_quantity_text_is_accepted_as_the_general_rules_say(text: str) -> None:
    """Plain ASCII decimal text (no sign, exponent, spaces or leading zeros) within the
    magnitude, scale and digit bounds; anything else is refused with a reason."""
    reason, record = outcome(build_record, ID, "h", "a.b", text, "bytes", 0, 0, 0, {})
    try:
        value = to_decimal(text)
    except Exception:  # noqa: BLE001 (any refusal)
        assert reason
        return
    integer, point, fraction = text.partition(".")
    plain = (
        integer.isascii() and integer.isdigit() and (integer == "0" or integer[0] != "0")
        and (not point or (fraction.isascii() and fraction.isdigit()))
    )
    exponent = value.as_tuple().exponent
    fits = (
        plain
        and 0 <= value < 10**30
        and isinstance(exponent, int)
        and exponent >= -18
        and len(value.as_tuple().digits) <= 40
    )
    assert (record is not None) == fits, reason
    if record is not None:
        assert record.quantity == value
        assert record.quantity_text == canonical_text(value)


def test_a_record_from_the_wire_equals_one_built_by_hand() -> None:
    message = pb.UsageRecord(
        id=ID, host_id="host-a", metric="net.tx_bytes", quantity="1.50", unit="bytes",
        start_us=1, end_us=2, seq=3, labels={"b": "2", "a": "1"},
    )
    record = from_proto(message)
    assert record == UsageRecord(ID, "host-a", "net.tx_bytes", Decimal("1.5"), "bytes", 1, 2, 3,
                                 {"a": "1", "b": "2"})
    assert list(record.labels) == ["a", "b"]
    assert record.quantity_text == "1.5"
    with pytest.raises(TypeError):
        record.labels["c"] = "3"  # type: ignore[index]


@pytest.mark.parametrize(
    ("end_us", "seq", "reason"),
    [
        (MAX_US + 1, 0, "after the year 9999"),
        (2**63, 0, "after the year 9999"),
        (MAX_US, MAX_SEQ + 1, "2^64-1"),
    ],
)
def test_a_record_the_wire_cannot_carry_is_refused_with_its_reason(
    end_us: int, seq: int, reason: str
) -> None:
    with pytest.raises(RecordError, match=re.escape(reason)):
        UsageRecord(id=str(uuid.uuid4()), host_id="h", metric="cpu.seconds", quantity="1",
                    unit="seconds", start_us=0, end_us=end_us, seq=seq)


def test_the_latest_record_allowed_still_encodes() -> None:
    record = UsageRecord(id=str(uuid.uuid4()), host_id="h", metric="cpu.seconds",
                         quantity="1", unit="seconds", start_us=0, end_us=MAX_US, seq=MAX_SEQ)
    assert from_proto(to_proto(record)) == record
