"""The sampler: counter rules, integrals, windows under clock steps, restart state."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from agent.counters import Boot, Counter, Meter, Readings, Series, Snapshot
from agent.sampler import (
    FixedSource,
    NameFilter,
    NvmlSource,
    PsutilSource,
    Sampler,
    exact_seconds,
)
from agent.spool import Spool
from common.errors import ValidationError
from common.records import UsageRecord
from common.wire import from_proto, to_proto

HOST = "host-a"
T0_US = 1_700_000_000_000_000
S = 1_000_000_000  # one second in nanoseconds
ETH0 = {"interface": "eth0"}
Labels = Mapping[str, str]


class Clocks:
    """A wall clock and a monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.wall_ns = T0_US * 1000
        self.mono_ns = 5 * S

    def advance(self, ns: int) -> None:
        self.wall_ns += ns
        self.mono_ns += ns

    def wall(self) -> int:
        return self.wall_ns

    def mono(self) -> int:
        return self.mono_ns


def sampler(
    source: FixedSource, clocks: Clocks, state: Mapping[str, object] | None = None, **kw: Any
) -> Sampler:
    return Sampler(HOST, source, wall_ns=clocks.wall, mono_ns=clocks.mono, state=state, **kw)


Key = tuple[str, tuple[tuple[str, str], ...]]


def totals(records: Iterable[UsageRecord]) -> dict[Key, Decimal]:
    out: dict[Key, Decimal] = {}
    for r in records:
        key = (r.metric, tuple(sorted(r.labels.items())))
        out[key] = out.get(key, Decimal(0)) + r.quantity
    return out


def q(records: Iterable[UsageRecord], metric: str, labels: Labels | None = None) -> Decimal:
    return totals(records)[(metric, tuple(sorted((labels or {}).items())))]


def has(records: Iterable[UsageRecord], metric: str, labels: Labels | None = None) -> bool:
    return (metric, tuple(sorted((labels or {}).items()))) in totals(records)


# -- deltas, integrals, windows ------------------------------------------------------


def test_first_sample_is_a_baseline_then_windows_are_contiguous_with_exact_quantities() -> None:
    clocks, src = Clocks(), FixedSource()
    src.counter("net.rx_bytes", 1000, ETH0, instance="2")
    src.counter("cpu.seconds", Decimal("10.00"), reset_on_decrease=False)
    src.gauge("mem.used_byte_seconds", 100)
    s = sampler(src, clocks)
    assert s.sample() == []

    clocks.advance(10 * S)
    src.counter("net.rx_bytes", 1500, ETH0, instance="2")
    src.counter("cpu.seconds", Decimal("12.55"), reset_on_decrease=False)
    src.gauge("mem.used_byte_seconds", 301)
    first = s.sample()
    assert q(first, "net.rx_bytes", ETH0) == 500
    assert q(first, "cpu.seconds") == Decimal("2.55")
    assert q(first, "mem.used_byte_seconds") == Decimal("2005")  # (100 + 301) / 2 * 10
    assert q(first, "host.uptime_seconds") == 10
    assert {(r.start_us, r.end_us) for r in first} == {(T0_US, T0_US + 10_000_000)}
    units = {r.metric: r.unit for r in first}
    assert units == {"net.rx_bytes": "bytes", "cpu.seconds": "seconds",
                     "mem.used_byte_seconds": "byte_seconds", "host.uptime_seconds": "seconds"}

    clocks.advance(7 * S)
    second = s.sample()
    assert {(r.start_us, r.end_us) for r in second} == {(T0_US + 10_000_000, T0_US + 17_000_000)}
    seqs = [r.seq for r in first + second]
    assert seqs == list(range(len(seqs)))
    ids = [uuid.UUID(r.id) for r in first + second]
    assert len(set(ids)) == len(ids)
    assert {i.version for i in ids} == {7}
    assert all(r.host_id == HOST for r in first + second)


def test_trapezoid_integral_is_exact_for_odd_durations() -> None:
    clocks, src = Clocks(), FixedSource()
    src.gauge("mem.used_byte_seconds", 3)
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(1)  # one nanosecond
    src.gauge("mem.used_byte_seconds", 4)
    assert q(s.sample(), "mem.used_byte_seconds") == Decimal("3.5E-9")
    clocks.advance(1_500_000_001)
    src.gauge("mem.used_byte_seconds", 7)
    assert q(s.sample(), "mem.used_byte_seconds") == Decimal("8.250000005500")


# -- counter rules -------------------------------------------------------------------


def _two_readings(first: Counter, second: Counter) -> list[UsageRecord]:
    clocks, src = Clocks(), FixedSource()
    src.counters[Series.of("net.rx_bytes", ETH0)] = first
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(10 * S)
    src.counters[Series.of("net.rx_bytes", ETH0)] = second
    return s.sample()


def test_counter_that_goes_down_was_reset_and_counts_its_new_value() -> None:
    records = _two_readings(Counter(Decimal(5000)), Counter(Decimal(300)))
    assert q(records, "net.rx_bytes", ETH0) == 300


def test_changed_instance_is_a_reset_even_when_the_value_went_up() -> None:
    records = _two_readings(
        Counter(Decimal(5000), instance="4"), Counter(Decimal(6000), instance="9")
    )
    assert q(records, "net.rx_bytes", ETH0) == 6000


def test_32_bit_wrap_counts_the_distance_through_the_wrap() -> None:
    records = _two_readings(
        Counter(Decimal(2**32 - 100), wrap=2**32), Counter(Decimal(50), wrap=2**32)
    )
    assert q(records, "net.rx_bytes", ETH0) == 150


@pytest.mark.parametrize(
    "previous",
    [2**33, 2**31, 2**32 + 10],
    ids=["64-bit-value", "middle-of-range", "just-past-32-bits"],
)
def test_decrease_outside_the_wrap_heuristic_is_a_reset(previous: int) -> None:
    records = _two_readings(
        Counter(Decimal(previous), wrap=2**32), Counter(Decimal(50), wrap=2**32)
    )
    assert q(records, "net.rx_bytes", ETH0) == 50


def test_host_cpu_dip_without_reboot_counts_nothing_and_keeps_the_higher_baseline() -> None:
    clocks, src = Clocks(), FixedSource()
    src.counter("cpu.seconds", Decimal("100.00"), reset_on_decrease=False)
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(10 * S)
    src.counter("cpu.seconds", Decimal("99.90"), reset_on_decrease=False)
    assert q(s.sample(), "cpu.seconds") == 0
    clocks.advance(10 * S)
    src.counter("cpu.seconds", Decimal("101.25"), reset_on_decrease=False)
    assert q(s.sample(), "cpu.seconds") == Decimal("1.25")


def test_vanished_interface_gives_no_record_and_returning_continues_from_its_last_value() -> None:
    clocks, src = Clocks(), FixedSource()
    eth1 = {"interface": "eth1"}
    src.counter("net.rx_bytes", 100, ETH0)
    src.counter("net.rx_bytes", 1000, eth1, instance="3")
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(10 * S)
    src.remove("net.rx_bytes", eth1)
    src.counter("net.rx_bytes", 150, ETH0)
    gone = s.sample()
    assert not has(gone, "net.rx_bytes", eth1)
    assert q(gone, "net.rx_bytes", ETH0) == 50

    clocks.advance(10 * S)
    src.counter("net.rx_bytes", 1700, eth1, instance="3")
    back = s.sample()
    assert q(back, "net.rx_bytes", eth1) == 700


def test_interface_returning_lower_was_recreated_and_counts_from_zero() -> None:
    clocks, src = Clocks(), FixedSource()
    src.counter("net.rx_bytes", 9000, ETH0)
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(10 * S)
    src.remove("net.rx_bytes", ETH0)
    assert not has(s.sample(), "net.rx_bytes", ETH0)
    clocks.advance(10 * S)
    src.counter("net.rx_bytes", 40, ETH0)
    assert q(s.sample(), "net.rx_bytes", ETH0) == 40


def test_new_series_counts_from_zero_only_under_a_watch_declared_before() -> None:
    clocks, src = Clocks(), FixedSource()
    watch = "net.rx_bytes interfaces"
    src.scopes.add(watch)
    src.counter("net.rx_bytes", 100, ETH0, scope=watch)
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(10 * S)
    veth = {"interface": "veth7"}
    src.counter("net.rx_bytes", 700, veth, scope=watch)
    assert q(s.sample(), "net.rx_bytes", veth) == 700

    clocks.advance(10 * S)
    new_watch = "net.rx_bytes interfaces include=tap*"
    tap = {"interface": "tap0"}
    src.scopes.add(new_watch)
    src.counter("net.rx_bytes", 123_456, tap, scope=new_watch)
    assert not has(s.sample(), "net.rx_bytes", tap)
    clocks.advance(10 * S)
    src.counter("net.rx_bytes", 123_500, tap, scope=new_watch)
    assert q(s.sample(), "net.rx_bytes", tap) == 44


def test_reboot_counts_usage_since_boot_and_only_the_time_the_host_was_up() -> None:
    clocks, src = Clocks(), FixedSource(boot_id="boot-1")
    src.counter("net.rx_bytes", 10_000, ETH0)
    src.counter("cpu.seconds", Decimal("500"), reset_on_decrease=False)
    src.gauge("disk.used_byte_seconds", 1000, {"mount": "/"})
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(60 * S)
    clocks.mono_ns = 4 * S
    src.boot_id, src.uptime_ns = "boot-2", 4 * S
    src.counter("net.rx_bytes", 20_000, ETH0)
    src.counter("cpu.seconds", Decimal("1.5"), reset_on_decrease=False)
    records = s.sample()
    assert q(records, "net.rx_bytes", ETH0) == 20_000
    assert q(records, "cpu.seconds") == Decimal("1.5")
    assert q(records, "disk.used_byte_seconds", {"mount": "/"}) == 4000
    assert q(records, "host.uptime_seconds") == 4
    assert {(r.start_us, r.end_us) for r in records} == {(T0_US, T0_US + 60_000_000)}


# -- wall-clock steps ----------------------------------------------------------------


def _uptime_sampler() -> tuple[Sampler, Clocks]:
    clocks = Clocks()
    s = sampler(FixedSource(), clocks, metrics=["host.uptime_seconds"])
    s.sample()
    return s, clocks


def test_forward_wall_step_moves_timestamps_but_creates_no_usage() -> None:
    s, clocks = _uptime_sampler()
    windows: list[UsageRecord] = []
    clocks.advance(10 * S)
    windows += s.sample()
    clocks.wall_ns += 3600 * S
    clocks.advance(10 * S)
    windows += s.sample()
    clocks.advance(10 * S)
    windows += s.sample()
    assert sum(r.quantity for r in windows) == 30
    assert [(r.start_us - T0_US, r.end_us - T0_US) for r in windows] == [
        (0, 10_000_000),
        (10_000_000, 3_620_000_000),
        (3_620_000_000, 3_630_000_000),
    ]


def test_backward_wall_step_never_overlaps_windows_and_loses_no_usage() -> None:
    s, clocks = _uptime_sampler()
    windows: list[UsageRecord] = []
    clocks.advance(10 * S)
    windows += s.sample()
    clocks.wall_ns -= 30 * S
    for _ in range(5):
        clocks.advance(10 * S)
        windows += s.sample()
    assert sum(r.quantity for r in windows) == 60
    spans = [(r.start_us - T0_US, r.end_us - T0_US) for r in windows]
    assert spans == [
        (0, 10_000_000),
        (10_000_000, 10_000_000),
        (10_000_000, 10_000_000),
        (10_000_000, 10_000_000),
        (10_000_000, 20_000_000),
        (20_000_000, 30_000_000),
    ]
    assert windows[-1].end_us * 1000 == clocks.wall_ns


def test_small_wall_step_within_tolerance_leaves_timestamps_on_the_monotonic_timeline() -> None:
    s, clocks = _uptime_sampler()
    clocks.wall_ns += 400_000_000
    clocks.advance(10 * S)
    (record,) = s.sample()
    assert (record.start_us, record.end_us) == (T0_US, T0_US + 10_000_000)


# -- configuration -------------------------------------------------------------------


def test_metric_set_and_labels_apply_to_every_record() -> None:
    clocks, src = Clocks(), FixedSource()
    src.counter("net.rx_bytes", 1, ETH0)
    src.counter("net.tx_bytes", 1, ETH0)
    s = sampler(src, clocks, metrics=["net.rx_bytes"], labels={"region": "eu", "interface": "x"})
    s.sample()
    clocks.advance(S)
    src.counter("net.rx_bytes", 5, ETH0)
    (record,) = s.sample()
    assert record.metric == "net.rx_bytes"
    assert dict(record.labels) == {"region": "eu", "interface": "eth0"}


def test_unknown_metric_name_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"cpu\.secs"):
        Sampler(HOST, FixedSource(), metrics=["cpu.secs"])


def test_series_with_labels_no_record_can_carry_is_left_out_and_reported() -> None:
    clocks, src = Clocks(), FixedSource()
    long_name = {"interface": "x" * 300}
    src.counter("net.rx_bytes", 1, long_name)
    src.counter("net.rx_bytes", 1, ETH0)
    s = sampler(src, clocks)
    s.sample()
    clocks.advance(S)
    src.counter("net.rx_bytes", 3, ETH0)
    records = s.sample()
    assert q(records, "net.rx_bytes", ETH0) == 2
    assert s.meter.rejected == [Series.of("net.rx_bytes", long_name)]


def test_dormant_series_beyond_the_limit_are_forgotten_oldest_first() -> None:
    boot = Boot("b", 0)
    meter = Meter(HOST, max_dormant=1)
    names = ["a", "b", "c"]
    meter.observe(Snapshot(0, T0_US, boot, Readings(
        {Series.of("net.rx_bytes", {"interface": n}): Counter(Decimal(10)) for n in names})))
    meter.observe(Snapshot(S, T0_US + 1_000_000, boot, Readings(
        {Series.of("net.rx_bytes", {"interface": n}): Counter(Decimal(10)) for n in ["b", "c"]})))
    meter.observe(Snapshot(2 * S, T0_US + 2_000_000, boot, Readings(
        {Series.of("net.rx_bytes", {"interface": "c"}): Counter(Decimal(10))})))
    state: Any = meter.state()
    kept = {entry["labels"]["interface"] for entry in state["counters"]}
    assert kept == {"b", "c"}


def test_failing_extra_source_is_left_out_and_the_cycle_goes_on() -> None:
    class Broken:
        def read(self, metrics: object) -> Readings:
            raise OSError("gone")

    clocks, src = Clocks(), FixedSource()
    src.counter("net.rx_bytes", 1, ETH0)
    s = sampler(src, clocks, sources=[Broken()])
    s.sample()
    clocks.advance(S)
    src.counter("net.rx_bytes", 4, ETH0)
    assert q(s.sample(), "net.rx_bytes", ETH0) == 3


# -- state and restart ---------------------------------------------------------------


def test_state_round_trip_continues_exactly_within_one_boot() -> None:
    clocks, src = Clocks(), FixedSource()
    values = [1000, 1500, 2600, 2700, 4000]
    src.counter("net.rx_bytes", values[0], ETH0)
    first = sampler(src, clocks)
    records = first.sample()
    for value in values[1:3]:
        clocks.advance(10 * S)
        src.counter("net.rx_bytes", value, ETH0)
        records += first.sample()
    saved = json.loads(json.dumps(first.state()))
    clocks.advance(95 * S)  # the agent was down for a while, same boot
    second = sampler(src, clocks, state=saved)
    for value in values[3:]:
        src.counter("net.rx_bytes", value, ETH0)
        records += second.sample()
        clocks.advance(10 * S)
    assert q(records, "net.rx_bytes", ETH0) == values[-1] - values[0]
    assert q(records, "host.uptime_seconds") == 10 + 10 + 95 + 10
    ordered = sorted(records, key=lambda r: r.seq)
    assert [r.seq for r in ordered] == list(range(len(ordered)))
    windows = sorted({(r.start_us, r.end_us) for r in records})
    assert all(a[1] == b[0] for a, b in itertools.pairwise(windows))


def test_restart_after_a_reboot_starts_at_the_persisted_end_and_counts_since_boot() -> None:
    clocks, src = Clocks(), FixedSource(boot_id="boot-1")
    src.counter("net.rx_bytes", 5000, ETH0)
    first = sampler(src, clocks)
    first.sample()
    clocks.advance(10 * S)
    src.counter("net.rx_bytes", 6000, ETH0)
    before = first.sample()
    saved = json.loads(json.dumps(first.state()))
    clocks.wall_ns += 120 * S
    clocks.mono_ns = 7 * S
    src.boot_id, src.uptime_ns = "boot-2", 7 * S
    src.counter("net.rx_bytes", 250, ETH0)
    after = sampler(src, clocks, state=saved).sample()
    assert q(after, "net.rx_bytes", ETH0) == 250
    assert q(after, "host.uptime_seconds") == 7
    assert {r.start_us for r in after} == {before[0].end_us}
    assert {r.end_us for r in after} == {clocks.wall_ns // 1000}


def test_unusable_state_is_refused_with_a_reason() -> None:
    with pytest.raises(ValidationError, match="sampler state"):
        Sampler(HOST, FixedSource(), state={"version": 1, "boot_id": 3})


def test_state_persisted_through_the_spool_neither_loses_nor_double_counts(tmp_path: Path) -> None:
    path = tmp_path / "spool.db"
    clocks, src = Clocks(), FixedSource()
    counter = 10_000
    src.counter("net.tx_bytes", counter, ETH0)
    spool = Spool(path)
    s = sampler(src, clocks, state=spool.load_state())
    for step in range(3):
        spool.append(s.sample(), s.state())
        clocks.advance(10 * S)
        counter += 1000 + step
        src.counter("net.tx_bytes", counter, ETH0)
    spool.close()

    spool = Spool(path)
    restored = spool.load_state()
    assert restored is not None
    s = sampler(src, clocks, state=restored)
    for step in range(3):
        spool.append(s.sample(), s.state())
        clocks.advance(10 * S)
        counter += 77 * step
        src.counter("net.tx_bytes", counter, ETH0)
    stored = spool.next_batch(1000, 10**9)
    spool.close()
    final = counter - 77 * 2  # the last change was never sampled
    assert q(stored, "net.tx_bytes", ETH0) == final - 10_000


# -- real sources --------------------------------------------------------------------


def test_real_psutil_cycle_produces_valid_host_records() -> None:
    s = Sampler(HOST, PsutilSource())
    assert s.sample() == []
    records = s.sample()
    metrics = {r.metric for r in records}
    assert {"cpu.seconds", "mem.used_byte_seconds", "host.uptime_seconds"} <= metrics
    interfaces = {r.labels["interface"] for r in records if r.metric.startswith("net.")}
    expected = {name for name in psutil.net_io_counters(pernic=True) if name != "lo"}
    assert interfaces == expected
    assert expected
    for record in records:
        assert from_proto(to_proto(record)) == record
    assert s.state()["boot_id"] == Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def test_psutil_source_filters_interfaces() -> None:
    source = PsutilSource(interfaces=NameFilter(include=("lo",)))
    readings = source.read(frozenset({"net.rx_bytes"}))
    assert {dict(k.labels)["interface"] for k in readings.counters} == {"lo"}


def test_psutil_cpu_seconds_are_converted_exactly() -> None:
    assert exact_seconds(69.55) == Decimal("69.55")
    assert exact_seconds(0.1 + 0.2) == Decimal("0.30000000000000004")


# -- GPU -----------------------------------------------------------------------------


class FakeNvml:
    """Stands in for the pynvml module: the same function names and error class."""

    class NVMLError(Exception):
        pass

    def __init__(self, count: int = 1, fail_init: bool = False) -> None:
        self.count = count
        self.fail_init = fail_init
        self.util = 50
        self.used = 1000
        self.shut_down = False

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise self.NVMLError("driver not loaded")

    def nvmlShutdown(self) -> None:
        self.shut_down = True

    def nvmlDeviceGetCount(self) -> int:
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def nvmlDeviceGetUUID(self, handle: int) -> bytes:
        return f"GPU-{handle}".encode()

    def nvmlDeviceGetUtilizationRates(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(gpu=self.util, memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: int) -> SimpleNamespace:
        return SimpleNamespace(used=self.used, total=10**10, free=0)


def test_gpu_metrics_integrate_utilisation_and_memory() -> None:
    nvml = FakeNvml()
    gpu = NvmlSource.open(lambda name: nvml)
    assert gpu is not None
    clocks = Clocks()
    s = sampler(FixedSource(), clocks, sources=[gpu])
    s.sample()
    clocks.advance(10 * S)
    nvml.util, nvml.used = 30, 3000
    records = s.sample()
    assert q(records, "gpu.seconds", {"gpu": "GPU-0"}) == 4
    assert q(records, "gpu.mem_byte_seconds", {"gpu": "GPU-0"}) == 20_000
    s.close()
    assert nvml.shut_down


def _missing(name: str) -> Any:
    raise ImportError(name)


@pytest.mark.parametrize(
    "importer",
    [_missing, lambda name: FakeNvml(fail_init=True), lambda name: FakeNvml(count=0)],
    ids=["not-installed", "no-driver", "no-gpu"],
)
def test_gpu_is_cleanly_absent_without_library_driver_or_device(importer: Any) -> None:
    assert NvmlSource.open(importer) is None
