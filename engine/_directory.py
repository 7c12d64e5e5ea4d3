"""Activation and passivation of account actors.

An account's actor is live while something uses it (it is pinned) and stays
live, idle, until more than `live_max` actors are live; then the least recently
used idle ones are passivated. A passivated account loses nothing: its state is
the sequencer's journal-order projection, which outlives every actor, and a new
actor is activated from it on the next use. While pinned, an account has
exactly one live actor; pins are held from before a transfer's first message
until its decision has queued the entries, so no decision is ever taken by an
actor being passivated. A passivated actor still handles the entries already in
its mailbox before it stops (the stop is queued behind them), and those entries
are already part of the projection the next actor starts from.

Threads: any. One lock guards the live table; it is held for dictionary work
only, never while waiting.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any, cast

import pykka
from coordinator import DebitStep, LedgerTimeout, Posting, Sequencer

from engine._account import SNAPSHOT, AccountActor
from engine._runtime import Dispatcher, _Inbox


class AccountHandle:
    """The coordinator's `Participant` for one live (pinned) account actor.

    `reserve` uses direct dispatch: if the account is idle its turn runs on the
    calling thread, else the message waits in its mailbox for whoever holds the
    turn. `post` only queues (it is called under the sequencer lock, where no
    handler may run); `run` then runs the turn it took, if it took one. A pinned
    actor is never stopped, so no liveness check is needed on this path.

    It keeps two references and no bound methods: with 10,000 live accounts every
    object per account is 10,000 more for each full garbage collection to walk.
    """

    __slots__ = ("_ref", "_inbox")

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self._ref = ref
        self._inbox: _Inbox = ref.actor_inbox  # type: ignore[assignment]

    def reserve(self, step: DebitStep) -> None:
        self._inbox.put_adaptive(step)

    def post(self, posting: Posting) -> bool:
        return self._inbox.put_deferred(posting)

    def run(self) -> None:
        self._inbox.run_turn()

    def snapshot(self, timeout_s: float) -> tuple[int, int, int]:
        """(posted, pending, last LSN), asked through the mailbox; `LedgerTimeout` after `timeout_s`."""
        try:
            return cast(tuple[int, int, int], self._ref.ask(SNAPSHOT, timeout=timeout_s))
        except pykka.Timeout as error:
            raise LedgerTimeout(f"account actor did not answer within {timeout_s} s") from error


class _Live:
    __slots__ = ("ref", "handle", "inbox", "pins")

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self.ref = ref
        self.handle = AccountHandle(ref)
        self.inbox = self.handle._inbox
        self.pins = 0


class Directory:
    """Implements `coordinator.Participants` over pooled account actors."""

    def __init__(self, sequencer: Sequencer, dispatcher: Dispatcher, live_max: int) -> None:
        assert live_max >= 1
        self._sequencer = sequencer
        self._dispatcher = dispatcher
        self._live: OrderedDict[str, _Live] = OrderedDict()
        self._lock = threading.Lock()
        self.live_max = live_max
        self.activations = 0
        self.passivations = 0

    def pin(self, account_id: str) -> AccountHandle:
        """The account's live actor, activated if need be, kept live until `unpin`."""
        with self._lock:
            return self._pin(account_id)

    def hold_many(self, account_ids: Iterable[str]) -> Mapping[str, AccountActor]:
        """Pin each account and take its turn if it is idle; busy ones are left unpinned.
        One lock for the lot (taking a turn never waits, so none is held while waiting).
        The holder gets the actors themselves: it runs their handlers in their turn."""
        held: dict[str, AccountActor] = {}
        live = self._live
        with self._lock:
            try:
                for account_id in account_ids:
                    entry = live.get(account_id)
                    if entry is None:  # not live: activate it
                        self._pin(account_id)
                        entry = live[account_id]
                    else:  # `_pin`, inline: once per account of every batch
                        live.move_to_end(account_id)
                        entry.pins += 1
                    inbox = entry.inbox
                    if inbox.try_hold():
                        held[account_id] = inbox._actor  # type: ignore[assignment]
                    else:
                        entry.pins -= 1
            except BaseException:  # e.g. an actor that could not be activated: give back what was taken
                self._release(held)
                raise
        return held

    def release_many(self, account_ids: Iterable[str]) -> None:
        """Give back the turns of `hold_many` and unpin the accounts."""
        with self._lock:
            self._release(account_ids)

    def _release(self, account_ids: Iterable[str]) -> None:
        """`release_many`, called with `_lock` held."""
        live = self._live
        for account_id in account_ids:
            entry = live[account_id]
            entry.inbox.unhold()
            entry.pins -= 1
            assert entry.pins >= 0, account_id

    def _pin(self, account_id: str) -> AccountHandle:
        """`pin`, called with `_lock` held."""
        live = self._live.get(account_id)
        if live is None:
            account = self._sequencer.accounts[account_id]
            state = self._sequencer.states[account_id]
            live = _Live(AccountActor.spawn(self._dispatcher, account, state))
            self._live[account_id] = live
            self.activations += 1
            live.pins += 1  # pinned before anything is passivated: never itself
            if len(self._live) > self.live_max:
                self._passivate_idle()
            return live.handle
        self._live.move_to_end(account_id)
        live.pins += 1
        return live.handle

    def unpin(self, account_id: str) -> None:
        with self._lock:
            live = self._live[account_id]
            live.pins -= 1
            assert live.pins >= 0, account_id

    def _passivate_idle(self) -> None:
        excess = len(self._live) - self.live_max
        idle: list[str] = []
        for key, live in self._live.items():  # least recently used first
            if live.pins == 0:
                idle.append(key)
                if len(idle) == excess:
                    break
        for key in idle:
            self._live.pop(key).ref.tell(pykka.messages._ActorStop())  # behind any queued entries
            self.passivations += 1

    @property
    def live(self) -> int:
        return len(self._live)

    def stop_all(self) -> None:
        with self._lock:
            for live in self._live.values():
                live.ref.tell(pykka.messages._ActorStop())
            self._live.clear()
