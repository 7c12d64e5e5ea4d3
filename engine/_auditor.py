"""The auditor: checks every reply the harness got against the ledger, and the invariants.

It talks to the ledger only through `AuditedLedger`, the few read methods it
needs (plus `transfer`, to check that a refused id stays refused), so a test can
hand it a double with a fault injected and watch it fail.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from coordinator import Account, Balance, Entry, LedgerError, Transfer, TransferRequest


class AuditedLedger(Protocol):
    def get_transfer(self, transfer_id: str) -> Transfer | None: ...
    def accounts(self) -> list[Account]: ...
    def entries(self, account_id: str, after: int = 0, limit: int | None = None) -> list[Entry]: ...
    def balance(self, account_id: str) -> Balance: ...
    def transfer_many(self, requests: Sequence[TransferRequest]) -> list[Transfer | LedgerError]: ...


@dataclass
class Replies:
    """What the harness was told, collected from every client."""

    acknowledged: dict[str, Transfer] = field(default_factory=dict)
    refused: dict[str, tuple[str, str, int, str]] = field(default_factory=dict)
    """Refused ids: (source, destination, amount, error code)."""
    retry_mismatches: list[str] = field(default_factory=list)
    """Retries whose outcome differed from the first reply for the id."""
    retries: int = 0


CHECK_PRESENT = "every acknowledged transfer is present exactly once with its fields"
CHECK_REFUSED = "every refused id stays refused with the same error"
CHECK_RETRIES = "every retry returned the original outcome"
CHECK_CONSERVED = "money is conserved (posted balances sum to 0)"
CHECK_LIMITS = "no balance is below its overdraft limit"
CHECK_GAPLESS = "seq is gapless and each balance is the running sum"
CHECK_PENDING = "nothing is left pending"
CHECK_REOPEN = "close and reopen give the same state hash"


def audit_replies(ledger: AuditedLedger, replies: Replies, reopen: Callable[[], bool] | None = None) -> dict[str, bool]:
    """Every check, by name: True passed. `reopen` closes, reopens and compares hashes."""
    checks: dict[str, bool] = {}
    appearances: Counter[str] = Counter()
    placements: dict[str, set[tuple[str, int]]] = {}
    total, gapless, above_limit, no_pending = 0, True, True, True
    for account in ledger.accounts():
        running = 0
        for seq, entry in enumerate(ledger.entries(account.id), start=1):
            running += entry.amount
            gapless &= entry.seq == seq and entry.balance == running
            if account.overdraft_limit is not None:
                above_limit &= entry.balance >= -account.overdraft_limit
            appearances[entry.transfer_id] += 1
            placements.setdefault(entry.transfer_id, set()).add((account.id, entry.amount))
        balance = ledger.balance(account.id)
        no_pending &= balance.pending == 0 and balance.posted == running
        total += balance.posted
    present = True
    for tid, reply in replies.acknowledged.items():
        stored = ledger.get_transfer(tid)
        expected_places = {(reply.source, -reply.amount), (reply.destination, reply.amount)}
        present &= stored == reply and appearances[tid] == 2 and placements.get(tid) == expected_places
    checks[CHECK_PRESENT] = present
    checks[CHECK_REFUSED] = _still_refused(ledger, replies.refused)
    checks[CHECK_RETRIES] = not replies.retry_mismatches
    checks[CHECK_CONSERVED] = total == 0
    checks[CHECK_LIMITS] = above_limit
    checks[CHECK_GAPLESS] = gapless
    checks[CHECK_PENDING] = no_pending
    if reopen is not None:
        checks[CHECK_REOPEN] = reopen()
    return checks


def _still_refused(ledger: AuditedLedger, refused: dict[str, tuple[str, str, int, str]]) -> bool:
    """Resubmit every refused id with its fields: each must be refused again, same code."""
    items = list(refused.items())
    for first in range(0, len(items), 1000):
        chunk = items[first : first + 1000]
        requests = [TransferRequest(tid, source, destination, amount) for tid, (source, destination, amount, _) in chunk]
        for (tid, fields), outcome in zip(chunk, ledger.transfer_many(requests), strict=True):
            if not isinstance(outcome, LedgerError) or outcome.code != fields[3] or ledger.get_transfer(tid) is not None:
                return False
    return True
