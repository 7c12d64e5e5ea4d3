"""Interrupts (a `KeyboardInterrupt` landing in the main thread while it decides or journals for
everyone) at the points a second review found: each test failed on ec43e75. See
ARCHITECTURE.md, "What is durable when", for what an interrupt does and the windows left."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from coordinator import _combiner, _lane, _sequencer
from coordinator._lane import TurnBatch
from engine import Ledger, LedgerError, LedgerUnavailable, TransferRequest
from engine._tools_audit import verify
from support import interrupt_after

TIMEOUT_S = 3.0


def _accounts(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("alice", "bob", "carol"):
        ledger.create_account(name, currency="USD")


def _interrupt_at(monkeypatch: pytest.MonkeyPatch, point: str) -> None:
    """The sequencer's next pass through the crash point `point` raises an interrupt, once."""
    real = _sequencer.crash_point

    def crash_point(name: str) -> None:
        if name == point:
            monkeypatch.setattr(_sequencer, "crash_point", real)
            raise KeyboardInterrupt

    monkeypatch.setattr(_sequencer, "crash_point", crash_point)


def test_an_interrupt_deciding_a_transfer_adopted_after_the_last_chunk_gives_the_groups_permits_back(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A single transfer is adopted while a one-chunk batch holds its turns; the runner decides
    it after the last chunk (`_decide_group`'s finally) and the interrupt lands there."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        coordinator = ledger._coordinator
        real_lane_decide_all = _lane.decide_all
        real_combiner_decide_all = _combiner.decide_all

        def adopting(coordinator: Any, tickets: Any, turns: Any, wake_writer: bool = True,
                     between_chunks: Any = None, chunk_requests: Any = None) -> Any:
            single, _ = coordinator.claims.claim(TransferRequest("single", "bank", "carol", 1), relayed=True)
            coordinator.admission.admit(1, TIMEOUT_S)
            assert coordinator.lane.adopt([single])  # another caller's transfer, handed to the runner

            def interrupted(*args: Any, **kwargs: Any) -> Any:  # the interrupt lands deciding it
                monkeypatch.setattr(_combiner, "decide_all", real_combiner_decide_all)
                raise KeyboardInterrupt

            monkeypatch.setattr(_combiner, "decide_all", interrupted)
            return real_lane_decide_all(coordinator, tickets, turns, wake_writer, between_chunks, chunk_requests)

        monkeypatch.setattr(_lane, "decide_all", adopting)
        requests = [TransferRequest(f"m-{k}", "bank", "bob", 1) for k in range(10)]
        with pytest.raises(KeyboardInterrupt):
            ledger.transfer_many(requests)
        monkeypatch.setattr(_lane, "decide_all", real_lane_decide_all)
        assert coordinator.admission.in_flight == 0, coordinator.admission.in_flight


def test_an_interrupt_claiming_a_groups_batch_answers_the_other_owner_with_an_error(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two batches in one group: another caller's (queued first) and the runner's. The interrupt
    lands as the runner claims the first one's ids: the other owner's batch is never claimed."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        coordinator = ledger._coordinator
        other = TurnBatch(coordinator, [TransferRequest("o-1", "bank", "alice", 1)], TIMEOUT_S)
        # what `TurnBatch.run` does before `lane.decide`, for a caller on another thread
        other.valid, other.names, other.permits = [0], ["bank", "alice"], 1
        coordinator.admission.admit(1, TIMEOUT_S)
        coordinator.lane._queue.append(other)
        real = coordinator.claims.claim_many

        def claim_many(*args: Any, **kwargs: Any) -> Any:
            monkeypatch.setattr(coordinator.claims, "claim_many", real)
            raise KeyboardInterrupt

        monkeypatch.setattr(coordinator.claims, "claim_many", claim_many)
        with pytest.raises(KeyboardInterrupt):
            ledger.transfer_many([TransferRequest("r-1", "bank", "bob", 1)])
        assert other.decided and other.failure is None and not other.fell_back
        # what the other owner does once `lane.decide` returns (`TurnBatch.run`)
        results = other._settle()
        assert isinstance(results[0], LedgerError), results


def test_an_interrupt_before_a_mailbox_decisions_record_is_queued_fails_it_and_stops_writes(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A post decided in the mailbox path on the caller's thread (`_decide_now`); the interrupt
    comes out of the append before it queued anything. Nothing was written: the ticket should
    fail (LedgerUnavailable) and a retry of its id run afresh."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        ledger.transfer("p", source="bank", destination="alice", amount=10, pending=True)
        directory, journal = ledger._directory, ledger._journal
        real_take, real_append = directory.take_turns, journal.append_block
        monkeypatch.setattr(directory, "take_turns", lambda *args, **kwargs: {})  # busy: the mailbox path

        def append_block(*args: Any, **kwargs: Any) -> int:
            journal.append_block = real_append  # type: ignore[method-assign]
            raise KeyboardInterrupt  # before queuing

        journal.append_block = append_block  # type: ignore[method-assign]
        claims = ledger._coordinator.claims
        with pytest.raises(KeyboardInterrupt):
            ledger.post_pending("post-1", pending_id="p")
        monkeypatch.setattr(directory, "take_turns", real_take)
        stuck = [t for t in claims.in_flight() if t.request.id == "post-1"]
        assert not stuck, ("post-1 still claimed, resolved:", [t.done for t in stuck])
        with pytest.raises(LedgerUnavailable):  # an interrupt mid-append: memory is not trusted, writes stop
            ledger.post_pending("post-1", pending_id="p")


def test_an_interrupt_right_after_an_expiry_was_queued_stops_writes(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`expire_pending` on the main thread; the interrupt lands once the expiry record is queued,
    before memory follows it (at `crash_point("during-expiry")`). Writes should stop; they do
    not, and the next checkpoint journals the expired transfer as open."""
    now = [1_700_000_000_000_000_000]
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S, clock_ns=lambda: now[0], checkpoint_interval=4)
    try:
        _accounts(ledger)
        ledger.transfer("p", source="bank", destination="alice", amount=10, pending=True, timeout_s=1)
        now[0] += 5_000_000_000
        _interrupt_at(monkeypatch, "during-expiry")
        with pytest.raises(KeyboardInterrupt):
            ledger.expire_pending()
        with pytest.raises(LedgerUnavailable):  # before, they went on, a checkpoint among them
            ledger.transfer("t-0", source="bank", destination="bob", amount=1)
    finally:
        ledger.close()
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S, clock_ns=lambda: now[0]) as reopened:
        assert reopened.get_transfer("p").status in ("pending", "expired")  # type: ignore[union-attr]
    assert verify(str(ledger_path))["verdict"] == "whole"


@pytest.mark.parametrize("interrupted", [True, False], ids=["interrupted", "control"])
def test_an_interrupt_right_after_a_checkpoint_was_queued_stops_writes(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch, interrupted: bool) -> None:
    """The interrupt lands once a checkpoint is queued and carried, before `CheckpointRows.journaled` counts it
    (at `crash_point("during-checkpoint")`). Before, the next checkpoint named the one before as
    its previous and left out what changed in between: the account changed then reopened stale.
    Now writes stop. The control runs the same without the interrupt."""
    from engine import Account
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S, checkpoint_interval=1_000_000)
    try:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_accounts([Account(f"a{k:05}", currency="USD", overdraft_limit=0) for k in range(3_000)])
        sequencer = ledger._sequencer

        def checkpoint_with(tid: str, destination: str) -> None:  # a transfer whose append makes one due
            sequencer._since_checkpoint = sequencer.checkpoint_interval
            ledger.transfer(tid, source="bank", destination=destination, amount=1)

        checkpoint_with("t-0", "a00000")  # N-1
        _, total, sweep_next = sequencer.rows.last
        x = sequencer.rows.ids[(sweep_next + 2_000) % total]  # in no sweep of the next two
        ledger.transfer("x", source="bank", destination=x, amount=5)  # changes between N-1 and N
        if interrupted:
            _interrupt_at(monkeypatch, "during-checkpoint")
            with pytest.raises(KeyboardInterrupt):
                checkpoint_with("t-1", "a00001")  # N, interrupted once queued
            before = ledger.balance(x).posted
            with pytest.raises(LedgerUnavailable):  # before, N+1 was journaled naming N-1 as its previous
                checkpoint_with("t-2", "a00002")
        else:
            checkpoint_with("t-1", "a00001")  # N
            before = ledger.balance(x).posted
            checkpoint_with("t-2", "a00002")  # N+1
            ledger._journal.wait_durable(ledger._journal.last_lsn, TIMEOUT_S)
    finally:
        ledger.close()
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as reopened:
        assert reopened.balance(x).posted == before == 5
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_an_interrupt_after_a_records_entries_went_to_memory_stops_writes(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A post in the mailbox path (`_decide_now`); the interrupt lands in `Sequencer._append`
    after `unindexed.add` and before its `try` (say in the `journal.last_lsn` property): the
    record is not queued, writes go on, and its entries stay in memory for the next record
    at that LSN, then go into the entry index with the next checkpoint."""
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S, checkpoint_interval=1_000_000)
    try:
        _accounts(ledger)
        ledger.transfer("p", source="bank", destination="alice", amount=10, pending=True)
        directory, sequencer = ledger._directory, ledger._sequencer
        real_take = directory.take_turns
        monkeypatch.setattr(directory, "take_turns", lambda *args, **kwargs: {})  # busy: the mailbox path
        unindexed = sequencer.unindexed
        cls = type(unindexed)
        real_add = cls.add

        def add(self: Any, *args: Any) -> None:
            real_add(self, *args)
            if self is unindexed:
                monkeypatch.setattr(cls, "add", real_add)
                raise KeyboardInterrupt

        monkeypatch.setattr(cls, "add", add)
        with pytest.raises(KeyboardInterrupt):
            ledger.post_pending("post-1", pending_id="p", amount=None)
        monkeypatch.setattr(directory, "take_turns", real_take)
        with pytest.raises(LedgerUnavailable):  # before, it took the LSN the post never got, and went on
            ledger.void_pending("void-1", pending_id="p")
    finally:
        ledger.close()
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_an_interrupt_in_the_message_passing_batch_starts_nothing_more_and_gives_back_what_it_never_started(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`transfer_many` falls back to `Batch` (turns busy); the interrupt lands as the caller's
    thread claims its second transfer. Nothing more starts, the permits of what never started
    go back (the one whose claim the interrupt cut stays taken: the window it landed in), the
    first transfer is decided and durable, and the others can be sent again."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        _accounts(ledger)
        coordinator = ledger._coordinator
        monkeypatch.setattr(_lane, "take_turns", lambda *args, **kwargs: None)  # busy: `Batch`
        real = coordinator.claims.claim
        calls = []

        def claim(*args: Any, **kwargs: Any) -> Any:  # the interrupt lands as the pump claims the second
            calls.append(1)
            if len(calls) == 2:
                monkeypatch.setattr(coordinator.claims, "claim", real)
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(coordinator.claims, "claim", claim)
        requests = [TransferRequest(f"b-{k}", "bank", "bob", 1) for k in range(5)]
        with pytest.raises(KeyboardInterrupt):
            ledger.transfer_many(requests)
        deadline = time.monotonic() + TIMEOUT_S
        while ledger.get_transfer("b-0") is None or coordinator.admission.in_flight > 1:  # b-0 is decided elsewhere
            assert time.monotonic() < deadline, coordinator.admission.in_flight
            time.sleep(0.01)
        assert coordinator.admission.in_flight == 1  # b-1's: the interrupt cut its claim
        monkeypatch.undo()
        assert [outcome.id for outcome in ledger.transfer_many(requests)] == [request.id for request in requests]  # type: ignore[union-attr]
        assert ledger.balance("bob").posted == 5


def test_an_interrupt_between_a_mailbox_decisions_stamp_and_its_append_stops_writes(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A post decided in the mailbox path; the interrupt lands right after its stamp, before the
    append. Before, the counts the stamp moved stayed, writes went on and the next checkpoint
    disagreed with the records; and the post's id stayed claimed. Now writes stop, the post
    fails, and the books reopen whole."""
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S)
    try:
        _accounts(ledger)
        ledger.transfer("p", source="bank", destination="alice", amount=10, pending=True)
        sequencer, directory = ledger._sequencer, ledger._directory
        monkeypatch.setattr(directory, "take_turns", lambda *args, **kwargs: {})  # busy: the mailbox path
        interrupt_after(monkeypatch, sequencer, "stamp")
        with pytest.raises(KeyboardInterrupt):
            ledger.post_pending("post-1", pending_id="p")
        monkeypatch.undo()
        assert not [ticket for ticket in ledger._coordinator.claims.in_flight() if ticket.request.id == "post-1"]
        with pytest.raises(LedgerUnavailable):
            ledger.transfer("t-1", source="bank", destination="alice", amount=1)
    finally:
        ledger.close()
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as reopened:
        assert reopened.get_transfer("post-1") is None and reopened.get_transfer("p").status == "pending"  # type: ignore[union-attr]
    assert verify(str(ledger_path))["verdict"] == "whole"
