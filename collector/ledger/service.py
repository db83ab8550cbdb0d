"""Posting usage: route, deduplicate, rate and post, one transaction per shard.

For each shard the batch touches, one transaction inserts the new records (the
unique record id decides what is new), rates them against the locked running
counters, appends one journal entry per account and updates balances. A record is
acknowledged only after its shard committed. If any shard fails, the whole call
fails with :class:`StoreUnavailable`; the agent resends, and what did commit answers
``duplicate`` the second time.

Records of a host with no assignment at their time are held on the host's shard and
posted by :meth:`LedgerService.release_held` once an assignment covers them.
"""

from __future__ import annotations

import asyncio
import enum
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

from collector.ledger.posting import PriceSource, counter_keys, rate_usage
from collector.ledger.sharding import ShardMap
from collector.ledger.store import LedgerStore
from collector.routing import Router
from common.ids import new_id
from common.records import UsageRecord


class Outcome(enum.Enum):
    ACCEPTED = "accepted"
    HELD = "held"
    DUPLICATE = "duplicate"


@dataclass
class ShardedLedger:
    """The ledger's stores and the map that places each account on one of them."""

    stores: Sequence[LedgerStore]
    shard_map: ShardMap

    def for_account(self, account_id: str) -> LedgerStore:
        return self.stores[self.shard_map.shard_of(account_id)]

    def for_host(self, host_id: str) -> LedgerStore:
        return self.stores[self.shard_map.shard_of(f"host:{host_id}")]

    @property
    def control(self) -> LedgerStore:
        """The store of what belongs to no account (API tokens, the audit log, webhook
        subscriptions): the first shard, or the embedded SQLite file."""
        return self.stores[0]

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


class LedgerService:
    def __init__(self, ledger: ShardedLedger, router: Router, prices: PriceSource) -> None:
        self.ledger = ledger
        self.router = router
        self.prices = prices

    async def post(self, records: Sequence[UsageRecord], now_us: int) -> dict[str, Outcome]:
        """Post validated, unique-id records; the outcome of each by id."""
        by_store: dict[int, dict[str, list[UsageRecord]]] = defaultdict(lambda: defaultdict(list))
        held: dict[int, list[UsageRecord]] = defaultdict(list)
        index = {id(s): i for i, s in enumerate(self.ledger.stores)}
        # Shards looked up once per account and host, not once per record (a hash each).
        account_shard: dict[str, int] = {}
        host_shard: dict[str, int] = {}
        for record in records:
            account = self.router.account_for(record)
            if account is None:
                shard = host_shard.get(record.host_id)
                if shard is None:
                    shard = index[id(self.ledger.for_host(record.host_id))]
                    host_shard[record.host_id] = shard
                held[shard].append(record)
            else:
                shard = account_shard.get(account)
                if shard is None:
                    shard = account_shard[account] = index[id(self.ledger.for_account(account))]
                by_store[shard][account].append(record)
        shards = sorted(set(by_store) | set(held))
        results = await asyncio.gather(
            *(self._post_shard(s, by_store.get(s, {}), held.get(s, []), now_us) for s in shards)
        )
        outcomes: dict[str, Outcome] = {}
        for part in results:
            outcomes.update(part)
        return outcomes

    async def _post_shard(
        self,
        shard: int,
        accounts: dict[str, list[UsageRecord]],
        held: list[UsageRecord],
        now_us: int,
    ) -> dict[str, Outcome]:
        store = self.ledger.stores[shard]
        outcomes: dict[str, Outcome] = {}
        async with store.transaction() as tx:
            for account_id in sorted(accounts):
                batch = accounts[account_id]
                entry_id = new_id()
                new_ids = await tx.insert_records(account_id, entry_id, batch, now_us)
                new = [r for r in batch if r.id in new_ids]
                for r in batch:
                    outcomes[r.id] = Outcome.ACCEPTED if r.id in new_ids else Outcome.DUPLICATE
                if not new:
                    continue
                keys = counter_keys(account_id, new, self.prices)
                counters = await tx.load_counters(sorted(keys))
                rated = rate_usage(
                    entry_id=entry_id,
                    account_id=account_id,
                    records=new,
                    prices=self.prices,
                    counters=counters,
                    now_us=now_us,
                )
                await tx.save_counters(rated.counters)
                await tx.append_entry(rated.entry)
            if held:
                new_held = await tx.hold(held, now_us)
                for r in held:
                    outcomes[r.id] = Outcome.HELD if r.id in new_held else Outcome.DUPLICATE
        return outcomes

    async def release_held(self, now_us: int) -> int:
        """Post every held record that an assignment now covers; the number posted."""
        released = 0
        for store in self.ledger.stores:
            ready = [r for r in await store.held() if self.router.account_for(r) is not None]
            if not ready:
                continue
            outcomes = await self.post(ready, now_us)
            async with store.transaction() as tx:
                await tx.release([r.id for r in ready])
            released += sum(1 for o in outcomes.values() if o is Outcome.ACCEPTED)
        return released
