"""A gauge whose read failed keeps its integral: it is counted with the next reading.

Counters never lost the usage of a failed read (the next delta covers it); gauges
did, since a gauge that was not read restarted its baseline. Each test here sums a
gauge's records over the same span with and without a failed read in the middle.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

from agent.cgroups import CgroupSource
from agent.counters import Boot, Meter, Readings, Series, Snapshot
from agent.sampler import FixedSource, NvmlSource, Sampler
from common.records import UsageRecord
from tests.agent.test_cgroups import write_cgroup
from tests.agent.test_sampler import Clocks, FakeNvml

S = 1_000_000_000
T0_US = 1_700_000_000_000_000
MEM = Series.of("mem.used_byte_seconds", {"cgroup": "vm-a"})
BOOT = Boot("boot-1", 100 * S)


def snapshot(second: int, gauges: Mapping[Series, int] | None = None,
             held: Iterable[Series] = ()) -> Snapshot:
    readings = Readings(
        gauges={k: Decimal(v) for k, v in (gauges or {}).items()}, held=frozenset(held)
    )
    return Snapshot(second * S, T0_US + second * 1_000_000, BOOT, readings)


def total(records: Iterable[UsageRecord], metric: str = "mem.used_byte_seconds") -> Decimal:
    return sum((r.quantity for r in records if r.metric == metric), Decimal(0))


def meter(state: Mapping[str, object] | None = None) -> Meter:
    return Meter("hv-1", metrics={"mem.used_byte_seconds"}, state=state)


def test_a_held_gauge_is_integrated_over_the_failed_window_at_its_next_reading() -> None:
    m = meter()
    m.observe(snapshot(0, {MEM: 1000}))
    failed = m.observe(snapshot(10, held=[MEM]))
    assert total(failed) == 0  # nothing known yet for this window
    later = m.observe(snapshot(20, {MEM: 3000}))
    # The trapezoid between the two readings, over the 20 s between them.
    assert total(later) == (1000 + 3000) * 20 // 2


def test_held_for_several_cycles_the_total_equals_an_unbroken_series() -> None:
    unbroken, broken = meter(), meter()
    values = [1000, 1000, 1000, 1000, 1000]
    got_unbroken = got_broken = Decimal(0)
    for i, value in enumerate(values):
        got_unbroken += total(unbroken.observe(snapshot(10 * i, {MEM: value})))
        if i in (1, 2, 3):
            got_broken += total(broken.observe(snapshot(10 * i, held=[MEM])))
        else:
            got_broken += total(broken.observe(snapshot(10 * i, {MEM: value})))
    assert got_broken == got_unbroken == 1000 * 40


def test_a_gauge_neither_read_nor_held_has_vanished_and_restarts_its_baseline() -> None:
    m = meter()
    m.observe(snapshot(0, {MEM: 1000}))
    m.observe(snapshot(10))  # gone: a VM destroyed, a filesystem unmounted
    back = m.observe(snapshot(20, {MEM: 1000}))
    assert total(back) == 0


def test_a_held_gauge_that_then_vanishes_is_not_integrated_when_it_returns() -> None:
    m = meter()
    m.observe(snapshot(0, {MEM: 1000}))
    m.observe(snapshot(10, held=[MEM]))
    m.observe(snapshot(20))
    assert total(m.observe(snapshot(3600, {MEM: 1000}))) == 0


def test_a_held_gauge_survives_a_restart_through_the_state() -> None:
    m = meter()
    m.observe(snapshot(0, {MEM: 2000}))
    m.observe(snapshot(10, held=[MEM]))
    restarted = meter(state=m.state())
    assert total(restarted.observe(snapshot(30, {MEM: 2000}))) == 2000 * 30


def test_a_reboot_drops_held_gauges() -> None:
    m = meter()
    m.observe(snapshot(0, {MEM: 2000}))
    m.observe(snapshot(10, held=[MEM]))
    rebooted = Snapshot(5 * S, T0_US + 20_000_000, Boot("boot-2", 5 * S),
                        Readings(gauges={MEM: Decimal(2000)}))
    # The new boot's gauge times the part of the window the host was up, as always.
    assert total(m.observe(rebooted)) == 2000 * 5


class FlakySource:
    """A source that reads a fixed gauge and fails with an I/O error when told to."""

    def __init__(self) -> None:
        self.failing = False
        self.value = Decimal(1000)

    def read(self, metrics: Any) -> Readings:
        if self.failing:
            raise OSError(5, "Input/output error")
        return Readings(gauges={MEM: self.value})


def test_a_source_that_fails_has_its_gauges_held_by_the_sampler() -> None:
    clocks, flaky = Clocks(), FlakySource()
    s = Sampler("hv-1", FixedSource(), sources=[flaky], metrics={"mem.used_byte_seconds"},
                wall_ns=clocks.wall, mono_ns=clocks.mono)
    s.sample()
    got = Decimal(0)
    for failing in (False, True, True, False):
        clocks.advance(10 * S)
        flaky.failing = failing
        got += total(s.sample())
    assert got == 1000 * 40


def test_an_unreadable_cgroup_holds_its_memory_gauge(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write_cgroup(root, "machine.slice/vm-a.scope", usage_usec=0, memory=4096, io={})
    clocks = Clocks()
    s = Sampler("hv-1", FixedSource(), sources=[CgroupSource(["machine.slice/*"], root=root)],
                metrics={"mem.used_byte_seconds", "cpu.seconds"},
                wall_ns=clocks.wall, mono_ns=clocks.mono)
    s.sample()
    memory = root / "machine.slice/vm-a.scope/memory.current"
    got = Decimal(0)
    for readable in (True, False, True):
        clocks.advance(10 * S)
        memory.write_text("4096\n" if readable else "not a number\n")
        got += total(s.sample())
    assert got == 4096 * 30


def test_a_gpu_that_does_not_answer_has_its_gauges_held() -> None:
    nvml = FakeNvml()
    gpu = NvmlSource.open(lambda name: nvml)
    assert gpu is not None
    clocks = Clocks()
    s = Sampler("hv-1", FixedSource(), sources=[gpu], wall_ns=clocks.wall, mono_ns=clocks.mono)
    s.sample()
    answer = nvml.nvmlDeviceGetMemoryInfo

    def no_answer(handle: int) -> Any:
        raise nvml.NVMLError("GPU is lost")

    got = Decimal(0)
    for answering in (True, False, True):
        clocks.advance(10 * S)
        nvml.nvmlDeviceGetMemoryInfo = answer if answering else no_answer  # type: ignore[method-assign]
        got += total(s.sample(), "gpu.mem_byte_seconds")
    assert got == nvml.used * 30


def test_held_gauges_are_bounded_oldest_read_first() -> None:
    m = Meter("hv-1", metrics={"mem.used_byte_seconds"}, max_dormant=1)
    other = Series.of("mem.used_byte_seconds", {"cgroup": "vm-b"})
    m.observe(snapshot(0, {MEM: 1000}))
    m.observe(snapshot(10, {other: 1000}, held=[MEM]))  # MEM read at 0: the oldest
    for second in (20, 30, 40):
        m.observe(snapshot(second, held=[MEM, other]))
    back = m.observe(snapshot(60, {MEM: 1000, other: 1000}))
    assert total(r for r in back if r.labels["cgroup"] == "vm-a") == 0  # evicted
    assert total(r for r in back if r.labels["cgroup"] == "vm-b") == 1000 * 50
