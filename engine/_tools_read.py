"""Reading a ledger offline: `tally inspect` (the journal as readable rows), `tally balance`
(now, or as of an LSN or a time) and `tally history` (an account's latest entries and
transfers), never writing.

Each returns a plain dict (the `--json` form); `engine._cli` runs it, `engine._cli_render`
renders it. The journal is opened through `engine._tools` (`reading`); a record's row (`record_row`)
is also what `recover` shows of the last one (`engine._tools_audit`). Making a new ledger from
an old one is in `engine._tools_salvage` and `engine._tools_copy`.
"""

from __future__ import annotations

import time
from itertools import islice
from typing import Any

from coordinator import (
    Account,
    AccountNotFound,
    Checkpointed,
    Committed,
    Expired,
    JournalCorrupted,
    Opened,
    Record,
    Refused,
    Resolution,
    Row,
    TRANSFERS_PAGE_MAX,
    Transfer,
    TransferRequest,
    account_lsns,
    account_of,
    opened_lsn,
    check_id,
    decode_entry,
    entries_at,
    entry_row_at,
    record_at,
    records,
    transfer_of,
    pairs,
    unindexed_entries,
    unindexed_holds_by_key,
)
from journal import Journal

from engine._history import History
from engine._readonly import recover_beside_writer
from engine._tools import reading


def inspect(path: str, start: int, limit: int | None, transfer: str | None, account: str | None) -> dict[str, Any]:
    """The journal as readable rows, for a person reading what happened: what can be read is
    shown, and `problem` says what cannot (a damaged record, a gap, records the anchor saw and
    the journal lost). A transfer's record is found through the transfers index, not a scan;
    `transfer_lsn` says where it is (None: no record of it), also when it is not shown.
    Raises `AccountNotFound` for an `account` the ledger has not (with a `transfer` too)."""
    rows: list[dict[str, Any]] = []
    problem = None
    transfer_lsn = None
    with reading(path, audited=True) as journal:
        try:
            if transfer is not None:
                check_id(transfer, "transfer id")
                if account is not None:
                    with journal.snapshot() as txn:
                        _account(journal, account, txn)
                found = transfer_of(journal, transfer)
                transfer_lsn = None if found is None else found.lsn
                if found is not None and found.lsn >= start and (account is None or _touches(found, account, journal)):
                    rows.append(record_row(found))
            elif account is not None:
                _account_rows(journal, account, start, limit, rows)
            else:
                for record in records(journal, max(0, start - 1)):
                    rows.append(record_row(record))
                    if limit is not None and len(rows) >= limit:
                        break
        except JournalCorrupted as error:
            problem = str(error)
        if problem is None and journal.problem is not None:
            problem = str(journal.problem)
    report: dict[str, Any] = {"path": path, "records": rows, "problem": problem}
    if transfer is not None:  # where its record is, shown or not (before --from, of other accounts)
        report["transfer_lsn"] = transfer_lsn
    return report


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
                rows.append(record_row(record))


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


def record_row(record: Record) -> dict[str, Any]:
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
        if record.ledger_pending >= 0:  # likewise
            row["ledger_pending"] = record.ledger_pending
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
        with reading(path) as journal:
            with journal.snapshot() as txn:
                account = _account(journal, account_id, txn)
            history = _history(journal)
            lsn = history.lsn_of(at_lsn, at_timestamp)
            found = history.balance(account_id, lsn)
            return {"account": account_id, "currency": account.currency, "at_lsn": lsn,
                    "at_timestamp": history.timestamp(lsn), "posted": found.posted, "pending": found.pending,
                    "available": found.available, "incoming": found.incoming}
    with reading(path) as journal:
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
    with reading(path) as journal:
        unindexed, holds = _unindexed(journal)  # (read before the snapshots below, as a ledger reads them)
        reads = _history(journal, unindexed, holds)
        end = reads.end()
        with journal.snapshot() as txn:
            account = _account(journal, account_id, txn)
        transfers: list[Transfer] = []
        until = end
        while until > 0 and (not limit or len(transfers) < limit):  # page by page: a page holds at most a maximum
            asked = min(limit - len(transfers), TRANSFERS_PAGE_MAX) if limit else TRANSFERS_PAGE_MAX
            page = reads.transfers(account=account_id, until_lsn=until, reverse=True, limit=asked)
            if transfers and limit and len(transfers) + len(page) > limit:  # a chain alone longer than what is
                break  # left, which one page of `limit` ends before
            transfers += page
            if not page or (len(page) < asked < TRANSFERS_PAGE_MAX):  # the first transfer, or the last page's
                break  # limit leaves out a chain (as one page does); a full page's, the next page has
            until = page[-1].lsn - 1
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


__all__ = ["balance", "history", "inspect"]
