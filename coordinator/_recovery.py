"""Recovery: rebuild every account from the journal with the same pure `post`.

Every record replayed is verified (checksum, LSN continuity: the journal's
scan) and every commit's stamped entries are re-derived and must agree (seq
next in line, balance the running sum, LSN increasing). A checkpoint passed on
the way must equal the projection rebuilt so far. After the last record, money
must be conserved. Any failure raises `JournalCorrupted` naming the LSN;
nothing is repaired.

Opening starts from the newest checkpoint (`coordinator._checkpoints`) and
replays only the tail, so its cost is bounded by the checkpoint interval, not by
the ledger's age. A full audit (`tally verify`) replays from LSN 1.

Reservations are never journaled: they live only in account mailboxes,
and a commit record is written atomically with both of its entries. So after a
crash there is no half-applied transfer on disk to finish or undo: a transfer
that was reserved but not decided left no record, was never acknowledged, and
reserves nothing once the ledger is open again; a retry with its id runs afresh.
"""


from __future__ import annotations

import gc
import sys
import sysconfig
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from operator import itemgetter
from typing import Any

from journal import Completion, Journal, JournalCorruptedError

from coordinator._checkpoints import Recovered, checkpoint_agrees, corrupted, load_checkpoint
from coordinator._entering import Overlay, enter, expire, holds_after, holds_expired
from coordinator._entries import add_commit, add_holds, drop_before, hold_row_lsn, indexed_through
from coordinator._errors import (
    BalanceOverflow,
    CurrencyMismatch,
    ExceedsPendingAmount,
    InsufficientFunds,
    JournalCorrupted,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    PendingTransferNotFound,
)
from coordinator._history import Committed, Expired, Opened, Record, Refused, metadata_of, request_of
from coordinator._limits import AGED_AFTER_OPEN_MIN, AMOUNT_MAX
from coordinator._records import (
    ACCOUNT,
    ACCOUNT3,
    ACCOUNT4,
    ACCOUNTS_INDEX,
    CHECKPOINT,
    CHECKPOINT3,
    CHECKPOINT4,
    CHECKPOINT5,
    CHECKPOINTS_INDEX,
    COMMIT,
    EXPIRY3,
    REFUSAL3,
    TRANSFER3,
    TRANSFERS_INDEX,
    decode,
)
from coordinator._rules import Leg, Refusal, decide, due
from coordinator._sequencer import Sequencer
from coordinator._state import NO_ENTRIES, AccountState, SequenceError, post
from coordinator._tickets import Ticket
from coordinator._values import Account, TransferRequest


def recover(journal: Journal) -> Recovered:
    """What opening a ledger runs: the newest checkpoint, then the tail (whose entries are
    not indexed yet: `unindexed` collects them); then the indexes that name records must
    hold exactly the entries the records put there (`check_index_counts`).

    The cyclic garbage collector is paused meanwhile: a million accounts are millions of
    new lists, tuples and values, none of them in a cycle, and each collection it would
    start on the way walks every one made so far (two thirds of the time, measured). After
    a large load they then go to its oldest generation at once (`_age_loaded`)."""
    collecting = gc.isenabled()
    gc.disable()
    young = gc.get_count()[0]
    try:
        books = load_checkpoint(journal, unindexed=True)
        replay(journal, books)
    finally:
        _age_loaded(gc.get_count()[0] - young)
        if collecting:
            gc.enable()
    check_index_counts(journal, books)
    return books


_POSTED = itemgetter(1)  # of an account's state (seq, posted, last LSN)

_UNWALKED_MOVES = sys.version_info < (3, 14) and not sysconfig.get_config_var("Py_GIL_DISABLED")
"""Whether `gc.freeze` then `gc.unfreeze` move every young object to the oldest generation
without walking them: CPython 3.11 to 3.13 built with the GIL. (3.14's incremental collector
walks them; a free-threaded build has no generations, and walks its whole heap for each of
those calls, even with its GIL turned back on.)"""


def _age_loaded(made: int) -> bool:
    """Move every young object to the collector's oldest generation after an open that made
    `made` (the collector's young count, net, since it was paused) of at least
    `AGED_AFTER_OPEN_MIN`; True if it did.

    Left young, the first collections after opening walked all of them twice more: 0.4 s
    in `Ledger.open` and 0.3 s in the load after it, at a million accounts. Moved, only a
    full collection walks them, once, whenever CPython next makes one. The host's young
    objects go too (a cycle among them then waits for that collection) and the collector's
    counts start again, so a small open does nothing. Nor does it when objects are frozen
    already, as a host's `gc.freeze()` leaves them (unfreezing would let go of them too), which
    a host should call only once every open has returned. CPython 3.12 keeps objects of its
    own frozen, so there it never moves anything."""
    if not _UNWALKED_MOVES or made < AGED_AFTER_OPEN_MIN or gc.get_freeze_count():
        return False
    gc.freeze()
    gc.unfreeze()
    return True


def _release(books: Recovered) -> None:
    """Drop the collected rows of the records before the newest checkpoint met whose rows the
    index now holds (`indexed_through`): a reader that replays as it goes met it before its
    rows were all in."""
    through = [lsn for lsn in books.unreleased if lsn <= books.indexed_through]
    if not through:
        return
    books.unreleased = books.unreleased[len(through):]
    assert books.unindexed is not None
    books.unindexed = drop_before(books.unindexed, through[-1])
    if books.unindexed_holds is not None:
        books.unindexed_holds = drop_before(books.unindexed_holds, through[-1], hold_row_lsn)


def check_index_counts(journal: Journal, books: Recovered) -> None:
    """Every record puts a known number of entries in the accounts, transfers and checkpoints
    indexes (an account, an id's outcome, what resolved a pending transfer, a checkpoint),
    which replay counted (`index_entries`): the three must hold that many. (The journal
    checked each count against the pages it read as it opened.) A missing entry would make
    its id look unused, and a retry of it would run again."""
    with journal.snapshot() as txn:
        counts = {name: journal.index_count(name, txn) for name in (ACCOUNTS_INDEX, TRANSFERS_INDEX, CHECKPOINTS_INDEX)}
    if sum(counts.values()) != books.index_entries:
        shown = ", ".join(f"{count} in the {name} index" for name, count in counts.items())
        raise JournalCorrupted(f"journal corrupted: the indexes hold {sum(counts.values())} entries ({shown}); the "
                               f"records up to LSN {books.last_lsn} put {books.index_entries} there",
                               where="the indexes")
    # The indexes add up, so each account opened has its entry there: more entries than
    # accounts loaded is a checkpoint that left accounts out (fewer, the index again).
    held, loaded = counts[ACCOUNTS_INDEX], len(books.accounts)
    if held > loaded and books.checkpoint_lsn:
        raise corrupted(books.checkpoint_lsn, f"the accounts index holds {held} accounts, but this checkpoint, the "
                                             f"ones it builds on and the records after it hold {loaded}")
    if held != loaded:
        raise JournalCorrupted(f"journal corrupted: the accounts index holds {held} accounts; the records up to "
                               f"LSN {books.last_lsn} opened {loaded}", where="the indexes")


def replay(
    journal: Journal, into: Recovered | None = None, progress: Callable[[int], None] | None = None,
    txn: Any | None = None,
) -> Recovered:
    """Apply every durable record after `into.last_lsn` to `into` (a fresh one by default),
    re-deciding each by the rules and checking it is what was journaled. `txn`: the snapshot
    whose records to apply (by default, one the scan opens)."""
    books = into if into is not None else Recovered()
    accounts, states, changed = books.accounts, books.states, books.changed
    if books.unindexed is not None:  # read before the scan's snapshot (or in it): it holds at least that much
        with nullcontext(txn) if txn is not None else journal.snapshot() as snapshot:
            books.indexed_through = max(books.indexed_through, indexed_through(journal, snapshot))
        _release(books)
    try:
        for lsn, payload in journal.scan(books.last_lsn, txn):
            record = decode(lsn, payload)
            kind = record[0]
            if kind == TRANSFER3:
                _apply_transfer(books, lsn, record)
                for leg in record[3:]:
                    if leg[11]:  # entries: the accounts changed
                        changed.add(leg[2])
                        changed.add(leg[3])
                if books.unindexed is not None:
                    add_commit(books.unindexed, books.prefixes, lsn, record)
            elif kind == COMMIT:
                _apply_commit(books, lsn, record)
                changed.add(record[2])
                changed.add(record[3])
                if books.unindexed is not None:
                    add_commit(books.unindexed, books.prefixes, lsn, record)
            elif kind == ACCOUNT or kind == ACCOUNT3 or kind == ACCOUNT4:
                if kind == ACCOUNT4:
                    _stamped_at(books, lsn, record[1], 1)
                    record = record[1:]
                account = (Account(record[1], record[2], record[3]) if kind == ACCOUNT
                           else Account(record[1], record[2], record[3], record[4], metadata_of(record[5])))
                if account.id in accounts:
                    raise corrupted(lsn, f"account {account.id!r} is opened twice")
                accounts[account.id] = account
                books.account_lsns[account.id] = lsn
                states[account.id] = NO_ENTRIES
                books.index_entries += 1
            elif kind == CHECKPOINT or kind == CHECKPOINT3 or kind == CHECKPOINT4 or kind == CHECKPOINT5:
                books.index_entries += 1
                if not checkpoint_agrees(lsn, record, books):
                    raise corrupted(lsn, "the checkpoint disagrees with the records before it")
                books.checkpoints += 1
                books.checkpoint_met = lsn
                changed = books.changed = set()
                books.opened_since.clear()
                books.closed_since.clear()
                if lsn <= books.indexed_through:  # the index holds the rows of the records before it
                    if books.unindexed is not None:
                        books.unindexed = {}
                    if books.unindexed_holds is not None:
                        books.unindexed_holds = {}
                    books.unreleased = []
                elif books.unindexed is not None:
                    books.unreleased.append(lsn)
            elif kind == REFUSAL3:
                _, timestamp, _, index, _, *requests = record
                _stamped_at(books, lsn, timestamp, len(requests))
                if not 0 <= index < len(requests):
                    raise corrupted(lsn, f"the refusal names request {index} of {len(requests)}")
                books.rejects += 1
                books.index_entries += len(requests)
            elif kind == EXPIRY3:
                _, timestamp, ids = record
                _stamped_at(books, lsn, timestamp, 1)
                reason = due(books.pending, ids, timestamp)
                if reason is not None or len(set(ids)) != len(ids) or not ids:
                    raise corrupted(lsn, f"the expiry of {ids!r}: {reason or 'ids repeated or none'}: the rules do "
                                        "not allow it")
                if books.unindexed_holds is not None:
                    add_holds(books.unindexed_holds, lsn,
                              holds_expired([books.pending[pending_id] for pending_id in ids], books.held,
                                            books.incoming))
                expire(books, ids)
                books.expiries += len(ids)
                books.index_entries += len(ids)
            else:  # REJECT
                books.rejects += 1
                books.index_entries += 1
            books.records += 1
            books.last_lsn = lsn
            if progress is not None and not lsn % 10_000:
                progress(lsn)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn) from error
    total = sum(map(_POSTED, states.values()))  # (the loop in C: a million accounts)
    if total != 0:
        raise JournalCorrupted(
            f"journal corrupted: posted balances sum to {total}, not 0, after LSN {books.last_lsn}",
            books.last_lsn,
        )
    return books


def _stamped_at(books: Recovered, lsn: int, timestamp: Any, count: int) -> None:
    """Check a record's timestamp follows the last one journaled; it is the last now (plus
    `count` - 1: a record of several requests gives the i-th its timestamp + i)."""
    if type(timestamp) is not int or timestamp <= books.last_timestamp:
        raise corrupted(lsn, f"its timestamp {timestamp!r} does not follow timestamp {books.last_timestamp}")
    books.last_timestamp = timestamp + count - 1


_REFUSED = {
    InsufficientFunds.code: "it takes its source below its overdraft limit: the rules refuse it",
    CurrencyMismatch.code: "its accounts hold different currencies: the rules refuse it",
    BalanceOverflow.code: "a balance would leave the range of ±(2**63 - 1): the rules refuse it",
    PendingTransferNotFound.code: "it resolves no open pending transfer: the rules refuse it",
    PendingTransferAlreadyPosted.code: "its pending transfer was already posted: the rules refuse it",
    PendingTransferAlreadyVoided.code: "its pending transfer was already voided: the rules refuse it",
    PendingTransferExpired.code: "its pending transfer had expired: the rules refuse it",
    ExceedsPendingAmount.code: "it posts more than its pending transfer holds: the rules refuse it",
}
"""What replay says of a commit the rules refuse (the audit files it under the check it breaks)."""


def _refused(lsn: int, tid: object, refusal: Refusal) -> JournalCorrupted:
    return corrupted(lsn, f"transfer {tid!r}: {_REFUSED.get(refusal.code, f'the rules refuse it: {refusal.code}')}")


def _apply_transfer(books: Recovered, lsn: int, record: list[Any]) -> None:
    """Re-decide a journaled TRANSFER3 record from the books before it (`rules.decide` at its
    timestamp, nothing reserved: reservations are never journaled), check every leg is what
    the decision makes, and enter it. A record live operation could not have written (one
    the rules refuse, another stamp) is damage."""
    _, timestamp, linked, *legs = record
    _stamped_at(books, lsn, timestamp, len(legs))
    try:
        requests = tuple(request_of(leg) for leg in legs)
    except (TypeError, ValueError) as error:
        raise corrupted(lsn, f"a leg does not read as a request: {error}") from error
    for request in requests:
        if request.id in books.pending:
            raise corrupted(lsn, f"transfer {request.id!r} reuses the id of an open pending transfer")
        if type(request) is TransferRequest and (type(request.amount) is not int
                                                 or not 0 < request.amount <= AMOUNT_MAX):
            raise corrupted(lsn, f"transfer {request.id!r} has amount {request.amount!r}")
        missing = [name for name in (getattr(request, "source", None), getattr(request, "destination", None))
                   if name is not None and name not in books.states]
        if missing:
            raise corrupted(lsn, f"transfer {request.id!r} names an account that was never opened")
    try:
        decided = decide(requests, books, timestamp, bound_holds=False)  # (a ledger older than the bound)
    except (TypeError, KeyError) as error:  # a field of a type live operation never writes
        raise corrupted(lsn, f"a leg does not read as a request: {error!r}") from error
    if type(decided) is Refusal:
        raise _refused(lsn, requests[decided.index].id, decided)
    _check_legs(books, lsn, legs, decided)  # type: ignore[arg-type]
    if books.unindexed_holds is not None:
        add_holds(books.unindexed_holds, lsn, holds_after(decided, books.held, books.incoming))  # type: ignore[arg-type]
    enter(books, requests, decided, lsn, timestamp)  # type: ignore[arg-type]
    books.commits += len(legs)
    books.index_entries += len(legs) + sum(1 for request in requests if type(request) is not TransferRequest)


def _check_legs(books: Recovered, lsn: int, legs: list[list[Any]], decided: list[Leg]) -> None:
    """Each journaled leg must be what the decision made: the same accounts and amount, and
    entries stamped as `post` applies them (next seq, running balance) and as decided."""
    written: dict[str, AccountState] = {}
    # The legs' entries over the books (a chain's legs build on each other).
    states: Mapping[str, AccountState] = Overlay(written, books.states)  # type: ignore[assignment]
    for leg, made in zip(legs, decided, strict=True):
        kind, tid, source, destination, amount = leg[0], leg[1], leg[2], leg[3], leg[4]
        made_kind, made_source, made_destination, made_amount, stamp, pending = made
        if (kind, source, destination, amount) != (made_kind, made_source, made_destination, made_amount) or (
                pending is not None and leg[5] != pending.code):
            raise corrupted(lsn, f"transfer {tid!r}: the record says {amount!r} from {source!r} to {destination!r}; "
                                f"the rules decide {made_amount} from {made_source!r} to {made_destination!r}")
        journaled = tuple(leg[11:15])
        if stamp is None:
            if journaled != (0, 0, 0, 0):
                raise corrupted(lsn, f"transfer {tid!r} moves no money, yet its record stamps entries {journaled!r}")
            continue
        try:  # `post` checks each entry is the next and adds up: so the record stamps what `decide` does
            written[source] = post(states[source], leg[11], -amount, leg[12], lsn)
            written[destination] = post(states[destination], leg[13], amount, leg[14], lsn)
        except SequenceError as error:
            raise corrupted(lsn, f"transfer {tid!r}: {error}") from error
        except TypeError as error:
            raise corrupted(lsn, f"transfer {tid!r} stamps entries {journaled!r}") from error
        assert journaled == stamp, (journaled, stamp)


def _apply_commit(books: Recovered, lsn: int, record: list[Any]) -> None:
    """A format-1 or -2 COMMIT record: `_apply_transfer`'s checks for its one transfer."""
    _, tid, source, destination, amount, source_seq, source_balance, target_seq, target_balance = record
    if source not in books.states or destination not in books.states:
        raise corrupted(lsn, f"transfer {tid!r} names an account that was never opened")
    if type(amount) is not int or not 0 < amount <= AMOUNT_MAX:
        raise corrupted(lsn, f"transfer {tid!r} has amount {amount!r}")
    requests = (TransferRequest(tid, source, destination, amount),)
    decided = decide(requests, books, 0)
    if type(decided) is Refusal:
        raise _refused(lsn, tid, decided)
    leg = [0, tid, source, destination, amount, 0, None, None, None, None, None,
           source_seq, source_balance, target_seq, target_balance]
    _check_legs(books, lsn, [leg], decided)  # type: ignore[arg-type]
    enter(books, requests, decided, lsn, 0)  # type: ignore[arg-type]
    books.commits += 1
    books.index_entries += 1

def copy_record(sequencer: Sequencer, record: Record) -> str | None:
    """Journal `record` (read from another journal) again through `sequencer`, of a journal
    no ledger has open, decided again by the rules at the record's own timestamp and its
    entries stamped anew (salvage's copy); why the copy is not what the original was, or
    None. A checkpoint is not copied (the copy makes its own)."""
    if isinstance(record, Opened):
        sequencer.clock = _stopped_at(record.timestamp)  # (0, an opening of old: the last timestamp + 1)
        with sequencer.lock:
            sequencer.open_account(record.account, Completion())
    elif isinstance(record, (Committed, Refused)):
        sequencer.clock = _stopped_at(record.timestamp)
        ticket = Ticket(record.requests, 0, linked=record.linked)
        if isinstance(record, Committed):
            decided = sequencer.commit(ticket, _nowhere, reserved=False)
            if type(decided) is Refusal:
                return f"its commit is now refused ({decided.code})"
        else:
            sequencer.reject(ticket, record.index, record.code)
    elif isinstance(record, Expired):
        sequencer.clock = _stopped_at(record.timestamp)
        sequencer.expire(_nowhere, _nowhere)  # what is due by then: this record's, and the next ones' of one reading
        left = [pending_id for pending_id in record.pending_ids if pending_id in sequencer.pending]
        if left:
            return f"pending transfers {left!r} did not expire"
    return None


def _stopped_at(timestamp: int) -> Callable[[], int]:
    """A clock stopped at `timestamp`."""
    return lambda: timestamp


def _nowhere(_: object) -> None:
    """Delivery and pinning for a journal no ledger has open: no accounts to tell."""
