"""Recovery: rebuild every account from the journal with the same pure `post`.

Every record replayed is verified (checksum, LSN continuity: the journal's
scan) and every commit's stamped entries are re-derived and must agree (seq
next in line, balance the running sum, LSN increasing). A checkpoint passed on
the way must equal the projection rebuilt so far. After the last record, money
must be conserved. Any failure raises `JournalCorrupted` naming the LSN;
nothing is repaired.

Opening starts from the newest checkpoint and replays only the tail, so its
cost is bounded by the checkpoint interval, not by the ledger's age. A full
audit (`tally verify`) replays from LSN 1.

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
from dataclasses import dataclass, field
from itertools import compress, islice, repeat, starmap
from operator import is_not, itemgetter, le, not_
from typing import Any

from journal import Completion, Journal, JournalCorruptedError

from coordinator._holds import unindexed_holds_by_key
from coordinator._entries import Unindexed, add_commit, add_holds, drop_before, hold_row_lsn, indexed_through, unindexed_by_key
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
from coordinator._claims import Ticket
from coordinator._history import Committed, Expired, Opened, Record, Refused, request_of
from coordinator._limits import AGED_AFTER_OPEN_MIN, AMOUNT_MAX
from coordinator._records import (
    ACCOUNT,
    ACCOUNT3,
    ACCOUNT4,
    ACCOUNTS_INDEX,
    CHECKPOINT,
    CHECKPOINT3,
    CHECKPOINT4,
    CHECKPOINTS_INDEX,
    COMMIT,
    EXPIRY3,
    REFUSAL3,
    TRANSFER3,
    TRANSFERS_INDEX,
    decode,
    value_lsn,
)
from coordinator._rules import Leg, Overlay, Refusal, decide, due, enter, expire, holds_after, holds_expired
from coordinator._sequencer import Sequencer
from coordinator._state import NO_ENTRIES, AccountState, Pending, Projection, SequenceError, post
from coordinator._values import Account, Metadata, TransferRequest, opened_account


@dataclass
class Recovered(Projection):
    """The projection a replay rebuilt, and what it counted on the way."""

    records: int = 0
    """Records replayed (after the checkpoint started from, if any)."""
    commits: int = 0
    """Transfers committed (each leg of a chain, each post and void, counts)."""
    rejects: int = 0
    """Refusals (a refused chain counts once)."""
    expiries: int = 0
    """Pending transfers expired."""
    checkpoints: int = 0
    last_lsn: int = 0
    checkpoint_lsn: int = 0
    """LSN of the checkpoint replay started from (0: from the beginning)."""
    unindexed: Unindexed | None = None
    """If not None, replay collects here the entries of the commits after the last
    checkpoint it meets whose rows the index holds (`indexed_through`): the ones the entry
    index may not hold."""
    indexed_through: int = 0
    """The newest checkpoint whose entries and hold rows the index held when replay last looked."""
    unreleased: list[int] = field(default_factory=list)
    """The checkpoints after it that replay met (or started from), oldest first: once the index
    holds the rows of one, the next replay drops those it collected from before it."""
    unindexed_holds: Unindexed | None = None
    """Likewise, the hold rows of the records after the last checkpoint it meets."""
    prefixes: dict[str, bytes] = field(default_factory=dict)
    """Entry key prefix per account, for `unindexed`."""
    changed: set[str] = field(default_factory=set)
    """The accounts whose entries changed since the last checkpoint replay met (a
    CHECKPOINT4 must hold their rows)."""
    checkpoint_met: int = 0
    """LSN of the last checkpoint replay met (or started from)."""


def _corrupt(lsn: int, reason: str) -> JournalCorrupted:
    return JournalCorrupted(f"journal corrupted at LSN {lsn}: {reason}", lsn)


def _metadata(value: Any) -> Metadata | None:
    return None if value is None else Metadata(value)


_FIRST = itemgetter(0)
_ACCOUNT_FIELDS = itemgetter(0, 1, 2, 3, 4)
ROW_FIELDS = 9
"""An account's row in a CHECKPOINT3 or CHECKPOINT4: id, currency, limit, code, metadata,
opening LSN, seq, posted, last LSN."""
_METADATA = itemgetter(4)
_OPENED_LSN = itemgetter(5)
_STATE_FIELDS = itemgetter(6, 7, 8)


def _account_row(row: list[Any]) -> tuple[Account, int, tuple[int, int, int]]:
    """(account, opening LSN, state) of a CHECKPOINT3 row."""
    account_id, currency, limit, code, metadata, opened_lsn, seq, posted, last_lsn = row
    return Account(account_id, currency, limit, code, _metadata(metadata)), opened_lsn, (seq, posted, last_lsn)


def _checkpoint_agrees(record: list[Any], books: Recovered) -> bool:
    """Pair check: a checkpoint met on the way must equal the projection rebuilt so far."""
    if record[0] == CHECKPOINT:
        rows = [(Account(row[0], row[1], row[2]), row[3], (row[4], row[5], row[6])) for row in record[1]]
        pendings: list[Any] = []
    elif record[0] == CHECKPOINT4:
        _, last_timestamp, index_entries, previous, total, sweep_next, raw, pendings = record
        rows = [_account_row(row) for row in raw]
        if last_timestamp != books.last_timestamp or index_entries != books.index_entries or total != len(
                books.accounts) or type(sweep_next) is not int or not 0 <= sweep_next < max(total, 1):
            return False
        if previous == 0:  # every account
            if len(rows) != total:
                return False
        elif previous != books.checkpoint_met or not _holds_what_changed(rows, previous, books):
            return False
    else:
        _, last_timestamp, index_entries, raw, pendings = record
        rows = [_account_row(row) for row in raw]
        if last_timestamp != books.last_timestamp or index_entries != books.index_entries:
            return False
        if len(rows) != len(books.accounts):
            return False
    accounts, lsns, states = books.accounts, books.account_lsns, books.states
    for account, opened_lsn, state in rows:
        if accounts.get(account.id) != account or lsns[account.id] != opened_lsn or states[account.id] != state:
            return False
    return [list(pending) for pending in books.pending.values()] == pendings


def _holds_what_changed(rows: list[tuple[Account, int, Any]], previous: int, books: Recovered) -> bool:
    """A CHECKPOINT4 that builds on the one at `previous` holds a row of every account that
    changed or opened since, each once (opening takes an account's row from the newest
    checkpoint holding one)."""
    held = {account.id for account, _, _ in rows}
    if len(held) != len(rows) or not books.changed <= held:
        return False
    for account_id, opened_lsn in reversed(books.account_lsns.items()):  # creation order: the newest last
        if opened_lsn < previous:
            return True
        if account_id not in held:
            return False
    return True


def load_checkpoint(journal: Journal, unindexed: bool = False) -> Recovered:
    """The projection at the newest checkpoint (empty if there is none), verified. With
    `unindexed`, its `unindexed` and `unindexed_holds` start from `indexed_through`, for
    replay to go on collecting (the rows of the records before the checkpoint may still be
    being written behind it)."""
    books = _load_checkpoint(journal)
    if unindexed:
        with journal.snapshot() as txn:
            books.indexed_through = indexed = indexed_through(journal, txn)
            behind = indexed < books.last_lsn
            books.unindexed = unindexed_by_key(journal, txn, books.last_lsn) if behind else {}
            books.unindexed_holds = unindexed_holds_by_key(journal, txn, books.last_lsn) if behind else {}
            books.unreleased = [books.last_lsn] if behind else []
    return books


def _load_checkpoint(journal: Journal) -> Recovered:
    books = Recovered()
    key = journal.index_last(CHECKPOINTS_INDEX)
    if key is None:
        return books
    lsn = value_lsn(key)
    try:
        payload = journal.read(lsn)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn) from error
    if payload is None:
        raise _corrupt(lsn, "the checkpoint index names a record that is not there")
    record = decode(lsn, payload)
    if record[0] == CHECKPOINT:
        for account_id, currency, limit, opened_lsn, seq, posted, last_lsn in record[1]:
            books.accounts[account_id] = Account(account_id, currency, limit)
            books.account_lsns[account_id] = opened_lsn
            books.states[account_id] = (seq, posted, last_lsn)
        books.index_entries = lsn  # formats 1 and 2: one index entry per record
    elif record[0] == CHECKPOINT3 or record[0] == CHECKPOINT4:
        if record[0] == CHECKPOINT3:
            _, books.last_timestamp, books.index_entries, rows, pendings = record
            _check_rows(lsn, rows)
            chain = [lsn]
            books.chain_read = ((len(rows), len(rows)),)
        else:
            _check_checkpoint(lsn, record)
            _, books.last_timestamp, books.index_entries, _, total, sweep_next, _, pendings = record
            rows, chain, books.chain_read = _walk_back(journal, lsn, record)
            books.checkpoint_chain = (lsn, total, sweep_next)
        try:
            _load_rows(books, rows, pendings)
        except (TypeError, ValueError, KeyError, IndexError) as error:  # what a checkpoint never holds
            _find_bad_rows(journal, chain)
            raise _corrupt(lsn, f"the checkpoint's accounts or pending transfers do not load: {error!r}") from error
    else:
        raise _corrupt(lsn, "the checkpoint index names a record that is not a checkpoint")
    books.checkpoint_met = lsn
    books.last_lsn = books.checkpoint_lsn = lsn
    return books


def _load_rows(books: Recovered, rows: list[list[Any]], pendings: list[Any]) -> None:
    """Put the checkpoint's rows (in creation order) and open pending transfers into `books`."""
    # `_account_row` of each row, a column at a time (a million rows: the loops run in C).
    ids = list(map(_FIRST, rows))
    books.accounts.update(zip(ids, starmap(opened_account, map(_ACCOUNT_FIELDS, rows)), strict=True))
    books.account_lsns.update(zip(ids, map(_OPENED_LSN, rows), strict=True))
    books.states.update(zip(ids, map(_STATE_FIELDS, rows), strict=True))
    # The rows with metadata (a plain dict decoded, made a `Metadata`), found in C.
    for row in compress(rows, map(is_not, map(_METADATA, rows), repeat(None))):
        account = books.accounts[row[0]]
        books.accounts[row[0]] = opened_account(account.id, account.currency, account.overdraft_limit,
                                                account.code, Metadata(row[4]))
    for fields in pendings:
        pending = Pending(*fields)
        books.pending[pending.id] = pending
        books.held[pending.source] = books.held.get(pending.source, 0) + pending.amount
        books.incoming[pending.destination] = books.incoming.get(pending.destination, 0) + pending.amount


def _walk_back(journal: Journal, lsn: int, record: list[Any]) -> tuple[list[list[Any]], list[int],
                                                                    tuple[tuple[int, int], ...]]:
    """Every account's row as of the CHECKPOINT4 `record` at `lsn`: its own, or the newest
    one of the checkpoints before it (each names the one before, `previous_lsn`), in
    creation order (opening LSN); the LSNs of the checkpoints read, and their rows and sweep
    lengths (`Projection.chain_read`).

    The chain is read newest first until its sweeps have passed over every account (each
    checkpoint's sweep goes on, in creation order, from where the one before it stopped),
    then its rows are laid into one dict oldest first, a newer row of an account replacing
    the older: one dict write a row, the loop in C. Should accounts still have no row (the
    sweeps are a guide, not a proof), the walk goes on back, adding only theirs. A row that
    is no row stops it; the checkpoint holding it is then looked for, to say where it is."""
    total = record[4]
    if record[3] == 0:  # it holds every account (as closing writes one), in creation order: nothing to merge
        whole = _in_creation_order(record[6], total)
        if whole is not None:
            return whole, [lsn], ((total, total),)
    chain = [(lsn, record[6])]
    sweeps: list[int] = []
    swept = 0
    at = lsn
    while record[3] != 0 and swept < total and len(chain[0][1]) < total:
        older = _checkpoint_before(journal, lsn, at, record[3])
        sweeps.append(_sweep_length(record, older))
        swept += sweeps[-1]
        at, record = record[3], older
        chain.append((at, record[6]))
    found: dict[str, list[Any]] = {}
    try:
        for _, rows in reversed(chain):  # oldest first (of two rows of one account in one, the last is kept)
            found.update(zip(map(_FIRST, rows), rows, strict=True))
        while len(found) < total and record[3] != 0:
            older = _checkpoint_before(journal, lsn, at, record[3])
            sweeps.append(_sweep_length(record, older))
            at, record = record[3], older
            chain.append((at, record[6]))
            rows = record[6][::-1]  # from its end: of two rows of one account, the last is kept, as above
            ids = list(map(_FIRST, rows))  # the rows of accounts not found yet, added: the loops run in C
            found.update(compress(zip(ids, rows, strict=True), map(not_, map(found.__contains__, ids))))
        if len(found) != total:
            raise _corrupt(lsn, f"the checkpoint and those before it hold {len(found)} accounts, not {total}")
        if not set(map(type, found)) <= {str}:  # an id that is no id (one pass in C)
            raise TypeError("an account id that is not a str")
        sweeps.append(total if record[3] == 0 else 0)  # the oldest read: every account, or not known
        return (sorted(found.values(), key=itemgetter(5)), [at for at, _ in chain],  # creation order
                tuple(zip(map(len, (rows for _, rows in chain)), sweeps, strict=True)))
    except (TypeError, KeyError, IndexError) as error:  # a row that is no row
        _find_bad_rows(journal, [at for at, _ in chain])
        raise _corrupt(lsn, f"the checkpoint, or one before it, holds rows that do not load: {error!r}") from error


def _in_creation_order(rows: list[Any], total: int) -> list[list[Any]] | None:
    """The rows of a checkpoint holding every account, if they are `total` rows of as many
    ids, in the order of their opening LSNs, as `Sequencer.checkpoint` writes them (checked
    a column at a time, in C); else None, and `_walk_back` merges and sorts them (and says
    what is wrong with them)."""
    try:
        ids, opened = list(map(_FIRST, rows)), list(map(_OPENED_LSN, rows))
    except (TypeError, KeyError, IndexError):  # a row that is no row
        return None
    if len(ids) != total or not set(map(type, ids)) <= {str} or len(set(ids)) != total:
        return None
    if not set(map(type, opened)) <= {int} or not all(map(le, opened, islice(opened, 1, None))):
        return None
    return rows


def _find_bad_rows(journal: Journal, chain: list[int]) -> None:
    """Raise `JournalCorrupted` at the first checkpoint of `chain` (LSNs) whose rows or pending
    transfers do not load on their own, if one does not (after loading them together failed:
    each is read again, to say where)."""
    for at in chain:
        record = decode(at, journal.read(at) or b"")
        rows, pendings = (record[3], record[4]) if record[0] == CHECKPOINT3 else (record[6], record[7])
        _check_rows(at, rows)
        try:
            _load_rows(Recovered(), sorted(rows, key=itemgetter(5)), pendings)
        except (TypeError, ValueError, KeyError, IndexError) as error:
            raise _corrupt(at, f"the checkpoint's accounts or pending transfers do not load: {error!r}") from error


def _checkpoint_before(journal: Journal, lsn: int, at: int, previous: Any) -> list[Any]:
    """The CHECKPOINT4 that the one at `at` (on the walk back from the one at `lsn`) names as
    the one before it, at `previous`."""
    if type(previous) is not int or not 0 < previous < at:
        raise _corrupt(at, f"the checkpoint names LSN {previous!r} as the one before it")
    try:
        payload = journal.read(previous)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn) from error
    if payload is None:
        raise _corrupt(lsn, f"the checkpoint before it, at LSN {previous}, is not there")
    record = decode(previous, payload)
    if record[0] != CHECKPOINT4:
        raise _corrupt(previous, "a checkpoint names it as the one before, but it is not a CHECKPOINT4")
    _check_checkpoint(previous, record)
    return record


def _check_checkpoint(lsn: int, record: list[Any]) -> None:
    """What opening takes from the CHECKPOINT4 `record` at `lsn` must have a checkpoint's
    shape (its sum says the bytes are as written; this, that what was written is one). Its
    rows are checked as they are taken (`_walk_back`)."""
    _, _, _, previous, total, sweep_next, rows, _ = record
    if type(total) is not int or total < 0 or type(previous) is not int or previous < 0:
        raise _corrupt(lsn, f"the checkpoint's account count {total!r} or previous LSN {previous!r} is not one")
    if type(sweep_next) is not int or not 0 <= sweep_next < max(total, 1):
        raise _corrupt(lsn, f"the checkpoint's sweep position {sweep_next!r} is not one of its {total} accounts")
    if type(rows) is not list:
        raise _corrupt(lsn, "the checkpoint's rows are not a list")


def _check_rows(lsn: int, rows: Any) -> None:
    """Raise `JournalCorrupted` at `lsn` unless `rows` are accounts' rows (`_rows_shaped`)."""
    if not _rows_shaped(rows):
        raise _corrupt(lsn, "the checkpoint's rows are not accounts' rows")


def _rows_shaped(rows: Any) -> bool:
    """Whether `rows` is a list of lists of `ROW_FIELDS`, each led by an id (checked in C, a
    column at a time: a million rows in about 0.15 s, so only where a row failed to load, or
    for a CHECKPOINT3)."""
    return type(rows) is list and set(map(type, rows)) <= {list} and set(map(len, rows)) <= {ROW_FIELDS} and (
        set(map(type, map(_FIRST, rows))) <= {str})


def _sweep_length(record: list[Any], older: list[Any]) -> int:
    """How many accounts the sweep of CHECKPOINT4 `record` passed over: from where the sweep of
    `older`, the one before it, stopped to where its own did (0 if the two do not say)."""
    total, sweep_next, sweep_from = record[4], record[5], older[5]
    if type(total) is not int or type(sweep_next) is not int or type(sweep_from) is not int or total <= 0:
        return 0
    return (sweep_next - sweep_from) % total


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
        raise _corrupt(books.checkpoint_lsn, f"the accounts index holds {held} accounts, but this checkpoint, the "
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
                           else Account(record[1], record[2], record[3], record[4], _metadata(record[5])))
                if account.id in accounts:
                    raise _corrupt(lsn, f"account {account.id!r} is opened twice")
                accounts[account.id] = account
                books.account_lsns[account.id] = lsn
                states[account.id] = NO_ENTRIES
                books.index_entries += 1
            elif kind == CHECKPOINT or kind == CHECKPOINT3 or kind == CHECKPOINT4:
                books.index_entries += 1
                if not _checkpoint_agrees(record, books):
                    raise _corrupt(lsn, "the checkpoint disagrees with the records before it")
                books.checkpoints += 1
                books.checkpoint_met = lsn
                changed = books.changed = set()
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
                    raise _corrupt(lsn, f"the refusal names request {index} of {len(requests)}")
                books.rejects += 1
                books.index_entries += len(requests)
            elif kind == EXPIRY3:
                _, timestamp, ids = record
                _stamped_at(books, lsn, timestamp, 1)
                reason = due(books.pending, ids, timestamp)
                if reason is not None or len(set(ids)) != len(ids) or not ids:
                    raise _corrupt(lsn, f"the expiry of {ids!r}: {reason or 'ids repeated or none'}: the rules do "
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
    total = sum(posted for _, posted, _ in states.values())
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
        raise _corrupt(lsn, f"its timestamp {timestamp!r} does not follow timestamp {books.last_timestamp}")
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
    return _corrupt(lsn, f"transfer {tid!r}: {_REFUSED.get(refusal.code, f'the rules refuse it: {refusal.code}')}")


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
        raise _corrupt(lsn, f"a leg does not read as a request: {error}") from error
    for request in requests:
        if request.id in books.pending:
            raise _corrupt(lsn, f"transfer {request.id!r} reuses the id of an open pending transfer")
        if type(request) is TransferRequest and (type(request.amount) is not int
                                                 or not 0 < request.amount <= AMOUNT_MAX):
            raise _corrupt(lsn, f"transfer {request.id!r} has amount {request.amount!r}")
        missing = [name for name in (getattr(request, "source", None), getattr(request, "destination", None))
                   if name is not None and name not in books.states]
        if missing:
            raise _corrupt(lsn, f"transfer {request.id!r} names an account that was never opened")
    try:
        decided = decide(requests, books, timestamp, bound_holds=False)  # (a ledger older than the bound)
    except (TypeError, KeyError) as error:  # a field of a type live operation never writes
        raise _corrupt(lsn, f"a leg does not read as a request: {error!r}") from error
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
            raise _corrupt(lsn, f"transfer {tid!r}: the record says {amount!r} from {source!r} to {destination!r}; "
                                f"the rules decide {made_amount} from {made_source!r} to {made_destination!r}")
        journaled = tuple(leg[11:15])
        if stamp is None:
            if journaled != (0, 0, 0, 0):
                raise _corrupt(lsn, f"transfer {tid!r} moves no money, yet its record stamps entries {journaled!r}")
            continue
        try:  # `post` checks each entry is the next and adds up: so the record stamps what `decide` does
            written[source] = post(states[source], leg[11], -amount, leg[12], lsn)
            written[destination] = post(states[destination], leg[13], amount, leg[14], lsn)
        except SequenceError as error:
            raise _corrupt(lsn, f"transfer {tid!r}: {error}") from error
        except TypeError as error:
            raise _corrupt(lsn, f"transfer {tid!r} stamps entries {journaled!r}") from error
        assert journaled == stamp, (journaled, stamp)


def _apply_commit(books: Recovered, lsn: int, record: list[Any]) -> None:
    """A format-1 or -2 COMMIT record: `_apply_transfer`'s checks for its one transfer."""
    _, tid, source, destination, amount, source_seq, source_balance, target_seq, target_balance = record
    if source not in books.states or destination not in books.states:
        raise _corrupt(lsn, f"transfer {tid!r} names an account that was never opened")
    if type(amount) is not int or not 0 < amount <= AMOUNT_MAX:
        raise _corrupt(lsn, f"transfer {tid!r} has amount {amount!r}")
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


def write_checkpoint(journal: Journal, books: Recovered, timeout_s: float) -> int:
    """Journal a checkpoint of `books` (a projection an audit of `journal` rebuilt, to its
    last record) and wait until it is durable; its LSN. For a journal no ledger has open."""
    with journal.snapshot() as txn:
        unindexed = unindexed_by_key(journal, txn)
        unindexed_holds = unindexed_holds_by_key(journal, txn)
    sequencer = Sequencer(journal, books, unindexed=unindexed, unindexed_holds=unindexed_holds)
    with sequencer.lock:
        lsn = sequencer.checkpoint()
    journal.wait_durable(lsn, timeout_s)
    return lsn


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
