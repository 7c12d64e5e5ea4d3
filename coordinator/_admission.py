"""Admission control: a bound on transfers inside the protocol at once.

It is what keeps every mailbox and the journal's queue bounded: nothing enters
the protocol without a permit, and permits return when a transfer is decided.
"""

from __future__ import annotations

import threading

from coordinator._errors import LedgerTimeout


class Admission:
    def __init__(self, permits_max: int) -> None:
        assert permits_max >= 1
        self._cond = threading.Condition(threading.Lock())
        self._free = permits_max
        self._waiting = 0
        self.permits_max = permits_max

    def admit(self, permits: int, timeout_s: float) -> None:
        """Take `permits` (at most `permits_max`), waiting at most `timeout_s`."""
        assert 1 <= permits <= self.permits_max, permits
        with self._cond:
            if self._free < permits:
                self._waiting += 1
                try:
                    if not self._cond.wait_for(lambda: self._free >= permits, timeout_s):
                        raise LedgerTimeout(f"the ledger is at its bound of {self.permits_max} transfers in flight")
                finally:
                    self._waiting -= 1
            self._free -= permits

    def try_admit(self, permits: int) -> bool:
        """Take `permits` if they are free now; never waits. False if not (take none)."""
        assert 1 <= permits <= self.permits_max, permits
        with self._cond:
            if self._free < permits:
                return False
            self._free -= permits
            return True

    def release(self, permits: int = 1) -> None:
        with self._cond:
            self._free += permits
            assert self._free <= self.permits_max
            if self._waiting:
                self._cond.notify_all()

    @property
    def in_flight(self) -> int:
        return self.permits_max - self._free
