"""Taking the accounts' turns, and giving them back: who may wait for one, and for how long.

A turn is the right to handle an account's messages (see `coordinator._turns`, which decides
with the turns taken here). `take_turns` takes the turns of the accounts a group of tickets
names (`names_of`); only the holder of the batch lane may wait for a busy one
(`Coordinator.lane`), so no two waiters hold what the other waits for.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from coordinator._limits import TURN_POLL_S
from coordinator._participant import TurnAccount
from coordinator._tickets import Ticket
from coordinator._values import TransferRequest

if TYPE_CHECKING:
    from coordinator._coordinator import Coordinator


def names_of(ticket: Ticket, accounts: Mapping[str, object], pending: Mapping[str, object]) -> tuple[str, ...]:
    """The existing accounts a ticket's decision may touch (a post's or a void's: its pending
    transfer's, if it is open)."""
    requests = ticket.requests
    if not ticket.linked:  # one request
        request = ticket.request
        if type(request) is TransferRequest:
            source, destination = request.source, request.destination
        else:
            found = pending.get(request.pending_id)  # type: ignore[union-attr]
            if found is None:
                return ()
            source, destination = found.source, found.destination  # type: ignore[attr-defined]
        if source in accounts:
            return (source, destination) if destination in accounts else (source,)
        return (destination,) if destination in accounts else ()
    names: list[str] = []
    for request in requests:
        if type(request) is TransferRequest:
            names += (request.source, request.destination)
        else:
            found = pending.get(request.pending_id)  # type: ignore[union-attr]
            if found is not None:
                names += (found.source, found.destination)  # type: ignore[attr-defined]
    return tuple(filter(accounts.__contains__, dict.fromkeys(names)))  # in order, once each, if it exists


def take_turns(coordinator: Coordinator, names: list[str], wait_s: float = 0.0) -> Mapping[str, TurnAccount] | None:
    """Pin every named account that exists and take its turn, or (if one is still busy
    after `wait_s`) nothing at all. Holds the turns it took while it waits for the busy
    ones: only the holder of the batch lane may (`Coordinator.lane`), so no two waiters
    hold what the other waits for, and every other holder of a turn (a combiner, a
    mailbox turn) gives it back without waiting on any. Polls, with pauses of `TURN_POLL_S`."""
    participants = coordinator.participants
    if wait_s <= 0:
        return participants.take_turns(names, all_or_none=True)
    turns = participants.take_turns(names)
    assert turns is not None
    accounts = coordinator.sequencer.accounts
    busy = [name for name in dict.fromkeys(names) if name not in turns and name in accounts]
    if not busy:
        return turns
    deadline = time.monotonic() + wait_s
    pause, pause_max = TURN_POLL_S
    try:
        while time.monotonic() < deadline:
            time.sleep(pause)
            pause = min(2 * pause, pause_max)
            participants.take_turns(busy, into=turns)
            busy = [name for name in busy if name not in turns]
            if not busy:
                return turns
    except BaseException:
        participants.give_back_turns(turns)
        raise
    participants.give_back_turns(turns)
    return None


def give_back_turns(coordinator: Coordinator, turns: Mapping[str, TurnAccount]) -> None:
    """Give back the turns taken by `take_turns` and unpin the accounts. An interrupt meanwhile
    is raised once the rest are given back too: a turn kept would hang its account."""
    participants = coordinator.participants
    try:
        participants.give_back_turns(turns)
    except BaseException as error:
        if not isinstance(error, Exception):  # an interrupt; it resumes where that one stopped
            participants.give_back_turns(turns)
        raise
