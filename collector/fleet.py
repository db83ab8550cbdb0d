"""What the collector knows about each agent from its calls: the fleet's health."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class AgentSeen:
    host_id: str
    last_seen_us: int = 0
    version: str = ""
    backlog_records: int = 0
    clock_skew_us: int = 0
    records_accepted: int = 0
    records_rejected: int = 0
    last_seq: int = 0
    certificate_serial: int = 0


@dataclass
class Fleet:
    agents: dict[str, AgentSeen] = field(default_factory=dict)

    def seen(
        self,
        host_id: str,
        *,
        now_us: int,
        version: str,
        backlog: int,
        skew_us: int,
        accepted: int,
        rejected: int,
        last_seq: int,
        serial: int,
    ) -> None:
        agent = self.agents.setdefault(host_id, AgentSeen(host_id))
        agent.last_seen_us = now_us
        agent.version = version
        agent.backlog_records = backlog
        agent.clock_skew_us = skew_us
        agent.records_accepted += accepted
        agent.records_rejected += rejected
        agent.last_seq = max(agent.last_seq, last_seq)
        agent.certificate_serial = serial
