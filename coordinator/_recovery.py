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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from journal import Journal, JournalCorruptedError

from coordinator._entries import Flat, add_commit, unindexed_flat
from coordinator._errors import BalanceOverflow, CurrencyMismatch, InsufficientFunds, JournalCorrupted
from coordinator._limits import AMOUNT_MAX
from coordinator._rules import decide
from coordinator._sequencer import Sequencer
from coordinator._records import (
    ACCOUNT,
    ACCOUNTS_INDEX,
    CHECKPOINT,
    CHECKPOINTS_INDEX,
    COMMIT,
    TRANSFERS_INDEX,
    decode,
    value_lsn,
)
from coordinator._state import NO_ENTRIES, AccountState, SequenceError, post
from coordinator._values import Account


@dataclass
class Recovered:
    accounts: dict[str, Account] = field(default_factory=dict)
    account_lsns: dict[str, int] = field(default_factory=dict)
    states: dict[str, AccountState] = field(default_factory=dict)
    records: int = 0
    """Records replayed (after the checkpoint started from, if any)."""
    commits: int = 0
    rejects: int = 0
    checkpoints: int = 0
    last_lsn: int = 0
    checkpoint_lsn: int = 0
    """LSN of the checkpoint replay started from (0: from the beginning)."""
    unindexed: Flat | None = None
    """If not None, replay collects here the entries of the commits after the last
    checkpoint it meets (the ones the entry index does not hold)."""
    prefixes: dict[str, bytes] = field(default_factory=dict)
    """Entry key prefix per account, for `unindexed`."""


def _corrupt(lsn: int, reason: str) -> JournalCorrupted:
    return JournalCorrupted(f"journal corrupted at LSN {lsn}: {reason}", lsn)


def _checkpoint_agrees(rows: list[list[Any]], books: Recovered) -> bool:
    """Pair check: a checkpoint met on the way must equal the projection rebuilt so far."""
    if len(rows) != len(books.accounts):
        return False
    accounts, lsns, states = books.accounts, books.account_lsns, books.states
    for account_id, currency, limit, opened_lsn, seq, posted, last_lsn in rows:
        account = accounts.get(account_id)
        if (account is None or account.currency != currency or account.overdraft_limit != limit
                or lsns[account_id] != opened_lsn or states[account_id] != (seq, posted, last_lsn)):
            return False
    return True


def load_checkpoint(journal: Journal) -> Recovered:
    """The projection at the newest checkpoint (empty if there is none), verified."""
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
    if record[0] != CHECKPOINT:
        raise _corrupt(lsn, "the checkpoint index names a record that is not a checkpoint")
    for account_id, currency, limit, opened_lsn, seq, posted, last_lsn in record[1]:
        books.accounts[account_id] = Account(account_id, currency, limit)
        books.account_lsns[account_id] = opened_lsn
        books.states[account_id] = (seq, posted, last_lsn)
    books.last_lsn = books.checkpoint_lsn = lsn
    return books


def recover(journal: Journal) -> Recovered:
    """What opening a ledger runs: the newest checkpoint, then the tail (whose entries
    are not indexed yet: `unindexed` collects them). First, the indexes that name records
    must hold one entry per record (`check_index_counts`)."""
    check_index_counts(journal)
    books = load_checkpoint(journal)
    books.unindexed = {}
    return replay(journal, books)


def check_index_counts(journal: Journal) -> None:
    """Every record is an account, a transfer's outcome or a checkpoint, and has exactly one
    entry in the index of its kind: so the three indexes hold as many entries as there are
    records. (The journal checked each count against the pages it read as it opened.) A
    missing entry would make its id look unused, and a retry of it would run again."""
    with journal.snapshot() as txn:
        records = journal.records_count(txn)
        counts = {name: journal.index_count(name, txn) for name in (ACCOUNTS_INDEX, TRANSFERS_INDEX, CHECKPOINTS_INDEX)}
    if sum(counts.values()) != records:
        shown = ", ".join(f"{count} in the {name} index" for name, count in counts.items())
        raise JournalCorrupted(f"journal corrupted: the indexes hold {sum(counts.values())} entries ({shown}) for "
                               f"{records} records, one each", where="the indexes")


def replay(
    journal: Journal, into: Recovered | None = None, progress: Callable[[int], None] | None = None
) -> Recovered:
    """Apply every durable record after `into.last_lsn` to `into` (a fresh one by default)."""
    books = into if into is not None else Recovered()
    accounts, states = books.accounts, books.states
    try:
        for lsn, payload in journal.scan(books.last_lsn):
            record = decode(lsn, payload)
            kind = record[0]
            if kind == COMMIT:
                _apply_commit(books, lsn, record)
                if books.unindexed is not None:
                    add_commit(books.unindexed, books.prefixes, lsn, record)
            elif kind == ACCOUNT:
                _, account_id, currency, limit = record
                if account_id in accounts:
                    raise _corrupt(lsn, f"account {account_id!r} is opened twice")
                accounts[account_id] = Account(account_id, currency, limit)
                books.account_lsns[account_id] = lsn
                states[account_id] = NO_ENTRIES
            elif kind == CHECKPOINT:
                if not _checkpoint_agrees(record[1], books):
                    raise _corrupt(lsn, "the checkpoint disagrees with the records before it")
                books.checkpoints += 1
                if books.unindexed is not None:
                    books.unindexed = {}  # the checkpoint indexed them
            else:
                books.rejects += 1
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


_REFUSED = {
    InsufficientFunds.code: "it takes its source below its overdraft limit: the rules refuse it",
    CurrencyMismatch.code: "its accounts hold different currencies: the rules refuse it",
    BalanceOverflow.code: "a balance would leave the range of ±(2**63 - 1): the rules refuse it",
}
"""What replay says of a commit the rules refuse (the audit files it under the check it breaks)."""


def _apply_commit(books: Recovered, lsn: int, record: list[Any]) -> None:
    """Re-decide a journaled commit from the state before it (`rules.decide`, nothing
    reserved: reservations are never journaled) and apply its entries with the pure `post`,
    which checks they are the ones the decision stamps. A record live operation could not
    have written (one the rules refuse, another stamp) is damage."""
    states, accounts = books.states, books.accounts
    _, tid, source, destination, amount, source_seq, source_balance, target_seq, target_balance = record
    if source not in states or destination not in states:
        raise _corrupt(lsn, f"transfer {tid!r} names an account that was never opened")
    if type(amount) is not int or not 0 < amount <= AMOUNT_MAX:
        raise _corrupt(lsn, f"transfer {tid!r} has amount {amount!r}")
    decided = decide(amount, accounts[source], accounts[destination], states[source], states[destination], 0)
    if isinstance(decided, str):
        raise _corrupt(lsn, f"transfer {tid!r}: {_REFUSED.get(decided, f'the rules refuse it: {decided}')}")
    try:  # `post` checks each entry is the next and adds up: so the record stamps what `decide` does
        states[source] = post(states[source], source_seq, -amount, source_balance, lsn)
        states[destination] = post(states[destination], target_seq, amount, target_balance, lsn)
    except SequenceError as error:
        raise _corrupt(lsn, f"transfer {tid!r}: {error}") from error
    assert decided == (source_seq, source_balance, target_seq, target_balance), (decided, record)
    books.commits += 1


def write_checkpoint(journal: Journal, books: Recovered, timeout_s: float) -> int:
    """Journal a checkpoint of `books` (a projection an audit of `journal` rebuilt, to its
    last record) and wait until it is durable; its LSN. For a journal no ledger has open."""
    with journal.snapshot() as txn:
        unindexed = unindexed_flat(journal, txn)
    sequencer = Sequencer(journal, books.accounts, books.states, unindexed=unindexed)
    sequencer.account_lsns.update(books.account_lsns)
    with sequencer.lock:
        lsn = sequencer.checkpoint()
    journal.wait_durable(lsn, timeout_s)
    return lsn
