"""Many threads on a few accounts: every reply is audited against the ledger afterwards.

Each workload is seeded (a failing run replays with the same seed). Threads start
together on a barrier; pairs of threads also meet on a barrier before each shared
request, so the same transfer id is in flight from two threads at once. Afterwards
the auditor checks every acknowledged transfer, every refusal, and the invariants
(conservation, overdraft limits, gapless running balances, nothing pending), then
closes and reopens the ledger and compares state hashes.
"""

from __future__ import annotations

import random
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from coordinator._admission import Admission
from engine import (
    Balance,
    InsufficientFunds,
    Ledger,
    LedgerError,
    LedgerTimeout,
    Transfer,
    TransferRequest,
)

SEED = 20_240_601
TIMEOUT_S = 20.0
"""Bound on every ledger call, barrier and join in this file."""
BANK = "bank"
ACCOUNTS = ("a", "b", "c", "d")
FUNDING = 1_000
AMOUNT_MAX = 400
"""Large against FUNDING, so refusals for insufficient funds are common."""

THREADS = 32
TRANSFERS_PER_THREAD = 160
SHARED_EVERY = 4
"""Every 4th request of a thread is shared with its partner thread (same id, same fields)."""

BATCH_THREADS = 8
BATCHES_PER_THREAD = 24
BATCH_SIZE = 8

Outcome = Transfer | LedgerError


@dataclass
class Workload:
    """What the clients sent and what they were told, gathered from every thread."""

    requests: dict[str, TransferRequest] = field(default_factory=dict)
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    """The first reply seen for each id."""
    disagreements: list[str] = field(default_factory=list)
    """Ids for which two threads were told different things."""
    unexpected: list[str] = field(default_factory=list)
    """Replies that are neither a matching Transfer nor InsufficientFunds."""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, request: TransferRequest, outcome: Outcome) -> None:
        with self.lock:
            self.requests[request.id] = request
            if isinstance(outcome, Transfer):
                if (outcome.id, outcome.source, outcome.destination, outcome.amount) != (
                    request.id, request.source, request.destination, request.amount
                ):
                    self.unexpected.append(f"{request} answered with {outcome}")
            elif type(outcome) is not InsufficientFunds:
                self.unexpected.append(f"{request} raised {outcome!r}")
            first = self.outcomes.setdefault(request.id, outcome)
            if not same_outcome(first, outcome):
                self.disagreements.append(f"{request.id}: {first!r} vs {outcome!r}")

    @property
    def acknowledged(self) -> dict[str, Transfer]:
        return {tid: outcome for tid, outcome in self.outcomes.items() if isinstance(outcome, Transfer)}

    @property
    def refused(self) -> dict[str, TransferRequest]:
        return {tid: self.requests[tid] for tid, outcome in self.outcomes.items() if not isinstance(outcome, Transfer)}


def same_outcome(first: Outcome, second: Outcome) -> bool:
    if isinstance(first, Transfer) or isinstance(second, Transfer):
        return first == second
    return type(first) is type(second)


def call(ledger: Ledger, request: TransferRequest) -> Outcome:
    try:
        return ledger.transfer(request.id, source=request.source, destination=request.destination,
                               amount=request.amount)
    except LedgerError as error:
        return error


def random_request(rng: random.Random, transfer_id: str) -> TransferRequest:
    # Mostly among the limited accounts; now and then the bank pays one of them.
    source, destination = rng.sample((BANK, *ACCOUNTS) if rng.random() < 0.1 else ACCOUNTS, 2)
    return TransferRequest(transfer_id, source, destination, rng.randint(1, AMOUNT_MAX))


def run_threads(count: int, target: Callable[[int, threading.Barrier], None]) -> None:
    """Start `count` threads on one barrier; fail the test if any raised or did not finish in time."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def guarded(n: int) -> None:
        try:
            target(n, start)
        except BaseException as error:  # reported below, on the test's thread
            errors.append(error)
            start.abort()

    threads = [threading.Thread(target=guarded, args=(n,), name=f"client-{n}", daemon=True) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=TIMEOUT_S * 3)
    assert not [thread.name for thread in threads if thread.is_alive()], "client threads did not finish in time"
    if errors:
        raise errors[0]


class BalanceObserver:
    """A thread reading every balance over and over while the clients run.

    Holds make `available` lower than `posted` mid-flight, but never below
    `-overdraft_limit`, and `pending` is never negative.
    """

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._stop = threading.Event()
        self.snapshots = 0
        self.violations: list[str] = []
        self._thread = threading.Thread(target=self._run, name="balance-observer", daemon=True)

    def __enter__(self) -> BalanceObserver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=TIMEOUT_S)
        assert not self._thread.is_alive(), "the observer did not stop in time"

    def _run(self) -> None:
        limits = {account.id: account.overdraft_limit for account in self._ledger.accounts()}
        while not self._stop.is_set():
            for account_id, limit in limits.items():
                try:
                    balance = self._ledger.balance(account_id)
                except LedgerError as error:
                    self.violations.append(f"{account_id}: {error!r}")
                    return
                self.snapshots += 1
                if balance.pending < 0 or balance.available != balance.posted - balance.pending or (
                    limit is not None and balance.available < -limit
                ):
                    self.violations.append(f"{account_id}: {balance}")


@pytest.fixture
def open_ledger(ledger_path: Path) -> Iterator[Callable[..., Ledger]]:
    """Open the ledger at `ledger_path` (with options); everything opened is closed after the test."""
    opened: list[Ledger] = []

    def open_(**options: float) -> Ledger:
        options.setdefault("timeout_s", TIMEOUT_S)
        ledger = Ledger.open(ledger_path, **options)
        opened.append(ledger)
        return ledger

    yield open_
    for ledger in opened:
        ledger.close()


def funded(ledger: Ledger) -> Workload:
    """Open the bank and every account and fund each: the workload that recorded it."""
    workload = Workload()
    ledger.create_account(BANK, currency="USD", overdraft_limit=None)
    for account_id in ACCOUNTS:
        ledger.create_account(account_id, currency="USD", overdraft_limit=0)
        request = TransferRequest(f"fund-{account_id}", BANK, account_id, FUNDING)
        workload.record(request, call(ledger, request))
    return workload


# --- the auditor -----------------------------------------------------------------------


def audit(ledger: Ledger, workload: Workload) -> str:
    """Check every reply and every invariant; return the state hash."""
    assert workload.unexpected == []
    assert workload.disagreements == []
    acknowledged = workload.acknowledged
    assert acknowledged, "the workload committed nothing: it tests nothing"
    assert workload.refused, "the workload refused nothing: the overdraft check went untested"

    expected_posted = Counter[str]()
    for transfer in acknowledged.values():
        expected_posted[transfer.source] -= transfer.amount
        expected_posted[transfer.destination] += transfer.amount

    seen: Counter[tuple[str, str]] = Counter()
    total = 0
    for account in ledger.accounts():
        entries = ledger.entries(account.id)
        running = 0
        for seq, entry in enumerate(entries, start=1):
            running += entry.amount
            assert (entry.account, entry.seq, entry.balance) == (account.id, seq, running)
            if account.overdraft_limit is not None:
                assert entry.balance >= -account.overdraft_limit, entry
            transfer = acknowledged.get(entry.transfer_id)
            assert transfer is not None, f"entry {entry} belongs to no acknowledged transfer"
            assert entry.lsn == transfer.lsn
            assert entry.amount == (-transfer.amount if account.id == transfer.source else transfer.amount)
            assert account.id in (transfer.source, transfer.destination)
            seen[(entry.transfer_id, account.id)] += 1
        assert ledger.balance(account.id) == Balance(running, 0, running), "posted = entries, nothing pending"
        assert running == expected_posted[account.id], "the balance is what the acknowledged transfers add up to"
        total += running
    assert total == 0, "money is conserved"

    for tid, transfer in acknowledged.items():
        assert ledger.get_transfer(tid) == transfer
        assert seen[(tid, transfer.source)] == 1 and seen[(tid, transfer.destination)] == 1
    assert sum(seen.values()) == 2 * len(acknowledged)

    for tid, request in workload.refused.items():
        assert ledger.get_transfer(tid) is None
        assert type(call(ledger, request)) is InsufficientFunds, f"retry of refused {tid} must be refused again"
    for tid, request in list(workload.requests.items())[:: max(1, len(workload.requests) // 50)]:
        assert same_outcome(call(ledger, request), workload.outcomes[tid]), f"retry of {tid}"
    return ledger.state_hash()


def assert_reopens_to_the_same_state(ledger: Ledger, open_ledger: Callable[..., Ledger], state_hash: str) -> None:
    ledger.close()
    reopened = open_ledger()
    assert reopened.state_hash() == state_hash
    for account in reopened.accounts():
        assert reopened.balance(account.id).pending == 0


# --- tests ---------------------------------------------------------------------------


LEDGER_OPTIONS = [
    pytest.param({"dispatcher_threads": 1}, id="one-dispatcher-thread"),
    pytest.param({"dispatcher_threads": 4}, id="four-dispatcher-threads"),
    pytest.param({"dispatcher_threads": 2, "actors_live_max": 2}, id="passivating-all-the-time"),
]
"""The default pool; a larger pool; and fewer live actors than accounts in use, so
idle actors are passivated and reactivated while transfers are in flight."""


def audit_and_reopen(ledger: Ledger, open_ledger: Callable[..., Ledger], workload: Workload, requests: int) -> None:
    """Every one of the `requests` distinct requests sent (besides the fundings) was recorded,
    the books agree with every reply, and reopening gives the same state."""
    assert len(workload.requests) == len(ACCOUNTS) + requests
    state_hash = audit(ledger, workload)
    assert_reopens_to_the_same_state(ledger, open_ledger, state_hash)


def run_paired_clients(
    ledger: Ledger,
    options: dict[str, int],
    threads: int,
    rounds: int,
    shared_every: int,
    send: Callable[[random.Random, str], Callable[[], None]],
) -> None:
    """Run `threads` clients in pairs for `rounds` rounds while balances are watched. Every
    `shared_every`-th round both partners of a pair draw the same request(s) from a shared
    seed and send them at the same instant (a race of same-id retries); the other rounds
    each draws its own. `send(rng, tag)` draws and returns the sending step."""
    pair_barriers = [threading.Barrier(2) for _ in range(threads // 2)]

    def client(n: int, start: threading.Barrier) -> None:
        pair = n // 2
        own = random.Random(SEED * 1_000 + n)
        shared = random.Random(SEED * 1_000_000 + pair)  # both partners draw the same shared requests
        start.wait(timeout=TIMEOUT_S)
        for k in range(rounds):
            if k % shared_every == 0:
                sending = send(shared, f"p{pair}-{k}")
                pair_barriers[pair].wait(timeout=TIMEOUT_S)  # both partners send it at once
            else:
                sending = send(own, f"w{n}-{k}")
            sending()

    with BalanceObserver(ledger) as observer:
        run_threads(threads, client)
    assert observer.snapshots > 0 and observer.violations == []
    if "actors_live_max" in options:
        assert ledger.stats()["passivations"] > 0


@pytest.mark.parametrize("options", LEDGER_OPTIONS)
def test_concurrent_transfers_and_same_id_retries_keep_every_invariant(
    open_ledger: Callable[..., Ledger], options: dict[str, int]
) -> None:
    ledger = open_ledger(**options)
    workload = funded(ledger)

    def send(rng: random.Random, tag: str) -> Callable[[], None]:
        request = random_request(rng, tag)
        return lambda: workload.record(request, call(ledger, request))

    run_paired_clients(ledger, options, THREADS, TRANSFERS_PER_THREAD, SHARED_EVERY, send)
    shared = THREADS // 2 * TRANSFERS_PER_THREAD // SHARED_EVERY
    own = THREADS * (TRANSFERS_PER_THREAD - TRANSFERS_PER_THREAD // SHARED_EVERY)
    audit_and_reopen(ledger, open_ledger, workload, requests=shared + own)


@pytest.mark.parametrize("options", LEDGER_OPTIONS)
def test_concurrent_batches_and_same_batch_retries_keep_every_invariant(
    open_ledger: Callable[..., Ledger], options: dict[str, int]
) -> None:
    ledger = open_ledger(**options)
    workload = funded(ledger)

    def send(rng: random.Random, tag: str) -> Callable[[], None]:
        batch = [random_request(rng, f"b{tag}-{i}") for i in range(BATCH_SIZE)]

        def sending() -> None:
            outcomes = ledger.transfer_many(batch)
            assert len(outcomes) == len(batch)
            for request, outcome in zip(batch, outcomes):
                workload.record(request, outcome)

        return sending

    run_paired_clients(ledger, options, BATCH_THREADS, BATCHES_PER_THREAD, 2, send)
    shared = BATCH_THREADS // 2 * BATCHES_PER_THREAD // 2 * BATCH_SIZE
    own = BATCH_THREADS * BATCHES_PER_THREAD // 2 * BATCH_SIZE
    audit_and_reopen(ledger, open_ledger, workload, requests=shared + own)


def test_single_transfers_and_batches_mixed_keep_every_invariant(open_ledger: Callable[..., Ledger]) -> None:
    ledger = open_ledger(dispatcher_threads=2)
    workload = funded(ledger)

    def client(n: int, start: threading.Barrier) -> None:
        rng = random.Random(SEED * 7 + n)
        start.wait(timeout=TIMEOUT_S)
        for k in range(20):
            if n % 2:
                batch = [random_request(rng, f"m{n}-{k}-{i}") for i in range(4)]
                for request, outcome in zip(batch, ledger.transfer_many(batch)):
                    workload.record(request, outcome)
            else:
                request = random_request(rng, f"m{n}-{k}")
                workload.record(request, call(ledger, request))

    with BalanceObserver(ledger) as observer:
        run_threads(16, client)
    assert observer.snapshots > 0 and observer.violations == []
    state_hash = audit(ledger, workload)
    assert_reopens_to_the_same_state(ledger, open_ledger, state_hash)


def test_a_ledger_with_a_single_live_actor_still_moves_money_and_reads_balances(
    open_ledger: Callable[..., Ledger],
) -> None:
    # A transfer pins two accounts, so the live set must exceed actors_live_max for a
    # moment; only idle actors may be passivated, never the one just activated for use.
    # (Regression: pin() used to passivate the actor it had just activated, before
    # pinning it, so the credit hit a stopped actor and balance() raised KeyError.)
    ledger = open_ledger(actors_live_max=1)
    ledger.create_account(BANK, currency="USD", overdraft_limit=None)
    ledger.create_account("a", currency="USD")
    transfer = ledger.transfer("t-1", source=BANK, destination="a", amount=100)
    assert ledger.get_transfer("t-1") == transfer
    assert ledger.balance(BANK) == Balance(-100, 0, -100)
    assert ledger.balance("a") == Balance(100, 0, 100)
    assert ledger.stats()["in_flight"] == 0


def test_a_batch_that_times_out_waiting_for_admission_leaves_its_accounts_usable(
    open_ledger: Callable[..., Ledger], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scheduling is forced, not hoped for: the batch's thread announces it is about to
    # wait for admission (its turns taken), and waits until the other thread has the only
    # permit. That thread's transfer debits an account the batch holds.
    batch_holds_turns = threading.Event()
    single_admitted = threading.Event()
    real_admit = Admission.admit

    def admit(self: Admission, permits: int, timeout_s: float) -> None:
        if threading.current_thread().name == "batch":
            batch_holds_turns.set()
            assert single_admitted.wait(TIMEOUT_S)
            real_admit(self, permits, timeout_s)
        else:
            real_admit(self, permits, timeout_s)
            if threading.current_thread().name == "single":
                single_admitted.set()

    monkeypatch.setattr(Admission, "admit", admit)
    ledger = open_ledger(inflight_max=1, timeout_s=1.0)
    for account_id in ("x", "y", "z"):
        ledger.create_account(account_id, currency="USD", overdraft_limit=None)
    outcomes: dict[str, object] = {}

    def batch() -> None:
        try:
            outcomes["batch"] = ledger.transfer_many([TransferRequest("b-1", "x", "y", 5)])
        except LedgerError as error:
            outcomes["batch"] = error

    def single() -> None:
        assert batch_holds_turns.wait(TIMEOUT_S)
        outcomes["single"] = call(ledger, TransferRequest("s-1", "x", "z", 7))

    threads = [threading.Thread(target=batch, name="batch"), threading.Thread(target=single, name="single")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT_S)
    assert not any(thread.is_alive() for thread in threads)
    # The race was the one forced above (else this test checks nothing): the batch waited for
    # admission once the single transfer held the only permit, and that transfer was answered.
    assert batch_holds_turns.is_set() and single_admitted.is_set()
    assert isinstance(outcomes.get("single"), (Transfer, LedgerTimeout)), outcomes.get("single")
    # The batch asks for its permit before it takes any turn, so the single transfer
    # (which holds the permit) can finish and the batch then gets it; a timeout would
    # be acceptable too. What must never happen is a stuck account.
    assert isinstance(outcomes["batch"], (list, LedgerTimeout)), outcomes["batch"]

    # A timeout means "outcome unknown, retry": once the batch has given up, the
    # transfer that held the permit must be able to finish, and x must answer.
    retried = call(ledger, TransferRequest("s-1", "x", "z", 7))
    assert isinstance(retried, Transfer), retried
    batch_moved = 5 if isinstance(outcomes["batch"], list) and isinstance(outcomes["batch"][0], Transfer) else 0
    assert ledger.balance("x") == Balance(-7 - batch_moved, 0, -7 - batch_moved)
    assert ledger.transfer("after", source="x", destination="y", amount=1).amount == 1
