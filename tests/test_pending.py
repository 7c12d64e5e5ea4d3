"""Pending transfers through the public API: holds, posts, voids, expiry, and what every
transfer now carries (timestamp, code, reference, metadata).

A pending transfer decides its debit at once and holds the amount on its source until it is
posted (all or part), voided, or expires `timeout_s` after its timestamp. Most tests run on
a ledger opened with a clock the test moves (`clock_ns`), so deadlines are exact and no
thread expires anything behind the test's back; one test waits, bounded, for the expirer
thread of a ledger on the wall clock. Balances are checked on both accounts at every step:
`Balance(posted, pending, available, incoming)`.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from coordinator import _rules

from engine import (
    Account,
    AccountExists,
    Balance,
    BalanceOverflow,
    CurrencyMismatch,
    ExceedsPendingAmount,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    Ledger,
    LedgerError,
    PendingTransferAlreadyPosted,
    PendingTransferAlreadyVoided,
    PendingTransferExpired,
    PendingTransferNotFound,
    Transfer,
    TransferRequest,
)
from support import NS_PER_S, START_NS, Clock, audit_of, balances, written

ROOT = Path(__file__).resolve().parents[1]
AMOUNT_MAX = 2**63 - 1
CLI_TIMEOUT_S = 60.0
WAIT_S = 5.0
"""Bound on every poll and thread join in this file."""
FUNDING = 100



def fund(ledger: Ledger) -> None:
    """bank (no limit), alice with FUNDING, bob and carol with 0, all USD; euro in EUR."""
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("alice", currency="USD")
    ledger.create_account("bob", currency="USD")
    ledger.create_account("carol", currency="USD")
    ledger.create_account("euro", currency="EUR")
    ledger.transfer("fund-alice", source="bank", destination="alice", amount=FUNDING)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def books(ledger_path: Path, clock: Clock) -> Iterator[Ledger]:
    """A funded ledger on the test's clock (no expirer thread: the test calls `expire_pending`)."""
    with Ledger.open(ledger_path, clock_ns=clock) as opened:
        fund(opened)
        yield opened


@pytest.fixture
def funded(ledger: Ledger) -> Ledger:
    """A funded ledger on the wall clock (its expirer thread runs)."""
    fund(ledger)
    return ledger


def entry_ids(ledger: Ledger, account: str) -> list[str]:
    return [entry.transfer_id for entry in ledger.entries(account)]


def tally(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """Run `python -m engine ARGS` from this tree (bounded)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=env, check=False)


def tally_json(*args: str | Path) -> tuple[int, dict[str, Any]]:
    done = tally(*args, "--json")
    assert done.stderr == "", done.stderr
    return done.returncode, json.loads(done.stdout)


# --- holds and balances ----------------------------------------------------------


def test_a_pending_transfer_holds_the_amount_on_the_source_and_shows_it_incoming_on_the_destination(
    books: Ledger,
) -> None:
    held = books.transfer("p-1", source="alice", destination="bob", amount=60, code=7, reference="order-1",
                          metadata={"order": "o-1", "line": 3}, pending=True, timeout_s=300)

    assert (held.id, held.source, held.destination, held.amount) == ("p-1", "alice", "bob", 60)
    assert (held.kind, held.status, held.pending_id, held.timeout_s) == ("pending", "pending", None, 300)
    assert (held.code, held.reference, held.metadata) == (7, "order-1", {"order": "o-1", "line": 3})
    assert books.get_transfer("p-1") == held
    assert balances(books, "alice", "bob") == {"alice": Balance(100, 60, 40, 0), "bob": Balance(0, 0, 0, 60)}
    assert entry_ids(books, "alice") == ["fund-alice"] and entry_ids(books, "bob") == []


def test_posting_all_of_a_pending_transfer_moves_it_and_releases_the_hold(books: Ledger) -> None:
    held = books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)

    posted = books.post_pending("post-1", pending_id="p-1", reference="shipped", metadata={"box": 1})

    assert (posted.id, posted.kind, posted.pending_id, posted.status) == ("post-1", "post", "p-1", "posted")
    assert (posted.source, posted.destination, posted.amount) == ("alice", "bob", 60)
    assert (posted.reference, posted.metadata) == ("shipped", {"box": 1})
    assert posted.lsn > held.lsn and posted.timestamp > held.timestamp
    assert balances(books, "alice", "bob") == {"alice": Balance(40, 0, 40, 0), "bob": Balance(60, 0, 60, 0)}
    assert books.get_transfer("p-1").status == "posted"
    assert books.get_transfer("post-1") == posted
    assert books.get_transfer("fund-alice").status == "posted"  # a single transfer reads posted too
    assert [(e.transfer_id, e.amount, e.balance) for e in books.entries("alice")][-1] == ("post-1", -60, 40)
    assert [(e.transfer_id, e.amount, e.balance) for e in books.entries("bob")] == [("post-1", 60, 60)]


def test_a_partial_post_moves_that_amount_and_releases_the_rest(books: Ledger) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)

    posted = books.post_pending("post-1", pending_id="p-1", amount=25)

    assert (posted.amount, posted.source, posted.destination, posted.pending_id) == (25, "alice", "bob", "p-1")
    assert balances(books, "alice", "bob") == {"alice": Balance(75, 0, 75, 0), "bob": Balance(25, 0, 25, 0)}
    assert books.get_transfer("p-1").status == "posted"
    with pytest.raises(PendingTransferAlreadyPosted):  # the rest was released, not left to post later
        books.post_pending("post-2", pending_id="p-1", amount=35)
    assert books.balance("alice") == Balance(75, 0, 75, 0)


def test_voiding_releases_the_whole_hold_and_moves_nothing(books: Ledger) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)

    voided = books.void_pending("void-1", pending_id="p-1", reference="cancelled")

    assert (voided.kind, voided.status, voided.pending_id, voided.amount) == ("void", "voided", "p-1", 60)
    assert (voided.source, voided.destination, voided.reference) == ("alice", "bob", "cancelled")
    assert balances(books, "alice", "bob") == {"alice": Balance(100, 0, 100, 0), "bob": Balance(0, 0, 0, 0)}
    assert books.get_transfer("p-1").status == "voided"
    assert books.get_transfer("void-1") == voided
    assert entry_ids(books, "alice") == ["fund-alice"] and entry_ids(books, "bob") == []


def test_pendings_from_one_source_hold_their_sum_and_each_resolves_on_its_own(books: Ledger) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=30, pending=True)
    books.transfer("p-2", source="alice", destination="carol", amount=50, pending=True)
    assert balances(books, "alice", "bob", "carol") == {
        "alice": Balance(100, 80, 20, 0), "bob": Balance(0, 0, 0, 30), "carol": Balance(0, 0, 0, 50)}

    with pytest.raises(InsufficientFunds):
        books.transfer("p-3", source="alice", destination="bob", amount=21, pending=True)
    books.void_pending("void-1", pending_id="p-1")
    assert balances(books, "alice", "bob", "carol") == {
        "alice": Balance(100, 50, 50, 0), "bob": Balance(0, 0, 0, 0), "carol": Balance(0, 0, 0, 50)}
    books.post_pending("post-2", pending_id="p-2", amount=50)
    assert balances(books, "alice", "bob", "carol") == {
        "alice": Balance(50, 0, 50, 0), "bob": Balance(0, 0, 0, 0), "carol": Balance(50, 0, 50, 0)}


def test_a_hold_refuses_a_debit_that_would_spend_it(books: Ledger) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=70, pending=True)

    with pytest.raises(InsufficientFunds):
        books.transfer("spend-1", source="alice", destination="carol", amount=31)
    assert books.transfer("spend-2", source="alice", destination="carol", amount=30).amount == 30
    assert balances(books, "alice", "carol") == {"alice": Balance(70, 70, 0, 0), "carol": Balance(30, 0, 30, 0)}
    posted = books.post_pending("post-1", pending_id="p-1")  # the hold still covers it
    assert posted.amount == 70
    assert books.balance("alice") == Balance(0, 0, 0, 0)


def test_a_pending_transfer_beyond_the_available_funds_is_refused_and_the_refusal_is_final(books: Ledger) -> None:
    with pytest.raises(InsufficientFunds):
        books.transfer("p-1", source="alice", destination="bob", amount=101, pending=True)
    books.transfer("more", source="bank", destination="alice", amount=50)

    with pytest.raises(InsufficientFunds):  # funds are there now; the id's outcome is not
        books.transfer("p-1", source="alice", destination="bob", amount=101, pending=True)
    assert books.get_transfer("p-1") is None
    assert balances(books, "alice", "bob") == {"alice": Balance(150, 0, 150, 0), "bob": Balance(0, 0, 0, 0)}


def test_incoming_funds_of_a_pending_transfer_cannot_be_spent_by_the_destination(books: Ledger) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)

    with pytest.raises(InsufficientFunds):
        books.transfer("spend", source="bob", destination="carol", amount=1)
    assert books.balance("bob") == Balance(0, 0, 0, 60)


def test_a_pending_transfer_may_use_the_overdraft_limit_and_no_more(books: Ledger) -> None:
    books.create_account("dave", currency="USD", overdraft_limit=40)

    books.transfer("p-1", source="dave", destination="bob", amount=40, pending=True)
    with pytest.raises(InsufficientFunds):
        books.transfer("p-2", source="dave", destination="bob", amount=1, pending=True)
    assert books.balance("dave") == Balance(0, 40, -40, 0)
    books.post_pending("post-1", pending_id="p-1")
    assert books.balance("dave") == Balance(-40, 0, -40, 0)


# --- the five refusals of a post or void: journaled and final for their id --------


@dataclass(frozen=True)
class Refusal:
    """How to make a post or void refused, and how to take its cause away afterwards."""

    error: type[LedgerError]
    code: str
    prepare: Callable[[Ledger, Clock], None]
    request: Callable[[Ledger], Transfer]
    change_cause: Callable[[Ledger, Clock], None]
    """Changes the world so that a fresh request would now be decided otherwise (or nothing)."""


def _pending_60(ledger: Ledger, clock: Clock) -> None:
    ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=5)


def _nothing(ledger: Ledger, clock: Clock) -> None:
    pass


REFUSALS = {
    "not_found": Refusal(
        PendingTransferNotFound, "pending_transfer_not_found",
        _nothing,
        lambda ledger: ledger.post_pending("r-1", pending_id="p-1"),
        _pending_60,  # now there is a pending p-1
    ),
    "not_a_pending_transfer": Refusal(
        PendingTransferNotFound, "pending_transfer_not_found",
        _nothing,
        lambda ledger: ledger.void_pending("r-1", pending_id="fund-alice"),
        _nothing,
    ),
    "already_posted": Refusal(
        PendingTransferAlreadyPosted, "pending_transfer_already_posted",
        lambda ledger, clock: (_pending_60(ledger, clock), ledger.post_pending("post-1", pending_id="p-1", amount=10)),
        lambda ledger: ledger.void_pending("r-1", pending_id="p-1"),
        _nothing,
    ),
    "already_voided": Refusal(
        PendingTransferAlreadyVoided, "pending_transfer_already_voided",
        lambda ledger, clock: (_pending_60(ledger, clock), ledger.void_pending("void-1", pending_id="p-1")),
        lambda ledger: ledger.post_pending("r-1", pending_id="p-1", amount=10),
        _nothing,
    ),
    "expired": Refusal(
        PendingTransferExpired, "pending_transfer_expired",
        lambda ledger, clock: (_pending_60(ledger, clock), clock.advance(6)),
        lambda ledger: ledger.post_pending("r-1", pending_id="p-1"),
        lambda ledger, clock: ledger.expire_pending(),
    ),
    "exceeds_pending_amount": Refusal(
        ExceedsPendingAmount, "exceeds_pending_amount",
        _pending_60,
        lambda ledger: ledger.post_pending("r-1", pending_id="p-1", amount=61),
        lambda ledger, clock: ledger.void_pending("void-1", pending_id="p-1"),  # a fresh one: already voided
    ),
}


@pytest.mark.parametrize("case", REFUSALS.values(), ids=list(REFUSALS))
def test_a_refused_post_or_void_is_journaled_and_final_for_its_id(
    ledger_path: Path, clock: Clock, case: Refusal
) -> None:
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        fund(ledger)
        case.prepare(ledger, clock)
        before_hash, (records, durable) = ledger.state_hash(), written(ledger)

        with pytest.raises(case.error) as first:
            case.request(ledger)

        assert first.value.code == case.code
        assert written(ledger) == (records + 1, durable + 1)  # one refusal record
        assert ledger.state_hash() == before_hash
        assert ledger.get_transfer("r-1") is None
        with pytest.raises(case.error):
            case.request(ledger)
        assert written(ledger) == (records + 1, durable + 1)  # a retry writes nothing
        case.change_cause(ledger, clock)
        with pytest.raises(case.error):
            case.request(ledger)

    with Ledger.open(ledger_path, clock_ns=clock) as reopened:
        with pytest.raises(case.error):
            case.request(reopened)
        with pytest.raises(IdempotencyConflict):  # the id is consumed, for any other request
            reopened.transfer("r-1", source="bank", destination="bob", amount=1)
        with pytest.raises(IdempotencyConflict):
            reopened.post_pending("r-1", pending_id="another", amount=1)
        assert reopened.get_transfer("r-1") is None


def test_a_successful_post_retried_returns_the_same_transfer_and_a_second_post_is_already_posted(
    books: Ledger,
) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)
    posted = books.post_pending("post-1", pending_id="p-1", amount=40)

    assert books.post_pending("post-1", pending_id="p-1", amount=40) == posted
    with pytest.raises(PendingTransferAlreadyPosted):
        books.post_pending("post-2", pending_id="p-1", amount=40)
    with pytest.raises(PendingTransferAlreadyPosted):
        books.void_pending("void-1", pending_id="p-1")
    assert balances(books, "alice", "bob") == {"alice": Balance(60, 0, 60, 0), "bob": Balance(40, 0, 40, 0)}


def test_a_post_that_exceeds_the_pending_amount_leaves_the_hold_to_be_posted_by_another_id(books: Ledger) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)
    with pytest.raises(ExceedsPendingAmount):
        books.post_pending("post-1", pending_id="p-1", amount=61)

    assert books.get_transfer("p-1").status == "pending"
    assert books.balance("alice") == Balance(100, 60, 40, 0)
    assert books.post_pending("post-2", pending_id="p-1", amount=60).amount == 60
    with pytest.raises(ExceedsPendingAmount):  # not "already posted": its own outcome stands
        books.post_pending("post-1", pending_id="p-1", amount=61)


# --- expiry ----------------------------------------------------------------------


def test_a_post_one_nanosecond_before_the_deadline_posts(books: Ledger, clock: Clock) -> None:
    held = books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=5)
    clock.now_ns = held.timestamp + 5 * NS_PER_S - 1

    posted = books.post_pending("post-1", pending_id="p-1")

    assert posted.timestamp == held.timestamp + 5 * NS_PER_S - 1
    assert balances(books, "alice", "bob") == {"alice": Balance(40, 0, 40, 0), "bob": Balance(60, 0, 60, 0)}
    clock.advance(10)
    assert books.expire_pending() == 0
    assert books.get_transfer("p-1").status == "posted"


@pytest.mark.parametrize("resolve", ["post", "void"])
def test_a_post_or_void_at_exactly_the_deadline_is_expired_before_the_expiry_is_journaled(
    books: Ledger, clock: Clock, resolve: str
) -> None:
    held = books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=5)
    clock.now_ns = held.timestamp + 5 * NS_PER_S

    with pytest.raises(PendingTransferExpired):
        if resolve == "post":
            books.post_pending("r-1", pending_id="p-1")
        else:
            books.void_pending("r-1", pending_id="p-1")
    assert books.get_transfer("r-1") is None
    assert entry_ids(books, "bob") == []
    assert books.expire_pending() == 1
    assert books.get_transfer("p-1").status == "expired"
    assert balances(books, "alice", "bob") == {"alice": Balance(100, 0, 100, 0), "bob": Balance(0, 0, 0, 0)}


def test_an_expiry_journaled_at_exactly_the_deadline_replays_as_expired(ledger_path: Path) -> None:
    """The deadline is the first instant a pending transfer is expired: replay, which re-decides
    every expiry from the record's timestamp, must agree with the live decision at it."""
    clock = Clock()
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        fund(ledger)
        held = ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=5)
        clock.now_ns = held.timestamp + 5 * NS_PER_S
        assert ledger.expire_pending() == 1
    assert audit_of(ledger_path).whole
    with Ledger.open(ledger_path, clock_ns=clock) as reopened:
        assert reopened.get_transfer("p-1").status == "expired"
        assert reopened.balance("alice") == Balance(FUNDING, 0, FUNDING, 0)


def test_a_pending_transfer_between_currencies_is_refused_and_holds_nothing(books: Ledger) -> None:
    with pytest.raises(CurrencyMismatch):
        books.transfer("p-eur", source="alice", destination="euro", amount=10, pending=True)
    with pytest.raises(CurrencyMismatch):  # journaled and final
        books.transfer("p-eur", source="alice", destination="euro", amount=10, pending=True)
    assert balances(books, "alice", "euro") == {"alice": Balance(FUNDING, 0, FUNDING, 0), "euro": Balance(0, 0, 0, 0)}


def test_a_read_only_ledger_reads_the_balances_of_open_pending_transfers_as_the_writer_did(ledger_path: Path) -> None:
    with Ledger.open(ledger_path, clock_ns=Clock()) as ledger:
        fund(ledger)
        ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)
        live = balances(ledger, "alice", "bob")
    with Ledger.open(ledger_path, readonly=True) as reading:
        assert balances(reading, "alice", "bob") == live == {"alice": Balance(FUNDING, 60, FUNDING - 60, 0),
                                                            "bob": Balance(0, 0, 0, 60)}


def test_expire_pending_expires_what_is_due_releases_its_hold_and_counts_it(books: Ledger, clock: Clock) -> None:
    books.transfer("p-short", source="alice", destination="bob", amount=10, pending=True, timeout_s=5)
    books.transfer("p-long", source="alice", destination="carol", amount=20, pending=True, timeout_s=50)
    books.transfer("p-never", source="alice", destination="bob", amount=30, pending=True)
    assert books.expire_pending() == 0
    clock.advance(4)
    assert books.expire_pending() == 0
    assert books.get_transfer("p-short").status == "pending"

    clock.advance(6)
    assert books.expire_pending() == 1

    assert [books.get_transfer(t).status for t in ("p-short", "p-long", "p-never")] == ["expired", "pending", "pending"]
    assert balances(books, "alice", "bob", "carol") == {
        "alice": Balance(100, 50, 50, 0), "bob": Balance(0, 0, 0, 30), "carol": Balance(0, 0, 0, 20)}
    assert books.expire_pending() == 0
    clock.advance(10**6)
    assert books.expire_pending() == 1
    assert [books.get_transfer(t).status for t in ("p-short", "p-long", "p-never")] == ["expired", "expired", "pending"]
    assert balances(books, "alice", "bob", "carol") == {
        "alice": Balance(100, 30, 70, 0), "bob": Balance(0, 0, 0, 30), "carol": Balance(0, 0, 0, 0)}
    assert entry_ids(books, "bob") == [] and entry_ids(books, "carol") == []


def test_expire_pending_expires_many_due_transfers_at_once(books: Ledger, clock: Clock) -> None:
    for n in range(50):
        books.transfer(f"p-{n}", source="alice", destination="bob", amount=1, pending=True, timeout_s=1 + n % 3)
    assert books.balance("alice") == Balance(100, 50, 50, 0)
    clock.advance(4)  # past every deadline (each is its timestamp, a few ns after the clock's, + 1..3 s)

    assert books.expire_pending() == 50

    assert {books.get_transfer(f"p-{n}").status for n in range(50)} == {"expired"}
    assert balances(books, "alice", "bob") == {"alice": Balance(100, 0, 100, 0), "bob": Balance(0, 0, 0, 0)}


@pytest.mark.parametrize("checkpoint_interval", [1, 50_000], ids=["checkpoint-every-record", "no-checkpoint"])
def test_an_expiry_survives_reopening(ledger_path: Path, clock: Clock, checkpoint_interval: int) -> None:
    with Ledger.open(ledger_path, clock_ns=clock, checkpoint_interval=checkpoint_interval) as ledger:
        fund(ledger)
        ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=5)
        clock.advance(6)
        assert ledger.expire_pending() == 1
        state = ledger.state_hash()

    clock.now_ns = START_NS  # even a clock before the deadline cannot bring it back
    with Ledger.open(ledger_path, clock_ns=clock, checkpoint_interval=checkpoint_interval) as reopened:
        assert reopened.state_hash() == state
        assert reopened.get_transfer("p-1").status == "expired"
        assert balances(reopened, "alice", "bob") == {"alice": Balance(100, 0, 100, 0), "bob": Balance(0, 0, 0, 0)}
        assert reopened.expire_pending() == 0
        with pytest.raises(PendingTransferExpired):
            reopened.post_pending("post-1", pending_id="p-1")
        assert reopened.transfer("spend", source="alice", destination="carol", amount=100).amount == 100


@pytest.mark.parametrize("checkpoint_interval", [1, 50_000], ids=["checkpoint-every-record", "no-checkpoint"])
def test_a_pending_transfer_decided_before_closing_is_posted_after_reopening(
    ledger_path: Path, clock: Clock, checkpoint_interval: int
) -> None:
    with Ledger.open(ledger_path, clock_ns=clock, checkpoint_interval=checkpoint_interval) as ledger:
        fund(ledger)
        held = ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=3600)
        ledger.transfer("p-2", source="alice", destination="carol", amount=30, pending=True)

    clock.advance(60)
    with Ledger.open(ledger_path, clock_ns=clock, checkpoint_interval=checkpoint_interval) as reopened:
        assert reopened.get_transfer("p-1") == held
        assert balances(reopened, "alice", "bob", "carol") == {
            "alice": Balance(100, 90, 10, 0), "bob": Balance(0, 0, 0, 60), "carol": Balance(0, 0, 0, 30)}
        with pytest.raises(InsufficientFunds):  # the holds survived: they still refuse a debit
            reopened.transfer("spend", source="alice", destination="bob", amount=11)
        posted = reopened.post_pending("post-1", pending_id="p-1", amount=45)
        reopened.void_pending("void-2", pending_id="p-2")
        assert posted.timestamp > held.timestamp
        assert balances(reopened, "alice", "bob", "carol") == {
            "alice": Balance(55, 0, 55, 0), "bob": Balance(45, 0, 45, 0), "carol": Balance(0, 0, 0, 0)}
        state = reopened.state_hash()

    with Ledger.open(ledger_path, clock_ns=clock) as again:
        assert again.state_hash() == state
        assert [again.get_transfer(t).status for t in ("p-1", "p-2")] == ["posted", "voided"]


def test_a_pending_transfer_whose_deadline_passed_while_closed_expires_as_the_ledger_opens(
    ledger_path: Path, clock: Clock
) -> None:
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        fund(ledger)
        ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=5)
        ledger.transfer("p-2", source="alice", destination="carol", amount=30, pending=True, timeout_s=500)

    clock.advance(10)
    with Ledger.open(ledger_path, clock_ns=clock) as reopened:  # no expire_pending() call, no expirer thread
        assert balances(reopened, "alice", "bob", "carol") == {  # a balance waits for what it saw to be durable
            "alice": Balance(100, 30, 70, 0), "bob": Balance(0, 0, 0, 0), "carol": Balance(0, 0, 0, 30)}
        assert reopened.get_transfer("p-1").status == "expired"
        assert reopened.get_transfer("p-2").status == "pending"
        assert reopened.expire_pending() == 0
        with pytest.raises(PendingTransferExpired):
            reopened.void_pending("void-1", pending_id="p-1")


def test_an_expiry_made_as_the_ledger_opens_is_seen_by_the_first_get_transfer(ledger_path: Path, clock: Clock) -> None:
    """`Ledger.open` expires what fell due while the ledger was closed "before any call sees
    it": so the very first read after opening says expired. Several rounds, since a reader
    that only raced the journal writer would pass some of them."""
    with Ledger.open(ledger_path, clock_ns=clock) as ledger:
        fund(ledger)
    seen: list[str] = []
    for round_ in range(8):
        with Ledger.open(ledger_path, clock_ns=clock) as ledger:
            ledger.transfer(f"p-{round_}", source="alice", destination="bob", amount=1, pending=True, timeout_s=5)
        clock.advance(10)
        with Ledger.open(ledger_path, clock_ns=clock) as reopened:
            seen.append(reopened.get_transfer(f"p-{round_}").status)  # the first call after opening
            assert reopened.balance("alice") == Balance(100, 0, 100, 0)

    assert seen == ["expired"] * 8


def test_a_ledger_on_the_wall_clock_expires_at_open_what_fell_due_while_closed(ledger_path: Path) -> None:
    an_hour_ago = Clock(time.time_ns() - 3600 * NS_PER_S)
    with Ledger.open(ledger_path, clock_ns=an_hour_ago) as ledger:
        fund(ledger)
        ledger.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=60)

    with Ledger.open(ledger_path) as reopened:
        assert reopened.balance("alice") == Balance(100, 0, 100, 0)  # waits until what it saw is durable
        assert reopened.get_transfer("p-1").status == "expired"
        with pytest.raises(PendingTransferExpired):
            reopened.post_pending("post-1", pending_id="p-1")


def test_the_expirer_thread_expires_a_pending_transfer_on_the_wall_clock_within_a_bounded_wait(
    funded: Ledger,
) -> None:
    held = funded.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=1)
    deadline_ns = held.timestamp + NS_PER_S
    assert funded.balance("alice").pending == 60

    waited = threading.Event()
    give_up = time.monotonic() + WAIT_S
    status = funded.get_transfer("p-1").status
    while status != "expired" and time.monotonic() < give_up:
        waited.wait(0.02)  # polling, bounded by `give_up`
        status = funded.get_transfer("p-1").status
    seen_ns = time.time_ns()

    assert status == "expired", f"still {status!r} {WAIT_S} s after a 1 s timeout"
    assert seen_ns >= deadline_ns  # not before its deadline
    assert balances(funded, "alice", "bob") == {"alice": Balance(100, 0, 100, 0), "bob": Balance(0, 0, 0, 0)}
    with pytest.raises(PendingTransferExpired):
        funded.post_pending("post-1", pending_id="p-1")



def test_the_expirer_thread_goes_on_after_a_timeout(funded: Ledger, monkeypatch: pytest.MonkeyPatch) -> None:
    """A writer that did not keep up once (a slow disk) leaves the expirer running: it tries
    again, and the pending transfer expires (it stopped for good, and nothing expired)."""
    from coordinator import _sequencer
    from journal import JournalTimeoutError

    real = _sequencer.Sequencer.expire
    timed_out = threading.Event()

    def slow_once(self: _sequencer.Sequencer, *args: object) -> object:
        if not timed_out.is_set():
            timed_out.set()
            raise JournalTimeoutError("the journal writer is not keeping up")
        return real(self, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(_sequencer.Sequencer, "expire", slow_once)
    funded.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=1)
    assert timed_out.wait(WAIT_S)
    give_up = time.monotonic() + WAIT_S
    status = funded.get_transfer("p-1").status
    while status != "expired" and time.monotonic() < give_up:
        timed_out.wait(0.02)  # polling, bounded by `give_up`
        status = funded.get_transfer("p-1").status
    assert status == "expired", f"still {status!r} {WAIT_S} s after the timeout"
    assert funded.balance("alice") == Balance(100, 0, 100, 0)


class _Watched:
    """A lock that tells when the thread `asker` asks for it (`asked`)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.asker: threading.Thread | None = None
        self.asked = threading.Event()

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if threading.current_thread() is self.asker:
            self.asked.set()
        return self.lock.acquire(blocking, timeout)

    def release(self) -> None:
        self.lock.release()

    def locked(self) -> bool:
        return self.lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def test_a_balance_asked_once_an_expiry_is_durable_shows_the_hold_released(
    funded: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The expirer queues an expiry record, then hands the accounts the holds it releases, in
    one hold of the sequencer's lock; the writer may make the record durable in between. A
    balance asked once `get_transfer` shows the expiry must not show the hold still there: it
    waits for that hold of the lock to end (it found the hold there, on CI, once)."""
    import coordinator._sequencer

    real = coordinator._sequencer.expire
    queued, go = threading.Event(), threading.Event()

    def held(sequencer: Any, ids: list[str]) -> None:
        real(sequencer, ids)
        if threading.current_thread().name == "tally-expirer":  # its record queued, the holds not handed yet
            queued.set()
            assert go.wait(WAIT_S)

    monkeypatch.setattr(coordinator._sequencer, "expire", held)
    watched = _Watched(funded._sequencer.lock)
    monkeypatch.setattr(funded._sequencer, "lock", watched)
    funded.transfer("p-1", source="alice", destination="bob", amount=60, pending=True, timeout_s=1)
    assert funded.balance("alice").pending == 60
    seen: list[Balance] = []
    asking = threading.Thread(target=lambda: seen.append(funded.balance("alice")))
    watched.asker = asking
    try:
        assert queued.wait(WAIT_S)
        funded._journal.wait_durable(funded._journal.last_lsn, WAIT_S)
        assert funded.get_transfer("p-1").status == "expired"
        asking.start()
        deadline = time.monotonic() + WAIT_S
        while not watched.asked.is_set() and asking.is_alive():  # it waits for the lock, or it answered
            assert time.monotonic() < deadline
            asking.join(0.001)
    finally:
        go.set()
    if asking.ident is not None:  # (started)
        asking.join(WAIT_S)
    assert not asking.is_alive()
    assert seen == [Balance(FUNDING, 0, FUNDING, 0)]
    assert funded.balance("bob") == Balance(0, 0, 0, 0)


# --- concurrency -----------------------------------------------------------------


def test_concurrent_pendings_and_debits_from_many_threads_never_over_commit_available_funds(
    ledger_path: Path,
) -> None:
    threads_count, requests_per_thread, funding = 8, 30, 1_000
    rng = random.Random(20_250_101)
    plans = [[(f"t{t}-{n}", rng.choice(("bob", "carol")), rng.randint(1, 20), rng.random() < 0.8)
              for n in range(requests_per_thread)] for t in range(threads_count)]
    accepted: dict[str, Transfer] = {}
    refused: dict[str, int] = {}
    unexpected: list[str] = []
    lock = threading.Lock()
    start = threading.Barrier(threads_count, timeout=WAIT_S)

    with Ledger.open(ledger_path, dispatcher_threads=4) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in ("alice", "bob", "carol"):
            ledger.create_account(name, currency="USD")
        ledger.transfer("fund", source="bank", destination="alice", amount=funding)

        def client(plan: list[tuple[str, str, int, bool]]) -> None:
            start.wait()
            for tid, destination, amount, pending in plan:
                try:
                    made = ledger.transfer(tid, source="alice", destination=destination, amount=amount,
                                           pending=pending)
                except InsufficientFunds:
                    with lock:
                        refused[tid] = amount
                except Exception as error:  # noqa: BLE001  (reported below, with the request)
                    with lock:
                        unexpected.append(f"{tid}: {error!r}")
                else:
                    with lock:
                        accepted[tid] = made

        workers = [threading.Thread(target=client, args=(plan,)) for plan in plans]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT_S * 4)
        assert not any(worker.is_alive() for worker in workers)
        assert unexpected == []
        assert len(accepted) + len(refused) == threads_count * requests_per_thread
        assert refused, "the workload asks for more than alice has: some requests must be refused"

        held = sum(t.amount for t in accepted.values() if t.kind == "pending")
        moved = sum(t.amount for t in accepted.values() if t.kind == "single")
        alice = ledger.balance("alice")
        assert alice == Balance(funding - moved, held, funding - moved - held, 0)
        assert alice.available >= 0
        assert alice.available < min(refused.values())  # no refusal was spurious: funds only ran down
        incoming = {name: sum(t.amount for t in accepted.values() if t.kind == "pending" and t.destination == name)
                    for name in ("bob", "carol")}
        assert {name: ledger.balance(name).incoming for name in incoming} == incoming

        pendings = sorted(t.id for t in accepted.values() if t.kind == "pending")
        halves = [pendings[0::2], pendings[1::2]]
        resolve_errors: list[str] = []

        def resolve(ids: list[str], post: bool) -> None:
            for pending_id in ids:
                try:
                    if post:
                        ledger.post_pending(f"post-{pending_id}", pending_id=pending_id)
                    else:
                        ledger.void_pending(f"void-{pending_id}", pending_id=pending_id)
                except Exception as error:  # noqa: BLE001
                    with lock:
                        resolve_errors.append(f"{pending_id}: {error!r}")

        resolvers = [threading.Thread(target=resolve, args=(halves[0], True)),
                     threading.Thread(target=resolve, args=(halves[1], False))]
        for resolver in resolvers:
            resolver.start()
        for resolver in resolvers:
            resolver.join(WAIT_S * 4)
        assert not any(resolver.is_alive() for resolver in resolvers)
        assert resolve_errors == []

        posted_total = sum(accepted[t].amount for t in halves[0])
        final = balances(ledger, "bank", "alice", "bob", "carol")
        assert final["alice"] == Balance(funding - moved - posted_total, 0, funding - moved - posted_total, 0)
        assert final["bob"].incoming == final["carol"].incoming == 0
        assert final["bob"].posted + final["carol"].posted == moved + posted_total
        assert sum(b.posted for b in final.values()) == 0


def test_a_post_and_a_void_racing_for_one_pending_transfer_resolve_it_exactly_once(ledger_path: Path) -> None:
    count = 40
    outcomes: dict[str, list[Transfer | LedgerError]] = {}
    lock = threading.Lock()
    start = threading.Barrier(2, timeout=WAIT_S)

    with Ledger.open(ledger_path, dispatcher_threads=4) as ledger:
        fund(ledger)
        for n in range(count):
            ledger.transfer(f"p-{n}", source="alice", destination="bob", amount=2, pending=True)

        def race(verb: str) -> None:
            start.wait()
            for n in range(count):
                try:
                    if verb == "post":
                        outcome: Transfer | LedgerError = ledger.post_pending(f"post-{n}", pending_id=f"p-{n}")
                    else:
                        outcome = ledger.void_pending(f"void-{n}", pending_id=f"p-{n}")
                except LedgerError as error:
                    outcome = error
                with lock:
                    outcomes.setdefault(f"p-{n}", []).append(outcome)

        racers = [threading.Thread(target=race, args=(verb,)) for verb in ("post", "void")]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(WAIT_S)
        assert not any(racer.is_alive() for racer in racers)

        posted = 0
        for pending_id, pair in outcomes.items():
            won = [outcome for outcome in pair if isinstance(outcome, Transfer)]
            lost = [outcome for outcome in pair if not isinstance(outcome, Transfer)]
            assert len(won) == 1 and len(lost) == 1, (pending_id, pair)
            if won[0].kind == "post":
                posted += 1
                assert type(lost[0]) is PendingTransferAlreadyPosted
                assert ledger.get_transfer(pending_id).status == "posted"
            else:
                assert type(lost[0]) is PendingTransferAlreadyVoided
                assert ledger.get_transfer(pending_id).status == "voided"
        assert len(outcomes) == count
        assert balances(ledger, "alice", "bob") == {
            "alice": Balance(FUNDING - 2 * posted, 0, FUNDING - 2 * posted, 0),
            "bob": Balance(2 * posted, 0, 2 * posted, 0)}


# --- timestamps ------------------------------------------------------------------


def test_timestamps_strictly_increase_in_lsn_order_across_many_concurrent_transfers(funded: Ledger) -> None:
    made: list[Transfer] = []
    lock = threading.Lock()
    start = threading.Barrier(6, timeout=WAIT_S)

    def singles(thread: int) -> None:
        start.wait()
        for n in range(40):
            transfer = funded.transfer(f"s{thread}-{n}", source="bank", destination="bob", amount=1)
            with lock:
                made.append(transfer)

    def batches(thread: int) -> None:
        start.wait()
        for n in range(5):
            outcomes = funded.transfer_many([TransferRequest(f"b{thread}-{n}-{k}", "bank", "carol", 1)
                                             for k in range(10)])
            with lock:
                made.extend(outcomes)  # type: ignore[arg-type]

    workers = [threading.Thread(target=singles, args=(t,)) for t in range(4)]
    workers += [threading.Thread(target=batches, args=(t,)) for t in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(WAIT_S * 4)
    assert not any(worker.is_alive() for worker in workers)

    assert len(made) == 4 * 40 + 2 * 5 * 10 and all(isinstance(t, Transfer) for t in made)
    by_lsn = sorted(made, key=lambda t: (t.lsn, t.timestamp))
    assert len({t.lsn for t in made}) == len(made)
    assert all(a.timestamp < b.timestamp for a, b in pairwise(by_lsn))
    now_ns = time.time_ns()
    assert all(now_ns - 60 * NS_PER_S < t.timestamp <= now_ns for t in made)  # wall-clock time, nanoseconds


@pytest.mark.parametrize("checkpoint_interval", [1, 50_000], ids=["checkpoint-every-record", "no-checkpoint"])
def test_timestamps_keep_increasing_across_a_reopen_with_a_clock_behind_the_last_one(
    ledger_path: Path, checkpoint_interval: int
) -> None:
    ahead = Clock(time.time_ns() + 3600 * NS_PER_S)
    with Ledger.open(ledger_path, clock_ns=ahead, checkpoint_interval=checkpoint_interval) as ledger:
        fund(ledger)
        last = ledger.transfer("t-1", source="alice", destination="bob", amount=1)
        # the openings and the funding took the clock's reading and the nanoseconds after it
        assert last.timestamp == ledger.get_transfer("fund-alice").timestamp + 1 == ahead.now_ns + 6

    with Ledger.open(ledger_path, checkpoint_interval=checkpoint_interval) as reopened:  # the wall clock: an hour behind
        after = [reopened.transfer(f"t-{n}", source="alice", destination="bob", amount=1) for n in range(2, 6)]
        assert reopened.get_transfer("t-1").timestamp == last.timestamp

    stamps = [last.timestamp] + [t.timestamp for t in after]
    assert stamps == list(range(last.timestamp, last.timestamp + 5))


def test_a_transfer_after_reopening_comes_after_an_expiry_that_was_the_last_record(ledger_path: Path) -> None:
    ahead = Clock(time.time_ns() + 3600 * NS_PER_S)
    with Ledger.open(ledger_path, clock_ns=ahead) as ledger:
        fund(ledger)
        ledger.transfer("p-1", source="alice", destination="bob", amount=1, pending=True, timeout_s=5)
        ahead.advance(10)
        assert ledger.expire_pending() == 1
    expired_at_ns = ahead.now_ns

    with Ledger.open(ledger_path) as reopened:  # the wall clock: an hour behind
        after = reopened.transfer("t-1", source="alice", destination="bob", amount=1)

    assert after.timestamp > expired_at_ns


def test_timestamps_strictly_increase_when_the_clock_steps_back_or_stands_still(books: Ledger, clock: Clock) -> None:
    first = books.transfer("t-1", source="alice", destination="bob", amount=1)
    clock.now_ns -= 10 * NS_PER_S  # stepped back
    second = books.transfer("t-2", source="alice", destination="bob", amount=1)
    third = books.transfer("t-3", source="alice", destination="bob", amount=1, pending=True, timeout_s=5)
    clock.now_ns = first.timestamp  # repeats an earlier reading
    fourth = books.void_pending("t-4", pending_id="t-3")
    clock.now_ns = first.timestamp + 20 * NS_PER_S  # forward again: the clock's own reading
    fifth = books.transfer("t-5", source="alice", destination="bob", amount=1)

    stamps = [t.timestamp for t in (first, second, third, fourth, fifth)]
    assert stamps[:4] == [first.timestamp + n for n in range(4)]
    assert stamps[4] == first.timestamp + 20 * NS_PER_S
    assert [t.lsn for t in (first, second, third, fourth, fifth)] == sorted({t.lsn for t in (first, second, third,
                                                                                                 fourth, fifth)})


def test_a_pending_deadline_counts_from_its_own_timestamp_when_the_clock_stepped_back(
    books: Ledger, clock: Clock
) -> None:
    books.transfer("t-1", source="bank", destination="bob", amount=1)
    clock.now_ns -= 100 * NS_PER_S
    held = books.transfer("p-1", source="alice", destination="bob", amount=10, pending=True, timeout_s=5)
    # after the five openings, fund-alice and t-1; not the clock's reading, which was behind
    assert held.timestamp == books.get_transfer("t-1").timestamp + 1 == START_NS + 7

    clock.now_ns = held.timestamp + 5 * NS_PER_S - 1
    assert books.expire_pending() == 0
    clock.now_ns += 1
    assert books.expire_pending() == 1
    assert books.get_transfer("p-1").status == "expired"


def test_each_entry_carries_its_transfers_timestamp(books: Ledger, clock: Clock) -> None:
    single = books.transfer("t-1", source="alice", destination="bob", amount=10)
    clock.advance(1)
    books.transfer("p-1", source="alice", destination="carol", amount=20, pending=True)
    clock.advance(1)
    posted = books.post_pending("post-1", pending_id="p-1", amount=15)

    stamps = {(e.account, e.transfer_id): e.timestamp for name in ("alice", "bob", "carol")
              for e in books.entries(name)}
    fund_stamp = books.get_transfer("fund-alice").timestamp
    assert stamps == {
        ("alice", "fund-alice"): fund_stamp,
        ("alice", "t-1"): single.timestamp, ("bob", "t-1"): single.timestamp,
        ("alice", "post-1"): posted.timestamp, ("carol", "post-1"): posted.timestamp,
    }
    assert fund_stamp < single.timestamp < posted.timestamp


# --- idempotency over every field ------------------------------------------------

PENDING_REQUEST: dict[str, Any] = {"source": "alice", "destination": "bob", "amount": 10, "code": 1,
                                   "reference": "r-1", "metadata": {"k": "v", "n": 1}, "pending": True,
                                   "timeout_s": 100}

CHANGED_FIELDS: dict[str, dict[str, Any]] = {
    "source": {"source": "carol"},
    "destination": {"destination": "carol"},
    "amount": {"amount": 11},
    "code": {"code": 2},
    "code_to_0": {"code": 0},
    "reference": {"reference": "r-2"},
    "reference_to_none": {"reference": None},
    "metadata_value": {"metadata": {"k": "v", "n": 2}},
    "metadata_value_type": {"metadata": {"k": "v", "n": "1"}},
    "metadata_key_added": {"metadata": {"k": "v", "n": 1, "x": 0}},
    "metadata_to_none": {"metadata": None},
    "pending_to_false": {"pending": False, "timeout_s": None},
    "timeout_s": {"timeout_s": 101},
    "timeout_s_to_none": {"timeout_s": None},
}


@pytest.mark.parametrize("changed", CHANGED_FIELDS.values(), ids=list(CHANGED_FIELDS))
def test_a_retry_that_differs_in_any_field_is_an_idempotency_conflict(books: Ledger, changed: dict[str, Any]) -> None:
    books.transfer("carol-funds", source="bank", destination="carol", amount=50)
    original = books.transfer("p-1", **PENDING_REQUEST)
    before = books.state_hash(), balances(books, "alice", "bob", "carol")

    with pytest.raises(IdempotencyConflict):
        books.transfer("p-1", **{**PENDING_REQUEST, **changed})

    assert (books.state_hash(), balances(books, "alice", "bob", "carol")) == before
    assert books.get_transfer("p-1") == original


def test_a_retry_with_the_same_fields_returns_the_original_even_with_metadata_in_another_order(books: Ledger) -> None:
    original = books.transfer("p-1", **PENDING_REQUEST)

    retried = books.transfer("p-1", **{**PENDING_REQUEST, "metadata": {"n": 1, "k": "v"}})

    assert (retried.id, retried.lsn, retried.timestamp, retried.amount) == (
        original.id, original.lsn, original.timestamp, original.amount)
    assert (retried.code, retried.reference, retried.metadata, retried.timeout_s) == (1, "r-1", {"k": "v", "n": 1}, 100)
    assert books.balance("alice") == Balance(100, 10, 90, 0)


RESOLUTION_CHANGES: dict[str, Callable[[Ledger], Transfer]] = {
    "amount": lambda ledger: ledger.post_pending("post-1", pending_id="p-1", amount=21, reference="r",
                                                 metadata={"a": 1}),
    "pending_id": lambda ledger: ledger.post_pending("post-1", pending_id="p-2", amount=20, reference="r",
                                                     metadata={"a": 1}),
    "reference": lambda ledger: ledger.post_pending("post-1", pending_id="p-1", amount=20, reference="s",
                                                    metadata={"a": 1}),
    "metadata": lambda ledger: ledger.post_pending("post-1", pending_id="p-1", amount=20, reference="r",
                                                   metadata={"a": 2}),
    "void_instead": lambda ledger: ledger.void_pending("post-1", pending_id="p-1", reference="r", metadata={"a": 1}),
    "single_instead": lambda ledger: ledger.transfer("post-1", source="alice", destination="bob", amount=20),
}


@pytest.mark.parametrize("retry", RESOLUTION_CHANGES.values(), ids=list(RESOLUTION_CHANGES))
def test_a_post_retried_with_any_field_changed_is_an_idempotency_conflict(
    books: Ledger, retry: Callable[[Ledger], Transfer]
) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=30, pending=True)
    books.transfer("p-2", source="alice", destination="bob", amount=30, pending=True)
    posted = books.post_pending("post-1", pending_id="p-1", amount=20, reference="r", metadata={"a": 1})
    before = books.state_hash(), balances(books, "alice", "bob")

    with pytest.raises(IdempotencyConflict):
        retry(books)

    assert (books.state_hash(), balances(books, "alice", "bob")) == before
    assert books.post_pending("post-1", pending_id="p-1", amount=20, reference="r", metadata={"a": 1}) == posted


# --- validation: nothing written, the id not consumed ------------------------------

BAD_TRANSFER_FIELDS: dict[str, dict[str, Any]] = {
    "code_negative": {"code": -1},
    "code_too_large": {"code": 65_536},
    "code_bool": {"code": True},
    "code_float": {"code": 1.0},
    "code_str": {"code": "1"},
    "reference_too_long": {"reference": "r" * 257},
    "reference_not_str": {"reference": 5},
    "reference_bytes": {"reference": b"r"},
    "reference_lone_surrogate": {"reference": "r-\ud800"},
    "metadata_17_keys": {"metadata": {f"k{n}": n for n in range(17)}},
    "metadata_key_too_long": {"metadata": {"k" * 65: 1}},
    "metadata_key_empty": {"metadata": {"": 1}},
    "metadata_key_not_str": {"metadata": {1: "one"}},
    "metadata_value_too_long": {"metadata": {"k": "v" * 257}},
    "metadata_int_too_large": {"metadata": {"k": 2**63}},
    "metadata_int_too_small": {"metadata": {"k": -(2**63)}},
    "metadata_value_bool": {"metadata": {"k": True}},
    "metadata_value_float": {"metadata": {"k": 1.5}},
    "metadata_value_none": {"metadata": {"k": None}},
    "metadata_value_list": {"metadata": {"k": [1]}},
    "metadata_not_a_mapping": {"metadata": [("k", "v")]},
    "metadata_a_str": {"metadata": "k=v"},
    "timeout_without_pending": {"timeout_s": 10},
    "timeout_zero": {"pending": True, "timeout_s": 0},
    "timeout_negative": {"pending": True, "timeout_s": -1},
    "timeout_too_large": {"pending": True, "timeout_s": 2**31},
    "timeout_bool": {"pending": True, "timeout_s": True},
    "timeout_float": {"pending": True, "timeout_s": 1.5},
    "timeout_str": {"pending": True, "timeout_s": "10"},
    "pending_not_bool": {"pending": 1},
}


@pytest.mark.parametrize("bad", BAD_TRANSFER_FIELDS.values(), ids=list(BAD_TRANSFER_FIELDS))
def test_a_malformed_field_is_invalid_writes_nothing_and_leaves_the_id_usable(books: Ledger, bad: dict[str, Any]) -> None:
    before = books.state_hash(), written(books), balances(books, "alice", "bob")

    with pytest.raises(InvalidRequest):
        books.transfer("t-1", source="alice", destination="bob", amount=10, **bad)

    assert (books.state_hash(), written(books), balances(books, "alice", "bob")) == before
    assert books.get_transfer("t-1") is None
    assert books.transfer("t-1", source="alice", destination="bob", amount=10).amount == 10


def test_every_field_at_its_largest_valid_value_is_accepted_and_kept(books: Ledger) -> None:
    metadata: dict[str, str | int] = {f"{n:02d}" + "k" * 62: "v" * 256 for n in range(14)}
    metadata.update({"max": AMOUNT_MAX, "min": -AMOUNT_MAX})

    held = books.transfer("t-1", source="alice", destination="bob", amount=10, code=65_535, reference="r" * 256,
                          metadata=metadata, pending=True, timeout_s=2**31 - 1)

    assert (held.code, held.reference, held.metadata, held.timeout_s) == (65_535, "r" * 256, metadata, 2**31 - 1)
    assert books.get_transfer("t-1") == held


BAD_RESOLUTIONS: dict[str, Callable[[Ledger], Transfer]] = {
    "amount_zero": lambda ledger: ledger.post_pending("r-1", pending_id="p-1", amount=0),
    "amount_negative": lambda ledger: ledger.post_pending("r-1", pending_id="p-1", amount=-5),
    "amount_bool": lambda ledger: ledger.post_pending("r-1", pending_id="p-1", amount=True),
    "amount_float": lambda ledger: ledger.post_pending("r-1", pending_id="p-1", amount=10.0),
    "pending_id_empty": lambda ledger: ledger.post_pending("r-1", pending_id=""),
    "pending_id_not_str": lambda ledger: ledger.void_pending("r-1", pending_id=1),
    "id_too_long": lambda ledger: ledger.void_pending("r" * 129, pending_id="p-1"),
    "reference_too_long": lambda ledger: ledger.void_pending("r-1", pending_id="p-1", reference="r" * 257),
    "metadata_too_many_keys": lambda ledger: ledger.post_pending("r-1", pending_id="p-1",
                                                                 metadata={str(n): n for n in range(17)}),
    "metadata_bad_value": lambda ledger: ledger.void_pending("r-1", pending_id="p-1", metadata={"k": 1.5}),
}


@pytest.mark.parametrize("request_", BAD_RESOLUTIONS.values(), ids=list(BAD_RESOLUTIONS))
def test_a_malformed_post_or_void_is_invalid_writes_nothing_and_keeps_the_hold(
    books: Ledger, request_: Callable[[Ledger], Transfer]
) -> None:
    books.transfer("p-1", source="alice", destination="bob", amount=60, pending=True)
    before = books.state_hash(), written(books), balances(books, "alice", "bob")

    with pytest.raises(InvalidRequest):
        request_(books)

    assert (books.state_hash(), written(books), balances(books, "alice", "bob")) == before
    assert books.get_transfer("p-1").status == "pending"
    assert books.post_pending("r-1", pending_id="p-1", amount=10).amount == 10


# --- metadata is a read-only copy --------------------------------------------------


def test_metadata_is_read_only_and_a_callers_later_change_to_their_dict_changes_nothing(books: Ledger) -> None:
    given: dict[str, str | int] = {"order": "o-1", "line": 3}
    made = books.transfer("t-1", source="alice", destination="bob", amount=10, metadata=given)
    given["order"] = "o-2"
    given["extra"] = 1

    with pytest.raises(TypeError):
        made.metadata["order"] = "o-3"  # type: ignore[index]
    with pytest.raises(TypeError):
        del made.metadata["order"]  # type: ignore[attr-defined]
    assert made.metadata == {"order": "o-1", "line": 3}
    assert books.get_transfer("t-1").metadata == {"order": "o-1", "line": 3}
    assert books.transfer("t-1", source="alice", destination="bob", amount=10,
                          metadata={"order": "o-1", "line": 3}) == made
    with pytest.raises(IdempotencyConflict):  # the caller's dict as it is now is another request
        books.transfer("t-1", source="alice", destination="bob", amount=10, metadata=given)


def test_account_metadata_is_read_only_and_a_callers_later_change_to_their_dict_changes_nothing(
    books: Ledger,
) -> None:
    given: dict[str, str | int] = {"owner": "dave"}
    account = books.create_account("dave", currency="USD", code=12, metadata=given)
    given["owner"] = "eve"

    with pytest.raises(TypeError):
        account.metadata["owner"] = "mallory"  # type: ignore[index]
    listed = {a.id: a for a in books.accounts()}["dave"]
    assert (listed.code, listed.metadata) == (12, {"owner": "dave"})


# --- account code and metadata -----------------------------------------------------


@pytest.mark.parametrize("checkpoint_interval", [1, 50_000], ids=["checkpoint-every-record", "no-checkpoint"])
def test_an_accounts_code_and_metadata_are_shown_and_survive_reopening(ledger_path: Path,
                                                                         checkpoint_interval: int) -> None:
    with Ledger.open(ledger_path, checkpoint_interval=checkpoint_interval) as ledger:
        made = ledger.create_account("dave", currency="USD", overdraft_limit=5, code=65_535,
                                     metadata={"owner": "dave", "tier": 2})
        plain = ledger.create_account("erin", currency="USD")
        assert made == Account("dave", "USD", 5, 65_535, {"owner": "dave", "tier": 2})  # type: ignore[arg-type]
        assert (plain.code, plain.metadata) == (0, None)
        assert ledger.create_account("dave", currency="USD", overdraft_limit=5, code=65_535,
                                     metadata={"tier": 2, "owner": "dave"}) == made

    with Ledger.open(ledger_path, checkpoint_interval=checkpoint_interval) as reopened:
        listed = {account.id: account for account in reopened.accounts()}
        assert listed["dave"] == made
        assert (listed["dave"].code, listed["dave"].metadata) == (65_535, {"owner": "dave", "tier": 2})
        assert (listed["erin"].code, listed["erin"].metadata) == (0, None)


@pytest.mark.parametrize("changed", [{"code": 1}, {"metadata": {"owner": "eve"}}, {"metadata": None},
                                     {"metadata": {"owner": "dave", "x": 1}}],
                         ids=["code", "metadata_value", "metadata_none", "metadata_key_added"])
def test_recreating_an_account_with_other_code_or_metadata_is_account_exists(
    books: Ledger, changed: dict[str, Any]
) -> None:
    original = books.create_account("dave", currency="USD", code=3, metadata={"owner": "dave"})
    before = written(books)

    with pytest.raises(AccountExists):
        books.create_account("dave", **{"currency": "USD", "code": 3, "metadata": {"owner": "dave"}, **changed})

    assert written(books) == before
    assert {a.id: a for a in books.accounts()}["dave"] == original


@pytest.mark.parametrize("bad", [{"code": -1}, {"code": 65_536}, {"code": True}, {"metadata": {"k": 1.5}},
                                 {"metadata": {1: "v"}}, {"metadata": {f"k{n}": n for n in range(17)}}],
                         ids=["code_negative", "code_too_large", "code_bool", "metadata_float", "metadata_int_key",
                              "metadata_17_keys"])
def test_an_account_with_a_malformed_code_or_metadata_is_invalid_and_not_created(
    books: Ledger, bad: dict[str, Any]
) -> None:
    before = books.state_hash(), written(books)

    with pytest.raises(InvalidRequest):
        books.create_account("dave", currency="USD", **bad)

    assert (books.state_hash(), written(books)) == before
    assert "dave" not in {a.id for a in books.accounts()}


# --- the tally tools on a ledger with pending transfers ----------------------------


@dataclass
class Built:
    """A closed ledger with every pending outcome, and what the API said about it."""

    path: Path
    state_hash: str
    balances: dict[str, Balance]
    transfers: dict[str, Transfer]


@pytest.fixture
def built(tmp_path: Path) -> Built:
    path = tmp_path / "ledger"
    clock = Clock()
    made: dict[str, Transfer] = {}
    with Ledger.open(path, clock_ns=clock) as ledger:
        fund(ledger)
        ledger.create_account("dave", currency="USD", code=9, metadata={"owner": "dave"})
        for tid, destination, amount, timeout_s in (("p-post", "bob", 30, 100), ("p-part", "carol", 20, None),
                                                    ("p-void", "bob", 10, None), ("p-exp", "carol", 7, 5),
                                                    ("p-open", "dave", 3, None)):
            made[tid] = ledger.transfer(tid, source="alice", destination=destination, amount=amount, pending=True,
                                        timeout_s=timeout_s, code=4, reference=f"ref-{tid}", metadata={"n": amount})
        made["post-all"] = ledger.post_pending("post-all", pending_id="p-post")
        made["post-part"] = ledger.post_pending("post-part", pending_id="p-part", amount=5, metadata={"part": 1})
        made["void"] = ledger.void_pending("void", pending_id="p-void", reference="cancelled")
        clock.advance(6)
        with pytest.raises(PendingTransferExpired):
            ledger.post_pending("late", pending_id="p-exp")
        assert ledger.expire_pending() == 1
        with pytest.raises(PendingTransferNotFound):
            ledger.void_pending("lost", pending_id="no-such")
        made["after"] = ledger.transfer("after", source="bob", destination="carol", amount=1)
        accounts = [account.id for account in ledger.accounts()]
        state = ledger.state_hash()
        seen = balances(ledger, *accounts)
    return Built(path, state, seen, made)


def test_verify_calls_a_ledger_with_posts_voids_and_expiries_whole(built: Built) -> None:
    code, report = tally_json("verify", built.path)

    assert code == 0, report
    assert report["verdict"] == "whole" and report["problem"] is None
    assert all(report["checks"].values()), report["checks"]
    assert report["state_hash"] == built.state_hash
    assert (report["pending_expired"], report["pending_open"]) == (1, 1)


def test_replay_of_a_ledger_with_pending_transfers_is_identical_and_the_copy_goes_on(
    built: Built, tmp_path: Path
) -> None:
    code, report = tally_json("replay", built.path, "--into", tmp_path / "copy")

    assert code == 0, report
    assert report["verdict"] == "identical"
    assert report["state_hash_original"] == report["state_hash_replayed"] == built.state_hash
    with Ledger.open(tmp_path / "copy") as copy:
        assert copy.state_hash() == built.state_hash
        assert balances(copy, *built.balances) == built.balances
        assert {tid: copy.get_transfer(tid).status for tid in ("p-post", "p-part", "p-void", "p-exp", "p-open")} == {
            "p-post": "posted", "p-part": "posted", "p-void": "voided", "p-exp": "expired", "p-open": "pending"}
        assert copy.get_transfer("post-part") == built.transfers["post-part"]
        assert copy.post_pending("post-open", pending_id="p-open").amount == 3
        assert copy.balance("dave") == Balance(3, 0, 3, 0)


def test_inspect_json_shows_pending_transfers_posts_voids_expiries_and_their_refusals(built: Built) -> None:
    code, report = tally_json("inspect", built.path)

    assert code == 0 and report["problem"] is None
    rows = report["records"]
    by_transfer = {row["transfer"]: row for row in rows if "transfer" in row}
    pending = by_transfer["p-post"]
    assert (pending["kind"], pending["type"], pending["source"], pending["destination"], pending["amount"]) == (
        "commit", "pending", "alice", "bob", 30)
    assert (pending["timeout_s"], pending["transfer_code"], pending["reference"], pending["metadata"]) == (
        100, 4, "ref-p-post", {"n": 30})
    assert pending["timestamp"] == built.transfers["p-post"].timestamp
    part = by_transfer["post-part"]
    assert (part["type"], part["pending_id"], part["amount"], part["source"], part["destination"]) == (
        "post", "p-part", 5, "alice", "carol")
    assert (part["source_balance"], part["destination_balance"]) == (
        FUNDING - 30 - 5, 5)
    voided = by_transfer["void"]
    assert (voided["type"], voided["pending_id"], voided["amount"], voided["reference"]) == (
        "void", "p-void", 10, "cancelled")
    expiries = [row for row in rows if row["kind"] == "expiry"]
    assert [row["pending_ids"] for row in expiries] == [["p-exp"]]
    assert {tid: (by_transfer[tid]["kind"], by_transfer[tid]["code"]) for tid in ("late", "lost")} == {
        "late": ("reject", "pending_transfer_expired"), "lost": ("reject", "pending_transfer_not_found")}
    dave = next(row for row in rows if row["kind"] == "account" and row["account"] == "dave")
    assert (dave["code"], dave["metadata"]) == (9, {"owner": "dave"})
    assert [row["lsn"] for row in rows] == sorted(row["lsn"] for row in rows)


@pytest.mark.parametrize("account", ["alice", "bob", "carol", "dave"])
def test_balance_json_shows_the_holds_and_incoming_funds_the_api_shows(built: Built, account: str) -> None:
    code, report = tally_json("balance", built.path, account)

    assert code == 0
    seen = built.balances[account]
    assert (report["posted"], report["pending"], report["available"], report["incoming"]) == (
        seen.posted, seen.pending, seen.available, seen.incoming)


@pytest.mark.parametrize("reading", [1.7e18, -1, 2**63, "now", None])
def test_a_clock_that_gives_no_int_of_nanoseconds_is_refused_as_the_ledger_opens(tmp_path: Path, reading: object) -> None:
    with pytest.raises(InvalidRequest, match="clock_ns must return an int"):
        Ledger.open(tmp_path / "ledger", clock_ns=lambda: reading)  # type: ignore[arg-type,return-value]
    assert not (tmp_path / "ledger").exists() or not any((tmp_path / "ledger").iterdir())


@pytest.mark.parametrize("bad", [0, 2, 4])
def test_a_bad_reading_of_the_ledgers_clock_fails_that_decision_alone(tmp_path: Path, bad: int) -> None:
    """A clock of one's own is read once per decision: a reading that is no timestamp fails
    the decision it was for with InvalidRequest, writing nothing for it; the decisions beside
    it go on, and so does the ledger."""
    clock = Clock()
    readings = [0]
    bad_at = [-1]

    def reading() -> int:
        readings[0] += 1
        return -1 if readings[0] == bad_at[0] else clock()

    with Ledger.open(tmp_path / "ledger", clock_ns=reading) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        bad_at[0] = readings[0] + 1 + bad
        outcomes = ledger.transfer_many([TransferRequest(f"m{i}", "bank", "a", 1, code=i % 2) for i in range(5)])
        assert [isinstance(outcome, InvalidRequest) for outcome in outcomes] == [i == bad for i in range(5)]
        assert ledger.get_transfer(f"m{bad}") is None and ledger.balance("a").posted == 4
        bad_at[0] = readings[0] + 1
        with pytest.raises(InvalidRequest, match="clock_ns must return an int"):
            ledger.transfer("t", source="bank", destination="a", amount=1)
        assert ledger.transfer("t", source="bank", destination="a", amount=1).status == "posted"
        assert ledger.transfer_many([TransferRequest(f"m{bad}", "bank", "a", 1, code=bad % 2)])[0].amount == 1
        assert ledger.balance("a").posted == 6


def test_a_bad_clock_reading_while_accounts_open_opens_none_of_their_block(tmp_path: Path) -> None:
    """`create_accounts` reads the clock for every account of a block before it opens any:
    a bad reading (here, a clock that raises) is each one's outcome, and nothing moved."""
    clock = Clock()
    readings = [0]
    bad_at = [-1]

    def reading() -> int:
        readings[0] += 1
        if readings[0] == bad_at[0]:
            raise OSError("no clock")
        return clock()

    with Ledger.open(tmp_path / "ledger", clock_ns=reading) as ledger:
        ledger.create_account("bank", currency="USD")
        bad_at[0] = readings[0] + 2
        made = ledger.create_accounts([Account(name, "USD", 0) for name in ("a", "b", "a", "c")])
        assert all(isinstance(outcome, InvalidRequest) and "no clock" in str(outcome) for outcome in made), made
        assert [account.id for account in ledger.accounts()] == ["bank"]
        assert ledger.create_accounts([Account(name, "USD", 0) for name in ("a", "b", "c")]) == [
            Account(name, "USD", 0) for name in ("a", "b", "c")]
        stamps = [event.timestamp for event in ledger.events()]
        assert stamps == sorted(set(stamps)) and stamps[-1] - stamps[0] == 3  # the clock's, one apart


def test_a_bad_clock_reading_off_the_accounts_turns_fails_that_decision_alone(tmp_path: Path) -> None:
    """The same where the decision is made in the mailboxes: a void of no open pending
    transfer (nothing to reserve), and a transfer whose accounts' turns are held elsewhere
    (its source reserves, then the sequencer reads the clock): each fails with
    InvalidRequest, its claim, permit and reservation released; the ledger goes on."""
    clock = Clock()
    bad = [False]
    with Ledger.open(tmp_path / "ledger", clock_ns=lambda: -1 if bad[0] else clock()) as ledger:
        ledger.create_account("a", currency="USD", overdraft_limit=None)
        ledger.create_account("b", currency="USD")
        coordinator = ledger._coordinator
        bad[0] = True
        with pytest.raises(InvalidRequest, match="clock_ns must return an int"):
            ledger.void_pending("v", pending_id="none")
        turns = coordinator.participants.take_turns(["a", "b"], all_or_none=True)
        outcome: list[object] = []
        caller = threading.Thread(target=lambda: outcome.append(ledger.transfer_many([TransferRequest("t", "a", "b", 1)])))
        caller.start()
        deadline = time.monotonic() + WAIT_S
        while ledger.stats()["activations"] < 1:  # its source pinned: its reservation is in the mailbox
            assert time.monotonic() < deadline, "the transfer never reached the mailboxes"
            time.sleep(0.01)
        coordinator.participants.give_back_turns(turns)
        caller.join(WAIT_S)
        assert isinstance(outcome[0][0], InvalidRequest)  # type: ignore[index]
        bad[0] = False
        assert coordinator.admission._free == coordinator.admission.permits_max and not coordinator.claims.in_flight()
        assert ledger.balance("a") == Balance(0, 0, 0, 0)
        assert ledger.transfer("t", source="a", destination="b", amount=1).status == "posted"
        with pytest.raises(PendingTransferNotFound):
            ledger.void_pending("v", pending_id="none")
        assert ledger.balance("b").posted == 1


def test_a_single_transfer_leaves_the_room_a_pending_transfer_toward_its_destination_needs(tmp_path: Path) -> None:
    """A pending transfer was accepted because its credit fits; a later single transfer may not
    take that room, or the pending one could never be posted."""
    with Ledger.open(tmp_path / "ledger", clock_ns=Clock()) as ledger:
        for name in ("bank", "bank2"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        ledger.create_account("b", currency="USD")
        ledger.transfer("p", source="bank", destination="b", amount=10, pending=True)
        with pytest.raises(BalanceOverflow):
            ledger.transfer("big", source="bank2", destination="b", amount=AMOUNT_MAX - 5)
        ledger.transfer("fits", source="bank2", destination="b", amount=AMOUNT_MAX - 10)
        assert ledger.post_pending("q", pending_id="p").amount == 10
        assert ledger.balance("b") == Balance(AMOUNT_MAX, 0, AMOUNT_MAX, 0)


def test_what_an_account_holds_or_has_on_its_way_stays_within_a_balances_bound(tmp_path: Path) -> None:
    """`Balance.pending` and `Balance.incoming` are figures of a balance: a pending transfer
    that would take either past 2**63-1 is `BalanceOverflow`, as for `posted`."""
    with Ledger.open(tmp_path / "ledger", clock_ns=Clock()) as ledger:
        for name in ("x", "y", "sink", "rich", "z", "w"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        ledger.transfer("s", source="sink", destination="x", amount=AMOUNT_MAX)  # sink: -(2**63-1)
        ledger.transfer("p1", source="x", destination="sink", amount=AMOUNT_MAX, pending=True)
        with pytest.raises(BalanceOverflow):
            ledger.transfer("p2", source="y", destination="sink", amount=1, pending=True)
        ledger.transfer("s2", source="z", destination="rich", amount=AMOUNT_MAX)  # rich: 2**63-1
        ledger.transfer("h1", source="rich", destination="w", amount=AMOUNT_MAX, pending=True)
        with pytest.raises(BalanceOverflow):
            ledger.transfer("h2", source="rich", destination="z", amount=1, pending=True)
        assert ledger.balance("sink") == Balance(-AMOUNT_MAX, 0, -AMOUNT_MAX, AMOUNT_MAX)
        assert ledger.balance("rich") == Balance(AMOUNT_MAX, AMOUNT_MAX, 0, 0)
        assert ledger.post_pending("q1", pending_id="p1").amount == AMOUNT_MAX
        assert ledger.post_pending("q2", pending_id="h1").amount == AMOUNT_MAX
        assert ledger.balance("sink").posted == 0 and ledger.balance("rich").posted == 0


def test_a_ledger_whose_holds_went_past_the_bound_before_it_existed_still_opens_and_verifies(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Replay re-decides every commit: pending transfers journaled before the bound on
    `pending` and `incoming` are not damage."""
    path = tmp_path / "ledger"
    monkeypatch.setattr(_rules.decide_transfer, "__defaults__", (False,))  # the rule as it was
    monkeypatch.setattr(_rules.decide_pending, "__defaults__", (False,))
    monkeypatch.setattr(_rules.decide, "__defaults__", (_rules.NOTHING, False))
    with Ledger.open(path, clock_ns=Clock(), checkpoint_interval=10**6) as ledger:
        for name in ("z", "rich", "w"):
            ledger.create_account(name, currency="USD", overdraft_limit=None)
        ledger.transfer("s", source="z", destination="rich", amount=AMOUNT_MAX)
        ledger.transfer("h1", source="rich", destination="w", amount=AMOUNT_MAX, pending=True)
        ledger.transfer("h2", source="rich", destination="z", amount=5, pending=True)
    monkeypatch.undo()

    with Ledger.open(path, clock_ns=Clock()) as ledger:
        assert ledger.balance("rich").pending == AMOUNT_MAX + 5
        ledger.void_pending("v", pending_id="h2")
        assert ledger.balance("rich").pending == AMOUNT_MAX
    assert audit_of(path).whole


def test_inspect_of_an_account_shows_the_expiry_that_released_its_hold(built: Built) -> None:
    expired = built.transfers["p-exp"]
    for account in (expired.source, expired.destination):
        code, report = tally_json("inspect", built.path, "--account", account)
        assert code == 0 and report["problem"] is None
        assert [row["pending_ids"] for row in report["records"] if row["kind"] == "expiry"] == [["p-exp"]]
    code, report = tally_json("inspect", built.path, "--account", "dave")
    assert not [row for row in report["records"] if row["kind"] == "expiry"]


# --- posts and voids in one batch (Ledger._decide_many, for the sharded ledger's shards) -----


@pytest.mark.parametrize("path", ["turns", "mailboxes"])
def test_posts_and_voids_decide_in_one_batch_in_list_order_on_either_path(
        books: Ledger, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator import Resolution

    if path == "mailboxes":  # the batch falls back as when its turns cannot be taken
        import coordinator._coordinator

        class NoTurns:
            def __init__(self, *args: object) -> None:
                pass

            def run(self) -> None:
                return None

        monkeypatch.setattr(coordinator._coordinator, "TurnBatch", NoTurns)
    books.transfer("h1", source="alice", destination="bob", amount=30, pending=True)
    books.transfer("h2", source="alice", destination="carol", amount=20, pending=True)
    outcomes = books._decide_many([
        Resolution("p1", "h1"),
        TransferRequest("h3", "alice", "bob", 10, pending=True),
        Resolution("p3", "h3", amount=4),  # a pending transfer made earlier in the same batch
        Resolution("v2", "h2", void=True),
        Resolution("p2", "h2"),  # voided just before
        Resolution("x", "nothing"),
        Resolution("p4", "h1", amount=5),
    ])
    assert [o.kind if isinstance(o, Transfer) else o.code for o in outcomes] == [
        "post", "pending", "post", "void", "pending_transfer_already_voided", "pending_transfer_not_found",
        "pending_transfer_already_posted"]
    assert balances(books, "alice", "bob", "carol") == {
        "alice": Balance(FUNDING - 34, 0, FUNDING - 34, 0), "bob": Balance(34, 0, 34, 0), "carol": Balance(0, 0, 0, 0)}
    assert books._decide_many([Resolution("p1", "h1")]) == outcomes[:1]  # a retry: the same post


@pytest.mark.parametrize("path", ["turns", "mailboxes"])
def test_a_post_or_void_in_a_batch_whose_id_is_its_pending_transfers_id_is_decided_on_either_path(
        books: Ledger, path: str) -> None:
    """`Ledger._decide_many` (the sharded ledger's batches): a post named as its own pending
    transfer (an id used already) is an `IdempotencyConflict`, as `post_pending` says; a void
    of a pending id never used, named as it, is refused as not found. The path that starts
    each item through the mailboxes planned such an item to follow itself, so it never
    started and the batch timed out (`LedgerTimeout`), and so did every retry of it."""
    from coordinator import Resolution
    from coordinator._batch import Batch

    books.transfer("h1", source="alice", destination="bob", amount=30, pending=True)
    batch = [Resolution("h1", "h1"), Resolution("n", "n", void=True), Resolution("v1", "h1", void=True)]
    if path == "turns":
        out = books._decide_many(batch)
    else:  # the batch path that starts each item through the mailboxes, in dependency order
        out = Batch(books._coordinator, batch, WAIT_S).run()
    assert [type(o).__name__ if isinstance(o, Exception) else o.kind for o in out] == [
        "IdempotencyConflict", "PendingTransferNotFound", "void"]
    with pytest.raises(IdempotencyConflict):
        books.post_pending("h1", pending_id="h1")
    assert books.balance("alice") == Balance(FUNDING, 0, FUNDING, 0)


def test_transfer_many_refuses_a_post_or_a_void_among_its_items_and_moves_the_rest(tmp_path: Path) -> None:
    from coordinator import Resolution

    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        ledger.transfer("p", source="bank", destination="a", amount=5, pending=True)
        out = ledger.transfer_many([Resolution("q", "p"), TransferRequest("t", "bank", "a", 7)])  # type: ignore[list-item]
        assert isinstance(out[0], InvalidRequest) and "post_pending" in str(out[0])
        assert out[1].amount == 7
        assert ledger.get_transfer("p").status == "pending" and ledger.outcome("q") is None


@pytest.mark.parametrize("path", ["turns", "mailboxes"])
def test_a_post_of_a_pending_transfer_made_earlier_in_a_batch_keeps_list_order_on_either_path(
        tmp_path: Path, path: str) -> None:
    """`Ledger._decide_many` (the sharded ledger's batches): the post follows every item listed
    before it on the pending transfer's accounts, whichever path decides the batch."""
    from coordinator import Resolution
    from coordinator._batch import Batch

    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in "abcd":
            ledger.create_account(name, currency="USD")
        for name in "ac":
            ledger.transfer("f" + name, source="bank", destination=name, amount=100)
        batch = [TransferRequest("P", "c", "d", 50, pending=True), TransferRequest("Y", "a", "b", 10),
                 TransferRequest("X", "d", "a", 50), Resolution("Q", "P")]  # X comes before Q: d has nothing yet
        if path == "turns":
            out = ledger._decide_many(batch)
        else:  # the batch path that starts each item through the mailboxes, in dependency order
            out = Batch(ledger._coordinator, batch, 10.0).run()
        assert [type(o).__name__ if isinstance(o, Exception) else o.status for o in out] == \
            ["pending", "posted", "InsufficientFunds", "posted"]
        assert ledger.balance("d").posted == 50
