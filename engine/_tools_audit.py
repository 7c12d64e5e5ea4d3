"""The journal audits behind `tally verify` and `tally recover`: the read-only audit (a head
noted earlier checked too), and recovery after a process died (the audit, then a checkpoint and,
if its anchor is gone, a new one).

Each returns a plain dict (the `--json` form); `engine._cli` runs it, `engine._cli_render`
renders it. The journal is opened through `engine._tools` (`reading`); the last record is shown
as `tally inspect` shows it (`engine._tools_read`, `record_row`). Making a new ledger from an old one
is in `engine._tools_salvage` and `engine._tools_copy`.
"""

from __future__ import annotations

import time
from typing import Any

from coordinator import (
    CHECKS,
    INDEX_NAMES,
    AuditReport,
    InvalidRequest,
    JournalCorrupted,
    LedgerLocked,
    Recovered,
    audit,
    ledger_errors,
    load_checkpoint,
    record_at,
    state_hash,
    unopened,
    write_checkpoint,
)
from journal import (
    GENESIS,
    ChainHead,
    ChainReport,
    Journal,
    JournalAnchorMissingError,
    JournalCorruptedError,
    rescuable,
    reanchor,
    refuse_irregular_lock_file,
)

from engine._tools import Progress, reading
from engine._tools_read import record_row


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
        "damaged": None if journal is None or journal.index_damage is None else journal.index_damage.where,
        "index_damaged": journal is not None and journal.index_damage is not None,
    }
    return result


def _unopened_dict(error: JournalCorrupted, elapsed_s: float, path: str) -> tuple[AuditReport, dict[str, Any]]:
    """The audit of a journal its damage kept from opening, and its report: `damaged` names
    where that damage is (a file of the ledger's directory, mostly)."""
    report = unopened(error)
    result = _audit_dict(report, elapsed_s, None, path)
    result["damaged"] = error.where
    cause = error.__cause__  # (the journal's error it was made from: `ledger_errors` chains it)
    result["salvage_reads_around"] = isinstance(cause, JournalCorruptedError) and rescuable(path, cause)
    return report, result


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
    report's `expect_head` says where it diverges if it does not. A directory whose lock file
    is no regular file, which every open refuses, is not whole either, however whole its
    history (`_judge_lock_file`).

    One snapshot is read, held for the whole audit and the state hash (`coordinator.audit`):
    beside a live writer every figure, the verdict and the head are of the journal as of
    its last record, whatever the writer adds meanwhile."""
    started = time.perf_counter()
    try:
        with reading(path, audited=True, index_damage_kept=True) as journal, journal.snapshot() as txn:
            report = audit(journal, progress, expected, txn)
            result = _audit_dict(report, time.perf_counter() - started, journal, path, txn)
    except JournalCorrupted as error:  # the data file cannot be read at all
        report, result = _unopened_dict(error, time.perf_counter() - started, path)
    if expected is not None:
        _judge_head(result, report.chain, expected)
    _judge_lock_file(result, path)
    return result


CHECK_LOCK_FILE = "the directory's lock file is a regular file (an open refuses the directory while it is not)"
"""A check of verify's own, in its report only where it fails: the lock file holds no history."""


def _judge_lock_file(result: dict[str, Any], path: str) -> None:
    """Add to `result` that the directory's lock file is no regular file, if it is not (a FIFO,
    a directory): verify takes no lock, so it never opens that file, but every open (and
    `tally recover`) refuses the directory until it is removed. It is named as an open names
    it, in `problem` and `damaged` unless the history's own damage is there first; the
    history's figures and state hash stand, as the lock file holds none of it."""
    try:
        with ledger_errors():
            refuse_irregular_lock_file(path)
    except JournalCorrupted as error:
        result["checks"][CHECK_LOCK_FILE] = False
        result["verdict"] = "NOT WHOLE"
        result["problem"] = result["problem"] or str(error)
        result["damaged"] = result["damaged"] or error.where


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
    is the account projection of the records past the newest checkpoint (`in_doubt`: None
    where the books could not be rebuilt). `anchor_missing` says whether the journal, opened,
    had lost its anchor (None: it could not be opened).
    """
    started = time.perf_counter()
    try:
        with reading(path, lock=True, audited=True, index_damage_kept=True) as journal:
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
        (report, result), lost_anchor = _unopened_dict(error, 0.0, path), False
        tail, last_lsn = None, None
        result["last_record"] = None
    result["checkpoint_lsn"] = tail.checkpoint_lsn if tail is not None else None
    result["replayed_past_checkpoint"] = last_lsn - tail.checkpoint_lsn if tail is not None and last_lsn else 0
    result["in_doubt"] = ({"aborted_by_recovery": [], "finished_by_recovery": []} if report.books is not None
                          else None)  # (books not rebuilt: nothing read to say it of)
    result["anchor_missing"] = lost_anchor if result["last_lsn"] is not None else None  # (unknown: not opened)
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
    return record_row(record) if record is not None else None


__all__ = ["recover", "verify"]
