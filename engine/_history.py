"""Reading a ledger's history: point-in-time balances, snapshots and pages of transfers.

Every read here is of durable history as of an LSN (`coordinator._asof`), which never
changes: so a `Snapshot` holds no LMDB reader between its calls (each opens its own, for the
length of the call) and stalls neither the journal's writer nor the growth of its map, however
long it lives. It is bounded all the same, by `max_age_s`: a view of the past used as if it
were current is a bug a host should hear of.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from coordinator import (
    SNAPSHOT_AGE_S_MAX,
    TRANSFERS_PAGE_MAX,
    Balance,
    Entry,
    InvalidRequest,
    Row,
    SnapshotExpired,
    Transfer,
    balance_at,
    check_code,
    check_id,
    items_of,
    check_kind,
    entries_at,
    lsn_at_timestamp,
    opened_lsn,
    record_timestamp,
    seconds_of,
    shown,
    transfer_at,
    transfers_page,
)
from journal import LSN_MAX, Journal


def check_count(name: str, value: object, low: int = 0) -> int:
    if type(value) is not int or value < low:
        raise InvalidRequest(f"{name} must be an int >= {low}, got {shown(value)}")
    return value


def check_lsn(name: str, value: object) -> int:
    """A position in the journal: an int in 0..`LSN_MAX`, past its durable end or not (the
    caller decides what a position still to come reads as); `InvalidRequest` otherwise."""
    if type(value) is not int or not 0 <= value <= LSN_MAX:
        raise InvalidRequest(f"{name} must be an int in 0..{LSN_MAX}, got {shown(value)}")
    return value


class History:
    """A ledger's durable history, read as of an LSN. `end()` is the durable LSN, `rows(account,
    end)` the account's durable entries past the newest checkpoint and `holds(account, end)`
    its hold rows, from memory (read before each read's snapshot opens), `clock()` the ledger's
    time in nanoseconds since the epoch. Safe from any thread; blocks only on LMDB reads."""

    def __init__(self, journal: Journal, end: Callable[[], int], rows: Callable[[str, int], list[Row]],
                 holds: Callable[[str, int], list[Row]], clock: Callable[[], int],
                 settled_end: Callable[[int], int] | None = None) -> None:
        self._journal = journal
        self.end = end
        self._settled_end = settled_end or (lambda _timestamp: end())
        """`end`, once every record stamped before the call is durable, for a read at the
        timestamp it is given (after which a ledger stamps nothing at or before that time)."""
        self._rows = rows
        self._holds = holds
        self._clock = clock

    def _memory(self, account_id: str) -> tuple[list[Row], list[Row]]:
        """The account's entries and hold rows past the newest checkpoint that are durable, from
        memory: read before the caller's snapshot opens."""
        end = self.end()
        return self._rows(account_id, end), self._holds(account_id, end)

    def lsn_of(self, at_lsn: object = None, at_timestamp: object = None) -> int:
        """The LSN a read `at_lsn` or `at_timestamp` (at most one; neither: the durable end)
        is of. `InvalidRequest` for an LSN past the durable end or a time still to come. A
        time past the last durable stamp is read once every record stamped before the clock
        was read is durable (`settled_end`), so the same question never gets another answer."""
        if at_lsn is not None and at_timestamp is not None:
            raise InvalidRequest("give at most one of at_lsn and at_timestamp")
        if at_lsn is not None:
            lsn = check_lsn("at_lsn", at_lsn)
            end = self.end()
            if lsn > end:
                raise InvalidRequest(f"at_lsn {shown(lsn)} is past the durable end of the journal (LSN {end})")
            return lsn
        if at_timestamp is None:
            return self.end()
        timestamp = check_count("at_timestamp", at_timestamp)
        clock = self._clock()  # before the end is settled: every record stamped up to it is in then
        end = self.end()
        journal = self._journal
        with journal.snapshot() as txn:
            stamped = record_timestamp(journal, end, txn, last=True)
            if timestamp <= stamped:  # stamps grow with LSNs: no record still to land is stamped at or before it
                return lsn_at_timestamp(journal, timestamp, end, txn)
        now = max(clock, stamped)  # (a ledger's timestamps may run ahead of its clock: the clock stepped back)
        if timestamp > now:
            raise InvalidRequest(f"at_timestamp {shown(timestamp)} is still to come (the ledger's clock reads {now})")
        end = self._settled_end(timestamp)
        with journal.snapshot() as txn:
            return lsn_at_timestamp(journal, timestamp, end, txn)

    def timestamp(self, lsn: int) -> int:
        """The timestamp of the record at `lsn` (`coordinator.record_timestamp`; 0 at LSN 0)."""
        with self._journal.snapshot() as txn:
            return record_timestamp(self._journal, lsn, txn)

    def balance(self, account_id: str, lsn: int) -> Balance:
        check_id(account_id, "account id")
        rows, holds = self._memory(account_id)
        with self._journal.snapshot() as txn:
            return balance_at(self._journal, account_id, lsn, rows, holds, txn)

    def balances(self, lsn: int, accounts: Iterable[str]) -> dict[str, Balance]:
        """`balance` of each account, in one LMDB read transaction."""
        journal, end = self._journal, self.end()
        rows = {account_id: (self._rows(check_id(account_id, "account id"), end), self._holds(account_id, end))
                for account_id in accounts}  # (one `end` for all, not `_memory`'s each)
        with journal.snapshot() as txn:
            return {account_id: balance_at(journal, account_id, lsn, found, holds, txn)
                    for account_id, (found, holds) in rows.items()}

    def entries(self, account_id: str, lsn: int, after: object = 0, limit: object = None) -> list[Entry]:
        check_id(account_id, "account id")
        after = check_count("after", after)
        if limit is not None:
            limit = check_count("limit", limit)
        rows, _ = self._memory(account_id)
        with self._journal.snapshot() as txn:
            return entries_at(self._journal, account_id, lsn, after, limit, rows, txn)  # type: ignore[arg-type]

    def transfer(self, transfer_id: str, lsn: int) -> Transfer | None:
        check_id(transfer_id, "transfer id")
        with self._journal.snapshot() as txn:
            return transfer_at(self._journal, transfer_id, lsn, txn)

    def transfers(self, *, account: object = None, code: object = None, kind: object = None, after_lsn: object = 0,
                  until_lsn: object = None, limit: object = 100, reverse: object = False,
                  end: int | None = None) -> list[Transfer]:
        """`Ledger.transfers`, its arguments checked; `end`: the LSN the page may not pass
        (a snapshot's; by default the durable end)."""
        end = self.end() if end is None else end
        if account is not None:
            check_id(account, "account")
        if code is not None:
            check_code(code)
        check_kind(kind)
        after = check_lsn("after_lsn", after_lsn)
        until = end if until_lsn is None else check_lsn("until_lsn", until_lsn)
        if until > end:
            raise InvalidRequest(f"until_lsn {shown(until)} is past the durable end of the journal (LSN {end})")
        if type(limit) is not int or not 1 <= limit <= TRANSFERS_PAGE_MAX:
            raise InvalidRequest(f"limit must be an int in 1..{TRANSFERS_PAGE_MAX}, got {shown(limit)}")
        if type(reverse) is not bool:
            raise InvalidRequest(f"reverse must be a bool, got {shown(reverse)}")
        if after >= until and account is None:
            return []
        rows, holds = ([], []) if account is None else self._memory(account)  # type: ignore[arg-type]
        with self._journal.snapshot() as txn:
            if account is not None:  # as `balance` and `entries` at `end`: unknown, or opened after it
                opened_lsn(self._journal, account, end, txn)  # type: ignore[arg-type]
            if after >= until:
                return []
            return transfers_page(self._journal, account=account, code=code, kind=kind,  # type: ignore[arg-type]
                                  after_lsn=after, until_lsn=until, limit=limit, reverse=reverse, unindexed=rows,
                                  holds=holds, txn=txn, as_of=end)


class Snapshot:
    """A consistent view of a ledger at one LSN (`Ledger.snapshot()`): every read answers as of
    `lsn`, whatever lands meanwhile. Use it as a context manager; it answers until it is left,
    its ledger closes (`LedgerClosed`) or `max_age_s` passes (`SnapshotExpired`)."""

    def __init__(self, history: History, lsn: int, max_age_s: float, call: Callable[[], Any],
                 opened: Callable[[], Mapping[str, int]]) -> None:
        self._history = history
        self.lsn = lsn
        """The LSN it is a view at: the durable end when it was taken."""
        self.timestamp = history.timestamp(lsn)
        """The timestamp of the record at `lsn` (`coordinator.record_timestamp`)."""
        self._deadline = time.monotonic() + max_age_s
        self._max_age_s = max_age_s
        self._call = call
        self._opened = opened
        self._left = False

    def __enter__(self) -> Snapshot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._left = True

    def _check(self) -> None:
        if self._left:
            raise SnapshotExpired(f"the snapshot at LSN {self.lsn} was closed")
        if time.monotonic() > self._deadline:
            raise SnapshotExpired(f"the snapshot at LSN {self.lsn} is older than its max_age_s ({self._max_age_s} s)")

    def balance(self, account: str) -> Balance:
        """The account's balance at `lsn` (its pending transfers open then; no reservation)."""
        with self._call():
            self._check()
            return self._history.balance(account, self.lsn)

    def balances(self, accounts: Iterable[str] | None = None) -> dict[str, Balance]:
        """The balance of each of `accounts` at `lsn`; None: of every account open then."""
        with self._call():
            self._check()
            if accounts is None:
                opened = self._opened()
                accounts = [account for account, lsn in list(opened.items()) if lsn <= self.lsn]  # (one step: a
                # dict another thread adds to meanwhile is copied whole, never iterated as it grows)
            elif isinstance(accounts, (str, bytes)) or not isinstance(accounts, Iterable):
                raise InvalidRequest(f"accounts must be None or an iterable of account ids, got {shown(accounts)}")
            else:
                accounts = items_of(accounts, "Snapshot.balances")  # read once: an error of the caller's is bad input
            return self._history.balances(self.lsn, accounts)

    def entries(self, account: str, after: int = 0, limit: int | None = None) -> list[Entry]:
        """The account's entries made at or before `lsn`, with seq > `after`, at most `limit`."""
        with self._call():
            self._check()
            return self._history.entries(account, self.lsn, after, limit)

    def get_transfer(self, id: str) -> Transfer | None:
        """The transfer as of `lsn` (None if not committed by then), its status then."""
        with self._call():
            self._check()
            return self._history.transfer(id, self.lsn)

    def transfers(self, *, account: str | None = None, code: int | None = None, kind: str | None = None,
                  after_lsn: int = 0, until_lsn: int | None = None, limit: int = 100,
                  reverse: bool = False) -> list[Transfer]:
        """`Ledger.transfers` as of `lsn`: `until_lsn` at most `lsn` (by default, `lsn`)."""
        with self._call():
            self._check()
            return self._history.transfers(account=account, code=code, kind=kind, after_lsn=after_lsn,
                                           until_lsn=until_lsn, limit=limit, reverse=reverse, end=self.lsn)


def check_max_age(max_age_s: object) -> float:
    age_s = seconds_of(max_age_s)
    if not (age_s is not None and 0 < age_s <= SNAPSHOT_AGE_S_MAX):  # False for NaN
        raise InvalidRequest(f"max_age_s must be a number of seconds in (0, {SNAPSHOT_AGE_S_MAX:.0f}], "
                             f"got {shown(max_age_s)}")
    return float(age_s)
