"""The rules: whether a transfer may happen, and the entries it makes, decided in one pure function.

`decide` takes a transfer's amount and its two accounts as a decision sees them (what each
account is, what its entries add up to, and the funds already reserved on the source), and
returns the stamp of both entries or the refusal's code. Every path calls it:

- the source account's turn, in the mailbox path: it decides the debit from its own state and
  the funds it has reserved for other transfers, and reserves the amount if it may;
- the sequencer, when it stamps the entries under its lock from its projection (the source's
  reservation is in place: its other reservations, which it cannot see, do not count; the
  source's projected balance is never below what the account saw, so only the destination's
  credit can be refused here, when it grew meanwhile);
- a batch holding the turns of all its accounts, deciding each request in list order;
- replay, which re-decides every journaled commit from the state before it and checks the
  result is what was stamped: a record live operation could not have written is damage.

Nothing here reads a clock, a lock or a file: the same inputs give the same decision.
"""

from __future__ import annotations

from coordinator._errors import AccountNotFound, BalanceOverflow, CurrencyMismatch, InsufficientFunds
from coordinator._limits import AMOUNT_MAX
from coordinator._state import AccountState
from coordinator._values import Account

Stamp = tuple[int, int, int, int]
"""Both entries of a transfer: (source seq, source balance after, destination seq, destination balance after)."""


def refusal_of_accounts(source: Account | None, destination: Account | None) -> str | None:
    """What the accounts alone refuse (neither's state matters): one missing, or their
    currencies differ. Deciding may start here, before anyone's turn."""
    if source is None or destination is None:
        return AccountNotFound.code
    if source.currency != destination.currency:
        return CurrencyMismatch.code
    return None


def decide(amount: int, source: Account | None, destination: Account | None,
           origin: AccountState, target: AccountState, reserved: int) -> Stamp | str:
    """The stamp of a transfer of `amount` from `source` to `destination`, whose entries so far
    add up to `origin` and `target`, with `reserved` of the source's funds reserved for other
    transfers; or the code of its refusal (the checks in this order: accounts, debit, credit)."""
    if source is None or destination is None or source.currency != destination.currency:
        code = refusal_of_accounts(source, destination)
        assert code is not None
        return code
    origin_seq, origin_posted, _ = origin
    target_seq, target_posted, _ = target
    after = origin_posted - reserved - amount
    limit = source.overdraft_limit
    if limit is None:
        if after < -AMOUNT_MAX:
            return BalanceOverflow.code
    elif after < -limit:
        return InsufficientFunds.code
    if target_posted + amount > AMOUNT_MAX:
        return BalanceOverflow.code
    return origin_seq + 1, origin_posted - amount, target_seq + 1, target_posted + amount
