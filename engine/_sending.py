"""What a stress client sends for each op, how each reply is recorded, and how the outcomes no
reply told are learned before the audit.

A reply tells an outcome when it is one (a Transfer, a chain's Transfers) or a refusal that
decides the id (one of `REJECTIONS`, `IdempotencyConflict`, `InvalidRequest`, a refused chain).
Any other (a timeout, a ledger unavailable or closed, a server overloaded, unreachable or
answering outside its contract) tells none: the request may or may not have landed. Such an op
is kept in `Replies.unknown`; once the clients are done, `learn_outcomes` sends it again with the
same id and fields (idempotency makes that safe, as a client would), in rounds, until a reply
tells its outcome, which is recorded as if it had been the first reply. Without that, a pending
transfer made, or posted, whose reply was lost would be audited as if it had not happened.
Nothing is sent again to a ledger whose journal failed (`cannot_write`: a full disk), which
takes no write until it is reopened.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

from coordinator import (
    REJECTIONS,
    IdempotencyConflict,
    InvalidRequest,
    LedgerError,
    LinkedTransferFailed,
    Transfer,
    TransferRequest,
)

from engine._auditor import Replies
from engine._workload import PENDING_EXPIRY_S, PENDING_TIMEOUT_S, Op

SAMPLES_MAX = 200_000
"""Latency samples a client keeps for the plots; the rest are counted, not kept."""
RESEND_ROUNDS_MAX = 6
"""Rounds of resending the ops whose outcome no reply told, before the audit."""
RESEND_BACKOFF_S = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
"""The pause before each round: a server being restarted gets about 15 s to come back."""
RESEND_WAIT_S = 20.0
"""No round, and no resend in one, starts later than this after the first round began (each
resend is bounded by its own call): the pauses (15.5 s in all) and some resending. README.md's
`tally stress` says so ("none begun more than 20 s after the first")."""

UNANSWERED = "server_unreachable"
"""The code of a request no server answered (`engine._remote_replies.ServerUnreachable`): counted apart,
in neither the rate nor the latencies."""
TELLING = frozenset({"committed", *REJECTIONS, IdempotencyConflict.code, InvalidRequest.code,
                     LinkedTransferFailed.code})
"""The outcome codes (`record`'s counts) of replies that tell what became of their op (`tells`):
the acknowledged ops, which alone count in a run's rate."""


class Recorded(NamedTuple):
    """What `record` counted of the replies to one call's ops."""

    told: int
    """Replies that told their op's outcome (acknowledged: committed, or refused for good)."""
    refused: int
    """Of `told`, the refusals."""
    untold: int
    """Replies that told no outcome (a timeout, a ledger unavailable, a server overloaded)."""
    unanswered: int
    """Requests no server answered (`UNANSWERED`)."""

Outcome = Any
"""What a client was told for one op: a Transfer or LedgerError (a single transfer); the pair
(reply to the pending transfer, reply to its post or void or None); the chain's Transfers or
its LedgerError."""

ClientState = tuple[Replies, dict[str, int], list[float], list[tuple[float, float]]]
"""A client's replies, its count of each outcome code, its latencies and its (time, latency) samples."""


def send(ledger: Any, ops: list[Op]) -> list[Outcome]:
    """Send `ops`: single transfers together (`transfer_many`, or `transfer` for one alone),
    pending transfers and chains each on its own; the outcome of each, in order."""
    singles = [op for op in ops if op.kind == "single"]
    if len(singles) == 1 and len(ops) == 1:
        return [_send_single(ledger, ops[0])]
    batched = iter(ledger.transfer_many([TransferRequest(o.transfer_id, o.source, o.destination, o.amount)
                                         for o in singles]) if singles else ())
    return [next(batched) if op.kind == "single" else _send_pending(ledger, op) if op.kind == "pending"
            else _send_chain(ledger, op) for op in ops]


def ids_of(op: Op) -> list[str]:
    """The transfer ids sending `op` may write: its own, its post's or void's, its chain's legs."""
    if op.kind == "linked":
        return [leg[0] for leg in op.legs]
    if op.kind == "pending" and op.resolution in ("post", "post-part", "void"):
        return [op.transfer_id, _resolution_id(op)]
    return [op.transfer_id]


def tells(outcome: Outcome) -> bool:
    """Whether a reply (not a pending op's pair) tells what became of its id."""
    return not isinstance(outcome, LedgerError) or outcome.code in REJECTIONS or isinstance(
        outcome, (IdempotencyConflict, InvalidRequest, LinkedTransferFailed))


def record(state: ClientState, ops: list[Op], outcomes: list[Outcome], latency_ms: float, at_s: float) -> Recorded:
    """Record what each of `ops` was told, and the latency of the call that sent them (of each
    answered); what the replies told, counted."""
    replies, counts, latencies, samples = state
    told = refused = untold = unanswered = 0
    for op, outcome in zip(ops, outcomes, strict=True):
        first = outcome[0] if op.kind == "pending" else outcome
        code = first.code if isinstance(first, LedgerError) else "committed"
        counts[code] = counts.get(code, 0) + 1
        if code in TELLING:
            told += 1
            refused += code != "committed"
        elif code == UNANSWERED:
            unanswered += 1
        else:
            untold += 1
        if code != UNANSWERED:  # no answer: its latency is the wait for none, not a server's
            latencies.append(latency_ms)
            if len(samples) < SAMPLES_MAX:
                samples.append((at_s, latency_ms))
        if op.kind == "single" and op.retry:
            replies.retries += 1
            if op.differs:
                replies.retries_differing += 1
                replies.differed.add(op.transfer_id)
        _record_reply(replies, op, outcome)
    return Recorded(told, refused, untold, unanswered)


def cannot_write(ledger: Any) -> str | None:
    """Why `ledger` takes no write until it is reopened (its journal failed: a full disk, say,
    in the words of `Ledger.failure`), or None while it can write (or cannot tell: a server's)."""
    failure = getattr(ledger, "failure", None)
    return None if failure is None else f"the ledger takes no write until it is reopened: {failure}"


def learn_outcomes(ledger: Any, replies: Replies) -> str | None:
    """Send each op of `replies.unknown` again, with its id and fields, in up to
    `RESEND_ROUNDS_MAX` rounds (`RESEND_BACKOFF_S` apart, none started after `RESEND_WAIT_S`),
    until a reply tells its outcome, recorded as the first reply would have been; count in
    `replies.resent` the ops sent again. Nothing is sent to a ledger that cannot write
    (`cannot_write`: it would only fail again): then it returns at once, saying why; else None.
    Blocks the calling thread meanwhile; the ops still unknown are left in `replies.unknown`."""
    began = time.monotonic()
    replies.resent = 0
    for round_number, pause_s in enumerate(RESEND_BACKOFF_S[:RESEND_ROUNDS_MAX]):
        if not replies.unknown:
            return None
        time.sleep(pause_s)  # a server restarting: no event of its to wait on from here
        waiting, replies.unknown = replies.unknown, []
        for index, op in enumerate(waiting):
            why = cannot_write(ledger)
            if why is not None or time.monotonic() - began > RESEND_WAIT_S:
                replies.unknown.extend(waiting[index:])
                return why
            replies.resent += round_number == 0  # (a later round sends only ops the first one sent)
            if op.kind == "pending" and op.transfer_id in replies.pendings:  # made; its post or void told nothing
                _record_reply(replies, op, (replies.acknowledged[op.transfer_id], _resolve(ledger, op)))
            else:
                _record_reply(replies, op, send(ledger, [op])[0], resent=True)
    return None


def _record_reply(replies: Replies, op: Op, outcome: Outcome, resent: bool = False) -> None:
    """Record what `op` was told (`resent`: by a resend, `learn_outcomes`)."""
    first = outcome[0] if op.kind == "pending" else outcome
    if getattr(first, "nothing_sent", False):  # no connection (`engine._remote_replies.NotSent`)
        if resent:  # the first try's reply was lost: it may have landed, and this one tells nothing
            replies.unknown.append(op)
        return  # its first try: nothing was written, so nothing to learn (a server down a while leaves
        # thousands, which resending one by one outlasts)
    if op.kind == "pending":
        _record_pending(replies, op, *outcome)
    elif not tells(outcome):
        replies.unknown.append(op)
    elif op.kind == "linked":
        legs = tuple(TransferRequest(*leg) for leg in op.legs)
        if isinstance(outcome, LinkedTransferFailed):
            replies.chains.append((legs, outcome.cause.code))
        elif not isinstance(outcome, LedgerError):
            replies.chains.append((legs, None))
            replies.acknowledged.update((made.id, made) for made in outcome)
    elif op.retry or op.transfer_id in replies.acknowledged or op.transfer_id in replies.refused:
        _record_retry(replies, op, outcome)  # (an original learned late, after a retry of it told)
    else:
        _record_single(replies, op, outcome)


def _send_single(ledger: Any, op: Op) -> Transfer | LedgerError:
    try:
        return ledger.transfer(op.transfer_id, source=op.source, destination=op.destination,
                               amount=op.amount)
    except LedgerError as error:
        return error


def _resolution_id(op: Op) -> str:
    """The id of a pending op's post or void."""
    return f"{op.transfer_id}-{'void' if op.resolution == 'void' else 'post'}"


def _send_pending(ledger: Any, op: Op) -> tuple[Transfer | LedgerError, Transfer | LedgerError | None]:
    """A pending transfer, then what its resolution says: post it (all or part), void it, or nothing."""
    try:
        made = ledger.transfer(op.transfer_id, source=op.source, destination=op.destination, amount=op.amount,
                               pending=True, timeout_s=_timeout_of(op))
    except LedgerError as error:
        return error, None
    return made, _resolve(ledger, op)


def _resolve(ledger: Any, op: Op) -> Transfer | LedgerError | None:
    """Post (all or part) or void the pending transfer `op` made, as its resolution says; None
    for one let expire or left open."""
    try:
        if op.resolution in ("post", "post-part"):
            part = None if op.resolution == "post" else max(1, op.amount // 2)
            return ledger.post_pending(_resolution_id(op), pending_id=op.transfer_id,
                                       amount=part)
        if op.resolution == "void":
            return ledger.void_pending(_resolution_id(op), pending_id=op.transfer_id)
    except LedgerError as error:
        return error
    return None


def _send_chain(ledger: Any, op: Op) -> list[Transfer] | LedgerError:
    try:
        return list(ledger.transfer_linked([TransferRequest(*leg) for leg in op.legs]))
    except LedgerError as error:
        return error


def _record_single(replies: Replies, op: Op, outcome: Transfer | LedgerError) -> None:
    if isinstance(outcome, Transfer):
        replies.acknowledged[op.transfer_id] = outcome
    elif outcome.code in REJECTIONS:  # journaled refusals: the id stays refused
        replies.refused[op.transfer_id] = (op.source, op.destination, op.amount, outcome.code)


def _record_retry(replies: Replies, op: Op, outcome: Transfer | LedgerError) -> None:
    """A retry's reply, compared with the first outcome told for its id: the same, or
    `IdempotencyConflict` if the retry's fields differ from those of the request that outcome
    was for (an `Op.differs` retry's, or the original's after a differing retry was the first
    to land). One after replies that told none is the first outcome told, and must be of this
    retry's fields. (A reply that tells none is not recorded here: `Replies.unknown`.)"""
    fields = (op.source, op.destination, op.amount)
    before = replies.acknowledged.get(op.transfer_id) or replies.refused.get(op.transfer_id)
    if before is None and (isinstance(outcome, Transfer) or outcome.code in REJECTIONS):
        if isinstance(outcome, Transfer) and (outcome.source, outcome.destination, outcome.amount) != fields:
            replies.retry_mismatches.append(op.transfer_id)  # the answer is another request's
        _record_single(replies, op, outcome)
        return
    if before is None:  # a conflict, no outcome told yet: right if a request with other fields may have landed
        if isinstance(outcome, IdempotencyConflict) and not op.differs and op.transfer_id not in replies.differed:
            replies.retry_mismatches.append(op.transfer_id)
        return
    told_for = (before.source, before.destination, before.amount) if isinstance(before, Transfer) else before[:3]
    if fields != told_for:
        same = isinstance(outcome, IdempotencyConflict)
    elif isinstance(outcome, Transfer):
        same = before == outcome
    else:
        same = isinstance(before, tuple) and before[3] == outcome.code
    if not same:
        replies.retry_mismatches.append(op.transfer_id)


def _record_pending(replies: Replies, op: Op, made: Transfer | LedgerError,
                    resolved: Transfer | LedgerError | None) -> None:
    if isinstance(made, LedgerError):
        if made.code in REJECTIONS:
            request = TransferRequest(op.transfer_id, op.source, op.destination, op.amount, pending=True,
                                      timeout_s=_timeout_of(op))
            replies.refused_requests[op.transfer_id] = (request, made.code)
        elif not tells(made):
            replies.unknown.append(op)
        return
    replies.acknowledged[made.id] = made
    replies.pendings[made.id] = (op.resolution, resolved.code if isinstance(resolved, LedgerError) else resolved)
    if isinstance(resolved, Transfer):
        replies.acknowledged[resolved.id] = resolved
    elif resolved is not None and not tells(resolved):
        replies.unknown.append(op)


def _timeout_of(op: Op) -> int | None:
    """The timeout a pending op was sent with."""
    return PENDING_EXPIRY_S if op.resolution == "expire" else None if op.resolution == "open" else PENDING_TIMEOUT_S
