"""Checkpoints: reading the projection back from the newest one, and writing one.

A checkpoint record holds the accounts' rows (and the open pending transfers) as of its
LSN, so opening replays only the records after it (`coordinator._recovery`). A CHECKPOINT4
holds the rows of the accounts that changed since the one before it, which it names, plus
a sweep of as many others; opening walks that chain back until every account has a row
(`_walk_back`). A CHECKPOINT5 holds the open pending transfers likewise, and names those
closed since the one before; the walk for them is `coordinator._checkpoint_chain`'s.
Whatever is read is checked before it is used: a row that is no row, a
chain that names no checkpoint, a count that does not add up is `JournalCorrupted` naming
the checkpoint's LSN; nothing is repaired.

`Recovered`, the projection a checkpoint and replay rebuild, is defined here, since loading a
checkpoint is where every rebuild starts; `coordinator._recovery` replays the records after it.

The checkpoint written here (`write_checkpoint`) is one for a journal no ledger has open (`tally
recover`), through a `Sequencer`; an open ledger's are `Sequencer.checkpoint`'s, their rows made
by `coordinator._checkpoint_rows`.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from functools import partial
from itertools import compress, islice, repeat, starmap
from operator import attrgetter, is_not, itemgetter, le, not_
from typing import Any

from journal import Journal, JournalCorruptedError

from coordinator._checkpoint_chain import PENDING_LSN, check_checkpoint, checkpoint_before, corrupted, open_pending_at
from coordinator._entering import new_pending
from coordinator._entries import Unindexed, indexed_through, unindexed_by_key
from coordinator._errors import JournalCorrupted
from coordinator._history import metadata_of
from coordinator._holds import unindexed_holds_by_key
from coordinator._records import CHECKPOINT, CHECKPOINT3, CHECKPOINT4, CHECKPOINT5, CHECKPOINTS_INDEX, decode, value_lsn
from coordinator._sequencer import Sequencer
from coordinator._state import Pending, Projection
from coordinator._values import Account, Metadata, opened_account


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

_FIRST = itemgetter(0)
_ID = attrgetter("id")
_SOURCE, _DESTINATION, _AMOUNT = attrgetter("source"), attrgetter("destination"), attrgetter("amount")
_AS_PENDING = partial(new_pending, Pending)
_ACCOUNT_FIELDS = itemgetter(0, 1, 2, 3, 4)
ROW_FIELDS = 9
"""An account's row in a CHECKPOINT3, CHECKPOINT4 or CHECKPOINT5: id, currency, limit, code, metadata,
opening LSN, seq, posted, last LSN."""
_METADATA = itemgetter(4)
_OPENED_LSN = itemgetter(5)
_STATE_FIELDS = itemgetter(6, 7, 8)


def _account_row(row: list[Any]) -> tuple[Account, int, tuple[int, int, int]]:
    """(account, opening LSN, state) of a CHECKPOINT3 row."""
    account_id, currency, limit, code, metadata, opened_lsn, seq, posted, last_lsn = row
    return Account(account_id, currency, limit, code, metadata_of(metadata)), opened_lsn, (seq, posted, last_lsn)


def checkpoint_agrees(lsn: int, record: list[Any], books: Recovered) -> bool:
    """Pair check: the checkpoint `record`, met on the way at `lsn`, must equal the projection
    rebuilt so far (a record that is no checkpoint's shape does not)."""
    try:
        return _agrees(lsn, record, books)
    except (TypeError, ValueError, KeyError, IndexError):  # a row that is no row
        return False


def _agrees(lsn: int, record: list[Any], books: Recovered) -> bool:
    if record[0] == CHECKPOINT:
        rows = [(Account(row[0], row[1], row[2]), row[3], (row[4], row[5], row[6])) for row in record[1]]
        pendings: list[Any] = []
    elif record[0] == CHECKPOINT4 or record[0] == CHECKPOINT5:
        _, last_timestamp, index_entries, previous, total, sweep_next, raw, pendings = record[:8]
        if not _fields_shaped(lsn, record):
            return False
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
    if record[0] == CHECKPOINT5:
        return _pending_agrees(record, books)
    return [list(pending) for pending in books.pending.values()] == pendings


def _fields_shaped(lsn: int, record: list[Any]) -> bool:
    """Whether the CHECKPOINT4 or CHECKPOINT5 `record` at `lsn` has a checkpoint's shape
    (`check_checkpoint`)."""
    try:
        check_checkpoint(lsn, record)
    except JournalCorrupted:
        return False
    return True


def _pending_agrees(record: list[Any], books: Recovered) -> bool:
    """Pair check of a CHECKPOINT5's open pending transfers: each row it holds is of one open
    now, as it is; it holds every one (if it builds on no checkpoint), or builds on the last
    one met and holds every one opened since; it says how many are open, and names exactly
    those closed since (`check_checkpoint` checked the fields' types)."""
    pendings, base, closed, count = record[7], record[8], record[9], record[10]
    pending = books.pending
    if count != len(pending):
        return False
    held = {row[0]: row for row in pendings}
    if len(held) != len(pendings) or any(list(pending[pending_id]) != row for pending_id, row in held.items()):
        return False
    if base == 0:
        return len(held) == count
    return base == books.checkpoint_met and all(found.lsn <= base or found.id in held for found in pending.values()) \
        and set(map(type, closed)) <= {str} and sorted(closed) == sorted(map(_ID, books.closed_since))


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
            # (up to the record before the checkpoint, which has none: its rows are not decoded again)
            books.unindexed = unindexed_by_key(journal, txn, books.last_lsn - 1) if behind else {}
            books.unindexed_holds = unindexed_holds_by_key(journal, txn, books.last_lsn - 1) if behind else {}
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
        raise corrupted(lsn, "the checkpoint index names a record that is not there")
    record = decode(lsn, payload)
    if record[0] == CHECKPOINT:
        for account_id, currency, limit, opened_lsn, seq, posted, last_lsn in record[1]:
            books.accounts[account_id] = Account(account_id, currency, limit)
            books.account_lsns[account_id] = opened_lsn
            books.states[account_id] = (seq, posted, last_lsn)
        books.index_entries = lsn  # formats 1 and 2: one index entry per record
    elif record[0] == CHECKPOINT3 or record[0] == CHECKPOINT4 or record[0] == CHECKPOINT5:
        if record[0] == CHECKPOINT3:
            _, books.last_timestamp, books.index_entries, rows, pendings = record
            _check_rows(lsn, rows)
            chain = [lsn]
            books.chain_read = ((len(rows), len(rows)),)
        else:
            check_checkpoint(lsn, record)
            _, books.last_timestamp, books.index_entries, _, total, sweep_next, _, pendings = record[:8]
            rows, read, books.chain_read = _walk_back(journal, lsn, record)
            chain = [at for at, _ in read]
            books.checkpoint_chain = (lsn, total, sweep_next)
            if record[0] == CHECKPOINT5:
                pendings, walked = open_pending_at(journal, lsn, read)
                chain += [at for at in walked if at not in chain]
                books.pending_sweep = (bisect_left(list(map(PENDING_LSN, pendings)), record[11]), record[11])
        try:
            _load_rows(books, rows, pendings)
        except (TypeError, ValueError, KeyError, IndexError) as error:  # what a checkpoint never holds
            _find_bad_rows(journal, chain)
            raise corrupted(lsn, f"the checkpoint's accounts or pending transfers do not load: {error!r}") from error
        if record[0] != CHECKPOINT3 and len(books.accounts) != total:  # an id held twice
            raise corrupted(lsn, f"the checkpoint and those before it hold {len(books.accounts)} accounts, not {total}")
    else:
        raise corrupted(lsn, "the checkpoint index names a record that is not a checkpoint")
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
    # The pending transfers made in C (`coordinator._entering.new_pending`, `tuple.__new__`: so
    # each must have its fields, no more nor fewer), then what they hold summed.
    if not set(map(len, pendings)) <= {len(Pending._fields)}:
        raise ValueError("a pending transfer's row without its fields")
    made = list(map(_AS_PENDING, pendings))
    books.pending.update(zip(map(_ID, made), made, strict=True))
    held, incoming = books.held, books.incoming
    for source, destination, amount in zip(map(_SOURCE, made), map(_DESTINATION, made), map(_AMOUNT, made),
                                           strict=True):
        held[source] = held.get(source, 0) + amount
        incoming[destination] = incoming.get(destination, 0) + amount


def _walk_back(journal: Journal, lsn: int, record: list[Any]) -> tuple[list[list[Any]], list[tuple[int, list[Any]]],
                                                                    tuple[tuple[int, int], ...]]:
    """Every account's row as of the CHECKPOINT4 or CHECKPOINT5 `record` at `lsn`: its own,
    or the newest one of the checkpoints before it (each names the one before,
    `previous_lsn`), in creation order (opening LSN); the checkpoints read, newest first
    (LSN, record), and their rows and sweep lengths (`Projection.chain_read`).

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
            return whole, [(lsn, record)], ((total, total),)
    chain = [(lsn, record)]
    sweeps: list[int] = []
    swept = 0
    at = lsn
    while record[3] != 0 and swept < total and len(chain[0][1][6]) < total:
        older = checkpoint_before(journal, lsn, at, record[3])
        sweeps.append(_sweep_length(record, older))
        swept += sweeps[-1]
        at, record = record[3], older
        chain.append((at, record))
    found: dict[str, list[Any]] = {}
    try:
        for _, read in reversed(chain):  # oldest first (of two rows of one account in one, the last is kept)
            found.update(zip(map(_FIRST, read[6]), read[6], strict=True))
        while len(found) < total and record[3] != 0:
            older = checkpoint_before(journal, lsn, at, record[3])
            sweeps.append(_sweep_length(record, older))
            at, record = record[3], older
            chain.append((at, record))
            rows = record[6][::-1]  # from its end: of two rows of one account, the last is kept, as above
            ids = list(map(_FIRST, rows))  # the rows of accounts not found yet, added: the loops run in C
            found.update(compress(zip(ids, rows, strict=True), map(not_, map(found.__contains__, ids))))
        if len(found) != total:
            raise corrupted(lsn, f"the checkpoint and those before it hold {len(found)} accounts, not {total}")
        if not set(map(type, found)) <= {str}:  # an id that is no id (one pass in C)
            raise TypeError("an account id that is not a str")
        sweeps.append(total if record[3] == 0 else 0)  # the oldest read: every account, or not known
        return (sorted(found.values(), key=itemgetter(5)), chain,  # creation order
                tuple(zip(map(len, (read[6] for _, read in chain)), sweeps, strict=True)))
    except (TypeError, KeyError, IndexError) as error:  # a row that is no row
        _find_bad_rows(journal, [at for at, _ in chain])
        raise corrupted(lsn, f"the checkpoint, or one before it, holds rows that do not load: {error!r}") from error


def _in_creation_order(rows: list[Any], total: int) -> list[list[Any]] | None:
    """The rows of a checkpoint holding every account, if they are `total` rows of as many
    ids, in the order of their opening LSNs, as `Sequencer.checkpoint` writes them (checked
    a column at a time, in C); else None, and `_walk_back` merges and sorts them (and says
    what is wrong with them)."""
    try:
        ids, opened = list(map(_FIRST, rows)), list(map(_OPENED_LSN, rows))
    except (TypeError, KeyError, IndexError):  # a row that is no row
        return None
    if len(ids) != total or not set(map(type, ids)) <= {str}:
        return None  # (an id held twice is found loading them: `_load_checkpoint` counts the accounts)
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
            raise corrupted(at, f"the checkpoint's accounts or pending transfers do not load: {error!r}") from error


def _check_rows(lsn: int, rows: Any) -> None:
    """Raise `JournalCorrupted` at `lsn` unless `rows` are accounts' rows (`_rows_shaped`)."""
    if not _rows_shaped(rows):
        raise corrupted(lsn, "the checkpoint's rows are not accounts' rows")


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
