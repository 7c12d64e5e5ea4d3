"""A one-shot signal a caller waits on until the writer has made its record durable."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable


class Completion:
    """Released once by the writer thread; any number of threads may wait on it.

    Waiters sleep on a pre-acquired lock: the cheapest thing a thread can sleep
    on. Its first waiter makes it, so a completion nobody waits on (most of a
    batch's: its caller waits on the last) costs no lock at all. `value` is free
    for the owner to fill before the record is appended (for example the outcome
    the waiter will return); `error` is set by the writer if the record could not
    be made durable.

    A *relayed* completion is released in a relay instead of all at once: the
    writer wakes the first waiter of a group commit, and each waiter, once
    awake, wakes the next (see `relay`). Waking dozens of threads together on a
    busy interpreter makes them queue for the GIL, and every thread that queues
    costs a context switch; woken one after another they mostly find it free.
    A relayed completion is made for a caller that will wait, so it gets its
    lock at once. (`_waiting` is counted without a lock: CPython's GIL makes
    that safe, as the engine's other shared counters.)
    """

    __slots__ = ("_lock", "done", "value", "error", "_relay", "_waiting", "_callbacks")

    def __init__(self, value: object = None, relayed: bool = False) -> None:
        self.done = False
        """Set once, by the first `resolve` (or `relay`); read it freely, never write it."""
        self.value = value
        self.error: BaseException | None = None
        self._lock: threading.Lock | None = _held_lock() if relayed else None
        self._relay: deque[Completion] | None = _NO_RELAY if relayed else None
        self._waiting = 0
        self._callbacks: list[Callable[[Completion], None]] | None = None

    def add_callback(self, callback: Callable[[Completion], None]) -> bool:
        """Call `callback(self)` once this is resolved, on the resolving thread (the writer's,
        for a durable record), right after its waiters are released: it must be quick and
        must not raise (an event loop's waker: `call_soon_threadsafe`). False if it is
        resolved already: then it is not called, and the caller goes on itself."""
        with _RESOLVING:
            if self.done:
                return False
            if self._callbacks is None:
                self._callbacks = [callback]
            else:
                self._callbacks.append(callback)
            return True

    @property
    def relayed(self) -> bool:
        return self._relay is not None

    def resolve(self, error: BaseException | None = None) -> bool:
        """Release every waiter, with `error` if the work failed. The first call wins: a
        later one (a failure path racing the writer) changes nothing and returns False."""
        _RESOLVING.acquire()  # not `with`: on CPython 3.11 that costs three times as much
        try:
            if self.done:
                return False
            if error is not None:
                self.error = error
            self.done = True
            lock = self._lock
            callbacks = self._callbacks
            self._callbacks = None  # a callback often holds its completion: no cycle left for the collector
        finally:
            _RESOLVING.release()
        if lock is not None:  # else nobody waits yet, and a later waiter finds it done
            lock.release()
        if callbacks is not None:
            for callback in callbacks:
                callback(self)
        return True

    def wait(self, timeout_s: float) -> bool:
        """Block up to `timeout_s` seconds; True once resolved. Never raises `error` itself."""
        assert timeout_s >= 0, timeout_s
        if self.done and self._relay is None:
            return True
        lock = self._lock
        if lock is None:  # the first waiter makes the lock, unless it is resolved meanwhile
            _RESOLVING.acquire()
            try:
                if self.done:
                    return True
                lock = self._lock
                if lock is None:
                    lock = self._lock = _held_lock()
            finally:
                _RESOLVING.release()
        self._waiting += 1
        try:
            released = lock.acquire(timeout=timeout_s)
        finally:
            self._waiting -= 1
        if released:
            lock.release()  # let the next waiter through
        relay = self._relay
        if relay:
            pass_on(relay)  # woken or not, keep the relay going
        return released


def _held_lock() -> threading.Lock:
    """A lock already acquired: a waiter blocks on it until it is released."""
    lock = threading.Lock()
    lock.acquire()
    return lock


_RESOLVING = threading.Lock()
"""Makes deciding a completion's outcome atomic (held for a few bytecodes, never waits)."""

_NO_RELAY: deque[Completion] = deque()
"""The relay of a relayed completion not yet made durable (always empty)."""


def resolve_all(completions: Iterable[Completion | None]) -> None:
    """`resolve` every completion given (None skipped) as durable, under one hold of
    `_RESOLVING` for the lot, not one each: a group commit releases hundreds. Each is
    marked done before any waiter wakes; relayed ones are then released in a relay."""
    locks: list[threading.Lock] = []
    relayed: list[Completion] = []
    called: list[Completion] = []
    with _RESOLVING:
        for completion in completions:
            if completion is None or completion.done:
                continue  # already failed by its owner: nothing to release
            if completion._relay is not None:
                relayed.append(completion)  # `relay` marks it
                continue
            completion.done = True
            if completion._lock is not None:  # else nobody waits yet, and a later waiter finds it done
                locks.append(completion._lock)
            if completion._callbacks is not None:
                called.append(completion)
    for lock in locks:
        lock.release()
    if relayed:
        relay(relayed)
    _call_back(called)


def _call_back(completions: list[Completion]) -> None:
    """Run the callbacks of completions just marked done (no lock held)."""
    for completion in completions:
        callbacks, completion._callbacks = completion._callbacks, None  # no cycle left (see `resolve`)
        for callback in callbacks:  # type: ignore[union-attr]
            callback(completion)


def relay(completions: list[Completion]) -> None:
    """Release relayed completions (all already durable) one waiter at a time: mark every
    one done, then wake the first that has a waiter; each waiter passes it on."""
    line: deque[Completion] = deque()
    called: list[Completion] = []
    with _RESOLVING:
        for completion in completions:
            if completion.done:
                continue  # already failed by its owner; nothing to release
            completion.done = True
            completion._relay = line
            line.append(completion)
            if completion._callbacks is not None:
                called.append(completion)
    pass_on(line)
    _call_back(called)


def pass_on(line: deque[Completion]) -> None:
    """Release the next completions of `line` up to and including one that has a waiter
    (who will pass it on in turn). Any thread may call it; each is released once."""
    while True:
        try:
            completion = line.popleft()
        except IndexError:
            return
        assert completion._lock is not None, "a relayed completion has its lock from the start"
        completion._lock.release()
        if completion._waiting:
            return
