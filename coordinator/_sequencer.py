"""The sequencer: the one place where decisions get their journal order.

A decision (open an account, commit a transfer, reject one) is stamped and
appended to the journal under one short lock, and for a commit the two entries
are handed to the accounts' mailboxes inside that same lock. So every account
receives its entries in LSN order, which is the order replay applies them in,
and an entry's seq and balance are decided exactly once, here.

The lock covers stamping and queueing only (microseconds), never a wait: the
protocol before it (reserving funds in the source's mailbox) runs in parallel.

The sequencer also keeps the journal-order projection of every account
(`AccountState`: seq, posted, last LSN). It only grows by appending entries;
the account actors apply the same entries with the same pure `post` and must
agree with it, so the projection is both the stamp source and a cross-check.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from typing import cast

from journal import Completion, IndexPut, Journal, JournalError, crash_point

from coordinator._claims import Refusal
from coordinator._limits import CHECKPOINT_RECORDS_INTERVAL
from coordinator._records import (
    ACCOUNT,
    ACCOUNTS_INDEX,
    CHECKPOINT,
    CHECKPOINTS_INDEX,
    COMMIT,
    ENTRIES_INDEX,
    REJECT,
    TRANSFERS_INDEX,
    encode,
    encode_entry_value,
    entry_prefix,
    id_key,
    lsn_value,
)
from coordinator._state import AccountState, Posting, credit_refusal
from coordinator._values import Account, Transfer, TransferRequest

Deliver = Callable[[Posting, Posting], None]
Record = tuple[bytes, tuple[IndexPut, ...], Completion]
"""A stamped record as `Journal.append_many` takes it: payload, index entries, completion."""
_U64 = struct.Struct(">Q")
logger = logging.getLogger("tally.coordinator")


class Sequencer:
    """Owns journal order. Every method is called with no lock held and returns at once."""

    def __init__(
        self,
        journal: Journal,
        accounts: dict[str, Account],
        states: dict[str, AccountState],
        checkpoint_interval: int = CHECKPOINT_RECORDS_INTERVAL,
    ) -> None:
        self.lock = threading.Lock()
        self.checkpoint_interval = checkpoint_interval
        self._since_checkpoint = 0
        self._prefixes: dict[str, bytes] = {}
        """Entry-index key prefix per account, computed once."""
        self._journal = journal
        self.accounts = accounts
        """Every account, in creation order. Read freely; written only under `lock`."""
        self.account_lsns: dict[str, int] = {}
        self.states = states
        """Journal-order projection of every account; written only under `lock`."""

    def open_account(self, account: Account, completion: Completion) -> int:
        """Journal a new account. The caller checked, under `lock`, that the id is free."""
        assert self.lock.locked()
        assert account.id not in self.accounts, account.id
        payload = encode([ACCOUNT, account.id, account.currency, account.overdraft_limit])
        lsn = self._journal.last_lsn + 1
        index = [(ACCOUNTS_INDEX, id_key(account.id), lsn_value(lsn))]
        appended = self._journal.append(payload, index, completion)
        assert appended == lsn, (appended, lsn)
        self.accounts[account.id] = account
        self.account_lsns[account.id] = lsn
        self.states[account.id] = AccountState()
        self._appended()
        return lsn

    def commit(self, request: TransferRequest, deliver: Deliver, completion: Completion) -> Transfer | None:
        """Stamp and journal the commit of a reserved transfer, then deliver its two entries.

        Returns None, journaling nothing, if the destination would overflow; the
        caller then rejects. `completion.value` is set to the Transfer before the
        record is queued, and the writer releases it once the record is durable.
        """
        with self.lock:
            stamped = self.stamp_commit(request, self._journal.last_lsn + 1, completion)
            if stamped is None:
                return None
            (payload, index, _), debit, credit = stamped
            appended = self._journal.append(payload, index, completion)
            assert appended == debit.lsn, (appended, debit.lsn)
            crash_point("after-commit-queued")
            self.advance(debit, credit)
            deliver(debit, credit)
            self._appended()
        return cast(Transfer, completion.value)

    def stamp_commit(
        self, request: TransferRequest, lsn: int, completion: Completion
    ) -> tuple[Record, Posting, Posting] | None:
        """The commit record of `request` at `lsn` and its two entries, stamped (seq and
        balance) from the projection; None if the destination would overflow. Call under
        `lock`; nothing changes until the record is appended and `advance` is called.
        `completion.value` becomes the Transfer."""
        tid, source, destination, amount = request.id, request.source, request.destination, request.amount
        target = self.states[destination]
        if credit_refusal(target.posted, amount) is not None:
            return None
        origin = self.states[source]
        prefixes = self._prefixes
        source_prefix = prefixes.get(source) or prefixes.setdefault(source, entry_prefix(source))
        target_prefix = prefixes.get(destination) or prefixes.setdefault(destination, entry_prefix(destination))
        # Stamped here; each account re-derives them with `post` and must agree.
        debit = Posting(source, origin.seq + 1, -amount, origin.posted - amount, lsn)
        credit = Posting(destination, target.seq + 1, amount, target.posted + amount, lsn)
        completion.value = Transfer(tid, source, destination, amount, lsn)
        payload = encode([COMMIT, tid, source, destination, amount, debit.seq, debit.balance, credit.seq, credit.balance])
        index = (
            (TRANSFERS_INDEX, id_key(tid), lsn_value(lsn)),
            (ENTRIES_INDEX, source_prefix + _U64.pack(debit.seq), encode_entry_value(tid, -amount, debit.balance, lsn)),
            (ENTRIES_INDEX, target_prefix + _U64.pack(credit.seq), encode_entry_value(tid, amount, credit.balance, lsn)),
        )
        return (payload, index, completion), debit, credit

    def advance(self, debit: Posting, credit: Posting) -> None:
        """Move the projection past a commit's two entries (under `lock`, once appended)."""
        self.states[debit.account] = AccountState(debit.seq, debit.balance, debit.lsn)
        self.states[credit.account] = AccountState(credit.seq, credit.balance, credit.lsn)

    def stamp_reject(self, request: TransferRequest, code: str, lsn: int, completion: Completion) -> Record:
        """The rejection record of `request` at `lsn` (under `lock`); `completion.value`
        becomes the `Refusal`."""
        completion.value = Refusal(request, code, lsn)
        payload = encode([REJECT, request.id, request.source, request.destination, request.amount, code])
        return payload, ((TRANSFERS_INDEX, id_key(request.id), lsn_value(lsn)),), completion

    def reject(self, request: TransferRequest, code: str, completion: Completion) -> int:
        """Journal a refusal; it consumes the transfer id. `completion.value` becomes the
        `Refusal` before the record is queued; the writer releases it once durable."""
        with self.lock:
            lsn = self._journal.last_lsn + 1
            payload, index, _ = self.stamp_reject(request, code, lsn, completion)
            appended = self._journal.append(payload, index, completion)
            assert appended == lsn, (appended, lsn)
            self._appended()
        return lsn

    def append_stamped(self, records: list[Record]) -> int:
        """Queue records stamped under `lock` at consecutive LSNs from `last_lsn + 1` (the
        caller made room with `journal.wait_room`); return the first LSN. Raises only if
        nothing was queued."""
        assert self.lock.locked()
        first = self._journal.append_many(records)
        self._appended(len(records))
        return first

    def _appended(self, records: int = 1) -> None:
        """Count records appended; journal a checkpoint when one is due. The records are
        queued already, so a checkpoint that cannot be queued must not fail them: it is
        logged and tried again after the next record (the writer reports its own failure)."""
        self._since_checkpoint += records
        if self._since_checkpoint >= self.checkpoint_interval:
            try:
                self.checkpoint()
            except JournalError:
                logger.exception("checkpoint not journaled; trying again after the next record")

    def checkpoint(self) -> int:
        """Journal the projection of every account as of now (call with `lock` held).

        Opening the ledger starts from the newest checkpoint and replays only the
        records after it; a full replay checks every checkpoint it passes.
        """
        assert self.lock.locked()
        rows = [
            [account.id, account.currency, account.overdraft_limit, self.account_lsns[account.id], *self.states[account.id]]
            for account in self.accounts.values()
        ]
        lsn = self._journal.last_lsn + 1
        appended = self._journal.append(encode([CHECKPOINT, rows]), [(CHECKPOINTS_INDEX, lsn_value(lsn), b"")])
        assert appended == lsn, (appended, lsn)
        crash_point("during-checkpoint")
        self._since_checkpoint = 0
        return lsn
