"""The pure core: account state and the functions that change it.

Live operation (the account actors, the sequencer) and recovery call the same
functions, so live and replayed state cannot drift (house style 3).
"""

from __future__ import annotations

from typing import NamedTuple

from coordinator._errors import BalanceOverflow, InsufficientFunds
from coordinator._limits import AMOUNT_MAX

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
    """An entry as the sequencer stamped it, on its way to the account's mailbox."""

    account: str
    seq: int
    amount: int
    balance: int
    lsn: int


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
    if lsn <= last_lsn:
        raise SequenceError(f"entry LSN {lsn} does not follow LSN {last_lsn}")
    return (seq, balance, lsn)


def debit_refusal(posted: int, pending: int, amount: int, overdraft_limit: int | None) -> str | None:
    """Why a debit of `amount` must be refused, as a rejection code, or None to allow it."""
    available = posted - pending
    if overdraft_limit is None:
        return BalanceOverflow.code if available - amount < -AMOUNT_MAX else None
    return InsufficientFunds.code if available - amount < -overdraft_limit else None


def credit_refusal(posted: int, amount: int) -> str | None:
    """Why a credit of `amount` must be refused, or None to allow it."""
    return BalanceOverflow.code if posted + amount > AMOUNT_MAX else None
