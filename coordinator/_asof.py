"""History as of an LSN: an account's balance, its entries and a transfer as they were after
the record at that LSN, and pages of transfers in LSN order.

Every read here is of immutable history: what the journal held after record `lsn` never
changes, so two reads at one LSN agree however far apart they run, with no reader held in
between (`engine` builds its snapshots on that). None scans the journal but the two that say
so: an account's reads bisect its entries (seq order is LSN order) and seek its hold rows.

An account's pending amounts at an LSN are its hold row at or before it (`coordinator._holds`).

`unindexed` is as for `coordinator._history.entries_of`: the account's entries past the
newest checkpoint, durable ones, read before the snapshot `txn` opened; `holds` likewise its
hold rows.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterator
from heapq import merge
from typing import Any

import msgpack
from journal import Journal

from coordinator._entries import (
    Row,
    decode_entry,
    entry_rows,
    hold_row_lsn,
    last_row,
)
from coordinator._errors import AccountNotFound, InvalidRequest, JournalCorrupted
from coordinator._history import (
    Committed,
    Record,
    account_of,
    index_lsn,
    named_record,
    record_at,
    records,
    transfer_record,
    transfer_with_status,
)
from coordinator._holds import HoldTracker, checkpoint_before, holds_at, holds_from
from coordinator._records import (
    ACCOUNT4,
    ACCOUNTS_INDEX,
    CHECKPOINT3,
    CHECKPOINT4,
    CHECKPOINT5,
    ENTRIES_INDEX,
    ENTRY_SEQ_END,
    EXPIRY3,
    REFUSAL3,
    TRANSFER3,
    decode,
    entry_key,
    holds_key,
    id_key,
    resolution_key,
    value_lsn,
)
from coordinator._validate import shown
from coordinator._values import KINDS, Balance, Entry, Resolution, Transfer, TransferStatus

PAGE_CHUNK = 256
"""Entries or hold rows read at a time while a page of an account's transfers is gathered."""


# --- an account's balance -------------------------------------------------------------------


def opened_lsn(journal: Journal, account_id: str, lsn: int, txn: Any) -> int:
    """The LSN of the account's opening; `AccountNotFound` if it did not exist at `lsn`."""
    if account_of(journal, account_id, txn) is None:  # (checks the index entry against the record)
        raise AccountNotFound(f"no account {account_id!r}")
    opened = value_lsn(journal.index_get(ACCOUNTS_INDEX, id_key(account_id), txn) or b"")
    if opened > lsn:
        raise AccountNotFound(f"account {account_id!r} was opened at LSN {opened}, after LSN {lsn}")
    return opened


def balance_at(journal: Journal, account_id: str, lsn: int, unindexed: list[Row], holds: list[Row],
               txn: Any) -> Balance:
    """The account's balance after the record at `lsn` (durable: the caller checked), counting
    the pending transfers open then; `AccountNotFound` if it did not exist then. `holds`: its
    unindexed hold rows, as `unindexed` its entries."""
    opened_lsn(journal, account_id, lsn, txn)
    row = entry_row_at(journal, account_id, lsn, unindexed, txn)
    posted = 0 if row is None else decode_entry(account_id, row)[3]
    held, incoming = holds_at(journal, account_id, lsn, holds, txn)
    return Balance(posted, held, posted - held, incoming)


def entry_row_at(journal: Journal, account_id: str, lsn: int, unindexed: list[Row], txn: Any) -> Row | None:
    """The account's last entry made by a record at or before `lsn`, or None: bisected in its
    unindexed entries if it is among them, else in the index (one read a step)."""
    if unindexed and _row_lsn(unindexed[0]) <= lsn:
        return unindexed[bisect_right(unindexed, lsn, key=_row_lsn) - 1]
    last = last_row(journal, account_id, [], txn)
    if last is None:
        return None
    low, high = 1, decode_entry(account_id, last)[0]  # the index holds seqs 1..high
    if _row_lsn(last) <= lsn:
        return last
    found: Row | None = None
    while low <= high:
        middle = (low + high) // 2
        key = entry_key(account_id, middle)
        value = journal.index_get(ENTRIES_INDEX, key, txn)
        if value is None:
            raise JournalCorrupted(f"journal corrupted: account {account_id!r} lacks its entry {middle} in the index, "
                                   f"which holds its entry {high}", where="the entries index")
        if _row_lsn((key, value)) <= lsn:
            found, low = (key, value), middle + 1
        else:
            high = middle - 1
    return found


def _row_lsn(row: Row) -> int:
    try:
        return int(msgpack.unpackb(row[1])[3])
    except Exception as error:  # msgpack raises several unrelated types on bad input
        raise JournalCorrupted(f"journal corrupted: the entry {row[0]!r} does not decode: {error}",
                               where="the entries index") from error


# --- entries, transfers ---------------------------------------------------------------------


def entries_at(journal: Journal, account_id: str, lsn: int, after: int, limit: int | None, unindexed: list[Row],
               txn: Any) -> list[Entry]:
    """The account's entries made at or before `lsn`, with seq > `after`, at most `limit`."""
    opened_lsn(journal, account_id, lsn, txn)
    if after >= ENTRY_SEQ_END - 1:
        return []  # no seq can be that large
    rows = entry_rows(journal, account_id, unindexed, after, limit, txn)
    entries = [Entry(account_id, *decode_entry(account_id, row)) for row in rows]
    while entries and entries[-1].lsn > lsn:  # seq order is LSN order
        entries.pop()
    return entries


def status_at(journal: Journal, transfer: Transfer, lsn: int, txn: Any) -> Transfer:
    """A committed `transfer` with its status as of the record at `lsn` (a pending transfer's:
    posted, voided or expired once a record at or before `lsn` resolved it)."""
    if transfer.kind != "pending":
        return transfer
    key = resolution_key(transfer.id)
    resolved_at = index_lsn(journal, key, txn, f"the resolution of {transfer.id!r}")
    if resolved_at is None or resolved_at > lsn:
        return transfer
    record = named_record(journal, key, resolved_at, txn)
    status: TransferStatus = "expired"
    if isinstance(record, Committed):
        resolution = next(request for request in record.requests
                          if type(request) is Resolution and request.pending_id == transfer.id)
        status = "voided" if resolution.void else "posted"
    return transfer_with_status(transfer, status)


def transfer_at(journal: Journal, transfer_id: str, lsn: int, txn: Any) -> Transfer | None:
    """The committed transfer `transfer_id` if a record at or before `lsn` made it, with its
    status as of then; None otherwise (unknown, refused, or later)."""
    record = transfer_record(journal, transfer_id, txn)
    if not isinstance(record, Committed) or record.lsn > lsn:
        return None
    transfer = next(transfer for transfer in record.transfers if transfer.id == transfer_id)
    return status_at(journal, transfer, lsn, txn)


# --- timestamps -------------------------------------------------------------------------------


def record_timestamp(journal: Journal, lsn: int, txn: Any, last: bool = False) -> int:
    """The timestamp of the record at `lsn`: its own (a checkpoint's: the last before it), or for
    a record that has none (an account opened before accounts had timestamps, a record of format
    1 or 2) that of the nearest one before it that has (0: none). With `last`, the last one it
    stamped (a record of k requests stamps its timestamp and the k - 1 nanoseconds after). The
    walk back ends at the latest checkpoint at the furthest."""
    while lsn > 0:
        payload = journal.read(lsn, txn)
        if payload is None:
            raise JournalCorrupted(f"journal corrupted: the record at LSN {lsn} is missing", lsn)
        record = decode(lsn, payload)
        kind = record[0]
        if kind in (TRANSFER3, REFUSAL3, EXPIRY3, CHECKPOINT3, CHECKPOINT4, CHECKPOINT5, ACCOUNT4):
            if last and kind == TRANSFER3:
                return int(record[1]) + len(record) - 4  # the legs are record[3:]
            if last and kind == REFUSAL3:
                return int(record[1]) + len(record) - 6  # the requests are record[5:]
            return int(record[1])
        lsn -= 1
    return 0


def lsn_at_timestamp(journal: Journal, timestamp: int, end: int, txn: Any) -> int:
    """The last LSN up to `end` whose record's timestamp (`record_timestamp`) is at most
    `timestamp`; 0 if none is. Timestamps never decrease in LSN order, so this bisects."""
    low, high, found = 1, end, 0
    while low <= high:
        middle = (low + high) // 2
        if record_timestamp(journal, middle, txn) <= timestamp:
            found, low = middle, middle + 1
        else:
            high = middle - 1
    return found


# --- pages of transfers -------------------------------------------------------------------------


def transfers_page(journal: Journal, *, account: str | None, code: int | None, kind: str | None, after_lsn: int,
                   until_lsn: int, limit: int, reverse: bool, unindexed: list[Row], holds: list[Row],
                   txn: Any, as_of: int) -> list[Transfer]:
    """Transfers made by the records in (`after_lsn`, `until_lsn`], in LSN order (newest first
    with `reverse`), those of `account` (as source or destination), `code` and `kind` only
    (None: any), each with its status as of `as_of` (at least `until_lsn`: the view's LSN, so
    that every page of a walk shows the statuses of one moment). At most `limit`, except that the legs
    of one linked chain (one record) are never split: a page ends before a record whose
    transfers would take it past `limit`, unless that record alone is more than a page.

    With `account` it reads the account's entries and hold rows (no scan); without, the
    records of the window, one after another."""
    page: list[Transfer] = []
    for record in _candidates(journal, account, after_lsn, until_lsn, reverse, unindexed, holds, txn):
        if not isinstance(record, Committed):
            continue
        found = [status_at(journal, transfer, as_of, txn) for transfer in record.transfers
                 if (account is None or account in (transfer.source, transfer.destination))
                 and (code is None or transfer.code == code) and (kind is None or transfer.kind == kind)]
        if not found:
            continue
        if page and len(page) + len(found) > limit:
            break
        page += found
        if len(page) >= limit:
            break
    return page


def _candidates(journal: Journal, account: str | None, after_lsn: int, until_lsn: int, reverse: bool,
                unindexed: list[Row], holds: list[Row], txn: Any) -> Iterator[Record | None]:
    """The records that may hold the page's transfers, in page order, each read once (the
    window's forward, as its scan decoded them)."""
    if account is None and not reverse:
        return records(journal, after_lsn, txn, until_lsn)
    lsns = (range(until_lsn, after_lsn, -1) if account is None else
            account_lsns(journal, account, after_lsn, until_lsn, reverse, unindexed, holds, txn))
    return (record_at(journal, lsn, txn) for lsn in lsns)


def account_lsns(journal: Journal, account: str, after_lsn: int, until_lsn: int, reverse: bool,
                 unindexed: list[Row], holds: list[Row], txn: Any) -> Iterator[int]:
    """The LSNs in (`after_lsn`, `until_lsn`] of the records that moved the account's money or
    changed its pending amounts (its transfers, posts, voids and expiries), in LSN order
    (descending with `reverse`), from its entries and hold rows."""
    start = holds_from(journal, txn)
    start = until_lsn + 1 if start is None else start
    if start > after_lsn + 1:  # the ledger's past from before hold rows: its records, read
        legacy_until = min(until_lsn, start - 1)
        legacy = _legacy_candidates(journal, account, after_lsn, legacy_until, reverse, txn)
        indexed = _indexed_candidates(journal, account, legacy_until, until_lsn, reverse, unindexed, holds, txn)
        return (lsn for part in ((indexed, legacy) if reverse else (legacy, indexed)) for lsn in part)
    return _indexed_candidates(journal, account, after_lsn, until_lsn, reverse, unindexed, holds, txn)


def _legacy_candidates(journal: Journal, account: str, after_lsn: int, until_lsn: int, reverse: bool,
                       txn: Any) -> Iterator[int]:
    """`account_lsns` of a ledger's past from before hold rows, read from the records (from the
    checkpoint before the window, so that an expiry's pending transfers are known). A generator:
    nothing is read unless a page needs it."""
    checkpoint, pendings = checkpoint_before(journal, after_lsn + 1, txn)
    tracker = HoldTracker(pendings)
    found: list[int] = []
    for record in records(journal, checkpoint, txn, until_lsn):
        touched = tracker.rows(record)
        if record.lsn > after_lsn and (account in touched or isinstance(record, Committed) and any(
                account in (transfer.source, transfer.destination) for transfer in record.transfers)):
            if reverse:
                found.append(record.lsn)
            else:
                yield record.lsn
    if reverse:
        yield from reversed(found)


def _indexed_candidates(journal: Journal, account: str, after_lsn: int, until_lsn: int, reverse: bool,
                        unindexed: list[Row], holds: list[Row], txn: Any) -> Iterator[int]:
    """The LSNs of the account's entries and hold rows in the window, merged, each once."""
    entries = _entry_lsns(journal, account, after_lsn, until_lsn, reverse, unindexed, txn)
    held = _hold_lsns(journal, account, after_lsn, until_lsn, reverse, txn)
    remembered = [lsn for lsn in map(hold_row_lsn, holds) if after_lsn < lsn <= until_lsn]
    last = None
    for lsn in merge(entries, held, reversed(remembered) if reverse else remembered, reverse=reverse):
        if lsn != last:
            yield lsn
            last = lsn


def _entry_lsns(journal: Journal, account: str, after_lsn: int, until_lsn: int, reverse: bool,
                unindexed: list[Row], txn: Any) -> Iterator[int]:
    if reverse:
        row = entry_row_at(journal, account, until_lsn, unindexed, txn)
        seq = 0 if row is None else decode_entry(account, row)[0]
        while seq > 0:
            first = max(0, seq - PAGE_CHUNK)
            rows = entry_rows(journal, account, unindexed, first, seq - first, txn)
            for row in reversed(rows):
                lsn = _row_lsn(row)
                if lsn <= after_lsn:
                    return
                yield lsn
            seq = first
        return
    row = entry_row_at(journal, account, after_lsn, unindexed, txn)
    seq = 0 if row is None else decode_entry(account, row)[0]
    while True:
        rows = entry_rows(journal, account, unindexed, seq, PAGE_CHUNK, txn)
        for row in rows:
            lsn = _row_lsn(row)
            if lsn > until_lsn:
                return
            yield lsn
        if len(rows) < PAGE_CHUNK:
            return
        seq = decode_entry(account, rows[-1])[0]


def _hold_lsns(journal: Journal, account: str, after_lsn: int, until_lsn: int, reverse: bool,
               txn: Any) -> Iterator[int]:
    low, high = holds_key(account, after_lsn + 1), holds_key(account, until_lsn + 1)
    while True:
        rows = (journal.index_range_reverse if reverse else journal.index_range)(
            ENTRIES_INDEX, low, high, PAGE_CHUNK, txn)
        for key, _ in rows:
            yield int.from_bytes(key[-8:], "big")
        if len(rows) < PAGE_CHUNK:
            return
        if reverse:
            high = rows[-1][0]
        else:
            low = rows[-1][0] + b"\x00"


def check_kind(kind: object) -> str | None:
    """A transfers query's `kind`: None or one of `KINDS`; `InvalidRequest` otherwise."""
    if kind is not None and (type(kind) is not str or kind not in KINDS):  # the type first: a value's `==` may raise
        raise InvalidRequest(f"kind must be None or one of {', '.join(KINDS)}, got {shown(kind)}")
    return kind  # type: ignore[return-value]

