"""Opening accounts: the sequencer's half that journals new accounts.

`AccountOpening` is a base class of `coordinator._sequencer.Sequencer`, which holds (and sets
up) the projection and the journal these methods read and move. An account is opened under
the sequencer's lock, which the caller holds having checked its id is free: its record is
stamped (`Stamping.timestamp`) and queued with its accounts index entry, and the projection
takes the account once the record is queued (`_opened`), also when an interrupt came out of
the append after it was. An account's record hands nothing to any account: there are no
postings to deliver.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from journal import Completion, Journal

from coordinator._records import ACCOUNT4, ACCOUNTS_INDEX, ENTRIES_INDEX, encode, id_key, lsn_value
from coordinator._stamps import Stamping
from coordinator._state import NO_ENTRIES
from coordinator._values import Account


class AccountOpening(Stamping):
    """The account-opening methods of `coordinator._sequencer.Sequencer`, which holds (and
    sets up) what they read and move; each is called with the sequencer's lock held."""

    lock: threading.Lock
    _journal: Journal
    account_lsns: dict[str, int]
    _journaled_timestamp: int
    _holds_from_due: bool

    def open_account(self, account: Account, completion: Completion) -> int:
        """Journal a new account. The caller checked, under `lock`, that the id is free."""
        assert self.lock.locked()
        assert account.id not in self.accounts, account.id
        metadata = None if account.metadata is None else account.metadata.as_dict()
        payload = encode([ACCOUNT4, self.timestamp(), account.id, account.currency, account.overdraft_limit,
                          account.code, metadata])
        lsn = self._journal.last_lsn + 1
        index = [(ACCOUNTS_INDEX, id_key(account.id), lsn_value(lsn))]
        if self._holds_from_due:
            marks = iter(self._marked({}, lsn)[ENTRIES_INDEX])
            index += ((ENTRIES_INDEX, key, value) for key, value in zip(marks, marks, strict=True))
        try:
            appended = self._journal.append(payload, index, completion)
        finally:
            self._opened((account,), lsn)
        assert appended == lsn, (appended, lsn)
        self._appended()
        return lsn

    def open_accounts(self, accounts: Sequence[Account]) -> int:
        """Journal new accounts as one block (`open_account` of each, in order); the LSN of
        the last. The caller checked, under `lock`, that every id is free and none repeats."""
        assert self.lock.locked()
        payloads: list[bytes] = []
        keys: list[bytes] = []
        first = lsn = self._journal.last_lsn + 1
        readings = [self.clock() for _ in accounts]  # every reading first: a bad one raises before anything moved
        for account, now in zip(accounts, readings, strict=True):
            timestamp = self.timestamp(1, now)
            metadata = None if account.metadata is None else account.metadata.as_dict()
            payloads.append(encode([ACCOUNT4, timestamp, account.id, account.currency, account.overdraft_limit,
                                    account.code, metadata]))
            keys += (id_key(account.id), lsn_value(lsn))
            lsn += 1
        try:
            appended = self._journal.append_block(payloads, self._marked({ACCOUNTS_INDEX: keys}, first),
                                                  [None] * len(payloads))
        finally:
            self._opened(accounts, first)
        assert appended == first, (appended, first)
        self._appended(len(payloads))
        return first + len(payloads) - 1

    def _opened(self, accounts: Sequence[Account], first: int) -> None:
        """The projection takes the accounts journaled from `first` on, if their records were
        queued: also when an interrupt came out of the append after it queued them (else a
        retry would find the ids free and journal them twice)."""
        if self._journal.last_lsn < first:
            return
        self._journaled_timestamp = self.last_timestamp
        self._holds_from_due = False
        self.index_entries += len(accounts)
        account_lsns, states, known = self.account_lsns, self.states, self.accounts
        for lsn, account in enumerate(accounts, first):
            account_lsns[account.id] = lsn
            states[account.id] = NO_ENTRIES
            known[account.id] = account  # last: threads that find it there (without the lock) find the rest
