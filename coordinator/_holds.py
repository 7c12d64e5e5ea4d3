"""Hold rows: each account's pending amounts after each record that changes them.

The records that open, post, void or expire pending transfers make a *hold row* per account
they change (`coordinator._records.holds_key`): what its pending transfers hold on it and
bring it after the record. The sequencer makes them (`rules.holds_after`), and they wait in
memory for the next checkpoint, behind which they go to the entry index as entries do
(`coordinator._entries`); recovery rebuilds the ones past `indexed_through` from the records, and a reader without
memory derives them (`unindexed_holds_by_key`). `HoldTracker` follows the records on its own,
for those readers and for the audit. A ledger older than hold rows has them from
`HOLDS_FROM_KEY`'s LSN on, with baseline rows (at LSN 0) of the pending amounts then; its
past before it is read from the records (`holds_at`).
"""

from __future__ import annotations

from bisect import bisect_right
from typing import Any

import msgpack
from journal import Journal

from coordinator._checkpoint_chain import check_checkpoint, open_pending_at
from coordinator._entries import Unindexed, Row, add_holds, hold_row_lsn, indexed_through
from coordinator._errors import JournalCorrupted
from coordinator._history import Committed, Expired, Record, record_at, records
from coordinator._records import (
    CHECKPOINT,
    CHECKPOINT3,
    CHECKPOINT4,
    CHECKPOINT5,
    CHECKPOINTS_INDEX,
    ENTRIES_INDEX,
    HOLDS_FROM_KEY,
    decode,
    holds_key,
    lsn_value,
    value_lsn,
)


def holds_from(journal: Journal, txn: Any) -> int | None:
    """The LSN from which every record that changes pending amounts has its hold rows (None:
    no release that writes them has written to this ledger)."""
    value = journal.index_get(ENTRIES_INDEX, HOLDS_FROM_KEY, txn)
    if value is None:
        return None
    if len(value) != 8:
        raise JournalCorrupted("journal corrupted: the entry index's hold rows mark does not hold an LSN",
                               where="the entries index")
    return value_lsn(value)


def holds_at(journal: Journal, account_id: str, lsn: int, unindexed_holds: list[Row], txn: Any) -> tuple[int, int]:
    """(held, incoming): what the account's pending transfers held on it and brought it after
    the record at `lsn`: from its last hold row at or before `lsn`, among `unindexed_holds` (its
    hold rows past the newest checkpoint, durable ones, read before `txn` opened) or else in
    the index (checked against its record)."""
    start = holds_from(journal, txn)
    if start is None or lsn < start:
        return _holds_read(journal, account_id, lsn, txn)
    if unindexed_holds and hold_row_lsn(unindexed_holds[0]) <= lsn:
        row = unindexed_holds[bisect_right(unindexed_holds, lsn, key=hold_row_lsn) - 1]
        return _hold_values(account_id, row)
    found = journal.index_last_before(ENTRIES_INDEX, holds_key(account_id, lsn + 1), txn)
    prefix = holds_key(account_id, 0)[:-8]
    if found is None or not found[0].startswith(prefix):
        return 0, 0  # none since the mark, nor in the baseline: nothing pending
    row_lsn = hold_row_lsn(found)
    if row_lsn and account_id not in HoldTracker().rows(record_at(journal, row_lsn, txn), for_expiry=True):
        raise JournalCorrupted(f"journal corrupted: account {account_id!r} has a hold row at LSN {row_lsn}, whose "
                               "record changes no pending transfer of it", row_lsn, "the entries index")
    return _hold_values(account_id, found)


def _hold_values(account_id: str, row: Row) -> tuple[int, int]:
    try:
        held, incoming = msgpack.unpackb(row[1])
        return int(held), int(incoming)
    except Exception as error:  # msgpack raises several unrelated types on bad input
        lsn = hold_row_lsn(row)
        raise JournalCorrupted(f"journal corrupted: the hold row of {account_id!r} at LSN {lsn} does not decode",
                               lsn, "the entries index") from error


class HoldTracker:
    """Every account's pending amounts, followed record by record from the open pending
    transfers at a point (a checkpoint's, or none at LSN 0): `rows` of each record in turn
    gives its hold rows. Independent of the rules' own bookkeeping (`rules.holds_after`), so
    the audit that uses it checks them."""

    def __init__(self, pendings: list[list[Any]] | None = None) -> None:
        self.open: dict[str, tuple[str, str, int]] = {}
        self.held: dict[str, int] = {}
        self.incoming: dict[str, int] = {}
        for pending_id, source, destination, amount, *_ in pendings or ():
            self._open(pending_id, source, destination, amount)

    def rows(self, record: Record | None, for_expiry: bool = False) -> dict[str, tuple[int, int]]:
        """The hold rows of `record` (each account's pending amounts after it), moving past it.
        `for_expiry`: an expiry of pending transfers this tracker never saw opened names every
        account of the ledger (a pair check of one row against its record, no more)."""
        touched: list[str] = []
        if isinstance(record, Committed):
            for transfer in record.transfers:
                if transfer.kind == "pending":
                    self._open(transfer.id, transfer.source, transfer.destination, transfer.amount)
                elif transfer.kind != "single":
                    self._close(transfer.pending_id or "")
                else:
                    continue
                touched += (transfer.source, transfer.destination)
        elif isinstance(record, Expired):
            if for_expiry:
                return _EVERY_ACCOUNT
            for pending_id in record.pending_ids:
                touched += self._close(pending_id)
        return {account: (self.held.get(account, 0), self.incoming.get(account, 0)) for account in touched if account}

    def _open(self, pending_id: str, source: str, destination: str, amount: int) -> None:
        self.open[pending_id] = (source, destination, amount)
        self.held[source] = self.held.get(source, 0) + amount
        self.incoming[destination] = self.incoming.get(destination, 0) + amount

    def _close(self, pending_id: str) -> tuple[str, str]:
        source, destination, amount = self.open.pop(pending_id, ("", "", 0))
        self.held[source] = self.held.get(source, 0) - amount
        self.incoming[destination] = self.incoming.get(destination, 0) - amount
        return source, destination


class _Every(dict):  # type: ignore[type-arg]
    def __contains__(self, key: object) -> bool:
        return True


_EVERY_ACCOUNT: dict[str, tuple[int, int]] = _Every()


def _holds_read(journal: Journal, account_id: str, lsn: int, txn: Any) -> tuple[int, int]:
    """`holds_at` from the records (a ledger's past from before hold rows): the open pending
    transfers of the newest checkpoint at or before `lsn`, then the records after it up to
    `lsn` (at most a checkpoint interval of them)."""
    checkpoint, pendings = checkpoint_before(journal, lsn + 1, txn)
    tracker = HoldTracker(pendings)
    for record in records(journal, checkpoint, txn, lsn):
        tracker.rows(record)
    return tracker.held.get(account_id, 0), tracker.incoming.get(account_id, 0)


def checkpoint_before(journal: Journal, lsn: int, txn: Any) -> tuple[int, list[list[Any]]]:
    """The newest checkpoint before `lsn` (0 if none) and the open pending transfers it carries."""
    found = journal.index_last_before(CHECKPOINTS_INDEX, lsn_value(lsn), txn)
    checkpoint = 0 if found is None else value_lsn(found[0])
    if not checkpoint:
        return 0, []
    payload = journal.read(checkpoint, txn)
    fields = decode(checkpoint, payload) if payload is not None else []
    if not fields or fields[0] not in (CHECKPOINT, CHECKPOINT3, CHECKPOINT4, CHECKPOINT5):
        raise JournalCorrupted(f"journal corrupted: the checkpoints index names LSN {checkpoint}, which is not a "
                               "checkpoint", checkpoint, "the checkpoints index")
    if fields[0] == CHECKPOINT5:  # (some of them: the rest are in the checkpoints before it)
        check_checkpoint(checkpoint, fields)
        return checkpoint, open_pending_at(journal, checkpoint, [(checkpoint, fields)], txn)[0]
    return checkpoint, [] if fields[0] == CHECKPOINT else fields[-1]


def unindexed_holds_by_key(journal: Journal, txn: Any, until: int | None = None) -> Unindexed:
    """The hold rows of the records after `indexed_through` (up to LSN `until`, if given),
    derived from the records of snapshot `txn` and the open pending transfers that checkpoint
    carries (as `coordinator._entries.unindexed_by_key` for entries)."""
    checkpoint, pendings = checkpoint_before(journal, indexed_through(journal, txn) + 1, txn)
    tracker = HoldTracker(pendings)
    holds: Unindexed = {}
    for record in records(journal, checkpoint, txn, until):
        rows = tracker.rows(record)
        if rows:
            add_holds(holds, record.lsn, rows)
    return holds
