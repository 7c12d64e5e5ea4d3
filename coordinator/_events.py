"""The ledger's business events: its journal read as a stream of `Event` values.

One journal record is one event, in LSN order: an account opened ("account"), a decision
committed ("transfer": a transfer, a post or a void of a pending transfer, or every leg of a
linked chain), pending transfers expired ("expiry"), a request or a chain refused
("refusal"). Checkpoint records are not business events (they restate the projection for
opening): they are skipped, so an event's LSN may be followed by a gap of one.

`EventReader` reads them a chunk at a time, each chunk in its own short read transaction: a
follower may run for days, and an LMDB reader held open that long would stall the reuse of
free pages and the growth of the map.
"""

from __future__ import annotations

from collections.abc import Generator
from contextlib import closing
from dataclasses import dataclass
from typing import Any, Literal, cast

from journal import Journal, JournalCorruptedError

from coordinator._asof import record_timestamp
from coordinator._errors import JournalCorrupted
from coordinator._history import (
    Checkpointed,
    Committed,
    Expired,
    Opened,
    Record,
    Refused,
    records,
    transfer_record,
    transfer_with_status,
)
from coordinator._limits import EVENTS_PER_READ_MAX
from coordinator._values import Account, Entry, Resolution, Transfer, TransferRequest

EventKind = Literal["account", "transfer", "expiry", "refusal"]


@dataclass(frozen=True, slots=True)
class Event:
    """One business event: what one journal record did (`Ledger.events`).

    `transfers`, by `kind`:
      - "transfer": the `Transfer`s the record made, one, or every leg of a linked chain in
        order (a pending transfer with status "pending": the status as of this event);
      - "expiry": the pending transfers that expired, each with status "expired";
      - "refusal": the refused request as the caller made it (a `TransferRequest`, or a
        `Resolution` for a post or a void), or, for a refused linked chain, every request of
        the chain (the refusal is final for all of them); `code` is the refusal's error code
        (`LedgerError.code`, e.g. "insufficient_funds"; for a chain, the refused leg's own,
        which `LinkedTransferFailed.cause` carries);
      - "account": empty (`account` is the account opened).
    `entries`: the `Entry`s the record made (debit then credit of each transfer that moved
    money), each with the posted balance after it; empty when it made none.
    `timestamp`: nanoseconds since the epoch, the record's own (a chain's first leg's; an
    account's opening's). An account opened by a release before accounts had timestamps
    carries none: its event has the latest timestamp the ledger had stamped before it (a
    chain's last leg's), or 0 if none (`account_timestamp`).
    """

    lsn: int
    timestamp: int
    kind: EventKind
    account: Account | None = None
    transfers: tuple[Transfer | TransferRequest | Resolution, ...] = ()
    entries: tuple[Entry, ...] = ()
    code: str | None = None


def stamped_last(record: Record) -> int | None:
    """The latest timestamp `record` stamped (a record of k requests stamps timestamp..timestamp
    + k - 1), or None for a record that stamps none (an account, a checkpoint, a format-1
    record)."""
    if isinstance(record, Committed) and record.timestamp:
        return record.timestamp + len(record.transfers) - 1
    if isinstance(record, Refused) and record.timestamp:
        return record.timestamp + len(record.requests) - 1
    if isinstance(record, Expired) or isinstance(record, Opened) and record.timestamp:
        return record.timestamp
    return None


def account_timestamp(journal: Journal, lsn: int) -> int:
    """The timestamp of the event of an account opened at `lsn` by a release before accounts had
    timestamps: the latest timestamp stamped before it, or 0 (`record_timestamp`, whose walk
    back a checkpoint bounds: one comes at least every checkpoint interval)."""
    try:
        with journal.snapshot() as txn:
            return record_timestamp(journal, lsn - 1, txn, last=True)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn, error.where) from error


class EventReader:
    """Reads the events after `after_lsn`, a chunk at a time (`read`). Not thread-safe: one
    per iterator. `after_lsn` is the last LSN it has read (an event's, or a checkpoint's it
    skipped)."""

    def __init__(self, journal: Journal, after_lsn: int) -> None:
        self.journal = journal
        self.after_lsn = after_lsn
        self._stamp: int | None = None
        """The latest timestamp stamped up to `after_lsn`, once known."""
        self.caught_up = False
        """The last `read` reached the end of what it could read."""

    def read(self, last_lsn: int | None = None) -> list[Event]:
        """The events of at most `EVENTS_PER_READ_MAX` records after `after_lsn` (up to
        `last_lsn`, if given), in one read transaction; advances `after_lsn` past them.
        Raises `JournalCorrupted` at a record that fails its checks."""
        journal = self.journal
        found: list[Event] = []
        self.caught_up = True
        with journal.snapshot() as txn, closing(cast(Generator[Record, None, None],
                                                    records(journal, self.after_lsn, txn))) as stream:
            for count, record in enumerate(stream):
                if last_lsn is not None and record.lsn > last_lsn:
                    break
                if count == EVENTS_PER_READ_MAX:
                    self.caught_up = False
                    break
                event = self._event(record, txn)
                self.after_lsn = record.lsn
                if event is not None:
                    found.append(event)
        return found

    def _event(self, record: Record, txn: Any) -> Event | None:
        stamped = stamped_last(record)
        if stamped is not None:
            self._stamp = stamped
        if isinstance(record, Committed):
            return Event(record.lsn, record.timestamp, "transfer", None, record.transfers, record.entries)
        if isinstance(record, Opened):
            if self._stamp is None:  # (an opening of old, with no timestamp of its own)
                self._stamp = account_timestamp(self.journal, record.lsn)
            return Event(record.lsn, self._stamp, "account", record.account)
        if isinstance(record, Refused):
            return Event(record.lsn, record.timestamp, "refusal", None, record.requests, (), record.code)
        if isinstance(record, Expired):
            return Event(record.lsn, record.timestamp, "expiry", None,
                         tuple(self._expired(record.lsn, pending_id, txn) for pending_id in record.pending_ids))
        assert isinstance(record, Checkpointed), record
        return None

    def _expired(self, lsn: int, pending_id: str, txn: Any) -> Transfer:
        """The pending transfer `pending_id`, which the expiry at `lsn` expired, from the
        transfers index (checked against its record)."""
        record = transfer_record(self.journal, pending_id, txn)
        pending = None
        if isinstance(record, Committed):
            pending = next((t for t in record.transfers if t.id == pending_id and t.kind == "pending"), None)
        if pending is None:
            raise JournalCorrupted(f"journal corrupted at LSN {lsn}: it expires {pending_id!r}, which is not a "
                                   "committed pending transfer", lsn)
        return transfer_with_status(pending, "expired")
