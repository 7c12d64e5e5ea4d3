"""`Shard`: one shard of a `ShardedLedger`, the body of its Ray actor.

It owns one ordinary `Ledger` (its directory on this node's disk) and runs the steps of the
cross-shard protocol on it; it never calls another shard (house style 9: an actor never waits
on another). Ray runs it as a threaded actor (`max_concurrency`), so calls run at once on
Ray's threads and meet in the thread-safe `Ledger`, whose group commit batches them; a call's
posts and voids are decided as one batch too (`Ledger._decide_many`).

Every method is idempotent, because Ray retries a call whose actor died (`max_task_retries`)
and restarts the actor (`max_restarts`), which reopens and recovers the ledger: a local
transfer and every step are keyed by a transfer id the ledger keeps once, and the protocol's
own accounts are created idempotently. Every method returns its business outcomes as values
(a `LedgerError` in place of a result), so Ray neither wraps nor retries them; `call` returns
`(True, value)` or `(False, error)`. Operating errors raise (`LedgerTimeout`, or what the
ledger's open raised: `failure` says it once, then every call raises it), and the router
unwraps them from Ray's exception (`engine._ray.gather`).

The cross-shard steps (`batch`, `credit`, `resolve`, `fence`, `in_doubt`) and their netting
are the actor's base class, `ShardSteps`, in `engine._shard_steps`; a user's post or void is
kept apart from a prepare of its id by `InFlight` (`engine._in_flight`). Ray exposes the base
class's methods as the actor's own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from coordinator import (
    Account,
    AccountNotFound,
    Balance,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    NotALedger,
    Transfer,
)
from engine._in_flight import InFlight
from engine._ledger import Ledger
from engine._placement import SEPARATOR, SHARDS_MAX, peer_of, prepare_not_pending, shard_mark
from engine._shard_steps import ShardSteps

logger = logging.getLogger("tally.sharded")
MARK_CURRENCY = "SHARD"
"""The currency of a shard's mark (`shard_mark`): an account no transfer ever names."""
CALLS = frozenset({"create_account", "account", "balance", "entries", "get_transfer", "outcome", "post_pending",
                   "void_pending", "transfer_linked", "transfers", "state_hash", "stats", "head", "expire_pending"})
"""The `Ledger` methods `call` runs."""


_OPENED_AGAIN = (LedgerTimeout, LedgerLocked, LedgerUnavailable)
"""What a shard's open raises for a while only: it opens again at a later call (`Shard.ledger`)."""

REOPEN_AFTER_S = 0.5
"""Least time between two opens of a shard's ledger that failed for a while (each is a whole
open: a full disk would otherwise make every call one)."""


class Shard(ShardSteps):
    """One shard's ledger and its steps. Ray constructs it in the actor's process (and again
    after a restart): opening recovers the ledger from its journal."""

    def __init__(self, path: str, index: int, options: Mapping[str, Any]) -> None:
        self.index = index
        self._path, self._options = path, options
        self._made: set[str] = set()
        """The protocol's accounts known to exist here (created at most once per process)."""
        self._netting = threading.Lock()
        """Held while a pair of clearing accounts is netted: one netting at a time reads their balances."""
        self._opening = threading.Lock()
        """Held while an open is tried again (`ledger`), and by `close`."""
        self._in_flight = InFlight()
        """Keeps a user's post or void of a pending id apart from a prepare of that id (`InFlight`)."""
        self._opened: Ledger | LedgerError = LedgerUnavailable("not opened yet")
        self._tried_at = 0.0
        """When the last open tried again by a call ended (`time.monotonic`): the next is tried
        `REOPEN_AFTER_S` after it. The first is tried at once (Ray restarted this process; the
        calls it retries come now, and the directory may be free by then)."""
        self._open()

    def _open(self, make: bool = False) -> None:
        """Open the shard's ledger (`make`: make it if missing, for `create` only: a ledger is
        made only by the open that makes the sharded ledger, never anew by a later one)."""
        path = self._path
        try:
            if not make and not (os.path.isdir(path) and any(os.scandir(path))):
                self._opened = NotALedger(
                    f"{path}: shard {self.index} of this sharded ledger is missing or empty, though its manifest "
                    "names it (restore it: opening would make it anew, empty)")
            else:
                ledger = Ledger.open(path, **self._options)
                try:
                    self._check_mark(ledger)
                except BaseException:
                    ledger.close()
                    raise
                self._opened = ledger
        except LedgerError as error:  # kept, so the router can raise it as itself (`failure`)
            self._opened = error
        except OSError as error:  # the directory cannot be read
            self._opened = LedgerUnavailable(f"{path}: shard {self.index}'s directory cannot be read: {error}")

    def _check_mark(self, ledger: Ledger) -> None:
        """Refuse (`NotALedger`) a ledger marked as another shard's (`shard_mark`); mark one
        with no mark as this shard's (made now, or before marks were)."""
        marked = _marked(ledger, self.index)
        if marked == self.index:
            return
        if marked is not None:
            raise NotALedger(f"{self._path} holds shard {marked}'s ledger, not shard {self.index}'s: shard directories "
                             "were swapped, or one restored into the wrong place (put each back where it was)")
        try:
            ledger.create_account(shard_mark(self.index), currency=MARK_CURRENCY)
        except (LedgerTimeout, LedgerUnavailable) as error:  # a full disk, say: it still opens (for reads); marked later
            logger.warning("%s: shard %d's mark could not be made (%s); a later open makes it", self._path, self.index,
                           error)

    @property
    def ledger(self) -> Ledger:
        """The shard's ledger; raises what its open raised if it did not open. An open that
        failed for a while only (`_OPENED_AGAIN`: a slow disk, the expiries it journals not
        durable in time; another process holding the directory as Ray restarted this one) is
        tried again at a later call (at once the first time, then `REOPEN_AFTER_S` after the
        last ended; calls that waited for one take its outcome): Ray restarts only a process
        that died, and this one did not."""
        opened = self._opened
        if isinstance(opened, _OPENED_AGAIN) and time.monotonic() - self._tried_at >= REOPEN_AFTER_S:
            with self._opening:
                if self._opened is opened:  # (else a call waited here while another tried: its outcome stands)
                    self._open()
                    self._tried_at = time.monotonic()
            opened = self._opened
        if isinstance(opened, LedgerError):
            raise opened
        return opened

    def failure(self) -> LedgerError | None:
        """What the shard's `Ledger.open` raised (`LedgerLocked`, `JournalCorrupted`...), or None.
        (Raised in `__init__`, it would only reach the router as Ray's message.)"""
        return self._opened if isinstance(self._opened, LedgerError) else None

    def create(self) -> LedgerError | None:
        """For the open that makes the sharded ledger (it has no manifest yet): make this
        shard's ledger if it is missing; `failure()`. One made already (by an open that
        crashed before the manifest) must be empty: else `NotALedger`, not taken over."""
        if isinstance(self._opened, LedgerClosed):
            return self._opened
        if not isinstance(self._opened, Ledger):
            self._open(make=True)
        elif self.accounts():
            return NotALedger(f"{self._path} holds a ledger with accounts, but its sharded ledger has no manifest: "
                              "not made by an open of this sharded ledger")
        return self.failure()

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        """The Ray node this actor runs on."""
        import ray

        return str(ray.get_runtime_context().get_node_id())

    def call(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[bool, Any]:
        """The `Ledger` method `name` (one of `CALLS`): `(True, result)` or `(False, error)`."""
        assert name in CALLS, name
        try:
            if name in ("post_pending", "void_pending"):
                return True, self._users_resolution(name, args, kwargs)
            return True, getattr(self.ledger, name)(*args, **kwargs)
        except LedgerError as error:
            return False, error

    def _users_resolution(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Transfer:
        """A user's `post_pending` or `void_pending`, decided with no prepare of its pending id in
        flight here (`InFlight`): of a pending transfer of theirs, as a ledger does; of a
        cross-shard transfer's prepare, `PendingTransferNotFound` (nothing written: the router
        refuses the same once it sees the prepare); of one not here, refused as not found, as a
        ledger refuses it, never posting or voiding a prepare that lands meanwhile."""
        ledger, pending_id = self.ledger, kwargs["pending_id"]
        with self._in_flight.resolving(pending_id, args[0], ledger.outcome, ledger.timeout_s):  # no prepare of it in flight
            kept = ledger.get_transfer(pending_id)
            if kept is not None and peer_of(kept.destination) is not None:
                raise prepare_not_pending(pending_id)
            return getattr(ledger, name)(*args, **kwargs)  # type: ignore[no-any-return]

    def accounts(self) -> list[Account]:
        """The users' accounts here, in creation order (the protocol's are left out)."""
        return [account for account in self.ledger.accounts() if not account.id.startswith(SEPARATOR)]

    def balances(self) -> dict[str, Balance]:
        """Every account's balance here, the protocol's included (not the shard's mark, which
        never moves)."""
        mark = shard_mark(self.index)
        return {account.id: self.ledger.balance(account.id) for account in self.ledger.accounts() if account.id != mark}

    def find(self, account_ids: Sequence[str]) -> dict[str, str]:
        """Those of `account_ids` that are accounts here, each with its currency (a shard that
        cannot say raises)."""
        found = {}
        ledger = self.ledger
        for account_id in account_ids:
            try:
                found[account_id] = ledger.account(account_id).currency
            except AccountNotFound:
                continue
        return found

    def decided(self, transfer_ids: Sequence[str]) -> list[str]:
        """Those of `transfer_ids` whose outcome this shard's ledger keeps (a shard that cannot
        say raises)."""
        outcome = self.ledger.outcome
        return [transfer_id for transfer_id in transfer_ids if outcome(transfer_id) is not None]

    def create_accounts(self, accounts: Sequence[Account]) -> list[Account | LedgerError]:
        return self.ledger.create_accounts(accounts)

    def close(self) -> None:
        with self._opening:  # after an open under way; none after it
            opened, self._opened = self._opened, LedgerClosed("the shard closed")
        if isinstance(opened, Ledger):
            opened.close()


def _marked(ledger: Ledger, index: int) -> int | None:
    """The shard whose mark `ledger` holds (`index`'s looked for first), or None."""
    for shard in (index, *range(SHARDS_MAX)):
        try:
            ledger.account(shard_mark(shard))
        except AccountNotFound:
            continue
        return shard
    return None
