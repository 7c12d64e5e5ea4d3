"""Flat combining of single transfers: concurrent callers' tickets decided by one thread at a time.

The first caller to find no combiner at work becomes it and starts every ticket queued
meanwhile, its own first (`Combiner.combine`); the others only queue theirs and sleep on
them. A round takes the turns of the idle accounts its tickets name and decides those at once
(`coordinator._turns.decide_all`), and starts the others in the mailboxes. While a group of
batches holds its turns, a round goes to the lane instead (`coordinator._lane.Lane.adopt`),
whose runner decides it with the group's turns (`Combiner.start_round`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from coordinator._errors import LedgerUnavailable
from coordinator._limits import DECIDING_PAUSE_S
from coordinator._participant import TurnAccount
from coordinator._tickets import Ticket
from coordinator._taking import give_back_turns, names_of
from coordinator._turns import decide_all
from coordinator._values import TransferRequest
from journal import JournalError

if TYPE_CHECKING:
    from coordinator._coordinator import Coordinator

logger = logging.getLogger("tally.coordinator")


class Combiner:
    """Single transfers (posts, voids, chains) of concurrent callers, decided by one of them
    (or, while a group of batches holds its turns, by the lane's runner: `Lane.adopt`)."""

    def __init__(self, coordinator: Coordinator) -> None:
        self._coordinator = coordinator
        self._lock = threading.Lock()
        self._queue: list[Ticket] = []
        self.combining = False
        """True while a caller is the combiner."""

    def combine(self, tickets: list[Ticket], inline: bool = True) -> bool:
        """Start `tickets`, combining with concurrent callers (flat combining). True if the
        caller found itself alone (and `inline`): then the record it queued was not handed to
        the journal writer, and the caller commits it (`Journal.commit_inline`).

        The first caller to find no combiner at work becomes it and starts every
        ticket queued meanwhile, its own first; the others only queue theirs and
        go to sleep on it. One thread running many protocols back to back beats
        many threads each taking the GIL for one: fewer hand-offs, larger group
        commits. The combiner never waits on anyone; it stops when the queue is
        empty. A lone caller (its own ticket the only one, the first time round) writes
        its record itself, sparing the two thread wake-ups of handing it to the writer
        and back; with company, the writer thread's group commits are the better deal.
        Between two rounds the combiner lets go of the interpreter for a moment
        (`DECIDING_PAUSE_S`), and the tickets that queue meanwhile make the next round.
        While a group of batches holds its turns, the combiner hands the lane its round
        instead (`Lane.adopt`): the lane's runner decides it before its next chunk.
        """
        with self._lock:
            self._queue += tickets
            if self.combining:
                return False
            self.combining = True
        alone = None if inline else False  # decided by the first round: later rounds hand their records to the writer
        try:
            while True:
                with self._lock:  # never empty here: only the combiner takes from the queue
                    batch, self._queue = self._queue, []
                adopted = self._round(batch, wake_writer=alone is not None or len(batch) > 1)
                if alone is None:
                    alone = len(batch) == 1 and not adopted
                with self._lock:
                    if not self._queue:
                        self.combining = False
                        return bool(alone)
                time.sleep(DECIDING_PAUSE_S)  # another round: the writer and the woken callers first
        except BaseException as error:  # not a bug a round survives (an interrupt): fail what queued, let go
            # The interrupted round answered its own tickets (`_round`); those queued behind
            # it were admitted and never started.
            with self._lock:
                stranded, self._queue = self._queue, []
                self.combining = False
            self._coordinator.fail_unstarted(stranded, error)
            raise

    def _round(self, batch: list[Ticket], wake_writer: bool) -> bool:
        """One round of `combine`: hand `batch` to the lane if a group of batches holds its
        turns (True), else start every ticket of it, in turn or in the mailboxes. An interrupt
        is raised once every ticket of `batch` is answered or on its way to be (see
        `start_round`); a round the lane took is the lane's to decide."""
        lane = self._coordinator.lane
        try:
            if lane.adopt(batch):
                return True
        except BaseException as error:
            if not lane.took(batch):
                self._coordinator.fail_unstarted(batch, error)
            raise
        self.start_round(batch, wake_writer)
        return False

    def start_round(self, batch: list[Ticket], wake_writer: bool = True,
                    held: Mapping[str, TurnAccount] | None = None) -> None:
        """Start every ticket of `batch`, in turn or in the mailboxes (see `_start_in_turn`).
        Raises no `Exception`: a bug releases the tickets with it, and is logged. An interrupt
        (a `BaseException`) is raised once the turns taken are given back and every ticket it
        kept from being decided or started has failed (`LedgerUnavailable`, nothing written)
        and returned its permit; a ticket decided or started before it is answered as usual."""
        coordinator = self._coordinator
        try:
            rest = self._start_in_turn(batch, wake_writer, held)
        except Exception as error:  # a bug must not strand the queue or its callers
            logger.exception("deciding %d combined transfers failed", len(batch))
            for queued in batch:  # the first resolve wins: one the writer failed keeps its error
                queued.resolve(LedgerUnavailable(f"transfer {queued.request.id!r} failed: {error!r}"))
                coordinator.decided(queued)
            return
        except BaseException as error:
            # No permit of `batch` went back yet (`_start_in_turn`). A decision sets its
            # ticket's `value`: one without was never decided, and fails here (a no-op if
            # `decide_all` failed it already); one with is journaled, and the writer answers it.
            for ticket in batch:
                if ticket.value is None:
                    coordinator.fail(ticket, error)
                coordinator.decided(ticket)
            raise
        if rest:
            coordinator.start_all(rest)

    def _start_in_turn(self, tickets: list[Ticket], wake_writer: bool = True,
                       held: Mapping[str, TurnAccount] | None = None) -> list[Ticket]:
        """Decide at once, on this thread, every ticket whose accounts' turns it can take
        (see `coordinator._turns`); return the others, to start through the mailboxes.
        `wake_writer` False: the caller commits their records (`Journal.commit_inline`).
        `held`: turns this thread holds already (the lane's runner); it takes the others the
        tickets name, if they are free, and gives those back before it returns, so a group's
        own tickets left for the mailboxes (an account made after it took its turns) stay
        behind every later ticket of the group that names the same account. A bug or an
        interrupt is raised with the turns it took given back and no permit of `tickets`
        returned: `start_round` answers the tickets and returns them."""
        coordinator = self._coordinator
        sequencer, participants = coordinator.sequencer, coordinator.participants
        accounts, pending = sequencer.accounts, sequencer.pending
        named: list[tuple[str, ...]] = []
        for ticket in tickets:
            request = ticket.request
            if not ticket.linked and type(request) is TransferRequest:  # the common case, inline
                named.append((request.source, request.destination))
            else:  # a chain's, a post's or a void's (its pending transfer's accounts, if it is open)
                named.append(names_of(ticket, accounts, pending))
        wanted = {name for names in named for name in names}
        if held is None:
            taken = participants.take_turns(wanted)
            if not taken:
                return tickets
        else:
            taken = participants.take_turns([name for name in wanted if name not in held])
            assert taken is not None
        mine: list[Ticket] = []
        others: list[Ticket] = []
        left: list[Ticket] = []
        try:
            turns = taken if held is None else {name: held[name] if name in held else taken[name] for name in wanted
                                                if name in held or name in taken}
            for ticket, names in zip(tickets, named, strict=True):
                for name in names:
                    if name not in turns and name in accounts:
                        others.append(ticket)
                        break
                else:
                    mine.append(ticket)
            left = decide_all(coordinator, mine, turns, wake_writer)
        except JournalError:
            pass  # every ticket is released with the failure, by `decide_all` or the writer
        finally:  # a bug or an interrupt is raised with the turns given back: `start_round` answers
            give_back_turns(coordinator, taken)
        # Only now, not in `finally`: after an interrupt `start_round` returns every permit.
        for ticket in mine:
            if ticket not in left:
                coordinator.decided(ticket)
        return others + left
