"""`InFlight`: which ids a shard is deciding as a cross-shard prepare, and which a user is
posting or voiding there, kept apart id by id.

The shard actor (`engine._shard`, `Shard`) holds one: a user's post or void
(`Shard.call`) takes `resolving`, a batch of prepares (`ShardSteps.batch`, in
`engine._shard_steps`) takes `preparing`. Every wait here is bounded by the timeout it is
given (`LedgerTimeout`, nothing written).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from coordinator import LedgerTimeout

UNSURE_KEPT = 1_024
"""Ids kept in flight for a ledger call that raised, past which those the ledger has an outcome for are dropped."""


class InFlight:
    """The ids of the prepares this shard is deciding, and of the pending transfers users are
    posting or voiding here, kept apart, id by id: a user's post or void never meets a prepare
    of its pending id still being decided (the ledger would post or void the protocol's hold
    of a transfer whose credit may land), and a prepare waits for a user's post or void of its
    id to end. A ledger call that raised `LedgerTimeout` may still be decided: the ids it was
    for stay in flight until the ledger has its outcome (a prepare's own; a post's or void's,
    by its id). Every wait is bounded (`LedgerTimeout`, nothing written). `outcome`: the
    ledger's, as each method is given it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._preparing: Counter[str] = Counter()
        self._resolving: set[str] = set()
        self._unsure_prepares: set[str] = set()
        """Prepares of ledger calls that raised, not known to be decided or not."""
        self._unsure_resolutions: dict[str, set[str]] = {}
        """Pending id -> the ids of users' posts or voids of it whose ledger call timed out."""

    @contextmanager
    def preparing(self, ids: Sequence[str], outcome: Callable[[str], object], timeout_s: float) -> Iterator[set[str]]:
        """Mark `ids` in flight while the block runs, once no user's post or void of one of them
        is under way, waiting at most `timeout_s`; yields those that one still is or may be,
        which the caller leaves out (their outcome: `LedgerTimeout`)."""
        with self._changed:
            self._changed.wait_for(lambda: self._resolving.isdisjoint(ids), timeout_s)
            busy = self._resolving.intersection(ids)
            busy.update(prepare_id for prepare_id in ids if not self._settled(prepare_id, outcome))
            taken = [prepare_id for prepare_id in ids if prepare_id not in busy]
            self._preparing.update(taken)
        ended = False
        try:
            yield busy
            ended = True
        finally:
            with self._changed:
                preparing = self._preparing
                for prepare_id in taken:
                    preparing[prepare_id] -= 1
                    if not preparing[prepare_id]:
                        del preparing[prepare_id]
                if ended:  # durable, each: decided again (a retry), an unsure one is sure now
                    self._unsure_prepares.difference_update(taken)
                else:
                    self._unsure_prepares.update(taken)
                    if len(self._unsure_prepares) + len(self._unsure_resolutions) > UNSURE_KEPT:
                        self._prune(outcome)
                self._changed.notify_all()

    @contextmanager
    def resolving(self, pending_id: str, resolution_id: str, outcome: Callable[[str], object],
                  timeout_s: float) -> Iterator[None]:
        """Mark a user's post or void (`resolution_id`) of `pending_id` under way while the block
        runs, once no prepare of that id is in flight or may be (at most `timeout_s`)."""
        with self._changed:
            if not self._changed.wait_for(
                    lambda: pending_id not in self._preparing and pending_id not in self._resolving, timeout_s):
                raise LedgerTimeout(f"a transfer with id {pending_id!r} was being decided here for over {timeout_s:g} s: "
                                    "nothing was written; retry")
            if pending_id in self._unsure_prepares:  # looked at after the wait: a batch that raised meanwhile put it there
                if outcome(pending_id) is None:
                    raise LedgerTimeout(f"a transfer across shards with id {pending_id!r} may still be decided here: "
                                        "nothing was written; retry")
                self._unsure_prepares.discard(pending_id)
            self._resolving.add(pending_id)
        timed_out = False
        try:
            yield
        except LedgerTimeout:
            timed_out = True
            raise
        finally:
            with self._changed:
                self._resolving.discard(pending_id)
                if timed_out:  # it may be decided yet: a prepare of its pending id waits for its outcome
                    self._unsure_resolutions.setdefault(pending_id, set()).add(resolution_id)
                self._changed.notify_all()

    def _settled(self, pending_id: str, outcome: Callable[[str], object]) -> bool:
        """Whether no user's post or void of `pending_id` that timed out may still be decided
        (dropping those the ledger has an outcome for). Called with `_changed` held."""
        unsure = self._unsure_resolutions.get(pending_id)
        if unsure is None:
            return True
        unsure.difference_update([resolution_id for resolution_id in unsure if outcome(resolution_id) is not None])
        if unsure:
            return False
        del self._unsure_resolutions[pending_id]
        return True

    def _prune(self, outcome: Callable[[str], object]) -> None:
        """Drop the unsure ids the ledger has an outcome for now. Called with `_changed` held."""
        self._unsure_prepares.difference_update(
            [prepare_id for prepare_id in self._unsure_prepares if outcome(prepare_id) is not None])
        for pending_id in list(self._unsure_resolutions):
            self._settled(pending_id, outcome)
