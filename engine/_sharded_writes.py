"""The writes of a `ShardedLedger`: `ShardedWrites`, its base class (creating accounts, transfers,
posts and voids of pending transfers, linked chains), each sent to the shard it belongs on.

Its neighbours: `engine._sharded` (`ShardedLedger`: opening, the reads, recovery of in-doubt
transfers and its sweeper, closing; it holds the router these methods reach through `_live`),
`engine._crossing` (`Router`: where each account lives, and the steps of a transfer across
shards), `engine._placement` (the placement rule, the checks of users' ids). What differs from
a `Ledger`'s writes, the module docstring of `engine._sharded` says.

Blocking: every method waits on Ray replies, each wait bounded by `timeout_s` (`LedgerTimeout`:
the outcome is unknown, retry with the same id). Thread-safe: call them from any threads.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from coordinator import (
    Account,
    AccountExists,
    IdempotencyConflict,
    InvalidRequest,
    LedgerError,
    LinkedTransferFailed,
    PendingTransferNotFound,
    Resolution,
    Transfer,
    TransferRequest,
    check_chain,
    check_code,
    check_currency,
    check_metadata,
    check_overdraft_limit,
    check_resolution,
    items_of,
    resolution_request,
    transfer_request,
)
from engine._checks import checked_accounts
from engine._crossing import Router, checked_request, unknown_source
from engine._placement import CrossShardRefused, check_user_id, peer_of, prepare_not_pending, shard_of


class ShardedWrites:
    """The writes of `ShardedLedger` (see the module docstring); `ShardedLedger` holds the
    router they use."""

    if TYPE_CHECKING:
        def _live(self) -> Router: ...

    # --- accounts ------------------------------------------------------------------------

    def create_account(self, id: str, *, currency: str, overdraft_limit: int | None = 0, code: int = 0,
                       metadata: Mapping[str, str | int] | None = None, placement: str | None = None) -> Account:
        """`Ledger.create_account` on shard `shard_of(placement or id)`; idempotent
        for identical parameters. Raises `AccountExists` also if the id lives on another shard
        (made with another placement), and `InvalidRequest` for an id or a placement key with
        "\x1f" in it."""
        check_user_id(id, "account id")
        if placement is not None:
            check_user_id(placement, "placement")
        account = Account(id, check_currency(currency), check_overdraft_limit(overdraft_limit),
                          check_code(code), check_metadata(metadata))
        outcome = self.create_accounts([account], placements=[placement])[0]
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    def create_accounts(self, accounts: Sequence[Account], *,
                        placements: Sequence[str | None] | None = None) -> list[Account | LedgerError]:
        """`Ledger.create_accounts` across shards (one call per shard): one outcome per item,
        in order; `placements`, if given, one placement key (or None) per account."""
        router = self._live()
        checked = checked_accounts(accounts)
        if placements is not None and (not isinstance(placements, Sequence) or isinstance(placements, (str, bytes))):
            raise InvalidRequest(f"placements must be a sequence of keys (or None), got {type(placements).__name__}")
        keys = items_of(placements, "placements") if placements is not None else [None] * len(checked)
        if len(keys) != len(checked):
            raise InvalidRequest("placements must give one key (or None) per account")
        results: list[Account | LedgerError] = list(checked)
        for i, (account, key) in enumerate(zip(checked, keys, strict=True)):
            try:
                if isinstance(account, Account):
                    check_user_id(account.id, "account id")
                    if key is not None:
                        check_user_id(key, "placement")
            except LedgerError as error:
                results[i] = error
        with router.creating:  # one id is never created on two shards (nor placed twice by one list)
            router.locate([account.id for account in results if isinstance(account, Account)])  # fills `where`
            placed: dict[str, int] = {}  # the shard of each id earlier in this list
            parts: dict[int, list[tuple[int, Account]]] = {}
            for i, (account, key) in enumerate(zip(results, keys, strict=True)):
                if not isinstance(account, Account):
                    continue
                shard = shard_of(key if key is not None else account.id, router.shards)
                home = router.where.get(account.id, placed.get(account.id))
                if home is not None and home != shard:
                    results[i] = AccountExists(f"account {account.id!r} exists (or comes earlier in this list) on "
                                               f"shard {home}, not on shard {shard} where this placement puts it")
                    continue
                placed[account.id] = shard
                parts.setdefault(shard, []).append((i, account))
            replies = router.on({s: ("create_accounts", [a for _, a in part]) for s, part in parts.items()})
            for shard, part in parts.items():
                for (i, account), outcome in zip(part, replies[shard], strict=True):
                    results[i] = outcome
                    if isinstance(outcome, Account):  # (its currency first: `Router.currencies`)
                        router.currencies[account.id] = outcome.currency
                        router.where[account.id] = shard
        return results  # type: ignore[return-value]
    # --- transfers -----------------------------------------------------------------------

    def transfer(self, id: str, *, source: str, destination: str, amount: int, code: int = 0,
                 reference: str | None = None, metadata: Mapping[str, str | int] | None = None,
                 pending: bool = False, timeout_s: int | None = None) -> Transfer:
        """`Ledger.transfer`; across shards, acknowledged once every step is durable (a
        pending one across shards raises `CrossShardRefused`). Raises as `Ledger.transfer`
        does, and `CrossShardAborted` for a transfer that recovery aborted."""
        request = transfer_request(id, source, destination, amount, code, reference, metadata, pending,
                                   timeout_s)
        outcome = self._live().transfer_many([request])[0]
        if isinstance(outcome, LedgerError):
            raise outcome
        return outcome

    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Transfer | LedgerError]:
        """One outcome per request, in request order, as `Ledger.transfer_many`, with one Ray
        call per shard per step (at most three rounds). Each shard applies its part in list
        order; a cross-shard credit lands after its shard's local transfers of the batch, and
        two concurrent batches interleave as their calls reach each shard. Returns once every
        outcome is durable."""
        if not isinstance(requests, Sequence) or isinstance(requests, (str, bytes)):
            raise InvalidRequest(f"transfer_many takes a sequence of TransferRequest, got {type(requests).__name__}")
        return self._live().transfer_many(items_of(requests, "transfer_many"))

    def post_pending(self, id: str, *, pending_id: str, amount: int | None = None,
                     reference: str | None = None, metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """`Ledger.post_pending`, on the shard of the pending transfer (every shard asked)."""
        checked = _plain(resolution_request(id, pending_id, amount, reference, metadata, False))
        shard = self._pending_shard(id, pending_id, "post")
        return self._live().call(shard, "post_pending", id, pending_id=pending_id,  # type: ignore[no-any-return]
                                 amount=checked.amount, reference=checked.reference, metadata=checked.metadata)

    def void_pending(self, id: str, *, pending_id: str, reference: str | None = None,
                     metadata: Mapping[str, str | int] | None = None) -> Transfer:
        """`Ledger.void_pending`, on the shard of the pending transfer (every shard asked)."""
        checked = _plain(resolution_request(id, pending_id, None, reference, metadata, True))
        shard = self._pending_shard(id, pending_id, "void")
        return self._live().call(shard, "void_pending", id, pending_id=pending_id,  # type: ignore[no-any-return]
                                 reference=checked.reference, metadata=checked.metadata)

    def _pending_shard(self, transfer_id: str, pending_id: str, kind: str) -> int:
        """The shard that decided `transfer_id` (a post or a `kind`) already, if one did (its
        ledger answers a retry with that first outcome, as a ledger does); else the shard
        holding pending transfer `pending_id`, which stays where it is made, so every try of the
        post goes there. One that no shard holds (durably) is `PendingTransferNotFound` here,
        nothing written: decided on a shard, the refusal could be decided again elsewhere by a
        retry once the pending transfer is made, the first try not durable yet (it timed out).
        A cross-shard transfer's own prepare is no user's pending transfer: the same. A pending
        id held on two shards (reused with sources on both) is `InvalidRequest`, nothing
        written: once seen on one it stays there, so no two tries go to two shards."""
        router = self._live()
        check_user_id(transfer_id, "transfer id")
        check_user_id(pending_id, "pending id")
        decided = router._found(transfer_id, "outcome")
        if decided is not None:
            first = decided[1]
            if isinstance(first, Transfer) and peer_of(first.destination) is not None:  # named as its user's
                raise IdempotencyConflict(f"transfer id {transfer_id!r} was already used for a transfer across shards "
                                          f"({first.amount} from {first.source!r}), not a post or a void")
            return decided[0]
        holding = router._answers(pending_id, "get_transfer")
        if not holding:
            raise PendingTransferNotFound(f"transfer {transfer_id!r} ({kind} of pending transfer {pending_id!r}) was "
                                          "refused: pending_transfer_not_found (not kept: a retry once it is made "
                                          "is decided afresh)")
        if len(holding) > 1:  # one try here, its retry there: each shard would decide it (nothing written)
            raise InvalidRequest(f"pending id {pending_id!r} names transfers on shards {sorted(holding)} (an id "
                                 f"reused with sources on other shards): a {kind} of it is refused, nothing written "
                                 "(a try of this id that timed out earlier may still be decided where it went: "
                                 "outcome() tells); use ids unique to the whole ledger")
        [(shard, held)] = holding.items()
        if peer_of(held.destination) is not None:
            raise prepare_not_pending(pending_id)
        return shard

    def transfer_linked(self, requests: Sequence[TransferRequest]) -> list[Transfer]:
        """`Ledger.transfer_linked` on the one shard every leg's accounts live on; legs on more
        than one shard raise `CrossShardRefused` (nothing written: colocate with `placement`).
        An account that no shard has does not count: the chain's shard refuses it, as a
        `Ledger` does (`LinkedTransferFailed`, its cause `AccountNotFound`); a chain none of
        whose accounts a shard has is refused so here, and not kept (`unknown_source`)."""
        router = self._live()
        checked = [checked_request(request) for request in check_chain(requests)]
        names = [name for r in checked for name in (r.source, r.destination)]
        # An account no shard has is refused AccountNotFound by the shard of the others; with
        # none known, nowhere (not kept, as a transfer whose source no shard has: see `unknown_source`).
        shards = {shard for shard in router.find(names).values() if shard is not None}
        if not shards:
            raise LinkedTransferFailed(f"linked transfer 0 of {len(checked)} ({checked[0].id!r}) was refused: "
                                       "account_not_found; none of the chain moved", 0, unknown_source(checked[0]))
        if len(shards) != 1:
            raise CrossShardRefused(f"the legs of this linked chain touch shards {sorted(shards)}: a linked chain "
                                    "runs within one shard (colocate its accounts with placement)")
        return router.call(shards.pop(), "transfer_linked", checked)  # type: ignore[no-any-return]


def _plain(request: Resolution) -> Resolution:
    """A post or void's fields checked as a ledger checks them (`InvalidRequest`), its metadata
    a plain dict: what any shard can take (a value of the caller's own type might not reach it)."""
    checked = check_resolution(request)
    if checked.metadata is None:
        return checked
    return Resolution(checked.id, checked.pending_id, checked.amount, checked.reference,
                      checked.metadata.as_dict(), checked.void)  # type: ignore[attr-defined]
