"""The pure core: account state and the functions that change it.

Live operation (the account actors, the sequencer) and recovery call the same
functions, so live and replayed state cannot drift (house style 3).
"""

from __future__ import annotations

from typing import NamedTuple

from coordinator._errors import BalanceOverflow, InsufficientFunds
from coordinator._limits import AMOUNT_MAX


class AccountState(NamedTuple):
    """What an account's entries add up to. Immutable: `post` returns a new one."""

    seq: int = 0
    """Seq of the last entry (0: none yet)."""
    posted: int = 0
    """Posted balance after the last entry."""
    lsn: int = 0
    """LSN of the last entry's commit record."""


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
    if seq != state.seq + 1:
        raise SequenceError(f"entry seq {seq} does not follow seq {state.seq}")
    if balance != state.posted + amount:
        raise SequenceError(f"entry balance {balance} != {state.posted} + {amount}")
    if not -AMOUNT_MAX <= balance <= AMOUNT_MAX:
        raise SequenceError(f"entry balance {balance} is out of range")
    if lsn <= state.lsn:
        raise SequenceError(f"entry LSN {lsn} does not follow LSN {state.lsn}")
    return _new_state(AccountState, (seq, balance, lsn))


_new_state = tuple.__new__
"""`AccountState(...)` without the Python frame of a NamedTuple's `__new__`: half the cost,
twice per transfer."""


def debit_refusal(posted: int, pending: int, amount: int, overdraft_limit: int | None) -> str | None:
    """Why a debit of `amount` must be refused, as a rejection code, or None to allow it."""
    available = posted - pending
    if overdraft_limit is None:
        return BalanceOverflow.code if available - amount < -AMOUNT_MAX else None
    return InsufficientFunds.code if available - amount < -overdraft_limit else None


def credit_refusal(posted: int, amount: int) -> str | None:
    """Why a credit of `amount` must be refused, or None to allow it."""
    return BalanceOverflow.code if posted + amount > AMOUNT_MAX else None
