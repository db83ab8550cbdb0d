"""Posting usage: route, deduplicate, rate and post, one transaction per shard.

For each shard the batch touches, one transaction inserts the new records (the
unique record id decides what is new; a store may insert on the expectation that all
are, and the transaction runs again when one is not), rates them against the locked running
counters, appends one journal entry per account and updates balances. A record is
acknowledged only after its shard committed. If any shard fails, the whole call
fails with :class:`StoreUnavailable`; the agent resends, and what did commit answers
``duplicate`` the second time.

Records of a host with no assignment at their time are held on the host's shard and
posted by :meth:`LedgerService.release_held` once an assignment covers them. A service
counts its posts in flight (:meth:`LedgerService.busy`): after a reload the collector
waits until the old service's posts are done (:meth:`LedgerService.settled`) before it
releases, so that a call which routed with the old assignments and holds records just
after the release read the held rows cannot leave them held.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal

from collector.billing.attribution import attribute_usage
from collector.ledger.journal import RECEIVABLE, ChainLink, JournalEntry
from collector.ledger.outbox import BALANCE_THRESHOLD_CROSSED
from collector.ledger.posting import PriceSource, price_usage, rate_usage
from collector.ledger.sharding import ShardMap
from collector.ledger.store import InsertConflict, LedgerStore, LedgerTx, SeqMarks
from collector.ledger.thresholds import BalanceThresholds, crossing_events
from collector.routing import Router
from common import logs
from common.errors import StoreUnavailable
from common.ids import new_id
from common.money import CONTEXT
from common.records import SeriesBatch, UsageRecord

log = logs.get("collector.ledger")


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

    # --- outbox ---------------------------------------------------------------------------
    def for_event(self, account_id: str) -> LedgerStore:
        """The store whose outbox takes an event: the account's shard, or the control
        shard for an event that belongs to no account (``account_id == ""``)."""
        return self.for_account(account_id) if account_id else self.control

    # --- end outbox -----------------------------------------------------------------------

    async def close(self) -> None:
        for store in self.stores:
            await store.close()


# Posting calls' records, per shard (see _ShardQueue): at most this many transactions
# at once, and at most this many records in a transaction that several calls share (a
# larger call goes alone). The collector's [ledger] ingest_transactions and
# ingest_group_records; docs/benchmarks.md has the measurements behind them.
GROUP_TRANSACTIONS = 4
GROUP_RECORDS = 4000


@dataclass(eq=False)
class _Part:
    """One call's records for one shard: its account batches (of distinct accounts),
    the records it holds, when it was received and the seqs it accounts for."""

    accounts: Mapping[str, Sequence[UsageRecord]]
    held: list[UsageRecord]
    now_us: int
    marks: SeqMarks | None
    done: asyncio.Future[dict[str, Outcome]] | None = None

    @property
    def records(self) -> int:
        return sum(map(len, self.accounts.values()))


class _ShardQueue:
    """Calls waiting for a transaction on one shard. At most ``limit`` transactions of
    the queue run at once (``ingest_transactions``, at most the store's connections);
    a call that finds one free goes at once, alone. Calls that arrive while all are
    busy wait, and the next free one takes as many of them as fit in one transaction:
    up to a number of records, no two with an account in common, none of an account
    that a running transaction of the queue holds. Under load, one transaction's fixed
    costs (its round trips, its commit) are shared by several calls; each call is
    still answered only after the transaction that holds its records committed."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.runners = 0
        self.pending: collections.deque[_Part] = collections.deque()
        self.busy: set[str] = set()  # accounts of the groups being posted

    def take(self, max_records: int) -> list[_Part]:
        """The next group, in arrival order: the first waiting call, and each later one
        that fits, skipping calls of an account that a group being posted holds (they
        would only wait for its locks, and hold up everything locked before). Calls
        whose callers gave up are dropped. The group's accounts are busy until
        :meth:`done`."""
        group: list[_Part] = []
        busy = self.busy
        size = 0
        left: collections.deque[_Part] = collections.deque()
        while self.pending:
            part = self.pending.popleft()
            if part.done is not None and part.done.done():
                continue
            records = part.records
            if (group and size + records > max_records) or not busy.isdisjoint(part.accounts):
                left.append(part)
                if size >= max_records:
                    break
                continue
            group.append(part)
            busy.update(part.accounts)
            size += records
        left.extend(self.pending)
        self.pending = left
        return group

    def done(self, group: list[_Part]) -> None:
        for part in group:
            self.busy.difference_update(part.accounts)


class LedgerService:
    def __init__(
        self,
        ledger: ShardedLedger,
        router: Router,
        prices: PriceSource,
        thresholds: Mapping[str, BalanceThresholds] | None = None,
        group_records: int = GROUP_RECORDS,
        group_transactions: int = GROUP_TRANSACTIONS,
    ) -> None:
        self.ledger = ledger
        self.router = router
        self.prices = prices
        self.thresholds = dict(thresholds or {})  # receivable balance thresholds by account
        self._busy = 0  # posts in flight, see busy()
        self._idle = asyncio.Event()
        self._idle.set()
        self.group_records = group_records
        self.group_transactions = group_transactions
        self._queues: dict[int, _ShardQueue] = {}  # by shard: calls waiting to be posted
        self._runners: set[asyncio.Task[None]] = set()
        # Told the shard's name and the number of calls of each posting transaction that
        # committed (the collector's metrics: how much calls share transactions).
        self.observe_calls: Callable[[str, int], None] | None = None

    def routed_by(self, router: Router) -> LedgerService:
        """This service with another router (the events API's): the same prices,
        balance thresholds, settings and observer, and the same queues, so that its
        calls share transactions with this service's and never run an account's batch
        beside a transaction of this service that holds the account."""
        other = LedgerService(
            self.ledger, router, self.prices, self.thresholds,
            group_records=self.group_records, group_transactions=self.group_transactions,
        )
        other.observe_calls = self.observe_calls
        other._queues = self._queues
        other._runners = self._runners
        return other

    @contextlib.asynccontextmanager
    async def busy(self) -> AsyncIterator[None]:
        """Count a post in flight on this service (also one made through another
        service built on this one's router, as the events API does)."""
        self._busy += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    async def settled(self) -> None:
        """Wait until no post of this service is in flight."""
        await self._idle.wait()

    async def post(
        self, records: Sequence[UsageRecord], now_us: int, marks: SeqMarks | None = None
    ) -> dict[str, Outcome]:
        """Post validated, unique-id records; the outcome of each by id.

        ``marks`` (the seqs the call accounts for, see :mod:`collector.sequences`) are
        written in the transaction of the host's shard when that is the only shard
        posted to, otherwise in a transaction of their own once every shard committed.
        """
        async with self.busy():
            return await self._post(records, now_us, marks)

    async def _post(
        self, records: Sequence[UsageRecord], now_us: int, marks: SeqMarks | None
    ) -> dict[str, Outcome]:
        by_store: dict[int, dict[str, Sequence[UsageRecord]]] = defaultdict(dict)
        held: dict[int, list[UsageRecord]] = defaultdict(list)
        index = {id(s): i for i, s in enumerate(self.ledger.stores)}
        whole = self._one_account(records) if isinstance(records, SeriesBatch) else None
        if whole is not None:  # a batch in column form, all of one account: kept whole
            by_store[index[id(self.ledger.for_account(whole))]][whole] = records
            records = ()
        # Shards looked up once per account and host, not once per record (a hash each).
        account_shard: dict[str, int] = {}
        host_shard: dict[str, int] = {}
        # A record's account depends on its host, window start and labels (the cgroup):
        # records that share all three (a sampling cycle's records of one VM share one
        # label set, the very same object) share the list they go to, found once.
        # Each key names a label set that a record of the batch still holds.
        lists: dict[tuple[str, int, int], list[UsageRecord]] = {}
        by_list: dict[int, dict[str, list[UsageRecord]]] = defaultdict(lambda: defaultdict(list))
        for record in records:
            key = (record.host_id, record.start_us, id(record.labels))
            target = lists.get(key)
            if target is None:
                account = self.router.account_for(record)
                if account is None:
                    shard = host_shard.get(record.host_id)
                    if shard is None:
                        shard = index[id(self.ledger.for_host(record.host_id))]
                        host_shard[record.host_id] = shard
                    target = held[shard]
                else:
                    shard = account_shard.get(account)
                    if shard is None:
                        shard = account_shard[account] = index[
                            id(self.ledger.for_account(account))
                        ]
                    target = by_list[shard][account]
                lists[key] = target
            target.append(record)
        for shard, lists_of in by_list.items():
            by_store[shard].update(lists_of)
        shards = sorted(set(by_store) | set(held))
        along = -1  # the shard whose transaction also writes ``marks``
        if marks is not None and marks.ranges:
            home = index[id(self.ledger.for_host(marks.host_id))]
            if set(shards) <= {home}:
                shards, along = [home], home
        results = await asyncio.gather(
            *(
                self._post_part(s, _Part(
                    by_store.get(s, {}), held.get(s, []), now_us, marks if s == along else None
                ))
                for s in shards
            )
        )
        if marks is not None and marks.ranges and along < 0:
            async with self.ledger.for_host(marks.host_id).transaction() as tx:
                await tx.account_seqs(marks)
        outcomes: dict[str, Outcome] = {}
        for part in results:
            outcomes.update(part)
        return outcomes

    def _one_account(self, batch: SeriesBatch) -> str | None:
        """The account that holds every record of ``batch``, if one does. Every window
        start of the batch with every label set of it first (a handful of lookups): one
        account there is one account for each record. Otherwise, looked up once per
        window start and series that occur together."""
        accounts = self.router.accounts_at(batch.host_id, set(batch.starts_us), batch.labels)
        if len(accounts) > 1:
            labels = batch.labels
            accounts = {
                self.router.account_at(batch.host_id, start_us, labels[series])
                for start_us, series in set(zip(batch.starts_us, batch.series, strict=True))
            }
        if len(accounts) != 1:
            return None
        (account,) = accounts
        return account

    async def _post_part(self, shard: int, part: _Part) -> dict[str, Outcome]:
        """Post one call's records of one shard: in a transaction of its own when it
        holds records, otherwise in the next group of calls to the shard
        (:class:`_ShardQueue`)."""
        if part.held:
            [outcomes] = await self._post_shard(shard, [part])
            self._observe(shard, 1)
            return outcomes
        queue = self._queues.get(shard)
        if queue is None:
            store = self.ledger.stores[shard]
            queue = self._queues[shard] = _ShardQueue(
                max(1, min(self.group_transactions, store.concurrency))
            )
        part.done = asyncio.get_running_loop().create_future()
        queue.pending.append(part)
        if queue.runners < queue.limit:
            queue.runners += 1
            runner = asyncio.create_task(self._run_queue(shard, queue))
            self._runners.add(runner)
            runner.add_done_callback(self._runners.discard)
        return await part.done

    def _observe(self, shard: int, calls: int) -> None:
        """Tell the observer about a committed transaction. A failing observer (the
        metrics) is logged and never fails or holds up a post."""
        if self.observe_calls is None:
            return
        name = self.ledger.stores[shard].name
        try:
            self.observe_calls(name, calls)
        except Exception as exc:  # noqa: BLE001 - the posts stand; the failure is logged
            log.warning("observer_failed", shard=name, error=f"{type(exc).__name__}: {exc}")

    async def _run_queue(self, shard: int, queue: _ShardQueue) -> None:
        """Post groups of the queue's calls until none waits."""
        try:
            while group := queue.take(self.group_records):
                try:
                    await self._post_group(shard, group)
                finally:
                    queue.done(group)
        finally:
            queue.runners -= 1

    async def _post_group(self, shard: int, group: list[_Part]) -> None:
        """One transaction for the group; each call gets its outcomes or the failure.
        A failure that is not the store's (a call the ledger refuses) fails no other
        call: each call of the group is then posted on its own."""
        results: list[dict[str, Outcome] | Exception]
        committed: list[int] = []  # the calls of each transaction that committed
        try:
            results = list(await self._post_shard(shard, group))
            committed.append(len(group))
        except StoreUnavailable as exc:
            results = [exc] * len(group)
        except Exception as exc:  # noqa: BLE001 - handed to the calls, which raise it
            if len(group) == 1:
                results = [exc]
            else:
                results = []
                for part in group:
                    try:
                        [outcomes] = await self._post_shard(shard, [part])
                    except Exception as alone:  # noqa: BLE001 - handed to its call
                        results.append(alone)
                    else:
                        results.append(outcomes)
                        committed.append(1)
        except BaseException:
            for part in group:
                if part.done is not None and not part.done.done():
                    part.done.cancel()
            raise
        for part, result in zip(group, results, strict=True):
            if part.done is None or part.done.done():
                continue  # its caller gave up (the agent resends; the ledger answers)
            if isinstance(result, Exception):
                part.done.set_exception(result)
            else:
                part.done.set_result(result)
        for calls in committed:  # once every call has its answer
            self._observe(shard, calls)

    async def _post_shard(self, shard: int, parts: list[_Part]) -> list[dict[str, Outcome]]:
        """One transaction on the shard for ``parts``, inserting the records on the
        expectation that all of them are new; when one is not (a resend, or another
        collector posting the same records), that transaction is lost whole and runs
        again, each record inserted unless stored."""
        try:
            return await self._post_shard_once(shard, parts, True)
        except InsertConflict:
            return await self._post_shard_once(shard, parts, False)

    async def _post_shard_once(
        self, shard: int, parts: list[_Part], optimistic: bool
    ) -> list[dict[str, Outcome]]:
        """Every account batch of ``parts`` (no two with one account) is inserted
        first, then rated and posted as one journal entry, in account order: each
        account's counters, then its chain head, are locked in that order by every
        transaction. Held records (a lone call's) come next, and the calls' seqs last."""
        store = self.ledger.stores[shard]
        results: list[dict[str, Outcome]] = [{} for _ in parts]
        held = parts[0].held if len(parts) == 1 else []
        marks = [p.marks for p in parts if p.marks is not None]
        units = sorted((account_id, i) for i, p in enumerate(parts) for account_id in p.accounts)
        async with store.transaction() as tx:
            posted: list[tuple[str, str, _Part, Sequence[UsageRecord]]] = []
            for account_id, i in units:
                part = parts[i]
                batch = part.accounts[account_id]
                entry_id = new_id()
                new_ids = await tx.insert_records(
                    account_id, entry_id, batch, part.now_us, optimistic
                )
                outcomes = results[i]
                if len(new_ids) == len(batch):  # the common case: all of them are new
                    new = batch
                    outcomes.update(dict.fromkeys(new_ids, Outcome.ACCEPTED))
                else:
                    new = [r for r in batch if r.id in new_ids]
                    for r in batch:
                        outcomes[r.id] = (
                            Outcome.ACCEPTED if r.id in new_ids else Outcome.DUPLICATE
                        )
                if new:
                    posted.append((account_id, entry_id, part, new))
            for n, (account_id, entry_id, part, new) in enumerate(posted, 1):
                now_us = part.now_us
                priced = price_usage(account_id, new, self.prices)
                keys = priced.keys
                counters = await tx.load_counters(sorted(keys))
                rated = rate_usage(
                    entry_id=entry_id,
                    account_id=account_id,
                    records=new,
                    prices=self.prices,
                    counters=counters,
                    now_us=now_us,
                    priced=priced,
                )
                await tx.save_counters(rated.counters)
                # --- billing: which period's invoice carries each increment; late usage ---
                # Before the entry: a store may write the period postings with it.
                await attribute_usage(
                    tx, self.prices, account_id=account_id, entry_id=entry_id, priced=keys,
                    before=counters, after=rated.counters, records=new, now_us=now_us,
                )
                # --- end billing ---------------------------------------------------------
                if marks and not held and n == len(posted):
                    # With the last entry (PostgreSQL: in its statement, no round trip
                    # of their own). Only when nothing is held: the hosts' seq tracks
                    # are the last thing a transaction locks, after every chain head and
                    # held record, so two collectors posting one host's records never
                    # wait on each other in a cycle.
                    for m in marks:
                        await tx.account_seqs(m)
                    marks = []
                await tx.append_entry(rated.entry)
                await self._emit_threshold_crossings(tx, rated.entry)
            if held:
                new_held = await tx.hold(held, parts[0].now_us)
                for r in held:
                    results[0][r.id] = Outcome.HELD if r.id in new_held else Outcome.DUPLICATE
            for m in marks:
                await tx.account_seqs(m)
        return results

    # --- outbox: balance.threshold_crossed -------------------------------------------------
    async def append_entry(self, tx: LedgerTx, entry: JournalEntry) -> ChainLink:
        """Append an entry that is not usage (an invoice's, a rounding difference's, a
        credit note's) and emit the balance thresholds it crossed, in ``tx``: every
        entry that moves a receivable is checked, not only usage."""
        link = await tx.append_entry(entry)
        await self._emit_threshold_crossings(tx, entry)
        return link

    async def _emit_threshold_crossings(self, tx: LedgerTx, entry: JournalEntry) -> None:
        """One ``balance.threshold_crossed`` event per threshold of the account that this
        entry moved its receivable balance across, in the entry's transaction. The
        account's chain head is locked by the entry, so ``before`` and ``after`` are
        exact even with several collectors posting at once."""
        limits = self.thresholds.get(entry.account_id)
        if limits is None:
            return
        delta = Decimal(0)
        for p in entry.postings:
            if p.ledger_account == RECEIVABLE and p.currency == limits.currency:
                delta = CONTEXT.add(delta, p.amount)
        if not delta:
            return
        after = await tx.balance(entry.account_id, RECEIVABLE, limits.currency)
        before = CONTEXT.subtract(after, delta)
        for data in crossing_events(limits, before, after, entry.id):
            await tx.emit(BALANCE_THRESHOLD_CROSSED, entry.account_id, data)

    # --- end outbox -------------------------------------------------------------------------

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
