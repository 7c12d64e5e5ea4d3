"""The router of a sharded ledger: where each account lives, and transfers across shards.

A cross-shard transfer `T` from `s` (on shard a) to `d` (on shard b) runs in three steps
(correspondent banking; `engine._shard_steps` runs each):

1. prepare, on a: the pending transfer `T`, `s` -> `clearing_to(b)`, with the user's amount,
   code and reference, and as metadata the destination `d` and a digest of the user's metadata
   under reserved keys (`engine._shard_steps.prepare_row`): the debit is decided and held, durably;
2. credit, on b: `T\\x1fcredit`, `clearing_from(a)` -> `d` (the clearing account has no limit),
   with the user's code, reference and metadata: the durable record of the user's metadata;
3. post, on a: `T\\x1fpost` posts `T`. The transfer is acknowledged once the post is durable,
   so every read of either side already shows it.

A destination no shard has, or in another currency, is refused by the prepare itself (toward
the clearing account in the destination's currency, or none: `prepare_row`), as a `Ledger`
refuses it, holding nothing. If the credit is refused (a balance that would overflow...), the
refusal is journaled on b, final for `T\\x1fcredit`, and `T\\x1fvoid` voids `T`: the caller
gets the credit's error.
Every step is idempotent by its id, so a retry of `T` from any caller runs the steps again and
gets the same outcome. One that differs in any field gets `IdempotencyConflict` from the
prepare, whose ledger compares every field with the pending transfer it keeps: the destination
and the metadata too, through the prepare's metadata, so also after a caller died between the
steps (restated with the user's names, `engine._shard_steps.restated`, also when the retry names an
account on the source's shard and so comes as a local transfer). Nothing changes, and the
credit is never sent.

What the user sees of `T` (`user_transfer`: `transfer_many`'s and `transfer`'s result,
`get_transfer`, `outcome`) is the prepare's id, source, amount, code, reference, LSN and
timestamp with the credit's destination and metadata: never the prepare's reserved keys.

A caller that dies between the steps leaves `T` pending on a: *in doubt*. `recover` (run by
every open, by the open ledger's sweeper for those `in_doubt_after_s` old, and by
`ShardedLedger.recover_in_doubt`) resolves each one by presumed abort, fenced:
it first makes `T\\x1fcredit` final on b with a refusal (`Shard.fence`), so a late credit can
never land, then voids `T`; if the fence finds the credit committed already, it posts `T`.

Batching: a `transfer_many` makes one Ray call per shard per round (at most three rounds:
local transfers and prepares, credits, posts and voids), never one per transfer. Order: each
shard applies its part in list order (its local transfers and its prepares interleaved as
listed); credits land after every local transfer of the same batch on their shard.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

from coordinator import (
    REJECTIONS,
    AccountNotFound,
    InsufficientFunds,
    InvalidRequest,
    LedgerError,
    LedgerLocked,
    LedgerTimeout,
    LedgerUnavailable,
    Transfer,
    TransferRequest,
    check_transfer,
    shown,
)
from engine._placement import (
    POST,
    SEPARATOR,
    USER_ID_LENGTH_MAX,
    VOID,
    CrossShardAborted,
    CrossShardRefused,
    check_user_id,
    credit_id,
    peer_of,
    shard_of,
)
from engine._ray import Sent, gather, sent
from engine._shard_steps import Doubt, credit_row, prepare_row, restated
from engine._wire import Row, outcomes_of, pack, request_row, unpack

Gather = Callable[[Sequence[Any], float], list[Any]]

UNDECIDED = (InvalidRequest, LedgerLocked, LedgerUnavailable)
"""What a step that raised it leaves undecided, once a transfer's first step may be durable
(`Router._in_flight`): a bad clock reading (`InvalidRequest`: the rows were checked), a shard's
directory still held by the process Ray replaced, or a shard that cannot write now."""


class Router:
    """Where accounts live, and the rounds of Ray calls that carry a batch. Thread-safe: the
    map of accounts only grows, and a dict's item assignment is atomic."""

    def __init__(self, actors: Sequence[Any], timeout_s: float, session: str) -> None:
        self.actors = list(actors)
        self.timeout_s = timeout_s
        self.session = session
        """The Ray the actors were started on (`engine._ray.ray_session`): every round and wait
        looks that this process is still on it (else `LedgerClosed`: `engine._ray.sent`)."""
        self.where: dict[str, int] = {}
        """Account id -> shard, for every account found so far."""
        self.currencies: dict[str, str] = {}
        """Account id -> currency (it never changes), for every account found so far: each is
        learned with its shard (listed at open, made here, or asked of the shards by `find`, as
        an account whose creation timed out after its shard made it), and set first."""
        self.creating = threading.Lock()
        """Held while an account is created, so one id is never made on two shards."""
        self.closed = False
        """Set by the ledger's close before it stops the actors: no call is sent after (`sent`)."""

    @property
    def shards(self) -> int:
        return len(self.actors)

    def everywhere(self, method: str, *args: Any, timeout_s: float | None = None) -> list[Any]:
        """`method(*args)` on every shard at once: the replies in shard order (waiting at most
        `timeout_s`, by default the ledger's)."""
        return gather(self._sent(lambda: [getattr(actor, method).remote(*args) for actor in self.actors]),
                      self.timeout_s if timeout_s is None else timeout_s, self.session)

    def on(self, calls: dict[int, tuple[str, Any]]) -> dict[int, Any]:
        """One call per shard named in `calls` (shard -> (method, argument)), all at once."""
        shards = list(calls)
        refs = self._sent(lambda: [getattr(self.actors[i], calls[i][0]).remote(calls[i][1]) for i in shards])
        return dict(zip(shards, gather(refs, self.timeout_s, self.session), strict=True))

    def _sent(self, submit: Callable[[], Sent]) -> Sent:
        """`submit()`, the `.remote()` calls of one round, unless this router's ledger closed
        meanwhile, or its Ray was shut down (`LedgerClosed`: `engine._ray.sent`)."""
        return sent(submit, lambda: self.closed, self.session, self.timeout_s)

    def fill(self) -> None:
        """The map of accounts, from every shard's list (one call each)."""
        for index, accounts in enumerate(self.everywhere("accounts")):
            for account in accounts:
                self.currencies[account.id] = account.currency
                self.where[account.id] = index

    def locate(self, account_ids: Sequence[str]) -> dict[str, int]:
        """The shard of each id (`find`); an id no shard has lives on its hash shard."""
        shards = self.shards
        return {a: shard_of(a, shards) if found is None else found for a, found in self.find(account_ids).items()}

    def find(self, account_ids: Sequence[str]) -> dict[str, int | None]:
        """The shard of each id, None for one no shard has: from the map; the misses asked of
        every shard at once (one call each), which learns their currencies too (`currencies`).
        One reading of the map for each id, so an account another thread makes meanwhile is
        either found where it is or not at all (a transfer from an unknown one is refused here,
        unkept: `unknown_source`; one to it, by its source's shard, as a ledger does)."""
        missing = sorted({a for a in account_ids if a not in self.where or a not in self.currencies})
        if missing:
            for index, found in enumerate(self.everywhere("find", missing)):
                for account_id, currency in found.items():
                    self.currencies[account_id] = currency
                    self.where[account_id] = index
        where = self.where
        return {a: where.get(a) for a in account_ids}

    # --- transfer_many ------------------------------------------------------------------

    def transfer_many(self, requests: Sequence[object]) -> list[Transfer | LedgerError]:
        """`ShardedLedger.transfer_many`: one outcome per request, in request order."""
        results: list[Transfer | LedgerError | None] = [None] * len(requests)
        checked: list[tuple[int, TransferRequest]] = []
        for i, request in enumerate(requests):
            try:
                checked.append((i, checked_request(request)))
            except LedgerError as error:
                results[i] = error
        found = self.find([name for _, r in checked for name in (r.source, r.destination)])
        where = {name: shard_of(name, self.shards) if shard is None else shard for name, shard in found.items()}
        parts: dict[int, list[tuple[int, Row]]] = defaultdict(list)
        crossing: dict[int, TransferRequest] = {}
        across: list[tuple[int, TransferRequest, int, int]] = []  # pending transfers on two shards
        for i, request in checked:
            if found[request.source] is None:
                results[i] = unknown_source(request)
                continue
            a, b = where[request.source], where[request.destination]
            if request.pending and a != b and found[request.destination] is None:
                b = a  # refused AccountNotFound by the source's shard
            if a == b:
                parts[a].append((i, request_row(request)))
            elif request.pending:
                across.append((i, request, a, b))
            else:
                crossing[i] = request  # refused at the prepare if its destination is none, or in another currency
                toward = "" if found[request.destination] is None else self.currencies.get(request.destination)
                parts[a].append((i, prepare_row(request, b, toward)))
        # A pending transfer on two shards none takes, unless its id is decided: then that shard
        # answers it, as a retry (by the outcome it keeps: nothing is decided, so where it comes
        # in its shard's part does not matter).
        answered: dict[int, TransferRequest] = {}
        deciders = self._deciders([request.id for _, request, _, _ in across])
        for i, request, a, b in across:
            if request.id in deciders:
                answered[i] = request
                parts[deciders[request.id]].append((i, request_row(request)))
            else:
                results[i] = CrossShardRefused(
                    f"pending transfer {request.id!r}: {request.source!r} and {request.destination!r} live on "
                    f"shards {a} and {b}; a pending transfer runs within one shard (colocate with placement)")
        batches = {a: ("batch", pack([item for _, item in part])) for a, part in parts.items()}
        replies = self._in_flight(batches) if len(batches) > 1 else self.on(batches)  # (another shard's part may be done)
        prepared: dict[int, Transfer] = {}
        for a, part in parts.items():
            for (i, _), outcome in zip(part, outcomes_of(unpack(replies[a])), strict=True):
                if i in crossing and isinstance(outcome, Transfer):
                    prepared[i] = outcome
                else:
                    step = crossing.get(i) or answered.get(i)
                    results[i] = outcome if step is None else restated(outcome, step)
        self._cross(crossing, prepared, where, results)
        assert all(result is not None for result in results)
        return results  # type: ignore[return-value]

    def _deciders(self, transfer_ids: list[str]) -> dict[str, int]:
        """The first shard keeping an outcome of each of `transfer_ids` that one keeps (every
        shard asked at once, for them all: a refusal's path, not a transfer's)."""
        deciders: dict[str, int] = {}
        if transfer_ids:
            for shard, decided in enumerate(self.everywhere("decided", transfer_ids)):
                for transfer_id in decided:
                    deciders.setdefault(transfer_id, shard)
        return deciders

    def _cross(self, crossing: dict[int, TransferRequest], prepared: dict[int, Transfer], where: dict[str, int],
               results: list[Transfer | LedgerError | None]) -> None:
        """Steps 2 and 3 of the prepared cross-shard transfers: credits (one call per
        destination shard), then posts and voids (one call per source shard)."""
        credits: dict[int, list[tuple[int, Row]]] = defaultdict(list)
        for i, hold in prepared.items():
            request = crossing[i]
            peer = peer_of(hold.destination)
            assert peer is not None, hold
            credits[peer[0]].append((i, credit_row(request, where[request.source], peer[1])))
        replies = self._in_flight({b: ("credit", pack([credit for _, credit in part])) for b, part in credits.items()})
        steps: dict[int, list[tuple[int, tuple[str, str, bool]]]] = defaultdict(list)
        for b, part in credits.items():
            for (i, _), outcome in zip(part, outcomes_of(unpack(replies[b])), strict=True):
                hold, a = prepared[i], where[crossing[i].source]
                if isinstance(outcome, Transfer):
                    results[i] = user_transfer(hold, outcome)
                    if hold.status != "posted":
                        steps[a].append((i, (hold.id + POST, hold.id, False)))
                    continue
                results[i] = restated(outcome, crossing[i]) if not isinstance(outcome, UNDECIDED) else _unknown(
                    crossing[i], "credit", outcome)  # named as its user's transfer, not the credit step
                if isinstance(outcome, (CrossShardAborted, *REJECTIONS.values())) and hold.status == "pending":
                    steps[a].append((i, (hold.id + VOID, hold.id, True)))
        replies = self._in_flight({a: ("resolve", [step for _, step in stepped]) for a, stepped in steps.items()})
        for a, stepped in steps.items():
            for (i, _), outcome in zip(stepped, outcomes_of(unpack(replies[a])), strict=True):
                if isinstance(outcome, LedgerError):  # the post is not durable: not acknowledged
                    results[i] = outcome if not isinstance(outcome, UNDECIDED) else _unknown(
                        crossing[i], "post or void", outcome)

    def _in_flight(self, calls: dict[int, tuple[str, Any]]) -> dict[int, Any]:
        """`on` for a round after the prepares, or a first round on more than one shard: a
        step that raised `InvalidRequest` (a bad clock reading: the rows were checked),
        `LedgerLocked` (a shard's directory still held by the process Ray replaced) or
        `LedgerUnavailable` (a shard that cannot write: a full disk, its directory moved away,
        its node gone) leaves the batch's transfers in flight or partly done, their outcomes unknown, so it is
        `LedgerTimeout` (retry with the same ids), not an error that reads as if nothing had
        been done."""
        try:
            return self.on(calls)
        except UNDECIDED as error:
            raise LedgerTimeout(f"this batch's transfers are in flight or partly done: a step failed ({error}); retry "
                                "them with the same ids to learn their outcomes") from error

    # --- recovery ------------------------------------------------------------------------

    def recover(self, older_than_s: float = 0.0) -> int:
        """Resolve every in-doubt cross-shard transfer (see the module docstring), or with
        `older_than_s` those prepared at least that long ago; how many. Three rounds of one
        call per shard at most. Raises `LedgerTimeout` if a shard does not answer (run it
        again: each step is idempotent)."""
        doubts = [doubt for found in self.everywhere("in_doubt", int(older_than_s * 1e9)) for doubt in found]
        toward: dict[int, list[Doubt]] = defaultdict(list)
        for doubt in doubts:
            toward[doubt.peer].append(doubt)
        decided = self.on({b: ("fence", part) for b, part in toward.items()})
        steps: dict[int, list[tuple[str, str, bool]]] = defaultdict(list)
        for b, part in toward.items():
            for doubt, committed in zip(part, decided[b], strict=True):
                if isinstance(committed, LedgerError):
                    raise committed
                step = (doubt.id + POST, doubt.id, False) if committed else (doubt.id + VOID, doubt.id, True)
                steps[doubt.source_shard].append(step)
        for rows in self.on(dict((a, ("resolve", part)) for a, part in steps.items())).values():
            for outcome in outcomes_of(unpack(rows)):
                if isinstance(outcome, LedgerError):
                    raise outcome
        return len(doubts)

    # --- reads ---------------------------------------------------------------------------

    def get_transfer(self, transfer_id: str) -> Transfer | None:
        """The transfer `transfer_id` as its user made it (a cross-shard one: once posted),
        from whichever shard holds it (every shard asked at once), or None."""
        found = self._found(transfer_id, "get_transfer")
        if found is None or peer_of(found[1].destination) is None:
            return found[1] if found is not None else None
        hold = found[1]
        peer = peer_of(hold.destination)
        assert peer is not None
        credit = self.call(peer[0], "get_transfer", credit_id(hold.id, found[0]))
        return user_transfer(hold, credit) if credit is not None and hold.status == "posted" else None

    def outcome(self, transfer_id: str) -> Transfer | LedgerError | None:
        """`Ledger.outcome` across shards: a cross-shard transfer's is its Transfer once posted,
        its credit's refusal once voided, and None while it is in flight or in doubt."""
        found = self._found(transfer_id, "outcome")
        if found is None:
            return None
        outcome = found[1]
        if not isinstance(outcome, Transfer) or peer_of(outcome.destination) is None:
            return _named(outcome, transfer_id)
        peer = peer_of(outcome.destination)
        assert peer is not None
        if outcome.status == "pending":
            return None
        credit = self.call(peer[0], "outcome", credit_id(outcome.id, found[0]))
        if outcome.status == "posted" and isinstance(credit, Transfer):
            return user_transfer(outcome, credit)
        if isinstance(credit, LedgerError) and not isinstance(credit, InsufficientFunds):  # that one: a fence's
            return _named(credit, transfer_id)
        return CrossShardAborted(f"transfer {transfer_id!r} was aborted by recovery: nothing moved")

    def _answers(self, transfer_id: str, method: str) -> dict[int, Any]:
        """Each shard's `method(transfer_id)` that is not None, by shard, in shard order (every
        shard asked at once); a shard's error raised here."""
        answers: dict[int, Any] = {}
        for index, (ok, value) in enumerate(self.everywhere("call", method, (transfer_id,), {})):
            if not ok:
                raise value
            if value is not None:
                answers[index] = value
        return answers

    def _found(self, transfer_id: str, method: str) -> tuple[int, Any] | None:
        """(shard, reply) of the first shard whose `method(transfer_id)` is not None."""
        return next(iter(self._answers(transfer_id, method).items()), None)

    def call(self, shard: int, method: str, *args: Any, **kwargs: Any) -> Any:
        """`Ledger.method(*args, **kwargs)` on one shard; its error raised here. Arguments Ray
        cannot send (a lock, an open file) are `InvalidRequest`, as the shard would refuse them."""
        try:
            ref = self._sent(lambda: self.actors[shard].call.remote(method, args, kwargs))
        except TypeError as error:  # Ray's "Could not serialize the argument ..."
            raise InvalidRequest(f"{method}: an argument cannot be sent to a shard ({shown(error)})") from None
        ok, value = gather([ref], self.timeout_s, self.session)[0]
        if not ok:
            raise value
        return value


def checked_request(request: object) -> TransferRequest:
    """A `transfer_many` item checked as the ledger checks it, and its ids free of the
    separator; `InvalidRequest` otherwise."""
    if not isinstance(request, TransferRequest):
        raise InvalidRequest(f"transfer_many takes TransferRequest items, got {type(request).__name__}")
    checked = check_transfer(request)
    if SEPARATOR in checked.id or SEPARATOR in checked.source or SEPARATOR in checked.destination \
            or len(checked.id) > USER_ID_LENGTH_MAX:
        check_user_id(checked.id, "transfer id", USER_ID_LENGTH_MAX)
        check_user_id(checked.source, "source")
        check_user_id(checked.destination, "destination")
    return checked


def unknown_source(request: TransferRequest) -> AccountNotFound:
    """The refusal of a transfer whose source no shard has. Not journaled: a transfer's id is
    kept on its source's shard, and this source has none yet; kept on its hash's shard, the
    refusal would not answer a retry once the account is made on another (`placement`), which
    would run: two outcomes for one id. So the id stays free, and a retry once the account
    is made is decided afresh (as a post of a pending transfer no shard holds:
    `ShardedLedger._pending_shard`)."""
    return AccountNotFound(f"transfer {request.id!r} ({request.amount} from {request.source!r} to "
                           f"{request.destination!r}) was refused: account_not_found (no shard has {request.source!r}; "
                           "not kept: a retry once it is made is decided afresh)")


def _unknown(request: TransferRequest, step: str, error: LedgerError) -> LedgerTimeout:
    """A cross-shard transfer whose later step failed undecided (`InvalidRequest` there is a
    bad clock reading: the rows were checked): in flight, its outcome unknown."""
    return LedgerTimeout(f"transfer {request.id!r} is in flight: its {step} step failed ({error}); retry it with the "
                         "same id to learn its outcome (recover_in_doubt() resolves it meanwhile)")


def _named(outcome: Transfer | LedgerError, transfer_id: str) -> Transfer | LedgerError:
    """`outcome`, but a refusal of one of a cross-shard transfer's steps, whose message names
    the protocol's accounts, named as its user's transfer instead (the same class and code)."""
    message = str(outcome)
    if isinstance(outcome, LedgerError) and type(outcome) in REJECTIONS.values() and (
            SEPARATOR in message or repr(SEPARATOR)[1:-1] in message):  # (ids are shown as their repr)
        return type(outcome)(f"transfer {transfer_id!r} was refused: {outcome.code}")
    return outcome


def user_transfer(hold: Transfer, credit: Transfer) -> Transfer:
    """The Transfer a cross-shard transfer's user sees: the prepare's id, source, amount, code,
    reference, LSN and timestamp (positions in the source shard's journal), the credit's
    destination and metadata (the user's: the prepare's is the protocol's), a single transfer,
    posted."""
    return Transfer(hold.id, hold.source, credit.destination, hold.amount, hold.lsn, hold.timestamp, hold.code,
                    hold.reference, credit.metadata, kind="single", status="posted")

