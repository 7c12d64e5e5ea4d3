"""The entry index, and the entries not yet in it.

Every commit record carries both of its entries, stamped (seq and balance), so
the entry index, (account, seq) -> entry, is a projection of the journal. Written
with each group commit, it cost more than everything else a commit writes: the
index is sorted by account, so every entry lands on a leaf page of its own, and a
group commit of 500 transfers rewrote ~1,000 of the index's 4 KiB pages.

So the index is written in bulk, behind the checkpoints. The rule, in every snapshot
of the journal: **the entry index holds the entries of every commit record before
the checkpoint `INDEXED_TO_KEY` names** (`indexed_through`; without the key, the
newest checkpoint), and of the commits after it, for each account, a prefix of its
entries or none. The entries of those commits are *unindexed*: the sequencer keeps
them in memory (`UnindexedEntries`); each checkpoint takes those stamped before it and
has the journal writer put them in the index in key order, each leaf page once, in
slices that ride on the group commits after the checkpoint record
(`journal.Behind`), the last with `INDEXED_TO_KEY` (a checkpoint with none to carry sends
the key alone, written once the rows before it are in). (Written with the checkpoint
record, as they were, all ~100,000 of them made one transaction of ~0.1 s that every
record queued behind it waited for.) In a journal without the key yet, the first
checkpoint writes the key with its record, naming the checkpoint before it, and its own
behind it, as every checkpoint does.

A reader takes an account's indexed entries and adds its unindexed ones past them
(`with_unindexed`): from memory in the process that writes the ledger, derived from
the records after `indexed_through` anywhere else (`unindexed_entries`), in the same
snapshot. Journals written before this rule indexed every entry with its commit; for
them the union is the same. Hold rows (`coordinator._holds`) follow the same rule.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Iterator
from itertools import chain, islice
from typing import Any

import msgpack
from journal import Journal

from coordinator._errors import JournalCorrupted
from coordinator._records import (
    CHECKPOINTS_INDEX,
    COMMIT,
    ENTRIES_INDEX,
    INDEXED_TO_KEY,
    TRANSFER3,
    ENTRY_SEQ_END,
    decode,
    encode_entry_value,
    encode_holds,
    entry_key,
    entry_prefix,
    holds_key,
    lsn_value,
    value_lsn,
)

Row = tuple[bytes, bytes]
"""An entry as the index stores it: (entry key, entry value)."""

Rows = dict[str, list[Row]]
"""Entries by account, each account's in seq order."""

_U64 = struct.Struct(">Q")


def commit_rows(lsn: int, record: list[Any]) -> list[Row]:
    """The index rows of the entries of a decoded COMMIT or TRANSFER3 record: each leg's
    debit's, then its credit's (a pending transfer's or a void's leg has none)."""
    return [(entry_key(account, seq), value) for account, seq, value in _entries(lsn, record)]


def _entries(lsn: int, record: list[Any]) -> Iterator[tuple[str, int, bytes]]:
    """(account, seq, index value) of each entry a commit record stamps, in order."""
    if record[0] == COMMIT:
        _, tid, source, destination, amount, source_seq, source_balance, target_seq, target_balance = record
        yield source, source_seq, encode_entry_value(tid, -amount, source_balance, lsn, None)
        yield destination, target_seq, encode_entry_value(tid, amount, target_balance, lsn, None)
        return
    timestamp = record[1]
    for index, leg in enumerate(record[3:]):
        if leg[11]:  # a seq: the leg made entries
            tid, source, destination, amount = leg[1], leg[2], leg[3], leg[4]
            yield source, leg[11], encode_entry_value(tid, -amount, leg[12], lsn, timestamp + index)
            yield destination, leg[13], encode_entry_value(tid, amount, leg[14], lsn, timestamp + index)


def row_lsn(row: Row) -> int:
    """The LSN of the commit record that made the entry."""
    return int(msgpack.unpackb(row[1])[3])


def hold_row_lsn(row: Row) -> int:
    """The LSN of the record that wrote a hold row (`coordinator._records.holds_key`: its key ends with it)."""
    return int.from_bytes(row[0][-8:], "big")


Unindexed = dict[str, dict[bytes, bytes]]
"""Entries by account, each account's a dict of key -> value in seq order. A dict of bytes
only is one the garbage collector does not track (CPython leaves such a dict untracked),
so however many entries wait unindexed, a full collection never visits them: as flat
lists they were tens of thousands of lists whose every item each full collection visited,
~4 ms of it at 10,000 accounts (`bench/README.md`)."""


def drop_before(entries: Unindexed, lsn: int, lsn_of: Callable[[Row], int] = row_lsn) -> Unindexed:
    """`entries` (or hold rows, with `hold_row_lsn`) without the rows of the records before
    `lsn`: each account's are in LSN order."""
    kept: Unindexed = {}
    for account, flat in entries.items():
        start = 0
        for row in flat.items():
            if lsn_of(row) >= lsn:
                kept[account] = dict(islice(flat.items(), start, None)) if start else flat
                break
            start += 1
    return kept


def pairs(flat: dict[bytes, bytes]) -> list[Row]:
    """An account's rows, copied in one step first: another thread may be adding to it."""
    return list(flat.copy().items())


def add_commit(entries: Unindexed, prefixes: dict[str, bytes], lsn: int, record: list[Any]) -> None:
    """Add the entries of a decoded COMMIT or TRANSFER3 record to `entries` (`prefixes` caches
    each account's entry key prefix: replay meets the same accounts again and again)."""
    for account, seq, value in _entries(lsn, record):
        prefix = prefixes.get(account)
        if prefix is None:
            prefixes[account] = prefix = entry_prefix(account)
        flat = entries.get(account)
        if flat is None:
            entries[account] = flat = {}
        flat[prefix + _U64.pack(seq)] = value


def add_holds(holds: Unindexed, lsn: int, rows: dict[str, tuple[int, int]]) -> None:
    """Add the hold rows of the record at `lsn` (each account's (held, incoming) after it) to `holds`."""
    for account, (held, incoming) in rows.items():
        flat = holds.get(account)
        if flat is None:
            holds[account] = flat = {}
        flat[holds_key(account, lsn)] = encode_holds(held, incoming)


def newest_checkpoint_lsn(journal: Journal, txn: Any) -> int:
    """The LSN of the newest checkpoint the checkpoints index names (0: none) in snapshot `txn`."""
    key = journal.index_last(CHECKPOINTS_INDEX, txn)
    return 0 if key is None else value_lsn(key)


def indexed_through(journal: Journal, txn: Any) -> int:
    """The LSN of the newest checkpoint whose entries and hold rows the index holds in
    snapshot `txn` (0: none): where the unindexed ones start. `JournalCorrupted` if its
    mark does not name a checkpoint (readers would miss the entries after the one it should)."""
    lsn = marked_through(journal, txn)
    if lsn and journal.index_get(CHECKPOINTS_INDEX, lsn_value(lsn), txn) is None:
        raise JournalCorrupted(f"journal corrupted: the entry index's mark of what it holds names LSN {lsn}, no "
                               "checkpoint", where="the entries index")
    return lsn


def marked_through(journal: Journal, txn: Any) -> int:
    """`indexed_through` as the mark says it, unchecked against the checkpoints (the audit
    checks it last, after what it would hide)."""
    value = journal.index_get(ENTRIES_INDEX, INDEXED_TO_KEY, txn)
    if value is None:
        return newest_checkpoint_lsn(journal, txn)
    if len(value) != 8:
        raise JournalCorrupted(f"journal corrupted: the entry index's mark of what it holds is {value!r}",
                               where="the entries index")
    return value_lsn(value)


def unindexed_by_key(journal: Journal, txn: Any, until: int | None = None) -> Unindexed:
    """The entries of the commits after `indexed_through` (up to LSN `until`, if given),
    derived from the records of snapshot `txn` (for readers other than the writing
    process, and for recovery). Verifies what it scans."""
    entries: Unindexed = {}
    prefixes: dict[str, bytes] = {}
    for lsn, payload in journal.scan(indexed_through(journal, txn), txn):
        if until is not None and lsn > until:
            break
        record = decode(lsn, payload)
        if record[0] == TRANSFER3 or record[0] == COMMIT:
            add_commit(entries, prefixes, lsn, record)
    return entries


def unindexed_entries(journal: Journal, txn: Any) -> Rows:
    """`unindexed_by_key`, as rows."""
    return {account: pairs(flat) for account, flat in unindexed_by_key(journal, txn).items()}


def entry_rows(
    journal: Journal, account: str, unindexed: Iterable[Row], after: int = 0, limit: int | None = None,
    txn: Any | None = None,
) -> list[Row]:
    """The account's entries with seq > `after`, at most `limit`, in seq order: those of the
    index (in snapshot `txn`, or a new one), then `unindexed` ones past them. A process that
    reads `unindexed` from memory reads it before the snapshot opens (`UnindexedEntries`)."""
    start = entry_key(account, after + 1)
    indexed = journal.index_range(ENTRIES_INDEX, start, entry_key(account, ENTRY_SEQ_END), limit, txn)
    return with_unindexed(indexed, unindexed, start, limit)


def last_row(journal: Journal, account: str, unindexed: list[Row], txn: Any) -> Row | None:
    """The account's last entry: its last unindexed one (durable ones only: the caller's
    `unindexed`), else the last the index holds in snapshot `txn`, else None."""
    if unindexed:
        return unindexed[-1]
    found = journal.index_last_before(ENTRIES_INDEX, entry_key(account, ENTRY_SEQ_END), txn)
    return found if found is not None and found[0].startswith(entry_prefix(account)) else None


def decode_entry(account: str, row: Row) -> tuple[int, str, int, int, int, int]:
    """An entry row as (seq, transfer id, amount, balance, LSN, timestamp); `JournalCorrupted`
    if its value does not decode as one (a format-1 index entry has no checksum to catch
    that). An entry of a format-1 or -2 commit has no timestamp: 0."""
    key, value = row
    try:
        fields = msgpack.unpackb(value)
        if len(fields) == 4:
            fields.append(0)
        transfer_id, amount, balance, lsn, timestamp = fields
    except Exception as error:  # msgpack raises several unrelated types on bad input, and unpacking may fail
        raise JournalCorrupted(f"journal corrupted: the entry {key!r} of account {account!r} does not decode: {error}",
                               where="the entries index") from error
    return int.from_bytes(key[-8:], "big"), transfer_id, amount, balance, lsn, timestamp


def with_unindexed(indexed: list[Row], unindexed: Iterable[Row], start: bytes, limit: int | None) -> list[Row]:
    """One account's rows from `start` on, at most `limit`: the indexed ones, then the
    unindexed ones past them (an entry in both, as happens while a checkpoint is being
    written, counts once: the index holds a prefix of each account's entries)."""
    if limit is not None and len(indexed) >= limit:
        return indexed
    rows = list(indexed)
    floor = indexed[-1][0] if indexed else start
    for row in unindexed:
        if row[0] < floor or (indexed and row[0] == floor):
            continue
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return rows


class Joined:
    """Accounts' rows read one after another as the journal writer takes index entries,
    flat (key, value, key, value...), without being copied into one list (see
    `journal._commits.put_all` for what one young list of them all would cost). The rows'
    parts are not changed while it is read (a checkpoint carries them)."""

    __slots__ = ("_parts", "_length")

    def __init__(self, parts: list[dict[bytes, bytes]]) -> None:
        self._parts = parts
        self._length = 2 * sum(map(len, parts))

    def __len__(self) -> int:
        return self._length

    def __iter__(self) -> Iterator[bytes]:
        return chain.from_iterable(chain.from_iterable(map(dict.items, self._parts)))

    def __contains__(self, item: object) -> bool:
        return any(item in part or item in part.values() for part in self._parts)


def first_key(flat: dict[bytes, bytes]) -> bytes:
    """An account's first key (an account's rows sort by it: see `UnindexedEntries.ordered`)."""
    return next(iter(flat))


class UnindexedEntries:
    """The entries stamped since the newest checkpoint was queued (`current`), and those
    the checkpoints carry whose rows are not all durable in the index yet, per account in
    seq order.

    Changed only under the sequencer lock; read from any thread without it. Readers
    take `current` before `carried` and open their snapshot after both, so an entry
    missed in memory was already dropped, which happens only once its checkpoint's rows
    are all durable (`release`): the snapshot then has it in the index.

    The hold rows of the records since the newest checkpoint wait in one of their own, which
    the checkpoints write just the same (`lsn_of`: `hold_row_lsn`).
    """

    __slots__ = ("current", "_carried", "count", "_lsn_of")

    def __init__(self, current: Unindexed | None = None, lsn_of: Callable[[Row], int] = row_lsn) -> None:
        self._lsn_of = lsn_of
        """The LSN of the record that made a row."""
        self.current: Unindexed = current if current is not None else {}
        """Appended to under the sequencer lock, a key and its value in one step (`add`)."""
        self.count = sum(map(len, self.current.values()))
        """Entries in `current`."""
        self._carried: tuple[tuple[int, Unindexed], ...] = ()
        """(checkpoint LSN, the rows it carries), oldest first; replaced, never changed."""

    def add(self, accounts: list[str], parts: list[bytes]) -> None:
        """Append the entries of a chunk about to be queued: accounts[i] gets parts[2i] (its
        key) and parts[2i + 1] (its value). Readers do not see them before they are durable
        (`rows` drops entries past the durable LSN); `remove` takes them back."""
        current = self.current
        self.count += len(accounts)
        pairs = iter(parts)
        for account, key, value in zip(accounts, pairs, pairs, strict=True):
            flat = current.get(account)
            if flat is None:
                current[account] = {key: value}
            else:
                flat[key] = value  # one step: a reader never sees a key without its value

    def remove(self, accounts: list[str]) -> None:
        """Take back what the last `add(accounts, ...)` appended (a chunk the journal refused:
        nothing else was added since, under the same hold of the sequencer lock)."""
        current = self.current
        self.count -= len(accounts)
        for account in reversed(accounts):
            flat = current[account]
            flat.popitem()  # the last added
            if not flat:
                del current[account]

    def ordered(self) -> Joined:
        """Every row of `current`, flat and in index key order (what the next checkpoint carries)."""
        # A key starts with the account's length-prefixed id, which no other account's
        # is a prefix of: ordering accounts by their first key orders all their keys. Sorted
        # here, for what changed since the last checkpoint only, not kept in order for every
        # account ever seen (an insertion into a list of a million costs a millisecond).
        return Joined(self.ordered_parts())

    def ordered_parts(self) -> list[dict[bytes, bytes]]:
        """`ordered`, as the list of each account's rows."""
        return sorted(self.current.values(), key=first_key)

    def carry(self, checkpoint_lsn: int) -> None:
        """The rows of `current` are now queued behind the checkpoint at `checkpoint_lsn`."""
        self._carried = (*self._carried, (checkpoint_lsn, self.current))
        self.current = {}
        self.count = 0

    def release(self, indexed_lsn: int) -> None:
        """Forget the rows of every checkpoint up to `indexed_lsn` (`journal.Journal.indexed_lsn`:
        the index has them, durably)."""
        carried = self._carried
        if carried and indexed_lsn >= carried[0][0]:
            self._carried = tuple(generation for generation in carried if generation[0] > indexed_lsn)

    def rows(self, account: str, durable_lsn: int) -> list[Row]:
        """The account's unindexed rows that are durable (LSN <= `durable_lsn`), in seq order."""
        current = self.current.get(account)
        current = current.copy() if current else {}  # one step (the sequencer adds to it)
        found = [row for _, flat in self._carried for row in flat.get(account, {}).items()]
        found += current.items()
        found = sorted(set(found))  # a checkpoint queued between the two reads shows its rows twice
        lsn_of = self._lsn_of
        while found and lsn_of(found[-1]) > durable_lsn:
            found.pop()
        return found

    def all_rows(self, durable_lsn: int) -> Rows:
        """`rows` of every account that has any."""
        accounts = dict.fromkeys([*self.current, *(account for _, flat in self._carried for account in flat)])
        return {account: rows for account in accounts if (rows := self.rows(account, durable_lsn))}
