"""`AsyncLedger`: the engine for an asyncio host, on one event loop, without blocking it.

Data flow of a transfer (threads in brackets):

1. [loop] the coroutine validates the request and claims its id (or finds the id's earlier
   outcome), as `Ledger.transfer` does; it registers a waker on the ticket, queues it in
   the *outbox* and sleeps on a future.
2. [loop, then the decider] once a turn of the loop, the flush takes permits for the
   tickets queued meanwhile and hands them, together, to the ledger's one *decider* thread,
   which decides them as one combined round (`Coordinator.submit`) and queues their records
   for the journal writer. The loop never takes the sequencer's or the journal's locks
   (the writer holds the journal's while it stages a group commit), and no fsync runs on it.
   While the decider works, the outbox fills; its next round takes what came meanwhile.
3. [writer] one group commit makes the records durable, then resolves each ticket; its
   waker appends it to a queue and, if none is scheduled, schedules one drain with
   `loop.call_soon_threadsafe`: a group commit of hundreds wakes the loop once.
4. [loop] the drain releases the tickets' claims and sets their futures, at most
   `WAKE_FUTURES_MAX` a turn; each coroutine returns its durable outcome.

No thread is parked per call: one decider for every write, and the writer. Reads (an
account's actor may have a queue to get through; a cold page of the data file is a disk
read), account openings and `transfer_many` (a batch waits its turn in the batch lane, see
`coordinator._turns`) run on worker threads (`ASYNC_WORKER_THREADS`), a call on one worker
for its duration. A read waits for a turn of the loop between two chunks of the records it
reads (`Journal.reading_in_chunks`, `engine._loop_turns`): reading record after record, a worker
would keep the loop from the interpreter for the whole read (`journal._chunks` says why),
100 ms and more for a page of 10,000 transfers.

Cancellation: cancelling a coroutine that awaits a write never cancels the write. A task
cancelled before its first step submitted nothing; once it has made its request, the write
goes on to its durable outcome (its claim is released when that comes), and a retry with the
same id returns that outcome. Only a timeout withdraws a request still in the outbox (the
ledger at its bound of transfers in flight for `timeout_s`): nothing is written for it. A
write that runs on a worker thread (account openings, `transfer_many`, `expire_pending`) is
the same: once handed to the workers it runs to its end, and `close` waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Generator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, TypeVar

from coordinator import (
    Account,
    Balance,
    Entry,
    Event,
    InvalidRequest,
    LedgerClosed,
    LedgerError,
    LedgerUnavailable,
    ReadOnlyLedger,
    Refused,
    Resolution,
    Ticket,
    Transfer,
    TransferRequest,
    check_chain,
    check_resolution,
    check_transfer,
    refusal_error,
    seconds_of,
    settle,
    settle_chain,
    ticket_outcome,
    resolution_request,
    transfer_request,
)

from engine._head import Head
from engine._async_close import LoopClosing
from engine._async_follow import LoopFollowing
from engine._async_writes import LoopWrites
from engine._checks import checked_account, checked_accounts, checked_many
from engine._ledger import Ledger
from engine._loop_turns import LoopTurns

T = TypeVar("T")

ASYNC_WORKER_THREADS = 4
"""Threads an `AsyncLedger` runs its reads and batches on (never its single writes)."""

logger = logging.getLogger("tally.engine")


class AsyncLedger(LoopWrites, LoopFollowing, LoopClosing):
    """An open ledger for asyncio: every `Ledger` method but `snapshot` as a coroutine of the same name,
    arguments and errors, bound to the event loop that opened it. Open it with
    `async with AsyncLedger.open(path, **options) as ledger` (or `await AsyncLedger.open`).

    Writes (`transfer`, `post_pending`, `void_pending`, `transfer_linked`) are claimed on the
    loop and decided by the ledger's decider thread, a loop turn's worth at a time; the
    coroutine sleeps until the journal writer wakes it through the loop once its outcome is
    durable (module docstring). Each wait is bounded by the ledger's `timeout_s`
    (`LedgerTimeout`: retry with the same id). Cancelling an awaited write never cancels it
    halfway: a task cancelled before its first step submitted nothing; after, the write
    completes, and a retry with the same id returns its outcome."""

    def __init__(self, ledger: Ledger, loop: asyncio.AbstractEventLoop) -> None:
        self._ledger = ledger
        self._loop = loop
        self.path = ledger.path
        self.timeout_s = ledger.timeout_s
        self._workers = ThreadPoolExecutor(ASYNC_WORKER_THREADS, thread_name_prefix="tally-async")
        self._closing: asyncio.Future[None] | None = None
        self._start_writes()
        self._next_records: dict[int, asyncio.Future[None]] = {}
        """Per LSN that followers wait past: one future, set once a later record is durable."""

    @staticmethod
    def open(path: str | os.PathLike[str], **options: Any) -> _Opening:
        """Open (creating if missing) the ledger at `path` with `Ledger.open`'s options, on a
        worker thread (recovery may take a while), bound to the running loop. Use the result
        with `async with`, or await it and `close()` the ledger yourself."""
        return _Opening(path, options)

    async def __aenter__(self) -> AsyncLedger:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- writes ------------------------------------------------------------------------

    async def create_account(self, id: str, *, currency: str, overdraft_limit: int | None = 0,
                             code: int = 0, metadata: Mapping[str, str | int] | None = None) -> Account:
        """`Ledger.create_account`: returns once the account is durable."""
        account = checked_account(id, currency, overdraft_limit, code, metadata)
        if self._readonly:
            return self._ledger.create_account(id, currency=currency)  # raises ReadOnlyLedger
        with self._call():
            await self._durable(await self._write_on_worker(self._ledger._open_account, account))
            return account

    async def create_accounts(self, accounts: Sequence[Account]) -> list[Account | LedgerError]:
        """`Ledger.create_accounts`: returns once every outcome is durable."""
        if self._readonly:
            return self._ledger.create_accounts(accounts)  # raises ReadOnlyLedger
        results = checked_accounts(accounts)
        with self._call():
            await self._durable(await self._write_on_worker(self._ledger._open_accounts, results))
        return results

    async def transfer(self, id: str, *, source: str, destination: str, amount: int, code: int = 0,
                       reference: str | None = None, metadata: Mapping[str, str | int] | None = None,
                       pending: bool = False, timeout_s: int | None = None) -> Transfer:
        """`Ledger.transfer`: returns once the outcome is durable (see the class docstring on
        cancellation)."""
        return await self._decide(transfer_request(id, source, destination, amount, code, reference,
                                                   metadata, pending, timeout_s))

    async def post_pending(self, id: str, *, pending_id: str, amount: int | None = None,
                           reference: str | None = None, metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """`Ledger.post_pending`."""
        return await self._decide(resolution_request(id, pending_id, amount, reference, metadata, False))

    async def void_pending(self, id: str, *, pending_id: str, reference: str | None = None,
                           metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """`Ledger.void_pending`."""
        return await self._decide(resolution_request(id, pending_id, None, reference, metadata, True))

    async def transfer_linked(self, requests: Sequence[TransferRequest]) -> list[Transfer]:
        """`Ledger.transfer_linked`: every leg, or none (`LinkedTransferFailed`)."""
        if self._readonly:
            return self._ledger.transfer_linked(requests)  # raises ReadOnlyLedger at once
        with self._call():
            chain = tuple(check_chain(requests))
            claimed = self._ledger._coordinator.claims.claim_chain(chain)
            if type(claimed) is not Ticket:
                priors = [None if prior is None else await self._prior(prior) for prior in claimed]  # type: ignore[union-attr]
                return settle_chain(chain, priors)
            await self._run(claimed)
            outcome = ticket_outcome(claimed)
            if isinstance(outcome, Refused):
                raise refusal_error(outcome)
            return list(outcome)  # type: ignore[arg-type]

    async def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Transfer | LedgerError]:
        """`Ledger.transfer_many`, on a worker thread (the batch waits its turn in the lane)."""
        if self._readonly:
            return self._ledger.transfer_many(requests)  # raises ReadOnlyLedger at once
        items, refused = checked_many(requests)
        return await self._write_on_worker(self._ledger._transfer_many, items, refused)

    async def expire_pending(self) -> int:
        """`Ledger.expire_pending`: returns once the expiries are durable."""
        if self._readonly:
            return self._ledger.expire_pending()  # raises ReadOnlyLedger
        with self._call():
            expired, lsn = await self._write_on_worker(self._ledger._coordinator.expire_due)
            await self._durable(lsn)
            return expired

    # --- reads (on a worker thread) ----------------------------------------------------

    async def account(self, id: str) -> Account:
        return await self._on_worker(self._ledger.account, id)

    async def accounts(self) -> list[Account]:
        return await self._on_worker(self._ledger.accounts)

    async def balance(self, account: str, *, at_lsn: int | None = None, at_timestamp: int | None = None) -> Balance:
        return await self._on_worker(partial(self._ledger.balance, account, at_lsn=at_lsn,
                                             at_timestamp=at_timestamp))

    async def entries(self, account: str, after: int = 0, limit: int | None = None) -> list[Entry]:
        return await self._on_worker(self._ledger.entries, account, after, limit)

    async def get_transfer(self, id: str) -> Transfer | None:
        return await self._on_worker(self._ledger.get_transfer, id)

    async def outcome(self, id: str) -> Transfer | LedgerError | None:
        return await self._on_worker(self._ledger.outcome, id)

    async def transfers(self, *, account: str | None = None, code: int | None = None, kind: str | None = None,
                        after_lsn: int = 0, until_lsn: int | None = None, limit: int = 100,
                        reverse: bool = False) -> list[Transfer]:
        return await self._on_worker(partial(self._ledger.transfers, account=account, code=code, kind=kind,
                                             after_lsn=after_lsn, until_lsn=until_lsn, limit=limit, reverse=reverse))

    async def state_hash(self) -> str:
        return await self._on_worker(self._ledger.state_hash)

    async def head(self) -> Head:
        if self._readonly:  # a reader catches up first, under the lock a read on a worker holds throughout
            return await self._on_worker(self._ledger.head)
        return self._ledger.head()  # from memory: never blocks

    async def stats(self) -> dict[str, int]:
        if self._readonly:  # (as `head`)
            return await self._on_worker(self._ledger.stats)
        return self._ledger.stats()  # from memory: never blocks

    def events(self, after_lsn: int = 0, *, follow: bool = True,
               timeout_s: float | None = None) -> AsyncIterator[Event]:
        """`Ledger.events` as an async iterator, following by default: each chunk of records
        is read on a worker thread, and a follower sleeps until the writer's next group
        commit wakes it through the loop (a read-only ledger's follower polls). Arguments are
        checked, and a closed ledger raises `LedgerClosed`, here, not at the first event."""
        self._ledger.events(after_lsn, follow=follow, timeout_s=timeout_s)  # checks, reads nothing
        wait_s = seconds_of(timeout_s)  # a plain number: a subclass's own arithmetic may raise
        return self._follow(after_lsn, follow, None if wait_s is None else float(wait_s))

    # --- closing (`close`: `engine._async_close`) ---------------------------------------

    @property
    def closed(self) -> bool:
        return self._ledger.closed

    @property
    def failure(self) -> LedgerError | None:
        """`Ledger.failure` (from memory: never blocks)."""
        return self._ledger.failure

    def __repr__(self) -> str:
        return f"AsyncLedger({self.path!r}{', closed' if self.closed else ''})"

    # --- the write path ----------------------------------------------------------------

    def _call(self) -> Any:
        """`Ledger._call`, checked to be on this ledger's loop."""
        if asyncio.get_running_loop() is not self._loop:
            raise InvalidRequest("an AsyncLedger is bound to the event loop that opened it")
        return self._ledger._call()

    async def _decide(self, request: TransferRequest | Resolution) -> Transfer:
        """Run one request to its durable outcome (steps 1 and 4 of the module docstring)."""
        if self._readonly:
            raise ReadOnlyLedger(f"the ledger at {self.path} is open read-only: it cannot decide transfers")
        with self._call():
            request = check_transfer(request) if type(request) is not Resolution else check_resolution(request)
            claim, fresh = self._ledger._coordinator.claims.claim(request)
            if not fresh:
                return settle(request, await self._prior(claim))
            assert type(claim) is Ticket
            await self._run(claim)
            return settle(request, claim)

    async def _on_worker(self, call: Callable[..., T], *args: Any) -> T:
        if asyncio.get_running_loop() is not self._loop:
            raise InvalidRequest("an AsyncLedger is bound to the event loop that opened it")
        try:
            return await self._loop.run_in_executor(self._workers, self._read_in_chunks, call, *args)
        except RuntimeError:  # the workers were shut down: the ledger closed
            if self.closed:
                raise LedgerClosed(f"the ledger at {self.path} is closed") from None
            raise

    def _read_in_chunks(self, call: Callable[..., T], *args: Any) -> T:
        """On a worker: `call(*args)`, a read, with a turn of the loop between two chunks of the
        records it reads."""
        with self._ledger._journal.reading_in_chunks(LoopTurns(self._loop)):
            return call(*args)

    async def _write_on_worker(self, call: Callable[..., T], *args: Any) -> T:
        """`call(*args)`, a write, on a worker thread: from here on it runs to its end whatever
        becomes of the caller. Cancelling the caller does not withdraw it from the workers'
        queue, and it counts as a call of the ledger until it ends there, so `close` waits
        for it (bounded by `timeout_s`) instead of closing the journal under it."""
        if asyncio.get_running_loop() is not self._loop:
            raise InvalidRequest("an AsyncLedger is bound to the event loop that opened it")
        assert not self._readonly  # a read-only ledger's call reads in chunks on the thread that entered
        # it (`ReadingLedger._call`): left on a worker, it would leave the loop's thread pausing
        slot = self._ledger._call()
        slot.__enter__()  # LedgerClosed if closed
        # Taken by whichever leaves the call first (`list.pop` is one step): the job, or a
        # submission that failed after queueing it (a worker thread that could not start).
        held = [slot]

        def job() -> T:
            try:
                result = call(*args)
            except BaseException as error:
                _leave(held, error)  # a JournalError becomes its LedgerError
                raise
            _leave(held, None)
            return result

        try:
            submitted = self._workers.submit(job)
        except RuntimeError as error:
            _leave(held, None)
            if self.closed:  # the workers were shut down
                raise LedgerClosed(f"the ledger at {self.path} is closed") from None
            raise LedgerUnavailable(f"no worker thread could take the call ({error}); if it was a write, "
                                    "retry it with the same id to learn its outcome") from error
        running = asyncio.wrap_future(submitted, loop=self._loop)
        running.add_done_callback(_seen)  # its error is the caller's, who may be gone
        return await asyncio.shield(running)


def _leave(held: list[Any], error: BaseException | None) -> None:
    """Leave a ledger call entered for a job on a worker, once (see `_write_on_worker`)."""
    try:
        slot = held.pop()
    except IndexError:
        return
    slot.__exit__(None if error is None else type(error), error, None if error is None else error.__traceback__)


def _seen(done: asyncio.Future[Any]) -> None:
    """Retrieve a finished future's error, so a write whose caller was cancelled does not log it
    as never retrieved (the outcome is the journal's: a retry with the same id learns it)."""
    if not done.cancelled():
        done.exception()


def _close_unclaimed(opening: asyncio.Future[Ledger]) -> None:
    """Close the ledger an `AsyncLedger.open` whose caller was cancelled went on to open."""
    if opening.cancelled() or opening.exception() is not None:
        return
    threading.Thread(target=opening.result().close, name="tally-async-unclaimed-close").start()


class _Opening:
    """`AsyncLedger.open`'s result: awaitable, and an async context manager."""

    def __init__(self, path: str | os.PathLike[str], options: dict[str, Any]) -> None:
        self._path = path
        self._options = options
        self._ledger: AsyncLedger | None = None

    async def _open(self) -> AsyncLedger:
        """Open on a worker thread. Cancelled meanwhile (`asyncio.wait_for` on a ledger slow to
        recover), the open goes on there: the ledger it opens for nobody is closed, on a thread
        of its own, rather than left open holding the directory for the life of the process."""
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, partial(Ledger.open, self._path, **self._options))
        try:
            ledger = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_unclaimed)
            raise
        return AsyncLedger(ledger, loop)

    def __await__(self) -> Generator[Any, None, AsyncLedger]:
        return self._open().__await__()

    async def __aenter__(self) -> AsyncLedger:
        self._ledger = await self._open()
        return self._ledger

    async def __aexit__(self, *exc_info: object) -> None:
        if self._ledger is not None:
            await self._ledger.close()
