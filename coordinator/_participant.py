"""The small interfaces through which the coordinator talks to accounts.

The coordinator never touches account state. It asks a `Participant` to reserve
funds (a message the account decides in its own mailbox), hands it entries to
post, and asks it for a snapshot. None of these calls wait on another account.

A batch that holds an account's turn (see `coordinator._turns`) is, for that
moment, the account's single thread: it gets the account as a `TurnAccount`
and runs the account's own handlers, which change the state, in place of its
mailbox loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from coordinator._rules import Stamp, decide
from coordinator._state import AccountState, Posting

if TYPE_CHECKING:
    from coordinator._claims import Ticket
    from coordinator._values import Account, TransferRequest


class Participant(Protocol):
    def reserve(self, step: DebitStep) -> None:
        """Queue a debit decision in the account's mailbox; return at once."""

    def post(self, posting: Posting) -> bool:
        """Queue a stamped entry for the account to apply; return at once, handling
        nothing (the caller holds the sequencer lock). True if the caller took the
        account's turn and must call `run` after releasing its locks."""

    def run(self) -> None:
        """Run the turn taken by `post`."""

    def snapshot(self, timeout_s: float) -> tuple[int, int, int]:
        """(posted, pending, LSN of the last entry applied), waiting at most `timeout_s`."""


class TurnAccount(Protocol):
    """An account whose turn the caller holds (see `coordinator._turns`): the account's own
    handlers, run now on the caller's thread."""

    account: Account
    """The account: id, currency, overdraft limit."""

    state: AccountState
    """What the account's entries add up to, as applied so far. Read it; `apply` changes it."""

    reserved: int
    """Funds reserved for its outgoing transfers in flight in the mailbox path (the
    protocol's reservations): what a decision must not spend twice."""

    def apply(self, seq: int, amount: int, balance: int, lsn: int) -> AccountState:
        """Post a stamped entry now (one decided while its turn is held: no reservation of
        its own to release); the new state."""

    def catch_up(self) -> None:
        """Apply every entry queued in the mailbox (other messages stay queued, in order)."""


class Participants(Protocol):
    def pin(self, account_id: str) -> Participant:
        """The live participant for an account, kept live until `unpin`."""

    def unpin(self, account_id: str) -> None: ...

    def take_turns(self, account_ids: Iterable[str], all_or_none: bool = False) -> Mapping[str, TurnAccount] | None:
        """Pin each named account and take its turn (the right to handle its messages) if it
        is idle with an empty mailbox; a busy one is left alone, unpinned. With `all_or_none`,
        one busy account makes it give back every turn it took and return None. Repeated
        and unknown ids are skipped. Never waits."""

    def give_back_turns(self, turns: Mapping[str, TurnAccount]) -> None:
        """Give back the turns `take_turns` took and unpin those accounts: pass what it returned."""


class DebitStep:
    """The message a source account decides: `decide` the transfer from its own state (the
    rules), reserve the amount if it may, then let the coordinator commit or reject. Runs
    entirely on the source's turn.
    """

    __slots__ = ("request", "ticket", "source", "destination", "_commit", "_reject", "_accounts", "_states")

    def __init__(
        self,
        request: TransferRequest,
        ticket: Ticket,
        source: Participant,
        destination: Participant,
        commit: Callable[[DebitStep], bool],
        reject: Callable[[DebitStep, str], None],
        source_account: Account,
        destination_account: Account,
        states: Mapping[str, AccountState],
    ) -> None:
        self.request = request
        self.ticket = ticket
        self.source = source
        self.destination = destination
        self._commit = commit
        self._reject = reject
        self._accounts = (source_account, destination_account)
        self._states = states
        """The sequencer's projection, whose destination state the decision reads (without
        its lock: a state is one tuple, replaced whole; the stamping decides again under it)."""

    def decide(self, state: AccountState, reserved: int) -> Stamp | str:
        """`rules.decide` of this transfer, by its source, whose entries add up to `state` and
        which has `reserved` for other transfers."""
        request = self.request
        return decide(request.amount, self._accounts[0], self._accounts[1], state, self._states[request.destination],
                      reserved)

    def commit(self) -> bool:
        """Call with the reservation placed. True: committed, keep the reservation until
        the entry posts. False: not committed (refused or failed), release it."""
        return self._commit(self)

    def reject(self, code: str) -> None:
        """Call when the account refuses the debit (no reservation was placed)."""
        self._reject(self, code)
