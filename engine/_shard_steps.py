"""The cross-shard steps a shard takes on its ledger: `ShardSteps`, the base class of the shard
actor `engine._shard.Shard`, and the rows the router sends it for them.

Its neighbours: `engine._shard` (`Shard`: opening the shard's ledger, its mark, the users' own
calls, closing), `engine._in_flight` (`InFlight`: a user's post or void kept apart from a
prepare of the same id), `engine._crossing` (the router, which runs the steps and builds their
rows with `prepare_row` and `credit_row`), `engine._placement` (the steps' ids and the
protocol's accounts), `engine._wire` (rows in and out, one msgpack blob a list). Every step is
idempotent, as every method of the actor is (`engine._shard` says why).

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
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import msgpack

from coordinator import (
    AMOUNT_MAX,
    REJECTIONS,
    IdempotencyConflict,
    InsufficientFunds,
    LedgerError,
    LedgerTimeout,
    Resolution,
    Transfer,
    TransferRequest,
)
from engine._in_flight import InFlight
from engine._placement import (
    DESTINATION_KEY,
    METADATA_DIGEST_KEY,
    SEPARATOR,
    CrossShardAborted,
    clearing_from,
    clearing_to,
    credit_id,
    fence,
    peer_of,
)
from engine._wire import Row, outcome_rows, pack, plain_metadata, request_of, unpack_rows

if TYPE_CHECKING:
    from engine._ledger import Ledger

logger = logging.getLogger("tally.sharded")
IN_DOUBT_PAGE = 1_000
NET_AT = AMOUNT_MAX // 4
"""A clearing account's balance (either way) past which its pair is netted (see the module docstring)."""


def prepare_row(request: TransferRequest, peer: int, currency: str | None = None) -> Row:
    """The first step of cross-shard transfer `request`, on its source's shard (`Shard.batch`);
    `peer` is the destination's shard. It carries the user's id, source, amount, code and
    reference, and as metadata the protocol's, never the user's (which the credit carries):
    the destination under `DESTINATION_KEY` and, if the user gave metadata, its
    `metadata_digest` under `METADATA_DIGEST_KEY`. The ledger compares every field of a retry
    with the pending transfer it keeps, so a retry of `T` that differs in any field, the
    destination and the metadata included, is refused there, before anything moves. (None
    first: no request row starts so.)

    `currency`: the destination's, where the router knows it ("" for a destination no shard
    has). The prepare goes to `clearing_to(peer, currency)`, so the source's ledger refuses a
    transfer to another currency (`CurrencyMismatch`, the clearing account made in it) or to no
    account (`AccountNotFound`) at the prepare, journaled, holding nothing, before it looks at
    the funds, as a `Ledger` refuses it; a later transfer of the source meets no hold of it.
    None: toward the clearing account in the source's currency (the credit refuses it then)."""
    protocol: dict[str, str | int] = {DESTINATION_KEY: request.destination}
    if request.metadata:
        protocol[METADATA_DIGEST_KEY] = metadata_digest(request.metadata)
    row = (None, request.id, request.source, peer, request.amount, request.code, request.reference, protocol)
    return row if currency is None else (*row, currency)


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


def _as_recorded(prepare: TransferRequest, peer: int, recorded: Transfer | TransferRequest) -> TransferRequest | None:
    """A prepare whose id conflicts, as `recorded` (the pending transfer its ledger keeps, or
    the request it refused, read back: `Ledger._refused_request`) was written, if it was written
    otherwise for the same transfer: toward another clearing account of the same peer (the
    source's currency, from a router that did not know the destination's or a release before
    `prepare_row` took it; none, refused while its source was unknown), or by the first release
    with the user's metadata (`_named_no_destination`), or both. Asked again so, its exact
    retry gets the recorded outcome (the ledger compares the other fields); None if neither
    applies (a retry that differs, or an id used by something else)."""
    held = peer_of(recorded.destination)
    if held is None or held[0] != peer:
        return None
    written = prepare
    if recorded.destination != prepare.destination:
        written = replace(written, destination=recorded.destination)
    if _named_no_destination(recorded.metadata, prepare):
        written = replace(written, metadata=recorded.metadata)
    return None if written is prepare else written


def _same_transfer(local: TransferRequest, prepare: TransferRequest) -> bool:
    """Whether the user's request `local` and the first step `prepare` of a cross-shard transfer
    (`prepare_row`) are one transfer of the user's, asked once each way: the router sends a
    transfer whose destination no shard has to the source's shard or as a first step, as the
    destination's id places it, and an exact retry after the destination was made (placed on
    the other shard) goes the other way. Every field the user gave is compared: the
    destination and a digest of the metadata, which the first step keeps as its own metadata.
    (A first step of the sharded ledger's first release kept the user's metadata there instead:
    one whose user gave keys spelled as these two, naming this destination and this digest,
    would pass for it.)"""
    protocol = prepare.metadata or {}
    digest = metadata_digest(local.metadata) if local.metadata else None
    return (peer_of(local.destination) is None and peer_of(prepare.destination) is not None and prepare.pending
            and not local.pending and local.timeout_s is None
            and (local.source, local.amount, local.code, local.reference) == (prepare.source, prepare.amount,
                                                                               prepare.code, prepare.reference)
            and protocol.get(DESTINATION_KEY) == local.destination and protocol.get(METADATA_DIGEST_KEY) == digest)


def _named_no_destination(metadata: Mapping[str, str | int] | None, prepare: TransferRequest) -> bool:
    """Whether `metadata`, a recorded prepare's, is that of a prepare of the sharded ledger's
    first release, which was the user's and named no destination, and `prepare` carries the
    digest of it: then its retry is checked as that release checked it (the user's metadata
    compared, the destination's shard but not the destination)."""
    if metadata is not None and DESTINATION_KEY in metadata:
        return False
    digest = None if metadata is None else metadata_digest(metadata)
    return (prepare.metadata or {}).get(METADATA_DIGEST_KEY) == digest

@dataclass(frozen=True, slots=True)
class Doubt:
    """A prepare still pending on shard `source_shard`: recovery resolves it."""

    id: str
    source_shard: int
    peer: int
    currency: str
    amount: int


class ShardSteps:
    """The steps of the cross-shard protocol on a shard's ledger (see the module docstring);
    `Shard` holds what they read."""

    index: int
    _made: set[str]
    _netting: threading.Lock
    _in_flight: InFlight

    if TYPE_CHECKING:
        @property
        def ledger(self) -> Ledger: ...

    def batch(self, blob: bytes) -> bytes:
        """The shard's part of a `transfer_many` (request rows and prepare rows, `engine._wire`),
        in list order, each prepare made a pending transfer to its clearing account (created
        first if new). Rows in, outcome rows out, each list one blob (`engine._wire.pack`);
        durable when it returns. A local transfer whose id is a cross-shard transfer's prepare
        here gets that `IdempotencyConflict` `restated`, so it names no clearing account; a
        prepare whose id conflicts with a prepare of the same transfer recorded otherwise (kept
        or refused: `_as_recorded`) is asked again as recorded, so its exact retry gets the
        recorded outcome."""
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
            refused = self.ledger._refused_request(requests[i].id) if kept is None else None
            if rows[i][0] is not None:  # a local transfer
                used = kept if kept is not None else refused  # (a first step names a clearing account)
                if isinstance(refused, TransferRequest) and _same_transfer(requests[i], refused):
                    again[i] = refused  # refused as a first step, its destination on no shard then
                elif isinstance(used, (Transfer, TransferRequest)) and peer_of(used.destination) is not None:
                    outcomes[i] = restated(outcome, requests[i])
                continue
            recorded = kept if kept is not None else refused
            if isinstance(recorded, (Transfer, TransferRequest)):
                written = _as_recorded(requests[i], rows[i][3], recorded)
                if written is not None:
                    again[i] = written
                elif isinstance(refused, TransferRequest) and _same_transfer(refused, requests[i]):
                    again[i] = refused  # refused here as a local transfer, its destination on no shard then
        if again:  # each id's first outcome, asked as it was recorded (all at once)
            for i, outcome in zip(again, self.ledger.transfer_many(list(again.values())), strict=True):
                outcomes[i] = restated(outcome, requests[i]) if rows[i][0] is not None else outcome
        return outcomes

    def _prepared(self, row: Row) -> TransferRequest:
        _, transfer_id, source, peer, amount, code, reference, metadata, *toward = row
        currency = toward[0] if toward else self._currency(source)  # (`prepare_row`: the destination's)
        clearing = clearing_to(peer, currency if currency is not None else "")
        if currency:  # ("" or None: no account is made, none is there)
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
