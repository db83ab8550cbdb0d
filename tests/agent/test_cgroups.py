"""cgroup v2 metering against a cgroupfs tree laid out as the kernel lays it out."""

from __future__ import annotations

import shutil
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path

import pytest

from agent.cgroups import CgroupSource, parse_cpu_usage_usec, parse_io_stat
from agent.sampler import FixedSource, Sampler
from common.errors import ConfigError
from common.records import UsageRecord

S = 1_000_000_000
VM_A = "machine.slice/vm-a.scope"
VM_B = "machine.slice/vm-b.scope"
DOCKER = "system.slice/docker-3f2a9c.scope"
SSHD = "system.slice/sshd.service"
CGROUP_METRICS = ["cpu.seconds", "mem.used_byte_seconds", "disk.read_bytes", "disk.write_bytes"]


def cpu_stat(usage_usec: int) -> str:
    user = usage_usec * 2 // 3
    return (
        f"usage_usec {usage_usec}\n"
        f"user_usec {user}\n"
        f"system_usec {usage_usec - user}\n"
        "nice_usec 0\n"
        "core_sched.force_idle_usec 0\n"
        "nr_periods 0\n"
        "nr_throttled 0\n"
        "throttled_usec 0\n"
        "nr_bursts 0\n"
        "burst_usec 0\n"
    )


def io_stat(devices: Mapping[str, tuple[int, int]]) -> str:
    return "".join(
        f"{dev} rbytes={r} wbytes={w} rios={r // 4096} wios={w // 4096} dbytes=0 dios=0\n"
        for dev, (r, w) in devices.items()
    )


def write_cgroup(
    root: Path,
    relative: str,
    *,
    usage_usec: int | None = 0,
    memory: int | None = 0,
    io: Mapping[str, tuple[int, int]] | None = None,
) -> None:
    """One cgroup directory with the interface files the kernel creates in it."""
    path = root / relative
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text("")
    (path / "cgroup.controllers").write_text("cpu io memory pids\n")
    (path / "cgroup.events").write_text("populated 1\nfrozen 0\n")
    (path / "cpu.pressure").write_text(
        "some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n"
    )
    if usage_usec is not None:
        (path / "cpu.stat").write_text(cpu_stat(usage_usec))
    if memory is not None:
        (path / "memory.current").write_text(f"{memory}\n")
    if io is not None:
        (path / "io.stat").write_text(io_stat(io))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "cgroup"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids rdma misc\n")
    (root / "cgroup.subtree_control").write_text("cpu io memory pids\n")
    (root / "cpu.stat").write_text(cpu_stat(99_000_000))
    for slice_ in ("machine.slice", "system.slice"):
        write_cgroup(root, slice_, usage_usec=50_000_000, memory=10**9, io={})
    write_cgroup(root, VM_A, usage_usec=1_000_000, memory=2 * 2**30,
                 io={"8:0": (4096, 8192), "253:0": (1000, 0)})
    write_cgroup(root, VM_B, usage_usec=3_500_001, memory=2**30, io={})
    write_cgroup(root, DOCKER, usage_usec=10, memory=4096, io={"8:16": (0, 512)})
    write_cgroup(root, SSHD, usage_usec=77, memory=1, io={})
    return root


class Clocks:
    def __init__(self) -> None:
        self.wall_ns = 1_700_000_000 * S
        self.mono_ns = S

    def advance(self, ns: int) -> None:
        self.wall_ns += ns
        self.mono_ns += ns


def cgroup_sampler(root: Path, clocks: Clocks, patterns: Iterable[str]) -> Sampler:
    return Sampler(
        "hv-1",
        FixedSource(),
        sources=[CgroupSource(patterns, root=root)],
        metrics=CGROUP_METRICS,
        wall_ns=lambda: clocks.wall_ns,
        mono_ns=lambda: clocks.mono_ns,
    )


def by_cgroup(records: Iterable[UsageRecord]) -> dict[tuple[str, str], Decimal]:
    return {(r.labels["cgroup"], r.metric): r.quantity for r in records}


def test_patterns_match_cgroup_directories_relative_to_the_root(root: Path) -> None:
    source = CgroupSource(["machine.slice/*", "system.slice/docker-*.scope"], root=root)
    assert [rel for _, rel in source.matches()] == sorted([VM_A, VM_B, DOCKER])


def test_each_cgroup_gets_cpu_memory_and_io_records_from_kernel_files(root: Path) -> None:
    clocks = Clocks()
    s = cgroup_sampler(root, clocks, ["machine.slice/*", "system.slice/docker-*.scope"])
    assert s.sample() == []
    clocks.advance(10 * S)
    write_cgroup(root, VM_A, usage_usec=3_250_007, memory=2 * 2**30 + 10,
                 io={"8:0": (4096 + 100, 8192 + 7), "253:0": (1000 + 11, 5)})
    write_cgroup(root, DOCKER, usage_usec=10, memory=4096, io={"8:16": (0, 512)})
    records = s.sample()
    got = by_cgroup(records)
    assert got[(VM_A, "cpu.seconds")] == Decimal("2.250007")
    assert got[(VM_A, "mem.used_byte_seconds")] == Decimal(2 * 2**30 * 10 + 50)
    assert got[(VM_A, "disk.read_bytes")] == 111
    assert got[(VM_A, "disk.write_bytes")] == 12
    assert got[(VM_B, "cpu.seconds")] == 0
    assert got[(DOCKER, "disk.write_bytes")] == 0
    assert (VM_B, "disk.read_bytes") not in got  # empty io.stat: nothing to count yet
    assert {r.labels["cgroup"] for r in records} == {VM_A, VM_B, DOCKER}
    assert {r.unit for r in records if r.metric == "cpu.seconds"} == {"seconds"}


def test_removed_cgroup_gives_no_record_and_recreated_one_counts_from_zero(root: Path) -> None:
    clocks = Clocks()
    s = cgroup_sampler(root, clocks, ["machine.slice/*"])
    s.sample()
    clocks.advance(10 * S)
    shutil.rmtree(root / VM_B)
    gone = by_cgroup(s.sample())
    assert not any(cgroup == VM_B for cgroup, _ in gone)
    clocks.advance(10 * S)
    write_cgroup(root, VM_B, usage_usec=400_000, memory=100, io={"8:0": (300, 0)})
    back = by_cgroup(s.sample())
    assert back[(VM_B, "cpu.seconds")] == Decimal("0.4")
    assert back[(VM_B, "disk.read_bytes")] == 300
    assert (VM_B, "mem.used_byte_seconds") not in back  # a gauge restarts its baseline


def test_cgroup_created_after_the_last_sample_counts_from_zero(root: Path) -> None:
    clocks = Clocks()
    s = cgroup_sampler(root, clocks, ["machine.slice/*"])
    s.sample()
    clocks.advance(10 * S)
    write_cgroup(root, "machine.slice/vm-c.scope", usage_usec=1_500_000, io={"8:0": (0, 4096)})
    got = by_cgroup(s.sample())
    assert got[("machine.slice/vm-c.scope", "cpu.seconds")] == Decimal("1.5")
    assert got[("machine.slice/vm-c.scope", "disk.write_bytes")] == 4096


def test_newly_configured_pattern_does_not_bill_history(root: Path) -> None:
    clocks = Clocks()
    s = cgroup_sampler(root, clocks, ["machine.slice/*"])
    s.sample()
    clocks.advance(10 * S)
    reloaded = Sampler(
        "hv-1", FixedSource(),
        sources=[CgroupSource(["machine.slice/*", "system.slice/*"], root=root)],
        metrics=CGROUP_METRICS, state=s.state(),
        wall_ns=lambda: clocks.wall_ns, mono_ns=lambda: clocks.mono_ns,
    )
    got = by_cgroup(reloaded.sample())
    assert not any(cgroup.startswith("system.slice/") for cgroup, _ in got)
    assert got[(VM_A, "cpu.seconds")] == 0


def test_device_leaving_io_stat_is_not_a_reset_of_the_sum(root: Path) -> None:
    clocks = Clocks()
    s = cgroup_sampler(root, clocks, [VM_A])
    s.sample()
    clocks.advance(10 * S)
    write_cgroup(root, VM_A, usage_usec=1_000_000, memory=0, io={"8:0": (4096 + 500, 8192)})
    got = by_cgroup(s.sample())
    assert got[(VM_A, "disk.read_bytes")] == 500


def test_absent_controller_files_leave_those_metrics_out(root: Path) -> None:
    write_cgroup(root, "machine.slice/bare.scope", usage_usec=None, memory=None, io=None)
    clocks = Clocks()
    s = cgroup_sampler(root, clocks, ["machine.slice/bare.scope"])
    s.sample()
    clocks.advance(S)
    assert [r.metric for r in s.sample()] == []


def test_missing_root_reads_nothing_and_raises_nothing(tmp_path: Path) -> None:
    source = CgroupSource(["machine.slice/*"], root=tmp_path / "absent")
    readings = source.read(frozenset(CGROUP_METRICS))
    assert not readings.counters
    assert not readings.gauges


@pytest.mark.parametrize("pattern", ["/sys/fs/cgroup/machine.slice", "../etc", "a/../../b", ""])
def test_patterns_outside_the_root_are_configuration_errors(pattern: str) -> None:
    with pytest.raises(ConfigError, match="relative to the cgroup root"):
        CgroupSource([pattern])


def test_kernel_file_formats_parse_exactly() -> None:
    assert parse_cpu_usage_usec(cpu_stat(115_290_726)) == 115_290_726
    assert parse_cpu_usage_usec("nr_periods 0\n") is None
    text = "8:0 rbytes=1459200 wbytes=314773504 rios=192 wios=353 dbytes=0 dios=0\n" \
           "253:1 rbytes=7 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n"
    assert parse_io_stat(text) == {"8:0": (1459200, 314773504), "253:1": (7, 0)}
    assert parse_io_stat("") == {}
