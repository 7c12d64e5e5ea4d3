"""Deciding in turn: a thread takes the turns of every account a group of tickets names,
then runs each account's own handlers for the tickets in order.

A turn is the right to handle an account's messages; whoever holds it is that
account's single thread for the moment. Batches decide in the lane
(`coordinator._lane`), a group at a time; its runner takes the turns of the group's
accounts (`coordinator._taking`), waiting (bounded) for one held elsewhere, and only it ever waits, so no two
waiters hold what the other wants. If a turn stays busy, the group falls back to the
message-passing `Batch`. Other takers (the combiner of single transfers) never wait. A
turn is taken only from an idle account with an empty mailbox (or, with no live actor,
without one: a dormant turn, see `engine._directory`); while it is held, other threads'
messages to the account queue in its mailbox. Entries queued meanwhile (a concurrent
commit crediting it) are applied before the account decides again; everything else is
handed to the dispatcher when the holder lets go. So each account still handles one
message at a time, and its entries are applied in LSN order, while the batch costs no
thread hop.

The tickets are decided in chunks, each under one hold of the sequencer lock and
journaled as one block (`decide_in_turn`): per ticket, the sequencer decides it by the
rules (no reservation is needed: nothing else can touch the accounts meanwhile) and stamps
its record, and the accounts apply what it did at once, so the next ticket sees it. The
combined single transfers (`coordinator._combiner`) are decided the same way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from coordinator._errors import InvalidRequest
from coordinator._limits import CHUNK_REQUESTS_MAX
from coordinator._participant import TurnAccount
from coordinator._rules import Refusal
from coordinator._stamps import Chunk
from coordinator._state import AccountState
from coordinator._taking import names_of
from coordinator._tickets import Ticket
from coordinator._values import PENDING, TransferRequest
from journal import CRASH_POINT_ARMED, JournalError, crash_point

if TYPE_CHECKING:
    from coordinator._coordinator import Coordinator

def decide_all(coordinator: Coordinator, tickets: list[Ticket], turns: Mapping[str, TurnAccount],
               wake_writer: bool = True, between_chunks: Callable[[], None] | None = None,
               chunk_requests: Callable[[], int] | None = None) -> list[Ticket]:
    """`decide_in_turn` chunk by chunk; the tickets it left. If the journal fails, every ticket
    not yet appended (the later chunks', and those the earlier chunks left) is released with
    the failure (the writer releases the appended ones), and it raises. `wake_writer` False:
    the caller commits the records itself. `between_chunks`, called between two chunks (the
    lane's: a pause, and the single transfers it adopted): what it raises fails this chunk
    and the later ones, none of them started. `chunk_requests`, asked before each chunk (after
    `between_chunks`): its size, at least 1 (asserted); without it, `CHUNK_REQUESTS_MAX`. What
    it raises, the same."""
    left: list[Ticket] = []
    first = 0
    while first < len(tickets):
        started = False
        size = CHUNK_REQUESTS_MAX
        try:
            if first and between_chunks is not None:
                between_chunks()
            if chunk_requests is not None:
                size = chunk_requests()
                assert size > 0, size
            started = True
            left += decide_in_turn(coordinator, tickets[first : first + size], turns, wake_writer)
        except BaseException as error:  # that chunk is failed (or not started); the later ones never started
            _fail(coordinator, left + tickets[first + size if started else first :], error)
            raise
        first += size
    return left


class _Reserved(Mapping[str, int]):
    """The reservations of the accounts in turn (funds their mailbox-path transfers in flight hold)."""

    __slots__ = ("_turns",)

    def __init__(self, turns: Mapping[str, TurnAccount]) -> None:
        self._turns = turns

    def __getitem__(self, key: str) -> int:
        return self._turns[key].reserved

    def get(self, key: str, default: object = 0) -> int:  # type: ignore[override]
        turn = self._turns.get(key)
        return turn.reserved if turn is not None else 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self._turns)

    def __len__(self) -> int:
        return len(self._turns)


def decide_in_turn(coordinator: Coordinator, tickets: list[Ticket], turns: Mapping[str, TurnAccount],
                   wake_writer: bool = True) -> list[Ticket]:
    """Decide claimed tickets in order, on this thread, which holds the turn of every account
    they name that exists, and journal them all in one block; return those it could not
    decide (one names an account whose turn it does not hold: made, or for a post or a
    void, found pending, since the turns were taken), untouched.

    Each ticket is decided by the rules from the projection and the accounts' reservations,
    exactly as the sequencer decides one in the mailbox path, and stamped; the accounts in
    turn apply what it did at once (`apply`, `hold`), so the next ticket sees it. An account
    whose mailbox received postings since its turn was taken (a concurrent commit crediting
    it) applies those first: the sequencer's projection, which already includes them, must
    equal the account's own state before it decides.
    """
    sequencer = coordinator.sequencer
    states, held, incoming = sequencer.states, sequencer.held, sequencer.incoming
    accounts, pending = sequencer.accounts, sequencer.pending
    stamp, stamp_plain = sequencer.stamp, sequencer.stamp_plain
    stamp_pending, stamp_resolution = sequencer.stamp_pending, sequencer.stamp_resolution
    reserved = _Reserved(turns)
    chunk = Chunk()
    commits = 0
    left: list[Ticket] = []
    with sequencer.lock:
        try:
            coordinator.journal.wait_room(len(tickets))
        except JournalError as error:
            _fail(coordinator, tickets, error)
            raise
        lsn = coordinator.journal.last_lsn
        try:  # from the first stamp on, memory runs ahead of the journal until the chunk is appended
            clock, per_decision = sequencer.clock, sequencer.clock_per_decision
            now = 0 if per_decision else clock()  # the wall clock: one reading for the chunk
            for ticket in tickets:
                request = ticket.request
                if (not ticket.linked and type(request) is TransferRequest and request.code == 0  # one request,
                        and request.reference is None and request.metadata is None  # a plain single transfer:
                        and not request.pending):  # `stamp_plain`
                    source_id, destination_id = request.source, request.destination
                    paying, paid = turns.get(source_id), turns.get(destination_id)
                    if paying is not None and paid is not None:
                        origin, target = states[source_id], states[destination_id]
                        # Only the entries matter here (`apply` checks them), and the source's
                        # reservations: holds queued for the account commute with them, and the
                        # decision reads the projection's. A reservation may be released by a
                        # posting still queued (a chain another source refused): one still held
                        # makes the source apply its queued postings first.
                        if (paying.state is not origin and paying.state != origin) or paying.reserved:
                            _catch_up(paying, origin, held.get(source_id, 0), incoming.get(source_id, 0))
                        if paid.state is not target and paid.state != target:
                            _catch_up(paid, target, held.get(destination_id, 0), incoming.get(destination_id, 0))
                        if per_decision:
                            now = _reading(clock, coordinator, ticket)
                            if now < 0:
                                continue
                        lsn += 1
                        made: Any = stamp_plain(chunk, ticket, request, lsn, paying.account, paid.account, origin, target,
                                                paying.reserved, now)  # Stamp | str
                        if type(made) is str:
                            continue
                        if CRASH_POINT_ARMED:
                            crash_point("after-reserve")
                        amount = request.amount
                        debit_seq, debit_balance, credit_seq, credit_balance = made
                        # Each account applies its entry, and the projection takes the state it
                        # reached (`rules.enter` of the leg, built once, not twice).
                        states[source_id] = paying.apply(debit_seq, -amount, debit_balance, lsn)
                        if CRASH_POINT_ARMED:
                            crash_point("between-entries")
                        states[destination_id] = paid.apply(credit_seq, amount, credit_balance, lsn)
                        commits += 1
                        continue
                if not ticket.linked and (type(request) is not TransferRequest or request.pending):
                    # A pending transfer, or a post or a void of an open one, between two
                    # accounts in turn (`stamp_pending`, `stamp_resolution`): as the generic
                    # path below, without its dispatch. Both accounts caught up first (all must
                    # agree: it changes both holds), as there.
                    found: Any = None  # the open pending transfer a post or a void names
                    if type(request) is TransferRequest:
                        source_id, destination_id = request.source, request.destination
                    else:  # one not open goes on to the generic path, which refuses it
                        found = pending.get(request.pending_id)  # type: ignore[union-attr]
                        source_id, destination_id = (found.source, found.destination) if found is not None else ("", "")
                    paying, paid = turns.get(source_id), turns.get(destination_id)
                    if paying is not None and paid is not None and source_id != destination_id:
                        origin, target = states[source_id], states[destination_id]
                        _agree(paying, origin, held.get(source_id, 0), incoming.get(source_id, 0))
                        _agree(paid, target, held.get(destination_id, 0), incoming.get(destination_id, 0))
                        if per_decision:
                            now = _reading(clock, coordinator, ticket)
                            if now < 0:
                                continue
                        lsn += 1
                        if found is None:
                            if stamp_pending(chunk, ticket, request, lsn, paying.account, paid.account,  # type: ignore[arg-type]
                                             origin, target, paying.reserved, now) is not None:
                                continue
                            if CRASH_POINT_ARMED:
                                crash_point("after-reserve")
                            placed: int = request.amount  # type: ignore[union-attr,assignment]
                            paying.hold(placed, 0, lsn)
                            paid.hold(0, placed, lsn)
                        else:
                            closing: Any = stamp_resolution(chunk, ticket, request, lsn, found, now)  # type: ignore[arg-type]  # Leg | str
                            if type(closing) is str:
                                continue
                            if CRASH_POINT_ARMED:
                                crash_point("after-reserve")
                            amount, stamped = closing[3], closing[4]
                            if stamped is not None:  # a post: its entries, as `stamp_plain`'s
                                states[source_id] = paying.apply(stamped[0], -amount, stamped[1], lsn)
                                if CRASH_POINT_ARMED:
                                    crash_point("between-entries")
                                states[destination_id] = paid.apply(stamped[2], amount, stamped[3], lsn)
                            paying.hold(-found.amount, 0, lsn)
                            paid.hold(0, -found.amount, lsn)
                        commits += 1
                        continue
                if ticket.linked and _singles_in_turn(ticket.requests, turns):
                    # A chain of single transfers (`stamp_chain`): as above, each account
                    # caught up first, then the legs' entries applied in order.
                    legs: Any = ticket.requests  # TransferRequests (`_singles_in_turn`)
                    for leg in legs:
                        for name in (leg.source, leg.destination):
                            _agree(turns[name], states[name], held.get(name, 0), incoming.get(name, 0))
                    if per_decision:
                        now = _reading(clock, coordinator, ticket)
                        if now < 0:
                            continue
                    lsn += 1
                    chain: Any = sequencer.stamp_chain(chunk, ticket, lsn, reserved, now)  # list[Leg] | Refusal
                    if type(chain) is Refusal:
                        continue
                    if CRASH_POINT_ARMED:
                        crash_point("after-reserve")
                    for _, source, destination, amount, stamped, _ in chain:
                        states[source] = turns[source].apply(stamped[0], -amount, stamped[1], lsn)
                        if CRASH_POINT_ARMED:
                            crash_point("between-entries")
                        states[destination] = turns[destination].apply(stamped[2], amount, stamped[3], lsn)
                        if CRASH_POINT_ARMED:
                            crash_point("mid-linked-chain")
                    commits += 1
                    continue
                names = names_of(ticket, accounts, pending)
                ready = True
                for name in names:
                    turn = turns.get(name)
                    if turn is None:
                        ready = False
                        break
                    # All must agree (a post or a void changes both holds).
                    _agree(turn, states[name], held.get(name, 0), incoming.get(name, 0))
                if not ready:
                    left.append(ticket)
                    continue
                if per_decision:
                    now = _reading(clock, coordinator, ticket)
                    if now < 0:
                        continue
                lsn += 1
                decided = stamp(chunk, ticket, lsn, reserved, now=now if per_decision else None)
                if isinstance(decided, Refusal):
                    continue
                if CRASH_POINT_ARMED:
                    crash_point("after-reserve")
                for kind, source, destination, amount, stamped, resolved in decided:
                    if stamped is not None:
                        turns[source].apply(stamped[0], -amount, stamped[1], lsn)
                        if CRASH_POINT_ARMED:
                            crash_point("between-entries")
                        turns[destination].apply(stamped[2], amount, stamped[3], lsn)
                    if kind == PENDING:
                        turns[source].hold(amount, 0, lsn)
                        turns[destination].hold(0, amount, lsn)
                    elif resolved is not None:
                        turns[source].hold(-resolved.amount, 0, lsn)
                        turns[destination].hold(0, -resolved.amount, lsn)
                    if CRASH_POINT_ARMED and ticket.linked:
                        crash_point("mid-linked-chain")
                commits += 1
        except BaseException as error:  # a bug, or an interrupt: memory may be past what will never be journaled
            sequencer.broken(error)
            _fail(coordinator, tickets, JournalError(f"the ledger stopped writing: {error!r}"))
            raise
        if not chunk:
            return left
        try:
            first = sequencer.append_chunk(chunk, lsn, wake_writer)
        except JournalError as error:  # the journal failed: nothing more is written until reopen
            # The accounts and the projection already hold this chunk's entries, which
            # will never be durable: the ledger is unusable until reopened, and it is,
            # since the failed journal refuses every later write and read. The tickets it
            # left were never started: they fail too.
            _fail(coordinator, tickets, error)
            raise
        except BaseException as error:  # an interrupt: queued or not, the journal's last LSN says
            if coordinator.journal.last_lsn < lsn:  # not: memory is past what will never be journaled
                sequencer.broken(error)
                _fail(coordinator, tickets, JournalError(f"the ledger stopped writing: {error!r}"))
            else:  # queued: the writer answers them; the ones left for the mailboxes never started
                for ticket in left:
                    coordinator.fail(ticket, error)
            raise
        assert first + len(chunk) - 1 == lsn, (first, len(chunk), lsn)
        if CRASH_POINT_ARMED:
            for _ in range(commits):
                crash_point("after-commit-queued")
    return left


def _singles_in_turn(requests: tuple[Any, ...], turns: Mapping[str, TurnAccount]) -> bool:
    """Whether a chain holds only single transfers (no pending transfer, post or void) between
    accounts whose turns are held."""
    for request in requests:
        if type(request) is not TransferRequest or request.pending or request.source not in turns or (
                request.destination not in turns):
            return False
    return True


def _reading(clock: Callable[[], int], coordinator: Coordinator, ticket: Ticket) -> int:
    """A reading of a clock of the caller's own, for `ticket`'s decision; -1 if it gave a bad
    one (`InvalidRequest`, `checked_clock`): then `ticket` fails with that error, before
    anything moved for it, and the decisions around it go on."""
    try:
        return clock()
    except InvalidRequest as error:
        coordinator.fail(ticket, error)
        return -1


def _fail(coordinator: Coordinator, tickets: list[Ticket], error: BaseException) -> None:
    """Release tickets that were never appended with the journal's failure, or what else kept
    them from it (waiters elsewhere wake; `Coordinator.fail` says which); the caller then
    raises it. Appended ones are the writer's to release."""
    for ticket in tickets:
        coordinator.fail(ticket, error)


def _agree(account: TurnAccount, projected: AccountState, held: int, incoming: int) -> None:
    """Make an account in turn agree with the projection (its state `projected`, its holds
    `held` and `incoming`) before a decision that may move its holds: it applies what waits in
    its mailbox if it does not, or if it holds a reservation (a posting still queued may release
    it). The plain single transfer's path checks less, inline (its own comment says why)."""
    if (account.state is not projected and account.state != projected) or account.held != held or (
            account.incoming != incoming) or account.reserved:
        _catch_up(account, projected, held, incoming)


def _catch_up(account: TurnAccount, projected: AccountState, held: int, incoming: int) -> None:
    """Apply the postings waiting in the account's mailbox: then it agrees with the projection."""
    account.catch_up()
    assert account.state == projected and account.held == held and account.incoming == incoming, (
        account.state, projected, account.held, held, account.incoming, incoming)
