"""Cross-shard transfers under failure (engine._crossing, engine._shard_steps): in-doubt recovery with a
fenced presumed abort, retries from two callers at once, conservation under concurrent load, and
SIGKILL of a shard's process and of the caller mid-load, then every acknowledged transfer
present, nothing left in doubt, and every shard's `tally verify` whole. One real Ray (local,
loopback) serves the module; the caller-kill test's caller starts a Ray of its own.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import (
    AccountNotFound,
    Balance,
    CrossShardAborted,
    CurrencyMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    LedgerError,
    LedgerTimeout,
    ShardedLedger,
    Transfer,
    TransferRequest,
)
from engine._shard_steps import credit_row, prepare_row
from engine._wire import outcomes_of, pack, unpack
from tests.sharded_support import SHARDS, ClockFailingIn, accounts_on, books, poll, ray_for_module, shard_dirs
from tests.test_cli import tally_json

pytestmark = pytest.mark.timeout(120)
ROOT = Path(__file__).resolve().parents[1]
LOAD_S = 240.0
"""How long a load of these tests may take on a loaded 2-core machine (about 25 s on a quiet one)."""


@pytest.fixture(scope="module", autouse=True)
def _ray() -> Iterator[None]:
    with ray_for_module():
        yield


def _step(ledger: ShardedLedger, shard: int, method: str, *items: object) -> list[object]:
    """One protocol step called on a shard's actor directly, as a caller that dies after it."""
    import ray

    blob = ray.get(getattr(ledger._router.actors[shard], method).remote(pack(list(items))), timeout=60)  # type: ignore[arg-type]
    return list(outcomes_of(unpack(blob)))


def _settled(ledger: ShardedLedger) -> None:
    """Every shard's books sum to zero, every clearing pair nets to zero, nothing is held."""
    sums, pairs, in_flight, users = books(ledger)
    assert sums == [0] * ledger.shards and set(pairs.values()) <= {0} and in_flight == 0 and users == 0


def _balances(ledger: ShardedLedger) -> list[dict[str, Balance]]:
    """Every shard's balances, the protocol's accounts included: what a refused retry must leave."""
    return [ledger.shard_balances(shard) for shard in range(ledger.shards)]


def _verified(path: Path) -> None:
    for directory in shard_dirs(path):
        code, report = tally_json("verify", directory)
        assert (code, report["verdict"]) == (0, "whole"), report


def test_a_transfer_left_prepared_is_aborted_at_open_and_a_late_credit_never_lands(tmp_path: Path) -> None:
    path = tmp_path / "books"
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        request = TransferRequest("T", source, destination, 40)
        [hold] = _step(ledger, 0, "batch", prepare_row(request, 1))  # then the caller dies
        assert isinstance(hold, Transfer) and hold.status == "pending"
        assert ledger.balance(source).available == 60 and ledger.outcome("T") is None
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        assert ledger.recovered_in_doubt == 1
        assert ledger.balance(source) == Balance(100, 0, 100, 0) and ledger.balance(destination).posted == 0
        [late] = _step(ledger, 1, "credit", credit_row(request, 0, "USD"))  # the dead caller's credit
        assert isinstance(late, CrossShardAborted) and ledger.balance(destination).posted == 0
        with pytest.raises(CrossShardAborted):
            ledger.transfer("T", source=source, destination=destination, amount=40)
        assert isinstance(ledger.outcome("T"), CrossShardAborted) and ledger.get_transfer("T") is None
        assert ledger.recover_in_doubt() == 0
        _settled(ledger)
    _verified(path)


def test_while_open_a_transfer_in_doubt_long_enough_is_aborted_and_a_young_one_is_left(tmp_path: Path) -> None:
    """The sweeper frees what a dead caller left held without waiting for the next open,
    once its first step is `in_doubt_after_s` old; `recover_in_doubt(older_than_s)` leaves
    younger ones alone."""
    # timeout_s bounds every Ray call of the test and of the sweeper: 1 s is too short on a loaded
    # machine (a LedgerTimeout in `_settled`, or a sweep whose reply times out after it resolved T,
    # which then never counts it); in_doubt_after_s must be above 3 x timeout_s.
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS, timeout_s=3.0, in_doubt_after_s=9.5) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        _step(ledger, 0, "batch", prepare_row(TransferRequest("T", source, destination, 40), 1))  # then it dies
        assert ledger.recover_in_doubt(older_than_s=3600) == 0 and ledger.balance(source).available == 60
        # The sweeper counts T once its steps have returned, after the void that makes `outcome`
        # say aborted is durable: wait for the count, which comes last, not for the outcome.
        poll(lambda: ledger.swept_in_doubt == 1, 60, "the sweeper to abort T")
        assert isinstance(ledger.outcome("T"), CrossShardAborted)
        assert ledger.balance(source) == Balance(100, 0, 100, 0)
        with pytest.raises(CrossShardAborted):
            ledger.transfer("T", source=source, destination=destination, amount=40)
        with pytest.raises(InvalidRequest, match="older_than_s"):
            ledger.recover_in_doubt(float("inf"))
        _settled(ledger)


def test_with_a_clock_of_ones_own_no_sweeper_runs_and_ages_are_refused(tmp_path: Path) -> None:
    """As in a Ledger, a clock of one's own means nothing runs behind one's back: a day-old
    clock must not make a fresh prepare look old."""
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS, clock_ns=lambda: 10**18) as ledger:
        assert not ledger._sweeper.is_alive()
        with pytest.raises(InvalidRequest, match="wall clock"):
            ledger.recover_in_doubt(older_than_s=60)
        assert ledger.recover_in_doubt() == 0


def test_a_credit_that_fails_on_a_bad_clock_reading_leaves_the_transfer_in_flight(tmp_path: Path) -> None:
    """Its outcome is unknown, not refused: LedgerTimeout, and the retry completes it."""
    flag = tmp_path / "bad-clock-pid"
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS, clock_ns=ClockFailingIn(flag)) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        for transfer_id in ("T1", "T2"):  # the first makes the clearing accounts; the second finds them made
            flag.write_text(str(ledger.pids()[1]))  # the destination's shard: the credit's reading fails
            with pytest.raises(LedgerTimeout, match="step failed"):
                ledger.transfer(transfer_id, source=source, destination=destination, amount=20)
            assert ledger.balance(source).pending == 20 and ledger.outcome(transfer_id) is None  # in flight
            flag.unlink()
            assert ledger.transfer(transfer_id, source=source, destination=destination, amount=20).status == "posted"
        assert ledger.balance(source) == Balance(60, 0, 60, 0) and ledger.balance(destination).posted == 40
        _settled(ledger)


@pytest.mark.parametrize("after_s", [3.0, 0, -1, True, "60", float("nan"), float("inf")])
def test_an_in_doubt_age_a_live_caller_could_reach_is_refused(tmp_path: Path, after_s: object) -> None:
    with pytest.raises(InvalidRequest, match="in_doubt_after_s"):
        ShardedLedger.open(tmp_path / "books", shards=SHARDS, timeout_s=1.0, in_doubt_after_s=after_s)  # type: ignore[arg-type]
    assert not (tmp_path / "books").exists()


def test_a_transfer_whose_credit_landed_is_posted_by_recovery(tmp_path: Path) -> None:
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        request = TransferRequest("T", source, destination, 40)
        _step(ledger, 0, "batch", prepare_row(request, 1))
        [credit] = _step(ledger, 1, "credit", credit_row(request, 0, "USD"))
        assert isinstance(credit, Transfer)  # then the caller dies before the post
        assert ledger.recover_in_doubt() == 1
        made = ledger.get_transfer("T")
        assert made is not None and (made.source, made.destination, made.amount) == (source, destination, 40)
        assert ledger.transfer("T", source=source, destination=destination, amount=40) == made
        assert ledger.balance(source).posted == 60 and ledger.balance(destination).posted == 40
        _settled(ledger)


def test_a_transfer_whose_credit_was_refused_before_the_caller_died_is_voided_by_recovery(tmp_path: Path) -> None:
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        euros = accounts_on(ledger, "e", 1, shard=1, currency="EUR")[0]
        request = TransferRequest("T", source, euros, 40)
        _step(ledger, 0, "batch", prepare_row(request, 1))
        [refused] = _step(ledger, 1, "credit", credit_row(request, 0, "USD"))
        assert refused.code == "currency_mismatch"  # type: ignore[attr-defined]  # then the caller dies
        assert ledger.recover_in_doubt() == 1 and ledger.recover_in_doubt() == 0
        assert ledger.balance(source) == Balance(100, 0, 100, 0)
        assert ledger.outcome("T").code == "currency_mismatch"  # type: ignore[union-attr]
        _settled(ledger)


def test_a_retry_after_the_caller_died_naming_another_destination_is_a_conflict_and_changes_nothing(
        tmp_path: Path) -> None:
    """The prepare names the destination, not only its shard: a retry toward another account on
    that shard (or on another) is refused by the prepare, and the exact retry lands where the
    dead caller meant."""
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source, near = accounts_on(ledger, "s", 2, shard=0, balance=100)
        destination, other = accounts_on(ledger, "d", 2, shard=1)
        _step(ledger, 0, "batch", prepare_row(TransferRequest("T", source, destination, 40), 1))  # then it dies
        before = _balances(ledger)
        for elsewhere in (other, near):  # on the destination's shard; on the source's (a local transfer)
            with pytest.raises(IdempotencyConflict, match=f"'T'.*'{elsewhere}'") as refused:
                ledger.transfer("T", source=source, destination=elsewhere, amount=40)
            assert "x1f" not in str(refused.value)  # named as the user's transfer, no clearing account
        assert _balances(ledger) == before
        assert ledger.entries(other) == [] and ledger.outcome("T") is None
        assert ledger.transfer("T", source=source, destination=destination, amount=40).destination == destination
        assert [ledger.balance(name).posted for name in (source, near, destination, other)] == [60, 100, 40, 0]
        _settled(ledger)


def test_a_prepare_of_the_first_release_still_takes_its_exact_retry(tmp_path: Path) -> None:
    """A prepare the sharded ledger's first release wrote (the user's metadata, no destination)
    and left in doubt: its exact retry completes it, one with other metadata is refused."""
    metadata = {"order": "A-1"}
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        for transfer_id, given in (("T", metadata), ("U", None)):  # then the caller dies
            [prepared] = _step(ledger, 0, "batch", (None, transfer_id, source, 1, 10, 0, None, given))
            assert isinstance(prepared, Transfer) and prepared.status == "pending"
        with pytest.raises(IdempotencyConflict, match="'T'"):
            ledger.transfer("T", source=source, destination=destination, amount=10, metadata={"order": "B-2"})
        made = ledger.transfer("T", source=source, destination=destination, amount=10, metadata=metadata)
        assert dict(made.metadata or {}) == metadata and ledger.get_transfer("T") == made
        assert ledger.transfer("U", source=source, destination=destination, amount=10).status == "posted"
        assert ledger.balance(source).posted == 80 and ledger.balance(destination).posted == 20
        _settled(ledger)


def test_a_prepare_held_toward_the_sources_currency_takes_its_exact_retry_toward_another(tmp_path: Path) -> None:
    """A prepare toward a destination in another currency, held toward the clearing account in
    the source's currency (as the first release wrote it, and a release before the router knew
    currencies) and left in doubt: its exact retry, now sent toward the destination's currency,
    is asked as it was recorded, so it completes as it would have then (its credit refused:
    `CurrencyMismatch`, the hold voided), not `IdempotencyConflict`."""
    metadata = {"order": "A-1"}
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        euros = accounts_on(ledger, "e", 1, shard=1, currency="EUR")[0]
        first_release = (None, "T", source, 1, 10, 0, None, metadata)  # the user's metadata, no destination
        before = prepare_row(TransferRequest("U", source, euros, 10), 1)  # toward the source's currency
        for row in (first_release, before):  # then the caller dies
            [prepared] = _step(ledger, 0, "batch", row)
            assert isinstance(prepared, Transfer) and prepared.status == "pending"
        with pytest.raises(CurrencyMismatch, match="'T'"):
            ledger.transfer("T", source=source, destination=euros, amount=10, metadata=metadata)
        with pytest.raises(CurrencyMismatch, match="'U'"):
            ledger.transfer("U", source=source, destination=euros, amount=10)
        with pytest.raises(IdempotencyConflict):
            ledger.transfer("U", source=source, destination=euros, amount=11)
        assert ledger.balance(source) == Balance(100, 0, 100, 0)
        _settled(ledger)


def test_a_prepare_refused_toward_the_sources_currency_answers_its_exact_retry_with_that_refusal(
        tmp_path: Path) -> None:
    """A prepare an earlier release (or a router that did not know the destination's currency)
    sent toward the clearing account in the source's currency and the source's ledger refused
    (short of the amount: `InsufficientFunds`, journaled, final), toward a destination in another
    currency or one no shard has: its exact retry, now sent toward the destination's currency
    (or none), is asked as it was recorded, so it gets that refusal, not `IdempotencyConflict`.
    So too one the first release wrote, with the user's metadata (or none) and no destination,
    and one it refused while its source was unknown (toward the clearing account of no
    currency, on the source's hash shard, where the source was made later): the retry with
    that metadata gets the refusal; one with other metadata, or another amount, conflicts."""
    metadata = {"order": "A-1"}
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=10)[0]
        euros = accounts_on(ledger, "e", 1, shard=1, currency="EUR")[0]
        dollars = accounts_on(ledger, "d", 1, shard=1)[0]
        nowhere = next(n for n in (f"n{i}" for i in range(100)) if ledger.shard_of(n) == 1)
        ghost = next(n for n in (f"g{i}" for i in range(100)) if ledger.shard_of(n) == 0)
        first_release = [("X", source, euros, metadata), ("Y", source, nowhere, None), ("Z", source, dollars, metadata),
                         ("G", ghost, dollars, None)]  # (the user's metadata, no destination)
        rows = [prepare_row(TransferRequest(transfer_id, source, destination, 50), 1)
                for transfer_id, destination in (("V", euros), ("W", nowhere))]
        rows += [(None, transfer_id, payer, 1, 50, 0, None, given) for transfer_id, payer, _, given in first_release]
        refused = [outcome.code for row in rows for outcome in _step(ledger, 0, "batch", row)]  # type: ignore[attr-defined]
        assert refused == ["insufficient_funds"] * 5 + ["account_not_found"], refused
        ledger.create_account(ghost, currency="USD")  # on its hash shard, where its transfer was refused
        retries = [(transfer_id, source, destination, None, InsufficientFunds)
                   for transfer_id, destination in (("V", euros), ("W", nowhere))]
        retries += [(transfer_id, payer, destination, given, InsufficientFunds if payer == source else AccountNotFound)
                    for transfer_id, payer, destination, given in first_release]
        for transfer_id, payer, destination, given, error in retries:
            with pytest.raises(error, match=f"'{transfer_id}'"):
                ledger.transfer(transfer_id, source=payer, destination=destination, amount=50, metadata=given)
            with pytest.raises(IdempotencyConflict):
                ledger.transfer(transfer_id, source=payer, destination=destination, amount=49, metadata=given)
            with pytest.raises(IdempotencyConflict):
                ledger.transfer(transfer_id, source=payer, destination=destination, amount=50, metadata={"order": "B"})
        assert ledger.balance(source) == Balance(10, 0, 10, 0) and ledger.balance(ghost) == Balance(0, 0, 0, 0)
        _settled(ledger)


def test_a_retry_after_the_caller_died_with_other_metadata_is_a_conflict_and_the_exact_one_keeps_16_keys(
        tmp_path: Path) -> None:
    """The prepare holds a digest of the user's metadata (16 keys, the most, leave no room for
    more): a retry with other metadata is refused by the prepare; the exact retry's transfer
    shows the user's keys, which the credit carries."""
    metadata: dict[str, str | int] = {f"key-{i}": i if i % 2 else f"value-{i}" for i in range(16)}
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        request = TransferRequest("T", source, destination, 40, metadata=metadata)
        _step(ledger, 0, "batch", prepare_row(request, 1))  # then the caller dies
        before = _balances(ledger)
        for changed in ({**metadata, "key-0": "other"}, {**metadata, "key-1": "1"}, None,
                        {key: metadata[key] for key in list(metadata)[:15]}):
            with pytest.raises(IdempotencyConflict, match="'T'"):
                ledger.transfer("T", source=source, destination=destination, amount=40, metadata=changed)
        assert _balances(ledger) == before
        assert ledger.entries(destination) == [] and ledger.outcome("T") is None
        [made] = ledger.transfer_many([request])
        assert isinstance(made, Transfer) and dict(made.metadata or {}) == metadata
        assert ledger.get_transfer("T") == made and ledger.outcome("T") == made
        assert ledger.balance(source).posted == 60 and ledger.balance(destination).posted == 40
        _settled(ledger)


def test_two_callers_retrying_one_cross_shard_transfer_at_once_move_the_money_once(tmp_path: Path) -> None:
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        start = threading.Barrier(8)
        outcomes: list[Transfer | LedgerError] = []

        def caller(i: int) -> None:
            start.wait(timeout=30)
            for round_ in range(5):
                try:
                    outcomes.append(ledger.transfer(f"T{round_}", source=source, destination=destination, amount=7))
                except LedgerError as error:
                    outcomes.append(error)

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        _joined(threads)
        assert len(outcomes) == 40 and all(isinstance(o, Transfer) for o in outcomes)
        assert len({o for o in outcomes}) == 5  # type: ignore[misc]
        assert ledger.balance(source).posted == 65 and ledger.balance(destination).posted == 35
        _settled(ledger)


def _load(ledger: ShardedLedger, names: list[str], seed: int, count: int, acked: dict[str, TransferRequest],
          errors: list[LedgerError]) -> None:
    """`count` transfers between random `names`, singles and batches of 10; each acknowledged
    one is recorded in `acked`; outcomes other than refusals for funds in `errors`."""
    chance = random.Random(seed)
    done = 0
    while done < count:
        batch = [TransferRequest(f"{seed}-{done + i}", *chance.sample(names, 2), chance.randint(1, 40))
                 for i in range(1 if chance.random() < 0.3 else 10)]
        try:
            outcomes: list[Transfer | LedgerError] = ledger.transfer_many(batch)
        except LedgerTimeout as error:
            outcomes = [error] * len(batch)
        for request, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Transfer):
                acked[request.id] = request
            elif outcome.code != "insufficient_funds":
                errors.append(outcome)
        done += len(batch)


def _loaded(ledger: ShardedLedger, callers: int, batches: int) -> tuple[
        list[str], dict[str, TransferRequest], list[LedgerError], list[threading.Thread]]:
    """Four funded accounts on each shard, and `callers` threads running `_load` of `batches`
    on them, started: (the accounts, what they acknowledge, the errors they meet, the threads)."""
    names = [n for shard in range(SHARDS) for n in accounts_on(ledger, "a", 4, shard=shard, balance=500)]
    acked: dict[str, TransferRequest] = {}
    errors: list[LedgerError] = []
    threads = [threading.Thread(target=_load, args=(ledger, names, seed, batches, acked, errors))
               for seed in range(callers)]
    for thread in threads:
        thread.start()
    return names, acked, errors, threads


def _joined(threads: list[threading.Thread], within_s: float = LOAD_S) -> None:
    """Join every thread, all within `within_s`; fail if one is still running (the checks
    after must not run beside the load)."""
    deadline = time.monotonic() + within_s
    for thread in threads:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(thread.is_alive() for thread in threads), "the load did not end in time"


@pytest.mark.timeout(LOAD_S + 60)
def test_concurrent_cross_shard_load_conserves_money_on_every_shard_and_across(tmp_path: Path) -> None:
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        names, acked, errors, threads = _loaded(ledger, callers=6, batches=120)
        _joined(threads)
        assert errors == [] and len(acked) > 300
        _settled(ledger)
        assert sum(ledger.balance(name).posted for name in names) == 500 * len(names)
        for transfer_id, request in acked.items():
            made = ledger.get_transfer(transfer_id)
            assert made is not None and (made.source, made.destination, made.amount) == \
                (request.source, request.destination, request.amount)


@pytest.mark.timeout(LOAD_S + 60)
def test_a_shard_process_killed_mid_load_loses_no_acknowledged_transfer(tmp_path: Path) -> None:
    path = tmp_path / "books"
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        _, acked, errors, threads = _loaded(ledger, callers=4, batches=150)
        poll(lambda: len(acked) >= 100, 60, "the load to get going")
        victim = ledger.pids()[1]
        os.kill(victim, signal.SIGKILL)
        _joined(threads)
        assert ledger.pids()[1] != victim  # Ray restarted it; its calls were retried
        assert all(isinstance(e, LedgerTimeout) for e in errors), errors
        ledger.recover_in_doubt()
        _settled(ledger)
        for transfer_id, request in acked.items():
            made = ledger.get_transfer(transfer_id)
            assert made is not None and made.amount == request.amount, transfer_id
    _verified(path)


CALLER = textwrap.dedent("""
    import sys
    from engine import ShardedLedger, TransferRequest, Transfer
    ledger = ShardedLedger.open(sys.argv[1], shards=2)
    print("pids", *ledger.pids(), flush=True)
    names = sys.argv[2].split(",")
    for i in range(100_000):
        batch = [TransferRequest(f"c{i}-{j}", names[(i + j) % len(names)], names[(i + 2 * j + 1) % len(names)], 1)
                 for j in range(5)]
        for request, outcome in zip(batch, ledger.transfer_many(batch)):
            if isinstance(outcome, Transfer):
                print("acked", request.id, flush=True)
""")


@pytest.mark.timeout(LOAD_S + 60)
def test_the_caller_killed_mid_load_leaves_every_acknowledged_transfer_and_nothing_in_doubt(tmp_path: Path) -> None:
    path = tmp_path / "books"
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        names = [n for shard in range(SHARDS) for n in accounts_on(ledger, "a", 3, shard=shard, balance=10_000)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    caller = subprocess.Popen([sys.executable, "-c", CALLER, str(path), ",".join(names)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env)
    acked: list[str] = []
    try:
        assert caller.stdout is not None
        pids = [int(p) for p in caller.stdout.readline().split()[1:]]
        while len(acked) < 200:
            line = caller.stdout.readline()
            assert line, "the caller ended early"
            if line.startswith("acked"):
                acked.append(line.split()[1])
    finally:
        caller.send_signal(signal.SIGKILL)
        caller.wait(timeout=30)
    poll(lambda: not any(_alive(pid) for pid in pids), 60, "the dead caller's shard processes to go")
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        _settled(ledger)
        assert all(ledger.get_transfer(transfer_id) is not None for transfer_id in acked)
    _verified(path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
