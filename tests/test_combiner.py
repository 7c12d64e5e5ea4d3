"""Flat combining (`coordinator._combiner`): an interrupt (a `KeyboardInterrupt` landing in the
combiner's thread) outside the decisions themselves, in a round that holds other callers'
tickets. Each of them gets a prompt outcome (durable if it was decided, `LedgerUnavailable`
if it never was), every permit and every turn comes back, and the books add up."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator import _combiner, _lane
from coordinator._limits import CHUNK_REQUESTS_MAX
from coordinator._taking import give_back_turns, take_turns
from engine import Ledger, LedgerError, LedgerUnavailable, Transfer, TransferRequest
from engine._tools_audit import verify
from support import interrupt_after

TIMEOUT_S = 3.0
"""The ledger's bound on a caller's wait: a ticket left behind fails a test in seconds."""
PROMPT_S = 10.0
"""How long a ticket of an interrupted round may take to get its outcome (a failure is
immediate; a decided one waits for its group commit, whose flush a slow disk makes long). No
timeout answers a ticket left behind, so a bound this long still finds one, and never fails a
test for the disk's speed."""
WAIT_S = 10.0

Inject = Callable[[Ledger, pytest.MonkeyPatch], None]


def _accounts(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("alice", "bob", "carol"):
        ledger.create_account(name, currency="USD")


def _claimed(ledger: Ledger, requests: list[TransferRequest]) -> list[Any]:
    """Tickets claimed and admitted, as `Ledger.transfer` makes them before it combines."""
    coordinator = ledger._coordinator
    tickets = [coordinator.claims.claim(request, relayed=True)[0] for request in requests]
    coordinator.admission.admit(len(tickets), TIMEOUT_S)
    return tickets


def _interrupt_taking_turns(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    real = ledger._directory.take_turns

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(ledger._directory, "take_turns", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(ledger._directory, "take_turns", interrupted)


def _interrupt_entering_decide_all(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _combiner.decide_all

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(_combiner, "decide_all", real)
        raise KeyboardInterrupt

    monkeypatch.setattr(_combiner, "decide_all", interrupted)


def _interrupt_once_decide_all_returns(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    interrupt_after(monkeypatch, _combiner, "decide_all")


def _interrupt_giving_back_turns(after: bool) -> Inject:
    """An interrupt in the directory's `give_back_turns`, before it gave any back or after it gave back all."""

    def inject(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
        real = ledger._directory.give_back_turns

        def interrupted(turns: Any) -> None:
            monkeypatch.setattr(ledger._directory, "give_back_turns", real)
            if after:
                real(turns)
            raise KeyboardInterrupt

        monkeypatch.setattr(ledger._directory, "give_back_turns", interrupted)

    return inject


def _interrupt_after_the_first_mailbox_start(ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    coordinator = ledger._coordinator
    real = coordinator.start

    def interrupted(ticket: Any) -> None:
        monkeypatch.setattr(coordinator, "start", real)
        real(ticket)
        raise KeyboardInterrupt

    monkeypatch.setattr(coordinator, "start", interrupted)


ROUND = [
    TransferRequest("own", "bank", "alice", 5),  # the combiner's own caller's
    TransferRequest("in-turn", "bank", "carol", 7),  # another caller's, decided in turn with it
    TransferRequest("mailbox-1", "bank", "bob", 3),  # two more callers': bob's turn is busy, so
    TransferRequest("mailbox-2", "bank", "bob", 4),  # these two are started in the mailboxes
]


@pytest.mark.parametrize(("inject", "durable"), [
    (_interrupt_taking_turns, set()),
    (_interrupt_entering_decide_all, set()),
    (_interrupt_once_decide_all_returns, {"own", "in-turn"}),
    (_interrupt_giving_back_turns(after=False), {"own", "in-turn"}),
    (_interrupt_giving_back_turns(after=True), {"own", "in-turn"}),
    (_interrupt_after_the_first_mailbox_start, {"own", "in-turn", "mailbox-1"}),
], ids=["taking-turns", "entering-decide-all", "after-decide-all", "giving-back-turns-before",
        "giving-back-turns-after", "between-mailbox-starts"])
def test_an_interrupt_in_a_combining_round_answers_each_of_its_tickets_promptly_and_lets_go_of_everything(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, inject: Inject, durable: set[str]
) -> None:
    """A round of four callers' tickets: two decided in turn, two left for the mailboxes (the
    destination's turn is busy). An interrupt lands in the round outside the decisions. The
    ticket decided (or started) before it is answered with its durable outcome; every other
    fails at once with `LedgerUnavailable`, nothing written for it. Every permit comes back,
    every turn the round took is given back (the next transfers on those accounts go
    through), and after reopening the books add up and the ledger verifies whole."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        coordinator = ledger._coordinator
        admission, claims = coordinator.admission, coordinator.claims
        busy = take_turns(coordinator, ["bob"])  # someone else holds bob's turn
        assert busy is not None and "bob" in busy
        tickets = _claimed(ledger, ROUND)
        inject(ledger, monkeypatch)
        try:
            with pytest.raises(KeyboardInterrupt):
                coordinator.combiner.combine(tickets)
        finally:
            give_back_turns(coordinator, busy)
        assert not coordinator.combiner.combining
        for ticket in tickets:
            tid = ticket.request.id
            assert ticket.wait(PROMPT_S), f"{tid} has no outcome"
            if tid in durable:
                assert ticket.error is None and isinstance(ticket.value, Transfer), (tid, ticket.error)
            else:
                assert isinstance(ticket.error, LedgerUnavailable), (tid, ticket.error)
        claims.release_many(tickets)  # as their callers do once answered
        assert claims.in_flight() == []
        assert admission.in_flight == 0
        for name in ("alice", "bob", "carol"):  # every turn is back: each goes through at once
            assert isinstance(ledger.transfer(f"later-{name}", source="bank", destination=name, amount=1), Transfer)
        assert admission.in_flight == 0
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as reopened:
        for request in ROUND:
            assert (reopened.get_transfer(request.id) is not None) == (request.id in durable), request.id
            if request.id not in durable:  # nothing was written: a retry runs afresh
                assert isinstance(reopened.transfer(request.id, source=request.source,
                                                    destination=request.destination, amount=request.amount), Transfer)
        balances = {name: reopened.balance(name).posted for name in ("bank", "alice", "bob", "carol")}
        assert sum(balances.values()) == 0, balances
        assert balances["alice"] == 5 + 1 and balances["carol"] == 7 + 1 and balances["bob"] == 3 + 4 + 1
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_another_callers_transfer_in_an_interrupted_round_fails_at_once_instead_of_timing_out(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The main thread combines; another caller's transfer queues behind its first round and
    makes the next one, which an interrupt ends while it takes the turns. The other caller
    is told at once that nothing was written (`LedgerUnavailable`), not `LedgerTimeout` after
    the ledger's whole timeout, and a retry of its transfer goes through."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        coordinator, directory = ledger._coordinator, ledger._directory
        combiner = coordinator.combiner
        queued = threading.Event()
        outcome: list[Transfer | LedgerError] = []

        def other_caller() -> None:
            try:
                outcome.append(ledger.transfer("theirs", source="bank", destination="bob", amount=3))
            except LedgerError as error:
                outcome.append(error)

        other = threading.Thread(target=other_caller)
        real_combine, real_take = combiner.combine, directory.take_turns

        def combine(tickets: list[Any], inline: bool = True) -> bool:
            alone = real_combine(tickets, inline)
            if threading.current_thread() is other:
                queued.set()  # it joined the main thread's rounds
            return alone

        rounds: list[int] = []

        def take(*args: Any, **kwargs: Any) -> Any:
            rounds.append(1)
            if len(rounds) == 1:  # the main thread's own round: the other caller queues behind it
                other.start()
                assert queued.wait(WAIT_S)
            elif len(rounds) == 2:  # the other caller's round
                raise KeyboardInterrupt
            return real_take(*args, **kwargs)

        monkeypatch.setattr(combiner, "combine", combine)
        monkeypatch.setattr(directory, "take_turns", take)
        with pytest.raises(KeyboardInterrupt):
            ledger.transfer("mine", source="bank", destination="alice", amount=5)
        other.join(TIMEOUT_S + WAIT_S)
        assert not other.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], LedgerUnavailable), outcome
        assert coordinator.admission.in_flight == 0
        assert isinstance(ledger.transfer("theirs", source="bank", destination="bob", amount=3), Transfer)
        assert ledger.balance("bob").posted == 3
    assert verify(str(ledger_path))["verdict"] == "whole"


def _lane_paused_mid_group(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Make the lane's runner stop between its first two chunks, the group's turns held (so
    it adopts the rounds handed to it), until `go` is set; `mid` is set once it stops."""
    mid, go = threading.Event(), threading.Event()
    real = _lane.decide_all

    def pausing(coordinator: Any, tickets: list[Any], turns: Any, wake_writer: bool = True,
                between_chunks: Callable[[], None] | None = None,
                chunk_requests: Callable[[], int] | None = None) -> list[Any]:
        assert between_chunks is not None
        first = [True]

        def between() -> None:
            if first[0]:
                first[0] = False
                mid.set()
                assert go.wait(WAIT_S)
            between_chunks()

        return real(coordinator, tickets, turns, wake_writer, between, chunk_requests)

    monkeypatch.setattr(_lane, "decide_all", pausing)
    return mid, go


@pytest.mark.parametrize("took", [False, True], ids=["before-it-took-them", "after-it-took-them"])
def test_an_interrupt_handing_a_round_to_the_lane_fails_it_only_if_the_lane_did_not_take_it(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch, took: bool
) -> None:
    """A group of batches holds its turns, so the combiner hands its round to the lane
    (`Lane.adopt`); an interrupt lands in that hand-over. If the lane took the round, its
    runner decides it (durable outcomes: failing them would let a retry decide them twice);
    if not, every ticket fails at once with `LedgerUnavailable`. Either way every permit
    comes back and the books add up."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        ledger.transfer("fund", source="bank", destination="alice", amount=10_000)
        coordinator = ledger._coordinator
        lane = coordinator.lane
        mid, go = _lane_paused_mid_group(monkeypatch)
        out: list[Any] = []
        batch = threading.Thread(target=lambda: out.append(ledger.transfer_many(
            [TransferRequest(f"m-{k}", "alice", "bob", 1) for k in range(CHUNK_REQUESTS_MAX + 1)])))
        batch.start()
        try:
            assert mid.wait(WAIT_S)
            tickets = _claimed(ledger, ROUND[:2])
            real_adopt = lane.adopt

            def interrupted(handed: list[Any]) -> bool:
                monkeypatch.setattr(lane, "adopt", real_adopt)
                if took:
                    assert real_adopt(handed)
                raise KeyboardInterrupt

            monkeypatch.setattr(lane, "adopt", interrupted)
            with pytest.raises(KeyboardInterrupt):
                coordinator.combiner.combine(tickets)
            if not took:  # failed at once, while the runner still waits
                assert all(isinstance(ticket.error, LedgerUnavailable) for ticket in tickets)
        finally:
            go.set()
            batch.join(WAIT_S)
        assert not batch.is_alive() and all(type(result) is Transfer for result in out[0])
        for ticket in tickets:
            assert ticket.wait(PROMPT_S), f"{ticket.request.id} has no outcome"
            if took:
                assert ticket.error is None and isinstance(ticket.value, Transfer), ticket.error
            else:
                assert isinstance(ticket.error, LedgerUnavailable), ticket.error
        coordinator.claims.release_many(tickets)
        assert coordinator.claims.in_flight() == []
        assert coordinator.admission.in_flight == 0
        assert isinstance(ledger.transfer("later", source="bank", destination="alice", amount=1), Transfer)
        balances = {name: ledger.balance(name).posted for name in ("bank", "alice", "bob", "carol")}
        assert sum(balances.values()) == 0, balances
        assert balances["carol"] == (7 if took else 0)
    assert verify(str(ledger_path))["verdict"] == "whole"


# --- found by the second review: permits, the lane, appends queued before the interrupt ----------


def test_a_permit_goes_back_once_when_an_interrupt_lands_between_two_permit_returns(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interrupt comes right after the round's first permit went back: the handler gives
    back the others, and the first not a second time (`Coordinator.decided` is once a ticket)."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        coordinator = ledger._coordinator
        admission = coordinator.admission
        admission.admit(1, TIMEOUT_S)  # a permit someone else holds meanwhile: it must stay taken
        busy = take_turns(coordinator, ["bob"])
        tickets = _claimed(ledger, ROUND)
        real = coordinator.decided
        returned: list[str] = []

        def decided_then_interrupted(ticket: Any) -> None:
            real(ticket)
            returned.append(ticket.request.id)
            if len(returned) == 1:
                raise KeyboardInterrupt

        monkeypatch.setattr(coordinator, "decided", decided_then_interrupted)
        try:
            with pytest.raises(KeyboardInterrupt):
                coordinator.combiner.combine(tickets)
        finally:
            give_back_turns(coordinator, busy)
        assert admission.in_flight == 1, returned
        admission.release(1)


def test_an_interrupt_between_two_chunks_of_a_batch_gives_its_permits_back_and_fails_the_rest(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The main thread runs `transfer_many` (it is the lane's runner); the interrupt lands
    between two chunks. The first chunk is durable, the rest failed, and every permit is back:
    the next batch goes through."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        ledger.transfer("fund", source="bank", destination="alice", amount=10_000)
        coordinator = ledger._coordinator
        real = _lane.decide_all

        def interrupting(coordinator: Any, tickets: list[Any], turns: Any, wake_writer: bool = True,
                         between_chunks: Any = None, chunk_requests: Any = None) -> list[Any]:
            def between() -> None:
                raise KeyboardInterrupt

            return real(coordinator, tickets, turns, wake_writer, between, chunk_requests)

        monkeypatch.setattr(_lane, "decide_all", interrupting)
        requests = [TransferRequest(f"m-{k}", "alice", "bob", 1) for k in range(CHUNK_REQUESTS_MAX + 1)]
        with pytest.raises(KeyboardInterrupt):
            ledger.transfer_many(requests)
        monkeypatch.setattr(_lane, "decide_all", real)
        assert coordinator.admission.in_flight == 0
        outcomes = ledger.transfer_many(requests)  # the first chunk's answered as before, the last afresh
        assert all(isinstance(outcome, Transfer) for outcome in outcomes), outcomes
        assert ledger.balance("bob").posted == len(requests)
    assert verify(str(ledger_path))["verdict"] == "whole"


def _queued_then_interrupted(ledger: Ledger, wanted: Callable[[dict[str, Any]], bool] = lambda kwargs: True) -> None:
    """The journal's next append (one `wanted` of its keyword arguments) queues its records,
    then an interrupt comes out of it."""
    journal = ledger._journal
    real = journal.append_block

    def append_block(*args: Any, **kwargs: Any) -> int:
        if not wanted(kwargs):
            return real(*args, **kwargs)
        journal.append_block = real  # type: ignore[method-assign]  # once
        real(*args, **kwargs)
        raise KeyboardInterrupt

    journal.append_block = append_block  # type: ignore[method-assign]


def test_an_interrupt_after_a_mailbox_decisions_record_was_queued_stops_writes(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A post decided in the mailbox path on the caller's thread (the turns are busy); the
    interrupt comes once its record is queued. Memory never entered it: writes stop (before,
    a void of the same pending transfer was journaled too, and the ledger did not reopen)."""
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S)
    try:
        _accounts(ledger)
        ledger.transfer("p", source="bank", destination="alice", amount=10, pending=True)
        directory = ledger._directory
        real_take = directory.take_turns
        monkeypatch.setattr(directory, "take_turns", lambda *args, **kwargs: {})  # busy: the mailbox path
        _queued_then_interrupted(ledger)
        with pytest.raises(KeyboardInterrupt):
            ledger.post_pending("post-1", pending_id="p")
        monkeypatch.setattr(directory, "take_turns", real_take)
        with pytest.raises(LedgerUnavailable):
            ledger.void_pending("void-1", pending_id="p")
    finally:
        ledger.close()
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as reopened:
        # Durable or not (the writer may have committed it before writes stopped): never both
        # the post and the void, and the books agree with what is there.
        posted = reopened.get_transfer("post-1") is not None
        assert reopened.get_transfer("void-1") is None
        assert reopened.get_transfer("p").status == ("posted" if posted else "pending")  # type: ignore[union-attr]
        assert reopened.balance("alice").posted == (10 if posted else 0)
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_an_interrupt_after_a_checkpoint_was_queued_stops_writes(ledger_path: Path) -> None:
    """A chunk's append makes a checkpoint due; the interrupt comes once the checkpoint is
    queued. What it counts and carries never happened in memory: writes stop (before, the
    ledger went on and the next checkpoint's counts did not reopen)."""
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S, checkpoint_interval=4)
    try:
        _accounts(ledger)
        _queued_then_interrupted(ledger, lambda kwargs: "behind" in kwargs)  # a checkpoint's append
        made = 0
        with pytest.raises(KeyboardInterrupt):
            for made in range(20):
                ledger.transfer(f"t-{made}", source="bank", destination="alice", amount=1)
        with pytest.raises(LedgerUnavailable):
            ledger.transfer("u-0", source="bank", destination="bob", amount=1)
    finally:
        ledger.close()
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as reopened:
        last = reopened.get_transfer(f"t-{made}") is not None  # queued before writes stopped: either
        assert reopened.balance("alice").posted == made + last
        assert reopened.get_transfer("u-0") is None
    assert verify(str(ledger_path))["verdict"] == "whole"
