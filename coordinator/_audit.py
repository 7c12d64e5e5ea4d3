"""The audit: every invariant a ledger must satisfy, checked from its journal alone.

Used by `tally verify` (read-only) and `tally recover`, and by the state hash
the engine reports. The checks, each named in the report:

0. the data file is sound: its meta pages, its length, every page and the free list
   (checked as the journal opens, before LMDB reads it), and it is the file its anchor
   names;
1. every record's checksum is valid; every LSN present once, in order (the scan), up to
   the LSN the anchor saw durable;
1a. the hash chain holds: each chained record's digest follows from the record before it, and
   no unchained record comes after a chained one (or at all, in a format-4 ledger)
   (`Journal.verify_chain`, a walk of its own: a SHA-256 a record). Records of a format-1-3
   ledger from before its first write by a chaining Tally predate the chain: the report
   (`AuditReport.chain`) says which; they are checked by 1 only;
2. per-account seq gapless from 1, each entry's balance the running sum (replay with the
   pure `post`), and every commit one the rules allow: replay decides it again
   (`rules.decide`) and it must be what was stamped;
3. checkpoints agree with the records before them;
4. money is conserved: posted balances sum to zero;
5. each transfer that moves money (a single one, a post) has exactly two entries, on
   its source and its destination, summing to zero (the entry index against the commit records:
   every commit before the newest checkpoint has both entries indexed, exactly
   as the record stamps them; see `coordinator._entries`);
6. the transfer and account indexes point at the records that made them (an id at its
   commit or refusal, a resolved pending transfer at what resolved it; and the
   checkpoints index names the last checkpoint record);
7. no reservation is left: reservations are never journaled, so none survives a crash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgpack
from journal import ChainHead, ChainReport, Journal, JournalCorruptedError

from coordinator._entries import (
    Rows,
    commit_rows,
    decode_entry,
    entry_rows,
    marked_through,
    newest_checkpoint_lsn,
    unindexed_entries,
)
from coordinator._errors import JournalCorrupted
from coordinator._history import Checkpointed, Committed, Expired, Refused, named_record, typed
from coordinator._holds import HoldTracker, holds_from
from coordinator._records import (
    ACCOUNTS_INDEX,
    DIGEST_MARK,
    ENTRIES_INDEX,
    HOLDS_FROM_KEY,
    RESOLUTION_MARK,
    TRANSFERS_INDEX,
    decode,
    encode_holds,
    holds_key,
    id_key,
    is_entry_key,
    is_hold_key,
    resolution_key,
    value_lsn,
)
from coordinator._checkpoints import Recovered
from coordinator._recovery import replay
from coordinator._state import Pending
from coordinator._values import Account, Resolution

CHECK_FILE = "the data file is sound (meta pages, every page, the free list, every index entry) and is the one its anchor names"
CHECK_RECORDS = "every record's checksum is valid and every LSN is present once, in order"
CHECK_CHAIN = "the hash chain holds: every chained record extends the one before it (SHA-256)"
CHECK_ENTRIES = "per-account seq is gapless from 1 and each balance is the running sum"
CHECK_LIMITS = "every commit is one the rules allow (one currency, no balance below its limit or out of range)"
CHECK_CHECKPOINTS = "checkpoints agree with the records before them"
CHECK_CONSERVED = "money is conserved (posted balances sum to 0)"
CHECK_PAIRS = "each committed transfer has exactly two entries, on its source and destination, summing to 0"
CHECK_INDEXES = "the transfer and account indexes point at the records that made them"
CHECK_RESERVATIONS = "no reservation is left (reservations are never journaled)"
CHECKS = (CHECK_FILE, CHECK_RECORDS, CHECK_CHAIN, CHECK_ENTRIES, CHECK_LIMITS, CHECK_CHECKPOINTS, CHECK_CONSERVED,
          CHECK_PAIRS, CHECK_INDEXES, CHECK_RESERVATIONS)


@dataclass
class AuditReport:
    books: Recovered | None = None
    checks: dict[str, bool | None] = field(default_factory=dict)
    """Each check: True passed, False failed, None not reached (an earlier one failed)."""
    problem: str | None = None
    corrupt_lsn: int | None = None
    chain: ChainReport | None = None
    """The walk of the hash chain (None: the data file could not be read)."""

    @property
    def whole(self) -> bool:
        return all(passed is True for passed in self.checks.values())


def _replay_failure(error: JournalCorrupted) -> str:
    text = str(error)
    if any(word in text for word in ("checksum", "missing", "does not decode", "shape", "version", "timestamp")):
        return CHECK_RECORDS
    if "the rules" in text:
        return CHECK_LIMITS
    if "checkpoint" in text:
        return CHECK_CHECKPOINTS
    if "sum to" in text:
        return CHECK_CONSERVED
    return CHECK_ENTRIES


def audit(journal: Journal, progress: Callable[[int], None] | None = None,
          expected: ChainHead | None = None, txn: Any | None = None) -> AuditReport:
    """Run every check over the whole journal; never writes. With `expected` (a head an
    auditor noted), the chain's report says whether the journal still extends it (that is
    not one of `CHECKS`: the caller judges it).

    Every check reads one snapshot, `txn` (by default one of its own), held open for the
    whole audit: beside a live writer in another process, the chain, the replay and the
    indexes are all of the journal as of the snapshot's last record, whatever is written
    meanwhile (LMDB keeps that snapshot's pages from reuse until it ends, so the writer's
    data file may grow by what it writes during the audit)."""
    if txn is None:
        with journal.snapshot() as txn:
            return audit(journal, progress, expected, txn)
    report = _audited(journal, progress, expected, txn)
    if journal.index_damage is not None:  # an entry the open's walk found failing its checksum, kept for this
        report.checks[CHECK_FILE] = False  # (whatever else failed: the file's check never passes over it)
        if report.corrupt_lsn is None and journal.problem is None:  # (damage in a record, named first, is what a
            report.problem = str(journal.index_damage)  # salvage stops at; a file not its anchor's, what it refuses)
    return report


def _audited(journal: Journal, progress: Callable[[int], None] | None, expected: ChainHead | None,
             txn: Any) -> AuditReport:
    """`audit`'s checks, in `txn`, but for an index entry the open kept (`Journal.index_damage`)."""
    report = AuditReport(checks=dict.fromkeys(CHECKS))
    found = journal.problem
    if found is not None and found.lsn is None:  # the data file is not the one its anchor names
        return failed(report, CHECK_FILE, str(found), None)
    report.chain = journal.verify_chain(expected, txn)
    try:
        books = replay(journal, progress=progress, txn=txn)
    except JournalCorrupted as error:
        return _chained(failed(report, _replay_failure(error), str(error), error.lsn))
    if found is not None:  # records missing past the last one (the anchor saw them durable)
        return _chained(failed(report, CHECK_RECORDS, str(found), found.lsn))
    report.books = books
    for check in (CHECK_FILE, CHECK_RECORDS, CHECK_ENTRIES, CHECK_LIMITS, CHECK_CHECKPOINTS, CHECK_CONSERVED,
                  CHECK_RESERVATIONS):
        report.checks[check] = True
    try:
        pairs, indexes = _cross_check(journal, books, txn)
    except (JournalCorruptedError, JournalCorrupted) as error:  # an index entry fails its checksum, or its shape
        pairs, indexes = (str(error), None) if error.where == f"the {ENTRIES_INDEX} index" else (None, str(error))
    report.checks[CHECK_PAIRS] = pairs is None
    report.checks[CHECK_INDEXES] = indexes is None
    report.problem = pairs or indexes
    return _chained(report)


def _chained(report: AuditReport) -> AuditReport:
    """`report` with the chain's check; where the chain breaks first (a record rewritten with
    a valid checksum, one deleted or moved), that is the first damage it names."""
    chain = report.chain
    assert chain is not None
    report.checks[CHECK_CHAIN] = chain.break_lsn is None
    if chain.break_lsn is not None and (report.corrupt_lsn is None or chain.break_lsn < report.corrupt_lsn):
        report.problem, report.corrupt_lsn = chain.problem, chain.break_lsn
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


def _cross_check(journal: Journal, books: Recovered, txn: Any) -> tuple[str | None, str | None]:
    """Compare the indexes with the records: (entry problem, index problem).

    An entry may be missing from the index only if no checkpoint up to `indexed_through`
    follows its commit (the rows are written behind a checkpoint, and that mark moves once
    all are in), and then so are the account's later ones (the index holds a prefix of an
    account's entries); the mark names a checkpoint record, and the checkpoints index the
    last one, since readers trust them to tell where the unindexed entries start.
    The transfers index holds one key per id a commit or refusal used, and one per pending
    transfer resolved (posted, voided, expired), each naming that record. Reads snapshot
    `txn`, the one `books` was replayed from (so both end at the same record)."""
    named = indexed = last_checkpoint = commits = 0
    missing: list[str] = []
    """Entries absent from the index, since the last checkpoint record met."""
    gaps: dict[bytes, str] = {}
    """The accounts (their entry key prefix) with an entry absent from the index, and the first
    one absent: none of their later ones may be there."""
    checkpoints: set[int] = set()
    through = marked_through(journal, txn)
    holds = _HoldRows(journal, txn, through)
    scanned = 0
    for lsn, payload in journal.scan(0, txn):
        scanned = lsn
        raw = decode(lsn, payload)
        record = typed(lsn, raw)
        wrong = holds.check(record)
        if wrong is not None:
            return None, wrong
        if isinstance(record, Checkpointed):
            if missing and lsn <= through:
                return missing[0], None
            last_checkpoint = lsn
            checkpoints.add(lsn)
            continue
        keys: list[tuple[bytes, str]] = []
        if isinstance(record, (Committed, Refused)):
            keys += ((id_key(request.id), repr(request.id)) for request in record.requests)
        if isinstance(record, Committed):
            keys += ((resolution_key(request.pending_id), f"the resolution of {request.pending_id!r}")
                     for request in record.requests if type(request) is Resolution)
        elif isinstance(record, Expired):
            keys += ((resolution_key(pending_id), f"the resolution of {pending_id!r}")
                     for pending_id in record.pending_ids)
        for key, what in keys:
            stored = journal.index_get(TRANSFERS_INDEX, key, txn)
            if stored is None or len(stored) != 8 or value_lsn(stored) != lsn:
                return None, f"the transfer index does not point {what} at LSN {lsn}"
        named += len(keys)
        if not isinstance(record, Committed):
            continue
        commits += 1
        tid = record.transfer.id
        for key, value in commit_rows(lsn, raw):
            stored = journal.index_get(ENTRIES_INDEX, key, txn)
            if stored is None:
                missing.append(f"transfer {tid!r} at LSN {lsn} lacks its entry {key!r}")
                gaps.setdefault(key[:-8], missing[-1])
            elif stored != value:
                return f"transfer {tid!r} at LSN {lsn} has a wrong entry {key!r}", None
            elif key[:-8] in gaps:
                return f"{gaps[key[:-8]]}, yet the later one of transfer {tid!r} at LSN {lsn} is indexed", None
            else:
                indexed += 1
    assert scanned == books.last_lsn, (scanned, books.last_lsn)  # the records `books` replayed, in the same snapshot
    entries = sum(1 for key in journal.index_keys(ENTRIES_INDEX, txn) if is_entry_key(key))
    wrong = holds.finish()
    if wrong is not None:
        return None, wrong
    if holds.stored != holds.checked:
        return None, f"the entry index holds {holds.stored} hold rows; the records make {holds.checked}"
    transfers = sum(1 for _ in journal.index_keys(TRANSFERS_INDEX, txn))
    accounts = sum(1 for _ in journal.index_keys(ACCOUNTS_INDEX, txn))
    checkpoint_lsn = newest_checkpoint_lsn(journal, txn)
    if entries != indexed:
        return f"{entries} entries are indexed, {indexed} of them for the {commits} committed transfers", None
    if transfers != named or accounts != len(books.accounts):
        return None, (f"the indexes hold {transfers} transfer keys and {accounts} accounts; the records {named} and "
                      f"{len(books.accounts)}")
    if checkpoint_lsn != last_checkpoint:
        return None, f"the checkpoints index names LSN {checkpoint_lsn}, the last checkpoint record is at LSN {last_checkpoint}"
    if through and through not in checkpoints:
        return None, f"the entry index's mark of what it holds names LSN {through}, no checkpoint"
    return None, None


class _HoldRows:
    """The audit of hold rows (`coordinator._asof`). Like entries, a record's hold rows reach
    the index behind the first checkpoint after it: every record before the checkpoint
    `indexed_through` names that changed pending amounts has its rows there (from
    `holds_from` on; before it, or behind a later checkpoint, a row may be absent, and one
    present must be right), each holding what the records up to
    its own leave (`HoldTracker`, which follows the records independently of the rules); no
    record after it has any; a ledger marked after it had records has the baseline rows of
    the accounts with pending amounts when it was marked (at LSN 0); and there are no others."""

    def __init__(self, journal: Journal, txn: Any, through: int) -> None:
        self._journal, self._txn = journal, txn
        self._through = through
        """`indexed_through`: the rows of a checkpoint after it may be in the index, or not yet."""
        self._start = holds_from(journal, txn)
        self._tracker = HoldTracker()
        self._since: list[tuple[int, str, tuple[int, int]]] = []
        """(LSN, account, its (held, incoming)) of the rows since the last checkpoint record."""
        self.checked = 0
        self.stored = sum(1 for key in journal.index_keys(ENTRIES_INDEX, txn) if is_hold_key(key)
                          and key != HOLDS_FROM_KEY)

    def check(self, record: object) -> str | None:
        lsn: int = record.lsn  # type: ignore[attr-defined]
        wrong = None
        if isinstance(record, Checkpointed):
            wrong = self._indexed(lsn)
        else:
            self._since += ((lsn, account, values) for account, values in self._tracker.rows(record).items())  # type: ignore[arg-type]
        if wrong is None and self._start is not None and lsn == self._start - 1:
            wrong = self._baseline()
        return wrong

    def _indexed(self, checkpoint: int) -> str | None:
        """The rows since the last checkpoint record, which the one at `checkpoint` indexed."""
        since, self._since = self._since, []
        for row_lsn, account, values in since:
            stored = self._stored(account, row_lsn)
            required = self._start is not None and row_lsn >= self._start and checkpoint <= self._through
            if stored is None and not required:
                continue
            if stored != encode_holds(*values):
                return (f"the hold row of {account!r} at LSN {row_lsn} is {'missing' if stored is None else 'wrong'}"
                        f" (the checkpoint at LSN {checkpoint} indexes it)")
            self.checked += 1
        return None

    def _baseline(self) -> str | None:
        """The baseline rows: the pending amounts the records before the mark left."""
        tracker = self._tracker
        for account in {**tracker.held, **tracker.incoming}:
            values = tracker.held.get(account, 0), tracker.incoming.get(account, 0)
            if account and values != (0, 0):
                stored = self._stored(account, 0)
                if stored != encode_holds(*values):
                    return f"the baseline hold row of {account!r} is {'missing' if stored is None else 'wrong'}"
                self.checked += 1
        return None

    def finish(self) -> str | None:
        """After the last record: the rows since the last checkpoint are not in the index yet."""
        for row_lsn, account, _ in self._since:
            if self._stored(account, row_lsn) is not None:
                return f"the hold row of {account!r} at LSN {row_lsn} is indexed, and no checkpoint follows its record"
        return None

    def _stored(self, account: str, lsn: int) -> bytes | None:
        return self._journal.index_get(ENTRIES_INDEX, holds_key(account, lsn), self._txn)


def state_hash(journal: Journal, accounts: Iterable[Account], pending: Iterable[Pending], txn: Any | None = None,
               unindexed: Rows | None = None) -> str:
    """SHA-256 over every account and all its entries (seq, transfer, amount, balance), in
    account-id order, then the open pending transfers (`pending`) and what became of each
    resolved one, in id order. LSNs and timestamps are left out, so a replay into a fresh
    ledger hashes the same (and a ledger without pending transfers, codes or metadata hashes
    as it did before they existed).

    `unindexed`: the entries the index does not hold yet, as the writing process keeps
    them (taken before `txn` opens); by default they are derived from the records of `txn`."""
    if txn is None:
        with journal.snapshot() as txn:
            return state_hash(journal, accounts, pending, txn, unindexed)
    if unindexed is None:
        unindexed = unindexed_entries(journal, txn)
    digest = hashlib.sha256()
    for account in sorted(accounts, key=lambda a: a.id):
        fields: list[Any] = [account.id, account.currency, account.overdraft_limit]
        if account.code or account.metadata is not None:
            fields += (account.code, None if account.metadata is None else sorted(account.metadata.items()))
        digest.update(msgpack.packb(fields))
        for row in entry_rows(journal, account.id, unindexed.get(account.id, ()), txn=txn):
            _seq, transfer_id, amount, balance, _lsn, _timestamp = decode_entry(account.id, row)
            digest.update(msgpack.packb([row[0][-8:], transfer_id, amount, balance]))
    for found in sorted(pending, key=lambda p: p.id):
        digest.update(msgpack.packb(["pending", found.id, found.source, found.destination, found.amount, found.code]))
    for key, lsn in journal.index_range(TRANSFERS_INDEX, RESOLUTION_MARK, DIGEST_MARK, None, txn):
        record = named_record(journal, key, value_lsn(lsn), txn)
        status = "expired" if isinstance(record, Expired) else next(
            "voided" if request.void else "posted" for request in record.requests
            if type(request) is Resolution and resolution_key(request.pending_id) == key)
        digest.update(msgpack.packb([key, status]))
    return digest.hexdigest()
