"""The pure core: account state and the functions that change it.

Live operation (the account actors, the sequencer) and recovery call the same
functions, so live and replayed state cannot drift (house style 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from coordinator._limits import AMOUNT_MAX
from coordinator._values import Account, TransferStatus

AccountState = tuple[int, int, int]
"""What an account's entries add up to: (seq of the last entry, 0 if none yet; the posted
balance after it; the LSN of its commit record). Immutable: `post` returns a new one.

A plain tuple of ints, not a NamedTuple: the garbage collector stops tracking such a
tuple at its first pass, while a NamedTuple stays tracked for life. Every transfer
makes two states that outlive the young generation, and each tracked one would be
promoted and walked by every full collection after (see `bench/README.md`)."""

NO_ENTRIES: AccountState = (0, 0, 0)
"""The state of an account without entries."""


class Posting(NamedTuple):
    """What a decision does to one account, on its way to the account's mailbox (or applied at
    once by whoever holds its turn): an entry (`seq` > 0: stamped with its balance) and/or a
    change of the funds pending transfers hold on it (`held`, outgoing) or bring it
    (`incoming`); and the reservation it ends (`released`: what its source reserved for it in
    the mailbox path; a chain's postings release theirs as they reach the account, and one may
    reserve again, negative: `coordinator._postings`)."""

    account: str
    seq: int
    """0: no entry."""
    amount: int
    balance: int
    lsn: int
    released: int
    held: int
    incoming: int


class Pending(NamedTuple):
    """An open pending transfer: the funds it holds on its source, until posted, voided or expired."""

    id: str
    source: str
    destination: str
    amount: int
    deadline: int
    """Nanoseconds since the epoch at which it expires; 0: never."""
    lsn: int
    """Journal position of its record."""
    code: int
    """Its code, which its post or void carries too."""


class SequenceError(AssertionError):
    """An entry that is not the next one of its account: a bug or a corrupt journal."""


def post(state: AccountState, seq: int, amount: int, balance: int, lsn: int) -> AccountState:
    """Apply one entry. Checks it is next in sequence and adds up before changing anything."""
    last_seq, posted, last_lsn = state
    if seq != last_seq + 1:
        raise SequenceError(f"entry seq {seq} does not follow seq {last_seq}")
    if balance != posted + amount:
        raise SequenceError(f"entry balance {balance} != {posted} + {amount}")
    if not -AMOUNT_MAX <= balance <= AMOUNT_MAX:
        raise SequenceError(f"entry balance {balance} is out of range")
    if lsn < last_lsn:  # equal: a linked chain's record moves an account more than once
        raise SequenceError(f"entry LSN {lsn} comes before LSN {last_lsn}")
    return (seq, balance, lsn)


@dataclass
class Projection:
    """The books as every record so far leaves them: the accounts, what their entries add up
    to, the open pending transfers and the funds they hold. It only grows by appending: the
    sequencer keeps it for live decisions, recovery rebuilds it, a checkpoint journals it."""

    accounts: dict[str, Account] = field(default_factory=dict)
    """Every account, in creation order."""
    account_lsns: dict[str, int] = field(default_factory=dict)
    states: dict[str, AccountState] = field(default_factory=dict)
    held: dict[str, int] = field(default_factory=dict)
    """Funds held on an account by its open pending transfers (none: absent)."""
    incoming: dict[str, int] = field(default_factory=dict)
    """Funds of the open pending transfers toward an account (none: absent)."""
    pending: dict[str, Pending] = field(default_factory=dict)
    """The open pending transfers, by id, in the order they were made."""
    opened_since: list[str] = field(default_factory=list)
    """The pending transfers opened since the newest checkpoint (the next CHECKPOINT5 holds
    those still open)."""
    closed_since: list[Pending] = field(default_factory=list)
    """The pending transfers closed since the newest checkpoint (the next CHECKPOINT5 names them)."""
    pending_sweep: tuple[int, int] = (0, 0)
    """Where the next checkpoint's sweep of the open pending transfers starts: (a position in
    `pending`'s order, the LSN of the one there); see `coordinator._checkpoint_rows.pending_rows`.
    (0, 0) after a checkpoint that holds every one (an LSN is never 0)."""
    last_timestamp: int = 0
    """The largest timestamp journaled (a leg's, an expiry's)."""
    index_entries: int = 0
    """Entries the records so far put in the accounts, transfers and checkpoints indexes."""
    checkpoint_chain: tuple[int, int, int] | None = None
    """The newest checkpoint's (LSN, accounts, sweep_next) when the next may hold only what
    changed since (see `coordinator._records`, CHECKPOINT4); None: the next holds every account."""
    chain_read: tuple[tuple[int, int], ...] = ()
    """(rows, sweep length) of each checkpoint the open read to rebuild the accounts, newest
    first: those it walked back over (CHECKPOINT4s; of the oldest, the sweep is that of every
    account if it holds every account, else unknown, 0), or the CHECKPOINT3 it read; none for
    none (or an older format's: the next checkpoint holds every account)."""

    def resolution(self, pending_id: str) -> TransferStatus | None:
        """Replay re-decides commits only, which never resolve a closed pending transfer."""
        return None
