"""Hostile batches at the real gRPC ingest, over mTLS, from a real agent certificate.

hypothesis builds ``PushRequest`` messages mixing well-formed records with hostile ones:
negative, NaN-like, infinite, huge, over-precise and non-numeric quantities; odd
unicode in every text field; reversed, negative, far-future and ancient windows;
other hosts' ids; malformed record ids; too many or oversized labels; the same id
twice in one batch (with the same or other contents); resends of records posted by
an earlier batch; empty batches and batches past ``max_batch_records``; extreme
values in the call's own fields (send time, backlog, sequence metadata).

Each call must end in one of two ways:

* a clean status (``INVALID_ARGUMENT`` for a batch the collector refuses as a whole,
  with details saying why), and nothing of that call is written; or
* ``OK`` with one answer per record: a well-formed record ``accepted`` (or
  ``duplicate`` when it was posted before or repeats an earlier record of the batch),
  a hostile one ``rejected`` with a reason, including quantity text that ``Decimal``
  would read but the wire does not define (``" 12 "``, ``"1E+3"``, ``"+5"``, digits
  of other scripts).

After all examples, the ledger (read with SQL) holds exactly the records answered
``accepted``, with the quantity, metric, labels and window they were sent with, and
nothing else; ``meterd ledger verify`` is clean; the collector still serves a normal
batch; its log has no traceback. Run on the SQLite and the PostgreSQL ledger.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import unicodedata
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum
from pathlib import Path
from typing import Any

import grpc
import hypothesis
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from common.proto import meterd_pb2 as pb
from common.proto import meterd_pb2_grpc as pb_grpc
from common.records import UNITS
from common.tls import grpc_channel_credentials
from tests.harness import CollectorProcess, meterd
from tests.pg import Databases
from tests.reliability.faults import SOAK, canonical_labels, collector_config, free_port
from tests.reliability.reconcile import LedgerView, read_pg_ledger, read_sqlite_ledger

MAX_BATCH = 64  # [ingest] max_batch_records for this collector: past it, the call fails
HOUR_US = 3_600 * 1_000_000
DAY_US = 24 * HOUR_US
EXAMPLES = 500 if SOAK else 80
REQUEST_FIELDS = set(pb.PushRequest.DESCRIPTOR.fields_by_name)

# Any unicode but NUL, whose own test is below (PostgreSQL cannot store it in text).
ODD_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\x00"),
    max_size=40,
) | st.sampled_from(["\u202e", "\ufeff", "🧾💶", "e\u0301", "ǅ", "\x7f\x01", " ", "\U0010ffff"])
# Labels refuse control characters (category Cc); everything else printable or not is
# label text.
LABEL_TEXT = st.text(
    alphabet=st.characters(codec="utf-8", exclude_categories=("Cc",)), max_size=40,
) | st.sampled_from(["\u202e", "\ufeff", "🧾💶", "e\u0301", "ǅ", " ", "\U0010ffff"])


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


class Expect(Enum):
    VALID = "valid"
    INVALID = "invalid"
    EITHER = "either"  # lenient forms: either answer, but stored exactly if accepted
    # Past the maximum lateness: rejected, or taken into quarantine for an operator
    # (``collector.billing``): never posted as usage on arrival.
    LATE = "late"


@dataclass
class Item:
    message: pb.UsageRecord
    expect: Expect
    why: str


@dataclass
class Ledger:
    """What the calls' answers say the ledger holds."""

    posted: dict[str, tuple[Any, ...]] = field(default_factory=dict)  # id -> contents
    valid_sent: list[pb.UsageRecord] = field(default_factory=list)
    failed_ids: set[str] = field(default_factory=set)  # ids only in refused calls
    rejected_only: set[str] = field(default_factory=set)
    late: set[str] = field(default_factory=set)  # answered, must not be posted as usage
    calls: int = 0
    refused_calls: int = 0


def contents(m: pb.UsageRecord) -> tuple[Any, ...]:
    return (m.metric, Decimal(m.quantity.strip()), m.start_us, m.end_us,
            tuple(sorted(m.labels.items())))


# -- strategies ---------------------------------------------------------------------------


_IDS = itertools.count(1)


def now_us() -> int:
    return time.time_ns() // 1000


@st.composite
def valid_record(draw: st.DrawFn) -> pb.UsageRecord:
    # Draws never depend on the clock or on earlier calls: hypothesis requires the
    # same choices to build the same shapes. Times are offsets from now.
    end = now_us() - draw(st.integers(0, DAY_US))
    start = end - draw(st.integers(0, HOUR_US))
    metric, unit = draw(st.sampled_from([
        ("cpu.seconds", "seconds"), ("net.tx_bytes", "bytes"),
        ("mem.used_byte_seconds", "byte_seconds"), ("gpu.util_seconds", "seconds"),
    ]))
    quantity = draw(st.decimals(min_value=0, max_value=10**15, places=draw(st.integers(0, 9)),
                                allow_nan=False, allow_infinity=False))
    labels = draw(st.dictionaries(
        st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cc",)),
                min_size=1, max_size=20),
        LABEL_TEXT, max_size=3))
    # Ids are unique by construction (a counter in the low bits): hypothesis happily
    # draws the same value twice, and a repeated id is a case of its own (below).
    record_id = uuid.UUID(int=(draw(st.integers(0, 2**64 - 1)) << 64) | next(_IDS))
    return pb.UsageRecord(
        id=str(record_id), host_id="host-a", metric=metric, unit=unit,
        quantity=f"{quantity:f}", start_us=start, end_us=end,
        seq=draw(st.integers(0, 2**62)), labels=labels,
    )


NAN_LIKE = ["NaN", "nan", "-NaN", "sNaN", "Infinity", "-Infinity", "inf", "+Inf", "1e999999",
            "", " ", "0x10", "1,5", "½", "--1", "1e", "∞", "NULL", "null"]
LENIENT = [" 12 ", "1E+3", "+5", "0012", "١٢٣", "１２", "-0", "0e5", "\t7\n", "1_000"]


@st.composite
def hostile_record(draw: st.DrawFn) -> Item:
    m = draw(valid_record())
    kind = draw(st.sampled_from([
        "negative", "nan-like", "garbage", "huge", "too precise", "lenient", "reversed",
        "negative start", "future", "ancient", "other host", "bad id", "upper-case id",
        "odd metric", "odd unit", "too many labels", "long label", "empty label key",
        "odd labels",
    ]))
    expect = Expect.INVALID
    if kind == "negative":
        m.quantity = "-" + draw(st.sampled_from(["1", "0.000001", "5e3", "1000000"]))
    elif kind == "nan-like":
        m.quantity = draw(st.sampled_from(NAN_LIKE))
    elif kind == "garbage":
        m.quantity = draw(ODD_TEXT.filter(lambda t: not _decimal_ok(t)))
    elif kind == "huge":
        m.quantity = draw(st.sampled_from(["1" + "0" * 30, "9" * 41, "1e30", "1E+400"]))
    elif kind == "too precise":
        m.quantity = "0." + "0" * 18 + "1"
    elif kind == "lenient":
        m.quantity = draw(st.sampled_from(LENIENT))
    elif kind == "reversed":
        m.start_us, m.end_us = m.end_us, m.start_us - draw(st.integers(1, HOUR_US))
    elif kind == "negative start":
        m.start_us = -draw(st.integers(1, 2**62))
    elif kind == "future":
        m.end_us = now_us() + draw(st.integers(HOUR_US, 2**62))
        m.start_us = m.end_us - 1
    elif kind == "ancient":
        m.end_us = max(0, now_us() - draw(st.integers(100 * DAY_US, 60 * 365 * DAY_US)))
        m.start_us = max(0, m.end_us - 1)
        expect = Expect.LATE
    elif kind == "other host":
        m.host_id = draw((st.sampled_from(["host-b", "HOST-A", "host-a ", ""]) | ODD_TEXT)
                         .filter(lambda t: t != "host-a"))
    elif kind == "bad id":
        m.id = draw(ODD_TEXT.filter(lambda t: not _canonical_uuid(t)))
    elif kind == "upper-case id":
        m.id = "A" + m.id[1:].upper()
    elif kind == "odd metric":
        m.metric = draw(ODD_TEXT.filter(lambda t: "." not in t or not t.isascii()))
    elif kind == "odd unit":
        m.unit = draw(ODD_TEXT.filter(lambda t: t not in UNITS))
    elif kind == "too many labels":
        for i in range(17):
            m.labels[f"k{i}"] = "v"
    elif kind == "long label":
        m.labels["k"] = "x" * 257
    elif kind == "empty label key":
        m.labels[""] = "v"
    else:
        odd = draw(st.dictionaries(ODD_TEXT.filter(bool), ODD_TEXT, max_size=4))
        m.labels.update(odd)
        control = any(_has_control(k) or _has_control(v) for k, v in odd.items())
        expect = Expect.INVALID if control else Expect.VALID
    return Item(m, expect, kind)


def _canonical_uuid(text: str) -> bool:
    try:
        return str(uuid.UUID(text)) == text
    except ValueError:
        return False


def _decimal_ok(text: str) -> bool:
    try:
        value = Decimal(text.strip())
    except ArithmeticError:
        return False
    return value.is_finite()


@st.composite
def batch(draw: st.DrawFn, ledger: Ledger) -> tuple[pb.PushRequest, list[Item], bool]:
    """A request, its items, and whether the call as a whole may be refused."""
    items: list[Item] = []
    size = draw(st.integers(0, 12))
    for _ in range(size):
        if draw(st.booleans()):
            items.append(Item(draw(valid_record()), Expect.VALID, "valid"))
        else:
            items.append(draw(hostile_record()))
    twin_of, changed, other = draw(st.integers(0, 2**16)), draw(st.booleans()), draw(
        st.integers(0, 10**6))
    if draw(st.booleans()) and items:  # the same id again in this batch
        twin = pb.UsageRecord()
        twin.CopyFrom(items[twin_of % len(items)].message)
        if changed:
            twin.quantity = str(other)
            twin.seq += 1
        items.append(Item(twin, Expect.EITHER, "same id twice"))
    resend = draw(st.integers(0, 2**16))
    if draw(st.booleans()) and ledger.valid_sent:  # a resend of an earlier batch's record
        items.append(Item(ledger.valid_sent[resend % len(ledger.valid_sent)], Expect.VALID,
                          "resend"))
    whole_batch_refusable = False
    if draw(st.integers(0, 9)) == 0:  # past the batch limit
        filler = draw(valid_record())
        for n in range(MAX_BATCH + 1 - len(items)):
            copy = pb.UsageRecord()
            copy.CopyFrom(filler)
            copy.id = str(uuid.UUID(int=(uuid.UUID(filler.id).int + n + 1) % 2**128))
            items.append(Item(copy, Expect.VALID, "filler"))
        whole_batch_refusable = True
    draw(st.randoms()).shuffle(items)
    request = pb.PushRequest(records=[i.message for i in items])
    request.agent_version = draw(ODD_TEXT)
    request.sent_at_us = draw(st.sampled_from([-(2**63), 2**63 - 1, -1, 1])
                              | st.integers(-(2**63), 2**63 - 1) | st.just(now_us()))
    request.backlog_records = draw(st.integers(0, 2**64 - 1))
    if "dead_letters" in REQUEST_FIELDS and draw(st.booleans()):
        request.dead_letters = draw(st.integers(0, 2**64 - 1))
    if "seq_epoch" in REQUEST_FIELDS and draw(st.integers(0, 4)) == 0:
        # Sequence metadata the collector may refuse as a whole (clean INVALID_ARGUMENT).
        request.seq_epoch = draw(ODD_TEXT)
        if draw(st.booleans()):
            request.seq_epoch_start = draw(st.integers(0, 2**64 - 1))
        for _ in range(draw(st.integers(0, 3))):
            r = request.retired_seqs.add()
            r.first, r.last = draw(st.integers(0, 2**64 - 1)), draw(st.integers(0, 2**64 - 1))
        whole_batch_refusable = True
    return request, items, whole_batch_refusable


# -- the collector under attack ---------------------------------------------------------


@dataclass
class Target:
    collector: CollectorProcess
    stub: pb_grpc.IngestStub
    channel: grpc.Channel
    read: Any


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.pg)])
def target(request: pytest.FixtureRequest, tmp_path: Path, rel_pki: Path) -> Iterator[Target]:
    databases: Databases | None = None
    shards: list[str] = []
    if request.param == "postgres":
        databases = Databases(request.getfixturevalue("pg_server"))
        shards = [asyncio.run(databases.create("meterd_rel"))]
    config = collector_config(tmp_path, rel_pki, free_port(), assignments={"host-a": "acme"},
                              shards=shards, ingest_extra=f"max_batch_records = {MAX_BATCH}")
    collector = CollectorProcess(config).start()
    creds = grpc_channel_credentials(rel_pki / "agents" / "host-a.pem",
                                     rel_pki / "agents" / "host-a.key", rel_pki / "ca.pem")
    channel = grpc.secure_channel(collector.target, creds, options=[
        ("grpc.max_send_message_length", 64 * 1024 * 1024)])

    def read() -> LedgerView:
        if shards:
            return read_pg_ledger(shards)
        return read_sqlite_ledger(tmp_path / "ledger.db")

    try:
        yield Target(collector, pb_grpc.IngestStub(channel), channel, read)  # type: ignore[no-untyped-call]
    finally:
        channel.close()
        collector.kill()
        if databases is not None:
            asyncio.run(databases.drop_all())


def check_call(target: Target, ledger: Ledger, request: pb.PushRequest, items: list[Item],
               refusable: bool) -> None:
    ledger.calls += 1
    try:
        response: pb.PushResponse = target.stub.Push(request, timeout=30)
    except grpc.RpcError as exc:
        code, details = exc.code(), exc.details()
        assert refusable, f"a batch without call-level faults failed with {code}: {details}"
        assert code == grpc.StatusCode.INVALID_ARGUMENT, f"call failed with {code}: {details}"
        assert details, "a refused call must say why"
        ledger.refused_calls += 1
        ledger.failed_ids |= {i.message.id for i in items} - set(ledger.posted)
        return
    answers: dict[str, list[tuple[int, str]]] = {}
    for ack in response.acks:
        answers.setdefault(ack.id, []).append((ack.outcome, ack.reason))
    assert len(response.acks) == len(items), (len(response.acks), len(items))
    for item in items:
        got = answers.get(item.message.id)
        assert got, f"no answer for {item.why} record {item.message.id!r}"
        outcomes = {o for o, _ in got}
        if item.expect is Expect.VALID:
            assert outcomes & {pb.ACCEPTED, pb.DUPLICATE}, (item.why, got, item.message)
        elif item.expect is Expect.INVALID:
            assert pb.REJECTED in outcomes, (item.why, got, item.message)
        for outcome, reason in got:
            assert outcome in (pb.ACCEPTED, pb.DUPLICATE, pb.REJECTED), got
            if outcome == pb.REJECTED:
                assert reason.strip(), f"rejected without a reason: {item.why}"
    # The model: which answer each id got, message by message, in order.
    late = {i.message.id for i in items if i.expect is Expect.LATE}
    for message, ack in zip(request.records, response.acks, strict=True):
        assert ack.id == message.id, "answers must follow the records' order"
        if message.id in late:
            if message.id not in ledger.posted:
                ledger.late.add(message.id)
        elif ack.outcome == pb.ACCEPTED:
            assert message.id not in ledger.posted, f"{message.id} accepted twice"
            ledger.posted[message.id] = contents(message)
            ledger.valid_sent.append(message)
            ledger.rejected_only.discard(message.id)
        elif ack.outcome == pb.REJECTED and message.id not in ledger.posted:
            ledger.rejected_only.add(message.id)
    ledger.failed_ids -= set(ledger.posted)


def test_hostile_batches_get_clear_answers_and_write_nothing_partial(
    target: Target, seed: int
) -> None:
    ledger = Ledger()

    # Generation only: the collector keeps what each example sent, so replaying an
    # example to shrink it would meet a different ledger.
    @hypothesis.seed(seed)
    @settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def attack(data: st.DataObject) -> None:
        request, items, refusable = data.draw(batch(ledger))
        check_call(target, ledger, request, items, refusable)

    attack()

    view = target.read()
    ours = {i: r for i, r in view.records.items() if r.host == "host-a"}
    assert set(ours) == set(ledger.posted), (
        f"ledger has {len(set(ours) - set(ledger.posted))} records never answered accepted, "
        f"misses {len(set(ledger.posted) - set(ours))} that were")
    for record_id, (metric, quantity, start, end, labels) in ledger.posted.items():
        row = ours[record_id]
        assert (row.metric, row.quantity, row.start_us, row.end_us) == (
            metric, quantity, start, end), (row, quantity)
        assert row.labels == canonical_labels(dict(labels)), (row.labels, labels)
    assert not (ledger.failed_ids | ledger.rejected_only | ledger.late) & set(ours)
    # Still serving, and nothing blew up inside.
    fresh = pb.UsageRecord(id=str(uuid.UUID(int=random.Random(seed).getrandbits(128),
                                            version=4)),
                           host_id="host-a", metric="cpu.seconds", unit="seconds",
                           quantity="1.5", start_us=now_us() - 2, end_us=now_us() - 1)
    answer = target.stub.Push(pb.PushRequest(records=[fresh]), timeout=30)
    assert [a.outcome for a in answer.acks] == [pb.ACCEPTED]
    log = target.collector.log.read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000:][:6000]
    errors = [line for line in log.splitlines() if '"level": "error"' in line]
    assert not errors, errors[:5]
    verify = meterd("ledger", "verify", "--config", str(target.collector.config))
    assert verify.returncode == 0, verify.stdout + verify.stderr
    print(f"{ledger.calls} calls ({ledger.refused_calls} refused whole), "
          f"{len(ledger.posted)} records posted, {len(ledger.rejected_only)} only rejected")


def test_a_nul_in_a_label_gets_a_per_record_answer(target: Target) -> None:
    """A label holding U+0000 (valid UTF-8, valid protobuf, impossible in a cgroup or
    interface name, so only a hostile or broken client sends it): that record is
    answered on its own and the rest of the batch is posted, whatever the store."""
    good = pb.UsageRecord(id=str(uuid.uuid4()), host_id="host-a", metric="cpu.seconds",
                          unit="seconds", quantity="2", start_us=now_us() - 2,
                          end_us=now_us() - 1)
    nul = pb.UsageRecord()
    nul.CopyFrom(good)
    nul.id = str(uuid.uuid4())
    nul.labels["cgroup"] = "a\x00b"
    response = target.stub.Push(pb.PushRequest(records=[good, nul]), timeout=30)
    outcomes = {a.id: (a.outcome, a.reason) for a in response.acks}
    assert outcomes[good.id][0] == pb.ACCEPTED
    assert outcomes[nul.id] == (pb.REJECTED, "label 'cgroup' holds a control character")
    stored = target.read().records
    assert good.id in stored
    assert nul.id not in stored


def test_a_message_past_the_size_limit_is_refused_and_the_collector_serves_on(
    target: Target
) -> None:
    """17 MiB in one call (the collector takes 16): refused by gRPC before any
    handler runs, with RESOURCE_EXHAUSTED; the next call is served."""
    record = pb.UsageRecord(id=str(uuid.uuid4()), host_id="host-a", metric="cpu.seconds",
                            unit="seconds", quantity="1", start_us=now_us() - 2,
                            end_us=now_us() - 1, labels={"k": "x" * (17 * 1024 * 1024)})
    with pytest.raises(grpc.RpcError) as info:
        target.stub.Push(pb.PushRequest(records=[record]), timeout=30)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    record.labels["k"] = "x"
    answer = target.stub.Push(pb.PushRequest(records=[record]), timeout=30)
    assert [a.outcome for a in answer.acks] == [pb.ACCEPTED]
    assert set(target.read().records) == {record.id}

