"""Turns of an event loop for a read on a worker thread (`engine._async`): between two chunks
of the records it reads (`Journal.reading_in_chunks`), the read waits until the loop has run.

Why a wait, and not a pause or a switch: py-lmdb lets go of the GIL around each get and cursor
step, and each time CPython restarts the timed wait of the thread waiting for it, so the loop
would never be let in by the interpreter's switch interval, only by luck (`journal._chunks`).
A thread that stops until the loop has run lets it in for sure.
"""

from __future__ import annotations

import asyncio
import threading

LOOP_TURN_WAIT_S = 0.1
"""Longest a read on a worker waits between two chunks for the loop to take its turn
(`LoopTurns`). A loop that has not taken it by then is busy for longer, or is waiting for
something the read holds (a claim's look at the transfers index, while the writer grows the
map and waits for the read's transaction to end): the read goes on without waiting again."""


class LoopTurns:
    """What a read on a worker calls between two chunks (`Journal.reading_in_chunks`): it
    waits until the loop has taken a turn, running what became ready meanwhile (its timers
    due, the wake-ups of the writes), at most `LOOP_TURN_WAIT_S`. Only a thread that stops
    lets a thread waiting for the interpreter in (`journal._chunks`): a switch or
    `time.sleep(0)` does not. A loop that is not running, or did not take its turn in time,
    is not waited for again by this read."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiting = True

    def __call__(self) -> None:
        loop = self._loop
        if not self._waiting or not loop.is_running():
            return
        turn = threading.Event()
        try:
            loop.call_soon_threadsafe(turn.set)
        except RuntimeError:  # the loop is closed: nobody is left to make room for
            self._waiting = False
            return
        if not turn.wait(LOOP_TURN_WAIT_S):
            self._waiting = False
