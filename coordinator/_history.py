"""What a journal holds, read as typed values: its records, an account, an account's entries.

The engine and the `tally` tools read through these; how a record or an index entry is laid
out stays here, in the coordinator. A record is decoded once, where it is read, into a named
value (`Opened`, `Committed`, `Refused`, `Expired`, `Checkpointed`), whatever the format
that wrote it.

Entries come from the entry index and, past the newest checkpoint, from the records (see
`coordinator._entries`): a caller that keeps those in memory (the open ledger) passes them;
others let them be derived from the records of the same snapshot.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

from journal import Journal, JournalCorruptedError

from coordinator._entries import Row, decode_entry, entry_rows, last_row, unindexed_entries
from coordinator._errors import JournalCorrupted
from coordinator._records import (
    ACCOUNT,
    ACCOUNT3,
    ACCOUNT4,
    ACCOUNTS_INDEX,
    CHECKPOINT,
    CHECKPOINT3,
    CHECKPOINT4,
    CHECKPOINT5,
    COMMIT,
    ENTRY_SEQ_END,
    EXPIRY3,
    REFUSAL3,
    RESOLUTION_MARK,
    TRANSFER3,
    TRANSFERS_INDEX,
    decode,
    id_key,
    resolution_key,
    value_lsn,
)
from coordinator._values import (
    KINDS,
    PENDING,
    POST,
    SINGLE,
    VOID,
    Account,
    Entry,
    Metadata,
    Request,
    Resolution,
    Transfer,
    TransferRequest,
    TransferStatus,
)


class Opened(NamedTuple):
    """An account was opened."""

    lsn: int
    account: Account
    timestamp: int = 0
    """When (0: a record from before accounts had timestamps)."""


class Committed(NamedTuple):
    """A decision committed: a transfer, a post or a void of a pending transfer, or every leg
    of a linked chain. One transfer per request, in order; the entries of those that move
    money, debit then credit of each."""

    lsn: int
    requests: tuple[Request, ...]
    transfers: tuple[Transfer, ...]
    entries: tuple[Entry, ...]
    linked: bool
    timestamp: int

    @property
    def transfer(self) -> Transfer:
        """The first (for a decision of one request, the only) transfer."""
        return self.transfers[0]


class Refused(NamedTuple):
    """A request, or a linked chain, was refused; the refusal is final for every id in it."""

    lsn: int
    requests: tuple[Request, ...]
    index: int  # type: ignore[assignment]  # a field, shadowing tuple.index
    """The refused request's place in `requests`."""
    code: str
    linked: bool
    timestamp: int

    @property
    def request(self) -> Request:
        """The refused request."""
        return self.requests[self.index]


class Expired(NamedTuple):
    """Pending transfers reached their deadline: their holds are released."""

    lsn: int
    timestamp: int
    pending_ids: tuple[str, ...]


class Checkpointed(NamedTuple):
    """The projection of every account was journaled (opening starts from the newest)."""

    lsn: int
    accounts: int
    """Accounts it holds a row of (a CHECKPOINT4 or CHECKPOINT5: those that changed since the
    one before it, and its sweep's)."""
    pending: int
    """Open pending transfers it carries (a CHECKPOINT5: those opened since the one before it,
    and its sweep's)."""
    ledger_accounts: int = -1
    """Accounts in the ledger when it was written (-1: as many as it holds)."""
    ledger_pending: int = -1
    """Pending transfers open when it was written (-1: as many as it holds)."""


Record = Opened | Committed | Refused | Expired | Checkpointed

_STATUS: dict[int, TransferStatus] = {SINGLE: "posted", PENDING: "pending", POST: "posted", VOID: "voided"}


def metadata_of(value: Any) -> Metadata | None:
    return None if value is None else Metadata(value)


def request_of(fields: list[Any]) -> Request:
    """The request the first `REQUEST_FIELDS` fields of a leg record."""
    kind, tid, source, destination, amount, code, reference, metadata, timeout_s, pending_id, requested = fields[:11]
    if kind == SINGLE or kind == PENDING:
        return TransferRequest(tid, source, destination, amount, code, reference, metadata_of(metadata),
                               kind == PENDING, timeout_s)
    return Resolution(tid, pending_id, requested, reference, metadata_of(metadata), kind == VOID)


def record_of(lsn: int, payload: bytes) -> Record:
    """The record at `lsn`, typed; `JournalCorrupted` if it does not decode as one."""
    return typed(lsn, decode(lsn, payload))


def typed(lsn: int, record: list[Any]) -> Record:
    """A record decoded (`coordinator._records.decode`) as its named value."""
    kind = record[0]
    if kind == TRANSFER3:
        return _committed(lsn, record)
    if kind == ACCOUNT4:
        return Opened(lsn, Account(record[2], record[3], record[4], record[5], metadata_of(record[6])), record[1])
    if kind == ACCOUNT3:
        return Opened(lsn, Account(record[1], record[2], record[3], record[4], metadata_of(record[5])))
    if kind == REFUSAL3:
        _, timestamp, linked, index, code, *fields = record
        return Refused(lsn, tuple(map(request_of, fields)), index, code, linked, timestamp)
    if kind == EXPIRY3:
        return Expired(lsn, record[1], tuple(record[2]))
    if kind == CHECKPOINT3:
        return Checkpointed(lsn, len(record[3]), len(record[4]))
    if kind == CHECKPOINT4:
        return Checkpointed(lsn, len(record[6]), len(record[7]), record[4])
    if kind == CHECKPOINT5:
        return Checkpointed(lsn, len(record[6]), len(record[7]), record[4], record[10])
    if kind == ACCOUNT:
        return Opened(lsn, Account(record[1], record[2], record[3]))
    if kind == COMMIT:
        _, tid, source, destination, amount, source_seq, source_balance, target_seq, target_balance = record
        return Committed(lsn, (TransferRequest(tid, source, destination, amount),),
                         (Transfer(tid, source, destination, amount, lsn),),
                         (Entry(source, source_seq, tid, -amount, source_balance, lsn),
                          Entry(destination, target_seq, tid, amount, target_balance, lsn)), False, 0)
    if kind == CHECKPOINT:
        return Checkpointed(lsn, len(record[1]), 0)
    return Refused(lsn, (TransferRequest(record[1], record[2], record[3], record[4]),), 0, record[5], False, 0)


def _committed(lsn: int, record: list[Any]) -> Committed:
    _, timestamp, linked, *legs = record
    transfers: list[Transfer] = []
    entries: list[Entry] = []
    for index, leg in enumerate(legs):
        (kind, tid, source, destination, amount, code, reference, metadata, timeout_s, pending_id, _requested,
         source_seq, source_balance, target_seq, target_balance) = leg
        stamped = timestamp + index
        transfers.append(Transfer(tid, source, destination, amount, lsn, stamped, code, reference,
                                  metadata_of(metadata), KINDS[kind], pending_id, _STATUS[kind], timeout_s))
        if kind == SINGLE or kind == POST:
            entries += (Entry(source, source_seq, tid, -amount, source_balance, lsn, stamped),
                        Entry(destination, target_seq, tid, amount, target_balance, lsn, stamped))
    return Committed(lsn, tuple(map(request_of, legs)), tuple(transfers), tuple(entries), linked, timestamp)


def records(journal: Journal, after_lsn: int = 0, txn: Any | None = None, until: int | None = None
            ) -> Iterator[Record]:
    """Every record after `after_lsn` (up to LSN `until`, if given: the one after it is not
    decoded), in LSN order, verified and typed. Damage raises `JournalCorrupted` naming the
    LSN where it is."""
    try:
        for lsn, payload in journal.scan(after_lsn, txn):
            if until is not None and lsn > until:
                return
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


def last_entry(journal: Journal, account_id: str, unindexed: list[Row] | None, txn: Any) -> Entry | None:
    """The account's last entry (`unindexed` as for `entries_of`), or None if it has none."""
    if unindexed is None:
        unindexed = unindexed_entries(journal, txn).get(account_id, [])
    row = last_row(journal, account_id, unindexed, txn)
    return None if row is None else Entry(account_id, *decode_entry(account_id, row))


# --- transfer ids -------------------------------------------------------------------------


def index_lsn(journal: Journal, key: bytes, txn: Any, what: str) -> int | None:
    value = journal.index_get(TRANSFERS_INDEX, key, txn)
    if value is None:
        return None
    if len(value) != 8:
        raise JournalCorrupted(f"the transfers index entry of {what} does not hold an LSN", where="the transfers index")
    return value_lsn(value)


def named_record(journal: Journal, key: bytes, lsn: int, txn: Any) -> Committed | Refused | Expired:
    """The record at `lsn` that the transfers index names for `key`: the outcome of the id
    whose key it is (or, for a resolution key, what resolved that pending transfer).
    `JournalCorrupted` if it is missing, damaged, or another id's (the pair check of an index
    entry against the record it points at)."""
    record = record_at(journal, lsn, txn)
    if record is None:
        raise JournalCorrupted(f"journal corrupted: the transfers index points {key!r} at LSN {lsn}, which is missing",
                               lsn)
    if key[:1] == RESOLUTION_MARK:
        pending_key = key[1:]
        if isinstance(record, Expired):
            named = any(id_key(pending_id) == pending_key for pending_id in record.pending_ids)
        else:
            named = isinstance(record, Committed) and any(
                type(request) is Resolution and id_key(request.pending_id) == pending_key for request in record.requests)
    else:
        named = isinstance(record, (Committed, Refused)) and any(
            id_key(request.id) == key for request in record.requests)
    if not named:
        raise JournalCorrupted(f"journal corrupted: the transfers index points {key!r} at LSN {lsn}, "
                               "which is another record", lsn)
    return record  # type: ignore[return-value]


def transfer_record(journal: Journal, tid: str, txn: Any | None = None) -> Committed | Refused | None:
    """The record of `tid`'s outcome (commit or refusal), from the transfers index (no scan),
    checked against each other; None if the id was never used."""
    if txn is None:
        with journal.snapshot() as txn:
            return transfer_record(journal, tid, txn)
    key = id_key(tid)
    lsn = index_lsn(journal, key, txn, repr(tid))
    if lsn is None:
        return None
    return named_record(journal, key, lsn, txn)  # type: ignore[return-value]


transfer_of = transfer_record


def transfer_records(journal: Journal, tids: Sequence[str], txn: Any) -> list[Committed | Refused | None]:
    """`transfer_record` of each of `tids` in `txn`, a record read and checked once for all the
    ids it holds (a chain's legs share one: read once per leg, a retry of a chain of 1,000
    would decode it 1,000 times)."""
    read: dict[int, tuple[Committed | Refused, set[bytes]]] = {}
    found: list[Committed | Refused | None] = []
    for tid in tids:
        key = id_key(tid)
        lsn = index_lsn(journal, key, txn, repr(tid))
        if lsn is None:
            found.append(None)
            continue
        if lsn not in read:
            record = named_record(journal, key, lsn, txn)
            read[lsn] = (record, {id_key(request.id) for request in record.requests})  # type: ignore[assignment, union-attr]
        record, keys = read[lsn]
        if key not in keys:  # the pair check of `named_record`, against the keys of the record read
            raise JournalCorrupted(f"journal corrupted: the transfers index points {key!r} at LSN {lsn}, "
                                   "which is another record", lsn)
        found.append(record)
    return found


def resolution_of(journal: Journal, pending_id: str, txn: Any) -> TransferStatus | None:
    """What resolved the pending transfer `pending_id` (posted, voided, expired), from the
    transfers index; None if nothing has."""
    key = resolution_key(pending_id)
    lsn = index_lsn(journal, key, txn, f"the resolution of {pending_id!r}")
    if lsn is None:
        return None
    record = named_record(journal, key, lsn, txn)
    if isinstance(record, Expired):
        return "expired"
    for request in record.requests:
        if type(request) is Resolution and request.pending_id == pending_id:
            return "voided" if request.void else "posted"
    raise AssertionError(record)  # named_record checked it names pending_id


def transfer_with_status(transfer: Transfer, status: TransferStatus) -> Transfer:
    return Transfer(transfer.id, transfer.source, transfer.destination, transfer.amount, transfer.lsn,
                    transfer.timestamp, transfer.code, transfer.reference, transfer.metadata, transfer.kind,
                    transfer.pending_id, status, transfer.timeout_s)
