"""Closing a ledger: `Closing`, a base class of `Ledger` (`engine._ledger`).

`close` waits (bounded by `timeout_s`) for the calls under way, then stops the expirer and
the threads that run calls (`_stop_workers`, which a failed open calls too), journals a
checkpoint of every account if the chain of checkpoints has grown long
(`_checkpoint_on_close`), closes the journal (which drains the writer and seals the data file)
and lets the coordinator go. A second close waits for the first, or raises what it raised
(`_await_closed`). `Ledger` holds (and sets up) the threads, the events and the
parts these stop; a read-only ledger closes its own way (`engine._readonly`).
"""

from __future__ import annotations

import logging
import threading

from coordinator import LedgerTimeout, ledger_errors

from engine._calls import OPEN_LEDGERS
from engine._ledger_reads import LedgerReads
from engine._runtime import Dispatcher

logger = logging.getLogger("tally.engine")


class Closing(LedgerReads):
    """The closing methods of `Ledger` (see the module docstring); `Ledger` holds what they
    stop."""

    _dispatcher: Dispatcher
    _shut: threading.Event
    _closer: threading.Thread | None
    _close_failure: Exception | None
    _stopping: threading.Event
    _expirer: threading.Thread | None

    def close(self) -> None:
        """Finish the calls under way (bounded by `timeout_s`), then stop every thread and
        release the directory. Idempotent; every later call raises `LedgerClosed`.

        A call still under way after that bound ends with a `LedgerError`: `LedgerClosed` if
        nothing was written for it, or its outcome as the journal made it durable. If the
        chain of checkpoints an open would read back has grown long, it journals a checkpoint
        of every account (`Sequencer.checkpoint_on_close`). What was
        journaled is written before this returns (bounded; `LedgerTimeout` if the writer
        cannot drain, and then a retry after reopening learns each outcome). Then, if the
        journal never failed, it checks every page of the data file as an open would and
        seals what it checked, so the next open of those bytes need not (README.md,
        "Damage"): about half a microsecond a B-tree node, seconds for a million accounts.
        A close made while another thread closes the ledger returns once that one has, and a
        close after one that failed raises what that one raised, as `AsyncLedger.close` does
        (`_await_closed`)."""
        with self._state:
            # (closed with no closer: a close that gave up before its shut-down, whose place
            # this one takes, or a child's after `fork()`, which `_await_closed` returns from)
            closing = self._closed and (self._closer is not None or self._forked_from is not None)
            if not closing:
                self._closed, self._closer = True, threading.current_thread()
                try:
                    self._state.wait_for(lambda: not self._calls, timeout=self.timeout_s)
                except BaseException:  # an interrupt: its thread lives on, not closing; the next close does
                    self._closer = None
                    raise
        if closing:
            self._await_closed()
            return
        try:
            self._shut_down()
        except Exception as failure:  # (an interrupt is no failure of the books': the journal still closes)
            self._close_failure = failure
            raise
        finally:
            self._shut.set()

    def _await_closed(self) -> None:
        """A second `close`: return once the first has closed the ledger, or raise what the
        first raised if it failed (a host that closes twice learns the books were not closed
        cleanly, as a second `AsyncLedger.close` does). It waits a `timeout_s` at a time for as
        long as the first close's thread lives: that close's waits are each bounded, but its work
        grows with the ledger (a checkpoint of every account, the walk of the pages it seals), so
        no multiple of `timeout_s` bounds it (a second close that gave up at one raised
        `LedgerTimeout` with the directory still held: a reopen right after it was `LedgerLocked`).
        `LedgerTimeout` if that thread is gone and never finished (a first close an interrupt took
        out of its wait for the calls leaves no closer: the next close closes the ledger itself,
        instead of waiting on a thread that lives on). A close on the closing thread itself while
        it closes (a signal handler's, a finalizer's) returns at once: it cannot wait for itself.
        In a child made by `fork()`, nothing is closed here."""
        closer = self._closer
        if self._forked_from is not None or closer is None:
            return
        if closer is not threading.current_thread():
            while not self._shut.wait(self.timeout_s):
                closer = self._closer
                if closer is None:  # an interrupt took the first close out of its wait meanwhile: this one closes
                    self.close()
                    return
                if not closer.is_alive() and not self._shut.is_set():
                    raise LedgerTimeout(f"the ledger at {self.path} is still being closed: the thread closing it "
                                        f"({closer.name}) ended without finishing")
        if self._shut.is_set() and self._close_failure is not None:
            raise self._close_failure

    def _shut_down(self) -> None:
        """`close` once the calls under way are done (or its wait for them ran out)."""
        OPEN_LEDGERS.discard(self)
        self._stopping.set()
        if self._expirer is not None:
            self._expirer.join(timeout=self.timeout_s)
        self._stop_workers()
        try:
            self._checkpoint_on_close()
        finally:  # an interrupt in it too: the journal still closes, the directory is let go
            drained = False
            try:
                with ledger_errors():
                    self._journal.close()
                drained = True
            finally:
                self._coordinator.close(drained)

    def _stop_workers(self) -> None:
        """Stop the threads that run calls (those made so far, for an open that fails)."""
        if hasattr(self, "_coordinator"):
            self._coordinator.claims.stop()
        if hasattr(self, "_directory"):
            self._directory.stop()
        self._dispatcher.stop()

    def _checkpoint_on_close(self) -> None:
        """Journal a checkpoint of every account if the next open would otherwise read many
        more rows (`Sequencer.checkpoint_on_close`). Nothing depends on it: one not written
        (a failed journal, a timeout) leaves the open to walk back the checkpoints."""
        if self._journal.failure is not None:
            return
        try:
            self._sequencer.checkpoint_on_close(self.timeout_s)
        except Exception:  # a failed journal, a timeout, no memory for the rows: the chain stays
            logger.exception("no checkpoint journaled at close: the next open walks back the checkpoints")
