"""The audit: every invariant a ledger must satisfy, checked from its journal alone.

Used by `tally verify` (read-only) and `tally recover`, and by the state hash
the engine reports. The checks, each named in the report:

0. the data file is sound: its meta pages, its length, every page and the free list
   (checked as the journal opens, before LMDB reads it), and it is the file its anchor
   names;
1. every record's checksum is valid; every LSN present once, in order (the scan), up to
   the LSN the anchor saw durable;
2. per-account seq gapless from 1, each entry's balance the running sum (replay with the
   pure `post`), and every commit one the rules allow: replay decides it again
   (`rules.decide`) and it must be what was stamped;
3. checkpoints agree with the records before them;
4. money is conserved: posted balances sum to zero;
5. each committed transfer has exactly two entries, on its source and its
   destination, summing to zero (the entry index against the commit records:
   every commit before the newest checkpoint has both entries indexed, exactly
   as the record stamps them; see `coordinator._entries`);
6. the transfer and account indexes point at the records that made them (and the
   checkpoints index names the last checkpoint record);
7. no reservation is left: reservations are never journaled, so none survives a crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from journal import Journal, JournalCorruptedError

from coordinator._entries import Rows, commit_rows, decode_entry, entry_rows, newest_checkpoint_lsn, unindexed_entries
from coordinator._errors import JournalCorrupted
from coordinator._records import (
    ACCOUNTS_INDEX,
    CHECKPOINT,
    COMMIT,
    ENTRIES_INDEX,
    REJECT,
    TRANSFERS_INDEX,
    decode,
    id_key,
    value_lsn,
)
from coordinator._recovery import Recovered, replay
from coordinator._values import Account

CHECK_FILE = "the data file is sound (meta pages, every page, the free list, every index entry) and is the one its anchor names"
CHECK_RECORDS = "every record's checksum is valid and every LSN is present once, in order"
CHECK_ENTRIES = "per-account seq is gapless from 1 and each balance is the running sum"
CHECK_LIMITS = "every commit is one the rules allow (one currency, no balance below its limit or out of range)"
CHECK_CHECKPOINTS = "checkpoints agree with the records before them"
CHECK_CONSERVED = "money is conserved (posted balances sum to 0)"
CHECK_PAIRS = "each committed transfer has exactly two entries, on its source and destination, summing to 0"
CHECK_INDEXES = "the transfer and account indexes point at the records that made them"
CHECK_RESERVATIONS = "no reservation is left (reservations are never journaled)"
CHECKS = (CHECK_FILE, CHECK_RECORDS, CHECK_ENTRIES, CHECK_LIMITS, CHECK_CHECKPOINTS, CHECK_CONSERVED,
          CHECK_PAIRS, CHECK_INDEXES, CHECK_RESERVATIONS)


@dataclass
class AuditReport:
    books: Recovered | None = None
    checks: dict[str, bool | None] = field(default_factory=dict)
    """Each check: True passed, False failed, None not reached (an earlier one failed)."""
    problem: str | None = None
    corrupt_lsn: int | None = None

    @property
    def whole(self) -> bool:
        return all(passed is True for passed in self.checks.values())


def _replay_failure(error: JournalCorrupted) -> str:
    text = str(error)
    if "checksum" in text or "missing" in text or "does not decode" in text or "shape" in text or "version" in text:
        return CHECK_RECORDS
    if "the rules" in text:
        return CHECK_LIMITS
    if "checkpoint" in text:
        return CHECK_CHECKPOINTS
    if "sum to" in text:
        return CHECK_CONSERVED
    return CHECK_ENTRIES


def audit(journal: Journal, progress: Callable[[int], None] | None = None) -> AuditReport:
    """Run every check over the whole journal; never writes."""
    report = AuditReport(checks=dict.fromkeys(CHECKS))
    found = journal.problem
    if found is not None and found.lsn is None:  # the data file is not the one its anchor names
        return failed(report, CHECK_FILE, str(found), None)
    try:
        books = replay(journal, progress=progress)
    except JournalCorrupted as error:
        return failed(report, _replay_failure(error), str(error), error.lsn)
    if found is not None:  # records missing past the last one (the anchor saw them durable)
        return failed(report, CHECK_RECORDS, str(found), found.lsn)
    report.books = books
    for check in (CHECK_FILE, CHECK_RECORDS, CHECK_ENTRIES, CHECK_LIMITS, CHECK_CHECKPOINTS, CHECK_CONSERVED,
                  CHECK_RESERVATIONS):
        report.checks[check] = True
    try:
        pairs, indexes = _cross_check(journal, books)
    except JournalCorruptedError as error:  # an index entry fails its checksum
        pairs, indexes = (str(error), None) if error.where == f"the {ENTRIES_INDEX} index" else (None, str(error))
    report.checks[CHECK_PAIRS] = pairs is None
    report.checks[CHECK_INDEXES] = indexes is None
    report.problem = pairs or indexes
    return report


def failed(report: AuditReport, check: str, problem: str, lsn: int | None) -> AuditReport:
    """`report` with the checks before `check` passed, `check` failed, and the rest not reached."""
    for earlier in CHECKS[: CHECKS.index(check)]:
        report.checks[earlier] = True
    report.checks[check] = False
    report.problem, report.corrupt_lsn = problem, lsn
    return report


def unopened(error: JournalCorrupted) -> AuditReport:
    """The report on a journal that could not be opened for its damage."""
    return failed(AuditReport(checks=dict.fromkeys(CHECKS)), CHECK_FILE, str(error), error.lsn)


def _cross_check(journal: Journal, books: Recovered) -> tuple[str | None, str | None]:
    """Compare the indexes with the records: (entry problem, index problem).

    An entry may be missing from the index only if no checkpoint record follows its
    commit (the next checkpoint writes it); the checkpoints index must name the last
    checkpoint record, since readers trust it to tell where the unindexed entries start."""
    commits = rejects = indexed = last_checkpoint = 0
    missing: list[str] = []
    """Entries absent from the index, since the last checkpoint record met."""
    with journal.snapshot() as txn:
        for lsn, payload in journal.scan(0, txn):
            record = decode(lsn, payload)
            kind = record[0]
            if kind == CHECKPOINT:
                if missing:
                    return missing[0], None
                last_checkpoint = lsn
            if kind not in (COMMIT, REJECT):
                continue
            tid = record[1]
            stored = journal.index_get(TRANSFERS_INDEX, id_key(tid), txn)
            if stored is None or value_lsn(stored) != lsn:
                return None, f"the transfer index does not point {tid!r} at LSN {lsn}"
            if kind == REJECT:
                rejects += 1
                continue
            commits += 1
            for key, value in commit_rows(lsn, record):
                stored = journal.index_get(ENTRIES_INDEX, key, txn)
                if stored is None:
                    missing.append(f"transfer {tid!r} at LSN {lsn} lacks its entry {key!r}")
                elif stored != value:
                    return f"transfer {tid!r} at LSN {lsn} has a wrong entry {key!r}", None
                else:
                    indexed += 1
        entries = sum(1 for _ in journal.index_keys(ENTRIES_INDEX, txn))
        transfers = sum(1 for _ in journal.index_keys(TRANSFERS_INDEX, txn))
        accounts = sum(1 for _ in journal.index_keys(ACCOUNTS_INDEX, txn))
        checkpoint_lsn = newest_checkpoint_lsn(journal, txn)
    if entries != indexed:
        return f"{entries} entries are indexed, {indexed} of them for the {commits} committed transfers", None
    if transfers != commits + rejects or accounts != len(books.accounts):
        return None, f"the indexes hold {transfers} transfers and {accounts} accounts; the records {commits + rejects} and {len(books.accounts)}"
    if checkpoint_lsn != last_checkpoint:
        return None, f"the checkpoints index names LSN {checkpoint_lsn}, the last checkpoint record is at LSN {last_checkpoint}"
    return None, None


def state_hash(journal: Journal, accounts: Iterable[Account], txn: Any | None = None, unindexed: Rows | None = None) -> str:
    """SHA-256 over every account and all its entries (seq, transfer, amount, balance),
    in account-id order. LSNs are left out, so a replay into a fresh ledger hashes the same.

    `unindexed`: the entries the index does not hold yet, as the writing process keeps
    them (taken before `txn` opens); by default they are derived from the records of `txn`."""
    if txn is None:
        with journal.snapshot() as txn:
            return state_hash(journal, accounts, txn, unindexed)
    if unindexed is None:
        unindexed = unindexed_entries(journal, txn)
    digest = hashlib.sha256()
    for account in sorted(accounts, key=lambda a: a.id):
        digest.update(msgpack.packb([account.id, account.currency, account.overdraft_limit]))
        for row in entry_rows(journal, account.id, unindexed.get(account.id, ()), txn=txn):
            _seq, transfer_id, amount, balance, _lsn = decode_entry(account.id, row)
            digest.update(msgpack.packb([row[0][-8:], transfer_id, amount, balance]))
    return digest.hexdigest()
