"""Deciding in turn: what a batch decided in turn reads of an account whose turn it holds
while other threads' messages queue in that account's mailbox."""

from __future__ import annotations

import threading

from coordinator._state import Posting
from coordinator._turns import decide_in_turn, give_back_turns, take_turns
from engine import Ledger, Transfer, TransferRequest

WAIT_S = 10.0


def test_a_reservation_released_in_the_mailbox_while_the_turn_is_held_is_not_spent_twice(ledger: Ledger) -> None:
    """`a` holds 100 with 50 reserved for a transfer in flight through the mailboxes when a
    batch takes its turn; that transfer is then refused elsewhere (a chain's other source),
    so the release of the 50 queues in `a`'s mailbox behind the turn. A debit of all 100
    decided in turn must apply the release first, not read the stale reservation."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "d"):
        ledger.create_account(name, currency="USD")
    ledger.transfer("fund", source="bank", destination="a", amount=100)
    coordinator = ledger._coordinator
    turns = take_turns(coordinator, ["a", "d"])
    assert turns is not None
    participant = coordinator.participants.pin("a")
    try:
        turns["a"].reserved = 50  # type: ignore[misc] # the holder of the turn: what the mailbox's reservation left
        released: list[bool] = []
        releasing = threading.Thread(target=lambda: released.append(
            participant.post(Posting("a", 0, 0, 0, 0, 50, 0, 0))))  # as the refusing source's turn sends it
        releasing.start()
        releasing.join(WAIT_S)
        assert released == [False]  # queued behind the turn, not applied
        assert turns["a"].reserved == 50
        ticket, fresh = coordinator.claims.claim(TransferRequest("all", "a", "d", 100))
        assert fresh
        decide_in_turn(coordinator, [ticket], turns)  # type: ignore[list-item]
    finally:
        coordinator.participants.unpin("a")
        give_back_turns(coordinator, turns)
    assert ticket.wait(WAIT_S)
    assert isinstance(ticket.value, Transfer), ticket.error or ticket.value
    coordinator.claims.release(ticket)  # type: ignore[arg-type]
    assert ledger.balance("a").posted == 0 and ledger.balance("a").pending == 0
    assert ledger.balance("d").posted == 100
