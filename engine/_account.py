"""The account actor: owns one account's state and decides its debits, one at a time.

State: the account's `AccountState` (seq, posted, LSN of the last entry) and
`pending`, the sum of funds held for its outgoing transfers in flight. Every
change goes through the pure functions of the coordinator (`post`,
`debit_refusal`); this class only receives, calls them, and replies.

Messages (all frozen values or protocol steps, handled on the actor's turn):
- `DebitStep`: decide a debit. Refuse, or hold the funds and let the
  coordinator commit (it stamps the entries under the sequencer lock).
- `Posting`: post a stamped entry; a debit's entry also releases its hold.
- `_Snapshot`: reply (posted, pending, last LSN).
"""

from __future__ import annotations

from typing import Any

from coordinator import Account, AccountState, DebitStep, Posting, debit_refusal, post

from journal import CRASH_POINT_ARMED, crash_point

from engine._runtime import PooledActor


class _Snapshot:
    """Ask for (posted, pending, last LSN)."""


SNAPSHOT = _Snapshot()


class AccountActor(PooledActor):
    def __init__(self, account: Account, state: AccountState) -> None:
        super().__init__()
        self.account = account
        """Its id, currency and overdraft limit (`coordinator.HeldAccount.account`)."""
        self.state = state
        """What its entries add up to, as applied so far (`coordinator.HeldAccount.state`)."""
        self._pending = 0

    def on_receive(self, message: Any) -> Any:
        kind = type(message)
        if kind is Posting:
            self._post(message)
        elif kind is DebitStep:
            self._decide(message)
        elif kind is _Snapshot:
            _, posted, last_lsn = self.state
            return (posted, self._pending, last_lsn)
        else:
            raise TypeError(f"account {self.account.id!r} got an unknown message {message!r}")
        return None

    def _decide(self, step: DebitStep) -> None:
        amount = step.request.amount
        code = self.reserve(amount)
        if code is not None:
            step.reject(code)
            return
        if not step.commit():
            self.unreserve(amount)

    # The methods below are the account's handlers (`coordinator.HeldAccount`). Only the
    # holder of the account's turn calls them: its mailbox loop (above), or a batch
    # holding the turn.

    def reserve(self, amount: int) -> str | None:
        """Decide a debit: a rejection code, or None with the funds held (the reservation),
        to be released when its entry posts or by `unreserve` if it does not commit."""
        _, posted, _ = self.state
        code = debit_refusal(posted, self._pending, amount, self.account.overdraft_limit)
        if code is None:
            self._pending += amount
            if CRASH_POINT_ARMED:
                crash_point("after-reserve")
        return code

    def unreserve(self, amount: int) -> None:
        self._pending -= amount
        assert self._pending >= 0, self._pending

    def apply(self, seq: int, amount: int, balance: int, lsn: int) -> AccountState:
        """Post a stamped entry (a debit's entry also releases its hold); the new state."""
        self.state = state = post(self.state, seq, amount, balance, lsn)
        if amount < 0:
            self._pending += amount
            assert self._pending >= 0, self._pending
        return state

    def catch_up(self) -> None:
        """Holder of the turn only: apply the entries queued in the mailbox, now."""
        self.actor_inbox.drain_only(Posting)  # type: ignore[attr-defined]

    def _post(self, posting: Posting) -> None:
        assert posting.account == self.account.id, (posting.account, self.account.id)
        self.apply(posting.seq, posting.amount, posting.balance, posting.lsn)
