"""The in-turn decision paths: a batch, or combined single transfers, decided by the thread
holding their accounts' turns; and how they fail."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

import pytest

from coordinator import Resolution, _combiner
from coordinator._taking import give_back_turns, take_turns
from coordinator._turns import decide_in_turn
from coordinator._limits import CHUNK_REQUESTS_MAX
from coordinator._sequencer import Sequencer
from coordinator._values import Metadata, stamped_transfer
from engine import (
    Balance,
    BalanceOverflow,
    InsufficientFunds,
    Ledger,
    LedgerError,
    LedgerUnavailable,
    Transfer,
    TransferRequest,
)
from engine import _directory
from engine._runtime import Dispatcher
from engine._tools_audit import verify
from journal import JournalTimeoutError
from support import wait_until
from tests.test_runtime import Log, Recorder

WAIT_S = 10.0
AMOUNT_MAX = 2**63 - 1


def gapless(ledger: Ledger, account: str) -> bool:
    entries = ledger.entries(account)
    return [entry.seq for entry in entries] == list(range(1, len(entries) + 1)) and all(
        later.balance == earlier.balance + later.amount for earlier, later in zip(entries, entries[1:], strict=False)
    )


def test_drain_only_handles_one_kind_in_order_and_leaves_the_rest_queued_in_order() -> None:
    dispatcher = Dispatcher(1)
    try:
        log = Log(expected=6)
        ref = Recorder.spawn(dispatcher, log)
        inbox: Any = ref.actor_inbox
        assert inbox.try_take_turn()
        for message in (1, "a", 2, "b", 3, "c"):
            assert not inbox.put_deferred(message)  # the turn is held here: nothing runs
        inbox.drain_only(int)
        assert log.seen == [1, 2, 3]
        inbox.give_back_turn()  # the rest goes to the dispatcher
        assert log.all_seen.wait(WAIT_S)
        assert log.seen == [1, 2, 3, "a", "b", "c"]
        assert log.overlaps == 0
    finally:
        dispatcher.stop()


def test_a_batch_sees_each_earlier_request_of_the_batch(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "b", "c"):
        ledger.create_account(name, currency="USD")
    results = ledger.transfer_many([
        TransferRequest("1", "bank", "a", 10),
        TransferRequest("2", "a", "b", 10),  # only possible after 1
        TransferRequest("3", "a", "c", 1),  # a is empty again
        TransferRequest("4", "b", "c", 4),
    ])
    assert [type(result) for result in results] == [Transfer, Transfer, InsufficientFunds, Transfer]
    assert [ledger.balance(name).posted for name in ("a", "b", "c")] == [0, 6, 4]
    assert all(gapless(ledger, name) for name in ("bank", "a", "b", "c"))


def test_a_batch_longer_than_a_chunk_is_decided_in_order_across_chunks(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.create_account("b", currency="USD")
    count = CHUNK_REQUESTS_MAX * 2 + 3
    # Ping-pong one unit: every request depends on the one before it.
    requests = [TransferRequest("seed", "bank", "a", 1)] + [
        TransferRequest(f"p{n}", ("a", "b")[n % 2], ("b", "a")[n % 2], 1) for n in range(count)
    ]
    results = ledger.transfer_many(requests)
    assert all(isinstance(result, Transfer) for result in results)
    assert [result.lsn for result in results] == sorted({result.lsn for result in results})
    assert ledger.balance("a").posted + ledger.balance("b").posted == 1
    assert len(ledger.entries("a")) == count + 1
    assert gapless(ledger, "a") and gapless(ledger, "b")


def test_a_credit_past_the_maximum_in_a_batch_is_refused_and_leaves_the_funds(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("big", currency="USD")
    ledger.create_account("bank2", currency="USD", overdraft_limit=None)
    ledger.create_account("small", currency="USD")
    ledger.transfer("fill", source="bank", destination="big", amount=AMOUNT_MAX)
    ledger.transfer("fund", source="bank2", destination="small", amount=5)
    results = ledger.transfer_many([
        TransferRequest("over", "small", "big", 1),
        TransferRequest("after", "small", "bank2", 5),  # needs the funds "over" did not take
    ])
    assert isinstance(results[0], BalanceOverflow)
    assert isinstance(results[1], Transfer)
    assert ledger.balance("small") == Balance(0, 0, 0)
    assert ledger.balance("big") == Balance(AMOUNT_MAX, 0, AMOUNT_MAX)
    with pytest.raises(BalanceOverflow):  # the refusal consumed the id
        ledger.transfer("over", source="small", destination="big", amount=1)


@pytest.mark.parametrize("decided", ["a single transfer", "a chain (Sequencer.stamp_chain)"])
def test_entries_committed_meanwhile_to_an_account_in_turn_are_applied_before_it_decides(
        ledger: Ledger, decided: str) -> None:
    """A concurrent transfer credits an account whose turn the batch holds: the entry waits
    in its mailbox, and the batch applies it before deciding a debit that needs it (a chain's
    first leg spends it, its second passes it on)."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "b", "c", "d"):
        ledger.create_account(name, currency="USD")
    ledger.transfer("fund-c", source="bank", destination="c", amount=7)
    coordinator = ledger._coordinator
    turns = take_turns(coordinator, ["a", "b", "d"])
    assert turns is not None
    chain = decided != "a single transfer"
    try:
        credited: list[Transfer] = []
        crediting = threading.Thread(
            target=lambda: credited.append(ledger.transfer("credit", source="c", destination="a", amount=7))
        )
        crediting.start()
        crediting.join(WAIT_S)
        assert credited  # durable, while a's entry still waits in a's mailbox
        if chain:
            ticket: Any = coordinator.claims.claim_chain((TransferRequest("spend", "a", "b", 7),
                                                          TransferRequest("onward", "b", "d", 7)))
        else:
            ticket, fresh = coordinator.claims.claim(TransferRequest("spend", "a", "b", 7))
            assert fresh
        decide_in_turn(coordinator, [ticket], turns)
    finally:
        give_back_turns(coordinator, turns)
    assert ticket.wait(WAIT_S)
    made = list(ticket.value) if chain else [ticket.value]
    assert all(isinstance(transfer, Transfer) for transfer in made)
    assert [transfer.id for transfer in made] == (["spend", "onward"] if chain else ["spend"])
    coordinator.claims.release(ticket)
    assert [ledger.balance(name).posted for name in ("a", "b", "c", "d")] == ([0, 0, 0, 7] if chain else [0, 7, 0, 0])
    assert [entry.transfer_id for entry in ledger.entries("a")] == ["credit", "spend"]
    assert [entry.transfer_id for entry in ledger.entries("b")] == (["spend", "onward"] if chain else ["spend"])
    assert all(gapless(ledger, name) for name in ("a", "b", "d"))


def test_a_pending_transfer_and_posts_in_turn_apply_what_waits_in_their_accounts_mailboxes_first(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the test holds the turns of "a" and "b" (as a batch would), credits to both and a
    pending transfer toward "b" are decided in the mailboxes: their postings (entries, a hold)
    wait in those mailboxes. Then, in turn, on their own paths (`Sequencer.stamp_pending` and
    `stamp_resolution`, not the generic `stamp`): a pending transfer a -> b of all that "a"
    has available (the credit included), the post of an earlier pending transfer a -> b (its
    entries follow the credits' on both accounts) and the post of the one toward "b". Each
    account applies what waits first, so every entry follows the one before it, and the books
    reopen and verify whole."""
    ledger = Ledger.open(ledger_path)
    try:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in ("a", "b", "c"):
            ledger.create_account(name, currency="USD")
        ledger.transfer("fund-c", source="bank", destination="c", amount=20)
        ledger.transfer("fund-a", source="bank", destination="a", amount=10)
        ledger.transfer("p-ab", source="a", destination="b", amount=4, pending=True)
        coordinator = ledger._coordinator
        sequencer = coordinator.sequencer
        paths: list[str] = []
        for name in ("stamp", "stamp_pending", "stamp_resolution"):
            real = getattr(sequencer, name)
            monkeypatch.setattr(sequencer, name, lambda *args, _real=real, _name=name, **kwargs: (
                paths.append(_name), _real(*args, **kwargs))[1])
        turns = take_turns(coordinator, ["a", "b"])
        assert turns is not None
        try:
            done: list[Transfer] = []
            meanwhile = threading.Thread(target=lambda: done.extend([
                ledger.transfer("credit-a", source="c", destination="a", amount=7),
                ledger.transfer("credit-b", source="c", destination="b", amount=3),
                ledger.transfer("p-cb", source="c", destination="b", amount=5, pending=True),
            ]))
            meanwhile.start()
            meanwhile.join(WAIT_S)
            assert len(done) == 3  # durable, their postings to "a" and "b" still in the mailboxes
            assert (turns["a"].state[:2], turns["b"].state[:2], turns["b"].incoming) == ((1, 10), (0, 0), 4)
            more = take_turns(coordinator, ["c"], wait_s=WAIT_S)  # once "c" has handled its own postings
            assert more is not None
            paths.clear()
            try:
                requests = [TransferRequest("hold", "a", "b", 13, pending=True), Resolution("post-ab", "p-ab"),
                            Resolution("post-cb", "p-cb")]
                tickets = [coordinator.claims.claim(request)[0] for request in requests]
                assert decide_in_turn(coordinator, tickets, {**turns, **more}) == []  # type: ignore[arg-type]
            finally:
                give_back_turns(coordinator, more)
        finally:
            give_back_turns(coordinator, turns)
        assert paths == ["stamp_pending", "stamp_resolution", "stamp_resolution"]
        for ticket in tickets:
            assert ticket.wait(WAIT_S) and isinstance(ticket.value, Transfer), ticket.value
            coordinator.claims.release(ticket)
        assert ledger.balance("a") == Balance(13, 13, 0, 0)
        assert ledger.balance("b") == Balance(12, 0, 12, 13)
        assert ledger.balance("c") == Balance(5, 0, 5, 0)
        assert [entry.transfer_id for entry in ledger.entries("b")] == ["credit-b", "post-ab", "post-cb"]
        assert all(gapless(ledger, name) for name in ("a", "b", "c"))
        expected = ledger.state_hash()
    finally:
        ledger.close()
    assert verify(str(ledger_path))["verdict"] == "whole"
    with Ledger.open(ledger_path) as reopened:
        assert reopened.state_hash() == expected
        assert reopened.balance("a") == Balance(13, 13, 0, 0)


def test_the_id_filter_never_forgets_an_id_and_rarely_claims_a_new_one_seen() -> None:
    import random

    from coordinator._idfilter import IdFilter

    rng = random.Random(11)
    ids = list({rng.getrandbits(58) for _ in range(40_000)})  # enough to add a second layer
    seen = IdFilter()
    false_positives = sum(seen.check_and_add(h) for h in ids)
    assert len(seen._layers) > 1
    assert all(seen.might_contain(h) for h in ids)
    assert all(seen.check_and_add(h) for h in ids)  # again: every one is known, in every layer
    assert false_positives < len(ids) // 100  # about 0.5% a layer at 16 bits and 4 probes in one word


TIMEOUT_S = 3.0


def test_a_bug_in_the_combiners_in_turn_path_does_not_strand_later_transfers(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the combiner's in-turn path fails its own callers, never the transfers after it."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        real = _combiner.decide_all
        calls: list[int] = []

        def buggy_once(*args: object) -> list[object]:
            calls.append(1)
            if len(calls) == 1:
                raise AssertionError("stand-in for a failed check in decide_in_turn (e.g. _catch_up)")
            return real(*args)  # type: ignore[arg-type,return-value]

        monkeypatch.setattr(_combiner, "decide_all", buggy_once)
        with pytest.raises(Exception):  # noqa: B017 - whatever the first caller gets
            ledger.transfer("t-1", source="bank", destination="alice", amount=1)
        # The bug is gone; an unrelated transfer must go through.
        assert isinstance(ledger.transfer("t-2", source="bank", destination="alice", amount=1), Transfer)


def test_a_checkpoint_that_fails_after_a_chunk_is_appended_does_not_release_its_tickets_twice(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A chunk's records are queued before the checkpoint after them is tried: a checkpoint
    that cannot be queued must not fail those transfers, nor release their tickets twice."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")

        def journal_full(self: Sequencer) -> int:
            raise JournalTimeoutError("the journal writer is not keeping up")

        monkeypatch.setattr(Sequencer, "checkpoint", journal_full)
        ledger._sequencer.checkpoint_interval = 1
        outcome: object
        try:
            outcome = ledger.transfer_many([TransferRequest("c-1", "bank", "alice", 1)])
        except LedgerError as error:
            outcome = error
        monkeypatch.undo()
        ledger._sequencer.checkpoint_interval = 10**9
        # Whatever c-1's caller was told, the ledger must keep working afterwards.
        assert isinstance(ledger.transfer("c-2", source="bank", destination="alice", amount=1), Transfer)
        if isinstance(outcome, LedgerError):  # told it failed: then it must not have happened
            assert ledger.get_transfer("c-1") is None, "reported failed, yet committed"


def test_a_journal_that_fails_between_room_and_append_fails_the_chunk_and_every_later_call(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The accounts have applied the chunk when its append is refused: the ledger must then
    refuse to extend that state until reopened (which starts from the journal), and show
    only what the journal holds."""
    from journal import Journal

    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("before", source="bank", destination="alice", amount=10)
        real = Journal.append_block

        def fail_then_append(self: Journal, *block: Any) -> int:
            self._writer._fail([], OSError(5, "Input/output error"))  # type: ignore[union-attr]
            return real(self, *block)

        monkeypatch.setattr(Journal, "append_block", fail_then_append)
        with pytest.raises(LedgerUnavailable):
            ledger.transfer_many([TransferRequest(f"lost-{n}", "bank", "alice", 1) for n in range(3)])
        monkeypatch.undo()
        assert ledger.balance("alice") == Balance(10, 0, 10)
        assert [entry.transfer_id for entry in ledger.entries("alice")] == ["before"]
        with pytest.raises(LedgerUnavailable):
            ledger.transfer("after", source="bank", destination="alice", amount=1)
    with Ledger.open(ledger_path) as reopened:
        assert reopened.balance("alice") == Balance(10, 0, 10)
        assert [entry.transfer_id for entry in reopened.entries("alice")] == ["before"]


def test_a_batch_the_journal_had_no_room_for_can_be_retried_with_the_same_ids(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing was written for it, so its ids must not stay claimed by the failed attempt."""
    from journal import Journal

    with Ledger.open(ledger_path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        batch = [TransferRequest(f"x-{n}", "bank", "alice", 5) for n in range(3)]

        def no_room(self: Journal, records: int) -> None:
            raise JournalTimeoutError("the journal writer is not keeping up")

        monkeypatch.setattr(Journal, "wait_room", no_room)
        with pytest.raises(LedgerError):
            ledger.transfer_many(batch)
        monkeypatch.undo()
        assert ledger.balance("alice") == Balance(0, 0, 0)
        retried = ledger.transfer_many(batch)
        assert [type(outcome) for outcome in retried] == [Transfer] * 3
        assert ledger.transfer("x-0", source="bank", destination="alice", amount=5) == retried[0]
        assert ledger.balance("alice") == Balance(15, 0, 15)


def test_a_stamped_transfer_is_the_same_frozen_value_its_constructor_builds() -> None:
    fields = ("t-1", "bank", "alice", 10, 7, 123, 9, "order-1", Metadata({"k": 1}), "pending", None, "pending", 30)
    stamped = stamped_transfer(*fields)  # type: ignore[arg-type]

    assert stamped == Transfer(*fields)  # type: ignore[arg-type]
    assert hash(stamped) == hash(Transfer(*fields)) and repr(stamped).startswith("Transfer(")  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        stamped.amount = 11  # type: ignore[misc]


@pytest.mark.parametrize("stamping", ["stamp_pending", "stamp"])
@pytest.mark.parametrize("fault", [OSError("a bug in deciding"), KeyboardInterrupt()], ids=["bug", "interrupt"])
def test_a_bug_met_midway_through_a_chunk_stops_writes_and_reopening_rebuilds_from_the_journal(
    ledger_path: Path, fault: BaseException, stamping: str,
) -> None:
    """The first transfer of a combined chunk is stamped and applied in memory; deciding the
    second raises (here: a fault injected into its stamp: a bug, or an interrupt landing
    there): a pending transfer, on its own path, or a transfer with a code, on the generic
    one. Nothing of the chunk was journaled, so the ledger must not write on top of that
    memory: it refuses writes until reopened, and reopens as the journal has it."""
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S)
    try:
        for name in ("a", "b", "c"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        coordinator = ledger._coordinator
        second = (TransferRequest("p-2", "b", "c", 3, pending=True) if stamping == "stamp_pending"
                  else TransferRequest("p-2", "b", "c", 3, code=7))
        requests = [TransferRequest("t-1", "a", "b", 10), second]
        tickets = [coordinator.claims.claim(request, relayed=True)[0] for request in requests]
        coordinator.admission.admit(len(tickets), TIMEOUT_S)

        def stamp(*args: Any, **kwargs: Any) -> None:  # the second's (the plain one has its own)
            raise fault

        setattr(coordinator.sequencer, stamping, stamp)
        with pytest.raises(type(fault)):
            coordinator.combiner._start_in_turn(tickets)  # type: ignore[arg-type]
        assert all(isinstance(ticket.error, LedgerUnavailable) for ticket in tickets)  # type: ignore[union-attr]
        with pytest.raises(LedgerUnavailable):
            ledger.transfer("t-3", source="a", destination="b", amount=1)
    finally:
        ledger.close()
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as reopened:
        assert [reopened.balance(name).posted for name in ("a", "b", "c")] == [0, 0, 0]
        assert reopened.get_transfer("t-1") is None
        assert isinstance(reopened.transfer("t-1", source="a", destination="b", amount=10), Transfer)
    assert verify(str(ledger_path))["verdict"] == "whole"


@pytest.mark.parametrize("queued", [False, True], ids=["before-queued", "after-queued"])
def test_an_interrupt_in_a_chunks_append_stops_writes_unless_its_records_were_queued(
    ledger_path: Path, queued: bool,
) -> None:
    """An interrupt lands in the journal's append of a decided chunk. Before its records were
    queued, memory holds a transfer the journal never will: writes stop until reopened, and
    the journal is what reopens (a later transfer decided on that memory would have been
    journaled on balances the journal never had). After, the transfer is durable and the
    ledger goes on, its entries readable."""
    ledger = Ledger.open(ledger_path, timeout_s=TIMEOUT_S)
    try:
        for name in ("a", "b"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        journal = ledger._journal
        append_block = journal.append_block

        def interrupted(*args: Any, **kwargs: Any) -> int:
            journal.append_block = append_block  # type: ignore[method-assign]  # once
            if queued:
                append_block(*args, **kwargs)
            raise KeyboardInterrupt

        journal.append_block = interrupted  # type: ignore[method-assign]
        with pytest.raises(KeyboardInterrupt):
            ledger.transfer("t-1", source="a", destination="b", amount=10)
        if queued:
            assert wait_until(lambda: ledger.get_transfer("t-1") is not None)
            assert [entry.transfer_id for entry in ledger.entries("a")] == ["t-1"]
            assert isinstance(ledger.transfer("t-2", source="a", destination="b", amount=5), Transfer)
        else:
            with pytest.raises(LedgerUnavailable):
                ledger.transfer("t-2", source="a", destination="b", amount=5)
    finally:
        ledger.close()
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as reopened:
        assert reopened.balance("b").posted == (15 if queued else 0)
        assert (reopened.get_transfer("t-1") is not None) is queued
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_a_batch_waiting_for_a_busy_turn_holds_the_others_and_takes_it_once_given_back(ledger: Ledger) -> None:
    for name in ("a", "b"):
        ledger.create_account(name, currency="USD")
    coordinator = ledger._coordinator
    held = take_turns(coordinator, ["b"])  # someone else's turn on b
    assert held is not None and "b" in held
    taken: list[Any] = []
    waiter = threading.Thread(target=lambda: taken.append(take_turns(coordinator, ["a", "b"], WAIT_S)))
    waiter.start()
    try:
        # The waiter holds a's turn while it waits for b's: nobody else can take a's.
        assert wait_until(lambda: _turn_is_busy(coordinator, "a"))
        assert waiter.is_alive()
    finally:
        give_back_turns(coordinator, held)
    waiter.join(WAIT_S)
    assert not waiter.is_alive()
    turns = taken[0]
    assert turns is not None and set(turns) == {"a", "b"}
    give_back_turns(coordinator, turns)
    assert not _turn_is_busy(coordinator, "a") and not _turn_is_busy(coordinator, "b")


def test_a_batch_that_waits_too_long_for_a_turn_gives_back_every_turn_it_took(ledger: Ledger) -> None:
    for name in ("a", "b"):
        ledger.create_account(name, currency="USD")
    coordinator = ledger._coordinator
    held = take_turns(coordinator, ["b"])
    assert held is not None
    try:
        assert take_turns(coordinator, ["a", "b"], 0.01) is None
        assert not _turn_is_busy(coordinator, "a")  # given back
    finally:
        give_back_turns(coordinator, held)


def _turn_is_busy(coordinator: Any, name: str) -> bool:
    turns = coordinator.participants.take_turns([name])
    busy = name not in turns
    give_back_turns(coordinator, turns)
    return busy


def test_concurrent_batches_on_shared_accounts_each_decide_in_turn_and_conserve_money(
    ledger: Ledger, ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches from several threads share accounts: each waits for the lane and the turns
    instead of taking the mailbox path, and every outcome is as if the batches ran one
    after another, each in list order."""
    import random

    from coordinator import _batch

    fell_back: list[int] = []
    real_run = _batch.Batch.run
    monkeypatch.setattr(_batch.Batch, "run", lambda self: fell_back.append(1) or real_run(self))
    names = [f"n{k}" for k in range(40)]
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in names:
        ledger.create_account(name, currency="USD")
    ledger.transfer_many([TransferRequest(f"fund-{name}", "bank", name, 100) for name in names])
    rng = random.Random(5)
    batches = [[TransferRequest(f"t{b}-{k}", *rng.sample(names, 2), rng.randint(1, 60)) for k in range(300)]
               for b in range(8)]
    results: dict[int, list[Transfer | LedgerError]] = {}
    start = threading.Barrier(4)

    def run(first: int) -> None:
        start.wait(WAIT_S)
        for b in range(first, len(batches), 4):
            results[b] = ledger.transfer_many(batches[b])

    threads = [threading.Thread(target=run, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S * 3)
    assert len(results) == len(batches) and not fell_back
    assert sum(ledger.balance(name).posted for name in names) == 100 * len(names)
    assert all(ledger.balance(name).posted >= 0 and gapless(ledger, name) for name in names)
    # One batch decided at a time: their spans of LSNs do not overlap.
    spans = sorted((min(lsns), max(lsns)) for lsns in (
        [outcome.lsn for outcome in outcomes if isinstance(outcome, Transfer)] for outcomes in results.values()))
    assert all(earlier[1] < later[0] for earlier, later in zip(spans, spans[1:], strict=False)), spans
    ledger.close()
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_an_account_woken_while_a_batch_holds_its_turn_without_an_actor_gets_its_state_back(
    ledger: Ledger,
) -> None:
    """A batch takes the turn of an account with no live actor (a dormant turn); a balance
    asked meanwhile makes its actor, which waits; a transfer meanwhile credits it through
    the mailbox. The batch applies that credit before it spends it, and giving the turn back
    hands the actor the state it reached."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "b", "c"):
        ledger.create_account(name, currency="USD")
    ledger.transfer("fund-c", source="bank", destination="c", amount=7)
    coordinator = ledger._coordinator
    directory = ledger._directory
    assert "a" not in directory._live
    turns = take_turns(coordinator, ["a", "b"])
    assert turns is not None and type(turns["a"]).__name__ == "_Dormant"
    balances: list[Balance] = []
    credited: list[Transfer] = []
    try:
        asking = threading.Thread(target=lambda: balances.append(ledger.balance("a")))
        asking.start()
        assert wait_until(lambda: directory._dormant["a"].woken is not None)  # its actor, waiting for the turn
        crediting = threading.Thread(
            target=lambda: credited.append(ledger.transfer("credit", source="c", destination="a", amount=7)))
        crediting.start()
        crediting.join(WAIT_S)
        assert credited and not balances  # the credit is durable; the balance still waits
        ticket, fresh = coordinator.claims.claim(TransferRequest("spend", "a", "b", 5))
        assert fresh
        decide_in_turn(coordinator, [ticket], turns)  # type: ignore[list-item]
    finally:
        give_back_turns(coordinator, turns)
    asking.join(WAIT_S)
    assert ticket.wait(WAIT_S) and isinstance(ticket.value, Transfer)
    coordinator.claims.release(ticket)  # type: ignore[arg-type]
    assert balances and balances[0].posted == 2
    assert ledger.balance("a") == Balance(2, 0, 2) and ledger.balance("b").posted == 5
    assert [entry.transfer_id for entry in ledger.entries("a")] == ["credit", "spend"]
    assert gapless(ledger, "a") and not directory._dormant


def test_a_dormant_turn_starts_from_the_projection_at_the_journals_last_lsn(ledger: Ledger) -> None:
    """The turn of an account with no live actor (a dormant turn) holds the projection's state
    and holds, nothing reserved, no actor, and as `held_lsn` the journal's last LSN (a bound
    above the record behind its holds); an unknown id gets none; giving the turns back leaves
    no dormant turn, and the accounts still no actor."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.create_account("b", currency="USD")
    ledger.transfer("fund", source="bank", destination="a", amount=100)
    ledger.transfer("hold", source="a", destination="b", amount=40, pending=True)
    coordinator, directory = ledger._coordinator, ledger._directory
    assert "a" not in directory._live and "b" not in directory._live
    turns = take_turns(coordinator, ["a", "nobody", "b", "a"])
    assert turns is not None
    try:
        assert sorted(turns) == ["a", "b"]
        a, b = turns["a"], turns["b"]
        assert type(a).__name__ == type(b).__name__ == "_Dormant"
        states = coordinator.sequencer.states
        assert (a.state, a.reserved, a.held, a.incoming) == (states["a"], 0, 40, 0)
        assert (b.state, b.reserved, b.held, b.incoming) == (states["b"], 0, 0, 40)
        assert a.woken is None and b.woken is None  # type: ignore[attr-defined]
        assert a.held_lsn == b.held_lsn == ledger._journal.last_lsn  # type: ignore[attr-defined]
        assert sorted(directory._dormant) == ["a", "b"]
    finally:
        give_back_turns(coordinator, turns)
    assert not directory._dormant and "a" not in directory._live
    assert ledger.balance("a") == Balance(100, 40, 60) and ledger.balance("b") == Balance(0, 0, 0, 40)


def test_a_dormant_turn_given_back_is_lent_again_opened_afresh_and_the_spares_are_bounded(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dormant turn given back is kept and lent again, to whichever account needs one next:
    its books opened afresh from that account's projection (its state and holds, nothing
    reserved, no actor, the journal's last LSN as `held_lsn`), nothing left of the account it
    served before, even what a decision on it changed. What `take_turns` returned is emptied as
    its turns are given back (a turn in it may be another account's by then). At most
    `DORMANT_SPARES_MAX` are kept; one whose actor was made while it was held hands that actor
    its state and is not kept."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "b", "c", "d"):
        ledger.create_account(name, currency="USD")
    ledger.transfer("fund", source="bank", destination="a", amount=100)
    ledger.transfer("hold", source="a", destination="b", amount=40, pending=True)
    coordinator, directory = ledger._coordinator, ledger._directory
    states = coordinator.sequencer.states
    directory._spare.clear()  # (the transfers above were decided on dormant turns, kept since)
    turns = take_turns(coordinator, ["a"])
    assert turns is not None
    lent = turns["a"]
    lent.apply(states["a"][0] + 1, -1, 99, 10**6)  # what a decision would change (never journaled here)
    lent.hold(5, 3, 10**6)
    give_back_turns(coordinator, turns)
    assert directory._spare == [lent] and not directory._dormant and not turns
    again = take_turns(coordinator, ["b"])
    assert again is not None and again["b"] is lent
    try:
        assert (lent.account, lent.state, lent.reserved, lent.held, lent.incoming) == (
            coordinator.sequencer.accounts["b"], states["b"], 0, 0, 40)
        assert lent.woken is None and lent.held_lsn == ledger._journal.last_lsn  # type: ignore[attr-defined]
        assert not directory._spare and list(directory._dormant) == ["b"]
    finally:
        give_back_turns(coordinator, again)
    monkeypatch.setattr(_directory, "DORMANT_SPARES_MAX", 2)
    three = take_turns(coordinator, ["a", "b", "c"])
    assert three is not None and lent in three.values()
    taken = set(three.values())
    give_back_turns(coordinator, three)
    assert len(directory._spare) == 2 and set(directory._spare) < taken
    woken = take_turns(coordinator, ["d"])
    assert woken is not None
    kept = woken["d"]
    assert kept in taken  # a spare, lent again
    handle = directory.pin("d")  # its actor, made while the dormant turn is held
    try:
        give_back_turns(coordinator, woken)
    finally:
        directory.unpin("d")
    assert kept not in directory._spare and len(directory._spare) == 1
    assert handle._inbox._actor.state == states["d"]  # type: ignore[union-attr]
    assert ledger.balance("a") == Balance(100, 40, 60) and ledger.balance("b") == Balance(0, 0, 0, 40)
    assert ledger.balance("d") == Balance(0, 0, 0)


def test_a_dormant_turn_left_taken_by_an_interrupted_take_turns_is_given_back_after_its_actor_woke(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`take_turns(into=...)` (the batch lane's wait, `coordinator._taking.take_turns`) makes a
    dormant turn; an interrupt lands in its loop, and a second one as the `except` clause enters
    `_release`, so the call raises with that dormant turn still in `turns`. The account's actor
    is made meanwhile (pinned, as a balance read pins it). Giving `turns` back, as `_taking`
    then does, must hand that actor its state and its turn, and as its `held_lsn` the journal's
    last LSN (a bound above its holds), not the `held_lsn` it was never given."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "d"):
        ledger.create_account(name, currency="USD")
    ledger.transfer("fund", source="bank", destination="d", amount=9)
    coordinator, directory = ledger._coordinator, ledger._directory
    assert "a" not in directory._live and "d" not in directory._live
    turns = directory.take_turns(["a"])  # the first call: a dormant turn ("a")
    assert turns is not None and list(turns) == ["a"]

    def ids() -> Any:
        yield "d"  # made a dormant turn
        raise KeyboardInterrupt  # the first interrupt, in the loop

    release = directory._release

    def interrupted_on_entry(*args: Any, **kwargs: Any) -> None:
        monkeypatch.undo()  # once
        raise KeyboardInterrupt  # the second, landing as `_release` is entered

    monkeypatch.setattr(directory, "_release", interrupted_on_entry)
    with pytest.raises(KeyboardInterrupt):
        directory.take_turns(ids(), into=turns)
    assert directory._release == release and "d" in turns
    handle = directory.pin("d")  # its actor, made while the dormant turn is held: it waits for it
    last_lsn = ledger._journal.last_lsn
    try:
        give_back_turns(coordinator, turns)  # what `_taking.take_turns` does on the interrupt
    finally:
        directory.unpin("d")
    assert not directory._dormant and handle.pins == 0
    assert handle._inbox._actor.held_lsn == last_lsn  # type: ignore[union-attr]
    assert ledger.balance("d") == Balance(9, 0, 9)


def test_a_balance_never_shows_a_hold_decided_on_a_dormant_turn_before_it_is_durable(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pending transfer decided on the dormant turns of accounts with no live actor leaves
    its hold in the projection only; a balance asked then activates an actor from it, which
    must wait until the hold's record is durable (a crash before would take the hold back)."""
    import journal._writer

    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.create_account("b", currency="USD")
    ledger.transfer("fund", source="bank", destination="a", amount=100)
    assert "a" not in ledger._directory._live and "b" not in ledger._directory._live
    gate, writing = threading.Event(), threading.Event()
    real = journal._writer.Writer._commit

    def held_commit(self: Any, batch: Any) -> None:
        writing.set()
        assert gate.wait(WAIT_S)
        real(self, batch)

    monkeypatch.setattr(journal._writer.Writer, "_commit", held_commit)
    made: list[Transfer] = []
    pending = threading.Thread(target=lambda: made.append(
        ledger.transfer("hold", source="a", destination="b", amount=40, pending=True)))
    pending.start()
    assert writing.wait(WAIT_S)  # decided, its record being written, not durable
    seen: list[Balance] = []
    asking = threading.Thread(target=lambda: seen.append(ledger.balance("a")))
    asked_durable = threading.Event()  # the asker reached its wait for what the actor showed it
    real_wait = type(ledger._journal).wait_durable

    def noted_wait(self: Any, lsn: int, timeout_s: float) -> None:
        if threading.current_thread() is asking:
            asked_durable.set()
        real_wait(self, lsn, timeout_s)

    monkeypatch.setattr(type(ledger._journal), "wait_durable", noted_wait)
    asking.start()
    assert asked_durable.wait(WAIT_S)
    assert not seen and ledger._journal.durable_lsn < ledger._journal.last_lsn  # no hold shown before it is durable
    gate.set()
    pending.join(WAIT_S)
    asking.join(WAIT_S)
    assert made and seen == [Balance(100, 40, 60, 0)]


def test_an_interrupt_in_the_combiner_lets_go_of_combining(ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `BaseException` (an interrupt) out of a combining round reaches its caller, and the
    next caller becomes the combiner: nobody waits on a combiner that is gone."""
    with Ledger.open(ledger_path, timeout_s=TIMEOUT_S) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        real = ledger._coordinator.combiner._start_in_turn
        calls: list[int] = []

        def interrupted_once(*args: Any, **kwargs: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(ledger._coordinator.combiner, "_start_in_turn", interrupted_once)
        with pytest.raises(KeyboardInterrupt):
            ledger.transfer("t-1", source="bank", destination="alice", amount=1)
        assert not ledger._coordinator.combiner.combining
        assert isinstance(ledger.transfer("t-2", source="bank", destination="alice", amount=1), Transfer)


def test_an_interrupt_in_the_combiner_fails_the_tickets_queued_behind_it_and_returns_their_permits(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another caller's ticket queues while the combiner's round runs; an interrupt ends the
    round. The queued ticket was never started: it fails (`LedgerUnavailable`, nothing
    written) and its permit goes back; so does the round's own (see tests/test_combiner.py)."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("alice", currency="USD")
    coordinator = ledger._coordinator
    combiner, admission = coordinator.combiner, coordinator.admission
    first, second = (coordinator.claims.claim(TransferRequest(tid, "bank", "alice", 1), relayed=True)[0]
                     for tid in ("t-1", "t-2"))
    admission.admit(2, TIMEOUT_S)

    def queued_behind_then_interrupted(*args: Any, **kwargs: Any) -> Any:
        assert combiner.combine([second]) is False  # the other caller: queued behind the round
        raise KeyboardInterrupt

    monkeypatch.setattr(combiner, "_start_in_turn", queued_behind_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        combiner.combine([first])  # type: ignore[list-item]
    assert isinstance(second.error, LedgerUnavailable)  # type: ignore[union-attr]
    assert isinstance(first.error, LedgerUnavailable)  # type: ignore[union-attr]
    assert admission.in_flight == 0
    assert not combiner.combining


def test_a_batch_whose_ids_cannot_be_claimed_fails_alone_in_its_lane_group(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three batches decided in one lane run; the last one's claim raises (a damaged index
    record for an id it reuses): it alone gets the error; the others are decided and
    durable, no permit or claim is left behind, and a retry of its ids runs afresh."""
    from coordinator import _lane
    from engine import JournalCorrupted

    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    ledger.transfer("old", source="bank", destination="a", amount=1)
    claims = ledger._coordinator.claims
    assert claims.wait_warm(WAIT_S)
    real_lookup = claims.lookup

    def damaged(transfer_id: str, txn: Any = None) -> Any:
        if transfer_id == "old":
            raise JournalCorrupted("stand-in: the record of 'old' is damaged", where="LSN 3")
        return real_lookup(transfer_id, txn)

    monkeypatch.setattr(claims, "lookup", damaged)
    real_take, entered, go = _lane.take_turns, threading.Event(), threading.Event()

    def held_first(coordinator: Any, names: list[str], wait_s: float = 0.0) -> Any:
        if wait_s > 0 and not entered.is_set():  # the first group waits: the next batches queue behind it
            entered.set()
            assert go.wait(WAIT_S)
        return real_take(coordinator, names, wait_s)

    monkeypatch.setattr(_lane, "take_turns", held_first)
    out: dict[str, Any] = {}

    def run(key: str, requests: list[TransferRequest]) -> threading.Thread:
        def body() -> None:
            try:
                out[key] = ledger.transfer_many(requests)
            except Exception as error:  # the outcome under test
                out[key] = error
        thread = threading.Thread(target=body)
        thread.start()
        return thread

    lane = ledger._coordinator.lane
    first = run("first", [TransferRequest("z1", "bank", "a", 1)])
    assert entered.wait(WAIT_S)
    second = run("second", [TransferRequest("a1", "bank", "a", 1), TransferRequest("a2", "bank", "a", 1)])
    assert wait_until(lambda: len(lane._queue) == 1)
    third = run("third", [TransferRequest("b1", "bank", "a", 1), TransferRequest("old", "bank", "a", 1)])
    assert wait_until(lambda: len(lane._queue) == 2)
    go.set()
    for thread in (first, second, third):
        thread.join(WAIT_S)
    assert isinstance(out["third"], JournalCorrupted)
    assert [type(result) for result in out["second"]] == [Transfer, Transfer]
    assert [type(result) for result in out["first"]] == [Transfer]
    assert ledger._coordinator.admission.in_flight == 0
    assert not [ticket for ticket in claims.in_flight() if not ticket.done]
    assert ledger.balance("a").posted == 4
    monkeypatch.setattr(claims, "lookup", real_lookup)
    assert isinstance(ledger.transfer("b1", source="bank", destination="a", amount=1), Transfer)  # afresh


def test_a_batch_answers_a_transfer_the_mailboxes_decide_late_only_once_it_is_decided(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """An account a batch names may be made after the lane took its turns: that transfer
    goes to the mailboxes, whose decision can come after the batch is otherwise decided.
    The batch must answer it with that decision, not read it before."""
    from coordinator import _lane
    from engine import _runtime

    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    real_take_turns = _lane.take_turns
    made: list[str] = []

    def take_then_make(*args: Any, **kwargs: Any) -> Any:
        turns = real_take_turns(*args, **kwargs)
        if not made:
            made.append("late")
            ledger.create_account("late", currency="USD")  # after the turns: its own is not among them
        return turns

    real_put_adaptive = _runtime.Inbox.put_adaptive

    def slow_debits(self: Any, message: Any) -> None:  # the mailboxes decide 0.2 s later
        if type(message).__name__ == "DebitStep":
            threading.Timer(0.2, real_put_adaptive, (self, message)).start()
        else:
            real_put_adaptive(self, message)

    monkeypatch.setattr(_lane, "take_turns", take_then_make)
    monkeypatch.setattr(_runtime.Inbox, "put_adaptive", slow_debits)
    results = ledger.transfer_many([TransferRequest("t1", "bank", "late", 5), TransferRequest("t2", "bank", "late", 7)])
    assert made == ["late"]
    assert [type(result) for result in results] == [Transfer, Transfer]
    assert [result.amount for result in results] == [5, 7]  # type: ignore[union-attr]
    assert ledger.balance("late").posted == 12
