"""The auditor: checks every reply the harness got against the ledger, and the invariants.

It talks to the ledger only through `AuditedLedger`, the few read methods it
needs (plus `transfer`, to check that a refused id stays refused), so a test can
hand it a double with a fault injected and watch it fail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from coordinator import Account, Balance, Entry, LedgerError, Transfer, TransferRequest

from engine._workload import Op


class AuditedLedger(Protocol):
    def get_transfer(self, id: str) -> Transfer | None: ...
    def accounts(self) -> list[Account]: ...
    def entries(self, account: str, after: int = 0, limit: int | None = None) -> list[Entry]: ...
    def balance(self, account: str) -> Balance: ...
    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Transfer | LedgerError]: ...


class ListedLedger(Protocol):
    def accounts(self) -> list[Account]: ...
    def balance(self, account: str) -> Balance: ...
    def transfers(self, *, account: str | None = None, kind: str | None = None, after_lsn: int = 0,
                  limit: int = 100) -> list[Transfer]: ...


@dataclass
class Replies:
    """What the harness was told, collected from every client."""

    acknowledged: dict[str, Transfer] = field(default_factory=dict)
    """Every transfer acknowledged: single, pending, post, void, each leg of a linked chain."""
    refused: dict[str, tuple[str, str, int, str]] = field(default_factory=dict)
    """Refused ids of single transfers: (source, destination, amount, error code)."""
    refused_requests: dict[str, tuple[TransferRequest, str]] = field(default_factory=dict)
    """Refused ids of other transfer requests (pending ones): the request and the error code."""
    pendings: dict[str, tuple[str, Transfer | str | None]] = field(default_factory=dict)
    """Acknowledged pending transfers: what the client meant to do with each (one of
    `engine._workload.RESOLUTIONS`), and the reply to its post or void (the Transfer, the
    error code, or None if it sent none)."""
    chains: list[tuple[tuple[TransferRequest, ...], str | None]] = field(default_factory=list)
    """Linked chains: the legs, and None if acknowledged, else the code of the refused leg's error."""
    retry_mismatches: list[str] = field(default_factory=list)
    """Retries whose outcome differed from the first reply for the id."""
    retries: int = 0
    retries_differing: int = 0
    """Of `retries`, those that changed the amount (each must be refused `IdempotencyConflict`)."""
    differed: set[str] = field(default_factory=set)
    """The ids those were sent for."""
    unknown: list[Op] = field(default_factory=list)
    """The ops whose reply told no outcome (`engine._sending.tells`), kept to be sent again
    (`engine._sending.learn_outcomes`): those still here at the audit fail it."""
    resent: int = 0
    """Ops sent again (once or more) to learn their outcome."""
    sent: set[str] = field(default_factory=set)
    """Every transfer id the run sent (a transfer, a post, a void, a chain's legs, a funding),
    whatever the reply, or none: the ids whose entries it can explain."""


CHECK_PRESENT = "every acknowledged transfer is present exactly once with its fields"
CHECK_REFUSED = "every refused id stays refused with the same error"
CHECK_RETRIES = "every retry returned the original outcome (one that differs: idempotency_conflict)"
CHECK_CONSERVED = "money is conserved (posted balances sum to 0)"
CHECK_LIMITS = "no balance is below its overdraft limit"
CHECK_GAPLESS = "seq is gapless and each balance is the running sum"
CHECK_HOLDS = "no reservation is left: each account's pending and incoming are its open pending transfers'"
CHECK_PENDING_ENDED = "every pending transfer ended posted, voided or expired, or is still pending with its hold counted"
CHECK_LINKED = "every linked chain is all-or-nothing"
CHECK_REOPEN = "close and reopen give the same state hash"
CHECK_OUTCOMES = "every request whose reply told no outcome was sent again until one did"
CHECK_EXPLAINED = "every entry is of a transfer the run was told moved money (none moved twice, unasked or denied)"

PENDING_PAGE_TRANSFERS = 1_000
"""Pending transfers `open_pending` reads a page."""

_MOVES = ("single", "post")
"""The kinds of transfer that make entries (a debit and a credit)."""
_ENDED = {"post": "posted", "post-part": "posted", "void": "voided"}


def open_pending(ledger: ListedLedger) -> frozenset[str]:
    """The ids of the pending transfers open in `ledger` (before a run: a ledger used before may
    hold some, whose holds the run's audit then finds on its accounts; `audit_replies`'
    `prior`). Found through the accounts holding funds for one: a pending transfer holds on
    its source."""
    found: set[str] = set()
    for account in ledger.accounts():
        if not ledger.balance(account.id).pending:
            continue
        after = 0
        while page := ledger.transfers(account=account.id, kind="pending", after_lsn=after, limit=PENDING_PAGE_TRANSFERS):
            found.update(t.id for t in page if t.status == "pending" and t.source == account.id)
            after = page[-1].lsn
    return frozenset(found)


def audit_replies(ledger: AuditedLedger, replies: Replies, reopen: Callable[[], bool] | None = None,
                  sent: Collection[str] | None = None, prior: Collection[str] = (),
                  since_lsn: int = 0, funded: Collection[str] = ()) -> dict[str, bool | None]:
    """Every check, by name: True passed. `reopen` closes, reopens and compares hashes. `sent`
    (every transfer id the run sent, whatever its reply) turns on the check that each entry
    after `since_lsn` (the ledger's last LSN before the run: earlier entries are of earlier
    runs) is of a move the run was told was made, or of a funding (`funded`), else money moved
    that no reply owned up to (a retry applied again under an id of the ledger's own, a
    transfer applied and answered refused or invalid), which every other check can miss: the
    moves balance.
    `prior`: the pending transfers open before the run (`open_pending`); those still open hold
    funds beside the run's own."""
    checks: dict[str, bool | None] = {}
    appearances: Counter[str] = Counter()
    placements: dict[str, set[tuple[str, int]]] = {}
    balances: dict[str, Balance] = {}
    total, gapless, above_limit, posted_is_sum, explained = 0, True, True, True, True
    # Of what the run sent, what it was told moved money (every outcome is known by now, or
    # `CHECK_OUTCOMES` fails), and its fundings: an entry of an id answered otherwise (refused,
    # invalid) is money moved that the run was told had not moved.
    moved = {tid for tid, reply in replies.acknowledged.items() if reply.kind in _MOVES} | set(funded)
    for account in ledger.accounts():
        running = 0
        for seq, entry in enumerate(ledger.entries(account.id), start=1):
            running += entry.amount
            gapless &= entry.seq == seq and entry.balance == running
            if account.overdraft_limit is not None:
                above_limit &= entry.balance >= -account.overdraft_limit
            appearances[entry.transfer_id] += 1
            explained &= sent is None or entry.lsn <= since_lsn or entry.transfer_id in moved
            placements.setdefault(entry.transfer_id, set()).add((account.id, entry.amount))
        balance = balances[account.id] = ledger.balance(account.id)
        posted_is_sum &= balance.posted == running
        total += balance.posted
    present = True
    for tid, reply in replies.acknowledged.items():
        stored = ledger.get_transfer(tid)
        if reply.kind in _MOVES:
            expected = {(reply.source, -reply.amount), (reply.destination, reply.amount)}
            present &= stored == reply and appearances[tid] == 2 and placements.get(tid) == expected
        else:  # a pending transfer (its status moves on) or a void: no entries
            present &= (stored is not None and replace(stored, status=reply.status) == reply
                        and appearances[tid] == 0)
    checks[CHECK_PRESENT] = present
    checks[CHECK_REFUSED] = _still_refused(ledger, replies)
    checks[CHECK_RETRIES] = not replies.retry_mismatches
    checks[CHECK_OUTCOMES] = not replies.unknown
    checks[CHECK_CONSERVED] = total == 0
    checks[CHECK_LIMITS] = above_limit
    checks[CHECK_GAPLESS] = gapless
    ended, held, incoming = _pending_ended(ledger, replies, prior)
    checks[CHECK_HOLDS] = posted_is_sum and all(
        balance.pending == held.get(account, 0) and balance.incoming == incoming.get(account, 0)
        for account, balance in balances.items())
    checks[CHECK_PENDING_ENDED] = ended
    checks[CHECK_LINKED] = all(  # every leg with both entries, or none with any
        all(ledger.get_transfer(leg.id) is not None and appearances[leg.id] == 2 for leg in legs) if code is None
        else all(ledger.get_transfer(leg.id) is None and not appearances[leg.id] for leg in legs)
        for legs, code in replies.chains)
    if sent is not None:
        checks[CHECK_EXPLAINED] = explained
    if reopen is not None:
        checks[CHECK_REOPEN] = reopen()
    return checks


def _pending_ended(ledger: AuditedLedger, replies: Replies,
                   prior: Collection[str]) -> tuple[bool, dict[str, int], dict[str, int]]:
    """Whether every acknowledged pending transfer is in the state its client's calls left it
    in; and the holds of those still open, with those of the `prior` ones still open, by
    source and by destination."""
    held: Counter[str] = Counter()
    incoming: Counter[str] = Counter()
    for tid in prior:  # a run before this one left them open: they may have expired since
        stored = ledger.get_transfer(tid)
        if stored is not None and stored.status == "pending":
            held[stored.source] += stored.amount
            incoming[stored.destination] += stored.amount
    ended = True
    for tid, (plan, resolution) in replies.pendings.items():
        stored = ledger.get_transfer(tid)
        status = stored.status if stored is not None else None
        if isinstance(resolution, Transfer):  # the post or void was acknowledged: that is how it ended
            ended &= status == _ENDED[plan] and resolution.pending_id == tid
        elif plan == "expire":
            ended &= status == "expired"
        else:  # left open, or its post or void was refused: still pending (or expired, had it a timeout)
            ended &= status == "pending" or (status == "expired" and plan != "open")
        if status == "pending" and stored is not None:
            held[stored.source] += stored.amount
            incoming[stored.destination] += stored.amount
    return ended, held, incoming


def _still_refused(ledger: AuditedLedger, replies: Replies) -> bool:
    """Resubmit every refused id with its fields: each must be refused again, same code."""
    items = [(tid, TransferRequest(tid, source, destination, amount), code)
             for tid, (source, destination, amount, code) in replies.refused.items()]
    items += [(tid, request, code) for tid, (request, code) in replies.refused_requests.items()]
    for first in range(0, len(items), 1000):
        chunk = items[first : first + 1000]
        requests = [request for _, request, _ in chunk]
        for (tid, _, code), outcome in zip(chunk, ledger.transfer_many(requests), strict=True):
            if not isinstance(outcome, LedgerError) or outcome.code != code or ledger.get_transfer(tid) is not None:
                return False
    return True
