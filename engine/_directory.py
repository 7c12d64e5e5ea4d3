"""Activation and passivation of account actors, and the turns of accounts that have none.

An account's actor is live while something uses it (it is pinned) and stays
live, idle, until more than `live_max` actors are live; then idle ones not used
lately are passivated (second chance, or CLOCK: an approximation of least
recently used where a use sets a flag instead of moving an entry in an ordered
list). A passivated account loses nothing: its state is
the sequencer's journal-order projection, which outlives every actor, and a new
actor is activated from it on the next use. While pinned, an account has
exactly one live actor; pins are held from before a transfer's first message
until its decision has queued the entries, so no decision is ever taken by an
actor being passivated. A passivated actor still handles the entries already in
its mailbox before it stops (the stop is queued behind them), and those entries
are already part of the projection the next actor starts from.

A batch or a combiner needs an account's turn, not its actor: an account with no live
actor lends its turn as a `_Dormant`, which runs the same handlers on the projection's
values, so touching a million accounts once makes no actor at all. Something that pins
the account meanwhile wakes its actor with that turn still held; the holder hands its
state over when it gives the turn back. A dormant turn given back is kept to be lent
again (`DORMANT_SPARES_MAX`): a batch takes ~1.9 a transfer, and made afresh each time they
were most of what a batch left alive for the collector's young collections to walk and promote.

Threads: any. One lock guards the live table, the dormant turns held and those kept; it is
held for dictionary work only, never while waiting.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from typing import Any, cast

import pykka
from coordinator import DebitStep, LedgerTimeout, Posting, Sequencer, TurnAccount

from engine._account import SNAPSHOT, AccountActor, AccountBooks
from engine._runtime import Dispatcher, Inbox


class AccountHandle:
    """The coordinator's `Participant` for one live (pinned) account actor, and the
    directory's record of that actor (its pins, and its second-chance mark).

    `reserve` uses direct dispatch: if the account is idle its turn runs on the
    calling thread, else the message waits in its mailbox for whoever holds the
    turn. `post` only queues (it is called under the sequencer lock, where no
    handler may run); `run` then runs the turn it took, if it took one. A pinned
    actor is never stopped, so no liveness check is needed on this path.

    One object, with no bound methods: with 10,000 live accounts every object per
    account is 10,000 more for each full garbage collection to walk.
    """

    __slots__ = ("_ref", "_inbox", "pins", "used")

    def __init__(self, ref: pykka.ActorRef[Any]) -> None:
        self._ref = ref
        self._inbox: Inbox = ref.actor_inbox  # type: ignore[assignment]
        self.pins = 0
        """Users that need it live: never passivated while above 0 (written under the directory's lock)."""
        self.used = True
        """Pinned since passivation last passed it over (see `Directory._passivate_idle`)."""

    def reserve(self, step: DebitStep) -> None:
        self._inbox.put_adaptive(step)

    def post(self, posting: Posting) -> bool:
        return self._inbox.put_deferred(posting)

    def run(self) -> None:
        self._inbox.run_turn()

    def snapshot(self, timeout_s: float) -> tuple[int, int, int, int]:
        """(posted, pending, incoming, LSN of the last change), asked through the mailbox;
        `LedgerTimeout` after `timeout_s`."""
        try:
            return cast(tuple[int, int, int, int], self._ref.ask(SNAPSHOT, timeout=timeout_s))
        except pykka.Timeout as error:
            raise LedgerTimeout(f"account actor did not answer within {timeout_s} s") from error


class _Turns(dict[str, "AccountActor | _Dormant"]):
    """What `take_turns` took: the actors by account id, and their handles, which `give_back_turns`
    gives back without looking each up in the live table again."""

    __slots__ = ("handles",)

    def __init__(self) -> None:
        super().__init__()
        self.handles: list[AccountHandle | _Dormant] = []


class _Dormant(AccountBooks):
    """The turn of an account that has no live actor, taken by `take_turns`: its handlers run
    on the projection's values, and no actor is made for what may be its only use (a batch
    touching a million accounts once). If something pins the account meanwhile, its actor
    is made with its turn held here (`woken`); messages sent to it wait in its mailbox, and
    the holder applies the postings among them (`catch_up`). Giving the turn back hands
    the state to that actor, then its turn."""

    __slots__ = ("woken",)

    woken: AccountHandle | None
    """The account's actor, if one was made while this turn is held (`Directory._pin`)."""

    def catch_up(self) -> None:
        """Apply the postings queued for the actor woken meanwhile, if there is one."""
        if self.woken is not None:
            self.woken._inbox.drain_only(Posting, self._post)


_new = object.__new__
"""Makes a `_Dormant`, when no spare one is kept, without calling a constructor
(`Directory.take_turns` opens its books)."""

DORMANT_SPARES_MAX = 4_096
"""Most dormant turns given back that a directory keeps to lend again (`Directory._spare`):
about the accounts of two batches of 1,000. A batch takes ~1.9 a transfer; made afresh,
each lived through the batch's chunks, so the young collections that ran meanwhile walked
them and passed them on to older generations, and each was later freed out of those. Kept,
`transfer_many` makes a third fewer young collections and a quarter fewer full ones (in
`bench/bench_load.py`'s rounds) and ~3% fewer instructions a transfer
(`bench/bench_instructions.py`); they are old objects, which a young collection never
walks, and a full collection walks these few thousand (~1 ms: 5.9 -> 7.1 ms for a heap
of 100,000 objects)."""

_UNSET = -1
"""A dormant turn's `held_lsn` until `Directory.take_turns` sets it, after its loop."""


class Directory:
    """Implements `coordinator.Participants` over pooled account actors."""

    def __init__(self, sequencer: Sequencer, dispatcher: Dispatcher, live_max: int) -> None:
        assert live_max >= 1
        self._sequencer = sequencer
        self._dispatcher = dispatcher
        self._live: dict[str, AccountHandle] = {}
        """Live actors, in the order passivation visits them: activated or spared last, last."""
        self._dormant: dict[str, _Dormant] = {}
        """The turns taken of accounts that had no live actor (`_Dormant`), by account id."""
        self._spare: list[_Dormant] = []
        """Dormant turns given back, not held by anyone, to lend again (`DORMANT_SPARES_MAX`)."""
        self._lock = threading.Lock()
        self.live_max = live_max
        self.activations = 0
        self.passivations = 0
        self._stopped = False

    def pin(self, account_id: str) -> AccountHandle:
        """The account's live actor, activated if need be, kept live until `unpin`."""
        with self._lock:
            return self._pin(account_id)

    def take_turns(self, account_ids: Iterable[str], all_or_none: bool = False,
                   into: Mapping[str, TurnAccount] | None = None) -> Mapping[str, TurnAccount] | None:
        """Pin each live account and take its turn if it is idle; busy ones are left unpinned
        (with `all_or_none`, one busy account gives everything back: None). An account with
        no live actor lends its turn without one (`_Dormant`). Repeated and unknown ids are
        skipped. One lock for the lot (taking a turn never waits, so none is held while
        waiting). The holder gets the actors (or dormant turns) themselves: it runs their
        handlers in their turn. With `into` (what an earlier call returned), the turns
        taken are added to it, and it is returned."""
        if into is None:
            turns = _Turns()
        else:
            assert type(into) is _Turns and not all_or_none, type(into)
            turns = into
        sequencer = self._sequencer
        live, accounts, states, held, incoming = (self._live, sequencer.accounts, sequencer.states, sequencer.held,
                                                  sequencer.incoming)
        dormants, spare = self._dormant, self._spare
        first = len(turns.handles)
        dozed: list[_Dormant] = []
        with self._lock:
            try:
                for account_id in account_ids:
                    if account_id in turns:
                        continue
                    entry = live.get(account_id)
                    if entry is None:  # not live: take its turn without an actor, if it exists
                        if account_id not in accounts:
                            continue
                        if account_id not in dormants:
                            # A `_Dormant` (a spare one given back before, else one made without the
                            # frame of a constructor), its books opened from the projection's values,
                            # nothing reserved (reservations are made in the mailbox, which waits for
                            # the turn): for each account of every batch that has no live actor. Its
                            # `held_lsn` is set below (`_UNSET` until then).
                            dormant = spare.pop() if spare else _new(_Dormant)
                            dormant._open_books(accounts[account_id], states[account_id], held.get(account_id, 0),
                                                incoming.get(account_id, 0), _UNSET)
                            dormant.woken = None
                            dormants[account_id] = turns[account_id] = dormant
                            turns.handles.append(dormant)
                            dozed.append(dormant)
                            continue
                        if all_or_none:  # its turn is taken elsewhere
                            self._release(turns)
                            return None
                        continue
                    else:  # `_pin`, inline: once per account of every batch
                        entry.used = True
                        entry.pins += 1
                    inbox = entry._inbox
                    if inbox.try_take_turn():
                        turns[account_id] = inbox._actor  # type: ignore[assignment]
                        turns.handles.append(entry)
                        continue
                    entry.pins -= 1
                    if all_or_none:
                        self._release(turns)
                        return None
                if dozed:  # each starts at the journal's last LSN, read once, after all their holds were read:
                    last_lsn = sequencer.last_lsn  # a bound above the record behind them (`AccountBooks.held_lsn`)
                    for dormant in dozed:
                        dormant.held_lsn = last_lsn
            except BaseException:  # e.g. an actor that could not be activated: give back what this call took
                self._release(turns, first)
                raise
        return turns

    def give_back_turns(self, turns: Mapping[str, TurnAccount]) -> None:
        """Give back the turns `take_turns` took (pass what it returned) and unpin the accounts;
        called again after an interrupt, the ones not given back yet."""
        assert type(turns) is _Turns, type(turns)
        with self._lock:
            self._release(turns)

    def _release(self, turns: _Turns, first: int = 0) -> None:
        """`give_back_turns` (from the `first` turn taken on: those are dropped from `turns`),
        called with `_lock` held. The turns given back leave `turns.handles` (at the end, or
        where an interrupt stops it), so a call again gives back only the others. Once every
        turn is given back, `turns` is emptied: a dormant turn in it may be lent to another
        account by then, and a read of it must fail, not find that account's books."""
        handles, dormants, spare = turns.handles, self._dormant, self._spare
        given = first
        try:
            for entry in handles[first:]:
                given += 1  # before, not after: an interrupt may keep this turn, never give it back twice
                if isinstance(entry, _Dormant):
                    del dormants[entry.account.id]
                    # Without an actor made meanwhile, the projection holds what it did, and an
                    # actor made later starts from it. No one holds the turn now: it is lent
                    # again (`take_turns` opens its books afresh).
                    if entry.woken is not None:
                        self._wake(entry)
                    elif len(spare) < DORMANT_SPARES_MAX:
                        spare.append(entry)
                    continue
                entry._inbox.give_back_turn()
                entry.pins -= 1
                assert entry.pins >= 0, entry
        finally:
            del handles[first:given]
        if first:
            for account_id in list(turns)[first:]:
                del turns[account_id]
        elif not handles:
            turns.clear()

    def _wake(self, dormant: _Dormant) -> None:
        """Give back a dormant turn whose actor was made meanwhile (`_lock` held, `_release`):
        hand its state to that actor, then the actor's turn (what waits in its mailbox runs on
        the dispatcher)."""
        woken = dormant.woken
        assert woken is not None
        actor: AccountActor = woken._inbox._actor  # type: ignore[assignment]
        assert actor.reserved == 0, actor.reserved
        # A `take_turns` that two interrupts cut short (one in its loop, one as it gave back
        # what it took) leaves its dormant turns' `held_lsn` unset, which it sets after the
        # loop: the journal's last LSN now is a bound above their holds too (read after them).
        held_lsn = dormant.held_lsn if dormant.held_lsn != _UNSET else self._sequencer.last_lsn
        actor.state, actor.held, actor.incoming, actor.held_lsn = (dormant.state, dormant.held, dormant.incoming,
                                                                   held_lsn)
        woken._inbox.give_back_turn()
        woken.pins -= 1

    def _pin(self, account_id: str) -> AccountHandle:
        """`pin`, called with `_lock` held. An account whose dormant turn is held gets its
        actor now, with that turn (see `_Dormant`)."""
        live = self._live.get(account_id)
        if live is None:
            sequencer = self._sequencer
            live = AccountHandle(AccountActor.spawn(self._dispatcher, sequencer.accounts[account_id],
                                                    sequencer.states[account_id], sequencer.held.get(account_id, 0),
                                                    sequencer.incoming.get(account_id, 0), sequencer.last_lsn))
            self._live[account_id] = live
            self.activations += 1
            live.pins += 1  # pinned before anything is passivated: never itself
            dormant = self._dormant.get(account_id)
            if dormant is not None:  # its turn is held without it: the holder holds the actor's
                taken = live._inbox.try_take_turn()
                assert taken, account_id
                dormant.woken = live
                live.pins += 1  # the holder's, until it gives the turn back
            if len(self._live) > self.live_max and not self._stopped:
                self._passivate_idle()
            return live
        live.used = True
        live.pins += 1
        return live

    def unpin(self, account_id: str) -> None:
        with self._lock:
            live = self._live[account_id]
            live.pins -= 1
            assert live.pins >= 0, account_id

    def _passivate_idle(self) -> None:
        """Passivate idle actors until at most `live_max` are live, by second chance: visit
        them oldest first; one used since the last visit is spared (its mark cleared, and
        moved behind the others), one not used since is passivated. Two rounds at most:
        the first clears every mark it passes. Pinned actors are never touched."""
        live = self._live
        excess = len(live) - self.live_max
        idle: list[str] = []
        for _ in range(2):
            spared: list[str] = []
            for key, entry in live.items():
                if entry.pins:
                    continue
                if entry.used:
                    entry.used = False
                    spared.append(key)
                    continue
                idle.append(key)
                if len(idle) == excess:
                    break
            for key in spared:
                live[key] = live.pop(key)
            for key in idle:
                live.pop(key)._ref.stop(block=False)  # behind any queued entries
                self.passivations += 1
            excess -= len(idle)
            if excess <= 0:
                return
            idle = []

    @property
    def live(self) -> int:
        return len(self._live)

    def stop(self) -> None:
        """Passivate nothing from now on: the ledger is closing. Calls still under way keep
        their actors (pins and turns work as before; what they journal meets the closed
        journal), and the actors go with the ledger. No actor is told to stop, so no message
        sent by a straggler meets a dead one."""
        with self._lock:
            self._stopped = True
