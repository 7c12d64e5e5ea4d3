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
And it keeps the entries stamped since the newest checkpoint (`unindexed`),
which the next checkpoint writes to the entry index (see `coordinator._entries`).
"""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable
from itertools import islice
from typing import cast

from journal import Completion, IndexPuts, Journal, JournalError, crash_point

from coordinator._claims import Refusal
from coordinator._entries import Flat, UnindexedEntries
from coordinator._limits import CHECKPOINT_RECORDS_INTERVAL, UNINDEXED_ENTRIES_MAX
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
from coordinator._rules import Stamp, decide
from coordinator._state import NO_ENTRIES, AccountState, Posting
from coordinator._values import Account, Transfer, TransferRequest, stamped_transfer

Deliver = Callable[[Posting, Posting], None]
_U64 = struct.Struct(">Q")


class Chunk:
    """Decisions stamped under the sequencer lock at consecutive LSNs, journaled together
    as one block (`Sequencer.append_chunk`): a payload and a completion per record, and
    the transfer index entries of all of them (their entries wait for a checkpoint)."""

    __slots__ = ("payloads", "completions", "transfers", "accounts", "entries")

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.completions: list[Completion] = []
        self.transfers: list[bytes] = []
        """Transfer index: id -> LSN of its outcome (flat: key, value, key, value...)."""
        self.accounts: list[str] = []
        self.entries: list[bytes] = []
        """The entries stamped, each its account's in `accounts`, then its key and value
        here: unindexed entries as the chunk is queued (`Sequencer._append`)."""

    def __len__(self) -> int:
        return len(self.payloads)


logger = logging.getLogger("tally.coordinator")


class Sequencer:
    """Owns journal order. Every method is called with no lock held and returns at once."""

    def __init__(
        self,
        journal: Journal,
        accounts: dict[str, Account],
        states: dict[str, AccountState],
        checkpoint_interval: int = CHECKPOINT_RECORDS_INTERVAL,
        unindexed: Flat | None = None,
        since_checkpoint: int = 0,
    ) -> None:
        """`unindexed` holds the entries of the commits after the newest checkpoint, which
        `since_checkpoint` records follow (both from recovery; none for a new journal)."""
        self.lock = threading.Lock()
        self.checkpoint_interval = checkpoint_interval
        self._since_checkpoint = since_checkpoint
        self.unindexed = UnindexedEntries(unindexed)
        self._prefixes: dict[str, bytes] = {}
        """Entry-index key prefix per account, computed once."""
        self._journal = journal
        self.accounts = accounts
        """Every account, in creation order. Read freely; written only under `lock`."""
        self.account_lsns: dict[str, int] = {}
        self._fixed_rows: dict[str, tuple[str, str, int | None, int]] = {}
        """The unchanging start of each account's checkpoint row (id, currency, overdraft
        limit, opening LSN), in creation order; filled by `checkpoint`."""
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
        # `accounts` last: threads that find the account there (without the lock) find the rest.
        self.account_lsns[account.id] = lsn
        self.states[account.id] = NO_ENTRIES
        self.accounts[account.id] = account
        self._appended()
        return lsn

    def commit(self, request: TransferRequest, deliver: Deliver, completion: Completion) -> Transfer | str:
        """Decide a reserved transfer from the projection (`rules.decide`), then stamp and
        journal its commit and deliver its two entries; or return the refusal's code,
        journaling nothing (the caller rejects).

        Only the destination's credit can be refused here (see `coordinator._rules`).
        `completion.value` is set to the Transfer before the record is queued, and the
        writer releases it once the record is durable.
        """
        tid, source, destination, amount = request.id, request.source, request.destination, request.amount
        accounts, states = self.accounts, self.states
        chunk = Chunk()
        with self.lock:
            decided = decide(amount, accounts.get(source), accounts.get(destination), states[source],
                             states[destination], 0)
            if isinstance(decided, str):
                return decided
            lsn = self._journal.last_lsn + 1
            self.stamp_commit(chunk, tid, source, destination, amount, lsn, completion, decided)
            appended = self._append(chunk)
            assert appended == lsn, (appended, lsn)
            crash_point("after-commit-queued")
            debit_seq, debit_balance, credit_seq, credit_balance = decided
            states[source] = (debit_seq, debit_balance, lsn)
            states[destination] = (credit_seq, credit_balance, lsn)
            deliver(
                Posting(source, debit_seq, -amount, debit_balance, lsn),
                Posting(destination, credit_seq, amount, credit_balance, lsn),
            )
            self._appended()
        return cast(Transfer, completion.value)

    def stamp_commit(
        self,
        chunk: Chunk,
        tid: str,
        source: str,
        destination: str,
        amount: int,
        lsn: int,
        completion: Completion,
        stamp: Stamp,
    ) -> None:
        """Add the commit record of a transfer at `lsn` to `chunk`, its entries as `decide`
        stamped them. Call under `lock`; the caller moves the projection (`states`) past the
        entries. `completion.value` becomes the Transfer."""
        debit_seq, debit_balance, credit_seq, credit_balance = stamp
        prefixes = self._prefixes
        source_prefix = prefixes.get(source) or prefixes.setdefault(source, entry_prefix(source))
        target_prefix = prefixes.get(destination) or prefixes.setdefault(destination, entry_prefix(destination))
        completion.value = stamped_transfer(tid, source, destination, amount, lsn)
        chunk.payloads.append(
            encode([COMMIT, tid, source, destination, amount, debit_seq, debit_balance, credit_seq, credit_balance])
        )
        chunk.completions.append(completion)
        chunk.transfers += (id_key(tid), _U64.pack(lsn))  # `lsn_value`, inline
        chunk.accounts += (source, destination)
        chunk.entries += (
            source_prefix + _U64.pack(debit_seq), encode_entry_value(tid, -amount, debit_balance, lsn),
            target_prefix + _U64.pack(credit_seq), encode_entry_value(tid, amount, credit_balance, lsn),
        )

    def stamp_reject(self, chunk: Chunk, request: TransferRequest, code: str, lsn: int, completion: Completion) -> None:
        """Add the rejection record of `request` at `lsn` to `chunk` (under `lock`);
        `completion.value` becomes the `Refusal`."""
        completion.value = Refusal(request, code, lsn)
        chunk.payloads.append(encode([REJECT, request.id, request.source, request.destination, request.amount, code]))
        chunk.completions.append(completion)
        chunk.transfers += (id_key(request.id), lsn_value(lsn))

    def reject(self, request: TransferRequest, code: str, completion: Completion) -> int:
        """Journal a refusal; it consumes the transfer id. `completion.value` becomes the
        `Refusal` before the record is queued; the writer releases it once durable."""
        chunk = Chunk()
        with self.lock:
            lsn = self._journal.last_lsn + 1
            self.stamp_reject(chunk, request, code, lsn, completion)
            appended = self._append(chunk)
            assert appended == lsn, (appended, lsn)
            self._appended()
        return lsn

    def append_chunk(self, chunk: Chunk) -> int:
        """Journal the records stamped in `chunk` (under `lock`, at consecutive LSNs from
        `last_lsn + 1`, the projection already past them); return the first LSN. The
        caller made room with `journal.wait_room` under this same hold of `lock`, so this
        never waits: it raises only if the journal failed, and then nothing was queued."""
        first = self._append(chunk, room_made=True)
        self._appended(len(chunk))
        return first

    def _append(self, chunk: Chunk, room_made: bool = False) -> int:
        """Queue the chunk's records, their entries unindexed ones from before the records are
        queued (the writer may make them durable at once); a chunk the journal refuses leaves
        no entry behind, and its LSNs go to the next records."""
        assert self.lock.locked()
        self.unindexed.add(chunk.accounts, chunk.entries)
        try:
            return self._journal.append_block(chunk.payloads, {TRANSFERS_INDEX: chunk.transfers}, chunk.completions,
                                              room_made)
        except BaseException:
            self.unindexed.remove(chunk.accounts)
            raise

    def _appended(self, records: int = 1) -> None:
        """Count records appended; journal a checkpoint when one is due. The records are
        queued already, so a checkpoint that cannot be queued must not fail them: it is
        logged and tried again after the next record (the writer reports its own failure)."""
        self._since_checkpoint += records
        self.unindexed.release(self._journal.durable_lsn)
        if self._since_checkpoint >= self.checkpoint_interval or self.unindexed.count >= UNINDEXED_ENTRIES_MAX:
            try:
                self.checkpoint()
            except JournalError:
                logger.exception("checkpoint not journaled; trying again after the next record")

    def checkpoint(self) -> int:
        """Journal the projection of every account as of now (call with `lock` held), and
        with it, in its transaction, the entry index rows of every commit since the last.

        Opening the ledger starts from the newest checkpoint and replays only the
        records after it; a full replay checks every checkpoint it passes.
        """
        assert self.lock.locked()
        fixed, states = self._fixed_rows, self.states
        if len(fixed) < len(self.accounts):  # accounts only grow, in order: add the new ones
            for account in islice(self.accounts.values(), len(fixed), None):
                fixed[account.id] = (account.id, account.currency, account.overdraft_limit, self.account_lsns[account.id])
        # Tuples of str and int, which the collector stops tracking (lists it would walk).
        rows = [row + states[account_id] for account_id, row in fixed.items()]
        lsn = self._journal.last_lsn + 1
        index: IndexPuts = {CHECKPOINTS_INDEX: [lsn_value(lsn), b""], ENTRIES_INDEX: self.unindexed.ordered()}
        appended = self._journal.append_block([encode([CHECKPOINT, rows])], index, [None])
        assert appended == lsn, (appended, lsn)
        self.unindexed.carry(lsn)
        crash_point("during-checkpoint")
        self._since_checkpoint = 0
        return lsn
