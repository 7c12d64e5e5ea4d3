"""`ShardedLedger` (engine._sharded, engine._crossing, engine._placement): one ledger over shards.

Placement and the manifest; local and cross-shard transfers with `Ledger`'s results and errors;
retries; refusals across shards; what runs within one shard only; loopback-only Ray. One real
Ray (local, loopback) serves the whole module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Account,
    AccountExists,
    AccountNotFound,
    Balance,
    CrossShardAborted,
    CrossShardRefused,
    CurrencyMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    LedgerClosed,
    Ledger,
    LedgerError,
    LedgerLocked,
    LinkedTransferFailed,
    NotALedger,
    LedgerTimeout,
    LedgerUnavailable,
    PendingTransferNotFound,
    ShardCountMismatch,
    ShardedLedger,
    Transfer,
    TransferRequest,
)
from engine import _ray as ray_calls
from engine import _crossing as crossing_module
from engine import _shard as shard_module
from engine._placement import DESTINATION_KEY, METADATA_DIGEST_KEY, shard_of
from engine._crossing import Router
from engine._in_flight import InFlight
from engine._shard import Shard
from engine._shard_steps import metadata_digest, prepare_row
from engine._wire import outcomes_of, pack, unpack
from tests.support import wait_until
from tests.sharded_support import SHARDS, ClockOffsetBy, accounts_on, books, ray_for_module

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module", autouse=True)
def _ray() -> Iterator[None]:
    with ray_for_module():
        yield


@pytest.fixture
def sharded(tmp_path: Path) -> Iterator[ShardedLedger]:
    ledger = ShardedLedger.open(tmp_path / "books", shards=SHARDS)
    try:
        yield ledger
    finally:
        ledger.close()


def test_the_first_open_writes_a_manifest_and_one_ledger_per_shard(tmp_path: Path) -> None:
    with ShardedLedger.open(tmp_path / "books", shards=3) as ledger:
        assert ledger.shards == 3
    assert json.loads((tmp_path / "books" / "tally-shards.json").read_text()) == {
        "format": 1, "shards": 3, "placement": "sha256-mod"}
    assert sorted(p.name for p in (tmp_path / "books").iterdir()) == ["shard-0", "shard-1", "shard-2",
                                                                       "tally-shards.json"]


def test_shard_directories_swapped_are_refused_at_open_not_served(tmp_path: Path) -> None:
    """Each shard's ledger holds a mark of which shard it is: two shard directories swapped
    (a restore into the wrong place) are `NotALedger`, naming both; put back, all is whole."""
    path = tmp_path / "books"
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        ledger.transfer("T", source=source, destination=destination, amount=40)
        assert not [account for account in ledger.accounts() if account.id.startswith("\x1f")]  # the marks unlisted
    (path / "shard-0").rename(tmp_path / "zero")
    (path / "shard-1").rename(path / "shard-0")
    (tmp_path / "zero").rename(path / "shard-1")
    with pytest.raises(NotALedger, match="holds shard 1's ledger, not shard 0's"):
        ShardedLedger.open(path, shards=SHARDS)
    (path / "shard-0").rename(tmp_path / "one")
    (path / "shard-1").rename(path / "shard-0")
    (tmp_path / "one").rename(path / "shard-1")
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        assert ledger.get_transfer("T") is not None and ledger.balance(destination).posted == 40
        assert books(ledger)[0] == [0, 0]


def test_a_ledger_option_ray_cannot_send_is_invalid_request_and_starts_nothing(tmp_path: Path) -> None:
    lock = threading.Lock()

    def clock() -> int:  # holds a lock: it cannot be sent to the shards' processes
        with lock:
            return 1

    with pytest.raises(InvalidRequest, match="cannot be sent to the shard's process"):
        ShardedLedger.open(tmp_path / "books", shards=SHARDS, clock_ns=clock)


def test_a_shard_that_cannot_write_leaves_transfers_under_way_in_flight_not_unavailable(tmp_path: Path) -> None:
    """Once a cross-shard transfer's first step may be durable, or a batch's part on another
    shard may be done, a shard that cannot write (here its directory moved away, as a full
    disk fails writes) makes the outcome unknown: `LedgerTimeout` (retry with the same ids),
    never `LedgerUnavailable`, which reads as if nothing had been done."""
    path = tmp_path / "books"
    ledger = ShardedLedger.open(path, shards=SHARDS, timeout_s=5)
    try:
        left = accounts_on(ledger, "l", 2, shard=0, balance=10)
        right = accounts_on(ledger, "r", 2, shard=1, balance=10)
        (path / "shard-1").rename(tmp_path / "away")

        probes = iter(range(1_000_000))

        def shard_1_fails() -> bool:
            try:
                ledger.transfer(f"probe-{next(probes)}", source="rbank-1", destination=right[1], amount=1)
            except LedgerUnavailable:
                return True
            return False

        assert wait_until(shard_1_fails)  # its journal refuses writes now (within 0.1 s of the move)
        with pytest.raises(LedgerTimeout, match="in flight"):
            ledger.transfer("t", source=left[0], destination=right[0], amount=5)  # prepared on 0, credit fails
        with pytest.raises(LedgerTimeout, match="in flight or partly done"):
            ledger.transfer_many([TransferRequest("m0", left[0], left[1], 1), TransferRequest("m1", right[0], right[1], 1)])
    finally:
        ledger.close()
    (tmp_path / "away").rename(path / "shard-1")
    with ShardedLedger.open(path, shards=SHARDS, timeout_s=5) as ledger:  # recovery aborts t; m0 was done
        assert ledger.recovered_in_doubt == 1 and isinstance(ledger.outcome("t"), CrossShardAborted)
        assert ledger.get_transfer("m0") is not None
        [m0, m1] = ledger.transfer_many([TransferRequest("m0", left[0], left[1], 1),
                                         TransferRequest("m1", right[0], right[1], 1)])
        assert isinstance(m0, Transfer) and isinstance(m1, Transfer)
        assert books(ledger)[0] == [0, 0]


def test_opening_with_another_shard_count_raises_shard_count_mismatch(tmp_path: Path) -> None:
    ShardedLedger.open(tmp_path / "books", shards=2).close()
    with pytest.raises(ShardCountMismatch, match="shards=2") as raised:
        ShardedLedger.open(tmp_path / "books", shards=3)
    assert raised.value.code == "shard_count_mismatch"
    with ShardedLedger.open(tmp_path / "books", shards=2) as ledger:  # nothing was changed
        assert ledger.shards == 2


def test_a_directory_that_is_not_a_sharded_ledger_is_refused(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(InvalidRequest, match="not a sharded ledger"):
        ShardedLedger.open(tmp_path / "other", shards=2)
    with pytest.raises(InvalidRequest):
        ShardedLedger.open(tmp_path / "books", shards=0)


def test_a_missing_or_emptied_shard_is_refused_not_made_anew_and_a_foreign_manifest_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "books"
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 1, shard=0, balance=100)[0]
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        ledger.transfer("T", source=source, destination=destination, amount=40)
    kept = tmp_path / "kept"
    (path / "shard-1").rename(kept)
    with pytest.raises(NotALedger, match="shard 1"):
        ShardedLedger.open(path, shards=SHARDS)
    assert not (path / "shard-1").exists()  # not made anew
    (path / "shard-1").mkdir()
    with pytest.raises(NotALedger, match="shard 1"):
        ShardedLedger.open(path, shards=SHARDS)
    (path / "shard-1").rmdir()
    kept.rename(path / "shard-1")
    with ShardedLedger.open(path, shards=SHARDS) as ledger:  # restored: whole again
        assert ledger.balance(destination).posted == 40
    manifest = path / "tally-shards.json"
    for foreign in ({"format": 1, "shards": 2.0, "placement": "sha256-mod"}, [1, 2], "x"):
        manifest.write_text(json.dumps(foreign))
        with pytest.raises(InvalidRequest, match="tally-shards.json"):
            ShardedLedger.open(path, shards=SHARDS)
    (tmp_path / "file").write_text("x")
    with pytest.raises(InvalidRequest, match="not a directory"):
        ShardedLedger.open(tmp_path / "file", shards=SHARDS)


def test_an_open_that_crashed_before_writing_the_manifest_is_completed_but_a_used_shard_is_not_taken_over(
        tmp_path: Path) -> None:
    path = tmp_path / "books"
    Ledger.open(path / "shard-0").close()  # made, then the open died before the manifest
    (path / "tally-shards.json.tmp-1-ab").write_text("{")
    with ShardedLedger.open(path, shards=SHARDS) as ledger:
        assert ledger.shards == SHARDS
    assert json.loads((path / "tally-shards.json").read_text())["shards"] == SHARDS
    used = tmp_path / "used"
    with Ledger.open(used / "shard-0") as shard:
        shard.create_account("a", currency="USD")
    with pytest.raises(NotALedger, match="no manifest"):
        ShardedLedger.open(used, shards=SHARDS)
    assert not (used / "tally-shards.json").exists()


def test_a_second_open_of_one_directory_raises_ledger_locked_and_bad_options_are_invalid(
        sharded: ShardedLedger) -> None:
    with pytest.raises(LedgerLocked):
        ShardedLedger.open(sharded.path, shards=SHARDS)
    sharded.create_account("still", currency="USD")  # the first is untouched
    with pytest.raises(InvalidRequest, match="colour"):
        ShardedLedger.open(sharded.path.parent / "other", shards=SHARDS, colour="red")
    with pytest.raises(InvalidRequest, match="readonly"):
        ShardedLedger.open(sharded.path.parent / "other", shards=SHARDS, readonly=True)
    assert not (sharded.path.parent / "other").exists()  # refused before anything was written


def test_a_bad_timeout_or_node_list_is_invalid_request_and_nothing_is_written(tmp_path: Path) -> None:
    gone = "ab" * 28  # a node id in form, of no node here (a restarted node has a new id)
    for options in ({"timeout_s": "5"}, {"timeout_s": None}, {"nodes": ["zz"] * SHARDS}, {"nodes": [1] * SHARDS},
                    {"nodes": "zz"}, {"nodes": [gone] * SHARDS}, {"address": "127.0.0.1:1"}):
        with pytest.raises(InvalidRequest, match="timeout_s|node|cluster"):
            ShardedLedger.open(tmp_path / "books", shards=SHARDS, **options)  # type: ignore[arg-type]
        assert not (tmp_path / "books" / "tally-shards.json").exists()


def test_the_cluster_this_process_is_on_is_accepted_by_its_loopback_address(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray reports a cluster joined at 127.0.0.1 by the machine's own address: the same
    cluster named again, by loopback or by name, is this one."""
    import ray

    port = ray.get_runtime_context().gcs_address.rpartition(":")[2]
    for n, address in enumerate((f"127.0.0.1:{port}", f"localhost:{port}", "auto")):
        with ShardedLedger.open(tmp_path / f"books-{n}", shards=1, address=address) as ledger:
            ledger.create_account("a", currency="USD")
    joined = "192.0.2.2:6379"  # as Ray reports a head started on this machine and joined at 127.0.0.1:6379
    monkeypatch.setattr(ray_calls, "_this_machine", lambda host: host == "192.0.2.2")
    for same in ("127.0.0.1:6379", "localhost:6379", "[::1]:6379", joined, "auto", "ray://192.0.2.2:10001"):
        ray_calls._check_same_cluster(same, joined)
    for other in ("192.0.2.3:6379", "127.0.0.1:6380", "[::1]:1", "a..b:6379", "a\x00b:6379"):
        with pytest.raises(InvalidRequest, match="a process joins one cluster"):
            ray_calls._check_same_cluster(other, joined)
    with pytest.raises(InvalidRequest, match="a process joins one cluster"):  # a cluster on another machine
        ray_calls._check_same_cluster("127.0.0.1:6379", "198.51.100.7:6379")


def test_a_process_made_by_fork_from_one_on_ray_cannot_open_a_sharded_ledger_and_is_told_at_once(
        tmp_path: Path) -> None:
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 3
        try:
            try:
                ShardedLedger.open(tmp_path / "books", shards=1)
            except LedgerUnavailable as error:
                code = 0 if "fork" in str(error) else 2
        finally:
            os._exit(code)
    assert _exit_code_of_child(pid) == 0
    assert not (tmp_path / "books" / "tally-shards.json").exists()


def test_a_child_of_a_process_on_ray_that_never_asked_for_a_sharded_name_is_told_too(tmp_path: Path) -> None:
    """The fork hook is registered by `import engine` itself (`engine._fork`), not by the
    sharded ledger's modules, which a host using only `Ledger` never imports: its child,
    forked while the host was on Ray, is refused at once. (A stand-in `ray` module says it
    is on Ray: nothing else of it is reached.)"""
    code = """
import os, sys, types
ray = types.ModuleType("ray")
ray.is_initialized = lambda: True
sys.modules["ray"] = ray
from engine import Ledger, LedgerUnavailable
assert "engine._ray" not in sys.modules
pid = os.fork()
if pid == 0:
    code = 3
    try:
        from engine import ShardedLedger
        try:
            ShardedLedger.open(sys.argv[1], shards=1)
        except LedgerUnavailable as error:
            code = 0 if "fork" in str(error) else 2
    finally:
        os._exit(code)
_, status = os.waitpid(pid, 0)
sys.exit(os.waitstatus_to_exitcode(status))
"""
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "books")], capture_output=True, text=True,
                          timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert not (tmp_path / "books").exists()


def test_a_shard_whose_node_is_gone_is_ledger_unavailable_not_a_ray_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray.exceptions import ActorUnschedulableError

    def unschedulable(*_args: object, **_kwargs: object) -> None:
        raise ActorUnschedulableError("The node specified via NodeAffinitySchedulingStrategy doesn't exist any more")

    monkeypatch.setattr(ray, "get", unschedulable)
    with pytest.raises(LedgerUnavailable, match="cannot be placed"):
        ray_calls.gather([object()], 1.0, ray_calls.ray_session())


class _Raising:
    """A value whose truth, iteration and length raise: checked by its type, never asked."""

    def __bool__(self) -> bool:
        raise RuntimeError("bool raised")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("iter raised")

    def __len__(self) -> int:
        raise RuntimeError("len raised")


def test_a_bad_path_or_a_value_too_large_for_its_option_is_invalid_request_and_nothing_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # an empty path must not mean here
    for path in ("", b"books"):
        with pytest.raises(InvalidRequest, match="path"):
            ShardedLedger.open(path, shards=SHARDS)  # type: ignore[arg-type]
    for options in ({"in_doubt_after_s": 10**5000}, {"in_doubt_after_s": 1e300}, {"readonly": _Raising()},
                    {"nodes": _RaisingSequence()}):
        with pytest.raises(InvalidRequest, match="in_doubt_after_s|readonly|nodes"):
            ShardedLedger.open(tmp_path / "books", shards=SHARDS, **options)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


class _RaisingSequence(list[str]):
    """A list whose length and iteration raise."""

    def __len__(self) -> int:
        raise RuntimeError("len raised")

    def __iter__(self) -> Iterator[str]:
        raise RuntimeError("iter raised")


def test_an_argument_ray_cannot_send_or_a_sequence_that_cannot_be_read_is_invalid_request(
        sharded: ShardedLedger) -> None:
    sharded.create_account("a", currency="USD")
    sharded.create_account("bank", currency="USD", overdraft_limit=None, placement="a")  # on a's shard
    sharded.transfer("held", source="bank", destination="a", amount=1, pending=True)
    for read in (lambda: sharded.balance("a", at_lsn=threading.Lock()), lambda: sharded.entries("a", threading.Lock()),
                 lambda: sharded.post_pending("p-1", pending_id="held", amount=threading.Lock()),  # type: ignore[arg-type]
                 lambda: sharded.balance("a", at_timestamp=_Reloads(5)),
                 lambda: sharded.entries("a", limit=_Reloads(5)),
                 lambda: sharded.post_pending("p-1", pending_id="held", amount=_Reloads(5)),
                 lambda: sharded.post_pending("p-1", pending_id="held", metadata=_ItemsRaise(k=1)),
                 lambda: sharded.void_pending("p-1", pending_id="held", reference=_ItemsRaise(k=1))):  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest):  # checked here, as a ledger checks them: nothing reaches a shard
            read()
    with pytest.raises(InvalidRequest, match="transfer_many"):
        sharded.transfer_many(_RaisingSequence())
    with pytest.raises(InvalidRequest, match="placements"):
        sharded.create_accounts([Account("b", "USD", 0)], placements=_RaisingSequence())
    assert sorted(account.id for account in sharded.accounts()) == ["a", "bank"]
    assert sharded.get_transfer("held").status == "pending"  # type: ignore[union-attr]


class _Reloads(int):
    """An int that pickles, but whose unpickling (in a shard's process) raises."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_no_load, ())


def _no_load() -> None:
    raise RuntimeError("not loaded")


class _ItemsRaise(dict):  # type: ignore[type-arg]
    def items(self) -> Any:
        raise RuntimeError("items")


def _exit_code_of_child(pid: int, wait_s: float = 30.0) -> int:
    """The exit code of the child made by fork(); the test fails if it is still running
    after `wait_s` (it waited on Ray), and the child is killed."""
    import time

    deadline = time.monotonic() + wait_s
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the child made by fork() waited on Ray")
    return os.waitstatus_to_exitcode(done[1])


def test_a_child_made_by_fork_is_refused_at_once_and_its_close_leaves_the_parents_shards_alone(
        sharded: ShardedLedger) -> None:
    """Ray's connection does not survive a fork: the child's calls would wait out their timeout,
    and its close would hang in Ray. The child gets `LedgerClosed` at once, as from a `Ledger`,
    and its close does nothing."""
    sharded.create_account("bank", currency="USD", overdraft_limit=None)
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 3
        try:
            try:
                sharded.balance("bank")
            except LedgerClosed as error:
                code = 0 if "fork" in str(error) else 2
            sharded.close()
        finally:
            os._exit(code)
    assert _exit_code_of_child(pid) == 0
    assert sharded.balance("bank").posted == 0  # the parent's shards still answer
    sharded.create_account("alice", currency="USD")


def test_recover_in_doubt_older_than_any_timestamp_resolves_none(sharded: ShardedLedger) -> None:
    assert sharded.recover_in_doubt(10**5000) == 0
    assert sharded.recover_in_doubt(1e300) == 0


def test_an_account_lives_on_its_hash_shard_or_on_its_placement_keys_shard(sharded: ShardedLedger) -> None:
    for i in range(8):
        sharded.create_account(f"a{i}", currency="USD")
        assert sharded.shard_of(f"a{i}") == shard_of(f"a{i}", SHARDS)
        sharded.create_account(f"w{i}", currency="USD", placement="customer-7")
        assert sharded.shard_of(f"w{i}") == shard_of("customer-7", SHARDS)
    assert {a.id for a in sharded.accounts()} == {f"{p}{i}" for p in "aw" for i in range(8)}
    assert sharded.account("w3").currency == "USD"


def test_an_account_id_is_one_account_across_shards(sharded: ShardedLedger) -> None:
    key = next(k for k in (f"k{i}" for i in range(100)) if shard_of(k, SHARDS) != shard_of("acc", SHARDS))
    sharded.create_account("acc", currency="USD")
    assert sharded.create_account("acc", currency="USD") .id == "acc"  # idempotent
    with pytest.raises(AccountExists):
        sharded.create_account("acc", currency="USD", placement=key)
    with pytest.raises(AccountExists):
        sharded.create_account("acc", currency="EUR")


def test_one_id_placed_on_two_shards_in_one_create_accounts_is_made_once(sharded: ShardedLedger) -> None:
    keys = [next(k for k in (f"k{i}" for i in range(100)) if shard_of(k, SHARDS) == shard) for shard in range(SHARDS)]
    made, refused = sharded.create_accounts([Account("x", "USD", 0, 0, None)] * 2, placements=keys)
    assert isinstance(made, Account) and isinstance(refused, AccountExists)
    assert [a.id for a in sharded.accounts()] == ["x"] and sharded.shard_of("x") == shard_of(keys[0], SHARDS)


def test_create_accounts_answers_malformed_items_and_placements_as_outcomes_as_a_ledger_does(
        sharded: ShardedLedger) -> None:
    items: list[object] = [Account(5, "USD", 0, 0, None), Account(["a"], "USD", 0, 0, None), 5,  # type: ignore[arg-type]
                           Account("p1", "USD", 0, 0, None), Account("p2", "USD", 0, 0, None),
                           Account("ok", "USD", 0, 0, None)]
    outcomes = sharded.create_accounts(items, placements=[None, None, None, 7, "k\x1f", None])  # type: ignore[arg-type,list-item]
    assert [type(outcome) for outcome in outcomes] == [InvalidRequest] * 5 + [Account]
    for malformed in ("abc", None, 5):
        with pytest.raises(InvalidRequest, match="sequence"):
            sharded.create_accounts(malformed)  # type: ignore[arg-type]
    with pytest.raises(InvalidRequest, match="placements"):
        sharded.create_accounts([Account("q", "USD", 0, 0, None)], placements="k")  # type: ignore[arg-type]
    assert [a.id for a in sharded.accounts()] == ["ok"]


def test_ids_holding_the_reserved_separator_are_invalid_and_nothing_is_written(sharded: ShardedLedger) -> None:
    with pytest.raises(InvalidRequest, match="x1f"):
        sharded.create_account("a\x1fb", currency="USD")
    sharded.create_account("a", currency="USD", overdraft_limit=None)
    sharded.create_account("b", currency="USD")
    with pytest.raises(InvalidRequest):
        sharded.transfer("t\x1fcredit", source="a", destination="b", amount=1)
    with pytest.raises(InvalidRequest):
        sharded.transfer("t" * 125, source="a", destination="b", amount=1)  # no room for a step's suffix
    with pytest.raises(InvalidRequest):
        sharded.get_transfer("t\x1fpost")
    assert sharded.transfer_many([TransferRequest("ok", "a", "b", 1), TransferRequest("x\x1f", "a", "b", 1)])[1] \
        .code == "invalid_request"


def test_a_transfer_within_a_shard_and_its_retry_are_a_ledgers(sharded: ShardedLedger) -> None:
    bank, alice = accounts_on(sharded, "", 1, shard=0, balance=100)[0], "0-extra"
    sharded.create_account(alice, currency="USD", placement=next(
        k for k in (f"p{i}" for i in range(100)) if shard_of(k, SHARDS) == 0))
    made = sharded.transfer("t1", source=bank, destination=alice, amount=40, reference="r")
    assert (made.source, made.destination, made.amount, made.kind, made.status) == (bank, alice, 40, "single", "posted")
    assert sharded.transfer("t1", source=bank, destination=alice, amount=40, reference="r") == made
    assert sharded.get_transfer("t1") == made
    with pytest.raises(IdempotencyConflict):
        sharded.transfer("t1", source=bank, destination=alice, amount=41, reference="r")
    with pytest.raises(InsufficientFunds):
        sharded.transfer("t2", source=bank, destination=alice, amount=61)
    assert sharded.balance(alice).posted == 40 and sharded.entries(alice)[0].transfer_id == "t1"


def test_a_cross_shard_transfer_moves_the_money_and_a_retry_returns_the_same_transfer(sharded: ShardedLedger) -> None:
    source = accounts_on(sharded, "s", 1, shard=0, balance=100)[0]
    destination = accounts_on(sharded, "d", 1, shard=1)[0]
    made = sharded.transfer("x1", source=source, destination=destination, amount=30, code=7, metadata={"k": 1})
    assert (made.id, made.source, made.destination, made.amount, made.code, made.kind, made.status) == \
        ("x1", source, destination, 30, 7, "single", "posted")
    assert dict(made.metadata or {}) == {"k": 1}
    assert sharded.transfer("x1", source=source, destination=destination, amount=30, code=7,
                            metadata={"k": 1}) == made
    assert sharded.get_transfer("x1") == made and sharded.outcome("x1") == made
    assert sharded.balance(source).posted == 70 and sharded.balance(destination).posted == 30
    assert sharded.balance(source).pending == 0 and [e.amount for e in sharded.entries(destination)] == [30]
    for changed in ({"amount": 31}, {"code": 8}, {"metadata": {"k": 2}}, {"destination": source + "-other"}):
        fields = {"source": source, "destination": destination, "amount": 30, "code": 7, "metadata": {"k": 1}}
        with pytest.raises(IdempotencyConflict, match="x1"):
            sharded.transfer("x1", **{**fields, **changed})  # type: ignore[arg-type]
    assert sharded.balance(source).posted == 70 and sharded.balance(destination).posted == 30


def test_a_cross_shard_transfer_shows_its_users_metadata_and_none_of_its_prepares(sharded: ShardedLedger) -> None:
    """The prepare's metadata is the protocol's (the destination, a digest of the user's); the
    user sees the credit's, theirs, all 16 keys of it (the most)."""
    source = accounts_on(sharded, "s", 1, shard=0, balance=100)[0]
    destination = accounts_on(sharded, "d", 1, shard=1)[0]
    metadata: dict[str, str | int] = {f"k{i}": "v" * i if i % 2 else i for i in range(16)}
    made = sharded.transfer_many([TransferRequest("x16", source, destination, 5, metadata=metadata),
                                  TransferRequest("x0", source, destination, 5)])
    assert all(isinstance(transfer, Transfer) for transfer in made), made
    assert [None if t.metadata is None else dict(t.metadata) for t in made] == [metadata, None]  # type: ignore[union-attr]
    for transfer in made:
        assert sharded.get_transfer(transfer.id) == transfer and sharded.outcome(transfer.id) == transfer  # type: ignore[union-attr]
    prepare = sharded._router.call(0, "get_transfer", "x16")
    assert prepare.metadata == {DESTINATION_KEY: destination, METADATA_DIGEST_KEY: metadata_digest(metadata)}


def test_a_refused_credit_voids_the_prepare_and_its_retry_raises_the_same(sharded: ShardedLedger) -> None:
    source = accounts_on(sharded, "s", 1, shard=0, balance=100)[0]
    euros = accounts_on(sharded, "e", 1, shard=1, currency="EUR")[0]
    with pytest.raises(CurrencyMismatch, match="x2"):
        sharded.transfer("x2", source=source, destination=euros, amount=5)
    with pytest.raises(CurrencyMismatch):
        sharded.transfer("x2", source=source, destination=euros, amount=5)
    assert isinstance(sharded.outcome("x2"), CurrencyMismatch) and sharded.get_transfer("x2") is None
    nowhere = next(n for n in (f"n{i}" for i in range(100)) if shard_of(n, SHARDS) == 1)
    with pytest.raises(AccountNotFound):
        sharded.transfer("x3", source=source, destination=nowhere, amount=5)
    dollars = accounts_on(sharded, "u", 1, shard=1)[0]
    with pytest.raises(InsufficientFunds, match=dollars):
        sharded.transfer("x4", source=source, destination=dollars, amount=500)
    assert sharded.balance(source) == sharded.balance(source).__class__(100, 0, 100, 0)
    assert books(sharded)[2] == 0  # nothing left held
    for transfer_id, refused in (("x2", CurrencyMismatch), ("x3", AccountNotFound), ("x4", InsufficientFunds)):
        outcome = sharded.outcome(transfer_id)  # refused at the prepare (x2, x3: `prepare_row`), named as the user's
        assert type(outcome) is refused and transfer_id in str(outcome) and "x1f" not in str(outcome), outcome


def test_a_cross_shard_transfer_to_another_currency_or_no_account_is_refused_so_before_funds_and_holds_nothing(
        sharded: ShardedLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    """As a `Ledger` refuses it: `CurrencyMismatch` or `AccountNotFound` also when the source
    cannot cover the amount (not `InsufficientFunds`), journaled and final; and nothing is held
    for it, so a later transfer of the same source in the same batch goes through, as it would
    in a `Ledger`. A transfer refused so at its credit before (its router not knowing the
    destination's currency) still answers its retry with that refusal."""
    source, other = accounts_on(sharded, "s", 2, shard=0, balance=10)
    euros = accounts_on(sharded, "e", 1, shard=1, currency="EUR")[0]
    nowhere = next(n for n in (f"n{i}" for i in range(100)) if shard_of(n, SHARDS) == 1)
    with pytest.raises(CurrencyMismatch, match=euros):
        sharded.transfer("x1", source=source, destination=euros, amount=50)
    with pytest.raises(AccountNotFound, match=nowhere):
        sharded.transfer("x2", source=source, destination=nowhere, amount=50)
    outcomes = sharded.transfer_many([TransferRequest("x3", source, euros, 10),
                                      TransferRequest("x4", source, nowhere, 10),
                                      TransferRequest("x5", source, other, 10)])
    assert [type(outcome) for outcome in outcomes] == [CurrencyMismatch, AccountNotFound, Transfer]
    assert sharded.balance(source).posted == 0 and sharded.balance(other).posted == 20
    with pytest.raises(CurrencyMismatch):
        sharded.transfer("x1", source=source, destination=euros, amount=50)
    sharded.create_account(nowhere, currency="USD")
    with pytest.raises(AccountNotFound):  # journaled: final for the id, as in a Ledger
        sharded.transfer("x2", source=source, destination=nowhere, amount=50)
    with monkeypatch.context() as earlier:  # as a release before the router sent currencies: refused at the credit
        earlier.setattr(crossing_module, "prepare_row", lambda request, peer, currency=None: prepare_row(request, peer))
        sharded.transfer("f", source=other, destination=source, amount=5)
        with pytest.raises(CurrencyMismatch):
            sharded.transfer("x6", source=source, destination=euros, amount=5)
    assert sharded._router.call(0, "get_transfer", "x6").status == "voided"  # (held, then voided)
    with pytest.raises(CurrencyMismatch):
        sharded.transfer("x6", source=source, destination=euros, amount=5)
    with pytest.raises(IdempotencyConflict):
        sharded.transfer("x6", source=source, destination=euros, amount=4)
    for transfer_id, refused in (("x1", CurrencyMismatch), ("x2", AccountNotFound), ("x6", CurrencyMismatch)):
        outcome = sharded.outcome(transfer_id)
        assert type(outcome) is refused and transfer_id in str(outcome) and "x1f" not in str(outcome), outcome
        assert sharded.get_transfer(transfer_id) is None
    sums, pairs, in_flight, _ = books(sharded)
    assert sums == [0, 0] and set(pairs.values()) <= {0} and in_flight == 0
    assert sharded.balance(source) == Balance(5, 0, 5, 0)


def test_an_account_whose_create_timed_out_is_learned_with_its_currency_by_the_next_call_naming_it(
        sharded: ShardedLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    """`create_account` made the account on its shard, but the reply came too late
    (`LedgerTimeout`): the next call naming it learns where it lives and its currency, so a
    transfer to it in another currency is refused `CurrencyMismatch` at the prepare, before the
    funds are looked at and holding nothing, as for an account made through the router; not
    `InsufficientFunds` (final for the id) from a hold toward the source's currency, which would
    also refuse the source's next transfer in the batch."""
    source, other = accounts_on(sharded, "s", 2, shard=0, balance=10)
    key = next(f"key-{i}" for i in range(10_000) if shard_of(f"key-{i}", SHARDS) == 1)
    made = Router.on

    def late(router: Router, calls: Any) -> Any:
        made(router, calls)
        raise LedgerTimeout("a shard did not answer within 30 s: retry with the same ids")

    monkeypatch.setattr(Router, "on", late)
    with pytest.raises(LedgerTimeout):
        sharded.create_account("euros", currency="EUR", placement=key)
    monkeypatch.undo()
    with pytest.raises(CurrencyMismatch, match="euros"):
        sharded.transfer("x1", source=source, destination="euros", amount=50)
    outcomes = sharded.transfer_many([TransferRequest("x2", source, "euros", 10),
                                      TransferRequest("x3", source, other, 10)])
    assert [type(outcome) for outcome in outcomes] == [CurrencyMismatch, Transfer], outcomes
    assert sharded.balance(source).posted == 0 and sharded.balance(other).posted == 20 and books(sharded)[2] == 0
    assert sharded.create_account("euros", currency="EUR", placement=key).currency == "EUR"  # its retry: made


def test_money_that_crossed_shards_and_came_back_can_cross_again_as_in_a_ledger(sharded: ShardedLedger) -> None:
    """The clearing accounts net what came back (2**63-1 each way: both would overflow), so the
    pair of shards is not blocked; every shard and every pair of shards still sums to zero."""
    accounts_on(sharded, "s", 0, shard=0)
    bank, destination = "sbank-0", accounts_on(sharded, "d", 1, shard=1)[0]
    for trip in range(2):
        sharded.transfer(f"out-{trip}", source=bank, destination=destination, amount=2**63 - 1)
        sharded.transfer(f"back-{trip}", source=destination, destination=bank, amount=2**63 - 1)
        assert sharded.balance(bank).posted == 0 and sharded.balance(destination).posted == 0
    sharded.transfer("again", source=bank, destination=destination, amount=1)
    assert sharded.balance(destination).posted == 1
    sums, pairs, in_flight, _ = books(sharded)
    assert sums == [0, 0] and set(pairs.values()) == {0} and in_flight == 0
    clearing = {name: balance.posted for shard in (0, 1) for name, balance in sharded.shard_balances(shard).items()
                if name.startswith("\x1fclearing")}
    assert max(map(abs, clearing.values())) < 2**63 - 1, clearing  # netted


@pytest.mark.parametrize("made_on", ["its hash shard", "the destination's shard, by placement"])
def test_a_transfer_whose_source_no_shard_has_is_refused_unkept_and_its_retry_once_made_runs_once(
        sharded: ShardedLedger, made_on: str) -> None:
    """A transfer's id is kept on its source's shard, and an unknown source has none: the
    refusal is not journaled anywhere (kept on the hash shard, a retry once the account is made
    elsewhere would run there while `outcome` still said refused). So the retry, once the
    source exists wherever it was made, runs; once, and every read agrees. A chain none of
    whose accounts a shard has, the same."""
    destination = accounts_on(sharded, "d", 1, shard=1)[0]
    ghost = next(f"g{i}" for i in range(100) if shard_of(f"g{i}", SHARDS) == 0)
    for attempt in range(2):
        with pytest.raises(AccountNotFound, match=f"'T' \\(5 from '{ghost}' to '{destination}'\\).*not kept"):
            sharded.transfer("T", source=ghost, destination=destination, amount=5)
        [refused] = sharded.transfer_many([TransferRequest("T", ghost, destination, 5)])
        assert isinstance(refused, AccountNotFound), (attempt, refused)
    with pytest.raises(LinkedTransferFailed) as failed:
        sharded.transfer_linked([TransferRequest("L1", ghost, "nobody", 5)])
    assert failed.value.index == 0 and isinstance(failed.value.cause, AccountNotFound)
    assert sharded.outcome("T") is None and sharded.outcome("L1") is None and sharded.get_transfer("T") is None
    placement = {} if made_on == "its hash shard" else {"placement": next(
        f"key-{i}" for i in range(10_000) if shard_of(f"key-{i}", SHARDS) == 1)}
    sharded.create_account(ghost, currency="USD", overdraft_limit=None, **placement)
    assert sharded.shard_of(ghost) == (0 if not placement else 1)
    made = sharded.transfer("T", source=ghost, destination=destination, amount=5)
    assert sharded.transfer("T", source=ghost, destination=destination, amount=5) == made  # once
    with pytest.raises(IdempotencyConflict):
        sharded.transfer("T", source=ghost, destination=destination, amount=6)
    assert sharded.outcome("T") == made == sharded.get_transfer("T")
    assert sharded.balance(destination).posted == 5 and sharded.balance(ghost).posted == -5
    assert books(sharded)[0] == [0, 0]


def test_a_source_made_while_its_transfer_is_routed_is_unknown_to_that_try_and_found_by_the_next(
        sharded: ShardedLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    """Made by another caller (on another shard than its hash's) between the lookup of where
    accounts live and the routing: that try refuses it unkept, from the one reading it made,
    never on its hash shard (where the refusal would stand beside the retry's transfer)."""
    destination = accounts_on(sharded, "d", 1, shard=1)[0]
    ghost = next(f"g{i}" for i in range(100) if shard_of(f"g{i}", SHARDS) == 0)
    router = sharded._live()
    real = type(router).find

    def made_meanwhile(self: Any, account_ids: Any) -> Any:
        found = real(self, account_ids)
        if ghost in found and not made:
            made.append(ghost)  # first: making it looks it up too
            sharded.create_account(ghost, currency="USD", overdraft_limit=None,
                                   placement=next(f"key-{i}" for i in range(10_000) if shard_of(f"key-{i}", SHARDS) == 1))
        return found

    made: list[str] = []
    monkeypatch.setattr(type(router), "find", made_meanwhile)
    with pytest.raises(AccountNotFound, match="not kept"):
        sharded.transfer("T", source=ghost, destination=destination, amount=5)
    assert made and sharded.outcome("T") is None
    transfer = sharded.transfer("T", source=ghost, destination=destination, amount=5)
    assert sharded.outcome("T") == transfer and sharded.balance(destination).posted == 5


def test_transfer_many_mixes_local_and_cross_shard_requests_and_answers_in_request_order(
        sharded: ShardedLedger) -> None:
    left = accounts_on(sharded, "l", 3, shard=0, balance=10)
    right = accounts_on(sharded, "r", 3, shard=1, balance=10)
    requests = [TransferRequest(f"m{i}", (left + right)[i % 6], (right + left)[(i * 5) % 6], 1 + i % 3)
                for i in range(30)]
    requests.insert(7, TransferRequest("big", left[0], right[0], 1_000))
    outcomes = sharded.transfer_many(requests)
    assert [o.id if isinstance(o, Transfer) else o.code for o in outcomes] == [
        r.id if r.id != "big" else "insufficient_funds" for r in requests]
    shown = [o if isinstance(o, Transfer) else (type(o), str(o)) for o in outcomes]
    assert [o if isinstance(o, Transfer) else (type(o), str(o)) for o in sharded.transfer_many(requests)] == shown
    sums, pairs, in_flight, users = books(sharded)
    assert sums == [0, 0] and set(pairs.values()) == {0} and in_flight == 0 and users == 0
    assert sum(sharded.balance(name).posted for name in left + right) == 60


@pytest.mark.parametrize("first", ["local", "across"])
def test_an_exact_retry_of_a_transfer_to_no_account_is_refused_again_once_it_is_made_on_the_other_side(
        sharded: ShardedLedger, first: str) -> None:
    """A transfer to an account no shard has is refused `AccountNotFound` where its destination's
    id places it: on its source's shard (`local`), or as a first step toward the other shard's
    clearing account (`across`). Made then on the other shard (with `placement`), the exact
    retry goes the other way; as a `Ledger` does, it gets `AccountNotFound` again (it was an
    `IdempotencyConflict` naming a clearing account), and a retry that differs, the conflict."""
    def on(shard: int, prefix: str) -> str:
        return next(name for name in (f"{prefix}{i}" for i in range(1000)) if shard_of(name, SHARDS) == shard)

    source = on(0, "src")
    sharded.create_account(source, currency="USD", overdraft_limit=None)
    ghost = on(0 if first == "local" else 1, "ghost")
    with pytest.raises(AccountNotFound):
        sharded.transfer("t", source=source, destination=ghost, amount=5, metadata={"order": 7})
    sharded.create_account(ghost, currency="USD", placement=on(1 if first == "local" else 0, "place"))
    assert sharded.shard_of(ghost) != shard_of(ghost, SHARDS)

    with pytest.raises(AccountNotFound) as again:
        sharded.transfer("t", source=source, destination=ghost, amount=5, metadata={"order": 7})
    assert repr(ghost) in str(again.value) and "clearing" not in str(again.value)
    for differing in ({"amount": 6, "metadata": {"order": 7}}, {"amount": 5, "metadata": {"order": 8}},
                      {"amount": 5, "metadata": None}):
        with pytest.raises(IdempotencyConflict) as conflict:
            sharded.transfer("t", source=source, destination=ghost, **differing)  # type: ignore[arg-type]
        assert "clearing" not in str(conflict.value), conflict.value
    assert sharded.balance(ghost).posted == 0 and sharded.balance(source).pending == 0
    assert isinstance(sharded.outcome("t"), AccountNotFound)


def test_a_pending_transfer_runs_within_one_shard_and_is_refused_across_shards(sharded: ShardedLedger) -> None:
    left = accounts_on(sharded, "l", 2, shard=0, balance=50)
    right = accounts_on(sharded, "r", 1, shard=1)
    hold = sharded.transfer("h1", source=left[0], destination=left[1], amount=20, pending=True, timeout_s=3600)
    assert hold.status == "pending" and sharded.balance(left[0]).pending == 20
    assert sharded.post_pending("p1", pending_id="h1", amount=15).amount == 15
    assert sharded.get_transfer("h1").status == "posted"  # type: ignore[union-attr]
    with pytest.raises(CrossShardRefused) as refused:
        sharded.transfer("h2", source=left[0], destination=right[0], amount=5, pending=True)
    assert refused.value.code == "cross_shard_refused"
    with pytest.raises(PendingTransferNotFound):
        sharded.void_pending("v1", pending_id="nothing")
    sharded.transfer("x1", source=left[0], destination=right[0], amount=5)
    with pytest.raises(PendingTransferNotFound):  # a cross-shard transfer's prepare is not the user's
        sharded.void_pending("v2", pending_id="x1")
    assert sharded.balance(right[0]).posted == 5
    with pytest.raises(IdempotencyConflict):  # its id retried as a pending transfer: a Ledger's answer, not a refusal
        sharded.transfer("x1", source=left[0], destination=right[0], amount=5, pending=True, timeout_s=60)
    assert sharded.balance(right[0]).posted == 5 and sharded.balance(left[0]).pending == 0


def test_a_linked_chain_runs_within_one_shard_and_is_refused_across_shards(sharded: ShardedLedger) -> None:
    left = accounts_on(sharded, "l", 3, shard=0, balance=10)
    right = accounts_on(sharded, "r", 1, shard=1)
    legs = [TransferRequest("k1", left[0], left[1], 10), TransferRequest("k2", left[1], left[2], 10)]
    assert [t.id for t in sharded.transfer_linked(legs)] == ["k1", "k2"]
    with pytest.raises(LinkedTransferFailed) as failed:  # the error crosses the process boundary whole
        sharded.transfer_linked([TransferRequest("k3", left[2], left[0], 5),
                                 TransferRequest("k4", left[1], left[0], 50)])
    assert failed.value.index == 1 and isinstance(failed.value.cause, InsufficientFunds)
    with pytest.raises(CrossShardRefused, match="placement"):
        sharded.transfer_linked([TransferRequest("k5", left[2], right[0], 1)])
    assert sharded.outcome("k5") is None  # nothing written


def test_a_pending_transfer_or_a_linked_chain_naming_an_unknown_account_is_refused_as_a_ledger_refuses_it(
        sharded: ShardedLedger) -> None:
    """An account no shard has lives nowhere: naming it is `AccountNotFound` (in a chain,
    `LinkedTransferFailed`), journaled as a Ledger journals it, not `CrossShardRefused`."""
    left = accounts_on(sharded, "l", 2, shard=0, balance=10)
    ghost = next(f"g{i}" for i in range(100) if shard_of(f"g{i}", SHARDS) == 1)
    with pytest.raises(AccountNotFound):
        sharded.transfer("h1", source=left[0], destination=ghost, amount=5, pending=True)
    with pytest.raises(AccountNotFound):
        sharded.transfer("h2", source=ghost, destination=left[0], amount=5, pending=True)
    with pytest.raises(LinkedTransferFailed) as failed:
        sharded.transfer_linked([TransferRequest("k1", left[0], left[1], 5), TransferRequest("k2", left[1], ghost, 5)])
    assert failed.value.index == 1 and isinstance(failed.value.cause, AccountNotFound)
    assert [sharded.balance(name).available for name in left] == [10, 10]
    assert isinstance(sharded.outcome("h1"), AccountNotFound)
    sharded.create_account(ghost, currency="USD")  # now on shard 1: h1 would be a pending transfer across shards
    with pytest.raises(AccountNotFound):  # its exact retry: the refusal its id keeps, as a Ledger answers it
        sharded.transfer("h1", source=left[0], destination=ghost, amount=5, pending=True)
    with pytest.raises(IdempotencyConflict) as conflict:
        sharded.transfer("h1", source=left[0], destination=ghost, amount=6, pending=True)
    assert "(6 from" in str(conflict.value), conflict.value
    retried, fresh = sharded.transfer_many([  # in a batch: the decided one answered, the other refused
        TransferRequest("h1", left[0], ghost, 5, pending=True), TransferRequest("h9", left[0], ghost, 5, pending=True)])
    assert isinstance(retried, AccountNotFound) and isinstance(fresh, CrossShardRefused), (retried, fresh)
    assert [sharded.balance(name).available for name in left] == [10, 10] and sharded.balance(ghost).incoming == 0


def test_a_shard_out_of_range_is_invalid_request(sharded: ShardedLedger) -> None:
    for shard in (-1, SHARDS, True, "0", 0.0):
        with pytest.raises(InvalidRequest, match="shard"):
            sharded.shard_balances(shard)  # type: ignore[arg-type]
    assert sharded.shard_balances(SHARDS - 1) == {}


def test_the_state_hash_covers_every_shard_and_survives_a_reopen(tmp_path: Path) -> None:
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        source = accounts_on(ledger, "s", 2, shard=0, balance=10)
        destination = accounts_on(ledger, "d", 1, shard=1)[0]
        ledger.transfer("x", source=source[0], destination=destination, amount=3)
        before = ledger.state_hash()
    for closed in (lambda: ledger.balance(destination), ledger.pids, ledger.nodes, ledger.expire_pending):
        with pytest.raises(LedgerClosed):
            closed()
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS) as ledger:
        assert ledger.state_hash() == before and ledger.recovered_in_doubt == 0
        assert ledger.balance(destination).posted == 3
        ledger.transfer("y", source=source[1], destination=destination, amount=1)
        assert ledger.state_hash() != before


def _descendants(root: int) -> set[int]:
    """`root` and every process under it (the Ray this process started: its GCS, raylet and
    workers)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):  # gone meanwhile
                pass
    found = {root}
    while grown := {pid for pid, parent in parents.items() if parent in found} - found:
        found |= grown
    return found


def test_every_ray_listener_is_on_loopback(sharded: ShardedLedger) -> None:
    listing = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout
    ours = _descendants(os.getpid()) | set(sharded.pids())  # this Ray's processes (not another one on the machine)
    ray_lines = [line for line in listing.splitlines() if any(f"pid={pid}," in line for pid in ours)]
    assert any(re.search(r'"(raylet|gcs_server)"', line) for line in ray_lines), listing
    local = [line.split()[3] for line in ray_lines]
    assert all(address.startswith(("127.0.0.1:", "[::ffff:127.0.0.1]:")) for address in local), ray_lines


def test_transfer_many_makes_one_ray_call_per_shard_per_round(sharded: ShardedLedger,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    left = accounts_on(sharded, "l", 4, shard=0, balance=100)
    right = accounts_on(sharded, "r", 4, shard=1, balance=100)
    rounds: list[tuple[str, ...]] = []
    on = sharded._router.on

    def counted(calls: dict[int, tuple[str, object]]) -> dict[int, object]:
        rounds.append(tuple(calls[shard][0] for shard in sorted(calls)))
        return on(calls)  # type: ignore[arg-type]

    monkeypatch.setattr(sharded._router, "on", counted)
    pairs = [(left[i % 4], left[(i + 1) % 4]) if i % 3 == 0 else (left[i % 4], right[i % 4]) if i % 3 == 1
             else (right[i % 4], left[(i + 2) % 4]) for i in range(200)]
    requests = [TransferRequest(f"m{i}", source, destination, 1) for i, (source, destination) in enumerate(pairs)]
    assert all(isinstance(o, Transfer) for o in sharded.transfer_many(requests))
    assert rounds == [("batch", "batch"), ("credit", "credit"), ("resolve", "resolve")]


def test_a_credit_step_meeting_a_held_directory_leaves_the_transfer_in_flight_not_refused(
        sharded: ShardedLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prepare is durable when the credit's shard answers `LedgerLocked` (its directory
    still held by the process Ray replaced): the outcome is unknown, so `LedgerTimeout`, not an
    error that reads as if nothing had been done; the retry completes it."""
    source = accounts_on(sharded, "s", 1, shard=0, balance=100)[0]
    destination = accounts_on(sharded, "d", 1, shard=1)[0]
    on = sharded._router.on

    def held(calls: dict[int, tuple[str, object]]) -> dict[int, object]:
        if any(method == "credit" for method, _ in calls.values()):
            raise LedgerLocked("shard-1 is open in another live process")
        return on(calls)  # type: ignore[arg-type]

    monkeypatch.setattr(sharded._router, "on", held)
    with pytest.raises(LedgerTimeout, match="in flight"):
        sharded.transfer("T", source=source, destination=destination, amount=20)
    assert sharded.balance(source).pending == 20 and sharded.outcome("T") is None
    monkeypatch.undo()
    assert sharded.transfer("T", source=source, destination=destination, amount=20).status == "posted"
    assert sharded.balance(source).posted == 80 and sharded.balance(destination).posted == 20


def test_a_batch_over_two_shards_one_of_them_held_is_in_flight_not_refused(
        sharded: ShardedLedger, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other shard's part of the batch is durable when one shard answers `LedgerLocked`:
    `LedgerTimeout`, and the retry with the same ids gives every outcome, each applied once."""
    left = accounts_on(sharded, "l", 2, shard=0, balance=100)
    right = accounts_on(sharded, "r", 2, shard=1, balance=100)
    on = sharded._router.on

    def held(calls: dict[int, tuple[str, object]]) -> dict[int, object]:
        if 1 in calls and calls[1][0] == "batch":
            on({0: calls[0]})  # type: ignore[dict-item]  # shard 0 takes its part; shard 1's is held
            raise LedgerLocked("shard-1 is open in another live process")
        return on(calls)  # type: ignore[arg-type]

    requests = [TransferRequest("b0", left[0], left[1], 5), TransferRequest("b1", right[0], right[1], 5)]
    monkeypatch.setattr(sharded._router, "on", held)
    with pytest.raises(LedgerTimeout, match="partly done"):
        sharded.transfer_many(requests)
    monkeypatch.undo()
    assert all(isinstance(outcome, Transfer) for outcome in sharded.transfer_many(requests))
    assert [sharded.balance(name).posted for name in (*left, *right)] == [95, 105, 95, 105]


def test_every_ledger_error_pickles_whole() -> None:
    import pickle

    import engine

    classes = [getattr(engine, name) for name in engine.__all__ if isinstance(getattr(engine, name), type)
               and issubclass(getattr(engine, name), engine.LedgerError)]
    assert len(classes) >= 20
    for cls in classes:
        made = cls("what happened", 3, InsufficientFunds("no")) if cls is LinkedTransferFailed else \
            cls("what happened", 7, "page 4") if cls.__name__ == "JournalCorrupted" else cls("what happened")
        again = pickle.loads(pickle.dumps(made))
        assert (type(again), str(again), again.code, vars(again).keys()) == (cls, "what happened", cls.code,
                                                                             vars(made).keys())


def test_a_ledger_error_raised_in_an_actor_comes_back_as_itself() -> None:
    import ray

    from engine._ray import gather, ray_session

    @ray.remote
    def refuse() -> None:
        raise LinkedTransferFailed("chain refused", 2, InsufficientFunds("leg 2"))

    with pytest.raises(LinkedTransferFailed) as raised:
        gather([refuse.remote()], 30, ray_session())
    assert raised.value.index == 2 and isinstance(raised.value.cause, InsufficientFunds)


def test_one_transfer_id_from_two_source_shards_toward_a_third_makes_two_transfers_and_loses_nothing(
        tmp_path: Path) -> None:
    """A transfer id is claimed per source shard: reused from another shard toward the same
    destination shard, its credit must not meet the first one's (their ids name the source)."""
    with ShardedLedger.open(tmp_path / "books", shards=3) as ledger:
        sources = [accounts_on(ledger, f"s{shard}-", 1, shard=shard, balance=100)[0] for shard in (0, 1)]
        destinations = accounts_on(ledger, "d", 2, shard=2)
        first = ledger.transfer("T", source=sources[0], destination=destinations[0], amount=10)
        second = ledger.transfer("T", source=sources[1], destination=destinations[1], amount=30)
        assert (first.amount, second.amount) == (10, 30)
        assert ledger.recover_in_doubt() == 0
        assert [ledger.balance(name).posted for name in (*sources, *destinations)] == [90, 70, 10, 30]
        sums, pairs, in_flight, _ = books(ledger)
        assert sums == [0, 0, 0] and set(pairs.values()) == {0} and in_flight == 0


def test_two_sharded_ledgers_in_one_process_share_its_ray_until_the_last_closes(tmp_path: Path) -> None:
    """In a process of its own: the module's Ray here is the host's, which no ledger shuts down."""
    script = f"""
import ray
from engine import ShardedLedger
first = ShardedLedger.open({str(tmp_path / 'a')!r}, shards=2)
second = ShardedLedger.open({str(tmp_path / 'b')!r}, shards=2)
second.create_account("x", currency="USD")
first.close()
assert [account.id for account in second.accounts()] == ["x"]
assert ray.is_initialized()
second.close()
assert not ray.is_initialized()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=110)
    assert done.stdout.strip().endswith("ok"), done.stderr[-2000:]


def test_a_users_post_or_void_never_resolves_a_cross_shard_transfers_prepare(sharded: ShardedLedger) -> None:
    """The router refuses a post or a void of a prepare it sees; the shard refuses one that
    landed after the router looked (a user's post or void of that id raced the transfer), so
    the protocol's hold of a transfer whose credit may have landed is never the user's to end."""
    source = accounts_on(sharded, "s", 1, shard=0, balance=100)[0]
    target = accounts_on(sharded, "t", 1, shard=1)[0]
    router = sharded._live()
    prepare = pack([prepare_row(TransferRequest("T-1", source, target, 7), 1)])
    # as a caller that died after it leaves it:
    [replied] = ray_calls.gather([router.actors[0].batch.remote(prepare)], 60, router.session)
    assert isinstance(outcomes_of(unpack(replied))[0], Transfer)
    for name in ("void_pending", "post_pending"):
        with pytest.raises(PendingTransferNotFound, match="across shards"):
            router.call(0, name, f"X-{name}", pending_id="T-1")  # where the router sends an id it did not find
        with pytest.raises(PendingTransferNotFound, match="across shards"):
            getattr(sharded, name)(f"Y-{name}", pending_id="T-1")
    assert sharded.recover_in_doubt() == 1  # its credit never came: voided
    assert (sharded.balance(source).posted, sharded.balance(target).posted) == (100, 0)
    sums, pairs, in_flight, _ = books(sharded)
    assert sums == [0] * SHARDS and set(pairs.values()) <= {0} and in_flight == 0


def test_a_post_of_a_pending_transfer_no_shard_holds_is_refused_without_taking_its_id(
        sharded: ShardedLedger) -> None:
    """Not decided on any shard: decided on one, a retry once the pending transfer is made could
    be decided again on the pending transfer's shard while the first try's refusal was not yet
    durable (the first timed out), and both would stand."""
    payer, payee = accounts_on(sharded, "p", 2, shard=1, balance=50)
    post_id = next(f"X{i}" for i in range(10_000) if shard_of(f"X{i}", SHARDS) == 0)
    before = [sharded.shard_balances(shard) for shard in range(SHARDS)]
    with pytest.raises(PendingTransferNotFound, match="not kept"):
        sharded.post_pending(post_id, pending_id="P")
    assert sharded.outcome(post_id) is None  # nothing journaled, anywhere
    assert [sharded.shard_balances(shard) for shard in range(SHARDS)] == before
    sharded.transfer("P", source=payer, destination=payee, amount=9, pending=True)  # on shard 1
    posted = sharded.post_pending(post_id, pending_id="P")
    assert (posted.kind, posted.amount, sharded.get_transfer("P").status) == ("post", 9, "posted")  # type: ignore[union-attr]
    assert sharded.post_pending(post_id, pending_id="P") == posted  # its retry: the same, from shard 1
    assert sharded.balance(payee).posted == 59


def _unknown(_: str) -> None:
    """A ledger's `outcome` for an id it has no outcome for yet."""
    return None


def test_a_shard_keeps_a_users_post_or_void_apart_from_a_prepare_of_its_id_and_no_other() -> None:
    in_flight = InFlight()
    with in_flight.preparing(["T-1", "T-2"], _unknown, 1.0) as busy:  # a batch deciding two prepares
        assert busy == set()
        with pytest.raises(LedgerTimeout, match="T-1"), in_flight.resolving("T-1", "V-1", _unknown, 0.05):
            pass
        with in_flight.resolving("P-9", "V-9", _unknown, 1.0):  # another id: at once
            pass
    with in_flight.resolving("T-1", "V-1", _unknown, 1.0):  # once that batch ended
        with in_flight.preparing(["T-1", "T-3"], _unknown, 0.05) as busy:  # a batch meanwhile leaves T-1 out
            assert busy == {"T-1"}
    ended = threading.Event()

    def post() -> None:
        with in_flight.resolving("T-5", "V-5", _unknown, 10.0):
            ended.set()

    with in_flight.preparing(["T-5"], _unknown, 1.0):
        worker = threading.Thread(target=post)
        worker.start()
        assert not ended.wait(0.05)  # (a wait that must not end: a short one)
    assert ended.wait(10.0)
    worker.join(10.0)


def test_a_ledger_call_that_timed_out_keeps_its_ids_in_flight_until_the_ledger_has_its_outcome() -> None:
    """`LedgerTimeout` from the ledger: the call may be decided yet. A post of a prepare's id
    waits for the prepare's outcome, also a post that was waiting when the batch timed out; a
    prepare of a post's pending id waits for the post's outcome."""
    in_flight = InFlight()
    known: set[str] = set()

    def outcome(transfer_id: str) -> object:
        return "its outcome" if transfer_id in known else None

    told: list[BaseException] = []
    started = threading.Event()

    def post() -> None:
        started.set()
        try:
            with in_flight.resolving("T-4", "V-4", outcome, 10.0):
                pass
        except LedgerTimeout as error:
            told.append(error)

    with pytest.raises(LedgerTimeout), in_flight.preparing(["T-4"], outcome, 1.0):
        worker = threading.Thread(target=post)  # waits for the batch, then sees it raised
        worker.start()
        assert started.wait(10.0)
        raise LedgerTimeout("not durable yet")
    worker.join(10.0)
    assert len(told) == 1 and "may still be decided" in str(told[0])
    known.add("T-4")  # the ledger has the prepare's outcome now
    with in_flight.resolving("T-4", "V-4", outcome, 1.0):
        pass
    with pytest.raises(LedgerTimeout), in_flight.resolving("T-6", "V-6", outcome, 1.0):  # a post that timed out
        raise LedgerTimeout("not durable yet")
    with in_flight.preparing(["T-6", "T-7"], outcome, 1.0) as busy:
        assert busy == {"T-6"}  # its pending id's prepare waits for the post's outcome
    known.add("V-6")
    with in_flight.preparing(["T-6"], outcome, 1.0) as busy:
        assert busy == set()


def test_a_post_whose_id_is_a_cross_shard_transfers_is_a_conflict_named_as_the_users(
        sharded: ShardedLedger) -> None:
    source = accounts_on(sharded, "c", 1, shard=0, balance=10)[0]
    target = accounts_on(sharded, "d", 1, shard=1)[0]
    sharded.transfer("T-9", source=source, destination=target, amount=3)
    with pytest.raises(IdempotencyConflict) as raised:
        sharded.post_pending("T-9", pending_id="P")
    assert "\x1f" not in str(raised.value) and "across shards" in str(raised.value)


def test_a_pending_id_held_on_two_shards_cannot_be_posted_so_no_post_is_decided_on_two(
        sharded: ShardedLedger) -> None:
    """Ids are kept per source shard: a pending id reused on two shards names two transfers.
    A try sent to the first (its answer late) and a retry to the other would post both."""
    payer_0, payee_0 = accounts_on(sharded, "x", 2, shard=0, balance=100)
    payer_1, payee_1 = accounts_on(sharded, "y", 2, shard=1, balance=100)
    sharded.transfer("P", source=payer_1, destination=payee_1, amount=10, pending=True)
    assert sharded._pending_shard("X", "P", "post") == 1  # where a first try of X goes now
    sharded.transfer("P", source=payer_0, destination=payee_0, amount=10, pending=True)  # P reused on shard 0
    for resolve in (sharded.post_pending, sharded.void_pending):
        with pytest.raises(InvalidRequest, match=r"shards \[0, 1\]"):
            resolve("X", pending_id="P")
    assert sharded.outcome("X") is None
    assert (sharded.balance(payee_0).posted, sharded.balance(payee_1).posted) == (100, 100)


@pytest.mark.parametrize("refusal", [LedgerTimeout, LedgerLocked, LedgerUnavailable])
def test_a_shard_whose_open_failed_for_a_while_opens_again_at_its_next_call(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, refusal: type[LedgerError]) -> None:
    """Ray restarts a shard's process only if it dies: an open that timed out (a slow disk),
    or found the directory held by another process for a moment as Ray restarted this one,
    is tried again by the next call, not kept as the shard's failure for good."""
    path = str(tmp_path / "shard-0")
    made = Shard(path, 0, {})
    assert made.create() is None
    made.close()
    real, opens = Ledger.open, []

    def slow_once(*args: Any, **kwargs: Any) -> Ledger:
        opens.append(args)
        if len(opens) == 1:
            raise refusal("LSN 7 not durable within 0.5 s, or the directory held elsewhere")
        return real(*args, **kwargs)

    monkeypatch.setattr(Ledger, "open", slow_once)
    shard = Shard(path, 0, {})
    try:
        assert isinstance(shard.failure(), refusal)
        assert shard.call("stats", (), {})[0] is True
        assert shard.failure() is None and len(opens) == 2
    finally:
        shard.close()


def _shard_that_will_expire_at_open(path: str, now: list[int]) -> dict[str, Any]:
    """A shard's ledger holding a pending transfer due by the next open (which journals its
    expiry); the options to open it with."""
    options = {"clock_ns": lambda: now[0], "timeout_s": 2.0}
    made = Shard(path, 0, options)
    assert made.create() is None
    made.ledger.create_account("bank", currency="USD", overdraft_limit=None)
    made.ledger.create_account("a", currency="USD")
    made.ledger.transfer("p", source="bank", destination="a", amount=5, pending=True, timeout_s=1)
    made.close()
    now[0] += 10 * 10**9
    return options


def _tally_threads() -> int:
    return sum(thread.name.startswith("tally-") for thread in threading.enumerate())


def test_a_shard_whose_disk_is_full_opens_again_at_most_so_often_and_leaves_no_thread(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each open journals the expiries due, which a full disk fails: the first call after the
    restart opens again, calls that wait for an open take its outcome, a later open is tried
    `REOPEN_AFTER_S` after the last failed, and a failed open leaves none of its threads behind."""
    from journal._writer import Writer

    now = [1_700_000_000 * 10**9]
    path = str(tmp_path / "shard-0")
    options = _shard_that_will_expire_at_open(path, now)
    monkeypatch.setattr(Writer, "_stage", lambda self, *args: (_ for _ in ()).throw(OSError(28, "No space left")))
    real, opens = Ledger.open, []

    def counted(*args: Any, **kwargs: Any) -> Ledger:
        opens.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(Ledger, "open", counted)
    threads = _tally_threads()
    shard = Shard(path, 0, options)
    assert isinstance(shard.failure(), LedgerUnavailable) and len(opens) == 1
    callers = [threading.Thread(target=shard.call, args=("balance", ("a",), {})) for _ in range(8)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join(30)
    assert len(opens) == 2  # the first call after the restart opens again; the others take its outcome
    assert shard.call("balance", ("a",), {})[0] is False and len(opens) == 2  # within REOPEN_AFTER_S of it
    shard._tried_at -= shard_module.REOPEN_AFTER_S
    assert shard.call("balance", ("a",), {})[0] is False and len(opens) == 3
    assert _tally_threads() == threads  # the two failed opens' dispatchers, directory and claims: stopped
    shard.close()


def test_a_shard_whose_directory_went_is_never_made_anew_by_a_later_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the open that makes the sharded ledger makes a shard's ledger: one whose directory
    is gone when its open is tried again is `NotALedger`, not a new, empty ledger."""
    path = str(tmp_path / "shard-0")
    made = Shard(path, 0, {})
    assert made.create() is None
    made.ledger.create_account("a", currency="USD")
    made.close()
    holder = Ledger.open(path)  # another process's, as Ray restarted this one
    shard = Shard(path, 0, {})
    assert isinstance(shard.failure(), LedgerLocked)
    holder.close()
    shutil.rmtree(path)
    with pytest.raises(NotALedger, match="missing or empty"):
        shard.find(["a"])
    assert not os.path.exists(path)
    shard.close()


class _AskedLock:
    """A lock that tells when a thread other than its first asks for it (`asked`)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.asked = threading.Event()
        self.first: threading.Thread | None = None

    def __enter__(self) -> bool:
        if self.first is None:
            self.first = threading.current_thread()
        elif threading.current_thread() is not self.first:
            self.asked.set()
        return self.lock.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.lock.release()


def test_a_call_that_comes_while_a_shard_opens_again_takes_that_opens_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Refused once (its directory held as Ray restarted it), the shard opens again at the
    next call; another call meanwhile waits for that open, and is answered by the ledger."""
    path = str(tmp_path / "shard-0")
    made = Shard(path, 0, {})
    assert made.create() is None
    made.ledger.create_account("a", currency="USD")
    made.close()
    real, opening, release = Ledger.open, threading.Event(), threading.Event()

    def held_once(*args: Any, **kwargs: Any) -> Ledger:
        if not opening.is_set():
            opening.set()
            raise LedgerLocked(f"{path} is open in another live process")
        assert release.wait(30)  # the open under way (recovering)
        return real(*args, **kwargs)

    monkeypatch.setattr(Ledger, "open", held_once)
    shard = Shard(path, 0, {})
    shard._opening = _AskedLock()  # type: ignore[assignment]
    answers: list[tuple[bool, Any]] = []
    first = threading.Thread(target=lambda: answers.append(shard.call("balance", ("a",), {})))
    first.start()
    second = threading.Thread(target=lambda: answers.append(shard.call("balance", ("a",), {})))
    second.start()
    shard._opening.asked.wait(10)  # type: ignore[attr-defined]  # (bounded: a call that does not wait never asks)
    release.set()
    first.join(30)
    second.join(30)
    try:
        assert [ok for ok, _ in answers] == [True, True], answers
    finally:
        shard.close()


def test_a_shard_that_cannot_say_whether_an_account_is_there_raises_rather_than_say_no(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A shard whose ledger is held elsewhere must not answer "not here": the router would
    then place a new account with that id on another shard."""
    path = str(tmp_path / "shard-0")
    made = Shard(path, 0, {})
    assert made.create() is None
    made.ledger.create_account("a", currency="USD")
    made.close()

    def held(*args: Any, **kwargs: Any) -> Ledger:
        raise LedgerLocked(f"{path} is open in another live process")

    monkeypatch.setattr(Ledger, "open", held)
    shard = Shard(path, 0, {})
    with pytest.raises(LedgerLocked):
        shard.find(["a"])


def test_expire_pending_expires_on_every_shard_with_a_clock_of_ones_own(tmp_path: Path) -> None:
    """With `clock_ns`, no shard expires by itself (as a ledger): `expire_pending` does, on each."""
    offset = tmp_path / "offset"
    offset.write_text("0")
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS, clock_ns=ClockOffsetBy(offset)) as ledger:
        payers = [accounts_on(ledger, f"s{shard}", 2, shard=shard, balance=100) for shard in range(SHARDS)]
        for shard, (payer, payee) in enumerate(payers):
            ledger.transfer(f"P{shard}", source=payer, destination=payee, amount=60, pending=True, timeout_s=1)
        offset.write_text("3600")
        assert ledger.expire_pending() == SHARDS
        for shard, (payer, _) in enumerate(payers):
            assert ledger.get_transfer(f"P{shard}").status == "expired"  # type: ignore[union-attr]
            assert ledger.balance(payer) == Balance(100, 0, 100, 0)
        assert ledger.expire_pending() == 0


def test_an_address_that_is_no_address_is_invalid_request(tmp_path: Path) -> None:
    for address in (5, "", b"127.0.0.1:6379"):
        with pytest.raises(InvalidRequest, match="address"):
            ShardedLedger.open(tmp_path / "books", shards=SHARDS, address=address)  # type: ignore[arg-type]
    assert not (tmp_path / "books").exists()


def test_a_shard_that_does_not_close_in_time_is_stopped_and_the_close_says_so_then_an_open_recovers_it(
        tmp_path: Path) -> None:
    """A shard's process stopped (SIGSTOP) at the close: the close waits `timeout_s`, stops
    the actors all the same and raises `LedgerTimeout` naming the close, not a transfer to
    retry; the next open recovers that shard's ledger, every acknowledged transfer in it."""
    ledger = ShardedLedger.open(tmp_path / "books", shards=SHARDS, timeout_s=3)
    left = accounts_on(ledger, "l", 1, shard=0, balance=10)[0]
    right = accounts_on(ledger, "r", 1, shard=1)[0]
    ledger.transfer("x", source=left, destination=right, amount=4)
    stopped = ledger.pids()[1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        with pytest.raises(LedgerTimeout, match="closing within 3 s") as timed_out:
            ledger.close()
        assert "retry" not in str(timed_out.value) and ledger.closed
        with pytest.raises(LedgerClosed):
            ledger.balance(left)
    finally:
        try:
            os.kill(stopped, signal.SIGCONT)
        except ProcessLookupError:  # (stopped with its actor)
            pass
    with ShardedLedger.open(tmp_path / "books", shards=SHARDS, timeout_s=10) as reopened:
        assert (reopened.balance(left).posted, reopened.balance(right).posted) == (6, 4)
        assert reopened.get_transfer("x").amount == 4  # type: ignore[union-attr]
