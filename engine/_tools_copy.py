"""Making a new ledger from an old one: `tally replay` (`replay`: the journal replayed through
the public engine, the state hashes compared), and how a new ledger is built beside it and
published whole (`building`), which `tally recover --salvage` (`engine._tools_salvage`) shares.

`replay` returns a plain dict (the `--json` form); `engine._cli` runs it, `engine._cli_render`
renders it. The journal is opened through `engine._tools` (`reading`); the audits are in
`engine._tools_audit`, the read-only views in `engine._tools_read`.
"""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from coordinator import (
    Committed,
    Expired,
    InvalidRequest,
    LedgerError,
    LedgerLocked,
    NotALedger,
    Opened,
    Refused,
    Resolution,
    TIMESTAMP_MAX,
    Transfer,
    TransferRequest,
    records,
    state_hash,
)
from journal import (
    ANCHOR_FILE,
    REPLAY_STAGING_PREFIX,
    Journal,
    sync_directory,
)

from engine._ledger import Ledger
from engine._readonly import recover_beside_writer
from engine._tools import Progress, reading


def new_directory(path: str) -> None:
    """Refuse `path` as the new ledger's directory unless it is missing or an empty directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidRequest(f"{path} exists and is not a directory: choose a new directory")
    if os.path.exists(path) and os.listdir(path):
        raise InvalidRequest(f"{path} already exists and is not empty: choose a new directory")


@contextmanager
def building(into: str, prefix: str) -> Iterator[str]:
    """A new ledger built in a directory of its own inside `into` (`_staging`), closed within
    the block, and its files moved up into `into` once the block ends (`_publish`). Whatever
    fails meanwhile (making those directories too), the staging directory is removed, and so is
    each directory this made on the way (`into`, its parents: `_unmake`): `into` is left as it
    was found, never holding a part of a copy, nor one that would verify whole, and no parent
    made for it is left behind."""
    made: list[str] = []
    staging: str | None = None
    try:
        staging = _staging(into, prefix, made)
        yield staging
        _publish(staging, into)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        _unmake(made, into)
        raise


def _staging(into: str, prefix: str, made: list[str]) -> str:
    """A new, empty directory inside `into` (`prefix`, then 8 hex digits: `.salvaging-XXXXXXXX`,
    `.replaying-XXXXXXXX`, names an open of `into` refuses) to build its copy in; `into` (an empty directory, a mount point, a symlink
    to one, or missing) made first, with its parents (`_make_directories`, which adds each it
    makes to `made`): the copy is written on the file system chosen for it."""
    try:
        _make_directories(into, made)
    except OSError as error:  # under a file, a dangling link, no room: as an open of a ledger there says it
        raise NotALedger(f"{into!r} cannot be made a ledger directory: {error}") from error
    staging = os.path.join(into, prefix + secrets.token_hex(4))
    os.mkdir(staging)
    return staging


def _make_directories(into: str, made: list[str]) -> None:
    """Make directory `into` and those of its parents that are missing, as
    `os.makedirs(into, exist_ok=True)` does, adding to `made` (outermost first) each directory
    this call made, as soon as it is made (a later one failing, the caller still knows them):
    never one that was there, nor one another process made meanwhile (its `mkdir` fails)."""
    missing = [*itertools.takewhile(lambda path: not os.path.exists(path), (into, *map(str, Path(into).parents)))]
    for directory in reversed(missing):
        try:
            os.mkdir(directory)
        except FileExistsError:
            if not os.path.isdir(directory):  # (a file, a dangling link: as makedirs says it)
                raise
            continue
        made.append(directory)


def _unmake(made: list[str], into: str) -> None:
    """Remove the directories `made` for `into` (`_make_directories`), innermost first: `into`
    with what a copy moved up into it, each parent only while it is empty (`rmdir`: what
    another process put in one since is left, and that parent with it). Best effort, as this
    runs while a failure is raised."""
    for directory in reversed(made):
        if directory == into:
            shutil.rmtree(directory, ignore_errors=True)
            continue
        with suppress(OSError):
            os.rmdir(directory)


def _publish(staging: str, into: str) -> None:
    """Move the closed copy's files from `staging` up into `into`, the anchor last (a ledger
    without it does not verify whole), then remove `staging`, durably."""
    for name in sorted(os.listdir(staging), key=lambda name: name == ANCHOR_FILE):
        os.rename(os.path.join(staging, name), os.path.join(into, name))
    os.rmdir(staging)
    sync_directory(into)


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
    release before timestamps has 0: its copy gets the last timestamp + 1.) It is built as a
    salvage's copy is (`building`): a replay that fails, diverged or refused, leaves `into` as
    it found it.
    """
    new_directory(into)
    started = time.perf_counter()
    with reading(path) as source:
        books = recover_beside_writer(source)
        last = books.last_lsn
        original = state_hash(source, books.accounts.values(), books.pending.values())
        _unmoved(source, last, path)  # (and again at the end: the hash may count what came after `last`)
        with building(into, REPLAY_STAGING_PREFIX) as staging:
            replayed, rejected, fresh = _replay_into(source, last, staging, progress)
            _unmoved(source, last, path)
    return {"path": path, "into": into, "transfers_replayed": replayed, "rejections_not_replayed": rejected,
            "state_hash_original": original, "state_hash_replayed": fresh, "elapsed_s": round(time.perf_counter() - started, 3),
            "verdict": "identical" if original == fresh else "DIFFERENT"}


def _replay_into(source: Journal, last: int, into: str, progress: Progress) -> tuple[int, int, str]:
    """Replay the records of `source` up to LSN `last` into a fresh ledger at `into` (see
    `replay`), and close it: (transfers replayed, refusals not replayed, its state hash)."""
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
    return replayed, rejected, fresh


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


__all__ = ["building", "new_directory", "replay"]
