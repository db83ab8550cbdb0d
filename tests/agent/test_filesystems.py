"""Disk space is billed once per filesystem, however many views of it are mounted."""

from __future__ import annotations

from agent.sampler import PsutilSource, distinct_filesystems


def test_views_of_one_filesystem_count_once() -> None:
    mounted = [
        ("/tmp", 2049),  # a hardened unit's private /tmp: the root filesystem
        ("/var/lib/meterd", 2049),  # its writable state directory: the root filesystem again
        ("/", 2049),
        ("/var/tmp", 2049),
        ("/srv/data", 2065),  # a second disk
        ("/mnt/data-bind", 2065),  # a bind mount of it
    ]
    assert distinct_filesystems(mounted) == ["/", "/srv/data"]


def test_distinct_filesystems_are_all_kept() -> None:
    assert distinct_filesystems([("/boot", 1), ("/", 2), ("/home", 3)]) == ["/", "/boot", "/home"]


def test_this_machine_reports_each_filesystem_once() -> None:
    import os

    gauges, held = PsutilSource()._disk_space()
    assert not held
    devices = [os.stat(dict(series.labels)["mount"]).st_dev for series in gauges]
    assert devices
    assert len(devices) == len(set(devices))
