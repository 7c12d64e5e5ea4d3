"""Making a new ledger from an old one: `tally recover --salvage` (`salvage`: the verifiable
records before the first corrupt one, copied record by record) and `tally replay` (`replay`:
the journal replayed through the public engine, the state hashes compared).

Each returns a plain dict (the `--json` form); `engine._cli` runs it, `engine._cli_render`
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator import (
    CHECK_INDEXES,
    CHECK_PAIRS,
    INDEX_NAMES,
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
    Refused,
    Resolution,
    Sequencer,
    TIMESTAMP_MAX,
    Transfer,
    TransferRequest,
    audit,
    copy_record,
    ledger_errors,
    record_at,
    records,
    state_hash,
)
from journal import (
    ANCHOR_FILE,
    REPLAY_STAGING_PREFIX,
    SALVAGE_STAGING_PREFIX,
    Journal,
    JournalAnchorMissingError,
    JournalCorruptedError,
    Rescued,
    read_around,
    rescue,
    sync_directory,
)

from engine._ledger import Ledger
from engine._readonly import recover_beside_writer
from engine._tools import Progress, reading


def _new_directory(path: str) -> None:
    """Refuse `path` as the new ledger's directory unless it is missing or an empty directory."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise InvalidRequest(f"{path} exists and is not a directory: choose a new directory")
    if os.path.exists(path) and os.listdir(path):
        raise InvalidRequest(f"{path} already exists and is not empty: choose a new directory")


def salvage(path: str, into: str, progress: Progress = None) -> dict[str, Any]:
    """Copy every verifiable record before the first corrupt one into a new ledger at `into`,
    and list what was lost.

    A ledger whose anchor is gone is audited as `recover` audits it: the rest of it checked,
    the missing anchor reported (`anchor_problem`). A data file whose pages keep it from opening
    (a page zeroed, a branch damaged, pages swapped, a meta page) has its records read page by
    page around the damage (`journal.rescue`) into a scratch journal, which is audited and copied
    in its place (`_salvage_around`). The copy is built in a directory of its own inside `into`
    (`_staging`), and its files moved up once it is closed, the anchor last: a salvage that fails
    leaves `into` as it found it, and one killed leaves `into` holding that directory (named for
    what it is) or a copy without its anchor, never one that would verify whole.
    Raises `LedgerLocked` while a live process holds the ledger, `JournalCorrupted` if
    nothing in it can be copied (its data file unreadable, or another ledger's)."""
    _new_directory(into)
    with ledger_errors():
        try:
            journal = Journal.open_readonly(path, index_names=INDEX_NAMES, lock=True, index_damage_kept=True)
        except JournalCorruptedError as damage:
            if not read_around(damage):
                raise
            return _salvage_around(path, into, damage, progress)
    try:
        with _building(into, SALVAGE_STAGING_PREFIX) as staging:
            return _salvaged(journal, path, into, staging, progress)
    finally:
        journal.close()


def _salvage_around(path: str, into: str, damage: JournalCorruptedError, progress: Progress) -> dict[str, Any]:
    """`salvage` of a ledger whose data file `damage` kept from opening: its records read
    around the damaged pages into a scratch journal (a directory of its own inside `into`,
    removed before the copy is published), which is salvaged as an opened journal is."""
    with _building(into, SALVAGE_STAGING_PREFIX) as staging:
        scratch = os.path.join(into, f"{SALVAGE_STAGING_PREFIX}{secrets.token_hex(4)}")
        try:
            with ledger_errors():
                rescued = rescue(path, scratch, INDEX_NAMES)
                if not rescued.records:
                    raise JournalCorrupted(f"nothing to salvage: no record could be read ({damage})", None,
                                           damage.where)
                journal = Journal.open_readonly(scratch, index_names=INDEX_NAMES, index_damage_kept=True)
            try:
                return _salvaged(journal, path, into, staging, progress, _Around(damage, rescued))
            finally:
                journal.close()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


@dataclass(frozen=True)
class _Around:
    """A salvage read around damaged pages: the damage that kept the data file from opening,
    and what `journal.rescue` read."""

    damage: JournalCorruptedError
    rescued: Rescued

    @property
    def problems(self) -> list[str]:
        """Each damage gone around: the open's first, unless the rescue met it too."""
        met = [str(fault) for fault in (*self.rescued.snapshot_faults, *self.rescued.records_faults)]
        return met if str(self.damage) in met else [str(self.damage), *met]

    @property
    def gone(self) -> str:
        """Why a record not read is lost: in a damaged page, or written after the snapshot read."""
        if self.rescued.records_faults or not self.rescued.snapshot_faults:
            return "in a damaged page of the records: whatever it held is lost"
        return "written after the snapshot read (a newer one's meta page or catalog is damaged): whatever it held is lost"

    @property
    def loss(self) -> str:
        """The damage that took the records lost: a page of the records, or an older snapshot read."""
        faults = self.rescued.records_faults or self.rescued.snapshot_faults
        return str(faults[0]) if faults else str(self.damage)


def _salvaged(journal: Journal, path: str, into: str, staging: str, progress: Progress,
              around: _Around | None = None) -> dict[str, Any]:
    """`salvage`'s audit of `journal` and its copy into `staging` (`around`: the journal is a
    scratch one holding what was read around damaged pages)."""
    found, anchor_problem = journal.problem, None
    if isinstance(found, JournalAnchorMissingError):
        anchor_problem, journal.problem = str(found), None  # audit the rest of it, as recover does
    elif found is not None and found.lsn is None:
        raise JournalCorrupted(f"nothing to salvage: {found}", None, found.where) from found  # not this ledger's
    with ledger_errors():
        report = audit(journal, progress)
    corrupt_lsn, problem = report.corrupt_lsn, report.problem
    first_lost = around.rescued.first_missing_lsn if around is not None else None
    if around is not None and first_lost is not None and (corrupt_lsn is None or first_lost <= corrupt_lsn):
        corrupt_lsn, problem = first_lost, around.loss
    elif around is not None and corrupt_lsn is None:
        problem = str(around.damage)
    stop = corrupt_lsn if corrupt_lsn is not None else journal.last_lsn + 1
    with ledger_errors():
        copied, lost = _copy_prefix(journal, staging, stop, around.gone if around is not None else _GONE)
    anchored = journal.anchor.durable_lsn if journal.anchor is not None else 0
    if around is not None:
        anchored = max(anchored, around.rescued.through_lsn)
    lost += [{"lsn": lsn, "transfer": None, "why": around.gone if around is not None else _GONE_DURABLE}
             for lsn in range(max(stop, journal.last_lsn + 1), anchored + 1)]
    return {"path": path, "into": into, "first_corrupt_lsn": corrupt_lsn,
            "whole": report.whole and anchor_problem is None and around is None, "problem": problem,
            "anchor_problem": anchor_problem, "records_copied": copied, "lost": lost,
            "damaged_pages": around.problems if around is not None else [],
            "verdict": _salvage_verdict(report, anchor_problem, journal.index_damage is not None, around is not None,
                                        corrupt_lsn)}


_GONE = "missing from the journal: whatever it held is lost"
_GONE_DURABLE = "durable once (its anchor says so), and gone from the journal"


def _salvage_verdict(report: AuditReport, anchor_problem: str | None, index_damaged: bool, around: bool,
                     corrupt_lsn: int | None) -> str:
    """What a salvage made of the ledger `report` audited (`anchor_problem`: its anchor is gone;
    `index_damaged`: an index entry failed its checksum as it opened; `around`: its records were
    read around damaged pages; `corrupt_lsn`: the first record lost)."""
    if corrupt_lsn is not None:
        return "salvaged: everything before the first corrupt record was copied"
    if around:
        return ("salvaged: every record was read around the damaged pages and verifies (the damage was in pages "
                "other than the records'); NEW is made anew from them")
    if index_damaged or report.checks[CHECK_PAIRS] is False or report.checks[CHECK_INDEXES] is False:
        return "salvaged: every record verifies, but the indexes were damaged; NEW has them rebuilt"
    if not report.whole:
        return "salvaged: every record was copied, but the ledger is not whole (see the damage)"
    if anchor_problem is not None:
        return ("nothing was lost that the journal shows: every record verifies, but its anchor is missing, so "
                "nothing can tell whether this journal is the ledger's newest; NEW is a verified copy of it")
    return "nothing was lost: the ledger is whole; NEW is a verified copy"


@contextmanager
def _building(into: str, prefix: str) -> Iterator[str]:
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


def _copy_prefix(journal: Journal, into: str, stop: int, gone: str) -> tuple[int, list[dict[str, Any]]]:
    """Copy the records of `journal` before LSN `stop` into a new journal at `into`: (records
    copied, what was lost: the record at `stop` and each after it, `gone` saying why of one
    that is not there)."""
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
    corrupt = "this record is corrupt: whatever it held is lost"
    lost: list[dict[str, Any]] = []
    for lsn in range(stop, journal.last_lsn + 1):
        try:
            found = record_at(journal, lsn)
        except JournalCorrupted:
            lost.append({"lsn": lsn, "transfer": None, "why": corrupt if lsn == stop else "corrupt too"})
            continue
        if found is None or lsn == stop:  # (the first: whatever it is, the checks stop at it)
            lost.append({"lsn": lsn, "transfer": None, "why": gone if found is None else corrupt})
        elif isinstance(found, Committed):
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
    release before timestamps has 0: its copy gets the last timestamp + 1.) It is built as a
    salvage's copy is (`_building`): a replay that fails, diverged or refused, leaves `into` as
    it found it.
    """
    _new_directory(into)
    started = time.perf_counter()
    with reading(path) as source:
        books = recover_beside_writer(source)
        last = books.last_lsn
        original = state_hash(source, books.accounts.values(), books.pending.values())
        _unmoved(source, last, path)  # (and again at the end: the hash may count what came after `last`)
        with _building(into, REPLAY_STAGING_PREFIX) as staging:
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


__all__ = ["replay", "salvage"]
