"""The lane: single transfers arriving while a group of batches holds its turns are adopted,
decided by the lane's runner between two chunks of the group (or after its last), not left
in the mailboxes until the whole group is decided; and what a ticket decided in turn reads of
an account whose mailbox received messages meanwhile."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from coordinator import _coordinator, _lane, _turns
from coordinator._limits import CHUNK_REQUESTS_BESIDE, CHUNK_REQUESTS_MAX
from coordinator._state import Posting
from coordinator._taking import give_back_turns, take_turns
from coordinator._turns import decide_in_turn
from engine import (
    InsufficientFunds,
    Ledger,
    LedgerClosed,
    LedgerUnavailable,
    PendingTransferNotFound,
    Transfer,
    TransferRequest,
)
from engine._tools_audit import verify

WAIT_S = 10.0


def _funded(ledger: Ledger) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "b", "c"):
        ledger.create_account(name, currency="USD")
    ledger.transfer("fund-a", source="bank", destination="a", amount=10_000)


def _batch(count: int) -> list[TransferRequest]:
    """`count` transfers of 1 from a to b: each chunk of the lane touches a's turn."""
    return [TransferRequest(f"m-{k}", "a", "b", 1) for k in range(count)]


def _adoptions(monkeypatch: pytest.MonkeyPatch) -> threading.Event:
    """An event set once the lane adopts a ticket."""
    adopted = threading.Event()
    real_adopt = _lane.Lane.adopt

    def adopt(self: _lane.Lane, tickets: list[Any]) -> bool:
        taken = real_adopt(self, tickets)
        if taken:
            adopted.set()
        return taken

    monkeypatch.setattr(_lane.Lane, "adopt", adopt)
    return adopted


def _in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def body() -> None:
        try:
            out["result"] = work()
        except Exception as error:  # noqa: BLE001 - the outcome under test
            out["result"] = error

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


def _paused_at_second_chunk(monkeypatch: pytest.MonkeyPatch, adopted: threading.Event,
                            go: threading.Event | None = None) -> threading.Event:
    """Make the lane's runner stop before its second chunk (the first decided, the group's
    turns held) until a ticket is adopted (and `go` is set); the event returned is set
    once it stops there."""
    mid = threading.Event()
    real_decide_all = _lane.decide_all

    def pausing(coordinator: Any, tickets: list[Any], turns: Any, wake_writer: bool = True,
                between_chunks: Callable[[], None] | None = None,
                chunk_requests: Callable[[], int] | None = None) -> list[Any]:
        assert between_chunks is not None
        calls = [0]

        def between() -> None:
            calls[0] += 1
            if calls[0] == 1:  # the first chunk is decided
                mid.set()
                assert adopted.wait(WAIT_S)
                assert go is None or go.wait(WAIT_S)
            between_chunks()

        return real_decide_all(coordinator, tickets, turns, wake_writer, between, chunk_requests)

    monkeypatch.setattr(_lane, "decide_all", pausing)
    return mid


def test_a_transfer_arriving_mid_group_is_decided_between_two_chunks_of_it(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The runner stops before its second chunk until a single transfer on a (whose turn it
    holds) is adopted: that transfer is journaled after the first chunk and before the
    second, and sees the first chunk's debits."""
    _funded(ledger)
    mid = _paused_at_second_chunk(monkeypatch, _adoptions(monkeypatch))
    count = CHUNK_REQUESTS_MAX + 10
    batch, batch_out = _in_thread(lambda: ledger.transfer_many(_batch(count)))
    assert mid.wait(WAIT_S)
    # a holds 10,000 - CHUNK_REQUESTS_MAX now: the single transfer takes all of it but 5, so
    # 5 of the second chunk's 10 debits go through and the other 5 are refused.
    single = ledger.transfer("s", source="a", destination="c", amount=10_000 - CHUNK_REQUESTS_MAX - 5)
    batch.join(WAIT_S)
    assert not batch.is_alive()
    results = batch_out["result"]
    assert isinstance(single, Transfer)
    first_chunk, second_chunk = results[:CHUNK_REQUESTS_MAX], results[CHUNK_REQUESTS_MAX:]
    assert all(type(result) is Transfer for result in first_chunk)
    assert max(result.lsn for result in first_chunk) < single.lsn
    assert [type(result) for result in second_chunk] == [Transfer] * 5 + [InsufficientFunds] * 5
    assert single.lsn < min(result.lsn for result in second_chunk if type(result) is Transfer)
    assert ledger.balance("a").posted == 0
    assert ledger.balance("c").posted == single.amount
    assert ledger.stats()["in_flight"] == 0


def test_beside_single_transfers_the_runner_decides_in_shorter_chunks_until_a_group_adopts_none(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once it adopts a single transfer, the runner decides the rest of the group, and the
    whole of the next, in chunks of `CHUNK_REQUESTS_BESIDE`; a group that adopts none puts
    the one after it back to `CHUNK_REQUESTS_MAX`. Every request is decided all the same."""
    _funded(ledger)
    sizes: list[int] = []
    real_decide_all = _turns.decide_all

    def recording(coordinator: Any, tickets: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        sizes.clear()
        return real_decide_all(coordinator, tickets, *args, **kwargs)

    real_decide_in_turn = _turns.decide_in_turn

    def chunk(coordinator: Any, tickets: list[Any], *args: Any, **kwargs: Any) -> list[Any]:
        sizes.append(len(tickets))
        return real_decide_in_turn(coordinator, tickets, *args, **kwargs)

    monkeypatch.setattr(_turns, "decide_in_turn", chunk)
    mid = _paused_at_second_chunk(monkeypatch, _adoptions(monkeypatch))
    count = CHUNK_REQUESTS_MAX + 2 * CHUNK_REQUESTS_BESIDE + 10
    batch, batch_out = _in_thread(lambda: ledger.transfer_many(_batch(count)))
    assert mid.wait(WAIT_S)
    assert isinstance(ledger.transfer("s", source="a", destination="c", amount=1), Transfer)
    batch.join(WAIT_S)
    assert not batch.is_alive()
    assert all(type(result) is Transfer for result in batch_out["result"])
    # (the runner decides the adopted transfer with `decide_in_turn` too, a chunk of 1)
    assert [size for size in sizes if size != 1] == [CHUNK_REQUESTS_MAX, CHUNK_REQUESTS_BESIDE,
                                                    CHUNK_REQUESTS_BESIDE, 10]
    monkeypatch.setattr(_lane, "decide_all", recording)
    assert CHUNK_REQUESTS_MAX < 3 * CHUNK_REQUESTS_BESIDE
    shorter, longer = [CHUNK_REQUESTS_BESIDE] * 3, [CHUNK_REQUESTS_MAX, 3 * CHUNK_REQUESTS_BESIDE - CHUNK_REQUESTS_MAX]
    for round_, expected in enumerate((shorter, longer)):
        requests = [TransferRequest(f"n{round_}-{k}", "bank", "b", 1) for k in range(3 * CHUNK_REQUESTS_BESIDE)]
        batch, batch_out = _in_thread(lambda requests=requests: ledger.transfer_many(requests))
        batch.join(WAIT_S)
        assert not batch.is_alive()
        assert all(type(result) is Transfer for result in batch_out["result"])
        assert [size for size in sizes if size != 1] == expected
    assert ledger.balance("b").posted == count + 6 * CHUNK_REQUESTS_BESIDE


def test_a_transfer_adopted_after_the_last_chunk_is_decided_before_the_turns_go_back(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Adopted once the group's last chunk is decided: the runner decides it before it gives
    back the turns, right after the batch's records."""
    _funded(ledger)
    adopted = _adoptions(monkeypatch)
    done = threading.Event()
    real_decide_all = _lane.decide_all

    def then_wait(*args: Any, **kwargs: Any) -> list[Any]:
        left = real_decide_all(*args, **kwargs)
        done.set()
        assert adopted.wait(WAIT_S)
        return left

    monkeypatch.setattr(_lane, "decide_all", then_wait)
    journal, given_back_at = ledger._coordinator.journal, []
    real_give_back = _lane.give_back_turns

    def give_back(coordinator: Any, turns: Any) -> None:
        given_back_at.append(journal.last_lsn)
        real_give_back(coordinator, turns)

    monkeypatch.setattr(_lane, "give_back_turns", give_back)
    batch, batch_out = _in_thread(lambda: ledger.transfer_many(_batch(3)))
    assert done.wait(WAIT_S)
    single = ledger.transfer("s", source="a", destination="c", amount=7)
    batch.join(WAIT_S)
    assert not batch.is_alive()
    assert isinstance(single, Transfer)
    assert single.lsn == max(result.lsn for result in batch_out["result"]) + 1
    assert given_back_at == [single.lsn]  # decided while the group held a's turn
    assert ledger.balance("a").posted == 10_000 - 3 - 7
    assert ledger.stats()["in_flight"] == 0


def test_posts_voids_and_chains_adopted_mid_group_are_decided_with_the_groups_turns(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every kind of ticket can be adopted: a post and a void of pending transfers on a, a
    linked chain through a, and a post of no pending transfer (refused); all while the
    runner holds a's turn, each decided with the outcome the rules give it."""
    _funded(ledger)
    ledger.transfer("p1", source="a", destination="c", amount=100, pending=True)
    ledger.transfer("p2", source="a", destination="c", amount=50, pending=True)
    go = threading.Event()
    mid = _paused_at_second_chunk(monkeypatch, _adoptions(monkeypatch), go)
    batch, batch_out = _in_thread(lambda: ledger.transfer_many(_batch(CHUNK_REQUESTS_MAX + 1)))
    assert mid.wait(WAIT_S)
    calls = {
        "post": lambda: ledger.post_pending("q1", pending_id="p1", amount=60),
        "void": lambda: ledger.void_pending("v2", pending_id="p2"),
        "chain": lambda: ledger.transfer_linked([TransferRequest("l1", "a", "b", 5), TransferRequest("l2", "b", "c", 5)]),
        "missing": lambda: ledger.post_pending("q9", pending_id="nope"),
    }
    threads = {name: _in_thread(call) for name, call in calls.items()}
    go.set()
    batch.join(WAIT_S)
    for thread, _ in threads.values():
        thread.join(WAIT_S)
    assert not batch.is_alive() and not any(thread.is_alive() for thread, _ in threads.values())
    out = {name: result["result"] for name, (_, result) in threads.items()}
    assert isinstance(out["post"], Transfer) and out["post"].amount == 60
    assert isinstance(out["void"], Transfer) and out["void"].amount == 50
    assert [leg.amount for leg in out["chain"]] == [5, 5]
    assert isinstance(out["missing"], PendingTransferNotFound)
    assert all(type(result) is Transfer for result in batch_out["result"])
    moved = CHUNK_REQUESTS_MAX + 1
    assert ledger.balance("a").posted == 10_000 - moved - 60 - 5
    assert ledger.balance("a").pending == 0
    assert ledger.balance("c").posted == 60 + 5
    assert ledger.get_transfer("p1").status == "posted" and ledger.get_transfer("p2").status == "voided"
    assert ledger.stats()["in_flight"] == 0
    path = ledger.path
    ledger.close()
    assert verify(str(path))["verdict"] == "whole"


def test_a_batch_ticket_left_for_the_mailboxes_is_not_overtaken_by_a_later_one_of_its_batch(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`x` is made after the group took its turns, so the batch's t1 (x -> c) is left for the
    mailboxes. A transfer to x adopted before the second chunk takes x's turn for itself and
    gives it back: the batch's t2 (x -> b), in the second chunk, is left too, and both are
    decided in list order. Applied in list order, t1 goes through and t2 is refused (x may
    go 5 below zero), wherever the adopted transfer falls."""
    _funded(ledger)
    real_take = _lane.take_turns

    def take_then_make(*args: Any, **kwargs: Any) -> Any:
        turns = real_take(*args, **kwargs)
        if "x" not in ledger._coordinator.sequencer.accounts:
            ledger.create_account("x", currency="USD", overdraft_limit=5)
        return turns

    monkeypatch.setattr(_lane, "take_turns", take_then_make)
    mid = _paused_at_second_chunk(monkeypatch, _adoptions(monkeypatch))
    requests = _batch(CHUNK_REQUESTS_MAX - 1) + [TransferRequest("t1", "x", "c", 5), TransferRequest("t2", "x", "b", 5)]
    batch, batch_out = _in_thread(lambda: ledger.transfer_many(requests))
    assert mid.wait(WAIT_S)
    single = ledger.transfer("s", source="bank", destination="x", amount=1)
    batch.join(WAIT_S)
    assert not batch.is_alive()
    first, second = batch_out["result"][-2:]
    assert isinstance(single, Transfer)
    assert isinstance(first, Transfer) and isinstance(second, InsufficientFunds), (first, second)
    assert ledger.balance("x").posted == 1 - 5
    assert ledger.stats()["in_flight"] == 0


@pytest.mark.parametrize("debit", ["a single transfer", "a chain (Sequencer.stamp_chain)"])
def test_a_reservation_released_in_the_mailbox_while_the_turn_is_held_is_not_spent_twice(
        ledger: Ledger, debit: str) -> None:
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
        if debit == "a single transfer":
            ticket, fresh = coordinator.claims.claim(TransferRequest("all", "a", "d", 100))
            assert fresh
        else:
            ticket = coordinator.claims.claim_chain((TransferRequest("all", "a", "d", 100),))  # type: ignore[assignment]
        decide_in_turn(coordinator, [ticket], turns)  # type: ignore[list-item]
    finally:
        coordinator.participants.unpin("a")
        give_back_turns(coordinator, turns)
    assert ticket.wait(WAIT_S)
    made = ticket.value if debit == "a single transfer" else ticket.value[0]  # type: ignore[index]
    assert isinstance(made, Transfer), ticket.error or ticket.value
    coordinator.claims.release(ticket)  # type: ignore[arg-type]
    assert ledger.balance("a").posted == 0 and ledger.balance("a").pending == 0
    assert ledger.balance("d").posted == 100


def test_a_journal_failing_at_append_fails_the_tickets_the_chunk_left_too(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The journal fails between a chunk's room and its append; the chunk left a ticket for
    the mailboxes (`x` was made after the turns were taken). That ticket was never started:
    it fails with the rest, and no claim or permit is left in flight."""
    _funded(ledger)
    coordinator = ledger._coordinator
    journal = coordinator.journal
    real_take, real_wait_room = _lane.take_turns, journal.wait_room

    def take_then_make(*args: Any, **kwargs: Any) -> Any:
        turns = real_take(*args, **kwargs)
        ledger.create_account("x", currency="USD", overdraft_limit=50)

        def wait_then_fail(records: int) -> None:
            real_wait_room(records)
            journal.refuse_writes("stand-in: the disk failed right after the room was made")

        monkeypatch.setattr(journal, "wait_room", wait_then_fail)
        return turns

    monkeypatch.setattr(_lane, "take_turns", take_then_make)
    with pytest.raises(LedgerUnavailable):
        ledger.transfer_many([TransferRequest("m1", "a", "b", 1), TransferRequest("t1", "x", "c", 5)])
    assert coordinator.claims.in_flight() == []
    assert coordinator.admission.in_flight == 0


def test_a_batch_whose_later_chunks_the_closing_journal_refused_answers_each_request(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A close whose wait for the calls under way ran out closes the journal between two
    chunks of a batch: the first chunk is journaled (the close drains it), the second is
    refused. The batch answers each request as the journal made it, the first chunk's
    Transfers and the second's `LedgerClosed`, never one `LedgerClosed` for the whole
    batch, which tells its caller nothing was written."""
    ledger = Ledger.open(ledger_path)
    try:
        _funded(ledger)
        real_between = _lane.Lane._between_chunks

        def closing(self: _lane.Lane, turns: Any) -> None:
            ledger._journal.close()  # what `Ledger.close` does once its wait for calls runs out
            real_between(self, turns)

        monkeypatch.setattr(_lane.Lane, "_between_chunks", closing)
        count = CHUNK_REQUESTS_MAX + 10
        results = ledger.transfer_many(_batch(count))
    finally:
        ledger.close()
    assert [type(result) for result in results] == [Transfer] * CHUNK_REQUESTS_MAX + [LedgerClosed] * 10
    with Ledger.open(ledger_path) as reopened:
        assert [reopened.outcome(f"m-{k}") for k in range(count)] == results[:CHUNK_REQUESTS_MAX] + [None] * 10
        assert reopened.balance("b").posted == CHUNK_REQUESTS_MAX
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_a_batch_of_several_parts_the_closing_journal_cut_short_answers_each_request(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch longer than the transfers a ledger lets in flight decides a part at a time; the
    journal closes (as `Ledger.close` closes it once its wait runs out) after the first
    part. The first part's Transfers are durable and answered; the rest is `LedgerClosed`,
    never one `LedgerClosed` for the whole batch."""
    ledger = Ledger.open(ledger_path, inflight_max=4)
    try:
        _funded(ledger)
        real_run = _coordinator.TurnBatch.run

        def closing_after(self: _lane.TurnBatch) -> Any:
            decided = real_run(self)
            ledger._journal.close()
            return decided

        monkeypatch.setattr(_coordinator.TurnBatch, "run", closing_after)
        results = ledger.transfer_many(_batch(10))
    finally:
        ledger.close()
    assert [type(result) for result in results] == [Transfer] * 4 + [LedgerClosed] * 6
    with Ledger.open(ledger_path) as reopened:
        assert [reopened.outcome(f"m-{k}") for k in range(10)] == results[:4] + [None] * 6
    assert verify(str(ledger_path))["verdict"] == "whole"


def test_a_batch_the_closing_journal_cut_short_in_the_mailboxes_answers_each_request_at_once(
    ledger_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The mailbox path of a batch (its turns could not be taken) cut short by the journal
    closing under it: the transfers started before are durable, the rest `LedgerClosed`, each
    answered as the journal made it. A ticket the closed journal failed was stamped at an LSN
    that will never be durable; the batch waited for it its whole `timeout_s` and then raised
    `LedgerTimeout` for everything."""
    ledger = Ledger.open(ledger_path, timeout_s=10.0)
    try:
        _funded(ledger)
        monkeypatch.setattr(_coordinator.TurnBatch, "run", lambda self: None)  # the turns were busy
        real_start = _coordinator.Coordinator.start
        started = []

        def closing_at_the_sixth(self: _coordinator.Coordinator, ticket: Any) -> None:
            started.append(ticket)
            if len(started) == 6:
                ledger._journal.close()  # what `Ledger.close` does once its wait for calls runs out
            real_start(self, ticket)

        monkeypatch.setattr(_coordinator.Coordinator, "start", closing_at_the_sixth)
        results = ledger.transfer_many(_batch(10))
    finally:
        ledger.close()
    assert [type(result) for result in results] == [Transfer] * 5 + [LedgerClosed] * 5
    with Ledger.open(ledger_path) as reopened:
        assert [reopened.outcome(f"m-{k}") for k in range(10)] == results[:5] + [None] * 5
    assert verify(str(ledger_path))["verdict"] == "whole"
