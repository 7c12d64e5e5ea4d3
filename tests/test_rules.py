"""The rules: one pure function decides every transfer, and replay decides each commit again.

`rules.decide` is what the source's turn, the sequencer's stamping, a batch holding turns and
replay all call. Here it is checked on its own, and through replay: a commit record that
live operation could not have written (across currencies, past an overdraft limit, past the
largest balance) is damage, named by its LSN, however well its checksum checks out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from coordinator import INDEX_NAMES
from coordinator._audit import CHECK_LIMITS
from coordinator._records import (
    COMMIT,
    EXPIRY3,
    TRANSFER3,
    TRANSFERS_INDEX,
    encode,
    id_key,
    lsn_value,
    resolution_key,
)
from coordinator._rules import Refusal, decide, enter
from coordinator._state import Pending, Projection
from coordinator._values import POST, SINGLE, VOID, Resolution
from engine import Account, JournalCorrupted, Ledger, Transfer, TransferRequest
from engine._tools_audit import verify
from journal import Journal

ROOT = Path(__file__).resolve().parents[1]
MAX = 2**63 - 1
USD = Account("a", "USD", 0)
USD_B = Account("b", "USD", 0)
UNLIMITED = Account("bank", "USD", None)
EUR = Account("e", "EUR", 0)


def book(*accounts: tuple[Account, tuple[int, int, int]], held: dict[str, int] | None = None) -> Projection:
    """The books a decision reads: these accounts in these states (and holds)."""
    books = Projection()
    for account, state in accounts:
        books.accounts[account.id] = account
        books.states[account.id] = state
    books.held.update(held or {})
    return books


def move(amount: int, source: str = "a", destination: str = "b", tid: str = "t", **fields: object) -> TransferRequest:
    return TransferRequest(tid, source, destination, amount, **fields)  # type: ignore[arg-type]


def test_a_transfer_between_two_accounts_stamps_the_next_entry_of_each() -> None:
    decided = decide([move(30)], book((USD, (4, 100, 17)), (USD_B, (9, 5, 12))), 0)
    assert decided == [(0, "a", "b", 30, (5, 70, 10, 35), None)]


@pytest.mark.parametrize(
    ("source", "destination", "origin", "target", "reserved", "code"),
    [
        (None, USD_B, (0, 0, 0), (0, 0, 0), 0, "account_not_found"),
        (USD, None, (0, 0, 0), (0, 0, 0), 0, "account_not_found"),
        (USD, EUR, (1, 100, 1), (0, 0, 0), 0, "currency_mismatch"),
        (USD, USD_B, (1, 29, 1), (0, 0, 0), 0, "insufficient_funds"),
        (USD, USD_B, (1, 100, 1), (0, 0, 0), 71, "insufficient_funds"),  # what is reserved is not there to spend
        (Account("a", "USD", 10), USD_B, (1, 19, 1), (0, 0, 0), 0, "insufficient_funds"),
        (UNLIMITED, USD_B, (1, -MAX + 29, 1), (0, 0, 0), 0, "balance_overflow"),
        (USD, USD_B, (1, 100, 1), (1, MAX - 29, 1), 0, "balance_overflow"),
    ],
)
def test_the_rules_refuse_with_the_code_that_says_why(
    source: Account | None, destination: Account | None, origin: tuple, target: tuple, reserved: int, code: str
) -> None:
    present = [(account, state) for account, state in ((source, origin), (destination, target)) if account is not None]
    source_id = source.id if source is not None else "a"
    destination_id = destination.id if destination is not None else "b"
    decided = decide([move(30, source_id, destination_id)], book(*present), 0, {source_id: reserved})
    assert decided == Refusal(0, code)


def test_an_overdraft_limit_lets_the_balance_reach_minus_the_limit_exactly() -> None:
    assert decide([move(30)], book((Account("a", "USD", 10), (1, 20, 1)), (USD_B, (0, 0, 0))), 0) == [
        (0, "a", "b", 30, (2, -10, 1, 30), None)]
    assert decide([move(30, "bank")], book((UNLIMITED, (1, -MAX + 30, 1)), (USD_B, (0, 0, 0))), 0) == [
        (0, "bank", "b", 30, (2, -MAX, 1, 30), None)]


def test_funds_a_pending_transfer_holds_are_not_there_to_spend() -> None:
    books = book((USD, (1, 100, 1)), (USD_B, (0, 0, 0)), held={"a": 80})
    assert decide([move(30)], books, 0) == Refusal(0, "insufficient_funds")
    assert decide([move(20)], books, 0) == [(0, "a", "b", 20, (2, 80, 1, 20), None)]


def test_a_pending_transfer_holds_without_an_entry_and_its_post_moves_part_and_releases_all() -> None:
    books = book((USD, (1, 100, 1)), (USD_B, (0, 0, 0)))
    pending = move(60, tid="p", pending=True, timeout_s=5)
    legs = decide([pending], books, 1_000)
    assert legs == [(1, "a", "b", 60, None, None)]
    enter(books, [pending], legs, 2, 1_000)  # type: ignore[arg-type]
    assert books.held == {"a": 60} and books.incoming == {"b": 60} and books.states["a"] == (1, 100, 1)
    assert books.pending["p"] == Pending("p", "a", "b", 60, 1_000 + 5 * 10**9, 2, 0)
    assert decide([move(41)], books, 1_001) == Refusal(0, "insufficient_funds")

    post = Resolution("q", "p", 25)
    legs = decide([post], books, 1_002)
    assert legs == [(2, "a", "b", 25, (2, 75, 1, 25), books.pending["p"])]
    enter(books, [post], legs, 3, 1_002)  # type: ignore[arg-type]
    assert books.held == {} and books.incoming == {} and books.pending == {}
    assert books.states["a"] == (2, 75, 3) and books.states["b"] == (1, 25, 3)


@pytest.mark.parametrize(
    ("request_", "at", "code"),
    [
        (Resolution("q", "p", 61), 0, "exceeds_pending_amount"),
        (Resolution("q", "nope"), 0, "pending_transfer_not_found"),
        (Resolution("q", "p"), 10**9, "pending_transfer_expired"),  # at its deadline, not yet journaled as expired
        (Resolution("q", "p", void=True), 10**9, "pending_transfer_expired"),
    ],
)
def test_a_post_or_void_the_rules_refuse(request_: Resolution, at: int, code: str) -> None:
    books = book((USD, (1, 100, 1)), (USD_B, (0, 0, 0)), held={"a": 60})
    books.pending["p"] = Pending("p", "a", "b", 60, 10**9, 2, 0)
    assert decide([request_], books, at) == Refusal(0, code)


def test_a_chain_sees_each_legs_effects_and_refuses_all_at_the_first_leg_that_fails() -> None:
    c = Account("c", "USD", 0)
    books = book((USD, (1, 100, 1)), (USD_B, (0, 0, 0)), (c, (0, 0, 0)))
    through = [move(70, "a", "b", "1"), move(70, "b", "c", "2")]  # b is empty until leg 0 credits it
    assert decide(through, books, 0) == [(0, "a", "b", 70, (2, 30, 1, 70), None), (0, "b", "c", 70, (2, 0, 1, 70), None)]
    assert decide([*through, move(1, "b", "c", "3")], books, 0) == Refusal(2, "insufficient_funds")
    assert books.states == {"a": (1, 100, 1), "b": (0, 0, 0), "c": (0, 0, 0)}  # deciding changes nothing


def test_a_post_in_a_chain_stamps_its_entries_after_those_of_the_legs_before_it() -> None:
    """A post or void in a chain is decided from the chain's entries so far, as a transfer is:
    here leg 0 moves 10 from a, so the post of a's hold is a's third entry (not its second
    again) and leaves 30, not 40. Stamped from the books before the chain, the record would
    repeat leg 0's seq, and the post would undo leg 0's debit."""
    books = book((USD, (1, 100, 1)), (USD_B, (0, 0, 0)), held={"a": 60})
    books.incoming["b"] = 60
    books.pending["p"] = Pending("p", "a", "b", 60, 0, 2, 0)

    legs = decide([move(10), Resolution("q", "p", 60)], books, 1_000)

    assert legs == [(SINGLE, "a", "b", 10, (2, 90, 1, 10), None),
                    (POST, "a", "b", 60, (3, 30, 2, 70), books.pending["p"])]


@pytest.mark.parametrize(
    ("first", "second", "code"),
    [
        (Resolution("q", "p", 20), Resolution("r", "p", 20), "pending_transfer_already_posted"),
        (Resolution("q", "p", 20), Resolution("r", "p", void=True), "pending_transfer_already_posted"),
        (Resolution("q", "p", void=True), Resolution("r", "p"), "pending_transfer_already_voided"),
    ],
    ids=["post then post", "post then void", "void then post"],
)
def test_a_chain_that_resolves_one_pending_transfer_twice_is_refused_at_the_second(
    first: Resolution, second: Resolution, code: str
) -> None:
    """A post or a void closes its pending transfer for the legs after it too: the books still
    hold it open while the chain is decided, but a second post would move its money twice and
    release its hold twice (and `enter` could not write it)."""
    books = book((USD, (1, 100, 1)), (USD_B, (0, 0, 0)), held={"a": 60})
    books.incoming["b"] = 60
    books.pending["p"] = Pending("p", "a", "b", 60, 0, 2, 0)

    assert decide([first, second], books, 1_000) == Refusal(1, code)
    assert decide([first, move(1), second], books, 1_000) == Refusal(2, code)
    assert books.pending["p"] == Pending("p", "a", "b", 60, 0, 2, 0) and books.held == {"a": 60}  # nothing changed


def _ledger_with_a_forged_commit(path: Path, source: str, destination: str, amount: int, stamp: tuple) -> int:
    """A closed ledger, then a commit record with a valid checksum that the rules refuse,
    appended through the journal as the engine writes one; its LSN."""
    with Ledger.open(path, checkpoint_interval=10**6) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.create_account("euro", currency="EUR")
        ledger.transfer("fund", source="bank", destination="alice", amount=100)
    return _append_forged(path, [COMMIT, "forged", source, destination, amount, *stamp], [id_key("forged")])


def _append_forged(path: Path, record: list[object], transfer_keys: list[bytes]) -> int:
    """Append `record` to the closed ledger at `path` through the journal, as the engine writes
    one (a valid checksum, the chain extended), with the transfers index keys it puts there
    naming its LSN (so the index counts add up); its LSN."""
    journal = Journal.open(path, index_names=INDEX_NAMES)
    try:
        lsn = journal.last_lsn + 1
        appended = journal.append(encode(record), [(TRANSFERS_INDEX, key, lsn_value(lsn)) for key in transfer_keys])
        assert appended == lsn
        journal.wait_durable(lsn, 10.0)
    finally:
        journal.close()
    return lsn


@pytest.mark.parametrize(
    ("source", "destination", "amount", "stamp", "says"),
    [
        ("alice", "euro", 10, (2, 90, 1, 10), "different currencies"),
        ("alice", "bank", 500, (2, -400, 2, -99_500), "overdraft limit"),
    ],
    ids=["across currencies", "past the overdraft limit"],
)
def test_a_commit_the_rules_refuse_is_damage_at_its_lsn_however_good_its_checksum(
    tmp_path: Path, source: str, destination: str, amount: int, stamp: tuple, says: str
) -> None:
    path = tmp_path / "ledger"
    lsn = _ledger_with_a_forged_commit(path, source, destination, amount, stamp)

    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path)
    assert caught.value.lsn == lsn and says in str(caught.value)
    done = subprocess.run([sys.executable, "-m", "engine", "verify", str(path), "--json"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    report = json.loads(done.stdout)
    assert done.returncode == 1 and report["corrupt_lsn"] == lsn
    assert report["checks"][CHECK_LIMITS] is False


NOW = 1_700_000_000 * 10**9
"""A clock that stands still: the engine stamps each record 1 ns after the one before."""


def _ledger_with_a_pending_transfer(path: Path, **fields: object) -> Transfer:
    """A closed ledger whose last record is pending transfer "p-1" of 60 from bank to bob."""
    with Ledger.open(path, checkpoint_interval=10**6, clock_ns=lambda: NOW) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("bob", currency="USD")
        return ledger.transfer("p-1", source="bank", destination="bob", amount=60, pending=True,
                               **fields)  # type: ignore[arg-type]


def _post_of_p1(timestamp: int, code: int) -> list[object]:
    """The TRANSFER3 record of post "post-1" of all of "p-1" (bank's and bob's first entries)."""
    return [TRANSFER3, timestamp, False, [POST, "post-1", "bank", "bob", 60, code, None, None, None, "p-1", None,
                                          1, -60, 1, 60]]


def test_a_journaled_post_with_another_code_than_its_pending_transfers_is_damage_at_its_lsn(tmp_path: Path) -> None:
    """A post carries its pending transfer's code (a resolution has none of its own; the
    writer copies it): a record whose post says another code is one live operation could
    not have written, however good its checksum, and replay must say so at its LSN rather
    than open a ledger whose post and pending transfer disagree. The same record with the
    pending transfer's code opens, so nothing else in it is at fault."""
    honest = tmp_path / "honest"
    held = _ledger_with_a_pending_transfer(honest, code=7)
    _append_forged(honest, _post_of_p1(held.timestamp + 1_000, 7), [resolution_key("p-1"), id_key("post-1")])
    with Ledger.open(honest, clock_ns=lambda: NOW) as ledger:
        assert ledger.get_transfer("post-1").code == 7 and ledger.get_transfer("p-1").status == "posted"

    path = tmp_path / "ledger"
    held = _ledger_with_a_pending_transfer(path, code=7)
    lsn = _append_forged(path, _post_of_p1(held.timestamp + 1_000, 0), [resolution_key("p-1"), id_key("post-1")])

    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path, clock_ns=lambda: NOW)
    assert caught.value.lsn == lsn and "'post-1'" in str(caught.value)
    assert verify(str(path))["corrupt_lsn"] == lsn


def test_an_expiry_journaled_before_its_pending_transfers_deadline_is_damage_at_its_lsn(tmp_path: Path) -> None:
    """An expiry ends only pending transfers whose deadline has come by its timestamp: one
    journaled a second early would have released a hold the owner could still post, so
    replay must refuse it at its LSN (an expiry at the deadline itself opens)."""
    honest = tmp_path / "honest"
    held = _ledger_with_a_pending_transfer(honest, timeout_s=10)
    deadline = held.timestamp + 10 * 10**9
    _append_forged(honest, [EXPIRY3, deadline, ["p-1"]], [resolution_key("p-1")])
    with Ledger.open(honest, clock_ns=lambda: NOW) as ledger:
        assert ledger.get_transfer("p-1").status == "expired"

    path = tmp_path / "ledger"
    held = _ledger_with_a_pending_transfer(path, timeout_s=10)
    lsn = _append_forged(path, [EXPIRY3, held.timestamp + 9 * 10**9, ["p-1"]], [resolution_key("p-1")])

    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path, clock_ns=lambda: NOW)
    assert caught.value.lsn == lsn and "has not reached its deadline" in str(caught.value)
    assert verify(str(path))["corrupt_lsn"] == lsn


@pytest.mark.parametrize("second", ["post", "void"])
def test_a_journaled_chain_that_resolves_one_pending_transfer_twice_is_damage_at_its_lsn(
    tmp_path: Path, second: str
) -> None:
    """A chain whose legs post "p-1" and then post or void it again is not one live operation
    writes (the rules refuse the second leg); with a valid checksum, replay must say so at its
    LSN, as open and as verify, rather than fail on a pending transfer already gone."""
    path = tmp_path / "ledger"
    held = _ledger_with_a_pending_transfer(path)
    again = ([POST, "again", "bank", "bob", 60, 0, None, None, None, "p-1", None, 2, -120, 2, 120] if second == "post"
             else [VOID, "again", "bank", "bob", 60, 0, None, None, None, "p-1", None, 0, 0, 0, 0])
    chain = [TRANSFER3, held.timestamp + 1_000, True, _post_of_p1(0, 0)[3], again]
    lsn = _append_forged(path, chain, [resolution_key("p-1"), id_key("post-1"), id_key("again")])

    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path, clock_ns=lambda: NOW)
    assert caught.value.lsn == lsn and "'again'" in str(caught.value) and "already posted" in str(caught.value)
    report = verify(str(path))
    assert report["corrupt_lsn"] == lsn and report["checks"][CHECK_LIMITS] is False


def _ledger_with_a_transfer_then_one_stamped(path: Path, after: int) -> tuple[int, int]:
    """A ledger whose last record is transfer "t-1" of 1 from bank to bob, then transfer "t-2"
    of 2 forged after it, stamped `after` ns after "t-1": ("t-1"'s timestamp, "t-2"'s LSN)."""
    with Ledger.open(path, checkpoint_interval=10**6, clock_ns=lambda: NOW) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("bob", currency="USD")
        first = ledger.transfer("t-1", source="bank", destination="bob", amount=1)
    second = [TRANSFER3, first.timestamp + after, False,
              [SINGLE, "t-2", "bank", "bob", 2, 0, None, None, None, None, None, 2, -3, 2, 3]]
    return first.timestamp, _append_forged(path, second, [id_key("t-2")])


def test_a_record_stamped_with_the_timestamp_of_the_one_before_is_damage_at_its_lsn(tmp_path: Path) -> None:
    """Timestamps rise strictly from record to record (a clock that stands still or goes back
    gets the last one plus 1 ns): point-in-time reads and deadlines depend on it. A record
    with the timestamp of the one before is not one the engine writes, and replay must say
    so at its LSN; 1 ns later, the same record opens."""
    _ledger_with_a_transfer_then_one_stamped(tmp_path / "honest", 1)
    with Ledger.open(tmp_path / "honest", clock_ns=lambda: NOW) as ledger:
        assert ledger.balance("bob").posted == 3

    path = tmp_path / "ledger"
    before, lsn = _ledger_with_a_transfer_then_one_stamped(path, 0)

    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path, clock_ns=lambda: NOW)
    assert caught.value.lsn == lsn and f"does not follow timestamp {before}" in str(caught.value)
    assert verify(str(path))["corrupt_lsn"] == lsn


# --- one leg's record: `_stamp_one` and `_stamp_legs` write the same --------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("same_account", [False, True])
def test_one_requests_stamp_is_what_the_chains_stamp_writes_for_one_leg(tmp_path: Path, same_account: bool) -> None:
    """A request alone is stamped by `Sequencer._stamp_one`, a chain by `_stamp_legs`: for one
    leg of every kind (with code, reference, metadata, timeouts, holds already on the
    accounts), both put the same record, index keys, hold rows, entries, `Transfer`,
    deadlines and counts in the chunk. `same_account`: a leg no live request makes (one
    account on both sides), which salvage copies from a journal as it finds it."""
    import copy
    import random

    from coordinator._claims import Ticket
    from coordinator._stamps import Chunk
    from coordinator._values import PENDING, POST, SINGLE, VOID, Metadata

    rng = random.Random(7)
    names = ["a", "b", "c"]
    with Ledger.open(str(tmp_path / "l"), clock_ns=lambda: 10**18) as ledger:
        sequencer = ledger._coordinator.sequencer

        def stamped(alone: bool, request: TransferRequest | Resolution, lsn: int, timestamp: int,
                    leg: tuple) -> tuple[object, ...]:
            ticket = Ticket((request,), 0)
            chunk = Chunk()
            saved = (sequencer.index_entries, dict(sequencer._resolved), copy.copy(sequencer._resolved_at),
                     list(sequencer._deadlines))
            if alone:
                sequencer._stamp_one(chunk, ticket, request, lsn, timestamp, leg)
            else:
                sequencer._stamp_legs(chunk, ticket, lsn, timestamp, [leg])
            made = ({name: getattr(chunk, name) for name in Chunk.__slots__ if name != "completions"},
                    chunk.completions == [ticket], ticket.value, sequencer.index_entries,
                    dict(sequencer._resolved), list(sequencer._resolved_at), sorted(sequencer._deadlines))
            (sequencer.index_entries, sequencer._resolved, sequencer._resolved_at, sequencer._deadlines) = saved
            return made

        with sequencer.lock:
            for _ in range(3000):
                sequencer.held.clear()
                sequencer.incoming.clear()
                for name in names:
                    if rng.random() < 0.5:
                        sequencer.held[name] = rng.randint(1, 500)
                    if rng.random() < 0.5:
                        sequencer.incoming[name] = rng.randint(1, 500)
                source, destination = rng.sample(names, 2)
                destination = source if same_account else destination
                metadata = rng.choice([None, Metadata({"k": 1})])
                kind, amount = rng.choice([SINGLE, PENDING, POST, VOID]), rng.randint(1, 100)
                held = Pending("p", source, destination, amount + rng.randint(0, 50), 0, 3, rng.randint(0, 9))
                entries = (rng.randint(0, 9), rng.randint(-9, 9), rng.randint(0, 9), rng.randint(-9, 9))
                request: TransferRequest | Resolution
                if kind in (SINGLE, PENDING):
                    request = TransferRequest("t", source, destination, amount, rng.randint(0, 5),
                                              rng.choice([None, "r"]), metadata, kind == PENDING,
                                              rng.choice([None, 7]) if kind == PENDING else None)
                    leg = (kind, source, destination, amount, entries if kind == SINGLE else None, None)
                else:
                    request = Resolution("t", "p", rng.choice([None, amount]), rng.choice([None, "r"]), metadata,
                                         kind == VOID)
                    leg = (kind, source, destination, held.amount if kind == VOID else amount,
                           entries if kind == POST else None, held)
                lsn, timestamp = rng.randint(1, 10**6), 10**18 + rng.randint(0, 10**9)
                assert stamped(True, request, lsn, timestamp, leg) == stamped(False, request, lsn, timestamp, leg), leg


# --- a pending transfer's and a post's own path decide and write what `stamp` does --------


@pytest.mark.timeout(60)
def test_stamp_pending_and_stamp_resolution_are_what_the_generic_stamp_does(tmp_path: Path) -> None:
    """Decided in turn, a pending transfer and a post or a void of an open one take their own
    path (`Sequencer.stamp_pending`, `stamp_resolution`, the caller moving `states` past a
    post's entries); the generic `Sequencer.stamp` decides every other ticket. From the same
    books (random balances, limits, currencies, holds, reservations, open pending transfers
    with and without deadlines, some due), both must make the same decision, refusals
    included, and leave the same chunk, `Transfer` or `Refused`, and projection."""
    import copy
    import random

    from coordinator._claims import Ticket
    from coordinator._stamps import Chunk
    from coordinator._values import Metadata

    rng = random.Random(11)
    names = ["a", "b", "c", "e"]
    with Ledger.open(str(tmp_path / "l"), clock_ns=lambda: 10**18) as ledger:
        for name, currency, limit in (("a", "USD", None), ("b", "USD", 0), ("c", "USD", 50), ("e", "EUR", None)):
            ledger.create_account(name, currency=currency, overdraft_limit=limit)
        sequencer = ledger._coordinator.sequencer
        fields = ("states", "held", "incoming", "pending", "_resolved", "_resolved_at", "_deadlines", "_draining",
                  "_deadlines_stale", "index_entries", "last_timestamp")
        with sequencer.lock:
            original = {name: copy.deepcopy(getattr(sequencer, name)) for name in fields}

            def books() -> dict[str, object]:
                return {name: copy.deepcopy(getattr(sequencer, name)) for name in fields}

            def restore(saved: dict[str, object]) -> None:
                for name, value in saved.items():
                    setattr(sequencer, name, copy.deepcopy(value))

            def outcome(chunk: Chunk, ticket: Ticket) -> tuple[object, ...]:
                return ({name: getattr(chunk, name) for name in Chunk.__slots__ if name != "completions"},
                        chunk.completions == [ticket], ticket.value, books())

            try:
                for round_ in range(2000):
                    for name in names:
                        sequencer.states[name] = (rng.randint(0, 9), rng.randint(-60, 400), rng.randint(0, 9))
                    sequencer.pending.clear()
                    sequencer.held.clear()
                    sequencer.incoming.clear()
                    for n in range(3):
                        source, destination = rng.sample(names[:3], 2)
                        amount = rng.randint(1, 120)
                        deadline = rng.choice([0, 10**18 + 5, 10**18 + 10**9])
                        sequencer.pending[f"p{n}"] = Pending(f"p{n}", source, destination, amount, deadline, 3,
                                                             rng.randint(0, 9))
                        sequencer.held[source] = sequencer.held.get(source, 0) + amount
                        sequencer.incoming[destination] = sequencer.incoming.get(destination, 0) + amount
                    sequencer._deadlines[:] = sorted((p.deadline, p.id) for p in sequencer.pending.values()
                                                     if p.deadline)
                    sequencer.last_timestamp = 10**18 + rng.choice([-1, 7, 10**9 + 3])
                    lsn, now = 1_000 + round_, 10**18 + rng.randint(0, 12)
                    metadata = rng.choice([None, Metadata({"k": 1})])
                    request: TransferRequest | Resolution
                    if rng.random() < 0.5:
                        source, destination = rng.sample(names, 2)
                        request = TransferRequest(f"t{round_}", source, destination, rng.randint(1, 500),
                                                  rng.randint(0, 5), rng.choice([None, "r"]), metadata, True,
                                                  rng.choice([None, 7]))
                        found = None
                    else:
                        found = sequencer.pending[f"p{rng.randint(0, 2)}"]
                        source, destination = found.source, found.destination
                        request = Resolution(f"t{round_}", found.id, rng.choice([None, 1, found.amount, found.amount + 1]),
                                             rng.choice([None, "r"]), metadata, rng.random() < 0.3)
                    reserved = rng.choice([0, 0, 30])
                    before = books()

                    generic = Ticket((request,), 0)
                    chunk = Chunk()
                    sequencer.stamp(chunk, generic, lsn, {source: reserved} if reserved else {}, now=now)
                    expected = outcome(chunk, generic)

                    restore(before)
                    own = Ticket((request,), 0)
                    chunk = Chunk()
                    if found is None:
                        sequencer.stamp_pending(chunk, own, request, lsn, sequencer.accounts[source],  # type: ignore[arg-type]
                                                sequencer.accounts[destination], sequencer.states[source],
                                                sequencer.states[destination], reserved, now)
                    else:
                        leg = sequencer.stamp_resolution(chunk, own, request, lsn, found, now)  # type: ignore[arg-type]
                        if type(leg) is not str and leg[4] is not None:  # the caller's: the accounts apply a post's entries
                            stamp = leg[4]
                            sequencer.states[source] = (stamp[0], stamp[1], lsn)
                            sequencer.states[destination] = (stamp[2], stamp[3], lsn)
                    assert outcome(chunk, own) == expected, (request, before)
                    restore(before)
            finally:
                restore(original)

