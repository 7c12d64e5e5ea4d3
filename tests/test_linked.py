"""Linked chains (`Ledger.transfer_linked`): all legs or none, in order, at one LSN.

Each leg sees the effects of the legs before it (money can pass through an empty account),
the whole chain is one journal record, and a refusal is journaled for every id of the
chain: `LinkedTransferFailed` names the first refused leg (`.index`) and its own error
(`.cause`). The race test checks the atomicity the way an auditor would: from the entries,
every leg of a committed chain has both of its entries and no leg of a refused chain has any.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from coordinator import DebitStep, Refusal, _history
from coordinator._participant import reservations
from coordinator._postings import postings
from coordinator._taking import give_back_turns, take_turns
from coordinator._values import PENDING, SINGLE

from engine import (
    AccountNotFound,
    Balance,
    BalanceOverflow,
    CurrencyMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    Ledger,
    LedgerError,
    LinkedTransferFailed,
    PendingTransferAlreadyPosted,
    PendingTransferExpired,
    Transfer,
    TransferRequest,
)
from support import NS_PER_S, START_NS, Clock, balances, written

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 60.0
WAIT_S = 20.0
"""Bound on every barrier and thread join in this file."""



def open_accounts(ledger: Ledger) -> None:
    """bank (no limit); a with 100; b and c with 0; all USD; euro in EUR."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "b", "c"):
        ledger.create_account(name, currency="USD")
    ledger.create_account("euro", currency="EUR")
    ledger.transfer("fund-a", source="bank", destination="a", amount=100)


@pytest.fixture
def books(ledger: Ledger) -> Ledger:
    open_accounts(ledger)
    return ledger


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def clocked(ledger_path: Path, clock: Clock) -> Iterator[Ledger]:
    with Ledger.open(ledger_path, clock_ns=clock) as opened:
        open_accounts(opened)
        yield opened


def leg(tid: str, source: str, destination: str, amount: int, **fields: Any) -> TransferRequest:
    return TransferRequest(tid, source, destination, amount, **fields)


def tally(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m engine ARGS` from this tree (bounded)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=env, check=False)


# --- committed chains --------------------------------------------------------------


def test_a_chain_moves_money_through_an_account_that_starts_empty(books: Ledger) -> None:
    chain = [leg("l-1", "a", "b", 60), leg("l-2", "b", "c", 60)]

    made = books.transfer_linked(chain)

    assert [(t.id, t.source, t.destination, t.amount, t.kind, t.status) for t in made] == [
        ("l-1", "a", "b", 60, "single", "posted"), ("l-2", "b", "c", 60, "single", "posted")]
    assert made[0].lsn == made[1].lsn
    assert balances(books, "a", "b", "c") == {
        "a": Balance(40, 0, 40, 0), "b": Balance(0, 0, 0, 0), "c": Balance(60, 0, 60, 0)}
    assert [(e.seq, e.transfer_id, e.amount, e.balance, e.lsn) for e in books.entries("b")] == [
        (1, "l-1", 60, 60, made[0].lsn), (2, "l-2", -60, 0, made[0].lsn)]
    assert [books.get_transfer(t.id) for t in made] == made


def test_a_committed_chain_retried_returns_the_same_transfers(books: Ledger) -> None:
    chain = [leg("l-1", "a", "b", 60, code=3, reference="r", metadata={"k": 1}), leg("l-2", "b", "c", 60)]
    made = books.transfer_linked(chain)

    assert books.transfer_linked(list(chain)) == made
    assert books.balance("c") == Balance(60, 0, 60, 0)
    assert (made[0].code, made[0].reference, made[0].metadata) == (3, "r", {"k": 1})


@pytest.mark.parametrize("fate", ["committed", "refused"])
def test_the_retry_of_a_long_chain_reads_its_record_once_not_once_a_leg(
        books: Ledger, monkeypatch: pytest.MonkeyPatch, fate: str) -> None:
    """Every leg's id names the chain's one record: a retry reads and checks it once (once a
    leg, a retry of 1,000 legs decoded it 1,000 times, for seconds, holding every claim stripe)."""
    chain = [leg(f"l-{i}", "bank" if fate == "committed" else "b", "c", 1) for i in range(200)]
    if fate == "committed":
        made: Any = books.transfer_linked(chain)
    else:
        with pytest.raises(LinkedTransferFailed) as first:
            books.transfer_linked(chain)
        made = first.value
    reads: list[int] = []
    real = _history.record_at
    monkeypatch.setattr(_history, "record_at", lambda journal, lsn, txn: reads.append(lsn) or real(journal, lsn, txn))
    if fate == "committed":
        assert books.transfer_linked(list(chain)) == made
    else:
        with pytest.raises(LinkedTransferFailed) as again:
            books.transfer_linked(list(chain))
        assert (again.value.index, str(again.value)) == (made.index, str(made))
    assert len(reads) == 1


def test_a_later_leg_sees_the_debits_of_the_earlier_ones(books: Ledger) -> None:
    before = books.state_hash()

    with pytest.raises(LinkedTransferFailed) as refused:
        books.transfer_linked([leg("l-1", "a", "b", 60), leg("l-2", "a", "c", 60)])

    assert refused.value.index == 1 and type(refused.value.cause) is InsufficientFunds
    assert books.state_hash() == before


def test_a_chain_of_one_leg_returns_a_list_of_one_transfer(books: Ledger) -> None:
    made = books.transfer_linked([leg("l-1", "a", "b", 1)])

    assert len(made) == 1 and isinstance(made[0], Transfer)
    assert (made[0].id, made[0].amount, made[0].kind) == ("l-1", 1, "single")
    assert books.transfer_linked([leg("l-1", "a", "b", 1)]) == made
    with pytest.raises(LinkedTransferFailed) as refused:
        books.transfer_linked([leg("l-2", "b", "c", 2)])
    assert refused.value.index == 0 and type(refused.value.cause) is InsufficientFunds


def test_a_chain_of_1000_legs_commits_at_one_lsn_with_consecutive_timestamps(books: Ledger) -> None:
    ring = [f"r{n}" for n in range(10)]
    for name in ring:
        books.create_account(name, currency="USD")
    chain = [leg("coin-0", "bank", ring[0], 1)]
    chain += [leg(f"coin-{n}", ring[(n - 1) % 10], ring[n % 10], 1) for n in range(1, 1000)]
    before = books.transfer("before", source="bank", destination="c", amount=1)

    made = books.transfer_linked(chain)
    after = books.transfer("after", source="bank", destination="c", amount=1)

    assert [t.id for t in made] == [request.id for request in chain]
    assert {t.lsn for t in made} == {made[0].lsn}
    assert [t.timestamp for t in made] == list(range(made[0].timestamp, made[0].timestamp + 1000))
    assert before.timestamp < made[0].timestamp and made[-1].timestamp < after.timestamp
    assert before.lsn < made[0].lsn < after.lsn
    held = {name: books.balance(name).posted for name in ring}
    assert held == {**dict.fromkeys(ring, 0), ring[999 % 10]: 1}
    assert sum(len(books.entries(name)) for name in ring) == 2 * 999 + 1


def test_every_leg_of_a_chain_and_its_entries_share_one_lsn_and_consecutive_timestamps(
    clocked: Ledger, clock: Clock
) -> None:
    clocked.create_account("d", currency="USD")
    first = clocked.transfer("t-1", source="bank", destination="b", amount=5)
    clock.advance(1)

    made = clocked.transfer_linked([leg("l-1", "a", "c", 10), leg("l-2", "b", "d", 5), leg("l-3", "c", "d", 10)])

    assert {t.lsn for t in made} == {first.lsn + 1}
    assert [t.timestamp for t in made] == [clock.now_ns, clock.now_ns + 1, clock.now_ns + 2]
    stamps = {(e.account, e.transfer_id): (e.lsn, e.timestamp) for name in ("a", "b", "c", "d")
              for e in clocked.entries(name) if e.transfer_id.startswith("l-")}
    assert stamps == {
        ("a", "l-1"): (made[0].lsn, made[0].timestamp), ("c", "l-1"): (made[0].lsn, made[0].timestamp),
        ("b", "l-2"): (made[1].lsn, made[1].timestamp), ("d", "l-2"): (made[1].lsn, made[1].timestamp),
        ("c", "l-3"): (made[2].lsn, made[2].timestamp), ("d", "l-3"): (made[2].lsn, made[2].timestamp),
    }
    clock.now_ns -= 5 * NS_PER_S  # the clock stepped back: the next transfer still comes after the chain
    assert clocked.transfer("t-2", source="bank", destination="b", amount=1).timestamp == made[-1].timestamp + 1


# --- refused chains ----------------------------------------------------------------


REFUSED_CHAIN = [leg("l-1", "a", "b", 10), leg("l-2", "b", "c", 500), leg("l-3", "c", "a", 1_000)]
"""l-2 is refused (b holds 10 after l-1); l-3 would be refused too, but l-2 comes first."""


def test_a_refused_chain_moves_nothing_and_names_the_first_refused_leg_and_its_cause(books: Ledger) -> None:
    before = books.state_hash(), balances(books, "a", "b", "c")
    records, durable = written(books)
    entries = {name: books.entries(name) for name in ("a", "b", "c")}

    with pytest.raises(LinkedTransferFailed) as refused:
        books.transfer_linked(REFUSED_CHAIN)

    error = refused.value
    assert error.code == "linked_transfer_failed"
    assert error.index == 1
    assert type(error.cause) is InsufficientFunds and error.cause.code == "insufficient_funds"
    assert (books.state_hash(), balances(books, "a", "b", "c")) == before
    assert {name: books.entries(name) for name in ("a", "b", "c")} == entries
    assert written(books) == (records + 1, durable + 1)  # one refusal record, for the whole chain
    assert [books.get_transfer(request.id) for request in REFUSED_CHAIN] == [None, None, None]


def test_a_refused_chain_retried_raises_the_same_even_once_the_funds_are_there(books: Ledger) -> None:
    with pytest.raises(LinkedTransferFailed):
        books.transfer_linked(REFUSED_CHAIN)
    books.transfer("fund-b", source="bank", destination="b", amount=1_000)
    books.transfer("fund-c", source="bank", destination="c", amount=1_000)
    before = books.state_hash(), written(books)

    with pytest.raises(LinkedTransferFailed) as retried:
        books.transfer_linked(list(REFUSED_CHAIN))

    assert retried.value.index == 1 and type(retried.value.cause) is InsufficientFunds
    assert (books.state_hash(), written(books)) == before


@pytest.mark.parametrize("position", [0, 1, 2])
def test_every_id_of_a_refused_chain_is_consumed_for_a_single_transfer(books: Ledger, position: int) -> None:
    with pytest.raises(LinkedTransferFailed):
        books.transfer_linked(REFUSED_CHAIN)
    request = REFUSED_CHAIN[position]
    before = books.state_hash(), balances(books, "a", "b", "c")

    with pytest.raises(IdempotencyConflict):
        books.transfer(request.id, source="bank", destination="c", amount=1)
    with pytest.raises(IdempotencyConflict):
        books.transfer(request.id, source=request.source, destination=request.destination, amount=request.amount,
                       pending=True)

    assert (books.state_hash(), balances(books, "a", "b", "c")) == before
    assert books.get_transfer(request.id) is None


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_single_transfer_reusing_a_refused_legs_id_and_fields_is_an_idempotency_conflict(
    books: Ledger, position: int
) -> None:
    """A single transfer is not the chain that used the id, even with the leg's own fields
    (`IdempotencyConflict` names "chain" among the fields a retry may not change)."""
    with pytest.raises(LinkedTransferFailed):
        books.transfer_linked(REFUSED_CHAIN)
    request = REFUSED_CHAIN[position]
    before = books.state_hash(), balances(books, "a", "b", "c")

    with pytest.raises(IdempotencyConflict):
        books.transfer(request.id, source=request.source, destination=request.destination, amount=request.amount)

    assert (books.state_hash(), balances(books, "a", "b", "c")) == before


def test_a_single_transfer_reusing_a_committed_legs_id_and_fields_is_an_idempotency_conflict(books: Ledger) -> None:
    books.transfer_linked([leg("l-1", "a", "b", 60), leg("l-2", "b", "c", 60)])
    before = books.state_hash(), written(books)

    with pytest.raises(IdempotencyConflict):
        books.transfer("l-2", source="b", destination="c", amount=60)

    assert (books.state_hash(), written(books)) == before


@pytest.mark.parametrize("other", [
    [leg("l-2", "b", "c", 500)],
    REFUSED_CHAIN[:2],
    [REFUSED_CHAIN[1], REFUSED_CHAIN[0], REFUSED_CHAIN[2]],
    [*REFUSED_CHAIN, leg("l-4", "bank", "a", 1)],
    [leg("new-1", "bank", "b", 5), leg("l-3", "c", "a", 1_000)],
], ids=["one_leg", "prefix", "reordered", "one_more_leg", "shares_an_id"])
def test_reusing_an_id_of_a_refused_chain_in_another_chain_is_an_idempotency_conflict(
    books: Ledger, other: list[TransferRequest]
) -> None:
    with pytest.raises(LinkedTransferFailed):
        books.transfer_linked(REFUSED_CHAIN)
    before = books.state_hash(), balances(books, "a", "b", "c")

    with pytest.raises(IdempotencyConflict):
        books.transfer_linked(other)

    assert (books.state_hash(), balances(books, "a", "b", "c")) == before


def test_a_chain_reusing_an_id_names_that_id_not_a_new_legs(books: Ledger) -> None:
    books.transfer("old", source="a", destination="b", amount=1)

    with pytest.raises(IdempotencyConflict) as raised:
        books.transfer_linked([TransferRequest("brand-new", "a", "b", 1), TransferRequest("old", "a", "b", 1)])

    assert "'old'" in str(raised.value) and "brand-new" not in str(raised.value)
    assert books.outcome("brand-new") is None


def test_reusing_an_id_of_a_committed_chain_with_other_fields_is_an_idempotency_conflict(books: Ledger) -> None:
    made = books.transfer_linked([leg("l-1", "a", "b", 60), leg("l-2", "b", "c", 60)])
    before = books.state_hash()

    with pytest.raises(IdempotencyConflict):
        books.transfer("l-1", source="a", destination="b", amount=61)
    with pytest.raises(IdempotencyConflict):
        books.transfer_linked([leg("l-2", "b", "c", 60)])
    with pytest.raises(IdempotencyConflict) as differs:
        books.transfer_linked([leg("l-1", "a", "b", 60), leg("l-2", "b", "c", 60, code=1)])
    with pytest.raises(IdempotencyConflict) as longer:
        books.transfer_linked([leg("l-1", "a", "b", 60), leg("l-2", "b", "c", 60), leg("l-3", "c", "a", 1)])

    # the message names the chain that used the ids, and where the retry differs (it said
    # "outside this linked chain", as if another record had used them)
    assert "a linked chain whose transfer 1 was 60 from 'b' to 'c'; the retry differs in code" in str(differs.value)
    assert "outside" not in str(differs.value)
    assert "'l-1' was already used" in str(longer.value)  # (its third id is new: the first used one is named)
    assert books.state_hash() == before
    assert books.transfer_linked([leg("l-1", "a", "b", 60), leg("l-2", "b", "c", 60)]) == made


def test_a_chain_naming_an_id_used_before_moves_nothing(books: Ledger) -> None:
    books.transfer("used", source="a", destination="b", amount=1)
    before = books.state_hash(), balances(books, "a", "b", "c")

    with pytest.raises(IdempotencyConflict):
        books.transfer_linked([leg("new-1", "a", "c", 5), leg("used", "a", "b", 1)])

    assert (books.state_hash(), balances(books, "a", "b", "c")) == before
    assert books.get_transfer("new-1") is None


def test_a_chain_across_currencies_is_refused_with_a_currency_mismatch_cause(books: Ledger) -> None:
    before = books.state_hash()

    with pytest.raises(LinkedTransferFailed) as refused:
        books.transfer_linked([leg("l-1", "a", "b", 5), leg("l-2", "a", "euro", 5)])

    assert refused.value.index == 1 and type(refused.value.cause) is CurrencyMismatch
    assert refused.value.cause.code == "currency_mismatch"
    assert books.state_hash() == before
    assert books.balance("a") == Balance(100, 0, 100, 0)


def test_a_chain_naming_an_unknown_account_is_refused_with_an_account_not_found_cause(books: Ledger) -> None:
    with pytest.raises(LinkedTransferFailed) as refused:
        books.transfer_linked([leg("l-1", "a", "b", 5), leg("l-2", "b", "c", 5), leg("l-3", "c", "nobody", 5)])

    assert refused.value.index == 2 and type(refused.value.cause) is AccountNotFound
    assert balances(books, "a", "b", "c") == {
        "a": Balance(100, 0, 100, 0), "b": Balance(0, 0, 0, 0), "c": Balance(0, 0, 0, 0)}


# --- malformed chains: nothing written, no id consumed ----------------------------


def _ring(count: int) -> list[TransferRequest]:
    return [leg(f"l-{n}", "bank", "b", 1) for n in range(count)]


MALFORMED_CHAINS: dict[str, Any] = {
    "empty": [],
    "1001_legs": _ring(1001),
    "duplicate_ids": [leg("l-0", "bank", "b", 1), leg("l-1", "bank", "c", 1), leg("l-0", "bank", "c", 1)],
    "a_bad_amount": [leg("l-0", "bank", "b", 1), leg("l-1", "bank", "c", 0)],
    "a_bad_code": [leg("l-0", "bank", "b", 1, code=70_000)],
    "a_timeout_without_pending": [leg("l-0", "bank", "b", 1, timeout_s=5)],
    "same_source_and_destination": [leg("l-0", "bank", "bank", 1)],
    "not_a_request": [leg("l-0", "bank", "b", 1), {"id": "l-1", "source": "bank", "destination": "c", "amount": 1}],
    "not_a_list": leg("l-0", "bank", "b", 1),
    "a_str": "l-0",
}


@pytest.mark.parametrize("chain", MALFORMED_CHAINS.values(), ids=list(MALFORMED_CHAINS))
def test_a_malformed_chain_is_invalid_writes_nothing_and_consumes_no_id(books: Ledger, chain: Any) -> None:
    before = books.state_hash(), written(books)

    with pytest.raises(InvalidRequest):
        books.transfer_linked(chain)

    assert (books.state_hash(), written(books)) == before
    assert books.get_transfer("l-0") is None
    assert books.transfer("l-0", source="bank", destination="c", amount=2).amount == 2


def test_a_chain_of_exactly_1000_legs_is_accepted_and_1001_is_not(books: Ledger) -> None:
    with pytest.raises(InvalidRequest):
        books.transfer_linked(_ring(1001))

    made = books.transfer_linked(_ring(1000))

    assert len(made) == 1000
    assert books.balance("b") == Balance(1000, 0, 1000, 0)


# --- pending legs ------------------------------------------------------------------


def test_a_chain_with_pending_legs_holds_their_amounts_and_each_is_posted_or_voided_on_its_own(
    clocked: Ledger, clock: Clock
) -> None:
    made = clocked.transfer_linked([
        leg("hold-b", "a", "b", 60, pending=True),
        leg("hold-c", "a", "c", 30, pending=True, timeout_s=100, reference="r-c"),
        leg("top-up", "bank", "a", 10),
    ])

    assert [(t.kind, t.status, t.amount) for t in made] == [
        ("pending", "pending", 60), ("pending", "pending", 30), ("single", "posted", 10)]
    assert made[1].timeout_s == 100 and made[1].reference == "r-c"
    assert balances(clocked, "a", "b", "c") == {
        "a": Balance(110, 90, 20, 0), "b": Balance(0, 0, 0, 60), "c": Balance(0, 0, 0, 30)}

    posted = clocked.post_pending("post-b", pending_id="hold-b", amount=50)
    assert (posted.source, posted.destination, posted.amount, posted.lsn > made[0].lsn) == ("a", "b", 50, True)
    assert balances(clocked, "a", "b", "c") == {
        "a": Balance(60, 30, 30, 0), "b": Balance(50, 0, 50, 0), "c": Balance(0, 0, 0, 30)}
    voided = clocked.void_pending("void-c", pending_id="hold-c")
    assert voided.amount == 30
    assert balances(clocked, "a", "b", "c") == {
        "a": Balance(60, 0, 60, 0), "b": Balance(50, 0, 50, 0), "c": Balance(0, 0, 0, 0)}
    assert [clocked.get_transfer(t.id).status for t in made] == ["posted", "voided", "posted"]
    with pytest.raises(PendingTransferAlreadyPosted):
        clocked.void_pending("void-b", pending_id="hold-b")


def test_a_pending_leg_of_a_chain_expires_at_its_own_deadline(clocked: Ledger, clock: Clock) -> None:
    made = clocked.transfer_linked([leg("hold-1", "a", "b", 10, pending=True, timeout_s=5),
                                    leg("hold-2", "a", "c", 20, pending=True, timeout_s=50)])
    clock.now_ns = made[0].timestamp + 5 * NS_PER_S

    with pytest.raises(PendingTransferExpired):
        clocked.post_pending("post-1", pending_id="hold-1")
    assert clocked.expire_pending() == 1

    assert [clocked.get_transfer(t.id).status for t in made] == ["expired", "pending"]
    assert clocked.balance("a") == Balance(100, 20, 80, 0)
    assert clocked.post_pending("post-2", pending_id="hold-2").amount == 20


def test_a_pending_legs_hold_refuses_a_later_leg_that_would_spend_it(books: Ledger) -> None:
    with pytest.raises(LinkedTransferFailed) as refused:
        books.transfer_linked([leg("hold", "a", "b", 80, pending=True), leg("spend", "a", "c", 30)])

    assert refused.value.index == 1 and type(refused.value.cause) is InsufficientFunds
    assert books.balance("a") == Balance(100, 0, 100, 0)
    assert books.get_transfer("hold") is None


def test_a_pending_legs_incoming_funds_cannot_be_spent_by_a_later_leg(books: Ledger) -> None:
    with pytest.raises(LinkedTransferFailed) as refused:
        books.transfer_linked([leg("hold", "a", "b", 50, pending=True), leg("spend", "b", "c", 50)])

    assert refused.value.index == 1 and type(refused.value.cause) is InsufficientFunds
    assert balances(books, "a", "b") == {"a": Balance(100, 0, 100, 0), "b": Balance(0, 0, 0, 0)}


# --- chains racing single transfers -------------------------------------------------


def test_chains_racing_single_transfers_conserve_money_and_never_commit_part_of_a_chain(ledger_path: Path) -> None:
    accounts = [f"acct-{n}" for n in range(6)]
    funding, rounds = 60, 30
    rng = random.Random(20_250_202)
    chains = {f"chain-{t}-{n}": [leg(f"chain-{t}-{n}-leg-{k}", src, dst, rng.randint(1, 50))
                                 for k, (src, dst) in enumerate(pairwise(path))]
              for t in range(3) for n in range(rounds)
              for path in [rng.sample(accounts, rng.randint(2, 5))]}
    singles = {f"single-{t}-{n}": leg(f"single-{t}-{n}", *rng.sample(accounts, 2), rng.randint(1, 40))
               for t in range(3) for n in range(rounds)}
    committed: dict[str, list[Transfer]] = {}
    refused: dict[str, LinkedTransferFailed] = {}
    single_outcomes: dict[str, Transfer | LedgerError] = {}
    unexpected: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(6, timeout=WAIT_S)

    with Ledger.open(ledger_path, dispatcher_threads=4) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in accounts:
            ledger.create_account(name, currency="USD")
            ledger.transfer(f"fund-{name}", source="bank", destination=name, amount=funding)

        def run_chains(t: int) -> None:
            start.wait()
            for n in range(rounds):
                name = f"chain-{t}-{n}"
                try:
                    made = ledger.transfer_linked(chains[name])
                except LinkedTransferFailed as error:
                    with lock:
                        refused[name] = error
                except Exception as error:  # noqa: BLE001  (reported below)
                    with lock:
                        unexpected.append(f"{name}: {error!r}")
                else:
                    with lock:
                        committed[name] = made

        def run_singles(t: int) -> None:
            start.wait()
            for n in range(rounds):
                request = singles[f"single-{t}-{n}"]
                try:
                    outcome: Transfer | LedgerError = ledger.transfer(
                        request.id, source=request.source, destination=request.destination, amount=request.amount)
                except InsufficientFunds as error:
                    outcome = error
                except Exception as error:  # noqa: BLE001
                    with lock:
                        unexpected.append(f"{request.id}: {error!r}")
                    continue
                with lock:
                    single_outcomes[request.id] = outcome

        workers = [threading.Thread(target=run_chains, args=(t,)) for t in range(3)]
        workers += [threading.Thread(target=run_singles, args=(t,)) for t in range(3)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT_S)
        assert not any(worker.is_alive() for worker in workers)
        assert unexpected == []
        assert len(committed) + len(refused) == len(chains) and len(single_outcomes) == len(singles)
        assert committed and refused, "the workload must both commit and refuse chains"
        assert all(type(error.cause) is InsufficientFunds for error in refused.values())
        assert all(0 <= error.index < len(chains[name]) for name, error in refused.items())

        entries = {name: ledger.entries(name) for name in accounts}
        seen = {(e.transfer_id, e.account): e for rows in entries.values() for e in rows}
        for name, made in committed.items():
            assert [t.id for t in made] == [request.id for request in chains[name]]
            assert len({t.lsn for t in made}) == 1
            for request in chains[name]:
                assert seen[(request.id, request.source)].amount == -request.amount
                assert seen[(request.id, request.destination)].amount == request.amount
        for name in refused:
            for request in chains[name]:
                assert ledger.get_transfer(request.id) is None
                assert not any((request.id, account) in seen for account in accounts)

        expected = dict.fromkeys(accounts, funding)
        moved = [t for made in committed.values() for t in made]
        moved += [t for t in single_outcomes.values() if isinstance(t, Transfer)]
        for transfer in moved:
            expected[transfer.source] -= transfer.amount
            expected[transfer.destination] += transfer.amount
        final = {name: ledger.balance(name) for name in accounts}
        assert {name: b.posted for name, b in final.items()} == expected
        assert all(b == Balance(b.posted, 0, b.posted, 0) and b.posted >= 0 for b in final.values())
        assert sum(expected.values()) + ledger.balance("bank").posted == 0
        for rows in entries.values():  # gapless, and each balance the running sum
            assert [e.seq for e in rows] == list(range(1, len(rows) + 1))
            running = 0
            for entry in rows:
                running += entry.amount
                assert entry.balance == running
        state = ledger.state_hash()

    with Ledger.open(ledger_path) as reopened:
        assert reopened.state_hash() == state


# --- reopening and the tools ---------------------------------------------------------


def test_chains_survive_reopening_and_verify_calls_the_ledger_whole(ledger_path: Path, clock: Clock) -> None:
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        open_accounts(ledger)
        made = ledger.transfer_linked([leg("c-1", "a", "b", 60), leg("c-2", "b", "c", 60),
                                       leg("c-3", "a", "c", 10, pending=True, timeout_s=100)])
        with pytest.raises(LinkedTransferFailed):
            ledger.transfer_linked(REFUSED_CHAIN)
        state = ledger.state_hash()
        seen = balances(ledger, "a", "b", "c")

    with Ledger.open(ledger_path, clock_ns=clock) as reopened:
        assert reopened.state_hash() == state
        assert balances(reopened, "a", "b", "c") == seen
        assert [reopened.get_transfer(t.id) for t in made] == made
        assert reopened.transfer_linked([leg("c-1", "a", "b", 60), leg("c-2", "b", "c", 60),
                                         leg("c-3", "a", "c", 10, pending=True, timeout_s=100)]) == made
        with pytest.raises(LinkedTransferFailed) as retried:
            reopened.transfer_linked(REFUSED_CHAIN)
        assert retried.value.index == 1 and type(retried.value.cause) is InsufficientFunds
        assert reopened.post_pending("post-3", pending_id="c-3").amount == 10
        state = reopened.state_hash()

    done = tally("verify", ledger_path, "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "whole" and all(report["checks"].values())
    assert report["state_hash"] == state

    done = tally("inspect", ledger_path, "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)["records"]
    chain_rows = [row for row in rows if row.get("linked")]
    assert [(row["kind"], [x["transfer"] for x in row["legs"]]) for row in chain_rows] == [
        ("commit", ["c-1", "c-2", "c-3"]), ("reject", ["l-1", "l-2", "l-3"])]
    assert chain_rows[1]["index"] == 1 and chain_rows[1]["code"] == "insufficient_funds"
    assert [x["timestamp"] for x in chain_rows[0]["legs"]] == [t.timestamp for t in made]


def test_a_transfer_after_reopening_comes_after_every_leg_of_a_chain_that_was_the_last_record(
    ledger_path: Path,
) -> None:
    ahead = Clock(START_NS + 3600 * NS_PER_S)
    with Ledger.open(ledger_path, clock_ns=ahead) as ledger:
        open_accounts(ledger)
        made = ledger.transfer_linked([leg(f"l-{n}", "a", "b", 1) for n in range(5)])

    with Ledger.open(ledger_path, clock_ns=Clock()) as reopened:  # an hour behind
        after = reopened.transfer("t-1", source="a", destination="b", amount=1)

    assert after.timestamp == made[-1].timestamp + 1


def test_replay_of_a_ledger_with_chains_is_identical(ledger_path: Path, clock: Clock, tmp_path: Path) -> None:
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        open_accounts(ledger)
        ledger.transfer_linked([leg("c-1", "a", "b", 60), leg("c-2", "b", "c", 60),
                                leg("c-3", "a", "c", 10, pending=True, timeout_s=100)])
        with pytest.raises(LinkedTransferFailed):
            ledger.transfer_linked(REFUSED_CHAIN)
        ledger.transfer_linked([leg("c-4", "c", "a", 5), leg("c-5", "a", "b", 35, pending=True)])
        ledger.post_pending("post-5", pending_id="c-5", amount=30)
        state = ledger.state_hash()
        seen = balances(ledger, "a", "b", "c")

    done = tally("replay", ledger_path, "--into", tmp_path / "copy", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["verdict"] == "identical"
    assert report["state_hash_original"] == report["state_hash_replayed"] == state
    with Ledger.open(tmp_path / "copy", clock_ns=clock) as copy:
        assert copy.state_hash() == state
        assert copy.get_transfer("c-3").status == "pending"
        assert balances(copy, "a", "b", "c") == seen
        assert seen["a"] == Balance(15, 10, 5, 0)


def test_two_pending_legs_toward_one_account_may_not_promise_it_more_than_its_balance_can_take(
        tmp_path: Path) -> None:
    """The second leg sees what the first has on its way to the account: together they would
    take it past 2**63-1 once posted, so the chain is refused at that leg."""
    top = 2**63 - 1
    with Ledger.open(tmp_path / "ledger", clock_ns=Clock()) as ledger:
        for name in ("bank-a", "bank-b", "bank-c"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        ledger.create_account("src", currency="USD")
        ledger.create_account("rich", currency="USD")
        ledger.transfer("fill-a", source="bank-a", destination="rich", amount=top // 2)
        ledger.transfer("fill-b", source="bank-b", destination="rich", amount=top - top // 2 - 100)  # top - 100
        ledger.transfer("fund", source="bank-c", destination="src", amount=200)
        with pytest.raises(LinkedTransferFailed) as refused:
            ledger.transfer_linked([TransferRequest("p1", "src", "rich", 60, pending=True),
                                    TransferRequest("p2", "src", "rich", 60, pending=True)])
        assert refused.value.index == 1 and isinstance(refused.value.cause, BalanceOverflow)
        assert ledger.balance("rich") == Balance(top - 100, 0, top - 100, 0)


@pytest.mark.parametrize("path", ["through the mailboxes", "in the accounts' turns"])
@pytest.mark.parametrize("pending", [False, True])
def test_a_chain_through_an_empty_account_reserves_nothing_there_that_another_such_chain_needs(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch, path: str, pending: bool) -> None:
    """Two customers pay an empty shop at once, each in a chain whose next leg pays the shop's
    fee from that payment (the README's chain). In either order both chains commit; so must
    they when the second is decided while the first waits, its debits reserved, for another
    source's vote. The shop's debit in the first chain is paid by that chain's own credit
    before it: it must reserve nothing, else the second chain, which would find the shop as
    empty as the first did, is refused for funds (journaled: final for its ids)."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("alice", "carol", "shop", "fees", "d", "e"):
        ledger.create_account(name, currency="USD")
    for name in ("alice", "carol", "d"):
        ledger.transfer(f"fund-{name}", source="bank", destination=name, amount=1_000)
    coordinator = ledger._coordinator
    busy = take_turns(coordinator, ["d"])  # the first chain's last source: its vote waits for this turn
    assert busy is not None and "d" in busy
    directory = ledger._directory
    real_take_turns = directory.take_turns
    monkeypatch.setattr(directory, "take_turns", lambda *args, **kwargs: {})  # busy: the mailbox path
    made: list[list[Transfer] | LedgerError] = []
    voted = threading.Event()
    real_vote = DebitStep.vote

    def vote(step: DebitStep, account: str, refusal: Refusal | None, reserved: int) -> bool | None:
        outcome = real_vote(step, account, refusal, reserved)
        if account == "shop":
            voted.set()
        return outcome

    monkeypatch.setattr(DebitStep, "vote", vote)

    def first() -> None:
        try:
            made.append(ledger.transfer_linked([leg("c1-0", "alice", "shop", 500),
                                                leg("c1-1", "shop", "fees", 500, pending=pending),
                                                leg("c1-2", "d", "e", 1)]))
        except LedgerError as error:
            made.append(error)

    thread = threading.Thread(target=first)
    try:
        thread.start()
        assert voted.wait(WAIT_S)  # alice and the shop voted; d's vote waits for its turn
        assert not made, made
        assert ledger.balance("shop") == Balance(0, 0, 0, 0)  # the chain brings what it takes from it
        if path == "in the accounts' turns":
            monkeypatch.setattr(directory, "take_turns", real_take_turns)
        second = ledger.transfer_linked([leg("c2-0", "carol", "shop", 500),
                                         leg("c2-1", "shop", "fees", 500, pending=pending)])
        assert [transfer.id for transfer in second] == ["c2-0", "c2-1"]
    finally:
        give_back_turns(coordinator, busy)
        thread.join(WAIT_S)
    assert len(made) == 1 and isinstance(made[0], list), made
    assert ledger.balance("shop") == (Balance(0, 0, 0, 0) if not pending else Balance(1_000, 1_000, 0, 0))
    assert ledger.balance("fees").posted + ledger.balance("fees").incoming == 1_000
    assert ledger.stats()["in_flight"] == 0


def test_a_decision_in_the_mailbox_between_two_postings_of_a_chain_never_sees_funds_the_chain_takes(
        ledger: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """A committed chain's postings reach a source's mailbox one by one, and a debit step
    queued meanwhile may land among them. The shop pays 100 out, is paid 150, pays 100 out
    (50 left, it needs 100 of its own); a step landing after the 150 must see the 50 the shop
    ends with, not the 150 it holds for a moment: one that reserved 150 there (its chain
    waiting for another source, and refused in the end) would refuse a payment of 50 the
    shop can make in any order the three were decided in, journaled and final."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("shop", "b", "x", "c", "d", "e", "f", "g"):
        ledger.create_account(name, currency="USD")
    for name, amount in (("shop", 100), ("x", 150), ("d", 1)):
        ledger.transfer(f"fund-{name}", source="bank", destination=name, amount=amount)
    coordinator = ledger._coordinator
    directory = ledger._directory
    real_take_turns = directory.take_turns
    monkeypatch.setattr(directory, "take_turns", lambda *args, **kwargs: {})  # busy: the mailbox path
    busy_x = real_take_turns(["x"])  # the first chain's other source: it commits once this turn is back
    busy_d = real_take_turns(["d"])  # the second chain's other source: its vote waits for this turn
    assert busy_x is not None and busy_d is not None
    voted = {"c-0": threading.Event(), "s-0": threading.Event()}
    real_vote = DebitStep.vote

    def vote(step: DebitStep, account: str, refusal: Refusal | None, reserved: int) -> bool | None:
        outcome = real_vote(step, account, refusal, reserved)
        if account == "shop" and step.ticket.request.id in voted:
            voted[step.ticket.request.id].set()
        return outcome

    monkeypatch.setattr(DebitStep, "vote", vote)
    made: dict[str, list[Transfer] | LedgerError] = {}

    def chain(name: str, legs: list[TransferRequest]) -> None:
        try:
            made[name] = ledger.transfer_linked(legs)
        except LedgerError as error:
            made[name] = error

    first = threading.Thread(target=chain, args=("first", [leg("c-0", "shop", "b", 100), leg("c-1", "x", "shop", 150),
                                                           leg("c-2", "shop", "c", 100)]))
    second = threading.Thread(target=chain, args=("second", [leg("s-0", "shop", "f", 150), leg("s-1", "d", "e", 1)]))
    queued = threading.Event()
    handle_type = type(directory.pin("shop"))
    directory.unpin("shop")
    real_reserve = handle_type.reserve

    def reserve(handle: Any, step: DebitStep) -> None:
        real_reserve(handle, step)
        if step.ticket.request.id == "s-0":
            queued.set()

    monkeypatch.setattr(handle_type, "reserve", reserve)
    real_deliverer = coordinator._deliverer

    def deliverer(pinned: Any, turns: Any) -> Any:
        deliver = real_deliverer(pinned, turns)

        def each(postings: list[Any]) -> None:
            for posting in postings:
                deliver([posting])
                if posting.account == "shop" and posting.amount == 150 and not queued.is_set():
                    second.start()  # the second chain's step lands in the shop's mailbox here
                    assert queued.wait(WAIT_S)

        return each

    monkeypatch.setattr(coordinator, "_deliverer", deliverer)
    try:
        first.start()
        assert voted["c-0"].wait(WAIT_S)  # the shop reserved for the first chain; x's vote waits for its turn
        directory.give_back_turns(busy_x)
        first.join(WAIT_S)
        assert isinstance(made.get("first"), list), made
        assert voted["s-0"].wait(WAIT_S)
        assert "second" not in made
        paid = ledger.transfer("t-3", source="shop", destination="g", amount=50)  # 50 left: it fits
        assert paid.amount == 50
    finally:
        directory.give_back_turns(busy_d)
        first.join(WAIT_S)
        if queued.is_set():
            second.join(WAIT_S)
    assert isinstance(made.get("second"), LinkedTransferFailed), made
    assert ledger.balance("shop") == Balance(0, 0, 0, 0)
    assert ledger.stats()["in_flight"] == 0


def test_a_chains_postings_release_each_sources_reservation_whole_and_never_show_more_than_it_leaves() -> None:
    """`postings` of a chain on the mailbox path, applied to each account one by one from the
    reservation its source made (`reservations`): the reservation never goes below nothing,
    ends at nothing, and the available balance between two postings is never more than the
    chain leaves (a debit step landing there must not spend what a later leg takes)."""
    chance = random.Random(7)
    for _ in range(2_000):
        names = "abcd"
        legs: list[Any] = []
        for _ in range(chance.randint(2, 6)):
            source, destination = chance.sample(names, 2)
            kind = PENDING if chance.random() < 0.25 else SINGLE
            legs.append((kind, source, destination, chance.randint(1, 9), (1, 0, 1, 0) if kind == SINGLE else None, None))
        reserved = reservations(legs)
        made = postings(legs, 1, True)
        available = {name: 0 for name in names}
        kept = {name: reserved.get(name, 0) for name in names}
        for posting in made:
            available[posting.account] += posting.amount - posting.held
        end = dict(available)
        available = {name: 0 for name in names}
        for posting in made:
            name = posting.account
            available[name] += posting.amount - posting.held
            kept[name] -= posting.released
            assert kept[name] >= 0, (legs, posting)
            assert available[name] - kept[name] <= end[name], (legs, posting)
        assert kept == {name: 0 for name in names}, legs
