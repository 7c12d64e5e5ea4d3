"""The sequencer's deadline heap: bounded by the open pending transfers with a deadline.

Every pending transfer with a timeout pushes its deadline onto `Sequencer._deadlines` as it
is stamped; one posted or voided leaves it stale there, and before the heap was compacted a
stale one stayed until its deadline came (an hour's worth of posted pending transfers, say).
These tests look at the heap itself, since what is at stake is memory: after many pending
transfers are posted or voided it holds at most about twice the open ones plus
`DEADLINES_STALE_SLACK` once a compaction is through (`Deadlines._compact_deadlines`, which
moves the live entries to a new heap a step at a time: `_draining` holds the rest of the old
one meanwhile), while pending transfers left open,
made on every path (in turn, in a batch, in the mailboxes, in a chain) and compacted around,
still expire exactly at their deadlines. The ledgers run on a clock the test moves, so no
expirer thread runs behind the test's back.
"""

from __future__ import annotations

import heapq
import random
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import NS_PER_S, Clock, audit_of, interrupt_after

import coordinator._deadlines
import coordinator._sequencer
from coordinator import INDEX_NAMES, Resolution
from coordinator._batch import Batch
from coordinator._limits import CHUNK_REQUESTS_MAX, DEADLINES_STALE_SLACK
from coordinator._rules import Refusal
from coordinator._sequencer import Sequencer
from coordinator._state import Projection
from coordinator._tickets import Ticket
from engine import (
    Account,
    Balance,
    Ledger,
    LedgerError,
    PendingTransferExpired,
    Transfer,
    TransferRequest,
)
from journal import Completion, Journal

WAIT_S = 10.0
"""Bound on every batch, thread join and wait in this file."""
HOUR_S = 3600
FUNDING = 10**12


def fund(ledger: Ledger, names: list[str]) -> None:
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in names:
        ledger.create_account(name, currency="USD")
        ledger.transfer(f"fund-{name}", source="bank", destination=name, amount=FUNDING)


def status_of(ledger: Ledger, transfer_id: str) -> str:
    transfer = ledger.get_transfer(transfer_id)
    assert transfer is not None, transfer_id
    return transfer.status


def heap_of(ledger: Ledger) -> list[tuple[int, str]]:
    """Every entry of the deadline heaps: the new one's, and the old one's a compaction is draining."""
    return ledger._sequencer._deadlines + ledger._sequencer._draining


def open_with_deadline(ledger: Ledger) -> int:
    return sum(1 for pending in ledger._sequencer.pending.values() if pending.deadline)


def assert_heap_bounded(ledger: Ledger, slack: int) -> None:
    """What `Deadlines._compact_deadlines` promises once every record is through `_appended`
    (and none was refused) and its compaction is through: the stale entries at most the live
    ones plus the slack."""
    with ledger._sequencer.lock:
        live, held = open_with_deadline(ledger), len(heap_of(ledger))
        assert held <= 2 * live + slack, (held, live, slack)
        assert {(p.deadline, p.id) for p in ledger._sequencer.pending.values() if p.deadline} <= set(heap_of(ledger))


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def books(ledger_path: Path, clock: Clock) -> Iterator[Ledger]:
    with Ledger.open(ledger_path, clock_ns=clock, dispatcher_threads=2) as opened:
        fund(opened, ["alice", "bob", "carol"])
        yield opened


@pytest.fixture
def compactions(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the heap's compactions (one entry each: the heap's length before it)."""
    seen: list[int] = []
    real = coordinator._sequencer.Sequencer._compact_deadlines

    def counted(self: coordinator._sequencer.Sequencer) -> None:
        seen.append(len(self._deadlines))
        real(self)

    monkeypatch.setattr(coordinator._sequencer.Sequencer, "_compact_deadlines", counted)
    return seen


def test_many_pending_transfers_posted_or_voided_leave_the_deadline_heap_within_its_bound(
        books: Ledger, compactions: list[int]) -> None:
    count = 3 * DEADLINES_STALE_SLACK
    for first in range(0, count, 500):
        made = books.transfer_many([TransferRequest(f"p-{n}", "alice", "bob", 1, pending=True, timeout_s=HOUR_S)
                                    for n in range(first, min(count, first + 500))])
        assert all(isinstance(transfer, Transfer) for transfer in made)
    assert len(heap_of(books)) == count  # all open: all live
    for n in range(count):
        if n % 2:
            books.post_pending(f"post-{n}", pending_id=f"p-{n}")
        else:
            books.void_pending(f"void-{n}", pending_id=f"p-{n}")
    assert open_with_deadline(books) == 0
    assert_heap_bounded(books, DEADLINES_STALE_SLACK)
    assert len(heap_of(books)) <= DEADLINES_STALE_SLACK
    assert compactions, "the heap was never compacted"
    assert books.balance("alice") == Balance(FUNDING - count // 2, 0, FUNDING - count // 2, 0)


def test_pending_transfers_left_open_on_every_path_expire_at_their_deadlines_after_compactions(
        books: Ledger, clock: Clock, monkeypatch: pytest.MonkeyPatch, compactions: list[int]) -> None:
    """A slack of 2 makes the heap compact after every few posts, so compactions land right
    after pending transfers were stamped and entered on each path (the `_appended` of their
    own record among them); each one left open must still expire at its deadline, no sooner
    and no later, and more churn between two expiries compacts around those still open."""
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_STALE_SLACK", 2)
    coordinator_ = books._coordinator
    keepers: dict[str, int] = {}  # id -> deadline
    churned = 0

    def keep(transfer: Transfer) -> None:
        assert transfer.status == "pending" and transfer.timeout_s is not None
        keepers[transfer.id] = transfer.timestamp + transfer.timeout_s * NS_PER_S

    def churn(tag: str, n: int) -> None:
        """`n` pending transfers with a timeout, each then posted or voided, on the paths in turn."""
        nonlocal churned
        ids = [f"c-{tag}-{i}" for i in range(n)]
        for i, tid in enumerate(ids):
            if i % 3 == 0:
                books.transfer(tid, source="alice", destination="carol", amount=1, pending=True, timeout_s=HOUR_S)
            elif i % 3 == 1:
                out = Batch(coordinator_, [TransferRequest(tid, "alice", "carol", 1, pending=True, timeout_s=HOUR_S)],
                            WAIT_S).run()
                assert isinstance(out[0], Transfer), out
            else:
                books.transfer_linked([TransferRequest(tid, "alice", "carol", 1, pending=True, timeout_s=HOUR_S),
                                       TransferRequest(tid + "-x", "bob", "carol", 1)])
        for i, tid in enumerate(ids):
            if i % 3 == 0:
                books.post_pending(f"post-{tid}", pending_id=tid)
            elif i % 3 == 1:
                out = Batch(coordinator_, [Resolution(f"void-{tid}", tid, void=True)], WAIT_S).run()
                assert isinstance(out[0], Transfer), out
            else:
                out = books._decide_many([Resolution(f"post-{tid}", tid)])
                assert isinstance(out[0], Transfer), out
        churned += n

    for round_ in range(6):
        timeout = 100 + 10 * round_  # each keeper's deadline its own: a distinct timeout a path and round
        keep(books.transfer(f"k-turn-{round_}", source="alice", destination="bob", amount=2, pending=True,
                            timeout_s=timeout))
        churn(f"{round_}a", 9)
        [made] = books.transfer_many([TransferRequest(f"k-lane-{round_}", "alice", "bob", 2, pending=True,
                                                      timeout_s=timeout + 1)])
        assert isinstance(made, Transfer)
        keep(made)
        churn(f"{round_}b", 9)
        [made] = Batch(coordinator_, [TransferRequest(f"k-mail-{round_}", "alice", "bob", 2, pending=True,
                                                      timeout_s=timeout + 2)], WAIT_S).run()
        assert isinstance(made, Transfer)
        keep(made)
        churn(f"{round_}c", 9)
        chain = books.transfer_linked([TransferRequest(f"k-chain-{round_}", "alice", "bob", 2, pending=True,
                                                       timeout_s=timeout + 3),
                                       TransferRequest(f"k-chain-{round_}-x", "bob", "carol", 1)])
        keep(chain[0])
        churn(f"{round_}d", 9)
        assert_heap_bounded(books, 2)
    assert len(compactions) >= 10, compactions

    for n, (tid, deadline) in enumerate(sorted(keepers.items(), key=lambda item: item[1])):
        clock.now_ns = deadline - 1
        assert books.expire_pending() == 0, tid
        assert status_of(books, tid) == "pending"
        clock.now_ns = deadline
        assert books.expire_pending() == 1, tid
        assert status_of(books, tid) == "expired"
        if n % 4 == 3:  # more compactions between two expiries
            churn(f"late-{n}", 9)
            assert_heap_bounded(books, 2)
    assert open_with_deadline(books) == 0
    assert books.balance("alice") == Balance(FUNDING - churned // 3 * 2, 0, FUNDING - churned // 3 * 2, 0)


def test_a_compaction_larger_than_a_step_spreads_over_the_records_after_it_and_drops_no_live_deadline(
        books: Ledger, clock: Clock, monkeypatch: pytest.MonkeyPatch, compactions: list[int]) -> None:
    """With steps of 4 entries (and twice the records) a compaction of hundreds of entries
    moves a few each time a record is queued, while pending transfers are made, posted and
    expired meanwhile; each step is that small, the two heaps always hold every open
    deadline, none is dropped, and each pending transfer left open expires exactly at its
    deadline, among them those made and those expired while the old heap was draining."""
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_STALE_SLACK", 8)
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_DRAIN_STEP", 4)
    steps: list[int] = []
    real = Sequencer._drain_deadlines

    def step(self: Sequencer, size: int) -> None:
        steps.append(size)
        real(self, size)

    monkeypatch.setattr(Sequencer, "_drain_deadlines", step)
    keepers: dict[str, int] = {}  # id -> deadline
    made = books.transfer_many([TransferRequest(f"p-{n}", "alice", "bob", 1, pending=True,
                                                timeout_s=100 + n % 50) for n in range(300)])
    for n, transfer in enumerate(made):
        assert isinstance(transfer, Transfer)
        if n % 5 == 0:  # left open
            keepers[transfer.id] = transfer.timestamp + transfer.timeout_s * NS_PER_S  # type: ignore[operator]
    drained_while_open = False
    for n in range(300):
        if n % 5:
            books.post_pending(f"post-{n}", pending_id=f"p-{n}")
        if books._sequencer._draining:
            drained_while_open = True
            if n % 7 == 0:  # one more made while the old heap drains, left open
                fresh = books.transfer(f"fresh-{n}", source="alice", destination="bob", amount=1, pending=True,
                                       timeout_s=100)
                keepers[fresh.id] = fresh.timestamp + 100 * NS_PER_S
        with books._sequencer.lock:  # never a live deadline missing, mid-compaction or not
            live = {(p.deadline, p.id) for p in books._sequencer.pending.values() if p.deadline}
            assert live <= set(heap_of(books))
    assert compactions and drained_while_open
    assert len(steps) > 10 and max(steps) <= 4 + 2 * CHUNK_REQUESTS_MAX, steps  # records: a chunk's at most
    while books._sequencer._draining:  # the compaction under way goes on with each record
        books.transfer(f"t-{len(steps)}", source="alice", destination="bob", amount=1)
    assert_heap_bounded(books, 8)
    for tid, deadline in sorted(keepers.items(), key=lambda item: item[1]):
        clock.now_ns = deadline - 1
        books.expire_pending()
        assert status_of(books, tid) == "pending", tid
        clock.now_ns = deadline
        books.expire_pending()
        assert status_of(books, tid) == "expired", tid
    assert open_with_deadline(books) == 0


def test_an_expiry_that_compacts_the_heap_between_its_records_expires_everything_due(
        books: Ledger, clock: Clock, monkeypatch: pytest.MonkeyPatch, compactions: list[int]) -> None:
    """`expire` journals record after record, and each record's `_appended` may compact the
    heap (the live entries it expired leave the stale ones the majority): the expiry reads the
    heaps again after each, so it goes on with what is
    still due, and the pending transfers not due stay."""
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_STALE_SLACK", 2)
    monkeypatch.setattr(coordinator._sequencer, "EXPIRY_RECORD_IDS_MAX", 3)
    due = [books.transfer(f"due-{n}", source="alice", destination="bob", amount=1, pending=True, timeout_s=10).id
           for n in range(10)]
    later = books.transfer("later", source="alice", destination="bob", amount=1, pending=True, timeout_s=HOUR_S)
    for n in range(6):  # stale ones, not yet enough to compact
        books.transfer(f"s-{n}", source="alice", destination="carol", amount=1, pending=True, timeout_s=HOUR_S)
        books.void_pending(f"v-{n}", pending_id=f"s-{n}")
    assert compactions == [] and len(heap_of(books)) == 17
    clock.advance(11)
    assert books.expire_pending() == 10
    assert compactions, "no compaction in the expiry"
    assert [status_of(books, tid) for tid in due] == ["expired"] * 10
    assert heap_of(books) == [(later.timestamp + HOUR_S * NS_PER_S, "later")]
    clock.advance(HOUR_S)
    assert books.expire_pending() == 1 and status_of(books, "later") == "expired"


def test_a_chain_decided_in_the_mailboxes_keeps_the_deadline_it_stamped_through_the_compaction_it_triggers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compactions: list[int]) -> None:
    """The one decision whose stamp both pushes a deadline and makes another stale: a chain
    that opens a pending transfer and posts another (as a record of a journal copied is
    decided again, `coordinator._recovery.copy_record`), on the mailboxes' path, which
    enters its stamp only once its record is queued (`Sequencer.commit`). Its post tips the
    heap into compacting: that must happen once the chain was entered (`_appended`), or the
    new pending transfer's deadline, not yet in `pending`, would be dropped and it would
    never expire. The sequencer runs alone here, on a journal of its own."""
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_STALE_SLACK", 0)
    clock = Clock()
    journal = Journal.open(tmp_path / "journal", index_names=INDEX_NAMES)
    try:
        sequencer = Sequencer(journal, Projection(), clock=clock)

        def nowhere(_: object) -> None:
            return None

        def commit(*requests: TransferRequest | Resolution, linked: bool = False) -> Ticket:
            ticket = Ticket(requests, 0, linked=linked)
            assert type(sequencer.commit(ticket, nowhere, reserved=False)) is not Refusal
            return ticket

        with sequencer.lock:
            sequencer.open_account(Account("bank", "USD", None), Completion())
            sequencer.open_account(Account("a", "USD", 0), Completion())
        commit(TransferRequest("q", "bank", "a", 5, pending=True, timeout_s=HOUR_S))
        commit(TransferRequest("s", "bank", "a", 5, pending=True, timeout_s=HOUR_S))
        commit(Resolution("void-s", "s", void=True))  # stale 1, live 1: not yet
        assert compactions == [] and len(sequencer._deadlines) == 2
        chain = commit(TransferRequest("p", "bank", "a", 5, pending=True, timeout_s=60), Resolution("post-q", "q"),
                       linked=True)  # stale 2, live 1 (p): compacted, p kept
        deadline = chain.value[0].timestamp + 60 * NS_PER_S  # type: ignore[index]
        assert compactions == [3]
        assert sequencer._deadlines == [(deadline, "p")] and sequencer._deadlines_stale == 0
        clock.now_ns = deadline - 1
        assert sequencer.expire(nowhere, nowhere)[0] == 0
        clock.now_ns = deadline
        expired, lsn = sequencer.expire(nowhere, nowhere)
        assert expired == 1 and sequencer.pending == {} and sequencer._deadlines == []
        journal.wait_durable(lsn, WAIT_S)
    finally:
        journal.close()


def test_concurrent_pending_transfers_posted_voided_and_left_all_resolve_and_conserve_money(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch, compactions: list[int]) -> None:
    """Clients on several threads make pending transfers with a timeout (singly, in batches,
    in chains) and post, void or leave each, while another thread moves the clock and expires
    what is due; the heap compacts meanwhile (a slack of 8). At the end the heap is within its
    bound, and once the clock passes every deadline, each one left open has expired, each
    resolved one kept its resolution, nothing is held, and the books balance."""
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_STALE_SLACK", 8)
    clock = Clock()
    clients, operations = 6, 60
    names = [f"acct-{n}" for n in range(8)]
    outcomes: dict[str, str] = {}  # pending id -> "posted" | "voided" | "left"
    errors: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(clients + 1, timeout=WAIT_S)
    done = threading.Event()

    with Ledger.open(ledger_path, clock_ns=clock, dispatcher_threads=4) as ledger:
        fund(ledger, names)

        def client(number: int) -> None:
            rng = random.Random(20_261_207 + number)
            start.wait()
            for op in range(operations):
                source, destination = rng.sample(names, 2)
                tid = f"p-{number}-{op}"
                fate = rng.choice(("posted", "voided", "posted", "voided", "left"))
                timeout = rng.randint(1, 60) if fate == "left" else HOUR_S
                request = TransferRequest(tid, source, destination, rng.randint(1, 9), pending=True, timeout_s=timeout)
                try:
                    way = op % 4
                    if way == 0:
                        made: object = ledger.transfer(tid, source=source, destination=destination,
                                                       amount=request.amount, pending=True, timeout_s=timeout)
                    elif way == 1:
                        [made] = ledger.transfer_many([request])
                    elif way == 2:
                        made = ledger.transfer_linked([request])[0]
                    else:  # the mailboxes' path
                        [made] = Batch(ledger._coordinator, [request], WAIT_S).run()
                    assert isinstance(made, Transfer), made
                    if fate != "left" and op % 2:
                        [resolved] = Batch(ledger._coordinator, [Resolution(f"r-{tid}", tid, void=fate == "voided")],
                                           WAIT_S).run()
                        if isinstance(resolved, LedgerError):
                            raise resolved
                    elif fate == "posted":
                        ledger.post_pending(f"r-{tid}", pending_id=tid)
                    elif fate == "voided":
                        ledger.void_pending(f"r-{tid}", pending_id=tid)
                except PendingTransferExpired:  # cannot happen: an hour is never reached while clients run
                    fate = "expired too soon"
                except LedgerError as error:
                    with lock:
                        errors.append(f"{tid}: {error!r}")
                    continue
                with lock:
                    outcomes[tid] = fate

        def expirer() -> None:
            start.wait()
            while not done.is_set():
                clock.now_ns += NS_PER_S // 10
                ledger.expire_pending()
                done.wait(0.001)

        workers = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
        expiring = threading.Thread(target=expirer)
        for thread in (*workers, expiring):
            thread.start()
        for worker in workers:
            worker.join(WAIT_S * 6)
        done.set()
        expiring.join(WAIT_S)
        assert not any(thread.is_alive() for thread in (*workers, expiring))
        assert errors == []
        assert len(outcomes) == clients * operations
        assert "expired too soon" not in outcomes.values()
        assert_heap_bounded(ledger, 8)
        assert compactions, "the heap was never compacted"

        clock.now_ns += 2 * HOUR_S * NS_PER_S
        ledger.expire_pending()
        statuses = {tid: status_of(ledger, tid) for tid in outcomes}
        assert statuses == {tid: "expired" if fate == "left" else fate for tid, fate in outcomes.items()}
        assert heap_of(ledger) == [] and ledger._sequencer.pending == {}
        final = {name: ledger.balance(name) for name in ["bank", *names]}
        assert all(balance.pending == balance.incoming == 0 for balance in final.values())
        assert sum(balance.posted for balance in final.values()) == 0
    assert audit_of(ledger_path).whole


def test_a_stamp_left_unentered_by_an_interrupt_puts_compaction_off_and_fails_no_write(
        books: Ledger, compactions: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Only an interrupt between a failed append and `_not_appended` leaves a stamp unentered
    (`_unentered`): its deadline could be dropped, so the heap is not compacted then, and the
    writes go on (an assertion there had failed every later write until a reopen)."""
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_STALE_SLACK", 2)
    made = books.transfer_many([TransferRequest(f"p-{n}", "alice", "bob", 1, pending=True, timeout_s=HOUR_S)
                                for n in range(8)])
    assert all(isinstance(transfer, Transfer) for transfer in made)
    sequencer = books._sequencer
    with sequencer.lock:
        left = sequencer._unentered
        sequencer._unentered = ((), [made[0]], 0, 0)  # (what such an interrupt leaves: any legs)
    for n in range(8):
        assert books.post_pending(f"post-{n}", pending_id=f"p-{n}").kind == "post"
    assert compactions == []
    with sequencer.lock:
        sequencer._unentered = left
    books.transfer("after", source="alice", destination="bob", amount=1)
    assert compactions and len(heap_of(books)) <= 2


def _interrupted_mid_step(ledger_path: Path, monkeypatch: pytest.MonkeyPatch, clock: Clock) -> Ledger:
    """A ledger whose compaction's next step is interrupted right after its first push: that
    entry is then in both heaps, and the next step pushes it again (two equal copies)."""
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_STALE_SLACK", 2)
    monkeypatch.setattr(coordinator._deadlines, "DEADLINES_DRAIN_STEP", 4)
    ledger = Ledger.open(ledger_path, clock_ns=clock)
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("bob", currency="USD")
    made = ledger.transfer_many([TransferRequest(f"p-{n}", "bank", "bob", 1, pending=True, timeout_s=100)
                                 for n in range(40)])
    assert all(isinstance(transfer, Transfer) for transfer in made)
    sequencer, n = ledger._sequencer, 0
    while not sequencer._draining:  # posts until a compaction starts
        ledger.post_pending(f"post-{n}", pending_id=f"p-{n}")
        n += 1
    pushes = [0]

    def heappush(heap: list[tuple[int, str]], item: tuple[int, str]) -> None:  # an interrupt after the first push
        heapq.heappush(heap, item)
        pushes[0] += 1
        if pushes[0] == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(coordinator._deadlines, "heapq", types.SimpleNamespace(heappush=heappush))
    with pytest.raises(KeyboardInterrupt):
        ledger.transfer("plain-1", source="bank", destination="bob", amount=1)  # queued; its `_appended` steps
    monkeypatch.setattr(coordinator._deadlines, "heapq", heapq)
    both = sequencer._deadlines + sequencer._draining
    assert any(both.count(entry) > 1 for entry in both)  # a live entry twice
    ledger.transfer("plain-2", source="bank", destination="bob", amount=1)  # the ledger writes on
    clock.advance(200)
    return ledger


def test_an_entry_an_interrupted_step_left_twice_expires_once(ledger_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Both copies come due together; the expiry takes the id once (before, twice: the
    expiry's record named it twice, and writes stopped until a reopen)."""
    clock = Clock()
    ledger = _interrupted_mid_step(ledger_path, monkeypatch, clock)
    try:
        still_open = len(ledger._sequencer.pending)
        assert still_open and ledger.expire_pending() == still_open
        assert not ledger._sequencer.pending
        assert all(status_of(ledger, f"p-{n}") in ("posted", "expired") for n in range(40))
        ledger.transfer("plain-3", source="bank", destination="bob", amount=1)  # writes go on
    finally:
        ledger.close()
    assert audit_of(ledger_path).whole


def test_an_entry_left_twice_expires_once_even_when_the_writer_takes_the_record_first(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same, with the writer given time to make the expiry's record durable before the
    expiry moves memory: the journal reopens (before: "ids repeated", damage)."""
    clock = Clock()
    ledger = _interrupted_mid_step(ledger_path, monkeypatch, clock)
    real_point = coordinator._sequencer.crash_point

    durable: list[bool] = []

    def switch(name: str) -> None:
        if name == "during-expiry":  # the record is queued: the writer makes it durable before memory moves
            journal = ledger._journal
            journal.wait_durable(journal.last_lsn, WAIT_S)  # (raises if it is not, in time)
            durable.append(journal.durable_lsn == journal.last_lsn)
        real_point(name)

    monkeypatch.setattr(coordinator._sequencer, "crash_point", switch)
    try:
        ledger.expire_pending()
    finally:
        ledger.close()
    assert durable == [True]  # one record, durable before the expiry moved memory
    with Ledger.open(ledger_path, clock_ns=clock) as again:
        assert not again._sequencer.pending
    assert audit_of(ledger_path).whole


def test_an_interrupt_in_an_expiry_before_its_record_is_queued_leaves_what_it_took_due(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interrupt lands after the due entries were taken off the heap, before the record:
    nothing is written, writes go on, and they expire at the next expiry (before, they were
    dropped: pending until a reopen)."""
    clock = Clock()
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("bob", currency="USD")
        ledger.transfer("p-1", source="bank", destination="bob", amount=1, pending=True, timeout_s=10)
        clock.advance(20)
        interrupt_after(monkeypatch, coordinator._sequencer, "holds_expired")
        with pytest.raises(KeyboardInterrupt):
            ledger.expire_pending()
        assert status_of(ledger, "p-1") == "pending"
        ledger.transfer("plain", source="bank", destination="bob", amount=1)  # writes go on
        assert ledger.expire_pending() == 1
        assert status_of(ledger, "p-1") == "expired"
    assert audit_of(ledger_path).whole


def test_an_interrupt_once_an_expirys_hold_rows_are_being_added_stops_writes_until_reopened(
        ledger_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The interrupt lands after the expiry's hold rows went into memory (or partway through),
    before its record is queued: those rows are of a record that will never be, and the next
    record takes its LSN, so memory cannot be trusted: writes stop, and the reopened ledger
    (the journal's) expires the pending transfer at once and audits whole (before, the rows
    stayed: history read the wrong pending amounts, and the audit found rows no record makes)."""
    from coordinator._entries import UnindexedEntries
    from engine import LedgerUnavailable

    clock = Clock()
    ledger = Ledger.open(ledger_path, clock_ns=clock)
    try:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("bob", currency="USD")
        ledger.transfer("p-1", source="bank", destination="bob", amount=5, pending=True, timeout_s=10)
        clock.advance(20)
        interrupt_after(monkeypatch, UnindexedEntries, "add")  # the expiry's hold rows: its one add
        with pytest.raises(KeyboardInterrupt):
            ledger.expire_pending()
        with pytest.raises(LedgerUnavailable):
            ledger.transfer("plain", source="bank", destination="bob", amount=1)
    finally:
        ledger.close()
    with Ledger.open(ledger_path, clock_ns=clock) as reopened:
        assert status_of(reopened, "p-1") == "expired"
        assert reopened.balance("bob").incoming == 0
    assert audit_of(ledger_path).whole
