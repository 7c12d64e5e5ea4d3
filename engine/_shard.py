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

Steps (the router in `engine._crossing` names them; `engine._placement` builds the ids):
- `batch`: the shard's part of a `transfer_many`, in list order: local transfers, and each
  cross-shard transfer's *prepare*, a pending transfer `T` from the source to
  `clearing_to(b, currency)` (never expiring: its hold must outlive any crash), whose metadata
  names the destination and digests the user's metadata (`prepare_row`).
- `credit`: on the destination's shard, `T\\x1fcredit` + a (`credit_id`) from `clearing_from(a, currency)`.
- `resolve`: `post_pending` `T\\x1fpost` or `void_pending` `T\\x1fvoid` of `T`.
- `fence`: recovery's presumed abort, made final: `T\\x1fcredit` from the empty `fence`
  account (overdraft limit 0), which the ledger refuses with `InsufficientFunds` and keeps as
  that id's final outcome, so a late credit with that id can never apply. A real credit is
  never refused for funds (its source has no limit), so that refusal names a fence.
- `in_doubt`: the prepares still pending, for recovery.

Netting: `clearing_to(b)` here only grows by what crosses toward b, and `clearing_from(b)` only
falls by what comes from b, so money that goes and comes back would in time overflow them (an
account holds at most `AMOUNT_MAX`) and block the pair of shards, where a `Ledger` moves it
freely. So once either passes `NET_AT` after a credit or a post, a local transfer moves what
they have in common from one to the other (`_net`): the shard's sum and the four clearing
accounts of a pair of shards (two here, two on b) keep their sums, which are zero once nothing
is in flight. What stays is the net flow between the two shards, which, as one account's
balance, may not pass `AMOUNT_MAX`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import msgpack

from coordinator import (
    AMOUNT_MAX,
    REJECTIONS,
    Account,
    AccountNotFound,
    Balance,
    IdempotencyConflict,
    InsufficientFunds,
    LedgerClosed,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    NotALedger,
    Resolution,
    Transfer,
    TransferRequest,
)
from engine._ledger import Ledger
from engine._placement import (
    DESTINATION_KEY,
    METADATA_DIGEST_KEY,
    SEPARATOR,
    SHARDS_MAX,
    CrossShardAborted,
    clearing_from,
    clearing_to,
    credit_id,
    fence,
    peer_of,
    prepare_not_pending,
    shard_mark,
)
from engine._wire import Row, outcome_rows, pack, plain_metadata, request_of, unpack_rows

logger = logging.getLogger("tally.sharded")
MARK_CURRENCY = "SHARD"
"""The currency of a shard's mark (`shard_mark`): an account no transfer ever names."""
IN_DOUBT_PAGE = 1_000
NET_AT = AMOUNT_MAX // 4
"""A clearing account's balance (either way) past which its pair is netted (see the module docstring)."""
CALLS = frozenset({"create_account", "account", "balance", "entries", "get_transfer", "outcome", "post_pending",
                   "void_pending", "transfer_linked", "transfers", "state_hash", "stats", "head", "expire_pending"})
"""The `Ledger` methods `call` runs."""


def prepare_row(request: TransferRequest, peer: int) -> Row:
    """The first step of cross-shard transfer `request`, on its source's shard (`Shard.batch`);
    `peer` is the destination's shard. It carries the user's id, source, amount, code and
    reference, and as metadata the protocol's, never the user's (which the credit carries):
    the destination under `DESTINATION_KEY` and, if the user gave metadata, its
    `metadata_digest` under `METADATA_DIGEST_KEY`. The ledger compares every field of a retry
    with the pending transfer it keeps, so a retry of `T` that differs in any field, the
    destination and the metadata included, is refused there, before anything moves. (None
    first: no request row starts so.)"""
    protocol: dict[str, str | int] = {DESTINATION_KEY: request.destination}
    if request.metadata:
        protocol[METADATA_DIGEST_KEY] = metadata_digest(request.metadata)
    return (None, request.id, request.source, peer, request.amount, request.code, request.reference, protocol)


def metadata_digest(metadata: Mapping[str, str | int]) -> str:
    """SHA-256, in hex, of the canonical encoding of `metadata`: msgpack of its (key, value)
    items sorted by key (as `state_hash` encodes an account's metadata), so equal mappings
    digest alike in any order, and a str value never digests as an int."""
    return hashlib.sha256(msgpack.packb(sorted(metadata.items()))).hexdigest()


def credit_row(request: TransferRequest, peer: int, currency: str) -> Row:
    """The second step of cross-shard transfer `request`, on its destination's shard
    (`Shard.credit`), with all the user's fields but the source (its metadata is the durable
    record of the user's); `peer` is the source's shard (the step's id is `credit_id(T, peer)`)."""
    return (request.id, peer, currency, request.destination, request.amount, request.code, request.reference,
            plain_metadata(request.metadata))


def restated(error: Transfer | LedgerError, request: TransferRequest) -> Transfer | LedgerError:
    """A prepare's refusal (or a local transfer's conflict with one), as its user's transfer would
    have been refused: the same class and code, a message naming the user's destination rather
    than the clearing account."""
    if isinstance(error, LedgerError) and type(error) in REJECTIONS.values():
        return type(error)(f"transfer {request.id!r} ({request.amount} from {request.source!r} to "
                           f"{request.destination!r}) was refused: {error.code}")
    if isinstance(error, IdempotencyConflict):
        return IdempotencyConflict(f"transfer id {request.id!r} was already used for a transfer that differs from "
                                   f"this one ({request.amount} from {request.source!r} to {request.destination!r})")
    return error


def _as_recorded(prepare: TransferRequest, peer: int, kept: Transfer | None) -> TransferRequest | None:
    """A prepare whose id conflicts, as the recorded one would have been written, if it was
    written otherwise for the same transfer: refused while its source was unknown (`kept`
    None: toward the clearing account of no currency), or by the first release
    (`_named_no_destination`: with the user's metadata). Asked again so, its exact retry gets
    the recorded outcome; None if neither applies."""
    if kept is None:
        return replace(prepare, destination=clearing_to(peer, ""))
    if peer_of(kept.destination) is not None and _named_no_destination(kept, prepare):
        return replace(prepare, metadata=kept.metadata)
    return None


def _named_no_destination(kept: Transfer, prepare: TransferRequest) -> bool:
    """Whether `kept` is a prepare of the sharded ledger's first release, whose metadata was
    the user's and named no destination, and `prepare` carries the digest of that metadata:
    then its retry is checked against `kept` as that release checked it (the user's metadata
    compared, the destination's shard but not the destination)."""
    if kept.metadata is not None and DESTINATION_KEY in kept.metadata:
        return False
    digest = None if kept.metadata is None else metadata_digest(kept.metadata)
    return (prepare.metadata or {}).get(METADATA_DIGEST_KEY) == digest


UNSURE_KEPT = 1_024
"""Ids kept in flight for a ledger call that raised, past which those the ledger has an outcome for are dropped."""


class _InFlight:
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


@dataclass(frozen=True, slots=True)
class Doubt:
    """A prepare still pending on shard `source_shard`: recovery resolves it."""

    id: str
    source_shard: int
    peer: int
    currency: str
    amount: int


_OPENED_AGAIN = (LedgerTimeout, LedgerLocked, LedgerUnavailable)
"""What a shard's open raises for a while only: it opens again at a later call (`Shard.ledger`)."""

REOPEN_AFTER_S = 0.5
"""Least time between two opens of a shard's ledger that failed for a while (each is a whole
open: a full disk would otherwise make every call one)."""


class Shard:
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
        self._in_flight = _InFlight()
        """Keeps a user's post or void of a pending id apart from a prepare of that id (`_InFlight`)."""
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
        flight here (`_InFlight`): of a pending transfer of theirs, as a ledger does; of a
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

    def find(self, account_ids: Sequence[str]) -> list[str]:
        """Those of `account_ids` that are accounts here (a shard that cannot say raises)."""
        found = []
        ledger = self.ledger
        for account_id in account_ids:
            try:
                ledger.account(account_id)
                found.append(account_id)
            except AccountNotFound:
                continue
        return found

    def create_accounts(self, accounts: Sequence[Account]) -> list[Account | LedgerError]:
        return self.ledger.create_accounts(accounts)

    def batch(self, blob: bytes) -> bytes:
        """The shard's part of a `transfer_many` (request rows and prepare rows, `engine._wire`),
        in list order, each prepare made a pending transfer to its clearing account (created
        first if new). Rows in, outcome rows out, each list one blob (`engine._wire.pack`);
        durable when it returns. A local transfer whose id is a cross-shard transfer's prepare
        here gets that `IdempotencyConflict` `restated`, so it names no clearing account; a
        prepare whose id was refused while its source was unknown (toward the clearing account
        of no currency) is compared with that refusal, so its exact retry gets it again."""
        rows = unpack_rows(blob)
        ledger = self.ledger
        with self._in_flight.preparing([row[1] for row in rows if row[0] is None], ledger.outcome,
                                       ledger.timeout_s / 2) as busy:
            if not busy:
                return pack(outcome_rows(self._batch(rows)))
            # A user's post or void of one of these ids is under way here: those wait for a retry.
            kept = [row for row in rows if row[0] is not None or row[1] not in busy]
            decided = iter(self._batch(kept))
            timed_out = LedgerTimeout("a post or a void of this transfer's id was under way on its source's shard: "
                                      "nothing was written; retry with the same id")
            return pack(outcome_rows([timed_out if row[0] is None and row[1] in busy else next(decided)
                                      for row in rows]))

    def _batch(self, rows: list[Row]) -> list[Transfer | LedgerError]:
        if not rows:
            return []
        requests = [self._prepared(row) if row[0] is None else request_of(row) for row in rows]
        outcomes = self.ledger.transfer_many(requests)
        again: dict[int, TransferRequest] = {}
        for i, outcome in enumerate(outcomes):
            if not isinstance(outcome, IdempotencyConflict):
                continue
            kept = self.ledger.get_transfer(requests[i].id)
            if rows[i][0] is not None:  # a local transfer
                if kept is not None and peer_of(kept.destination) is not None:
                    outcomes[i] = restated(outcome, requests[i])
                continue
            recorded = _as_recorded(requests[i], rows[i][3], kept)
            if recorded is not None:
                again[i] = recorded
        if again:  # each id's first outcome, asked as it was recorded (all at once)
            for i, outcome in zip(again, self.ledger.transfer_many(list(again.values())), strict=True):
                outcomes[i] = outcome
        return outcomes

    def _prepared(self, row: Row) -> TransferRequest:
        _, transfer_id, source, peer, amount, code, reference, metadata = row
        currency = self._currency(source)
        clearing = clearing_to(peer, currency if currency is not None else "")
        if currency is not None:
            self._internal(clearing, currency, None)
        # Without an expiry: a hold that expired after its credit landed would create money.
        return TransferRequest(transfer_id, source, clearing, amount, code, reference, metadata, pending=True)

    def credit(self, blob: bytes) -> bytes:
        """Each credit (`credit_row`), in list order: outcome rows, durable when it returns. A
        credit whose id a fence took gives `CrossShardAborted`."""
        requests, rows = [], unpack_rows(blob)
        for transfer_id, peer, currency, destination, amount, code, reference, metadata in rows:
            source = clearing_from(peer, currency)
            self._internal(source, currency, None)
            requests.append(TransferRequest(credit_id(transfer_id, peer), source, destination, amount, code, reference,
                                            metadata))
        results = self.ledger.transfer_many(requests)
        self._net({(peer, currency) for _, peer, currency, *_ in rows})
        for i, result in enumerate(results):
            if isinstance(result, IdempotencyConflict) and isinstance(self.ledger.outcome(requests[i].id),
                                                                      InsufficientFunds):
                results[i] = CrossShardAborted(f"transfer {rows[i][0]!r} was in doubt after a crash and was "
                                               "aborted by recovery: nothing moved")
        return pack(outcome_rows(results))

    def fence(self, doubts: Sequence[Doubt]) -> list[bool | LedgerError]:
        """For each in-doubt transfer toward this shard: make its credit's id final, and say
        whether the credit committed (True: post it) or not (False: void it); a `LedgerError`
        if neither is known yet (a timeout: try again)."""
        requests = []
        for doubt in doubts:
            destination = clearing_from(doubt.source_shard, doubt.currency)
            self._internal(destination, doubt.currency, None)
            self._internal(fence(doubt.currency), doubt.currency, 0)
            requests.append(TransferRequest(credit_id(doubt.id, doubt.source_shard), fence(doubt.currency), destination,
                                            doubt.amount))
        decided: list[bool | LedgerError] = []
        for request, result in zip(requests, self.ledger.transfer_many(requests), strict=True):
            if isinstance(result, InsufficientFunds):
                decided.append(False)  # fenced now, or by an earlier recovery
            elif isinstance(result, IdempotencyConflict):
                decided.append(self.ledger.get_transfer(request.id) is not None)  # committed, or refused
            else:
                assert not isinstance(result, Transfer), "the fence account has no funds"
                decided.append(result)
        return decided

    def resolve(self, steps: Sequence[tuple[str, str, bool]]) -> bytes:
        """Each `(step id, pending id, void)`: post (or void) the pending transfer, all in one
        batch of the ledger (`Ledger._decide_many`); outcome rows (a blob) in list order,
        durable when it returns."""
        resolutions = [Resolution(step_id, pending_id, None, void=void) for step_id, pending_id, void in steps]
        outcomes = self.ledger._decide_many(resolutions)
        self._net({peer for outcome in outcomes if isinstance(outcome, Transfer) and outcome.kind == "post"
                   and (peer := peer_of(outcome.destination)) is not None})
        return pack(outcome_rows(outcomes))

    def _net(self, peers: set[tuple[int, str]]) -> None:
        """Net each (peer shard, currency) pair of clearing accounts here whose balance either
        way is past `NET_AT`: move what they have in common from `clearing_to(peer)` to
        `clearing_from(peer)` (see the module docstring). Neither can pass the other meanwhile:
        the one only grows and the other only falls but by netting, which runs one at a time."""
        for peer, currency in sorted(peers):
            owed, owing = clearing_to(peer, currency), clearing_from(peer, currency)
            with self._netting:
                try:
                    sent, came = self.ledger.balance(owed).posted, -self.ledger.balance(owing).posted
                except LedgerError:  # one of them not made yet: nothing came back
                    continue
                if max(sent, came) < NET_AT or min(sent, came) <= 0:
                    continue
                netting = f"{SEPARATOR}net{SEPARATOR}{peer}{SEPARATOR}{currency}{SEPARATOR}{self.ledger.head().lsn}"
                try:
                    self.ledger.transfer(netting, source=owed, destination=owing, amount=min(sent, came))
                except LedgerError as error:  # (a timeout): the step it follows is durable; the next nets
                    logger.warning("shard %d: netting the clearing accounts of shard %d in %s failed: %r; the next "
                                   "credit or post from there tries again", self.index, peer, currency, error)

    def in_doubt(self, older_than_ns: int = 0) -> list[Doubt]:
        """The prepares here still pending (of those, with `older_than_ns`, the ones made at
        least that long ago by this node's wall clock). Reads only clearing accounts with
        pending amounts toward them, newest first, and stops once it has found all of each
        one's amount."""
        made_by = time.time_ns() - older_than_ns if older_than_ns else None
        doubts = []
        for account in self.ledger.accounts():
            peer = peer_of(account.id)
            incoming = self.ledger.balance(account.id).incoming if peer is not None else 0
            until: int | None = None
            while incoming > 0:
                page = self.ledger.transfers(account=account.id, kind="pending", until_lsn=until,
                                             limit=IN_DOUBT_PAGE, reverse=True)
                for transfer in page:
                    if transfer.status == "pending" and transfer.destination == account.id:
                        assert peer is not None
                        if made_by is None or transfer.timestamp <= made_by:
                            doubts.append(Doubt(transfer.id, self.index, peer[0], peer[1], transfer.amount))
                        incoming -= transfer.amount
                if not page or page[-1].lsn <= 1:
                    break
                until = page[-1].lsn - 1
        return doubts

    def close(self) -> None:
        with self._opening:  # after an open under way; none after it
            opened, self._opened = self._opened, LedgerClosed("the shard closed")
        if isinstance(opened, Ledger):
            opened.close()

    def _currency(self, account_id: str) -> str | None:
        try:
            return self.ledger.account(account_id).currency
        except LedgerError:
            return None

    def _internal(self, account_id: str, currency: str, overdraft_limit: int | None) -> None:
        """Create the protocol's account `account_id` unless known to exist (idempotent)."""
        if account_id not in self._made:
            self.ledger.create_account(account_id, currency=currency, overdraft_limit=overdraft_limit)
            self._made.add(account_id)


def _marked(ledger: Ledger, index: int) -> int | None:
    """The shard whose mark `ledger` holds (`index`'s looked for first), or None."""
    for shard in (index, *range(SHARDS_MAX)):
        try:
            ledger.account(shard_mark(shard))
        except AccountNotFound:
            continue
        return shard
    return None
