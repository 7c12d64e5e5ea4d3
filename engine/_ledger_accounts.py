"""Opening accounts: `AccountCreating`, a base class of `Ledger` (`engine._ledger`).

`create_account` and `create_accounts`, and their halves up to the wait for durability
(`_open_account`, `_open_accounts`, which `AsyncLedger` calls on a worker and then waits on its
loop). Each account is journaled by the sequencer (`Sequencer.open_account`, `open_accounts`)
under its lock, having checked there that the id is free or holds the same account; a list of
them is journaled in blocks of `ACCOUNTS_PER_BLOCK_MAX`, one hold of that lock each. `Ledger`
holds (and sets up) the journal and the sequencer these read; the reads of the accounts are
`engine._ledger_reads`' (`LedgerReads`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from coordinator import (
    ACCOUNTS_PER_BLOCK_MAX,
    Account,
    InvalidRequest,
    LedgerError,
    ledger_error,
)
from journal import Completion, JournalError

from engine._checks import account_exists, checked_account, checked_accounts
from engine._ledger_reads import LedgerReads


class AccountCreating(LedgerReads):
    """The account-opening methods of `Ledger` (see the module docstring); `Ledger` holds
    what they read."""

    def create_account(self, id: str, *, currency: str, overdraft_limit: int | None = 0, code: int = 0,
                       metadata: Mapping[str, str | int] | None = None) -> Account:
        """Open an account; return once it is durable. Idempotent for identical parameters.

        `code` is a type the host defines (0..65535); `metadata`, at most 16 `str` keys of
        at most 64 characters, each to a `str` of at most 256 characters or an `int`.
        Raises `InvalidRequest` for a malformed id, currency, limit, code or metadata, and
        `AccountExists` if the id exists with different parameters.
        """
        account = checked_account(id, currency, overdraft_limit, code, metadata)
        with self._call():
            self._journal.wait_durable(self._open_account(account), self.timeout_s)
            return account

    def _open_account(self, account: Account) -> int:
        """`create_account` up to its wait: journal a new account (or find it); the LSN to wait
        for. Never waits but for the sequencer lock. Raises `AccountExists`."""
        sequencer = self._sequencer
        with sequencer.lock:
            existing = sequencer.accounts.get(account.id)
            if existing is None:
                return sequencer.open_account(account, Completion(account))
            lsn = sequencer.account_lsns[account.id]
        if existing != account:
            raise account_exists(existing)
        return lsn

    def create_accounts(self, accounts: Sequence[Account]) -> list[Account | LedgerError]:
        """Open many accounts at once: one outcome per item, in order, as if `create_account`
        were called for each in turn; returns once every outcome is durable.

        Each item is an `Account` (its fields are `create_account`'s arguments; `metadata`
        may be any mapping). Its outcome is the account, or the `LedgerError` that call would
        have raised: `InvalidRequest` (a field malformed, or the item not an `Account`), or
        `AccountExists` (the id exists, or came earlier in the list, with other fields).
        Accounts are journaled in blocks of `ACCOUNTS_PER_BLOCK_MAX`, each under one hold of
        the sequencer lock. Raises `InvalidRequest` if `accounts` is not a sequence.
        """
        results = checked_accounts(accounts)
        with self._call():
            self._journal.wait_durable(self._open_accounts(results), self.timeout_s)
        return results

    def _open_accounts(self, results: list[Account | LedgerError]) -> int:
        """`create_accounts` up to its wait: journal the new accounts of `results`, block by
        block, turning each that exists otherwise into `AccountExists`; the LSN to wait for.
        The journal failing (or closing) at the first block raises; at a later one, that
        block's items and the rest get its error, the earlier blocks being journaled."""
        sequencer, last = self._sequencer, 0
        for first in range(0, len(results), ACCOUNTS_PER_BLOCK_MAX):
            try:
                with sequencer.lock:
                    last = max(last, self._open_block(results, first))
            except JournalError as error:
                if not first:
                    raise
                failure = ledger_error(error)
                results[first:] = [failure if isinstance(result, Account) else result for result in results[first:]]
                return last
        return last

    def _open_block(self, results: list[Account | LedgerError], first: int) -> int:
        """`create_accounts` of `results[first:first + ACCOUNTS_PER_BLOCK_MAX]` (call under the
        sequencer lock): journal the new ones as one block, turn each existing one that
        differs into `AccountExists`; the LSN to wait for."""
        sequencer = self._sequencer
        known, lsns = sequencer.accounts, sequencer.account_lsns
        new: dict[str, Account] = {}
        last = 0
        for i in range(first, min(first + ACCOUNTS_PER_BLOCK_MAX, len(results))):
            account = results[i]
            if not isinstance(account, Account):
                continue
            existing = known.get(account.id) or new.get(account.id)
            if existing is None:
                new[account.id] = account
            elif existing != account:
                results[i] = account_exists(existing)
            elif account.id in lsns:
                last = max(last, lsns[account.id])
        if new:
            try:
                last = sequencer.open_accounts(list(new.values()))
            except InvalidRequest as error:  # a bad reading of a clock of one's own: this block is not opened
                for i in range(first, min(first + ACCOUNTS_PER_BLOCK_MAX, len(results))):
                    account = results[i]
                    if isinstance(account, Account) and account.id in new:
                        results[i] = error
        return last
