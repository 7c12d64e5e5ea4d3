"""The small interfaces through which the coordinator talks to accounts, and the reservation
step of the two-phase protocol.

The coordinator never touches account state. It asks a `Participant` to reserve funds (a
`DebitStep` the account decides in its own mailbox), hands it postings (what a decision did
to it), and asks it for a snapshot. None of these calls wait on another account.

A thread that holds an account's turn (see `coordinator._turns`) is, for that moment, the
account's single thread: it gets the account as a `TurnAccount` and runs the account's own
handlers, which change the state, in place of its mailbox loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Protocol

from coordinator._postings import reservations
from coordinator._rules import Refusal, decide
from coordinator._state import AccountState, Pending, Posting
from coordinator._values import TransferStatus

if TYPE_CHECKING:
    from coordinator._sequencer import Sequencer
    from coordinator._tickets import Ticket
    from coordinator._values import Account


class Participant(Protocol):
    def reserve(self, step: DebitStep) -> None:
        """Queue a debit decision in the account's mailbox; return at once."""

    def post(self, posting: Posting) -> bool:
        """Queue a posting for the account to apply; return at once, handling nothing (the
        caller holds the sequencer lock). True if the caller took the account's turn and
        must call `run` after releasing its locks."""

    def run(self) -> None:
        """Run the turn taken by `post`."""

    def snapshot(self, timeout_s: float) -> tuple[int, int, int, int]:
        """(posted, pending, incoming, LSN of the last change applied), waiting at most `timeout_s`."""


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

    held: int
    """Funds its open pending transfers hold, as applied so far."""

    incoming: int
    """Funds of the open pending transfers toward it, as applied so far."""

    def apply(self, seq: int, amount: int, balance: int, lsn: int) -> AccountState:
        """Post a stamped entry now (one decided while its turn is held: no reservation of
        its own to release); the new state."""

    def hold(self, held: int, incoming: int, lsn: int) -> None:
        """Change the funds pending transfers hold on it (`held`) and bring it (`incoming`)
        by these amounts, as the record at `lsn` does."""

    def catch_up(self) -> None:
        """Apply every posting queued in the mailbox (other messages stay queued, in order)."""


class Participants(Protocol):
    def pin(self, account_id: str) -> Participant:
        """The live participant for an account, kept live until `unpin`."""

    def unpin(self, account_id: str) -> None: ...

    def take_turns(self, account_ids: Iterable[str], all_or_none: bool = False,
                   into: Mapping[str, TurnAccount] | None = None) -> Mapping[str, TurnAccount] | None:
        """Pin each named account and take its turn (the right to handle its messages) if it
        is idle with an empty mailbox; a busy one is left alone, unpinned. With `all_or_none`,
        one busy account makes it give back every turn it took and return None. With `into`
        (what an earlier call returned, never with `all_or_none`), the turns taken are
        added to it. Repeated and unknown ids, and ids already in `into`, are skipped.
        Never waits."""

    def give_back_turns(self, turns: Mapping[str, TurnAccount]) -> None:
        """Give back the turns `take_turns` took and unpin those accounts: pass what it returned.
        Each turn once: called again (after an interrupt), it gives back only the ones it had not."""


class DebitStep:
    """The message each source of a ticket decides, in its mailbox (phase one of the
    protocol): `decide` the ticket from its own state (the rules), reserve what it takes of
    the source's funds if it may (`reservations`), and `vote`. The last source to vote ends
    the phase on its own turn: if every source
    reserved, the coordinator commits (deciding again under the sequencer lock); if one
    refused, the coordinator journals the refusal and the reservations are released. No
    source waits on another.
    """

    __slots__ = ("ticket", "participants", "sources", "_left", "_refusal", "_reserved", "_lock", "_end", "_sequencer")

    def __init__(
        self,
        ticket: Ticket,
        participants: dict[str, Participant],
        sources: list[str],
        end: Callable[[DebitStep, str, Refusal | None], bool],
        sequencer: Sequencer,
    ) -> None:
        self.ticket = ticket
        self.participants = participants
        """Every account the ticket names, pinned (until the coordinator unpins them)."""
        self.sources = sources
        """The accounts that must reserve, each once."""
        self._left = len(sources)
        self._refusal: Refusal | None = None
        self._reserved: dict[str, int] = {}
        """What each source that voted reserved."""
        self._lock = threading.Lock() if len(sources) > 1 else None
        self._end = end
        self._sequencer = sequencer

    def decide(self, account: str, state: AccountState, reserved: int, held: int) -> int | Refusal:
        """`rules.decide` of the ticket as source `account` sees it (its own state, its
        reservations and holds; the sequencer's projection for the other accounts, read
        without its lock: a state is one value, replaced whole, and the stamping decides
        again under it): the funds it must reserve (`reservations`), or the refusal."""
        decided = decide(self.ticket.requests, _SourceView(self._sequencer, account, state, held), 0,
                         {account: reserved})
        if isinstance(decided, Refusal):
            return decided
        if len(decided) == 1:
            return decided[0][3]  # one transfer, from `account`: its amount
        return reservations(decided).get(account, 0)

    def vote(self, account: str, refusal: Refusal | None, reserved: int) -> bool | None:
        """Source `account` reserved `reserved` (or refused). None: other sources have yet to
        vote (keep the reservation: its postings or a release will end it). True: the ticket
        committed (keep it until the postings come). False: it did not, release it now."""
        if self._lock is None:
            return self._end(self, account, refusal)
        with self._lock:
            self._reserved[account] = reserved
            if refusal is not None and (self._refusal is None or refusal.index < self._refusal.index):
                self._refusal = refusal
            self._left -= 1
            if self._left:
                return None
        return self._end(self, account, self._refusal)

    def released_elsewhere(self, account: str) -> Mapping[str, int]:
        """What the other sources reserved, to release when the ticket does not commit."""
        return {source: amount for source, amount in self._reserved.items() if source != account and amount}


class _SourceView:
    """The books as a source sees them in its mailbox: its own state and holds as it applied
    them, the sequencer's projection for everything else."""

    __slots__ = ("accounts", "states", "held", "incoming", "pending", "_sequencer")

    def __init__(self, sequencer: Sequencer, account: str, state: AccountState, held: int) -> None:
        self._sequencer = sequencer
        self.accounts = sequencer.accounts
        self.states: Mapping[str, AccountState] = _One(account, state, sequencer.states)  # type: ignore[assignment]
        self.held: Mapping[str, int] = _One(account, held, sequencer.held)  # type: ignore[assignment]
        self.incoming = sequencer.incoming
        self.pending: Mapping[str, Pending] = sequencer.pending

    def resolution(self, pending_id: str) -> TransferStatus | None:
        return None  # a source decides transfers only; posts and voids are decided by the sequencer


class _One(Mapping[str, object]):
    """`base` with one key's value replaced."""

    __slots__ = ("_key", "_value", "_base")

    def __init__(self, key: str, value: object, base: Mapping[str, object]) -> None:
        self._key, self._value, self._base = key, value, base

    def __getitem__(self, key: str) -> object:
        return self._value if key == self._key else self._base[key]

    def get(self, key: str, default: object = None) -> object:
        return self._value if key == self._key else self._base.get(key, default)

    def __iter__(self):  # type: ignore[no-untyped-def]
        raise NotImplementedError  # never listed: decisions look accounts up

    def __len__(self) -> int:
        raise NotImplementedError
