"""What a journal holds, read as typed values: its records, an account, an account's entries.

The engine and the `tally` tools read through these; how a record or an index entry is laid
out stays here, in the coordinator. A record is decoded once, where it is read, into a named
value (`Opened`, `Committed`, `Refused`, `Checkpointed`).

Entries come from the entry index and, past the newest checkpoint, from the records (see
`coordinator._entries`): a caller that keeps those in memory (the open ledger) passes them;
others let them be derived from the records of the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, NamedTuple

from journal import Journal, JournalCorruptedError

from coordinator._claims import transfer_record
from coordinator._entries import Row, decode_entry, entry_rows, last_row, unindexed_entries
from coordinator._errors import JournalCorrupted
from coordinator._records import (
    ACCOUNT,
    ACCOUNTS_INDEX,
    CHECKPOINT,
    COMMIT,
    ENTRY_SEQ_END,
    decode,
    id_key,
    value_lsn,
)
from coordinator._values import Account, Entry, Transfer, TransferRequest


class Opened(NamedTuple):
    """An account was opened."""

    lsn: int
    account: Account


class Committed(NamedTuple):
    """A transfer committed, with its two entries as stamped."""

    lsn: int
    transfer: Transfer
    debit: Entry
    credit: Entry


class Refused(NamedTuple):
    """A transfer was refused; the refusal is final for its id."""

    lsn: int
    request: TransferRequest
    code: str


class Checkpointed(NamedTuple):
    """The projection of every account was journaled (opening starts from the newest)."""

    lsn: int
    accounts: int


Record = Opened | Committed | Refused | Checkpointed


def record_of(lsn: int, payload: bytes) -> Record:
    """The record at `lsn`, typed; `JournalCorrupted` if it does not decode as one."""
    return typed(lsn, decode(lsn, payload))


def typed(lsn: int, record: list[Any]) -> Record:
    """A record decoded (`coordinator._records.decode`) as its named value."""
    kind = record[0]
    if kind == ACCOUNT:
        return Opened(lsn, Account(record[1], record[2], record[3]))
    if kind == COMMIT:
        _, tid, source, destination, amount, source_seq, source_balance, target_seq, target_balance = record
        return Committed(lsn, Transfer(tid, source, destination, amount, lsn),
                         Entry(source, source_seq, tid, -amount, source_balance, lsn),
                         Entry(destination, target_seq, tid, amount, target_balance, lsn))
    if kind == CHECKPOINT:
        return Checkpointed(lsn, len(record[1]))
    return Refused(lsn, TransferRequest(record[1], record[2], record[3], record[4]), record[5])


def records(journal: Journal, after_lsn: int = 0, txn: Any | None = None) -> Iterator[Record]:
    """Every record after `after_lsn`, in LSN order, verified and typed. Damage raises
    `JournalCorrupted` naming the LSN where it is."""
    try:
        for lsn, payload in journal.scan(after_lsn, txn):
            yield record_of(lsn, payload)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn, error.where) from error


def record_at(journal: Journal, lsn: int, txn: Any | None = None) -> Record | None:
    """The record at `lsn`, typed, or None if there is none."""
    try:
        payload = journal.read(lsn, txn)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn, error.where) from error
    return None if payload is None else record_of(lsn, payload)


def account_of(journal: Journal, account_id: str, txn: Any) -> Account | None:
    """The account `account_id`, from the accounts index and the record it names (checked
    against each other), or None if it was never opened."""
    value = journal.index_get(ACCOUNTS_INDEX, id_key(account_id), txn)
    if value is None:
        return None
    if len(value) != 8:
        raise JournalCorrupted(f"the accounts index entry of {account_id!r} does not hold an LSN",
                               where="the accounts index")
    lsn = value_lsn(value)
    record = record_at(journal, lsn, txn)
    if not isinstance(record, Opened) or record.account.id != account_id:
        raise JournalCorrupted(f"journal corrupted: the accounts index points {account_id!r} at LSN {lsn}, which is "
                               "not its opening", lsn)
    return record.account


def entries_of(journal: Journal, account_id: str, after: int = 0, limit: int | None = None,
               unindexed: list[Row] | None = None, txn: Any | None = None) -> list[Entry]:
    """The account's entries with seq > `after`, at most `limit`, in seq order. `unindexed`:
    its entries past the newest checkpoint, as the open ledger keeps them (read before the
    snapshot `txn` opens); by default derived from the records of `txn`."""
    if after >= ENTRY_SEQ_END - 1:
        return []  # no seq can be that large
    if txn is None:
        with journal.snapshot() as txn:
            return entries_of(journal, account_id, after, limit, unindexed, txn)
    if unindexed is None:
        unindexed = unindexed_entries(journal, txn).get(account_id, [])
    return [Entry(account_id, *decode_entry(account_id, row))
            for row in entry_rows(journal, account_id, unindexed, after, limit, txn)]


def transfer_of(journal: Journal, transfer_id: str, txn: Any | None = None) -> Committed | Refused | None:
    """The record of `transfer_id`'s outcome, from the transfers index (no scan), or None."""
    found = transfer_record(journal, transfer_id, txn)
    if found is None:
        return None
    record = typed(*found)
    assert isinstance(record, (Committed, Refused)), record
    return record


def last_entry(journal: Journal, account_id: str, unindexed: list[Row] | None, txn: Any) -> Entry | None:
    """The account's last entry (`unindexed` as for `entries_of`), or None if it has none."""
    if unindexed is None:
        unindexed = unindexed_entries(journal, txn).get(account_id, [])
    row = last_row(journal, account_id, unindexed, txn)
    return None if row is None else Entry(account_id, *decode_entry(account_id, row))
