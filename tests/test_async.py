"""`AsyncLedger`: the Ledger's methods as coroutines on one event loop, woken by the writer."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import selectors
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from engine import (
    Account,
    AccountExists,
    AsyncLedger,
    Balance,
    Event,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidRequest,
    Ledger,
    LedgerClosed,
    LedgerTimeout,
    LedgerUnavailable,
    LinkedTransferFailed,
    PendingTransferAlreadyPosted,
    ReadOnlyLedger,
    TransferRequest,
)
import engine._loop_turns
from engine._async import ASYNC_WORKER_THREADS
from journal import Completion
from journal._limits import READ_CHUNK_RECORDS

T = TypeVar("T")

WAIT_S = 30.0
"""Longest a test waits for a thread's event."""

COROUTINES = ("transfer", "transfer_many", "transfer_linked", "post_pending", "void_pending", "create_account",
              "create_accounts", "account", "balance", "entries", "get_transfer", "outcome", "transfers",
              "accounts", "state_hash", "head", "stats", "expire_pending", "close")


def run(path: Path, body: Callable[[AsyncLedger], Awaitable[T]], **options: object) -> T:
    """Open an AsyncLedger at `path` on a fresh loop, run `body` with it, close it."""

    async def main() -> T:
        async with AsyncLedger.open(path, **options) as ledger:
            return await body(ledger)

    return asyncio.run(main())


async def funded(ledger: AsyncLedger, accounts: int = 4, amount: int = 1_000) -> list[str]:
    await ledger.create_account("bank", currency="USD", overdraft_limit=None)
    names = [f"a{n}" for n in range(accounts)]
    for name in names:
        await ledger.create_account(name, currency="USD")
        await ledger.transfer(f"fund-{name}", source="bank", destination=name, amount=amount)
    return names


def at_its_bound(ledger: AsyncLedger, monkeypatch: pytest.MonkeyPatch, timeout_s: float | None = None) -> None:
    """The ledger at its bound of transfers in flight: no flush gets a permit (until undone);
    with `timeout_s`, its waits for a transfer's outcome bounded by that from now on (until
    undone). A short bound is set here, after the ledger is funded, not when it is opened:
    there it bounded the funding's writes too, whose fsync a loaded machine can make longer."""
    monkeypatch.setattr(ledger._ledger._coordinator.admission, "try_admit", lambda permits: False)
    if timeout_s is not None:
        monkeypatch.setattr(ledger, "timeout_s", timeout_s)


async def until(condition: Callable[[], object], what: str) -> None:
    """Turns of the loop until `condition()` holds; fails, saying `what` never came, after `WAIT_S`."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"never {what}"
        await asyncio.sleep(0)


async def queued(ledger: AsyncLedger, transfer_id: str, source: str, destination: str) -> asyncio.Task[object]:
    """A task transferring 10 from `source` to `destination`, once its request waits in the outbox."""
    task: asyncio.Task[object] = asyncio.create_task(
        ledger.transfer(transfer_id, source=source, destination=destination, amount=10))
    await until(lambda: ledger._outbox, "queued in the outbox")
    return task


def test_every_ledger_method_named_by_the_issue_is_a_coroutine_with_the_same_signature() -> None:
    for name in COROUTINES:
        mine, theirs = getattr(AsyncLedger, name), getattr(Ledger, name)
        assert inspect.iscoroutinefunction(mine), name
        assert inspect.signature(mine).parameters.keys() == inspect.signature(theirs).parameters.keys(), name
        for parameter in inspect.signature(theirs).parameters.values():
            assert inspect.signature(mine).parameters[parameter.name].default == parameter.default, (name, parameter)
    assert not inspect.iscoroutinefunction(AsyncLedger.events)  # an async iterator, not a coroutine
    assert inspect.signature(AsyncLedger.events).parameters["follow"].default is True


def test_transfers_posts_voids_and_linked_chains_give_what_the_ledger_gives(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1, a2, _ = await funded(ledger)
        moved = await ledger.transfer("t1", source=a0, destination=a1, amount=100, code=7, reference="req-1")
        assert (moved.amount, moved.code, moved.reference, moved.status) == (100, 7, "req-1", "posted")
        assert await ledger.transfer("t1", source=a0, destination=a1, amount=100, code=7, reference="req-1") == moved
        with pytest.raises(IdempotencyConflict):
            await ledger.transfer("t1", source=a0, destination=a1, amount=101, code=7, reference="req-1")
        with pytest.raises(InsufficientFunds):
            await ledger.transfer("t2", source=a0, destination=a1, amount=10_000)
        with pytest.raises(InsufficientFunds):  # a retry of a refusal is refused again
            await ledger.transfer("t2", source=a0, destination=a1, amount=10_000)
        pending = await ledger.transfer("p1", source=a1, destination=a2, amount=300, pending=True)
        assert pending.status == "pending"
        assert await ledger.balance(a1) == Balance(1_100, 300, 800, 0)
        posted = await ledger.post_pending("p1-post", pending_id="p1", amount=200)
        assert (posted.kind, posted.amount) == ("post", 200)
        with pytest.raises(PendingTransferAlreadyPosted):
            await ledger.void_pending("p1-void", pending_id="p1")
        await ledger.transfer("p2", source=a2, destination=a0, amount=50, pending=True)
        voided = await ledger.void_pending("p2-void", pending_id="p2")
        assert (voided.kind, voided.amount) == ("void", 50)
        chain = await ledger.transfer_linked([TransferRequest("l1", "bank", a2, 5), TransferRequest("l2", a2, a0, 5)])
        assert [t.id for t in chain] == ["l1", "l2"] and chain[0].lsn == chain[1].lsn
        assert await ledger.transfer_linked([TransferRequest("l1", "bank", a2, 5),
                                             TransferRequest("l2", a2, a0, 5)]) == chain
        with pytest.raises(LinkedTransferFailed) as failed:
            await ledger.transfer_linked([TransferRequest("l3", "bank", a2, 5), TransferRequest("l4", a2, a0, 10**9)])
        assert failed.value.index == 1 and isinstance(failed.value.cause, InsufficientFunds)
        assert await ledger.outcome("t1") == moved
        assert isinstance(await ledger.outcome("t2"), InsufficientFunds)
        assert isinstance(await ledger.outcome("l4"), LinkedTransferFailed)
        assert await ledger.outcome("never") is None
        assert await ledger.get_transfer("p1") is not None and (await ledger.get_transfer("p1")).status == "posted"
        many = await ledger.transfer_many([TransferRequest("m1", a0, a1, 1), TransferRequest("m2", a1, a0, 10**9)])
        assert many[0].id == "m1" and isinstance(many[1], InsufficientFunds)
        assert [t.id for t in await ledger.transfers(account=a2, kind="pending")] == ["p1", "p2"]
        assert [e.seq for e in await ledger.entries(a0, after=0, limit=2)] == [1, 2]
        return None

    run(tmp_path / "l", body)
    with Ledger.open(tmp_path / "l") as ledger:  # what the coroutines made is what the ledger reads
        assert ledger.get_transfer("t1").reference == "req-1"
        assert ledger.balance("a1") == Balance(901, 0, 901, 0)


def test_accounts_are_created_read_and_refused_as_the_ledger_does(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        made = await ledger.create_account("x", currency="EUR", overdraft_limit=5, code=3, metadata={"k": "v"})
        assert await ledger.create_account("x", currency="EUR", overdraft_limit=5, code=3, metadata={"k": "v"}) == made
        with pytest.raises(AccountExists):
            await ledger.create_account("x", currency="USD")
        with pytest.raises(InvalidRequest):
            await ledger.create_account("", currency="USD")
        outcomes = await ledger.create_accounts([Account("y", "EUR", 0, 0, None), Account("x", "USD", 0, 0, None)])
        assert outcomes[0] == Account("y", "EUR", 0, 0, None) and isinstance(outcomes[1], AccountExists)
        assert await ledger.account("x") == made
        assert [a.id for a in await ledger.accounts()] == ["x", "y"]
        assert (await ledger.head()).lsn == (await ledger.stats())["durable_lsn"]

    run(tmp_path / "l", body)


def test_a_thousand_concurrent_transfers_conserve_money_and_replay_to_the_same_state(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> tuple[str, int]:
        names = await funded(ledger, accounts=20, amount=500)

        async def client(n: int) -> int:
            moved = 0
            for k in range(5):
                source, destination = names[(n + k) % 20], names[(n * 7 + k + 1) % 20]
                if source == destination:
                    continue
                try:
                    await ledger.transfer(f"c{n}-{k}", source=source, destination=destination, amount=1 + n % 97)
                    moved += 1
                except InsufficientFunds:
                    pass
            return moved

        moved = sum(await asyncio.gather(*(client(n) for n in range(1_000))))
        balances = [await ledger.balance(name) for name in names]
        assert sum(b.posted for b in balances) == 20 * 500
        assert all(b.posted >= 0 for b in balances)
        return await ledger.state_hash(), moved

    digest, moved = run(tmp_path / "l", body)
    assert moved > 1_000
    with Ledger.open(tmp_path / "l") as ledger:
        assert ledger.state_hash() == digest


def test_writes_are_woken_by_the_writer_not_by_a_thread_per_call(tmp_path: Path) -> None:
    """No worker thread runs a write, and the threads alive stay the ledger's own."""

    async def body(ledger: AsyncLedger) -> None:
        names = await funded(ledger)

        def refuse(*_: object) -> None:
            raise AssertionError("a write ran on a worker thread")

        ledger._workers.submit = refuse  # type: ignore[method-assign]
        before = threading.active_count()
        await asyncio.gather(*(ledger.transfer(f"w{n}", source=names[n % 4], destination=names[(n + 1) % 4],
                                               amount=1) for n in range(500)))
        assert threading.active_count() <= before + 1  # (the writer may be between two of its own)

    run(tmp_path / "l", body)


def test_a_transfer_cancelled_before_its_first_step_submits_nothing_and_a_retry_runs_afresh(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1, _, _ = await funded(ledger)
        task = asyncio.create_task(ledger.transfer("c0", source=a0, destination=a1, amount=10))
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await ledger.outcome("c0") is None and not ledger._outbox
        assert (await ledger.transfer("c0", source=a0, destination=a1, amount=10)).amount == 10
        assert (await ledger.balance(a0)).posted == 990

    run(tmp_path / "l", body)


def test_a_transfer_cancelled_while_it_waits_to_be_submitted_completes_and_a_retry_returns_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1, _, _ = await funded(ledger)
        at_its_bound(ledger, monkeypatch)
        task = await queued(ledger, "c1", a0, a1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert list(ledger._outbox)[0].request.id == "c1"  # still queued: it will be submitted
        monkeypatch.undo()
        again = await ledger.transfer("c1", source=a0, destination=a1, amount=10)  # waits on the same ticket
        assert await ledger.outcome("c1") == again
        assert (await ledger.balance(a0)).posted == 990  # moved once

    run(tmp_path / "l", body)


def test_a_transfer_that_times_out_before_it_is_submitted_writes_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1, _, _ = await funded(ledger)
        at_its_bound(ledger, monkeypatch, timeout_s=0.3)
        with pytest.raises(LedgerTimeout, match="nothing was written"):
            await ledger.transfer("c3", source=a0, destination=a1, amount=10)
        monkeypatch.undo()
        assert await ledger.outcome("c3") is None and not ledger._ledger._coordinator.claims.in_flight()
        assert (await ledger.transfer("c3", source=a0, destination=a1, amount=10)).amount == 10

    run(tmp_path / "l", body)


def test_a_transfer_cancelled_after_it_is_submitted_completes_and_a_retry_returns_its_outcome(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1, _, _ = await funded(ledger)
        task = asyncio.create_task(ledger.transfer("c2", source=a0, destination=a1, amount=10))
        await until(lambda: ledger._outbox, "claimed and queued")
        await until(lambda: not ledger._outbox, "handed to the coordinator")  # its record is queued
        if task.cancel():  # (not if it was durable already: the fsync takes far longer than a loop turn)
            with pytest.raises(asyncio.CancelledError):
                await task
        again = await ledger.transfer("c2", source=a0, destination=a1, amount=10)
        assert await ledger.outcome("c2") == again
        assert (await ledger.balance(a0)).posted == 990  # moved once
        assert not ledger._ledger._coordinator.claims.in_flight()  # every claim released

    run(tmp_path / "l", body)


def test_events_follow_new_records_resume_from_an_lsn_and_end_when_the_ledger_closes(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1 = await funded(ledger, accounts=2)
        seen: list[Event] = []
        first_transfer = asyncio.Event()

        async def follow() -> None:
            async for event in ledger.events(0):
                seen.append(event)
                if event.kind == "transfer" and event.transfers[0].id == "e2":
                    first_transfer.set()

        follower = asyncio.create_task(follow())
        await ledger.transfer("e1", source=a0, destination=a1, amount=1)
        await ledger.transfer("e2", source=a0, destination=a1, amount=1)
        await asyncio.wait_for(first_transfer.wait(), 10)
        lsns = [event.lsn for event in seen]
        assert lsns == sorted(lsns) and len(set(lsns)) == len(lsns)
        resumed = [event async for event in ledger.events(seen[-2].lsn, follow=False)]
        assert [event.lsn for event in resumed] == [seen[-1].lsn]
        quiet = [event async for event in ledger.events(seen[-1].lsn, timeout_s=0.05)]
        assert quiet == []
        with pytest.raises(InvalidRequest):
            ledger.events(-1)
        await ledger.close()
        await asyncio.wait_for(follower, 0.5)  # the follower ends as the ledger closes, not a poll later

    run(tmp_path / "l", body)


def test_a_closed_or_foreign_loop_call_is_refused(tmp_path: Path) -> None:
    async def opened() -> AsyncLedger:
        return await AsyncLedger.open(tmp_path / "l")

    ledger = asyncio.run(opened())
    try:
        with pytest.raises(InvalidRequest, match="event loop"):
            asyncio.run(ledger.create_account("x", currency="USD"))
    finally:
        ledger._ledger.close()

    async def closed(ledger: AsyncLedger) -> None:
        await ledger.close()
        await ledger.close()  # idempotent
        assert ledger.closed
        with pytest.raises(LedgerClosed):
            await ledger.transfer("t", source="a", destination="b", amount=1)
        with pytest.raises(LedgerClosed):
            await ledger.balance("a")

    run(tmp_path / "l", closed)


async def _opened_with_one_account(path: Path) -> AsyncLedger:
    """An `AsyncLedger` at `path` (`timeout_s` 5) with "bank" and "a0" (`funded`)."""
    ledger = await AsyncLedger.open(path, timeout_s=5)
    await funded(ledger, accounts=1)
    return ledger


def test_a_close_from_a_foreign_loop_is_refused_while_its_own_loop_lives_and_prompt_once_it_is_gone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A close on another loop would wait its `timeout_s` for a wake-up only the ledger's own
    loop can deliver (and touch that loop's state from another thread): refused while that
    loop is open. Once it is closed, nothing can wake there: the close must not wait for it."""
    with asyncio.Runner() as own:
        ledger = own.run(_opened_with_one_account(tmp_path / "l"))

        async def submit(id: str) -> None:  # its first step (the claim) runs, then the loop stops
            asyncio.ensure_future(ledger.transfer(id, source="bank", destination="a0", amount=1))
            await asyncio.sleep(0)

        own.run(submit("t"))
        assert ledger._unsettled  # its wake-up is due on `own`, which is not running
        with pytest.raises(InvalidRequest, match="event loop"):
            asyncio.run(asyncio.wait_for(ledger.close(), 1))  # (not the 5 s it would wait)
        assert not ledger.closed
        own.run(ledger.transfer("t2", source="bank", destination="a0", amount=1))  # t's wake-up runs too
        at_its_bound(ledger, monkeypatch)
        own.run(submit("t3"))  # never submitted: left unsettled as `own` cancels it and closes
    assert ledger._unsettled
    asyncio.run(asyncio.wait_for(ledger.close(), 1))
    assert ledger.closed
    with Ledger.open(tmp_path / "l") as reopened:
        assert reopened.balance("a0").posted == 1_002  # t, t2; nothing of t3
        assert reopened.outcome("t3") is None


def test_a_close_its_loop_ended_before_it_closed_the_ledger_is_finished_by_a_close_on_another_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's loop ends (`asyncio.run` returns, cancelling what runs) while its close
    waits for a write to settle: that close never reached `Ledger.close`. A close on a new
    loop closes the ledger; it raised the old close's `CancelledError` at once, the ledger
    left open and its directory locked for the life of the process."""
    with asyncio.Runner() as own:
        ledger = own.run(_opened_with_one_account(tmp_path / "l"))
        at_its_bound(ledger, monkeypatch)  # the write stays in the outbox, unsettled

        async def closing_behind_a_write() -> None:  # the loop ends while close waits for the write
            asyncio.ensure_future(ledger.transfer("t", source="bank", destination="a0", amount=1))
            asyncio.ensure_future(ledger.close())
            await until(lambda: ledger._settled is not None, "settling")

        own.run(closing_behind_a_write())
    assert ledger._closing is not None and ledger._closing.cancelled()
    assert not ledger.closed
    asyncio.run(asyncio.wait_for(ledger.close(), 10))
    assert ledger.closed
    with Ledger.open(tmp_path / "l") as reopened:
        assert reopened.balance("a0").posted == 1_000
        assert reopened.outcome("t") is None


def test_a_close_whose_second_loop_ended_during_it_is_finished_by_a_close_on_a_third_loop(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's loop is closed; a close on a second loop has begun `Ledger.close` when that
    loop ends too (its caller gave up waiting; `asyncio.run` returning cancels the close and
    waits for its thread). A close on a third loop returns, the ledger closed: it raised
    the second close's `CancelledError` at once, into a caller nobody cancelled (only a close
    begun on the ledger's own loop was begun again)."""
    own = asyncio.new_event_loop()
    ledger = own.run_until_complete(AsyncLedger.open(tmp_path / "l", timeout_s=5))
    own.close()
    entered, cancelled = threading.Event(), threading.Event()
    real_close, real_shutdown = ledger._ledger.close, ledger._decider.shutdown

    def held_close() -> None:  # `Ledger.close`, on its thread, until the second loop's close is cancelled
        entered.set()
        assert cancelled.wait(10)
        real_close()

    def noted_shutdown(wait: bool = True) -> None:  # the close's `finally`: it was cancelled
        cancelled.set()
        real_shutdown(wait=wait)

    monkeypatch.setattr(ledger._ledger, "close", held_close)
    monkeypatch.setattr(ledger._decider, "shutdown", noted_shutdown)

    async def on_a_second_loop() -> None:
        asyncio.ensure_future(ledger.close())  # its caller gave up waiting
        await asyncio.to_thread(entered.wait, 10)

    asyncio.run(on_a_second_loop())  # its end cancels the close, and waits for `Ledger.close`
    assert ledger._closing is not None and ledger._closing.cancelled()
    asyncio.run(asyncio.wait_for(ledger.close(), 10))
    assert ledger.closed
    with Ledger.open(tmp_path / "l"):
        pass


def test_a_close_on_a_third_loop_while_a_second_loops_close_runs_waits_for_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's loop is closed; a close on a second loop (on a thread of its own) is closing
    the ledger when a close on a third loop comes: it awaited the second loop's task, and
    raised asyncio's bare `RuntimeError` (a future attached to a different loop). Now it waits
    for that close, as any second close does, and returns once the ledger is closed."""
    own = asyncio.new_event_loop()
    ledger = own.run_until_complete(AsyncLedger.open(tmp_path / "l", timeout_s=5))
    own.close()
    shutting, third_waits = threading.Event(), threading.Event()
    real_shut_down = ledger._ledger._shut_down

    class WatchedShut(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:  # a second close's wait for the first
            third_waits.set()
            return super().wait(timeout)

    def held_shut_down() -> None:  # the second loop's close, until the third close waits for it
        shutting.set()
        assert third_waits.wait(WAIT_S)
        real_shut_down()

    monkeypatch.setattr(ledger._ledger, "_shut", WatchedShut())
    monkeypatch.setattr(ledger._ledger, "_shut_down", held_shut_down)
    outcome: list[BaseException | None] = []

    def on_a_second_loop() -> None:
        try:
            asyncio.run(asyncio.wait_for(ledger.close(), WAIT_S))
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    second = threading.Thread(target=on_a_second_loop)
    second.start()
    try:
        assert shutting.wait(WAIT_S)
        asyncio.run(asyncio.wait_for(ledger.close(), WAIT_S))
        assert ledger.closed
    finally:
        third_waits.set()
        second.join(WAIT_S)
    assert outcome == [None]
    with Ledger.open(tmp_path / "l"):
        pass


def test_a_close_on_a_third_loop_lets_go_of_what_a_second_loops_close_that_never_reached_the_ledger_held(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ledger's loop is closed, a transfer left in its outbox; a close on a second loop has
    not reached `Ledger.close` when a close on a third loop closes the ledger, and then the
    second loop ends, its close cancelled before it got anywhere. The ledger was closed, but
    what that close lets go of once it has was never let go of: the decider and the workers
    stayed up, and the transfer stayed in the outbox, its id claimed. Now the third close lets
    go of them too (it waits for nothing more)."""
    with asyncio.Runner() as own:
        ledger = own.run(_opened_with_one_account(tmp_path / "l"))
        at_its_bound(ledger, monkeypatch)

        async def submit() -> None:  # its first step (the claim) runs, then the loop ends
            asyncio.ensure_future(ledger.transfer("t", source="bank", destination="a0", amount=1))
            await asyncio.sleep(0)

        own.run(submit())
    assert list(ledger._outbox) and not ledger.closed
    real_close, entered = ledger._close, asyncio.Event()

    async def close_held_before_the_ledger() -> None:  # the second loop's close task: its loop ends first
        entered.set()
        await asyncio.Event().wait()
        await real_close()

    monkeypatch.setattr(ledger, "_close", close_held_before_the_ledger)

    async def begin_a_close() -> None:
        asyncio.ensure_future(ledger.close())  # its caller gave up waiting
        await asyncio.wait_for(entered.wait(), WAIT_S)

    with asyncio.Runner() as second:
        second.run(begin_a_close())
        asyncio.run(asyncio.wait_for(ledger.close(), WAIT_S))  # on a third loop, while the second lives
        assert ledger.closed
    assert ledger._closing is not None and ledger._closing.cancelled()  # the second loop's end
    assert not ledger._outbox
    for threads in (ledger._decider, ledger._workers):
        with pytest.raises(RuntimeError, match="shutdown"):
            threads.submit(int)
    with Ledger.open(tmp_path / "l") as reopened:
        assert reopened.balance("a0").posted == 1_000 and reopened.outcome("t") is None


def test_an_open_cancelled_while_the_ledger_opens_leaves_it_closed_not_locked(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`asyncio.wait_for(AsyncLedger.open(p), 5)` on a ledger slow to recover: the open goes on
    on its thread; the ledger it opens must be closed, not left holding the directory."""
    Ledger.open(tmp_path / "l").close()
    opening, go_on, closed = threading.Event(), threading.Event(), threading.Event()
    real_open, real_close = Ledger.open, Ledger.close

    def slow_open(path: Path, **options: object) -> Ledger:
        opening.set()
        assert go_on.wait(WAIT_S)
        return real_open(path, **options)  # type: ignore[arg-type]

    def noted_close(self: Ledger) -> None:
        real_close(self)
        closed.set()

    async def main() -> None:
        monkeypatch.setattr(Ledger, "open", staticmethod(slow_open))
        monkeypatch.setattr(Ledger, "close", noted_close)
        task = asyncio.ensure_future(AsyncLedger.open(tmp_path / "l"))
        assert await asyncio.to_thread(opening.wait, WAIT_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(Ledger, "open", real_open)
        go_on.set()
        assert await asyncio.to_thread(closed.wait, WAIT_S)  # the ledger opened for nobody is closed
        async with AsyncLedger.open(tmp_path / "l") as ledger:  # not LedgerLocked
            assert await ledger.accounts() == []

    asyncio.run(main())


def test_a_read_only_async_ledger_reads_and_refuses_writes(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)

    async def body(ledger: AsyncLedger) -> None:
        assert [a.id for a in await ledger.accounts()] == ["bank"]
        assert [e.kind async for e in ledger.events(0, follow=False)] == ["account"]
        for write in (ledger.transfer("t", source="bank", destination="bank", amount=1),
                      ledger.create_account("x", currency="USD"), ledger.void_pending("v", pending_id="p")):
            with pytest.raises(ReadOnlyLedger):
                await write

    run(tmp_path / "l", body, readonly=True)


def test_a_read_only_async_ledger_refuses_a_batch_on_the_loop_and_leaves_its_reads_unpaused(tmp_path: Path) -> None:
    """Every call of a read-only ledger reads in chunks on the thread that enters it
    (`ReadingLedger._call`); a batch entered the call on the loop and left it on a worker, so
    the loop's thread kept the pause for every read it made after."""
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)

    async def body(ledger: AsyncLedger) -> None:
        chunks = ledger._ledger._journal._chunks
        with pytest.raises(ReadOnlyLedger):
            await ledger.transfer_many([TransferRequest("t", "bank", "bank", 1)])
        assert chunks.between is None
        assert [a.id for a in await ledger.accounts()] == ["bank"]

    run(tmp_path / "l", body, readonly=True)


def test_a_completion_calls_back_once_and_keeps_no_reference_to_its_callbacks() -> None:
    calls: list[Completion] = []
    completion = Completion()
    assert completion.add_callback(calls.append)
    assert completion.resolve()
    assert not completion.resolve()
    assert calls == [completion] and completion._callbacks is None
    assert not completion.add_callback(calls.append)  # resolved: the caller goes on itself
    assert calls == [completion]


def test_an_async_follower_hears_of_a_failed_journal_as_the_ledger_says_it(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        await funded(ledger, accounts=1)
        events = ledger.events(0)
        async for _ in events:
            break  # caught up far enough: the rest follows
        ledger._ledger._journal.refuse_writes("a test fails the journal")
        with pytest.raises(LedgerUnavailable):
            async for _ in events:
                pass

    run(tmp_path / "l", body)


def test_two_closes_at_once_both_return_once_the_ledger_is_closed(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        await funded(ledger, accounts=1)
        await asyncio.gather(ledger.close(), ledger.close())
        assert ledger.closed
        with Ledger.open(tmp_path / "l") as reopened:  # the directory lock is free
            assert reopened.balance("a0").posted == 1_000

    run(tmp_path / "l", body)


def test_an_async_ledger_on_uvloop_moves_money_as_on_asyncio(tmp_path: Path) -> None:
    """`tally serve` runs on uvloop when it is installed (the `serve` extra brings it)."""
    uvloop = pytest.importorskip("uvloop")

    async def body() -> tuple[int, str]:
        async with AsyncLedger.open(tmp_path / "l") as ledger:
            names = await funded(ledger, accounts=4)
            await asyncio.gather(*(ledger.transfer(f"u{n}", source=names[n % 4], destination=names[(n + 1) % 4],
                                                   amount=1) for n in range(400)))
            return sum([(await ledger.balance(name)).posted for name in names]), await ledger.state_hash()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        total, digest = runner.run(body())
    assert total == 4_000
    with Ledger.open(tmp_path / "l") as ledger:
        assert ledger.state_hash() == digest


def test_writes_whose_coroutines_were_cancelled_complete_before_the_ledger_closes(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1, _, _ = await funded(ledger)
        tasks = [asyncio.create_task(ledger.transfer(f"k{n}", source=a0, destination=a1, amount=1))
                 for n in range(200)]
        await asyncio.sleep(0)  # every one has made its request
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # (closing on leaving `run`: it lets the 200 writes finish first)

    run(tmp_path / "l", body)
    with Ledger.open(tmp_path / "l") as ledger:
        assert all(ledger.get_transfer(f"k{n}") is not None for n in range(200))
        assert ledger.balance("a1").posted == 1_200


async def _close_begun(ledger: AsyncLedger) -> asyncio.Task[None]:
    """`ledger.close()` as a task, once it has begun: the ledger no longer takes calls."""
    closing = asyncio.create_task(ledger.close())
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while not ledger._ledger._closed:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    return closing


async def _handed_to_busy_workers(ledger: AsyncLedger, write: str) -> tuple[asyncio.Task[Any], threading.Event,
                                                                              list[Any]]:
    """The write `write` (of account "new", or a `transfer_many` of transfer "m", 7 from a0 to
    a1, on a funded ledger) after its first step: handed to the worker threads, every one of
    them busy until the event returned is set (their jobs: the futures returned)."""
    a0, a1, _, _ = await funded(ledger)
    release = threading.Event()
    busy = [ledger._workers.submit(release.wait, WAIT_S) for _ in range(ASYNC_WORKER_THREADS)]
    calls = {"create_account": lambda: ledger.create_account("new", currency="USD"),
             "create_accounts": lambda: ledger.create_accounts([Account("new", "USD", 0)]),
             "transfer_many": lambda: ledger.transfer_many([TransferRequest("m", a0, a1, 7)])}
    task = asyncio.create_task(calls[write]())
    await asyncio.sleep(0)  # its first step: handed to the workers, all of them busy
    assert not task.done()
    return task, release, busy


@pytest.mark.parametrize("write", ["create_account", "create_accounts", "transfer_many"])
def test_a_write_on_a_worker_cancelled_while_it_waits_for_one_still_completes(tmp_path: Path, write: str) -> None:
    """A write handed to the worker threads is not withdrawn from their queue when its
    caller is cancelled: every worker is kept busy until the caller is cancelled."""
    async def body(ledger: AsyncLedger) -> None:
        task, release, busy = await _handed_to_busy_workers(ledger, write)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        release.set()
        for waiting in busy:
            await asyncio.wrap_future(waiting)
        # (closing on leaving `run`: it waits for the write, which holds the ledger open)

    run(tmp_path / "l", body)
    with Ledger.open(tmp_path / "l") as ledger:  # a write cancelled after its first step completed
        if write == "transfer_many":
            assert ledger.get_transfer("m") is not None
            assert ledger.balance("a1").posted == 1_007
        else:
            assert ledger.account("new") == Account("new", "USD", 0)


def test_a_worker_thread_that_cannot_start_is_ledger_unavailable_and_leaves_the_call_once(tmp_path: Path) -> None:
    """`submit` queues the job, then starts a thread: if that fails, the job still runs later
    (on the next thread started), and the call it entered is left once, not twice."""
    async def body(ledger: AsyncLedger) -> None:
        workers = ledger._workers
        real = workers._adjust_thread_count

        def fail_once() -> None:
            workers._adjust_thread_count = real  # type: ignore[method-assign]
            raise RuntimeError("can't start new thread")

        workers._adjust_thread_count = fail_once  # type: ignore[method-assign]
        with pytest.raises(LedgerUnavailable):
            await ledger.create_account("x", currency="USD")
        assert not ledger._ledger._calls
        await ledger.create_account("y", currency="USD")  # a thread starts: it runs x's job too
        assert await ledger.create_account("x", currency="USD") == Account("x", "USD", 0)
        assert {account.id for account in await ledger.accounts()} == {"x", "y"}

    run(tmp_path / "l", body)


def test_close_waits_for_a_batch_of_accounts_whose_caller_was_cancelled(tmp_path: Path) -> None:
    """The worker opening the accounts holds the ledger open: `close` waits for it, rather
    than closing the journal under it between two of its blocks of 1,000."""
    accounts = [Account(f"acct-{n}", "USD", 0) for n in range(3_000)]
    started, proceed = threading.Event(), threading.Event()

    async def body(ledger: AsyncLedger) -> None:
        opening = ledger._ledger._open_accounts

        def open_accounts(results: list[object]) -> int:
            started.set()
            assert proceed.wait(WAIT_S)
            return opening(results)  # type: ignore[arg-type]

        ledger._ledger._open_accounts = open_accounts  # type: ignore[method-assign]
        task = asyncio.create_task(ledger.create_accounts(accounts))
        assert await asyncio.to_thread(started.wait, WAIT_S)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        closing = await _close_begun(ledger)
        proceed.set()
        await closing

    run(tmp_path / "l", body)
    with Ledger.open(tmp_path / "l") as ledger:
        assert len(ledger.accounts()) == 3_000


@pytest.mark.parametrize("write", ["create_account", "create_accounts", "transfer_many"])
def test_a_write_queued_for_the_workers_before_close_runs_to_its_end(tmp_path: Path, write: str) -> None:
    """Handed to the workers (all busy) before `close` began, a write is still made once
    they take it, as the close waits for it: it is not refused as if it came after."""
    async def body(ledger: AsyncLedger) -> None:
        task, release, busy = await _handed_to_busy_workers(ledger, write)
        closing = await _close_begun(ledger)
        release.set()
        made = await task
        assert not isinstance(made, list) or not any(isinstance(item, Exception) for item in made), made
        await closing
        for waiting in busy:
            await asyncio.wrap_future(waiting)

    run(tmp_path / "l", body)
    with Ledger.open(tmp_path / "l") as ledger:
        if write == "transfer_many":
            assert ledger.balance("a1").posted == 1_007
        else:
            assert ledger.account("new") == Account("new", "USD", 0)


def test_a_cancelled_write_that_never_gets_a_permit_is_withdrawn_at_its_deadline(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def body(ledger: AsyncLedger) -> None:
        a0, a1, _, _ = await funded(ledger)
        at_its_bound(ledger, monkeypatch, timeout_s=0.3)
        task = await queued(ledger, "w1", a0, a1)
        task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while ledger._outbox and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert not ledger._outbox and not ledger._ledger._coordinator.claims.in_flight()
        monkeypatch.undo()
        assert await ledger.outcome("w1") is None

    run(tmp_path / "l", body)


def test_following_from_an_lsn_still_to_come_keeps_one_waiter_however_many_follow(tmp_path: Path) -> None:
    async def body(ledger: AsyncLedger) -> None:
        await funded(ledger, accounts=1)
        for n in range(50):
            assert [event async for event in ledger.events(10**6 + n, timeout_s=0.01)] == []
        assert len(ledger._ledger._journal._writer._waiters) <= 1  # type: ignore[union-attr]
        assert len([f for f in ledger._next_records.values() if not f.done()]) <= 1

    run(tmp_path / "l", body)


class _CountingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """The loop's selector, counting its turns (one select each)."""

    def __init__(self) -> None:
        super().__init__()
        self.selects = 0

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        self.selects += 1
        return super().select(timeout)


def test_a_long_read_lets_the_loop_take_a_turn_between_two_chunks_of_its_records(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of thousands of transfers, read on a worker, does not go on past a chunk of its
    records until the loop has taken a turn. (Read in one go, record after record, py-lmdb's
    hand-offs of the GIL kept the loop out for the whole read: `journal._chunks`.) Counted,
    not timed: the loop's turns as the worker reads each record. Without the turns the loop
    sleeps in one select from the start of the read to its end."""
    transfers = 8 * READ_CHUNK_RECORDS
    monkeypatch.setattr(engine._loop_turns, "LOOP_TURN_WAIT_S", WAIT_S)  # a slow loop is waited for too
    selector = _CountingSelector()
    turns: list[int] = []  # the loop's turns so far, as each record is read

    async def main() -> int:
        async with AsyncLedger.open(tmp_path / "l") as ledger:
            await ledger.create_account("bank", currency="USD", overdraft_limit=None)
            await ledger.create_account("a", currency="USD")
            await ledger.transfer_many([TransferRequest(f"t{n}", "bank", "a", 1) for n in range(transfers)])
            journal = ledger._ledger._journal
            read, scan = journal.read, journal.scan

            def counted(lsn: int, txn: object = None) -> bytes | None:
                turns.append(selector.selects)
                return read(lsn, txn)

            def counted_scan(after_lsn: int = 0, txn: object = None) -> Iterator[tuple[int, bytes]]:
                for found in scan(after_lsn, txn):
                    turns.append(selector.selects)
                    yield found

            monkeypatch.setattr(journal, "read", counted)
            monkeypatch.setattr(journal, "scan", counted_scan)
            return len(await ledger.transfers(limit=transfers))

    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(selector)) as runner:
        assert runner.run(main()) == transfers
    assert len(turns) >= transfers
    records_in_one_turn_max = max(len(list(same)) for _, same in itertools.groupby(turns))
    assert records_in_one_turn_max <= 2 * READ_CHUNK_RECORDS


def test_a_read_only_ledgers_head_and_stats_wait_on_a_worker_not_on_the_loop(tmp_path: Path) -> None:
    """A read-only ledger catches up with its writer before `head` and `stats` answer, under
    the lock its reads on workers hold for their whole read (`state_hash` of a big ledger:
    seconds). Taken on the loop, that lock stopped the loop for as long; on a worker, the
    loop goes on while they wait. Counted, not timed: the lock is let go by the loop itself
    once it has turned, or by a fallback thread long after (without the fix, the loop is
    stuck in `head` until then)."""
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)

    async def body(ledger: AsyncLedger) -> None:
        lock = ledger._ledger._catching_up  # type: ignore[attr-defined]
        for call in (ledger.head, ledger.stats):
            released, once = threading.Event(), threading.Lock()

            def release(released: threading.Event = released, once: threading.Lock = once) -> None:
                with once:
                    if not released.is_set():
                        released.set()
                        lock.release()

            assert lock.acquire(timeout=WAIT_S)  # as a long read on a worker holds it
            fallback = threading.Timer(WAIT_S / 3, release)
            fallback.start()
            try:
                waiting = asyncio.ensure_future(call())
                for _ in range(3):
                    await asyncio.sleep(0)  # the loop turns meanwhile
                assert not released.is_set(), f"the loop waited in {call.__name__} for the lock"
                assert not waiting.done()
            finally:
                release()
                fallback.cancel()
            await asyncio.wait_for(waiting, WAIT_S)
        assert (await ledger.head()).lsn == (await ledger.stats())["durable_lsn"]

    run(tmp_path / "l", body, readonly=True)
