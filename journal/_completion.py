"""A one-shot signal a caller waits on until the writer has made its record durable."""

from __future__ import annotations

import threading


class Completion:
    """Released once by the writer thread; any number of threads may wait on it.

    A completion costs one pre-acquired lock: the cheapest thing a thread can
    sleep on. `value` is free for the owner to fill before the record is
    appended (for example the outcome the waiter will return); `error` is set
    by the writer if the record could not be made durable.
    """

    __slots__ = ("_lock", "_done", "value", "error")

    def __init__(self, value: object = None) -> None:
        self._lock = threading.Lock()
        self._lock.acquire()
        self._done = False
        self.value = value
        self.error: BaseException | None = None

    @property
    def done(self) -> bool:
        return self._done

    def resolve(self, error: BaseException | None = None) -> None:
        """Release every waiter. Called exactly once, by the thread that finished the work."""
        assert not self._done, "a completion resolves once"
        if error is not None:
            self.error = error
        self._done = True
        self._lock.release()

    def wait(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` seconds; True once resolved. Never raises `error` itself."""
        assert timeout_s >= 0, timeout_s
        if self._done:
            return True
        if not self._lock.acquire(timeout=timeout_s):
            return False
        self._lock.release()  # let the next waiter through
        return True
