"""The account actor: owns one account's state and decides its debits, one at a time.

State: the account's `AccountState` (seq, posted, LSN of the last entry) and
`reserved`, the funds reserved for its outgoing transfers in flight (the protocol's
reservations). Every decision and change goes through the pure functions of the
coordinator (`decide`, through its `DebitStep`, and `post`); this class only receives,
calls them, and replies.

Messages (all frozen values or protocol steps, handled on the actor's turn):
- `DebitStep`: decide a transfer from this source. Refuse, or reserve the funds and
  let the coordinator commit (it decides again and stamps the entries under the
  sequencer lock).
- `Posting`: post a stamped entry; a debit's entry also releases its reservation.
- `_Snapshot`: reply (posted, reserved, last LSN).
"""

from __future__ import annotations

from typing import Any

from coordinator import Account, AccountState, DebitStep, Posting, post

from journal import CRASH_POINT_ARMED, crash_point

from engine._runtime import PooledActor


class _Snapshot:
    """Ask for (posted, pending, last LSN)."""


SNAPSHOT = _Snapshot()


class AccountActor(PooledActor):
    def __init__(self, account: Account, state: AccountState) -> None:
        super().__init__()
        self.account = account
        """Its id, currency and overdraft limit (`coordinator.TurnAccount.account`)."""
        self.state = state
        """What its entries add up to, as applied so far (`coordinator.TurnAccount.state`)."""
        self.reserved = 0
        """Funds reserved for transfers in flight (`coordinator.TurnAccount.reserved`)."""

    def on_receive(self, message: Any) -> Any:
        kind = type(message)
        if kind is Posting:
            self._post(message)
        elif kind is DebitStep:
            self._decide(message)
        elif kind is _Snapshot:
            _, posted, last_lsn = self.state
            return (posted, self.reserved, last_lsn)
        else:
            raise TypeError(f"account {self.account.id!r} got an unknown message {message!r}")
        return None

    def _decide(self, step: DebitStep) -> None:
        decided = step.decide(self.state, self.reserved)
        if isinstance(decided, str):
            step.reject(decided)
            return
        amount = step.request.amount
        self.reserved += amount  # the reservation, released when the debit's entry posts
        if CRASH_POINT_ARMED:
            crash_point("after-reserve")
        if not step.commit():
            self.reserved -= amount

    # The methods below are the account's handlers (`coordinator.TurnAccount`). Only the
    # holder of the account's turn calls them: its mailbox loop (above), or a batch
    # holding the turn.

    def apply(self, seq: int, amount: int, balance: int, lsn: int) -> AccountState:
        """Post a stamped entry; the new state."""
        self.state = state = post(self.state, seq, amount, balance, lsn)
        return state

    def catch_up(self) -> None:
        """Holder of the turn only: apply the entries queued in the mailbox, now."""
        self.actor_inbox.drain_only(Posting)  # type: ignore[attr-defined]

    def _post(self, posting: Posting) -> None:
        """An entry the sequencer stamped for a transfer decided in the mailbox path: a debit's
        releases the reservation its decision made."""
        assert posting.account == self.account.id, (posting.account, self.account.id)
        amount = posting.amount
        self.apply(posting.seq, amount, posting.balance, posting.lsn)
        if amount < 0:
            self.reserved += amount
            assert self.reserved >= 0, self.reserved
