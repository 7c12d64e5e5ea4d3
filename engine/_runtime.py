"""Pooled pykka actors: many actors, a bounded number of threads.

A pykka `ThreadingActor` normally owns a thread for life. One thread per account
does not scale to 100,000 accounts, and on a busy machine every message that has
to wake a sleeping thread costs a context switch (a ping-pong between two threads
measured ~240 us here). So `PooledActor` keeps pykka's actor, ref, envelope and
future, and replaces only the loop: its inbox is a deque, and putting the first
message into an idle inbox schedules the actor on a `Dispatcher`, a fixed pool of
worker threads. A worker runs one actor at a time through up to
`SLICE_MESSAGES_MAX` messages, so an actor is still single-threaded (its
messages are handled one after another, never two at once), while messages to
idle actors cost a deque append instead of a thread wake-up.

Actors here are not put in pykka's global `ActorRegistry`: they belong to the
ledger that made them, and a host's `ActorRegistry.stop_all()` must not stop a
ledger's accounts behind its back.
"""

from __future__ import annotations

import itertools
import logging
import queue
import sys
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import pykka
from pykka import ActorDeadError, messages

logger = logging.getLogger("tally.runtime")


class Envelope(Protocol):
    """A message in an inbox, and where its reply goes: pykka's (from `tell` and `ask`)
    or ours (`_Sent`, for the messages the engine queues itself)."""

    message: Any
    reply_to: Any


class _Sent:
    """An envelope for a message that wants no reply (pykka's own is private to it)."""

    __slots__ = ("message", "reply_to")

    def __init__(self, message: Any) -> None:
        self.message = message
        self.reply_to = None

SLICE_MESSAGES_MAX = 64
"""Messages one actor handles before the worker moves on to the next actor (fairness)."""

INLINE_DEPTH_MAX = 4
"""Turns one thread may run nested inside each other by direct dispatch; deeper ones go to
the dispatcher, so a chain of deliveries can never grow the stack without bound."""

_inline = threading.local()


WORKER_POLL_S = 1.0
"""How often an idle worker re-checks whether the dispatcher is stopping."""

STOP_WAIT_S_MAX = 10.0
"""Longest `Dispatcher.stop` waits for each worker."""

INBOX_LOCKS = 256
"""Locks the inboxes share (see `Inbox`)."""

_inbox_locks = [threading.Lock() for _ in range(INBOX_LOCKS)]
_inbox_numbers = itertools.count()


class Dispatcher:
    """A fixed pool of worker threads running pooled actors. Start on creation."""

    def __init__(self, threads: int, name: str = "tally-dispatcher") -> None:
        assert 1 <= threads <= 64, threads
        self._runnable: queue.SimpleQueue[PooledActor | None] = queue.SimpleQueue()
        self._stopping = False
        self.running = 0
        """Workers inside an actor's turn right now (read without a lock: a hint)."""
        self._workers = [
            threading.Thread(target=self._work, name=f"{name}-{n}", daemon=True) for n in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    def schedule(self, actor: PooledActor) -> None:
        self._runnable.put(actor)

    @property
    def busy(self) -> bool:
        """A hint: some worker is running or has actors waiting for it."""
        return self.running > 0 or not self._runnable.empty()

    def _work(self) -> None:
        runnable = self._runnable
        while True:
            try:
                actor = runnable.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                if self._stopping:
                    return
                continue
            if actor is None:
                return
            self.running += 1
            try:
                actor._run_slice()
            finally:
                self.running -= 1

    def stop(self) -> None:
        """Stop the workers once the messages already queued are handled (bounded wait)."""
        self._stopping = True
        for _ in self._workers:
            self._runnable.put(None)
        for worker in self._workers:
            if worker is not threading.current_thread():
                worker.join(timeout=STOP_WAIT_S_MAX)

    @property
    def threads(self) -> int:
        return len(self._workers)


class Inbox:
    """A pykka inbox that schedules its actor when the first message arrives.

    Inboxes share a pool of `INBOX_LOCKS` locks, dealt round-robin. Every section
    under one is a few bytecodes and takes no other lock, so sharing costs no
    deadlock and next to no waiting; and 10,000 accounts do not keep a lock each:
    one more object for the collector, and a semaphore that a batch holding the
    account's turn would fetch from memory twice.

    For the same reasons the queue is made by the first message (an account a batch
    decides in its turn may never get one), and the inbox is also its actor's stop
    flag: pykka asks `actor_stopped` for `is_set` and `set` only. Nothing waits on a
    pooled actor's stop; the flag is read and written under the GIL."""

    __slots__ = ("_messages", "_lock", "_scheduled", "_actor", "_dispatcher", "_stopped")

    def __init__(self) -> None:
        self._messages: deque[Envelope] | None = None
        """Made, under the lock, by the first message; never unmade."""
        self._lock = _inbox_locks[next(_inbox_numbers) % INBOX_LOCKS]
        self._scheduled = False
        self._actor: PooledActor | None = None
        self._dispatcher: Dispatcher | None = None
        self._stopped = False

    def is_set(self) -> bool:
        """`actor_stopped.is_set()`: True once the actor has stopped."""
        return self._stopped

    def set(self) -> None:
        """`actor_stopped.set()`: the actor has stopped."""
        self._stopped = True

    def bind(self, actor: PooledActor, dispatcher: Dispatcher) -> None:
        self._actor = actor
        self._dispatcher = dispatcher

    def _enqueue(self, envelope: Envelope) -> bool:
        """Queue the message; True if the caller now holds the actor's turn."""
        assert self._actor is not None
        if self._stopped:
            raise ActorDeadError(f"{self._actor} is stopped")
        # acquire/release, not `with`: on CPython 3.11 a `with` block costs three times as
        # much (~320 ns against ~110 here), and these run once or twice per transfer.
        self._lock.acquire()
        try:
            queued = self._messages
            if queued is None:
                queued = self._messages = deque()
            queued.append(envelope)
            if self._scheduled:
                return False
            self._scheduled = True
            return True
        finally:
            self._lock.release()

    def put(self, envelope: Envelope, /) -> None:
        """pykka's `tell`/`ask` path: the actor runs on a dispatcher worker."""
        if self._enqueue(envelope):
            assert self._dispatcher is not None and self._actor is not None
            self._dispatcher.schedule(self._actor)

    def put_adaptive(self, message: Any) -> None:
        """Direct dispatch while the dispatcher is idle; under load, queue for the workers.

        Under load many callers running handlers inline fight over the GIL; handing the
        work to the (already awake) workers costs no wake-up and keeps callers light."""
        assert self._dispatcher is not None
        if self._dispatcher.busy:
            self.put(_Sent(message))
        else:
            self.put_inline(message)

    def put_inline(self, message: Any) -> None:
        """Queue `message`; if the actor was idle, run its turn on this thread now.

        This is direct dispatch: the turn (the right to handle this actor's
        messages) is taken exactly as a worker takes it, so messages are still
        handled one at a time and in order, but an idle actor costs no thread
        wake-up. Never waits: a busy actor's turn belongs to whoever has it.
        """
        if self._enqueue(_Sent(message)):
            self.run_turn()

    def put_deferred(self, message: Any) -> bool:
        """Queue `message` without handling anything. True if the caller took the
        turn and must call `run_turn` (once it holds no lock a handler might need)."""
        return self._enqueue(_Sent(message))

    def run_turn(self) -> None:
        """Run a turn this thread took: inline, or on the dispatcher when nested too deep."""
        actor = self._actor
        assert actor is not None and self._scheduled
        depth = getattr(_inline, "depth", 0)
        if depth >= INLINE_DEPTH_MAX:
            assert self._dispatcher is not None
            self._dispatcher.schedule(actor)
            return
        _inline.depth = depth + 1
        try:
            actor._run_slice()
        finally:
            _inline.depth = depth

    def try_take_turn(self) -> bool:
        """Take the turn if the actor is idle with an empty mailbox. Never waits."""
        self._lock.acquire()  # not `with`: see `_enqueue`
        try:
            if self._scheduled or self._messages:
                return False
            self._scheduled = True
            return True
        finally:
            self._lock.release()

    def drain_only(self, kind: type, handle: Callable[[Any], Any] | None = None) -> None:
        """Holder of the turn only: handle the queued messages of type `kind` now, in order,
        leaving every other message queued in its order (for a holder that may not run
        the other handlers where it stands). `handle`: called with each message instead of
        the actor's handler (for a holder keeping the account's state itself)."""
        assert self._scheduled and self._actor is not None
        queued = self._messages
        if not queued:
            return
        kept: deque[Envelope] = deque()
        for _ in range(len(queued)):  # senders may append meanwhile; those stay behind
            envelope = queued.popleft()
            if type(envelope.message) is kind:
                if handle is None:
                    self._actor._handle(envelope)
                else:
                    handle(envelope.message)
            else:
                kept.append(envelope)
        queued.extendleft(reversed(kept))

    def give_back_turn(self) -> None:
        """Give the turn back; what queued meanwhile is handled on the dispatcher."""
        self._lock.acquire()  # `finish_slice`, inline: once per account of every batch
        try:
            if not self._messages:
                self._scheduled = False
                return
        finally:
            self._lock.release()
        assert self._dispatcher is not None and self._actor is not None
        self._dispatcher.schedule(self._actor)

    def get(self) -> Envelope:
        assert self._messages, "get() of an empty inbox"
        return self._messages.popleft()

    def empty(self) -> bool:
        return not self._messages

    def __len__(self) -> int:
        return len(self._messages) if self._messages is not None else 0

    def finish_slice(self) -> bool:
        """After a slice: True if the actor must run again (more messages queued)."""
        self._lock.acquire()  # not `with`: see `_enqueue`
        try:
            if self._messages:
                return True
            self._scheduled = False
            return False
        finally:
            self._lock.release()


_PYKKA_MESSAGES = messages.__name__
"""The module of pykka's own messages (a stop, proxy calls), which pykka's actor handles."""


class PooledActor(pykka.ThreadingActor):
    """A pykka actor whose messages are handled one at a time by whichever thread holds
    its turn: a `Dispatcher` worker, or a sender using direct dispatch (`put_inline`)."""

    def __init__(self) -> None:
        super().__init__()
        inbox = self.actor_inbox  # its own stop flag (see `Inbox`)
        self.actor_stopped = self._actor_ref.actor_stopped = inbox  # type: ignore[assignment]

    @staticmethod
    def _create_actor_inbox() -> Inbox:  # type: ignore[override]
        return Inbox()

    @classmethod
    def spawn(cls, dispatcher: Dispatcher, *args: Any, **kwargs: Any) -> pykka.ActorRef[Any]:
        """Create the actor and make it ready to receive. An `on_start`, if the class
        defines one, runs first, on a worker, before any message."""
        actor = cls(*args, **kwargs)
        inbox = actor.actor_inbox
        assert isinstance(inbox, Inbox)
        inbox.bind(actor, dispatcher)
        if type(actor).on_start is not pykka.Actor.on_start:  # only actors that have one
            inbox.put(_Sent(_Start()))
        return actor.actor_ref

    def _start_actor_loop(self) -> None:
        raise AssertionError("pooled actors are started with spawn(), never start()")

    def _stop(self) -> None:
        """Stop without touching pykka's global registry (these actors are not in it)."""
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:  # an actor's loop must survive its own hooks
            logger.exception("on_stop failed in %s", self)

    def _run_slice(self) -> None:
        """Handle up to `SLICE_MESSAGES_MAX` messages; the caller holds the turn."""
        inbox = self.actor_inbox
        assert isinstance(inbox, Inbox)
        queued = inbox._messages
        handle = self._handle
        stopped = self.actor_stopped.is_set
        for _ in range(SLICE_MESSAGES_MAX):
            if not queued:
                break
            handle(queued.popleft())
            if stopped():
                self._actor_loop_teardown()
                inbox.finish_slice()
                return
        if inbox.finish_slice():
            assert inbox._dispatcher is not None
            inbox._dispatcher.schedule(self)

    def _handle(self, envelope: Envelope) -> None:
        message = envelope.message
        try:
            kind = type(message)
            if kind is _Start:
                self.on_start()
                return
            if kind.__module__ == _PYKKA_MESSAGES:
                response = self._handle_receive(message)
            else:
                response = self.on_receive(message)
            if envelope.reply_to is not None:
                envelope.reply_to.set(response)
        except Exception:  # the actor loop: report to the asker, or log and carry on
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception()
            else:
                logger.exception("unhandled error in %s while handling %r", self, message)
                self.on_failure(*sys.exc_info())


class _Start:
    """First message of every pooled actor: runs `on_start` on a worker."""


__all__ = ["ActorDeadError", "Dispatcher", "PooledActor", "messages"]
