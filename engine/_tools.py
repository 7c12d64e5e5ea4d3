"""What the operator commands do: verify, recover, salvage, replay, inspect, and read-only views.

Each returns a plain dict (the `--json` form); `engine._cli` renders it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from coordinator import (
    CHECKS,
    INDEX_NAMES,
    Account,
    AccountNotFound,
    AuditReport,
    Checkpointed,
    Committed,
    InvalidRequest,
    JournalCorrupted,
    LedgerError,
    LedgerLocked,
    NotALedger,
    Opened,
    Record,
    Recovered,
    Refused,
    Sequencer,
    TransferRequest,
    account_of,
    audit,
    check_id,
    entries_of,
    last_entry,
    ledger_errors,
    load_checkpoint,
    record_at,
    records,
    state_hash,
    transfer_of,
    unopened,
    write_checkpoint,
)
from coordinator import recover as recover_books
from journal import Completion, Journal, JournalAnchorMissingError, JournalFormatError, reanchor

from engine._ledger import Ledger

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


def _audit_dict(report: AuditReport, elapsed_s: float, journal: Journal | None, path: str) -> dict[str, Any]:
    books = report.books
    result: dict[str, Any] = {
        "path": path,
        "records_scanned": books.records if books else None,
        "last_lsn": journal.last_lsn if journal is not None else None,
        "accounts": len(books.accounts) if books else None,
        "transfers_committed": books.commits if books else None,
        "transfers_rejected": books.rejects if books else None,
        "checkpoints": books.checkpoints if books else None,
        "checks": report.checks,
        "problem": report.problem,
        "corrupt_lsn": report.corrupt_lsn,
        "elapsed_s": round(elapsed_s, 3),
        "state_hash": state_hash(journal, books.accounts.values()) if journal and books and report.whole else None,
        "verdict": "whole" if report.whole else "NOT WHOLE",
    }
    return result


def verify(path: str, progress: Progress = None) -> dict[str, Any]:
    """The read-only audit. Never writes; a live process may keep using the ledger."""
    started = time.perf_counter()
    try:
        with _reading(path, audited=True) as journal:
            report = audit(journal, progress)
            return _audit_dict(report, time.perf_counter() - started, journal, path)
    except JournalCorrupted as error:  # the data file cannot be read at all
        return _audit_dict(unopened(error), time.perf_counter() - started, None, path)


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
    """Copy every verifiable record before the first corrupt one into a new ledger."""
    _new_directory(into)
    with ledger_errors():
        journal = Journal.open_readonly(path, index_names=INDEX_NAMES, lock=True)
    try:
        found = journal.problem
        if found is not None and found.lsn is None and not isinstance(found, JournalAnchorMissingError):
            raise JournalCorrupted(f"nothing to salvage: {found}", None, found.where) from found  # not this ledger's
        with ledger_errors():
            report = audit(journal, progress)
            stop = report.corrupt_lsn if report.corrupt_lsn is not None else journal.last_lsn + 1
            copied, lost = _copy_prefix(journal, into, stop)
            anchored = journal.anchor.durable_lsn if journal.anchor is not None else 0
            lost += [{"lsn": lsn, "transfer": None, "why": "durable once (its anchor says so), and gone from the journal"}
                     for lsn in range(max(stop, journal.last_lsn + 1), anchored + 1)]
            if report.corrupt_lsn is not None:
                verdict = "salvaged: everything before the first corrupt record was copied"
            elif not report.whole:
                verdict = "salvaged: every record verifies, but the indexes were damaged; NEW has them rebuilt"
            else:
                verdict = "nothing was lost: the ledger is whole; NEW is a verified copy"
            return {"path": path, "into": into, "first_corrupt_lsn": report.corrupt_lsn, "whole": report.whole,
                    "problem": report.problem, "records_copied": copied, "lost": lost, "verdict": verdict}
    finally:
        journal.close()


def _copy_prefix(journal: Journal, into: str, stop: int) -> tuple[int, list[dict[str, Any]]]:
    target = Journal.open(into, index_names=INDEX_NAMES)
    try:
        sequencer = Sequencer(target, {}, {})
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
            lost.append({"lsn": lsn, "transfer": found.transfer.id, "why": "commit after the corruption"})
        elif isinstance(found, Refused):
            lost.append({"lsn": lsn, "transfer": found.request.id, "why": "reject after the corruption"})
        elif isinstance(found, Opened):
            lost.append({"lsn": lsn, "transfer": None, "account": found.account.id,
                         "why": "account opened after the corruption"})
    return copied, lost


def _copy_record(sequencer: Sequencer, record: Record) -> int:
    """Journal `record` again through `sequencer` (its entries re-decided and stamped anew);
    1, or 0 for a checkpoint (the copy makes its own)."""
    if isinstance(record, Opened):
        with sequencer.lock:
            sequencer.open_account(record.account, Completion())
    elif isinstance(record, Committed):
        transfer = record.transfer
        request = TransferRequest(transfer.id, transfer.source, transfer.destination, transfer.amount)
        committed = sequencer.commit(request, lambda debit, credit: None, Completion())
        assert not isinstance(committed, str), (request, committed)  # the original was decided the same way
    elif isinstance(record, Refused):
        sequencer.reject(record.request, record.code, Completion())
    return 0 if isinstance(record, Checkpointed) else 1


def replay(path: str, into: str, progress: Progress = None) -> dict[str, Any]:
    """Replay the journal into a fresh ledger through the public engine; compare hashes.

    Accounts and committed transfers are replayed in journal order. Rejections
    are not: a refusal can depend on holds that were in flight at the time, and
    refused transfers leave no entries, so the state hash does not cover them.
    """
    _new_directory(into)
    started = time.perf_counter()
    with _reading(path) as source:
        original = state_hash(source, _current_accounts(source))
        replayed = rejected = 0
        with Ledger.open(into) as ledger:
            pending: list[TransferRequest] = []
            for record in records(source):
                if isinstance(record, Opened):
                    _flush(ledger, pending)
                    account = record.account
                    ledger.create_account(account.id, currency=account.currency, overdraft_limit=account.overdraft_limit)
                elif isinstance(record, Committed):
                    transfer = record.transfer
                    pending.append(TransferRequest(transfer.id, transfer.source, transfer.destination, transfer.amount))
                    replayed += 1
                    if len(pending) >= 1000:
                        _flush(ledger, pending)
                elif isinstance(record, Refused):
                    rejected += 1
                if progress is not None and not record.lsn % 10_000:
                    progress(record.lsn)
            _flush(ledger, pending)
            fresh = ledger.state_hash()
    return {"path": path, "into": into, "transfers_replayed": replayed, "rejections_not_replayed": rejected,
            "state_hash_original": original, "state_hash_replayed": fresh, "elapsed_s": round(time.perf_counter() - started, 3),
            "verdict": "identical" if original == fresh else "DIFFERENT"}


def _current_accounts(journal: Journal) -> list[Account]:
    """Every account, from the newest checkpoint and the records after it."""
    return list(recover_books(journal).accounts.values())


def _flush(ledger: Ledger, pending: list[TransferRequest]) -> None:
    if not pending:
        return
    for request, outcome in zip(pending, ledger.transfer_many(pending), strict=True):
        if isinstance(outcome, LedgerError):
            raise NotALedger(f"replay diverged: transfer {request.id!r} now fails with {outcome.code}")
    pending.clear()


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
                if found is not None and found.lsn >= start:
                    row = _row(found)
                    if account is None or account in (row["source"], row["destination"]):
                        rows.append(row)
            else:
                for record in records(journal, max(0, start - 1)):
                    row = _row(record)
                    if account is not None and account not in (row.get("source"), row.get("destination"), row.get("account")):
                        continue
                    rows.append(row)
                    if limit is not None and len(rows) >= limit:
                        break
        except JournalCorrupted as error:
            problem = str(error)
        if problem is None and journal.problem is not None:
            problem = str(journal.problem)
    return {"path": path, "records": rows, "problem": problem}


def _row(record: Record) -> dict[str, Any]:
    """A record as `tally inspect` shows it."""
    if isinstance(record, Opened):
        account = record.account
        return {"lsn": record.lsn, "kind": "account", "account": account.id, "currency": account.currency,
                "overdraft_limit": account.overdraft_limit}
    if isinstance(record, Checkpointed):
        return {"lsn": record.lsn, "kind": "checkpoint", "accounts": record.accounts}
    if isinstance(record, Refused):
        request = record.request
        return {"lsn": record.lsn, "kind": "reject", "transfer": request.id, "source": request.source,
                "destination": request.destination, "amount": request.amount, "code": record.code}
    transfer, debit, credit = record.transfer, record.debit, record.credit
    return {"lsn": record.lsn, "kind": "commit", "transfer": transfer.id, "source": transfer.source,
            "destination": transfer.destination, "amount": transfer.amount, "source_seq": debit.seq,
            "source_balance": debit.balance, "destination_seq": credit.seq, "destination_balance": credit.balance}


def _account(journal: Journal, account_id: str, txn: Any) -> Account:
    check_id(account_id, "account id")  # e.g. a byte that is not UTF-8 on the command line
    account = account_of(journal, account_id, txn)
    if account is None:
        raise AccountNotFound(f"no account {account_id!r} in {journal.path}")
    return account


def balance(path: str, account_id: str) -> dict[str, Any]:
    with _reading(path) as journal, journal.snapshot() as txn:
        account = _account(journal, account_id, txn)
        last = last_entry(journal, account_id, None, txn)
        return {"account": account_id, "currency": account.currency, "overdraft_limit": account.overdraft_limit,
                "posted": last.balance if last else 0, "entries": last.seq if last else 0,
                "last_lsn": last.lsn if last else None}


def history(path: str, account_id: str, limit: int) -> dict[str, Any]:
    with _reading(path) as journal, journal.snapshot() as txn:
        account = _account(journal, account_id, txn)
        entries = entries_of(journal, account_id, txn=txn)
        shown = entries[-limit:] if limit else entries
        return {"account": account_id, "currency": account.currency, "entries_total": len(entries),
                "entries": [{"seq": entry.seq, "lsn": entry.lsn, "transfer": entry.transfer_id, "amount": entry.amount,
                             "balance": entry.balance} for entry in shown]}


__all__ = ["balance", "history", "inspect", "recover", "replay", "salvage", "verify"]
