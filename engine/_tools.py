"""What the operator commands do: verify, recover, salvage, replay, inspect, and read-only views.

Each returns a plain dict (the `--json` form); `engine._cli` renders it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import time
from collections import deque
from itertools import islice
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from coordinator import (
    CHECK_INDEXES,
    CHECK_PAIRS,
    CHECKS,
    INDEX_NAMES,
    Account,
    AccountNotFound,
    AuditReport,
    Checkpointed,
    Committed,
    Expired,
    InvalidRequest,
    JournalCorrupted,
    LedgerError,
    LedgerLocked,
    NotALedger,
    Opened,
    Projection,
    Record,
    Recovered,
    Refused,
    Resolution,
    Row,
    Sequencer,
    TIMESTAMP_MAX,
    TRANSFERS_PAGE_MAX,
    Transfer,
    TransferRequest,
    account_lsns,
    account_of,
    audit,
    opened_lsn,
    check_id,
    copy_record,
    decode_entry,
    entries_at,
    entry_row_at,
    ledger_errors,
    load_checkpoint,
    record_at,
    records,
    state_hash,
    transfer_of,
    pairs,
    unindexed_entries,
    unindexed_holds_by_key,
    unopened,
    write_checkpoint,
)
from journal import (
    ANCHOR_FILE,
    GENESIS,
    ChainHead,
    ChainReport,
    Journal,
    JournalAnchorMissingError,
    JournalFormatError,
    reanchor,
    sync_directory,
)

from engine._history import History
from engine._ledger import Ledger
from engine._readonly import recover_beside_writer

Progress = Callable[[int], None] | None


def unreadable(error: LedgerError) -> bool:
    """A format this code does not read (`JournalCorrupted` from a `JournalFormatError`): not
    damage, but a ledger the command cannot run on here."""
    return isinstance(error, JournalCorrupted) and isinstance(error.__cause__, JournalFormatError)


@contextmanager
def _reading(path: str, lock: bool = False, audited: bool = False) -> Iterator[Journal]:
    """The journal, open read-only (with `lock`, refusing while a live process holds it).
    Damage found as it opens is `JournalCorrupted`, except a format this code does not read,
    which the command cannot run on (`NotALedger` says so). A gap in the records or a journal
    short of its anchor is `JournalCorrupted` too, unless the caller is `audited` (the audit
    reports it): the views never show what the journal is known to have lost."""
    try:
        with ledger_errors():
            journal = Journal.open_readonly(path, index_names=INDEX_NAMES, lock=lock)
    except JournalCorrupted as error:
        if unreadable(error):
            raise NotALedger(str(error)) from error
        raise
    if journal.problem is not None and not audited:
        journal.close()
        problem = journal.problem
        raise JournalCorrupted(str(problem), problem.lsn, problem.where) from problem
    try:
        with ledger_errors():
            yield journal
    finally:
        journal.close()


def _audit_dict(report: AuditReport, elapsed_s: float, journal: Journal | None, path: str,
                txn: Any | None = None) -> dict[str, Any]:
    """The report of an audit of `journal` (None: it could not be opened); its state hash read
    in `txn`, the snapshot audited (by default a new one: for a ledger no process writes)."""
    books = report.books
    result: dict[str, Any] = {
        "path": path,
        "records_scanned": books.records if books else None,
        "last_lsn": books.last_lsn if books else journal.last_lsn if journal is not None else None,
        "accounts": len(books.accounts) if books else None,
        "transfers_committed": books.commits if books else None,
        "transfers_rejected": books.rejects if books else None,
        "pending_expired": books.expiries if books else None,
        "pending_open": len(books.pending) if books else None,
        "checkpoints": books.checkpoints if books else None,
        "checks": report.checks,
        "problem": report.problem,
        "corrupt_lsn": report.corrupt_lsn,
        "elapsed_s": round(elapsed_s, 3),
        "state_hash": (state_hash(journal, books.accounts.values(), books.pending.values(), txn)
                       if journal and books and report.whole else None),
        "verdict": "whole" if report.whole else "NOT WHOLE",
        "head": None if report.chain is None else _head_dict(report.chain.head),
        "chain": None if report.chain is None or journal is None else _chain_dict(report.chain, journal.format_version),
    }
    return result


def _head_dict(head: ChainHead) -> dict[str, Any]:
    return {"lsn": head.lsn, "digest": head.digest.hex()}


def _chain_dict(chain: ChainReport, format_version: int) -> dict[str, Any]:
    """The chain's part of the report: where it starts (the records of an older format's
    ledger before it predate it), and where it breaks, if it does."""
    unchained = chain.unchained_through
    return {"hash": "SHA-256", "format_version": format_version, "chained_from": chain.chained_from,
            "unchained_lsns": [1, unchained] if unchained else None, "break_lsn": chain.break_lsn,
            "problem": chain.problem, "status": "intact" if chain.break_lsn is None else "BROKEN"}


def parse_head(text: str) -> ChainHead:
    """A head as `LSN:DIGEST` (what `tally verify` prints and `Head` shows); `InvalidRequest`
    if it is not one."""
    lsn, colon, digest = text.strip().partition(":")
    if (not colon or not lsn.isdigit() or not lsn.isascii() or int(lsn) >= 2**64 or len(digest) != 64
            or any(c not in "0123456789abcdefABCDEF" for c in digest)):
        raise InvalidRequest(f"a head is LSN:DIGEST (a whole number, a colon, 64 hex digits), not {text[:100]!r}")
    head = ChainHead(int(lsn), bytes.fromhex(digest))
    if head.lsn == 0 and head.digest != GENESIS:  # every ledger's, before its first record
        raise InvalidRequest(f"a head at LSN 0 has the genesis digest (64 zeros), not {digest[:100]!r}: no ledger "
                             "ever had this head (LSN:DIGEST)")
    return head


def verify(path: str, progress: Progress = None, expected: ChainHead | None = None) -> dict[str, Any]:
    """The read-only audit. Never writes; a live process may keep using the ledger. With
    `expected` (a head noted earlier), the ledger is whole only if it still extends it: the
    report's `expect_head` says where it diverges if it does not.

    One snapshot is read, held for the whole audit and the state hash (`coordinator.audit`):
    beside a live writer every figure, the verdict and the head are of the journal as of
    its last record, whatever the writer adds meanwhile."""
    started = time.perf_counter()
    try:
        with _reading(path, audited=True) as journal, journal.snapshot() as txn:
            report = audit(journal, progress, expected, txn)
            result = _audit_dict(report, time.perf_counter() - started, journal, path, txn)
    except JournalCorrupted as error:  # the data file cannot be read at all
        report = unopened(error)
        result = _audit_dict(report, time.perf_counter() - started, None, path)
    if expected is not None:
        _judge_head(result, report.chain, expected)
    return result


def _judge_head(result: dict[str, Any], chain: ChainReport | None, expected: ChainHead) -> None:
    """Add to `result` whether the ledger extends the `expected` head (a check of its own)."""
    diverges_at: int | None
    why: str | None
    if chain is None:
        diverges_at, why = None, "the journal could not be read"
    else:
        diverges_at, why = chain.diverges_at, chain.divergence
    extends = chain is not None and diverges_at is None
    result["expect_head"] = {**_head_dict(expected), "extends": extends, "diverges_at": diverges_at, "problem": why}
    result["checks"][f"the ledger extends the head noted earlier, LSN {expected.lsn}"] = extends
    if not extends:
        result["verdict"] = "NOT WHOLE"
        result["state_hash"] = None
        result["problem"] = result["problem"] or why


def recover(path: str, dry_run: bool, progress: Progress = None) -> dict[str, Any]:
    """Audit a ledger whose process died and make its next open cheap.

    Refuses (`LedgerLocked`) if a live process holds the ledger. The audit runs on the
    journal opened read-only; only a whole ledger is then written to, to journal a checkpoint
    and, if its anchor is gone (a `data.mdb` restored alone, say), to write a new one at its
    last LSN (never with `dry_run`). Nothing on disk can be in doubt: reservations are never
    journaled and a commit record carries both of its entries, so recovery's only resolution
    is the account projection of the records past the newest checkpoint.
    """
    started = time.perf_counter()
    try:
        with _reading(path, lock=True, audited=True) as journal:
            lost_anchor = isinstance(journal.problem, JournalAnchorMissingError)
            if lost_anchor:
                anchor_problem, journal.problem = str(journal.problem), None  # audit the rest of it
            report = audit(journal, progress)
            result = _audit_dict(report, 0.0, journal, path)
            tail = load_checkpoint(journal) if report.whole else None
            last_lsn = journal.last_lsn
            result["last_record"] = _last_row(journal) if report.whole else None
    except LedgerLocked as error:
        raise LedgerLocked(f"refusing to recover {path}: a live process holds it (stop it first; "
                           "recover is for a ledger whose process died)") from error
    except JournalCorrupted as error:
        report, lost_anchor = unopened(error), False
        result, tail, last_lsn = _audit_dict(report, 0.0, None, path), None, None
        result["last_record"] = None
    result["checkpoint_lsn"] = tail.checkpoint_lsn if tail is not None else None
    result["replayed_past_checkpoint"] = last_lsn - tail.checkpoint_lsn if tail is not None and last_lsn else 0
    result["in_doubt"] = {"aborted_by_recovery": [], "finished_by_recovery": []}
    result["dry_run"] = dry_run
    if report.whole and lost_anchor:
        if dry_run:  # the ledger is not whole until it has an anchor again
            result.update(would_write_anchor_at=last_lsn, problem=anchor_problem, verdict="NOT WHOLE")
            result["checks"][CHECKS[0]] = False
        else:
            with ledger_errors():
                result["anchor_written_at"] = reanchor(path, index_names=INDEX_NAMES)
    if report.whole and report.books is not None and last_lsn is not None and result["replayed_past_checkpoint"]:
        if dry_run:
            result["would_write_checkpoint_at"] = last_lsn + 1
        else:
            result["checkpoint_written_at"] = _write_checkpoint(path, report.books, last_lsn)
    result["elapsed_s"] = round(time.perf_counter() - started, 3)
    return result


def _write_checkpoint(path: str, books: Recovered, audited_lsn: int | None) -> int:
    """Journal a checkpoint of `books` (the audited projection) in the ledger at `path`."""
    with ledger_errors():
        journal = Journal.open(path, index_names=INDEX_NAMES, create=False)
    try:
        with ledger_errors():
            if journal.last_lsn != audited_lsn:
                raise LedgerLocked(f"{path} changed while it was audited (another process wrote to it)")
            return write_checkpoint(journal, books, 30.0)
    finally:
        journal.close()


def _last_row(journal: Journal) -> dict[str, Any] | None:
    """The last durable record, readable: where the dead process stopped."""
    record = record_at(journal, journal.last_lsn) if journal.last_lsn else None
    return _row(record) if record is not None else None


def _new_directory(path: str) -> None:
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise InvalidRequest(f"{path} already exists and is not empty: choose a new directory")


def salvage(path: str, into: str, progress: Progress = None) -> dict[str, Any]:
    """Copy every verifiable record before the first corrupt one into a new ledger at `into`,
    and list what was lost.

    A ledger whose anchor is gone is audited as `recover` audits it: the rest of it checked,
    the missing anchor reported (`anchor_problem`). The copy is built in a directory of its
    own inside `into` (`_staging`), and its files moved up once it is closed, the anchor last:
    a salvage that fails leaves `into` as it found it, and one killed leaves `into` holding that
    directory (named for what it is) or a copy without its anchor, never one that would verify
    whole.
    Raises `LedgerLocked` while a live process holds the ledger, `JournalCorrupted` if
    nothing in it can be copied (its data file unreadable, or another ledger's)."""
    _new_directory(into)
    with ledger_errors():
        journal = Journal.open_readonly(path, index_names=INDEX_NAMES, lock=True)
    try:
        found, anchor_problem = journal.problem, None
        if isinstance(found, JournalAnchorMissingError):
            anchor_problem, journal.problem = str(found), None  # audit the rest of it, as recover does
        elif found is not None and found.lsn is None:
            raise JournalCorrupted(f"nothing to salvage: {found}", None, found.where) from found  # not this ledger's
        with ledger_errors():
            report = audit(journal, progress)
            stop = report.corrupt_lsn if report.corrupt_lsn is not None else journal.last_lsn + 1
            made = not os.path.lexists(into)
            staging = _staging(into)
            try:
                copied, lost = _copy_prefix(journal, staging, stop)
                _publish(staging, into)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                if made:
                    shutil.rmtree(into, ignore_errors=True)
                raise
            anchored = journal.anchor.durable_lsn if journal.anchor is not None else 0
            lost += [{"lsn": lsn, "transfer": None, "why": "durable once (its anchor says so), and gone from the journal"}
                     for lsn in range(max(stop, journal.last_lsn + 1), anchored + 1)]
            return {"path": path, "into": into, "first_corrupt_lsn": report.corrupt_lsn,
                    "whole": report.whole and anchor_problem is None, "problem": report.problem,
                    "anchor_problem": anchor_problem, "records_copied": copied, "lost": lost,
                    "verdict": _salvage_verdict(report, anchor_problem)}
    finally:
        journal.close()


def _salvage_verdict(report: AuditReport, anchor_problem: str | None) -> str:
    """What a salvage made of the ledger `report` audited (`anchor_problem`: its anchor is gone)."""
    if report.corrupt_lsn is not None:
        return "salvaged: everything before the first corrupt record was copied"
    if report.checks[CHECK_PAIRS] is False or report.checks[CHECK_INDEXES] is False:
        return "salvaged: every record verifies, but the indexes were damaged; NEW has them rebuilt"
    if not report.whole:
        return "salvaged: every record was copied, but the ledger is not whole (see the damage)"
    if anchor_problem is not None:
        return ("nothing was lost that the journal shows: every record verifies, but its anchor is missing, so "
                "nothing can tell whether this journal is the ledger's newest; NEW is a verified copy of it")
    return "nothing was lost: the ledger is whole; NEW is a verified copy"


def _staging(into: str) -> str:
    """A new, empty directory inside `into` (`.salvaging-XXXXXXXX`) to build its copy in;
    `into` (an empty directory, a mount point, a symlink to one, or missing) made first, with
    its parents: the copy is written on the file system chosen for it."""
    os.makedirs(into, exist_ok=True)
    staging = os.path.join(into, f".salvaging-{secrets.token_hex(4)}")
    os.mkdir(staging)
    return staging


def _publish(staging: str, into: str) -> None:
    """Move the closed copy's files from `staging` up into `into`, the anchor last (a ledger
    without it does not verify whole), then remove `staging`, durably."""
    for name in sorted(os.listdir(staging), key=lambda name: name == ANCHOR_FILE):
        os.rename(os.path.join(staging, name), os.path.join(into, name))
    os.rmdir(staging)
    sync_directory(into)


def _copy_prefix(journal: Journal, into: str, stop: int) -> tuple[int, list[dict[str, Any]]]:
    target = Journal.open(into, index_names=INDEX_NAMES)
    try:
        sequencer = Sequencer(target, Projection())
        copied, last = 0, 0
        try:
            for record in records(journal):
                if record.lsn >= stop:
                    break
                copied += _copy_record(sequencer, record)
        except JournalCorrupted as error:
            if error.lsn != stop:
                raise
        with sequencer.lock:
            last = sequencer.checkpoint()
        target.wait_durable(last, 30.0)
    finally:
        target.close()
    if stop > journal.last_lsn:
        return copied, []
    lost: list[dict[str, Any]] = [{"lsn": stop, "transfer": None, "why": "this record is corrupt: whatever it held is lost"}]
    for lsn in range(stop + 1, journal.last_lsn + 1):
        try:
            found = record_at(journal, lsn)
        except JournalCorrupted:
            lost.append({"lsn": lsn, "transfer": None, "why": "corrupt too"})
            continue
        if isinstance(found, Committed):
            lost += ({"lsn": lsn, "transfer": made.id, "why": "commit after the corruption"} for made in found.transfers)
        elif isinstance(found, Refused):
            lost += ({"lsn": lsn, "transfer": request.id, "why": "reject after the corruption"}
                     for request in found.requests)
        elif isinstance(found, Expired):
            lost += ({"lsn": lsn, "transfer": pending_id, "why": "expiry after the corruption"}
                     for pending_id in found.pending_ids)
        elif isinstance(found, Opened):
            lost.append({"lsn": lsn, "transfer": None, "account": found.account.id,
                         "why": "account opened after the corruption"})
    return copied, lost


def _copy_record(sequencer: Sequencer, record: Record) -> int:
    """Journal `record` again through `sequencer` (`copy_record`); 1, or 0 for a checkpoint
    (the copy makes its own). `NotALedger` if the copy is not decided as the original was."""
    problem = copy_record(sequencer, record)
    if problem is not None:
        raise NotALedger(f"the copy diverged at LSN {record.lsn}: {problem}")
    return 0 if isinstance(record, Checkpointed) else 1


def replay(path: str, into: str, progress: Progress = None) -> dict[str, Any]:
    """Replay the journal into a fresh ledger through the public engine; compare hashes.

    Accounts and committed transfers are replayed in journal order, single transfers in
    batches; a decision that depends on its time (a pending transfer with a timeout, a post
    or a void, a linked chain) and an expiry are replayed alone, with the fresh ledger's
    clock set to the record's timestamp. Refusals are not: one can depend on reservations
    that were in flight at the time, and refused transfers leave no entries, so the state
    hash does not cover them.

    The copy is a new ledger: its LSNs are its own (no refusal, no checkpoint of the original
    is copied), so are its chain and head. Its timestamps are the original's: the fresh
    ledger's clock gives each decision its record's timestamp (a clock of one's own is read
    once a decision), and a copied transfer stamped otherwise is a divergence. (A record of a
    release before timestamps has 0: its copy gets the last timestamp + 1.)
    """
    _new_directory(into)
    started = time.perf_counter()
    with _reading(path) as source:
        books = recover_beside_writer(source)
        last = books.last_lsn
        original = state_hash(source, books.accounts.values(), books.pending.values())
        _unmoved(source, last, path)  # (and again at the end: the hash may count what came after `last`)
        replayed = rejected = 0
        now = [0]
        script: deque[int] = deque()
        """The timestamps of the batch being replayed, one for each decision in order."""

        def clock() -> int:
            # A timestamp past the clock's range was stamped the last + 1 from a clock at its
            # end (the ledger's timestamps only rise): a reading at the end stamps it so again.
            return min(script.popleft() if script else now[0], TIMESTAMP_MAX)

        with Ledger.open(into, clock_ns=clock) as ledger:
            batch: list[tuple[TransferRequest, int]] = []
            for record in records(source):
                if record.lsn > last:
                    break
                if isinstance(record, Opened):
                    _flush(ledger, batch, script)
                    now[0] = record.timestamp  # (0, an opening of old: the last timestamp + 1)
                    account = record.account
                    ledger.create_account(account.id, currency=account.currency, overdraft_limit=account.overdraft_limit,
                                          code=account.code, metadata=account.metadata)
                elif isinstance(record, Committed):
                    replayed += len(record.transfers)
                    request = record.requests[0]
                    if not record.linked and type(request) is TransferRequest and not request.pending:
                        batch.append((request, record.timestamp))
                        if len(batch) >= 1000:
                            _flush(ledger, batch, script)
                        continue
                    _flush(ledger, batch, script)
                    now[0] = record.timestamp
                    _replay_alone(ledger, record)
                elif isinstance(record, Expired):
                    _flush(ledger, batch, script)
                    now[0] = record.timestamp
                    ledger.expire_pending()  # what is due by then: this record's (and the next ones' of one reading)
                    left = [pending_id for pending_id in record.pending_ids
                            if ledger.get_transfer(pending_id).status != "expired"]  # type: ignore[union-attr]
                    if left:
                        raise NotALedger(f"replay diverged at LSN {record.lsn}: pending transfers {left!r} did not "
                                         "expire in the fresh ledger")
                elif isinstance(record, Refused):
                    rejected += 1
                if progress is not None and not record.lsn % 10_000:
                    progress(record.lsn)
            _flush(ledger, batch, script)
            fresh = ledger.state_hash()
        _unmoved(source, last, path)
    return {"path": path, "into": into, "transfers_replayed": replayed, "rejections_not_replayed": rejected,
            "state_hash_original": original, "state_hash_replayed": fresh, "elapsed_s": round(time.perf_counter() - started, 3),
            "verdict": "identical" if original == fresh else "DIFFERENT"}


def _unmoved(journal: Journal, last_lsn: int, path: str) -> None:
    """`LedgerLocked` if a record was written past `last_lsn` (a live process writes the ledger)."""
    if journal.read(last_lsn + 1) is not None:
        raise LedgerLocked(f"{path} changed while it was replayed (a live process wrote to it): replay a ledger no "
                           "process is writing")


def _replay_alone(ledger: Ledger, record: Committed) -> None:
    """Replay a time-sensitive commit through the public API (the clock set to its time),
    and check the copy's timestamps are the record's."""
    try:
        if record.linked:
            made = ledger.transfer_linked([request for request in record.requests if type(request) is TransferRequest])
        else:
            request = record.requests[0]
            if type(request) is TransferRequest:
                made = [ledger.transfer(request.id, source=request.source, destination=request.destination,
                                        amount=request.amount, code=request.code, reference=request.reference,
                                        metadata=request.metadata, pending=request.pending, timeout_s=request.timeout_s)]
            elif type(request) is Resolution and request.void:
                made = [ledger.void_pending(request.id, pending_id=request.pending_id, reference=request.reference,
                                            metadata=request.metadata)]
            else:
                assert type(request) is Resolution
                made = [ledger.post_pending(request.id, pending_id=request.pending_id, amount=request.amount,
                                            reference=request.reference, metadata=request.metadata)]
    except LedgerError as error:
        raise NotALedger(f"replay diverged at LSN {record.lsn}: {record.transfer.id!r} now fails with "
                         f"{error.code}") from error
    for transfer, original in zip(made, record.transfers, strict=True):
        _check_timestamp(transfer, original.timestamp)


def _flush(ledger: Ledger, batch: list[tuple[TransferRequest, int]], script: deque[int]) -> None:
    """Replay a batch of single transfers, `script` giving the clock each one's timestamp."""
    if not batch:
        return
    script.extend(timestamp for _, timestamp in batch)
    try:
        outcomes = ledger.transfer_many([request for request, _ in batch])
    finally:
        script.clear()
    for (request, timestamp), outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, LedgerError):
            raise NotALedger(f"replay diverged: transfer {request.id!r} now fails with {outcome.code}")
        _check_timestamp(outcome, timestamp)
    batch.clear()


def _check_timestamp(copied: Transfer, timestamp: int) -> None:
    """`NotALedger` unless the copy of a transfer has its original's `timestamp` (0: a record
    of a release before timestamps, whose copy gets the last timestamp + 1)."""
    if timestamp and copied.timestamp != timestamp:
        raise NotALedger(f"replay diverged: transfer {copied.id!r} was stamped {copied.timestamp}, not {timestamp} "
                         "as in the original")


def inspect(path: str, start: int, limit: int | None, transfer: str | None, account: str | None) -> dict[str, Any]:
    """The journal as readable rows, for a person reading what happened: what can be read is
    shown, and `problem` says what cannot (a damaged record, a gap, records the anchor saw and
    the journal lost). A transfer's record is found through the transfers index, not a scan."""
    rows: list[dict[str, Any]] = []
    problem = None
    with _reading(path, audited=True) as journal:
        try:
            if transfer is not None:
                check_id(transfer, "transfer id")
                found = transfer_of(journal, transfer)
                if found is not None and found.lsn >= start and (account is None or _touches(found, account, journal)):
                    rows.append(_row(found))
            elif account is not None:
                _account_rows(journal, account, start, limit, rows)
            else:
                for record in records(journal, max(0, start - 1)):
                    rows.append(_row(record))
                    if limit is not None and len(rows) >= limit:
                        break
        except JournalCorrupted as error:
            problem = str(error)
        if problem is None and journal.problem is not None:
            problem = str(journal.problem)
    return {"path": path, "records": rows, "problem": problem}


def _account_rows(journal: Journal, account: str, start: int, limit: int | None, rows: list[dict[str, Any]]) -> None:
    """Append to `rows` the account's opening and the records of its history from LSN `start`
    on, up to damage (`Ledger.transfers`' walk: its entries and hold rows, not a scan of the
    journal). A refusal moved nothing: none is among them (`tally tail` shows them)."""
    check_id(account, "account")
    unindexed, holds = _unindexed(journal)
    end = journal.last_lsn
    with journal.snapshot() as txn:
        _account(journal, account, txn)
        opening = opened_lsn(journal, account, end, txn)
        lsns = [opening] if opening >= start else []
        lsns += islice(account_lsns(journal, account, max(0, start - 1), end, False, unindexed.get(account, []),
                                    holds.get(account, []), txn), None if limit is None else max(0, limit - len(lsns)))
        for lsn in lsns:
            record = record_at(journal, lsn, txn)
            if record is not None:
                rows.append(_row(record))


def _unindexed(journal: Journal) -> tuple[dict[str, list[Row]], dict[str, list[Row]]]:
    """The entries and hold rows of the records past the newest checkpoint, by account."""
    with journal.snapshot() as txn:
        holds = {account: pairs(flat) for account, flat in unindexed_holds_by_key(journal, txn).items()}
        return unindexed_entries(journal, txn), holds


def _history(journal: Journal, unindexed: dict[str, list[Row]] | None = None,
             holds: dict[str, list[Row]] | None = None) -> History:
    """The reads of `Ledger`'s history over a journal open read-only, as of the last LSN it
    held when opened; `unindexed` and `holds` as `_unindexed` reads them (by default, now)."""
    if unindexed is None or holds is None:
        unindexed, holds = _unindexed(journal)
    end = journal.last_lsn
    return History(journal, lambda: end, lambda account, _end: unindexed.get(account, []),
                   lambda account, _end: holds.get(account, []), time.time_ns)


def _touches(record: Record, account: str, journal: Journal) -> bool:
    """Whether `record` names `account` (opens it, or moves, holds or releases its funds: an
    expiry, through the pending transfers it ends, looked up in the transfers index)."""
    if isinstance(record, Opened):
        return record.account.id == account
    if isinstance(record, Committed):
        return any(account in (made.source, made.destination) for made in record.transfers)
    if isinstance(record, Refused):
        return any(account in (getattr(request, "source", None), getattr(request, "destination", None))
                   for request in record.requests)
    if isinstance(record, Expired):
        return any(_touches(found, account, journal) for pending_id in record.pending_ids
                   if (found := transfer_of(journal, pending_id)) is not None)
    return False


def _row(record: Record) -> dict[str, Any]:
    """A record as `tally inspect` shows it. A commit or refusal of one request is one row
    with its fields; a linked chain's carries each in `legs`."""
    if isinstance(record, Opened):
        account = record.account
        return {"lsn": record.lsn, "kind": "account", "timestamp": record.timestamp, "account": account.id,
                "currency": account.currency,
                "overdraft_limit": account.overdraft_limit, "code": account.code,
                "metadata": None if account.metadata is None else account.metadata.as_dict()}
    if isinstance(record, Checkpointed):
        row = {"lsn": record.lsn, "kind": "checkpoint", "accounts": record.accounts, "pending": record.pending}
        if record.ledger_accounts >= 0:  # only what changed, and the sweep's
            row["ledger_accounts"] = record.ledger_accounts
        return row
    if isinstance(record, Expired):
        return {"lsn": record.lsn, "kind": "expiry", "timestamp": record.timestamp,
                "pending_ids": list(record.pending_ids)}
    if isinstance(record, Refused):
        legs = [_request_row(request) for request in record.requests]
        row = {"lsn": record.lsn, "kind": "reject", "timestamp": record.timestamp, "code": record.code}
        if record.linked:
            return {**row, "linked": True, "index": record.index, "legs": legs}
        return {**row, **legs[0]}
    entries = {(entry.transfer_id, entry.amount < 0): entry for entry in record.entries}
    legs = [_transfer_row(made, entries.get((made.id, True)), entries.get((made.id, False)))
            for made in record.transfers]
    if record.linked:
        return {"lsn": record.lsn, "kind": "commit", "timestamp": record.timestamp, "linked": True, "legs": legs}
    return {"lsn": record.lsn, "kind": "commit", **legs[0]}


def _request_row(request: TransferRequest | Resolution) -> dict[str, Any]:
    metadata = None if request.metadata is None else dict(request.metadata)
    if type(request) is TransferRequest:
        return {"transfer": request.id, "type": "pending" if request.pending else "single", "source": request.source,
                "destination": request.destination, "amount": request.amount, "transfer_code": request.code,
                "reference": request.reference, "metadata": metadata, "timeout_s": request.timeout_s}
    assert type(request) is Resolution
    return {"transfer": request.id, "type": "void" if request.void else "post", "pending_id": request.pending_id,
            "source": None, "destination": None, "amount": request.amount, "reference": request.reference,
            "metadata": metadata}


def _transfer_row(made: Transfer, debit: Any, credit: Any) -> dict[str, Any]:
    row = {"transfer": made.id, "type": made.kind, "timestamp": made.timestamp, "source": made.source,
           "destination": made.destination, "amount": made.amount, "transfer_code": made.code,
           "reference": made.reference, "metadata": None if made.metadata is None else made.metadata.as_dict(),
           "pending_id": made.pending_id, "timeout_s": made.timeout_s}
    if debit is not None and credit is not None:
        row.update(source_seq=debit.seq, source_balance=debit.balance, destination_seq=credit.seq,
                   destination_balance=credit.balance)
    return row


def _account(journal: Journal, account_id: str, txn: Any) -> Account:
    check_id(account_id, "account id")  # e.g. a byte that is not UTF-8 on the command line
    account = account_of(journal, account_id, txn)
    if account is None:
        raise AccountNotFound(f"no account {account_id!r} in {journal.path}")
    return account


def balance(path: str, account_id: str, at_lsn: int | None = None, at_timestamp: int | None = None) -> dict[str, Any]:
    """The account's durable balance: posted, held by its open pending transfers (`pending`;
    no reservation survives the process that made it), available, incoming; with `at_lsn` or
    `at_timestamp`, as of then (`Ledger.balance`)."""
    if at_lsn is not None or at_timestamp is not None:
        with _reading(path) as journal:
            with journal.snapshot() as txn:
                account = _account(journal, account_id, txn)
            history = _history(journal)
            lsn = history.lsn_of(at_lsn, at_timestamp)
            found = history.balance(account_id, lsn)
            return {"account": account_id, "currency": account.currency, "at_lsn": lsn,
                    "at_timestamp": history.timestamp(lsn), "posted": found.posted, "pending": found.pending,
                    "available": found.available, "incoming": found.incoming}
    with _reading(path) as journal:
        check_id(account_id, "account id")  # e.g. a byte that is not UTF-8 on the command line
        books = recover_beside_writer(journal)  # every figure below as of its last LSN, a writer or not
        opened = books.accounts.get(account_id)
        if opened is None:
            raise AccountNotFound(f"no account {account_id!r} in {path}")
        seq, posted, last_lsn = books.states.get(account_id, (0, 0, 0))
        held = books.held.get(account_id, 0)
        return {"account": account_id, "currency": opened.currency, "overdraft_limit": opened.overdraft_limit,
                "posted": posted, "pending": held, "available": posted - held,
                "incoming": books.incoming.get(account_id, 0), "entries": seq,
                "last_lsn": last_lsn if seq else None}


def history(path: str, account_id: str, limit: int) -> dict[str, Any]:
    """The account's latest `limit` entries (0: all), and its latest `limit` transfers, newest first
    (`Ledger.transfers(account=..., reverse=True)`: pending transfers and voids too). Both as
    of one LSN, the last the journal held when opened: a live writer's later records are in
    neither."""
    with _reading(path) as journal:
        unindexed, holds = _unindexed(journal)  # (read before the snapshots below, as a ledger reads them)
        reads = _history(journal, unindexed, holds)
        end = reads.end()
        with journal.snapshot() as txn:
            account = _account(journal, account_id, txn)
        transfers = reads.transfers(account=account_id, limit=min(limit, TRANSFERS_PAGE_MAX) or TRANSFERS_PAGE_MAX,
                                    reverse=True)
        rows = unindexed.get(account_id, [])
        with journal.snapshot() as txn:
            last = entry_row_at(journal, account_id, end, rows, txn)
            total = 0 if last is None else decode_entry(account_id, last)[0]
            entries = entries_at(journal, account_id, end, max(0, total - limit) if limit else 0, None, rows, txn)
        return {"account": account_id, "currency": account.currency, "entries_total": total,
                "entries": [{"seq": entry.seq, "lsn": entry.lsn, "timestamp": entry.timestamp,
                             "transfer": entry.transfer_id, "amount": entry.amount, "balance": entry.balance}
                            for entry in entries],
                "transfers": [_transfer_dict(transfer) for transfer in transfers]}


def _transfer_dict(transfer: Transfer) -> dict[str, Any]:
    return {"id": transfer.id, "lsn": transfer.lsn, "timestamp": transfer.timestamp, "kind": transfer.kind,
            "status": transfer.status, "source": transfer.source, "destination": transfer.destination,
            "amount": transfer.amount, "code": transfer.code, "reference": transfer.reference,
            "pending_id": transfer.pending_id}


__all__ = ["balance", "history", "inspect", "recover", "replay", "salvage", "verify"]
