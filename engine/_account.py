"""The account actor: owns one account's state and decides its debits, one at a time.

State: the account's `AccountState` (seq, posted, LSN of the last entry); `reserved`, the
funds reserved for its outgoing transfers in flight (the protocol's reservations); `held`
and `incoming`, the funds its open pending transfers hold on it and bring it. Every
decision and change goes through the pure functions of the coordinator (`decide`, through
its `DebitStep`, and `post`); this class only receives, calls them, and replies.

Messages (all frozen values or protocol steps, handled on the actor's turn):
- `DebitStep`: decide a ticket as its source. Refuse, or reserve its debits, then vote
  (the last source to vote commits or aborts; see `coordinator.DebitStep`).
- `Posting`: what a decision did to it: an entry, a change of holds, the reservation it ends.
- `_Snapshot`: reply (posted, pending, incoming, LSN of the last change).
"""

from __future__ import annotations

from typing import Any

from coordinator import Account, AccountState, DebitStep, Posting, Refusal, post

from journal import CRASH_POINT_ARMED, crash_point

from engine._runtime import PooledActor


class _Snapshot:
    """Ask for (posted, pending, incoming, LSN of the last change)."""


SNAPSHOT = _Snapshot()


class AccountBooks:
    """An account's handlers (`coordinator.TurnAccount`), on its `state`, `reserved`, `held`,
    `incoming` and `held_lsn`: the actor's, and a dormant turn's (`engine._directory`).
    Only the holder of the account's turn calls them. Its fields are slots: a dormant turn
    (slots only) has no `__dict__`, so one lent again keeps nothing of its last account
    (`engine._directory.Directory.take_turns` sets every slot anew)."""

    __slots__ = ("account", "state", "reserved", "held", "incoming", "held_lsn")

    account: Account
    """Its id, currency and overdraft limit (`coordinator.TurnAccount.account`)."""
    state: AccountState
    """What its entries add up to, as applied so far (`coordinator.TurnAccount.state`)."""
    reserved: int
    """Funds reserved for transfers in flight (`coordinator.TurnAccount.reserved`)."""
    held: int
    """Funds its open pending transfers hold (`coordinator.TurnAccount.held`)."""
    incoming: int
    """Funds of the open pending transfers toward it."""
    held_lsn: int
    """LSN of the last record that changed `held` or `incoming` (or a bound above it: one made
    from the projection starts at the journal's last LSN, since the record behind the holds
    it starts from may not be durable yet)."""

    def _open_books(self, account: Account, state: AccountState, held: int, incoming: int, held_lsn: int) -> None:
        """Start from the projection's values, with nothing reserved."""
        self.account, self.state, self.reserved = account, state, 0
        self.held, self.incoming, self.held_lsn = held, incoming, held_lsn

    def apply(self, seq: int, amount: int, balance: int, lsn: int) -> AccountState:
        """Post a stamped entry; the new state."""
        self.state = state = post(self.state, seq, amount, balance, lsn)
        return state

    def hold(self, held: int, incoming: int, lsn: int) -> None:
        """Change the funds held on it and coming to it by pending transfers."""
        self.held += held
        self.incoming += incoming
        assert self.held >= 0 and self.incoming >= 0, (self.held, self.incoming)
        if lsn > self.held_lsn:
            self.held_lsn = lsn

    def _post(self, posting: Posting) -> None:
        """What a decision did to this account: its entry, its holds, the reservation it ends."""
        assert posting.account == self.account.id, (posting.account, self.account.id)
        if posting.seq:
            self.apply(posting.seq, posting.amount, posting.balance, posting.lsn)
        if posting.held or posting.incoming:
            self.hold(posting.held, posting.incoming, posting.lsn)
        if posting.released:
            self.reserved -= posting.released
            assert self.reserved >= 0, self.reserved


class AccountActor(PooledActor, AccountBooks):
    def __init__(self, account: Account, state: AccountState, held: int, incoming: int, held_lsn: int) -> None:
        super().__init__()
        self._open_books(account, state, held, incoming, held_lsn)

    def on_receive(self, message: Any) -> Any:
        kind = type(message)
        if kind is Posting:
            self._post(message)
        elif kind is DebitStep:
            self._decide(message)
        elif kind is _Snapshot:
            _, posted, last_lsn = self.state
            return (posted, self.reserved + self.held, self.incoming, max(last_lsn, self.held_lsn))
        else:
            raise TypeError(f"account {self.account.id!r} got an unknown message {message!r}")
        return None

    def _decide(self, step: DebitStep) -> None:
        account_id = self.account.id
        decided = step.decide(account_id, self.state, self.reserved, self.held)
        if type(decided) is Refusal:
            step.vote(account_id, decided, 0)
            return
        assert type(decided) is int
        self.reserved += decided  # the reservation, ended by the postings of its legs or a release
        if CRASH_POINT_ARMED:
            crash_point("after-reserve")
        if step.vote(account_id, None, decided) is False:
            self.reserved -= decided

    # Its handlers (`apply`, `hold`, `_post`) are `AccountBooks`'. Only the holder of the
    # account's turn calls them: its mailbox loop (above), or a thread holding the turn.

    def catch_up(self) -> None:
        """Holder of the turn only: apply the postings queued in the mailbox, now."""
        self.actor_inbox.drain_only(Posting)  # type: ignore[attr-defined]
