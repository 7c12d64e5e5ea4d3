"""Closing a `ShardedLedger` that started Ray while calls are under way in other threads
(engine._sharded, engine._ray): each such call fails typed, and none starts Ray again; and a
ledger whose Ray the host shut down, or replaced with another: its calls fail typed, and its
close touches no other Ray. No module-wide Ray here: each test's ledger starts its own, so its
close shuts Ray down.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from engine import LedgerClosed, ShardedLedger, TransferRequest
from engine._crossing import Router
from tests.sharded_support import accounts_on

pytestmark = pytest.mark.timeout(120)


def _held(monkeypatch: pytest.MonkeyPatch, name: str) -> tuple[threading.Event, threading.Event]:
    """Router method `name` made to wait, once it is called, until released."""
    entered, release = threading.Event(), threading.Event()
    method = getattr(Router, name)

    def waiting(router: Router, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        release.wait(60)
        return method(router, *args, **kwargs)

    monkeypatch.setattr(Router, name, waiting)
    return entered, release


def _in_thread(call: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as error:  # whatever it raises is what the test looks at
            outcome.append(error)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _closing_under(ledger: ShardedLedger, call: Callable[[], object], entered: threading.Event,
                   release: threading.Event) -> None:
    """`call` run in a thread until it waits (`entered`), the ledger closed meanwhile (Ray shut
    down with it), then `release`d: it ends `LedgerClosed`, and no Ray runs after."""
    import ray

    thread, outcome = _in_thread(call)
    assert entered.wait(60)
    ledger.close()
    assert not ray.is_initialized()
    release.set()
    thread.join(60)
    assert not thread.is_alive()
    assert not ray.is_initialized(), "a call under way at the close started Ray again"
    assert isinstance(outcome[0], LedgerClosed), outcome


@pytest.mark.parametrize("held", ["call", "_cross"])
def test_a_call_under_way_when_the_ledger_that_started_ray_closes_is_ledger_closed_and_starts_no_ray(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, held: str) -> None:
    """A read between finding its shard and asking it, or a cross-shard transfer between its
    prepare and its credit, still under way when the close shut Ray down: Ray's next
    `.remote()` would start a new local Ray (its default `ray.init()`, seconds, left running)
    and fail with a bare `Exception`; it is `LedgerClosed`, and no Ray runs after."""
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    ledger = ShardedLedger.open(tmp_path / "books", shards=2)
    try:
        assert ledger._started_ray
        [left] = accounts_on(ledger, "l", 1, shard=0, balance=10)
        [right] = accounts_on(ledger, "r", 1, shard=1)
        entered, release = _held(monkeypatch, held)
        call: Callable[[], object] = (lambda: ledger.balance(left)) if held == "call" else (
            lambda: ledger.transfer_many([TransferRequest("T", left, right, 5)]))
        _closing_under(ledger, call, entered, release)
    finally:
        monkeypatch.undo()
        ledger.close()
        if ray.is_initialized():
            ray.shutdown()
    if held == "call":
        return  # (a read: nothing left in doubt)
    reopened = ShardedLedger.open(tmp_path / "books", shards=2)  # what the transfer left in doubt: resolved
    try:
        assert reopened.balance(left).available == 10 and reopened.get_transfer("T") is None
    finally:
        reopened.close()


def test_two_closes_at_once_leave_ray_once_so_another_ledger_on_it_goes_on(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two threads closing one ledger at once (an exit handler and the host's own close): the
    second returns without leaving Ray again, so Ray, which another ledger of this process
    shares, stays up until that one closes."""
    import ray

    assert not ray.is_initialized(), "another test left Ray running"
    first = ShardedLedger.open(tmp_path / "first", shards=2)
    second = ShardedLedger.open(tmp_path / "second", shards=2)
    try:
        assert first._started_ray and second._started_ray  # (the second joined the first's Ray)
        second.create_account("alice", currency="USD")
        looked = ShardedLedger.closed.fget
        both = threading.Barrier(2, timeout=5)

        def closed(ledger: ShardedLedger) -> bool:  # both closes look before either marks it closed
            value: bool = looked(ledger)  # type: ignore[misc]
            if ledger is first and not value:
                try:
                    both.wait()
                except threading.BrokenBarrierError:  # (the other close waits until this one has marked it)
                    pass
            return value

        monkeypatch.setattr(ShardedLedger, "closed", property(closed))
        closes = [_in_thread(first.close) for _ in range(2)]
        for thread, _ in closes:
            thread.join(60)
        assert [outcome for _, outcome in closes] == [[None], [None]]
        monkeypatch.undo()
        assert ray.is_initialized() and second.account("alice").id == "alice"
        second.close()
        assert not ray.is_initialized()
    finally:
        monkeypatch.undo()
        first.close()
        second.close()
        if ray.is_initialized():
            ray.shutdown()


def test_a_ledger_on_its_hosts_ray_is_closed_to_calls_once_the_host_shut_ray_down_or_started_another_and_closes_quietly(
        tmp_path: Path) -> None:
    """The host's own Ray (one this module did not start) shut down by the host: the shards'
    processes went with it, so a call is `LedgerClosed`, and the close has nothing left to
    stop and starts no Ray to stop them. Once the host has started a new Ray, a call would
    reach that one, where the shards are no actors (Ray's bare `Exception`, or a wait for
    nothing): it is `LedgerClosed` too, and the close stops nothing there (a ledger opened on it
    meanwhile, the host's, keeps its shards) and leaves the new Ray up."""
    import ray

    from engine import _ray

    assert not ray.is_initialized(), "another test left Ray running"
    _ray._start(None)  # the host's own Ray, on loopback
    try:
        ledger = ShardedLedger.open(tmp_path / "books", shards=2)
        other = ShardedLedger.open(tmp_path / "other", shards=2)
        assert not ledger._started_ray and not other._started_ray
        [left] = accounts_on(other, "l", 1, shard=0, balance=10)
        [right] = accounts_on(other, "r", 1, shard=1)
        ray.shutdown()
        with pytest.raises(LedgerClosed):
            ledger.accounts()
        ledger.close()
        assert ledger.closed and not ray.is_initialized()
        _ray._start(None)  # the host's new Ray: none of the shards' actors are there
        third = ShardedLedger.open(tmp_path / "third", shards=2)
        assert not third._started_ray  # (the host's)
        third.create_account("alice", currency="USD")
        calls: list[Callable[[], object]] = [
            lambda: other.balance(left), other.accounts, lambda: other.shard_balances(0), other.pids,
            lambda: other.transfer_many([TransferRequest("T", left, right, 5)]),
            lambda: other.create_account("new", currency="USD"), other.recover_in_doubt]
        for call in calls:
            with pytest.raises(LedgerClosed, match="Ray"):
                call()
        assert other.shard_of(left) == 0  # (from the router's map: no shard asked)
        other.close()
        assert other.closed and ray.is_initialized()
        assert [account.id for account in third.accounts()] == ["alice"]  # its shards untouched by the close
        third.close()
        assert ray.is_initialized()  # the host's
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _stand_in_ray(monkeypatch: pytest.MonkeyPatch, starts: list[str]) -> tuple[list[str | None], list[str | None]]:
    """Ray's calls that `join` and `leave` make, stood in for (no Ray is started): each Ray is
    named by its session, `starts` those `join` starts in turn. Returns (on, shut): on[0] the
    session this process is on now (None: none; set it to play the host), and the sessions
    shut down, in order."""
    import ray

    from engine import _ray

    on: list[str | None] = [None]
    shut: list[str | None] = []
    started = iter(starts)
    monkeypatch.setattr(_ray, "_start", lambda address: on.__setitem__(0, next(started)))
    monkeypatch.setattr(_ray, "ray_session", lambda: on[0])
    monkeypatch.setattr(ray, "is_initialized", lambda: on[0] is not None)

    def shutdown() -> None:
        shut.append(on[0])
        on[0] = None

    monkeypatch.setattr(ray, "shutdown", shutdown)
    monkeypatch.setattr(ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="127.0.0.1:6379"))
    monkeypatch.setattr(_ray, "_users", 0)
    monkeypatch.setattr(_ray, "_started_session", None)
    return on, shut


def test_a_ray_the_host_started_after_shutting_down_the_one_a_ledger_started_is_the_hosts_and_left_up(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`join` started Ray for two ledgers, and the host shut it down behind them and started its
    own: a ledger opened then is on the host's Ray (not started: its close leaves nothing), and
    the closes of the two leave the host's Ray up; a Ray this module starts after is counted
    anew, and its last ledger's close shuts it down. No Ray is started here: Ray's calls are
    stood in for, each Ray named by its session."""
    from engine import _ray

    on, shut = _stand_in_ray(monkeypatch, ["A", "C"])
    assert _ray.join(None) == (True, "A") and _ray.join(None) == (True, "A")
    on[0] = "B"  # the host shut A down and started its own
    assert _ray.join(None) == (False, "B")
    _ray.leave("A", 1.0)
    _ray.leave("A", 1.0)
    assert shut == [] and on[0] == "B"
    on[0] = None  # the host shut its own down
    assert _ray.join(None) == (True, "C") and _ray.join(None) == (True, "C")
    _ray.leave("C", 1.0)
    assert shut == [] and on[0] == "C"
    _ray.leave("C", 1.0)
    assert shut == ["C"] and on[0] is None


def test_the_last_ledger_on_a_ray_it_started_closes_without_shutting_down_the_ray_the_host_started_in_its_place(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`join` started Ray A for a ledger, and the host shut A down and started its own (B)
    with no ledger opened since: that ledger's close (`leave`) ends A's count and shuts nothing
    down, B least of all; a ledger opened then is on the host's Ray, and one opened after the
    host shut B down too is counted on the Ray this module starts for it. Stand-ins, as above."""
    from engine import _ray

    on, shut = _stand_in_ray(monkeypatch, ["A", "C"])
    assert _ray.join(None) == (True, "A")
    on[0] = "B"  # the host shut A down and started its own
    _ray.leave("A", 1.0)
    assert shut == [] and on[0] == "B"
    assert _ray.join(None) == (False, "B")
    on[0] = None  # the host shut its own down
    assert _ray.join(None) == (True, "C")
    _ray.leave("C", 1.0)
    assert shut == ["C"] and on[0] is None


def test_the_sweeper_of_a_ledger_whose_ray_is_gone_stops_at_once_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    """The host shut the ledger's Ray down (or replaced it): a sweep's first round is
    `LedgerClosed` (`engine._ray.sent`), and no shard of that Ray comes back, so the sweeper
    stops there, saying so once, instead of warning every sweep until the ledger is closed.
    The sweep is run on a stand-in for the ledger (no Ray)."""
    stopping, tries = threading.Event(), list[float]()

    def recover(older_than_s: float) -> int:
        tries.append(older_than_s)
        raise LedgerClosed("the Ray this sharded ledger's shards ran on was shut down")

    ledger = SimpleNamespace(_stopping=stopping, in_doubt_after_s=0.04, _router=SimpleNamespace(recover=recover),
                             path=Path("books"), swept_in_doubt=0)
    sweeper = threading.Thread(target=ShardedLedger._sweep, args=(ledger,), daemon=True)
    with caplog.at_level(logging.WARNING, logger="tally.sharded"):
        sweeper.start()
        sweeper.join(2)  # some two hundred sweeps' time
        sweeping = sweeper.is_alive()
        stopping.set()  # (as a close does)
        sweeper.join(30)
    assert not sweeping and len(tries) == 1, tries
    assert [record.getMessage() for record in caplog.records] == [
        "the in-doubt sweeper of the sharded ledger at books stops: the Ray this sharded ledger's shards ran on was "
        "shut down"]


def test_a_call_whose_round_was_sent_before_the_close_and_waited_on_after_is_ledger_closed_and_starts_no_ray(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A read whose `.remote()` went out before the close but whose wait for the reply begins
    after the close shut Ray down: `ray.get` auto-connects as `.remote()` does, so it would start
    a new local Ray (its default `ray.init()`, left running); it is `LedgerClosed`, and no Ray
    runs after."""
    import ray

    from engine import _crossing

    assert not ray.is_initialized(), "another test left Ray running"
    ledger = ShardedLedger.open(tmp_path / "books", shards=2)
    try:
        [left] = accounts_on(ledger, "l", 1, shard=0, balance=10)
        entered, release = threading.Event(), threading.Event()
        gather = _crossing.gather

        def waiting(refs: Any, timeout_s: float, session: str) -> Any:
            entered.set()
            release.wait(60)
            return gather(refs, timeout_s, session)

        monkeypatch.setattr(_crossing, "gather", waiting)
        _closing_under(ledger, lambda: ledger.balance(left), entered, release)
    finally:
        monkeypatch.undo()
        ledger.close()
        if ray.is_initialized():
            ray.shutdown()


def test_a_call_waits_a_bounded_time_for_ray_held_by_another_ledgers_start_or_stop() -> None:
    """`_STARTED` (held while another sharded ledger of the process starts or shuts Ray down,
    or submits a round) is waited for at most the call's timeout: then `LedgerTimeout`,
    nothing sent. No Ray is started here."""
    from engine import LedgerTimeout, _ray

    submitted: list[int] = []
    with _ray._holding(1.0):  # another ledger starting Ray, say
        outcome: list[object] = []
        waiter = threading.Thread(target=lambda: outcome.append(_catching(
            lambda: _ray.sent(lambda: submitted.append(1), lambda: False, "a session", 0.2))))
        waiter.start()
        waiter.join(30)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], LedgerTimeout), outcome
    assert submitted == []
    with pytest.raises(LedgerTimeout):  # and a stop of a shard likewise
        with _ray._holding(1.0):
            stopper: list[object] = []
            thread = threading.Thread(target=lambda: stopper.append(_catching(
                lambda: _ray.stop_shard(None, "a session", 0.2))))
            thread.start()
            thread.join(30)
            raise stopper[0]  # type: ignore[misc]


def _catching(call: Callable[[], object]) -> object:
    try:
        return call()
    except Exception as error:  # the outcome asserted by the caller
        return error
