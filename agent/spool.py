"""The spool: a durable local queue of usage records, in one SQLite file.

Durability
    WAL journal with ``synchronous=FULL``: :meth:`Spool.append` returns only after
    its transaction (the records and the sampler state, together) is fsynced, so a
    kill -9 or power cut after it returns loses nothing, and one before it leaves
    neither the records nor the state that accounts for them. Records are keyed by
    their id: appending the same record again changes nothing.

Delivery
    :meth:`next_batch` returns the oldest records (append order), bounded by count and
    by encoded (protobuf) bytes, always at least one, and marks them *in flight*. The
    mark is persistent and means "possibly already committed by the collector": it is
    cleared only by :meth:`acknowledge` (deleted), :meth:`dead_letter` (moved) or
    :meth:`release` (the shipper knows for certain the collector did not commit them).
    In-flight records keep their ids until then and are never compacted, so a late
    acknowledgement, or a resend after a crash, can never double count. A later
    :meth:`next_batch` returns in-flight records again (still oldest first), so an
    unanswered batch is resent with the same ids.

Size bound and compaction
    The size is the sum, over stored records, of the encoded record plus a fixed
    per-row estimate of SQLite's row and index overhead (:data:`ROW_OVERHEAD`); it
    approximates the file's live data, not its size on disk. When an append would
    pass ``max_bytes``, the oldest records are compacted until the spool is at 90%
    of it: consecutive records of the same (host, metric, unit, labels) are merged
    into one with window ``min(start) .. max(end)``, the exact sum of the quantities,
    a new UUIDv7 id, and the seq of the last record merged. It first merges within
    UTC hours, then within UTC days, then without bound, oldest first, so the newest
    usage keeps its resolution longest. A run of mergeable records ends at an
    in-flight record of the same series, so a merged window never covers an
    in-flight one. Usage is never dropped: if nothing more can be merged the append
    goes ahead over the bound, :attr:`SpoolStats.full` says so, and compaction is not
    tried again until another tenth of ``max_bytes`` has been appended.

Sequence numbers
    The seqs of the records a merge replaced (all but the one the merged record keeps)
    are stored as ranges in the same transaction and reported to the collector
    (:meth:`retired_seqs`, ``PushRequest.retired_seqs``) until a call carrying them is
    answered (:meth:`forget_retired_seqs`), so they are not taken for lost usage. The
    spool names its sequence epoch (:attr:`seq_epoch`): a UUIDv7 made with the spool, so
    a lost spool, whose replacement's seqs start again at 0, is a new epoch.

Dead letters
    Records the collector rejected move, with the reason and the time, to a separate
    table; they are never resent unless :meth:`requeue_dead_letters` moves them back.

Thread safety: one connection (``check_same_thread=False``) guarded by a lock, so the
agent may call the spool from worker threads (``asyncio.to_thread``).
"""

from __future__ import annotations

import decimal
import functools
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any

from common.errors import ConfigError, RecordError
from common.ids import new_id
from common.money import CONTEXT
from common.records import UsageRecord

ROW_OVERHEAD = 96
HOUR_US = 3_600 * 1_000_000
DAY_US = 24 * HOUR_US
_TIERS: tuple[int | None, ...] = (HOUR_US, DAY_US, None)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    pos INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    host_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    unit TEXT NOT NULL,
    labels TEXT NOT NULL,
    quantity TEXT NOT NULL,
    start_us INTEGER NOT NULL,
    end_us INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    in_flight INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS records_in_flight ON records (pos) WHERE in_flight = 1;
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    host_id TEXT NOT NULL,
    metric TEXT NOT NULL,
    unit TEXT NOT NULL,
    labels TEXT NOT NULL,
    quantity TEXT NOT NULL,
    start_us INTEGER NOT NULL,
    end_us INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    size INTEGER NOT NULL,
    reason TEXT NOT NULL,
    dead_at_us INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sampler_state (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS retired_seqs (
    first INTEGER NOT NULL,
    last INTEGER NOT NULL
);
"""

_COLUMNS = "id, host_id, metric, unit, labels, quantity, start_us, end_us, seq, size"
_PLACEHOLDERS = ", ".join("?" * 10)
MAX_RUN = 4096
_APPEND = f"INSERT OR IGNORE INTO records ({_COLUMNS}) VALUES ({_PLACEHOLDERS})"
_EXACT = CONTEXT.copy()
_EXACT.traps[decimal.Inexact] = True


@dataclass(frozen=True, slots=True)
class DeadLetter:
    record: UsageRecord
    reason: str
    dead_at_us: int


@dataclass(frozen=True, slots=True)
class SpoolStats:
    records: int
    bytes: int
    max_bytes: int
    oldest_start_us: int | None
    in_flight: int
    dead_letters: int

    @property
    def full(self) -> bool:
        """Over its bound even after compaction (usage is kept, never dropped)."""
        return self.bytes > self.max_bytes


_LABELS_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)


@functools.lru_cache(maxsize=1024)
def _labels_text(items: tuple[tuple[str, str], ...]) -> str:
    return _LABELS_JSON.encode(dict(items))


def labels_text(labels: Mapping[str, str]) -> str:
    """Canonical JSON of a label set: equal label sets give equal text."""
    # A host repeats a few label sets every cycle: encode each once.
    return _labels_text(tuple(labels.items()))


_UINT64 = 2**64 - 1


def _varint_size(value: int) -> int:
    """Bytes of ``value`` (0 <= value < 2**64) encoded as a protobuf varint."""
    return 1 if value < 0x80 else (value.bit_length() + 6) // 7


def _utf8_size(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


def encoded_size(record: UsageRecord, quantity_text: str) -> int:
    """``to_proto(record).ByteSize()``, computed without building the message, in a
    third of the time: proto3 leaves out empty strings and zero integers, every field
    number of ``UsageRecord`` fits a one-byte tag, and a map entry always carries both
    its key and its value. A test holds it equal to the encoder."""
    size = 0
    for text in (record.id, record.host_id, record.metric, quantity_text, record.unit):
        n = len(text) if text.isascii() else len(text.encode())
        if n:
            size += n + (2 if n < 0x80 else 1 + _varint_size(n))
    for number in (record.start_us, record.end_us, record.seq):
        if number:
            number &= _UINT64
            size += 2 if number < 0x80 else 1 + (number.bit_length() + 6) // 7
    for key, value in record.labels.items():
        nk, nv = _utf8_size(key), _utf8_size(value)
        entry = 2 + _varint_size(nk) + nk + _varint_size(nv) + nv
        size += 1 + _varint_size(entry) + entry
    return size


def record_size(record: UsageRecord) -> int:
    """The record's share of the spool bound: wire size plus row overhead."""
    return encoded_size(record, record.quantity_text) + ROW_OVERHEAD


def _row(record: UsageRecord) -> tuple[Any, ...]:
    quantity = record.quantity_text
    return (
        record.id, record.host_id, record.metric, record.unit, labels_text(record.labels),
        quantity, record.start_us, record.end_us, record.seq,
        encoded_size(record, quantity) + ROW_OVERHEAD,
    )


@functools.lru_cache(maxsize=1024)
def _labels(text: str) -> Mapping[str, str]:
    labels: dict[str, str] = json.loads(text)
    return MappingProxyType(labels)  # shared between records: read-only


def _record(row: Sequence[Any]) -> UsageRecord:
    return UsageRecord(
        id=row[0], host_id=row[1], metric=row[2], unit=row[3], labels=_labels(row[4]),
        quantity=Decimal(row[5]), start_us=row[6], end_us=row[7], seq=row[8],
    )


def _wall_us() -> int:
    return time.time_ns() // 1000


def _seq_ranges(seqs: Iterable[int]) -> list[tuple[int, int]]:
    """Inclusive (first, last) runs of consecutive seqs."""
    out: list[tuple[int, int]] = []
    for seq in sorted(set(seqs)):
        if out and out[-1][1] + 1 == seq:
            out[-1] = (out[-1][0], seq)
        else:
            out.append((seq, seq))
    return out


@dataclass(slots=True)
class _Run:
    bucket: int
    rows: list[tuple[Any, ...]]


class Spool:
    """Durable record queue with sampler state; see the module docstring."""

    def __init__(
        self,
        path: Path,
        *,
        max_bytes: int = 256 * 2**20,
        clock_us: Callable[[], int] = _wall_us,
        id_factory: Callable[[], str] = new_id,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self._clock_us = clock_us
        self._new_id = id_factory
        self._lock = threading.RLock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise ConfigError(
                    str(self.path), "spool_path",
                    f"a local file system on which SQLite can use WAL mode (got {mode!r})",
                )
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
            count, total = self._db.execute(
                "SELECT count(*), coalesce(sum(size), 0) FROM records"
            ).fetchone()
        except (sqlite3.Error, ConfigError):
            self._db.close()
            raise
        self._count: int = count
        self._bytes: int = total
        self._retry_compaction_at = 0
        self._seq_epoch, self._seq_epoch_start = self._open_seq_epoch()
        self._retired_pending = (
            self._db.execute("SELECT 1 FROM retired_seqs LIMIT 1").fetchone() is not None
        )

    # -- plumbing -----------------------------------------------------------------

    @property
    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise sqlite3.ProgrammingError("the spool is closed")
        return self._db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        db = self._conn
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ------------------------------------------------------------------

    def append(
        self, records: Sequence[UsageRecord], state: Mapping[str, object] | None = None
    ) -> None:
        """Store ``records`` and ``state`` in one transaction, durable on return.

        A record whose id is already stored (or dead-lettered) is left as it is.
        """
        rows = [_row(r) for r in records]
        state_text = None if state is None else json.dumps(state, sort_keys=True)
        with self._lock, self._transaction() as db:
            # Rows added here get positions after the current last one (compaction
            # reuses old positions, never appends), so when some were skipped the
            # bytes added are the sizes of the rows past ``last``.
            last = db.execute("SELECT coalesce(max(pos), 0) FROM records").fetchone()[0]
            if db.execute("SELECT 1 FROM dead_letters LIMIT 1").fetchone() is not None:
                dead = {
                    r[0] for r in db.execute(
                        "SELECT id FROM dead_letters WHERE id IN (SELECT value FROM json_each(?))",
                        (json.dumps([row[0] for row in rows]),),
                    )
                }
                rows = [row for row in rows if row[0] not in dead]
            added = db.executemany(_APPEND, rows).rowcount
            if added == len(rows):
                added_bytes = sum(row[-1] for row in rows)
            else:
                added_bytes = db.execute(
                    "SELECT coalesce(sum(size), 0) FROM records WHERE pos > ?", (last,)
                ).fetchone()[0]
            total = self._bytes + added_bytes
            removed = freed = 0
            retry_at = self._retry_compaction_at
            if total > self.max_bytes and total >= retry_at:
                removed, freed = self._compact(db, total - self.max_bytes * 9 // 10)
                if total - freed > self.max_bytes:
                    retry_at = total - freed + max(1, self.max_bytes // 10)
            if state_text is not None:
                db.execute(
                    "INSERT OR REPLACE INTO sampler_state (id, state) VALUES (1, ?)",
                    (state_text,),
                )
            epoch_start = self._seq_epoch_start
            if epoch_start is None and rows:
                epoch_start = min(row[8] for row in rows)
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES"
                           " ('seq_epoch_start', ?)", (str(epoch_start),))
        self._seq_epoch_start = epoch_start
        self._count += added - removed
        self._bytes = total - freed
        self._retry_compaction_at = retry_at

    def load_state(self) -> dict[str, object] | None:
        """The sampler state stored with the last append that carried one."""
        with self._lock:
            row = self._conn.execute("SELECT state FROM sampler_state WHERE id = 1").fetchone()
        if row is None:
            return None
        state: dict[str, object] = json.loads(row[0])
        return state

    # -- sequence numbers ---------------------------------------------------------

    @property
    def seq_epoch(self) -> tuple[str, int | None]:
        """This spool's sequence epoch (made with the spool: a lost spool means a new
        epoch) and its first seq (None until the first append after it was made)."""
        return self._seq_epoch, self._seq_epoch_start

    @property
    def has_retired_seqs(self) -> bool:
        return self._retired_pending

    def retired_seqs(self, limit: int) -> list[tuple[int, int, int]]:
        """Up to ``limit`` stored (id, first, last) ranges of seqs that compaction merged
        away, to report to the collector until it has answered a call carrying them."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid, first, last FROM retired_seqs ORDER BY rowid LIMIT ?", (limit,)
            ).fetchall()
            if not rows:
                self._retired_pending = False
        return [(r[0], r[1], r[2]) for r in rows]

    def forget_retired_seqs(self, ids: Iterable[int]) -> None:
        """Drop ranges the collector has accounted for."""
        with self._lock, self._transaction() as db:
            db.executemany("DELETE FROM retired_seqs WHERE rowid = ?", [(i,) for i in ids])
            self._retired_pending = (
                db.execute("SELECT 1 FROM retired_seqs LIMIT 1").fetchone() is not None
            )

    def _open_seq_epoch(self) -> tuple[str, int | None]:
        """The stored epoch, or a new one. A new spool's seqs start at 0; a spool made
        before epochs existed starts its epoch after the highest seq it holds, or, when
        it holds none, at the first seq appended next."""
        db = self._conn
        meta = dict(db.execute(
            "SELECT key, value FROM meta WHERE key IN ('seq_epoch', 'seq_epoch_start')"
        ).fetchall())
        if "seq_epoch" in meta:
            start = meta.get("seq_epoch_start")
            return meta["seq_epoch"], None if start is None else int(start)
        top = db.execute(
            "SELECT max(s) FROM (SELECT max(seq) AS s FROM records"
            " UNION ALL SELECT max(seq) FROM dead_letters)"
        ).fetchone()[0]
        has_state = db.execute("SELECT 1 FROM sampler_state").fetchone() is not None
        first: int | None = top + 1 if top is not None else (None if has_state else 0)
        epoch = new_id()
        with self._transaction():
            db.execute("INSERT INTO meta (key, value) VALUES ('seq_epoch', ?)", (epoch,))
            if first is not None:
                db.execute("INSERT INTO meta (key, value) VALUES ('seq_epoch_start', ?)",
                           (str(first),))
        return epoch, first

    # -- compaction ---------------------------------------------------------------

    def _compact(self, db: sqlite3.Connection, need: int) -> tuple[int, int]:
        """Merge the oldest mergeable runs until ``need`` bytes are freed or nothing is
        left to merge; returns (rows removed, bytes freed)."""
        removed = freed = 0
        retired: list[int] = []
        for tier in _TIERS:
            while freed < need:
                runs = self._runs(db, tier, need - freed)
                if not runs:
                    break
                progress = False
                for run in runs:
                    merged = self._merge(run)
                    if merged is None:
                        continue
                    progress = True
                    db.executemany("DELETE FROM records WHERE pos = ?", [(r[0],) for r in run])
                    row = _row(merged)
                    db.execute(
                        f"INSERT INTO records (pos, {_COLUMNS}) VALUES (?, {_PLACEHOLDERS})",
                        (run[0][0], *row),
                    )
                    removed += len(run) - 1
                    freed += sum(r[-2] for r in run) - row[-1]
                    retired += (r[9] for r in run if r[9] != merged.seq)
                if not progress:
                    break
            if freed >= need:
                break
        if retired:
            db.executemany("INSERT INTO retired_seqs (first, last) VALUES (?, ?)",
                           _seq_ranges(retired))
            self._retired_pending = True
        return removed, freed

    def _runs(
        self, db: sqlite3.Connection, tier: int | None, need: int
    ) -> list[list[tuple[Any, ...]]]:
        """Runs of at least two consecutive, not-in-flight records of one series in one
        tier bucket, oldest first, enough to free about ``need`` bytes."""
        runs: list[list[tuple[Any, ...]]] = []
        estimate = 0
        open_runs: dict[tuple[str, str, str, str], _Run] = {}

        def close(key: tuple[str, str, str, str]) -> None:
            nonlocal estimate
            run = open_runs.pop(key, None)
            if run is not None and len(run.rows) >= 2:
                runs.append(run.rows)
                estimate += sum(r[-2] for r in run.rows) - max(r[-2] for r in run.rows)

        cursor = db.execute(f"SELECT pos, {_COLUMNS}, in_flight FROM records ORDER BY pos")
        try:
            for row in cursor:
                key = (row[2], row[3], row[4], row[5])
                if row[-1]:
                    close(key)
                else:
                    bucket = 0 if tier is None else row[7] // tier
                    run = open_runs.get(key)
                    if run is not None and run.bucket != bucket:
                        close(key)
                        run = None
                    if run is None:
                        run = open_runs[key] = _Run(bucket, [])
                    run.rows.append(tuple(row))
                    if len(run.rows) >= MAX_RUN:
                        close(key)
                if estimate >= need:
                    return runs
        finally:
            cursor.close()
        for key in list(open_runs):
            close(key)
        return runs

    def _merge(self, run: Sequence[tuple[Any, ...]]) -> UsageRecord | None:
        """One record with the exact total of ``run``, or None if no record can hold it."""
        total = Decimal(0)
        for row in run:
            total = _EXACT.add(total, Decimal(row[6]))
        first, last = run[0], run[-1]
        try:
            return UsageRecord(
                id=self._new_id(),
                host_id=first[2],
                metric=first[3],
                unit=first[4],
                labels=json.loads(first[5]),
                quantity=total,
                start_us=min(r[7] for r in run),
                end_us=max(r[8] for r in run),
                seq=last[9],
            )
        except (RecordError, decimal.Inexact):
            return None

    # -- delivery -----------------------------------------------------------------

    def next_batch(self, max_records: int, max_bytes: int) -> list[UsageRecord]:
        """The oldest records, at most ``max_records`` and ``max_bytes`` of encoded
        records (at least one record when any is stored), marked in flight."""
        with self._lock, self._transaction() as db:
            rows = db.execute(
                f"SELECT pos, {_COLUMNS} FROM records ORDER BY pos LIMIT ?",
                (max(1, max_records),),
            ).fetchall()
            batch: list[tuple[Any, ...]] = []
            used = 0
            for row in rows:
                encoded = row[-1] - ROW_OVERHEAD
                if batch and used + encoded > max_bytes:
                    break
                batch.append(row)
                used += encoded
            if batch:  # the batch is every record up to its last position
                db.execute(
                    "UPDATE records SET in_flight = 1 WHERE pos <= ? AND in_flight = 0",
                    (batch[-1][0],),
                )
        return [_record(row[1:]) for row in batch]

    def acknowledge(self, ids: Iterable[str]) -> int:
        """Delete records the collector accepted (or already had); returns how many."""
        wanted = json.dumps(list(dict.fromkeys(ids)))
        with self._lock, self._transaction() as db:
            sizes = db.execute(
                "DELETE FROM records WHERE id IN (SELECT value FROM json_each(?)) RETURNING size",
                (wanted,),
            ).fetchall()
        removed = len(sizes)
        freed = sum(row[0] for row in sizes)
        self._count -= removed
        self._bytes -= freed
        return removed

    def release(self, ids: Iterable[str]) -> int:
        """Clear the in-flight mark of records the collector certainly did not commit
        (the call failed before it reached the collector); returns how many."""
        with self._lock, self._transaction() as db:
            cursor = db.executemany(
                "UPDATE records SET in_flight = 0 WHERE id = ? AND in_flight = 1",
                [(record_id,) for record_id in set(ids)],
            )
            return max(cursor.rowcount, 0)

    # -- dead letters -------------------------------------------------------------

    def dead_letter(self, rejected: Iterable[tuple[str, str]]) -> int:
        """Move rejected records, each with its reason, to the dead letters."""
        now = self._clock_us()
        with self._lock, self._transaction() as db:
            moved = freed = 0
            for record_id, reason in dict(rejected).items():
                cursor = db.execute(
                    f"INSERT OR REPLACE INTO dead_letters ({_COLUMNS}, reason, dead_at_us) "
                    f"SELECT {_COLUMNS}, ?, ? FROM records WHERE id = ?",
                    (reason, now, record_id),
                )
                if cursor.rowcount > 0:
                    row = db.execute(
                        "DELETE FROM records WHERE id = ? RETURNING size", (record_id,)
                    ).fetchone()
                    moved += 1
                    freed += row[0]
        self._count -= moved
        self._bytes -= freed
        return moved

    def dead_letters(self) -> list[DeadLetter]:
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_COLUMNS}, reason, dead_at_us FROM dead_letters "
                "ORDER BY dead_at_us, seq, id"
            ).fetchall()
        return [DeadLetter(_record(row), row[-2], row[-1]) for row in rows]

    def requeue_dead_letters(self, ids: Iterable[str] | None = None) -> int:
        """Move dead letters (all, or those named) back to the queue, newest position."""
        with self._lock, self._transaction() as db:
            if ids is None:
                wanted = [r[0] for r in db.execute("SELECT id FROM dead_letters ORDER BY seq")]
            else:
                wanted = list(dict.fromkeys(ids))
            moved = added = added_bytes = 0
            for record_id in wanted:
                row = db.execute(
                    f"DELETE FROM dead_letters WHERE id = ? RETURNING {_COLUMNS}", (record_id,)
                ).fetchone()
                if row is None:
                    continue
                moved += 1
                cursor = db.execute(
                    f"INSERT OR IGNORE INTO records ({_COLUMNS}) VALUES ({_PLACEHOLDERS})", row
                )
                if cursor.rowcount > 0:
                    added += 1
                    added_bytes += row[-1]
        self._count += added
        self._bytes += added_bytes
        return moved

    # -- status -------------------------------------------------------------------

    def stats(self) -> SpoolStats:
        with self._lock:
            db = self._conn
            oldest = db.execute("SELECT start_us FROM records ORDER BY pos LIMIT 1").fetchone()
            in_flight = db.execute(
                "SELECT count(*) FROM records WHERE in_flight = 1"
            ).fetchone()[0]
            dead = db.execute("SELECT count(*) FROM dead_letters").fetchone()[0]
            return SpoolStats(
                records=self._count,
                bytes=self._bytes,
                max_bytes=self.max_bytes,
                oldest_start_us=None if oldest is None else oldest[0],
                in_flight=in_flight,
                dead_letters=dead,
            )

    def set_meta(self, key: str, value: str) -> None:
        """Store a small text value for status (last_ship_at_us, last_error, ...)."""
        with self._lock:
            if self.get_meta(key) == value:  # unchanged (last_error "" after every ship)
                return
            with self._transaction() as db:
                db.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))

    def get_meta(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])
