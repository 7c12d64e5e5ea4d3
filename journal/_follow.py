"""`Progress`: lets followers wait for the durable LSN to pass a point, at almost no cost to
the writer.

The writer calls `advanced` after each group commit is published; it takes a lock and
notifies only while someone waits (a counter read without the lock: the waiter counts
itself before it looks at the durable LSN, and the writer sets the durable LSN before it
looks at the counter, so one of the two always sees the other). Every wait is bounded
(house style 6), and `end` (the journal closing or failing) releases every waiter at once.

A read-only journal has no writer in this process to notify it: its followers poll (see
`engine._follow`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class Progress:
    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._waiting = 0
        self._ended = False

    def advanced(self) -> None:
        """The durable LSN moved (writer, after publishing it)."""
        if self._waiting:
            with self._cond:
                self._cond.notify_all()

    def end(self) -> None:
        """No more progress will come (closing, or failed): release every waiter, now and later."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def wait(self, reached: Callable[[], bool], timeout_s: float) -> bool:
        """Block until `reached()` (checked under the lock, after counting this waiter), at most
        `timeout_s`, or until `end`; return `reached()`."""
        with self._cond:
            self._waiting += 1
            try:
                self._cond.wait_for(lambda: self._ended or reached(), timeout=timeout_s)
            finally:
                self._waiting -= 1
        return reached()
