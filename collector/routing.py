"""Host to account assignments with effective time ranges.

A record is billed to whoever held the host at the record's window start. An
assignment may name a cgroup, so each VM or container metered by one hypervisor
agent (records labelled ``cgroup=<path>``) is billed to the account that rents it;
an assignment with a cgroup wins over one for the whole host.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from common.records import UsageRecord

FOREVER = 2**62


@dataclass(frozen=True, slots=True)
class Assignment:
    host_id: str
    account_id: str
    start_us: int = 0
    end_us: int = FOREVER
    cgroup: str = ""

    def covers(self, record: UsageRecord) -> bool:
        return self.covers_at(record.host_id, record.start_us, record.labels)

    def covers_at(self, host_id: str, start_us: int, labels: Mapping[str, str]) -> bool:
        if host_id != self.host_id:
            return False
        if not self.start_us <= start_us < self.end_us:
            return False
        return not self.cgroup or labels.get("cgroup") == self.cgroup


class Router:
    def __init__(self, assignments: Iterable[Assignment]) -> None:
        by_host: dict[str, list[Assignment]] = {}
        for a in assignments:
            by_host.setdefault(a.host_id, []).append(a)
        # cgroup-specific assignments first, so they win over whole-host ones
        self._by_host = {
            h: sorted(items, key=lambda a: (a.cgroup == "", a.start_us))
            for h, items in by_host.items()
        }

    def account_for(self, record: UsageRecord) -> str | None:
        return self.account_at(record.host_id, record.start_us, record.labels)

    def account_at(self, host_id: str, start_us: int, labels: Mapping[str, str]) -> str | None:
        """The account that holds a record of ``host_id`` whose window starts at
        ``start_us``, with ``labels``; None while no assignment covers it."""
        for a in self._by_host.get(host_id, ()):
            if a.covers_at(host_id, start_us, labels):
                return a.account_id
        return None

    def accounts_at(
        self, host_id: str, starts_us: Iterable[int], label_sets: Iterable[Mapping[str, str]]
    ) -> set[str | None]:
        """:meth:`account_at` of every combination of ``starts_us`` and ``label_sets``
        (None where no assignment covers one). Only the ``cgroup`` label tells a host's
        assignments apart, so label sets are looked up once per cgroup, and once in all
        when no assignment of the host names a cgroup."""
        assignments = self._by_host.get(host_id)
        if not assignments:
            return {None}
        if any(a.cgroup for a in assignments):
            probes = list({labels.get("cgroup"): labels for labels in label_sets}.values())
        else:
            probes = [{}]
        return {self.account_at(host_id, s, labels) for s in starts_us for labels in probes}

    def hosts(self) -> list[str]:
        return sorted(self._by_host)
