"""Reads in chunks: a thread may have the journal call a function of its own between two
chunks of `READ_CHUNK_RECORDS` records or index entries it reads (`Journal.reading_in_chunks`).

Why: py-lmdb lets go of the GIL around each get and each cursor step, and takes it back
within a microsecond. Each time it lets go, CPython signals a thread waiting for the GIL,
which wakes, finds it taken again, and starts its timed wait (the switch interval, 5 ms)
over; having never waited a whole interval, it never asks the holder to let go. So a thread
reading record after record keeps every other thread out of the interpreter until it is done,
or until one wins a race for it by luck: an event loop beside one page of 10,000 transfers
stalled 100-300 ms at a time, the decider and the writer too. Pausing (`time.sleep(0)`) lets
go once more and changes nothing. A waiting thread gets in only if the reader stops until it
has: the function called between two chunks does that: a `Pause` (a thread reading for a
caller of its own: `Ledger`'s reads), or a wait for a turn of an event loop (`engine._async`).
A thread that gave none (the engine's own: the writer, a caller deciding in the accounts'
turns, under locks other threads need) reads on as before.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

from journal._limits import READ_CHUNK_RECORDS, READ_PAUSE_S


class Chunks(threading.local):
    """Per thread: the function to call between two chunks (None: read on), and how many
    records were read since the last call."""

    between: Callable[[], None] | None = None
    read: int = 0

    def step(self) -> None:
        """One record (or index entry) read: call the function once a chunk is complete."""
        between = self.between
        if between is not None:
            self.read += 1
            if self.read >= READ_CHUNK_RECORDS:
                self.read = 0
                between()

    def calling(self, between: Callable[[], None]) -> Calling:
        """Until left, this thread's reads call `between()` after each chunk; inside another
        such context, its function stays (the outer caller knows what its thread must let
        through: an `AsyncLedger` worker's loop, around a `Ledger` read's pause)."""
        return Calling(self, between)


class Calling:
    """`Chunks.calling`: a context manager that is a plain object (entered once per read of a
    `Ledger`: no generator per call)."""

    __slots__ = ("_chunks", "_between", "_outermost")

    def __init__(self, chunks: Chunks, between: Callable[[], None]) -> None:
        self._chunks, self._between, self._outermost = chunks, between, False

    def __enter__(self) -> None:
        chunks = self._chunks
        if chunks.between is None:
            self._outermost = True
            chunks.between, chunks.read = self._between, 0

    def __exit__(self, *_exc: object) -> None:
        if self._outermost:
            chunks = self._chunks
            chunks.between, chunks.read = None, 0


class Pause:
    """Between two chunks of a read: let go of the interpreter for `READ_PAUSE_S` (long enough
    for a thread waiting for it, the journal's writer or a caller deciding transfers, to wake
    and take it) once the read has held it for the interpreter's switch interval
    (`sys.getswitchinterval()`, 5 ms unless the host set another) since its first chunk or
    since it last let go: what the interpreter would have had it do, had its reads not kept it
    from that."""

    __slots__ = ("_due",)

    def __init__(self) -> None:
        self._due = 0.0
        """When to let go next; 0: not yet known (a read too short to fill a chunk never reads a
        clock: the interval counts from its first chunk)."""

    def __call__(self) -> None:
        now = time.perf_counter()
        if not self._due:
            self._due = now + sys.getswitchinterval()
        elif now >= self._due:
            time.sleep(READ_PAUSE_S)
            self._due = time.perf_counter() + sys.getswitchinterval()
