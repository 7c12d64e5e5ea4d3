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
    InvalidRequest,
    JournalCorrupted,
    LedgerError,
    LedgerLocked,
    NotALedger,
    Recovered,
    Sequencer,
    TransferRequest,
    audit,
    check_id,
    decode_entry,
    last_row,
    ledger_errors,
    load_checkpoint,
    state_hash,
    transfer_record,
    unopened,
)
from coordinator._entries import entry_rows, unindexed_entries, unindexed_flat
from coordinator._records import (
    ACCOUNT,
    ACCOUNTS_INDEX,
    CHECKPOINT,
    COMMIT,
    KINDS,
    REJECT,
    decode,
    id_key,
    value_lsn,
)
from journal import (
    Completion,
    Journal,
    JournalAnchorMissingError,
    JournalCorruptedError,
    JournalFormatError,
    reanchor,
)

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
    last LSN (never with `dry_run`). Nothing on disk can be in doubt: holds are never
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
            with journal.snapshot() as txn:
                unindexed = unindexed_flat(journal, txn)
            sequencer = Sequencer(journal, books.accounts, books.states, unindexed=unindexed)
            sequencer.account_lsns.update(books.account_lsns)
            with sequencer.lock:
                lsn = sequencer.checkpoint()
            journal.wait_durable(lsn, 30.0)
            return lsn
    finally:
        journal.close()


def _last_row(journal: Journal) -> dict[str, Any] | None:
    """The last durable record, readable: where the dead process stopped."""
    lsn = journal.last_lsn
    payload = journal.read(lsn) if lsn else None
    return _row(lsn, decode(lsn, payload)) if payload is not None else None


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
            for lsn, payload in journal.scan(0):
                if lsn >= stop:
                    break
                copied += _copy_record(sequencer, decode(lsn, payload))
        except JournalCorruptedError as error:
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
            stored = journal.read(lsn)
            record = decode(lsn, stored) if stored is not None else None
        except (JournalCorruptedError, LedgerError):
            lost.append({"lsn": lsn, "transfer": None, "why": "corrupt too"})
            continue
        if record is not None and record[0] in (COMMIT, REJECT):
            lost.append({"lsn": lsn, "transfer": record[1], "why": KINDS[record[0]] + " after the corruption"})
        elif record is not None and record[0] == ACCOUNT:
            lost.append({"lsn": lsn, "transfer": None, "account": record[1], "why": "account opened after the corruption"})
    return copied, lost


def _copy_record(sequencer: Sequencer, record: list[Any]) -> int:
    kind = record[0]
    if kind == ACCOUNT:
        with sequencer.lock:
            sequencer.open_account(Account(record[1], record[2], record[3]), Completion())
    elif kind == COMMIT:
        request = TransferRequest(*record[1:5])
        committed = sequencer.commit(request, lambda debit, credit: None, Completion())
        assert committed is not None, request
    elif kind == REJECT:
        sequencer.reject(TransferRequest(*record[1:5]), record[5], Completion())
    return 0 if kind == CHECKPOINT else 1


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
            for lsn, payload in source.scan(0):
                record = decode(lsn, payload)
                if record[0] == ACCOUNT:
                    _flush(ledger, pending)
                    ledger.create_account(record[1], currency=record[2], overdraft_limit=record[3])
                elif record[0] == COMMIT:
                    pending.append(TransferRequest(*record[1:5]))
                    replayed += 1
                    if len(pending) >= 1000:
                        _flush(ledger, pending)
                elif record[0] == REJECT:
                    rejected += 1
                if progress is not None and not lsn % 10_000:
                    progress(lsn)
            _flush(ledger, pending)
            fresh = ledger.state_hash()
    return {"path": path, "into": into, "transfers_replayed": replayed, "rejections_not_replayed": rejected,
            "state_hash_original": original, "state_hash_replayed": fresh, "elapsed_s": round(time.perf_counter() - started, 3),
            "verdict": "identical" if original == fresh else "DIFFERENT"}


def _current_accounts(journal: Journal) -> list[Account]:
    """Every account, from the newest checkpoint and the records after it."""
    from coordinator import recover as recover_books

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
                found = transfer_record(journal, transfer)
                if found is not None and found[0] >= start and (account is None or account in found[1][2:4]):
                    rows.append(_row(*found))
            else:
                for lsn, payload in journal.scan(max(0, start - 1)):
                    row = _row(lsn, decode(lsn, payload))
                    if account is not None and account not in (row.get("source"), row.get("destination"), row.get("account")):
                        continue
                    rows.append(row)
                    if limit is not None and len(rows) >= limit:
                        break
        except (JournalCorruptedError, JournalCorrupted) as error:
            problem = str(error)
        if problem is None and journal.problem is not None:
            problem = str(journal.problem)
    return {"path": path, "records": rows, "problem": problem}


def _row(lsn: int, record: list[Any]) -> dict[str, Any]:
    kind = record[0]
    row: dict[str, Any] = {"lsn": lsn, "kind": KINDS[kind]}
    if kind == ACCOUNT:
        row.update(account=record[1], currency=record[2], overdraft_limit=record[3])
    elif kind == CHECKPOINT:
        row.update(accounts=len(record[1]))
    else:
        row.update(transfer=record[1], source=record[2], destination=record[3], amount=record[4])
        if kind == REJECT:
            row.update(code=record[5])
        else:
            row.update(source_seq=record[5], source_balance=record[6],
                       destination_seq=record[7], destination_balance=record[8])
    return row


def _account(journal: Journal, account_id: str, txn: Any) -> Account:
    check_id(account_id, "account id")  # e.g. a byte that is not UTF-8 on the command line
    value = journal.index_get(ACCOUNTS_INDEX, id_key(account_id), txn)
    record = None
    if value is not None:
        if len(value) != 8:
            raise JournalCorrupted(f"the accounts index entry of {account_id!r} does not hold an LSN",
                                   where="the accounts index")
        lsn = value_lsn(value)
        payload = journal.read(lsn, txn)
        record = decode(lsn, payload) if payload is not None else None
    if record is None or record[0] != ACCOUNT or record[1] != account_id:
        raise AccountNotFound(f"no account {account_id!r} in {journal.path}")
    return Account(record[1], record[2], record[3])


def balance(path: str, account_id: str) -> dict[str, Any]:
    with _reading(path) as journal, journal.snapshot() as txn:
        account = _account(journal, account_id, txn)
        row = last_row(journal, account_id, unindexed_entries(journal, txn).get(account_id, []), txn)
        seq, _tid, _amount, posted, lsn = decode_entry(account_id, row) if row is not None else (0, None, 0, 0, None)
        return {"account": account_id, "currency": account.currency, "overdraft_limit": account.overdraft_limit,
                "posted": posted, "entries": seq, "last_lsn": lsn}


def history(path: str, account_id: str, limit: int) -> dict[str, Any]:
    with _reading(path) as journal, journal.snapshot() as txn:
        account = _account(journal, account_id, txn)
        rows = entry_rows(journal, account_id, unindexed_entries(journal, txn).get(account_id, ()), txn=txn)
        entries = []
        for row in rows[-limit:] if limit else rows:
            seq, tid, amount, posted, lsn = decode_entry(account_id, row)
            entries.append({"seq": seq, "lsn": lsn, "transfer": tid, "amount": amount, "balance": posted})
        return {"account": account_id, "currency": account.currency, "entries_total": len(rows), "entries": entries}


__all__ = ["balance", "history", "inspect", "recover", "replay", "salvage", "verify"]
