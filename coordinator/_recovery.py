"""Recovery: rebuild every account from the journal with the same pure `post`.

Every record is verified (checksum, LSN continuity: the journal's scan) and
every commit's stamped entries are re-derived and must agree (seq next in line,
balance the running sum, LSN increasing). After the last record, money must be
conserved and no balance may sit below its overdraft limit. Any failure raises
`JournalCorrupted` naming the LSN; nothing is repaired.

Holds (reservations) are never journaled: they live only in account mailboxes,
and a commit record is written atomically with both of its entries. So after a
crash there is no half-applied transfer on disk to finish or undo: a transfer
that was reserved but not decided left no record, was never acknowledged, and
holds nothing once the ledger is open again; a retry with its id runs afresh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from journal import Journal, JournalCorruptedError

from coordinator._errors import JournalCorrupted
from coordinator._limits import AMOUNT_MAX
from coordinator._records import ACCOUNT, COMMIT, decode
from coordinator._state import AccountState, SequenceError, post
from coordinator._values import Account


@dataclass
class Recovered:
    accounts: dict[str, Account] = field(default_factory=dict)
    account_lsns: dict[str, int] = field(default_factory=dict)
    states: dict[str, AccountState] = field(default_factory=dict)
    records: int = 0
    commits: int = 0
    rejects: int = 0
    last_lsn: int = 0


def _corrupt(lsn: int, reason: str) -> JournalCorrupted:
    return JournalCorrupted(f"journal corrupted at LSN {lsn}: {reason}", lsn)


def replay(journal: Journal, into: Recovered | None = None) -> Recovered:
    """Apply every durable record after `into.last_lsn` to `into` (a fresh one by default)."""
    books = into if into is not None else Recovered()
    accounts, states = books.accounts, books.states
    try:
        for lsn, payload in journal.scan(books.last_lsn):
            record = decode(lsn, payload)
            kind = record[0]
            if kind == COMMIT:
                _, tid, source, destination, amount, source_seq, source_balance, target_seq, target_balance = record
                if source not in states or destination not in states:
                    raise _corrupt(lsn, f"transfer {tid!r} names an account that was never opened")
                if type(amount) is not int or not 0 < amount <= AMOUNT_MAX:
                    raise _corrupt(lsn, f"transfer {tid!r} has amount {amount!r}")
                try:
                    states[source] = post(states[source], source_seq, -amount, source_balance, lsn)
                    states[destination] = post(states[destination], target_seq, amount, target_balance, lsn)
                except SequenceError as error:
                    raise _corrupt(lsn, f"transfer {tid!r}: {error}") from error
                limit = accounts[source].overdraft_limit
                if limit is not None and source_balance < -limit:
                    raise _corrupt(lsn, f"transfer {tid!r} takes {source!r} below its overdraft limit")
                books.commits += 1
            elif kind == ACCOUNT:
                _, account_id, currency, limit = record
                if account_id in accounts:
                    raise _corrupt(lsn, f"account {account_id!r} is opened twice")
                accounts[account_id] = Account(account_id, currency, limit)
                books.account_lsns[account_id] = lsn
                states[account_id] = AccountState()
            else:
                books.rejects += 1
            books.records += 1
            books.last_lsn = lsn
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn) from error
    total = sum(state.posted for state in states.values())
    if total != 0:
        raise JournalCorrupted(
            f"journal corrupted: posted balances sum to {total}, not 0, after LSN {books.last_lsn}",
            books.last_lsn,
        )
    return books
