"""The audit log: every change made through the REST API or the CLI, hash-chained.

Each row says who (``actor``: ``token:<name>/<id>`` for an API token, ``cli:<user>``
for a command), what (``action``, a dotted verb such as ``token.create``, and its
``target``), when (``at_us``, UTC microseconds) and the state ``before`` and ``after``
(canonical JSON: sorted keys, decimals as exact strings, no floats). Rows live on the
control shard (:attr:`collector.ledger.service.ShardedLedger.control`) in
``audit_log``, which the database itself keeps append-only (triggers refuse UPDATE,
DELETE and TRUNCATE, as for the journal).

Rows are numbered 1, 2, 3, ... and each one's ``hash`` is the SHA-256 of its fields
and its predecessor's hash (:data:`GENESIS_HASH` for the first), so changing,
removing or reordering a row after the fact breaks the chain from there on;
``meterd ledger verify`` recomputes it (:func:`verify_audit_log`). Appends are
serialised (SQLite's write lock; an advisory lock on PostgreSQL), so the chain never
forks.

Use::

    audit = AuditLog.for_ledger(ledger)
    await audit.record("token:ops/0199...", "invoice.finalize", "invoice/INV-7",
                       before=draft, after=final)

A change that lives on the control shard itself (API tokens, webhook subscriptions)
records its row in the same transaction with :func:`append`, so the change and its
audit row commit together. A change on an account's shard (an invoice finalized, a
credit note) records it with :meth:`AuditLog.stage` in the change's transaction: on
the control shard that is :func:`append` itself; on any other shard the row is kept
there (``audit_staged``), committed or rolled back with the change, and
:meth:`AuditLog.relay` appends it to the log afterwards. A relay notes each staged row
it appended (``audit_relayed``, on the control shard, in the same transaction as the
append) before it drops the staged rows, so a relay that stops anywhere, or two at
once, appends each row exactly once; the next relay (the next change on that shard,
or the collector's start) finishes the work. Until then the row is on the account's
shard, not lost, and the log shows it later than its ``at_us``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import date, datetime
from decimal import Decimal
from typing import Any

import msgspec

from collector.ledger.service import ShardedLedger
from collector.ledger.store import AuditRow, LedgerStore, LedgerTx, StagedAudit
from common.errors import ValidationError
from common.ids import new_id
from common.money import canonical_text

GENESIS_HASH = "0" * 64
MAX_FIELD = 200  # characters of actor, action and target


def now_us() -> int:
    return time.time_ns() // 1000


def plain(value: Any, where: str) -> Any:
    """``value`` as JSON-ready builtins; decimals become exact strings, floats are refused."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        raise ValidationError(f"audit {where}: floats are not recorded, use Decimal")
    if isinstance(value, Decimal):
        return canonical_text(value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, enum.Enum):
        return plain(value.value, where)
    if isinstance(value, msgspec.Struct):
        return plain(msgspec.structs.asdict(value), where)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain(
            {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, where
        )
    if isinstance(value, Mapping):
        return {str(k): plain(v, where) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v, where) for v in value]
    if isinstance(value, set | frozenset):
        return sorted(plain(v, where) for v in value)
    raise ValidationError(f"audit {where}: cannot record a {type(value).__name__}")


def canonical_json(value: Any, where: str = "value") -> str:
    """Sorted keys, no spaces, exact decimals: the same value always gives the same text."""
    return json.dumps(
        plain(value, where), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )


def row_hash(
    seq: int, at_us: int, actor: str, action: str, target: str, before: str, after: str,
    prev_hash: str,
) -> str:
    fields = [seq, at_us, actor, action, target, before, after, prev_hash]
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_text(name: str, value: str) -> None:
    if not value or len(value) > MAX_FIELD:
        raise ValidationError(f"audit {name}: expected 1 to {MAX_FIELD} characters")


async def append(
    tx: LedgerTx,
    actor: str,
    action: str,
    target: str,
    before: Any,
    after: Any,
    *,
    at_us: int,
) -> AuditRow:
    """Append one row inside ``tx`` (a transaction on the control shard)."""
    before_text, after_text = _texts(actor, action, target, before, after)
    return await _append_texts(tx, actor, action, target, before_text, after_text, at_us)


def _texts(actor: str, action: str, target: str, before: Any, after: Any) -> tuple[str, str]:
    """The states as canonical JSON, once every field is checked."""
    for name, value in (("actor", actor), ("action", action), ("target", target)):
        _check_text(name, value)
    return canonical_json(before, "before"), canonical_json(after, "after")


async def _append_texts(
    tx: LedgerTx, actor: str, action: str, target: str, before_text: str, after_text: str,
    at_us: int,
) -> AuditRow:
    last_seq, last_hash = await tx.audit_head()
    seq = last_seq + 1
    digest = row_hash(seq, at_us, actor, action, target, before_text, after_text, last_hash)
    row = AuditRow(seq, at_us, actor, action, target, before_text, after_text, last_hash, digest)
    await tx.insert_audit(row)
    return row


class AuditLog:
    """The audit log on one store (the control shard)."""

    def __init__(self, store: LedgerStore, clock: Callable[[], int] = now_us) -> None:
        self.store = store
        self.clock = clock

    @classmethod
    def for_ledger(cls, ledger: ShardedLedger, clock: Callable[[], int] = now_us) -> AuditLog:
        return cls(ledger.control, clock)

    async def record(
        self, actor: str, action: str, target: str, before: Any, after: Any
    ) -> AuditRow:
        """Append one row in a transaction of its own; returns it as stored."""
        async with self.store.transaction() as tx:
            return await append(tx, actor, action, target, before, after, at_us=self.clock())

    async def stage(
        self, store: LedgerStore, tx: LedgerTx, actor: str, action: str, target: str,
        before: Any, after: Any,
    ) -> None:
        """Record a change made in ``tx``, a transaction on ``store``: appended to the
        log in ``tx`` when ``store`` is the control shard, else staged in ``tx`` for
        :meth:`relay`. Either way the row commits, or not, with the change."""
        at_us = self.clock()
        if store is self.store:
            await append(tx, actor, action, target, before, after, at_us=at_us)
            return
        before_text, after_text = _texts(actor, action, target, before, after)
        await tx.stage_audit(
            StagedAudit(new_id(), at_us, actor, action, target, before_text, after_text)
        )

    async def relay(self, store: LedgerStore) -> int:
        """Append the rows staged on ``store`` to the log, each exactly once, oldest
        first, then drop them there; the number appended by this call."""
        if store is self.store:
            return 0
        async with store.transaction() as tx:
            staged = await tx.staged_audits()
        if not staged:
            return 0
        ids = [row.staged_id for row in staged]
        appended = 0
        async with self.store.transaction() as tx:
            await tx.audit_head()  # the log's lock first: concurrent relays take turns
            done = await tx.relayed_audits(ids)
            for row in staged:
                if row.staged_id in done:
                    continue
                stored = await _append_texts(
                    tx, row.actor, row.action, row.target, row.before, row.after, row.at_us
                )
                await tx.mark_audit_relayed(row.staged_id, stored.seq)
                appended += 1
        async with store.transaction() as tx:
            await tx.drop_staged_audits(ids)
        return appended

    async def relay_all(self, stores: Iterable[LedgerStore]) -> int:
        """:meth:`relay` for every shard; the number of rows appended."""
        appended = 0
        for store in stores:
            appended += await self.relay(store)
        return appended


def chain_problems(rows: Iterable[AuditRow]) -> list[str]:
    """What is wrong with the chain of ``rows`` (in sequence order); empty when intact."""
    problems: list[str] = []
    expected_prev = GENESIS_HASH
    for position, row in enumerate(rows, start=1):
        where = f"audit log row {row.seq}"
        if row.seq != position:
            problems.append(f"{where}: sequence {row.seq}, expected {position}")
        if row.prev_hash != expected_prev:
            problems.append(f"{where}: predecessor hash does not match the previous row")
        digest = row_hash(row.seq, row.at_us, row.actor, row.action, row.target, row.before,
                          row.after, row.prev_hash)
        if digest != row.hash:
            problems.append(f"{where}: its content does not match its hash (changed after"
                            " it was recorded)")
        expected_prev = row.hash
    return problems


async def verify_audit_log(store: LedgerStore) -> tuple[int, list[str]]:
    """The number of audit rows on ``store`` and the problems in their chain."""
    rows = await store.audit_rows(from_us=-(2**63), to_us=2**63 - 1, after_seq=0, limit=None)
    return len(rows), chain_problems(rows)
