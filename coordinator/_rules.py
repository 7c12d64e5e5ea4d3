"""The rules: whether transfers may happen, and what they do, decided in one pure function.

`decide` takes a list of requests (one transfer; a post or a void of a pending transfer; or
the legs of a linked chain, each seeing the effects of those before it) and the books as a
decision sees them (`Book`: the accounts, what their entries add up to, the funds held by
pending transfers, the open pending transfers) and returns what each request does (a
`Leg`: its entries, stamped, or the hold it places or releases) or the first refusal
(`Refusal`: which request, and its code). `enter` then writes the legs into a book
(`coordinator._entering`). Every path calls them:

- the sequencer, under its lock, for every decision it journals: a transfer whose source
  reserved the funds in its mailbox, a batch or combined transfers decided in the accounts'
  turns, a post or a void, a chain;
- a source account's turn, in the mailbox path: it decides from its own state and the funds
  it has reserved for other transfers in flight, and reserves its legs' debits if it may;
- replay, which re-decides every journaled decision from the books before it and checks
  the result is what was stamped: a record live operation could not have written is damage.

Nothing here reads a clock, a lock or a file: the same inputs give the same decision. The
time a decision is made at is an input (`timestamp`), so expiry decided from it replays.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from coordinator._entering import Overlay, enter as enter, enter_leg  # (`enter` kept importable here, where it was)
from coordinator._errors import (
    AccountNotFound,
    BalanceOverflow,
    CurrencyMismatch,
    ExceedsPendingAmount,
    InsufficientFunds,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    PendingTransferNotFound,
)
from coordinator._limits import AMOUNT_MAX
from coordinator._state import AccountState, Pending
from coordinator._values import PENDING, POST, SINGLE, VOID, Account, Request, TransferRequest, TransferStatus

Stamp = tuple[int, int, int, int]
"""Both entries of a transfer: (source seq, source balance after, destination seq, destination balance after)."""


Leg = tuple[int, str, str, int, "Stamp | None", "Pending | None"]
"""What one request does: (kind, source, destination, amount, stamp, pending). Kinds:
SINGLE moves `amount` (stamp: both entries); PENDING places `amount` on hold (no stamp);
POST moves `amount` and releases the hold of `pending`; VOID releases it (amount: what it held)."""


class Refusal(NamedTuple):
    index: int  # type: ignore[assignment]  # a field, shadowing tuple.index
    """The first refused request's place in the list."""
    code: str


class Book(Protocol):
    """What a decision reads."""

    @property
    def accounts(self) -> Mapping[str, Account]: ...

    @property
    def states(self) -> Mapping[str, AccountState]: ...

    @property
    def held(self) -> Mapping[str, int]:
        """Funds held on each account by its open pending transfers (absent: 0)."""

    @property
    def incoming(self) -> Mapping[str, int]:
        """Funds of the open pending transfers toward each account (absent: 0)."""

    @property
    def pending(self) -> Mapping[str, Pending]:
        """The open pending transfers, by id."""

    def resolution(self, pending_id: str) -> TransferStatus | None:
        """What became of a pending transfer no longer open (posted, voided, expired), or None
        if there never was one with that id."""


NOTHING: Mapping[str, int] = {}

_RESOLVED = {
    None: PendingTransferNotFound.code,
    "posted": PendingTransferAlreadyPosted.code,
    "voided": PendingTransferAlreadyVoided.code,
    "expired": PendingTransferExpired.code,
}


def decide(requests: Sequence[Request], book: Book, timestamp: int,
           reserved: Mapping[str, int] = NOTHING, bound_holds: bool = True) -> list[Leg] | Refusal:
    """What `requests` do, decided in order at `timestamp` (the i-th at `timestamp + i`), all
    or none: their legs, or the first refusal. `reserved`: funds the protocol has reserved on
    an account for transfers in flight, which a debit must not spend (the checks, per
    request: accounts, debit, credit; a post or void: the pending transfer, its deadline, the
    amount, the credit). `bound_holds`: see `decide_transfer`."""
    if len(requests) == 1:  # no chain: read the books as they are
        request = requests[0]
        if type(request) is TransferRequest:
            leg = decide_transfer(request, book.accounts, book.states, book.held, book.incoming, reserved, bound_holds)
        else:
            leg = resolve(request, book, book.states, timestamp)  # type: ignore[arg-type]
        return Refusal(0, leg) if type(leg) is str else [leg]  # type: ignore[list-item]
    singles = decide_singles(requests, book, reserved)
    if singles is not None:
        return singles
    states: dict[str, AccountState] = {}
    held: dict[str, int] = {}
    incoming: dict[str, int] = {}
    seen_states: Mapping[str, AccountState] = Overlay(states, book.states)  # type: ignore[assignment]
    seen_held: Mapping[str, int] = Overlay(held, book.held)  # type: ignore[assignment]
    seen_incoming: Mapping[str, int] = Overlay(incoming, book.incoming)  # type: ignore[assignment]
    legs: list[Leg] = []
    closed: dict[str, int] = {}  # the pending transfers the chain's posts and voids resolved so far: POST or VOID
    for index, request in enumerate(requests):
        if type(request) is TransferRequest:
            leg = decide_transfer(request, book.accounts, seen_states, seen_held, seen_incoming, reserved,
                                  bound_holds)
        else:  # a post or void in a chain sees the chain's entries, not pending transfers it opened,
            # and one a leg before it resolved as resolved (the books still hold it open)
            pending_id = request.pending_id  # type: ignore[union-attr]
            if pending_id in closed:
                return Refusal(index, _RESOLVED["voided" if closed[pending_id] == VOID else "posted"])
            leg = resolve(request, book, seen_states, timestamp + index)  # type: ignore[arg-type]
            closed[pending_id] = VOID if request.void else POST  # type: ignore[union-attr]  # (if refused, unread)
        if type(leg) is str:
            return Refusal(index, leg)
        legs.append(leg)  # type: ignore[arg-type]
        enter_leg(leg, states, held, incoming, seen_states, seen_held, seen_incoming)  # type: ignore[arg-type]
    return legs


def decide_singles(requests: Sequence[Request], book: Book,
                   reserved: Mapping[str, int]) -> list[Leg] | Refusal | None:
    """`decide` of a chain of single transfers only (None if it holds another kind): the same
    rule, `decide_single` of each leg over the states the legs before it left. Their holds
    stay as the books have them (a single transfer changes none), so only the states need
    a view over the books."""
    accounts, states, held, incoming = book.accounts, book.states, book.held, book.incoming
    seen: dict[str, AccountState] = {}
    legs: list[Leg] = []
    index = 0
    for request in requests:
        if type(request) is not TransferRequest or request.pending:
            return None
        source_id, destination_id, amount = request.source, request.destination, request.amount
        stamp: Any = decide_single(accounts.get(source_id), accounts.get(destination_id), amount,  # Stamp | str
                                   seen.get(source_id) or states.get(source_id),  # a state is a non-empty tuple
                                   seen.get(destination_id) or states.get(destination_id),
                                   reserved.get(source_id, 0) + held.get(source_id, 0), incoming.get(destination_id, 0))
        if type(stamp) is str:
            return Refusal(index, stamp)
        legs.append((SINGLE, source_id, destination_id, amount, stamp, None))
        debit_seq, debit_balance, credit_seq, credit_balance = stamp
        seen[source_id] = (debit_seq, debit_balance, 0)  # as `_enter_leg` leaves them
        seen[destination_id] = (credit_seq, credit_balance, 0)
        index += 1
    return legs


def decide_transfer(request: TransferRequest, accounts: Mapping[str, Account], states: Mapping[str, AccountState],
                    held: Mapping[str, int], incoming: Mapping[str, int], reserved: Mapping[str, int],
                    bound_holds: bool = True) -> Leg | str:
    """The rule of one transfer (single or pending) from these books: its leg, or the code of
    its refusal. `decide` calls it for each transfer it decides (and the sequencer for a
    single transfer alone, without the list around it).

    `bound_holds` False leaves out the bound on what a pending transfer's source holds and
    its destination has on its way (2**63-1 each, since 2026-12-06): replay passes it, so a
    ledger whose pending transfers went past it before then still opens and verifies."""
    source_id, destination_id, amount = request.source, request.destination, request.amount
    if not request.pending:
        stamp = decide_single(accounts.get(source_id), accounts.get(destination_id), amount, states.get(source_id),
                              states.get(destination_id), reserved.get(source_id, 0) + held.get(source_id, 0),
                              incoming.get(destination_id, 0))
        return stamp if type(stamp) is str else (SINGLE, source_id, destination_id, amount, stamp, None)  # type: ignore[return-value]
    on_hold = held.get(source_id, 0)
    refused = decide_pending(accounts.get(source_id), accounts.get(destination_id), amount, states.get(source_id),
                             states.get(destination_id), reserved.get(source_id, 0) + on_hold, on_hold,
                             incoming.get(destination_id, 0), bound_holds)
    if refused is not None:
        return refused
    return (PENDING, source_id, destination_id, amount, None, None)


def decide_pending(source: Account | None, destination: Account | None, amount: int, origin: AccountState | None,
                   target: AccountState | None, unspendable: int, on_hold: int, on_its_way: int,
                   bound_holds: bool = True) -> str | None:
    """The rule of a pending transfer of `amount` between these accounts (None: there is no
    such account), in these states: the code of its refusal, or None (it may place its
    hold). `unspendable`: what the source holds for pending transfers (`on_hold`) and
    reserves for transfers in flight; `on_its_way`: the pending transfers toward the
    destination. `bound_holds`: see `decide_transfer`."""
    if source is None or destination is None:
        return AccountNotFound.code
    if source.currency != destination.currency:
        return CurrencyMismatch.code
    refused = _debit_refused(source, origin[1] - unspendable - amount)  # type: ignore[index]  # an account has a state
    if refused is not None:
        return refused
    # the credit must fit once posted, beside what else is on its way; and what the source
    # holds and the destination has on its way are figures of a balance too (`Balance.pending`,
    # `Balance.incoming`), within the same bound
    on_its_way += amount
    if target[1] + on_its_way > AMOUNT_MAX:  # type: ignore[index]
        return BalanceOverflow.code
    if bound_holds and (on_its_way > AMOUNT_MAX or on_hold + amount > AMOUNT_MAX):
        return BalanceOverflow.code  # (held, not reservations: those come off `posted`, not on top of it)
    return None


def decide_single(source: Account | None, destination: Account | None, amount: int, origin: AccountState | None,
                  target: AccountState | None, unspendable: int, on_its_way: int = 0) -> Stamp | str:
    """The rule of a single transfer of `amount` between these accounts (None: there is no
    such account), in these states: both of its entries (`Stamp`), or the code of its
    refusal. `unspendable`: what the source holds for pending transfers and reserves for
    transfers in flight, which the debit must leave alone; `on_its_way`: the pending
    transfers toward the destination, whose room in its balance the credit must leave."""
    if source is None or destination is None:
        return AccountNotFound.code
    if source.currency != destination.currency:
        return CurrencyMismatch.code
    source_seq, source_posted, _ = origin  # type: ignore[misc]  # an account has a state
    target_seq, target_posted, _ = target  # type: ignore[misc]
    after = source_posted - unspendable - amount
    limit = source.overdraft_limit
    if limit is None:
        if after < -AMOUNT_MAX:
            return BalanceOverflow.code
    elif after < -limit:
        return InsufficientFunds.code
    if target_posted + on_its_way + amount > AMOUNT_MAX:
        return BalanceOverflow.code
    return (source_seq + 1, source_posted - amount, target_seq + 1, target_posted + amount)


def _debit_refused(source: Account, after: int) -> str | None:
    """Why a debit that leaves `after` available on `source` is refused, or None."""
    limit = source.overdraft_limit
    if limit is None:
        return BalanceOverflow.code if after < -AMOUNT_MAX else None
    return InsufficientFunds.code if after < -limit else None


def resolve(request: _Resolving, book: Book, states: Mapping[str, AccountState], timestamp: int) -> Leg | str:
    """The rule of a post or a void of the pending transfer `request.pending_id`, decided at
    `timestamp` from these states: its leg, or the code of its refusal (`decide` calls it for
    each post and void it decides)."""
    pending = book.pending.get(request.pending_id)
    if pending is None:
        return _RESOLVED[book.resolution(request.pending_id)]
    return resolve_open(request, pending, states, timestamp)


def resolve_open(request: _Resolving, pending: Pending, states: Mapping[str, AccountState], timestamp: int) -> Leg | str:
    """`resolve` of a post or a void of `pending`, an open pending transfer."""
    if pending.deadline and timestamp >= pending.deadline:
        return PendingTransferExpired.code
    source_id, destination_id = pending.source, pending.destination
    if request.void:
        return (VOID, source_id, destination_id, pending.amount, None, pending)
    amount = pending.amount if request.amount is None else request.amount
    if amount > pending.amount:
        return ExceedsPendingAmount.code
    source_seq, source_posted, _ = states[source_id]
    target_seq, target_posted, _ = states[destination_id]
    if target_posted + amount > AMOUNT_MAX or source_posted - amount < -AMOUNT_MAX:
        return BalanceOverflow.code
    return (POST, source_id, destination_id, amount,
            (source_seq + 1, source_posted - amount, target_seq + 1, target_posted + amount), pending)


class _Resolving(Protocol):
    pending_id: str
    amount: int | None
    void: bool


def due(pending: Mapping[str, Pending], ids: Sequence[str], timestamp: int) -> str | None:
    """Why an expiry at `timestamp` of `ids` is not one the rules allow (each must be an open
    pending transfer whose deadline has come), or None."""
    for pending_id in ids:
        found = pending.get(pending_id)
        if found is None:
            return f"{pending_id!r} is not an open pending transfer"
        if not found.deadline or found.deadline > timestamp:
            return f"pending transfer {pending_id!r} has not reached its deadline"
    return None
