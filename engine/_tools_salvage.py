"""`tally recover --salvage` (`salvage`): every verifiable record before the first corrupt one
copied, record by record, into a new ledger, and what was lost listed.

A journal that opens is audited and copied as it is. One whose data file's pages keep it from
opening has its records read around the damage first (`journal.rescue`, a *rescue*) into a
scratch journal, which is audited and copied in its place (`_salvage_rescued`). The new ledger
is built beside NEW and published whole (`engine._tools_copy.building`, which `tally replay`
shares). Returns a plain dict (the `--json` form); `engine._cli` runs it, `engine._cli_render`
renders it.
"""

from __future__ import annotations

import os
import secrets
import shutil
from typing import Any

from coordinator import (
    CHECK_INDEXES,
    CHECK_PAIRS,
    INDEX_NAMES,
    AuditReport,
    Checkpointed,
    Committed,
    Expired,
    JournalCorrupted,
    NotALedger,
    Opened,
    Projection,
    Record,
    Refused,
    Sequencer,
    audit,
    copy_record,
    ledger_errors,
    record_at,
    records,
)
from journal import (
    SALVAGE_STAGING_PREFIX,
    Journal,
    JournalAnchorMissingError,
    JournalCorruptedError,
    Rescued,
    reads_around,
    rescue,
    snapshots_vouch,
)

from engine._tools import Progress
from engine._tools_copy import building, new_directory

CORRUPT = "this record is corrupt: whatever it held is lost"
MISSING = "missing from the journal: whatever it held is lost"
IN_A_DAMAGED_PAGE = "in a damaged page of the records: whatever it held is lost"
AFTER_THE_SNAPSHOT = "written after the snapshot read (a newer one is damaged): whatever it held is lost"
IN_A_PAGE_OR_AFTER = ("in a damaged page of the records, or written after the snapshot read (a newer one is "
                      "damaged): whatever it held is lost")
COUNTED_NOT_FOUND = ("counted by the records database's record, and not found: lost in a page that reads as whole "
                     "(an older page left in its place), or the count is damaged")
DURABLE_ONCE = "durable once (its anchor says so), and gone from the journal"


def salvage(path: str, into: str, progress: Progress = None) -> dict[str, Any]:
    """Copy every verifiable record before the first corrupt one into a new ledger at `into`,
    and list what was lost.

    A ledger whose anchor is gone is audited as `recover` audits it: the rest of it checked,
    the missing anchor reported (`anchor_problem`). A data file whose pages keep it from opening
    (a page zeroed, a branch damaged, pages swapped, a meta page) has its records read around the
    damage (`_salvage_rescued`). The copy is built in a directory of its own inside `into`
    (`building`), and its files moved up once it is closed, the anchor last: a salvage that
    fails leaves `into` as it found it, and one killed leaves `into` holding that directory (named
    for what it is) or a copy without its anchor, never one that would verify whole.
    Raises `LedgerLocked` while a live process holds the ledger, `JournalCorrupted` if
    nothing in it can be copied (its data file unreadable, or another ledger's)."""
    new_directory(into)
    damage: JournalCorruptedError | None = None
    with ledger_errors():
        try:
            journal = Journal.open_readonly(path, index_names=INDEX_NAMES, lock=True, index_damage_kept=True)
        except JournalCorruptedError as error:
            if not reads_around(error):
                raise
            damage = error
    if damage is not None:
        return _salvage_rescued(path, into, damage, progress)
    try:
        with building(into, SALVAGE_STAGING_PREFIX) as staging:
            return _salvaged(journal, path, into, staging, progress)
    finally:
        journal.close()


def _salvage_rescued(path: str, into: str, damage: JournalCorruptedError, progress: Progress) -> dict[str, Any]:
    """`salvage` of a ledger whose data file `damage` kept from opening: its records read
    around the damaged pages (`journal.rescue`) into a scratch journal (a directory of its own
    inside `into`, named as the staging one is, removed before the copy is published), which is
    salvaged as an opened journal is, what it says naming the ledger, not the scratch journal."""
    with building(into, SALVAGE_STAGING_PREFIX) as staging:
        scratch = os.path.join(into, f"{SALVAGE_STAGING_PREFIX}{secrets.token_hex(4)}")
        try:
            with ledger_errors():
                rescued = rescue(path, scratch, INDEX_NAMES)
                journal = Journal.open_readonly(scratch, index_names=INDEX_NAMES, index_damage_kept=True)
            try:
                report = _salvaged(journal, path, into, staging, progress, damage, rescued)
            finally:
                journal.close()
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            shutil.rmtree(f"{scratch}-other", ignore_errors=True)  # (`journal.rescue`'s second snapshot's, if left)
    for key in ("problem", "anchor_problem"):
        if report[key] is not None:
            report[key] = report[key].replace(scratch, path)
    return report


def _salvaged(journal: Journal, path: str, into: str, staging: str, progress: Progress,
              damage: JournalCorruptedError | None = None, rescued: Rescued | None = None) -> dict[str, Any]:
    """`salvage`'s audit of `journal` and its copy into `staging`; with `rescued`, `journal` is
    the scratch one a rescue wrote, after `damage` kept the ledger's own from opening."""
    found, anchor_problem = journal.problem, None
    if isinstance(found, JournalAnchorMissingError):
        anchor_problem, journal.problem = str(found), None  # audit the rest of it, as recover does
    elif found is not None and found.lsn is None:
        raise JournalCorrupted(f"nothing to salvage: {found}", None, found.where) from found  # not this ledger's
    unchecked = rescued is not None and rescued.history_unchecked
    anchor = journal.anchor
    if rescued is None and found is not None and anchor is not None and anchor.digest and anchor.durable_lsn:
        with ledger_errors():  # (the open's check of the anchor's digest did not run: the snapshots may still show it)
            unchecked = not snapshots_vouch(path)
    with ledger_errors():
        report = audit(journal, progress)
    corrupt_lsn, problem = report.corrupt_lsn, report.problem
    if rescued is not None and rescued.anchor_missing and anchor_problem is None:  # (the gap's problem said first)
        anchor_problem = ("the anchor is missing: nothing can tell how far the ledger's journal reached, nor whether "
                          "this is its newest state")
    if rescued is not None:
        lost_lsn = rescued.first_missing_lsn
        if lost_lsn is not None and (corrupt_lsn is None or lost_lsn <= corrupt_lsn):
            corrupt_lsn, problem = lost_lsn, str(_first_fault(rescued, damage))
        elif corrupt_lsn is None:
            problem = str(damage)
    stop = corrupt_lsn if corrupt_lsn is not None else journal.last_lsn + 1
    with ledger_errors():
        copied, lost = _copy_prefix(journal, staging, stop, IN_A_DAMAGED_PAGE if rescued is not None else MISSING)
    return {"path": path, "into": into, "first_corrupt_lsn": corrupt_lsn,
            "whole": report.whole and anchor_problem is None and rescued is None, "problem": problem,
            "anchor_problem": anchor_problem, "records_copied": copied,
            "lost": lost + _lost_past(journal, stop, rescued),
            "damaged_pages": _damaged_pages(rescued, damage) if rescued is not None else [],
            "history_unchecked": _unchecked(journal) if unchecked else None,
            "verdict": _verdict(report, anchor_problem, journal.index_damage is not None, rescued, corrupt_lsn)}


def _lost_past(journal: Journal, stop: int, rescued: Rescued | None) -> list[dict[str, Any]]:
    """What was lost past the last record `journal` holds: each LSN up to the one its anchor saw
    durable; of a rescue's, one row for the LSNs up to the last the damaged file held
    (`through_lsn` in it: the first and the last)."""
    anchored = journal.anchor.durable_lsn if journal.anchor is not None else 0
    first = max(stop, journal.last_lsn + 1)
    if rescued is None:
        return [{"lsn": lsn, "transfer": None, "why": DURABLE_ONCE} for lsn in range(first, anchored + 1)]
    rows = []
    for start, end, why in ((first, rescued.through_lsn, _past_why(rescued)),
                            (max(first, rescued.through_lsn + 1), rescued.counted_lsn, COUNTED_NOT_FOUND)):
        if start <= end:
            rows.append({"lsn": start, **({"through_lsn": end} if end > start else {}), "transfer": None, "why": why})
    return rows


def _first_fault(rescued: Rescued, damage: JournalCorruptedError | None) -> JournalCorruptedError | None:
    """The damage that took the first record lost: a page of the records, or a newer snapshot's."""
    faults = rescued.records_faults or rescued.snapshot_faults
    return faults[0] if faults else damage


def _past_why(rescued: Rescued) -> str:
    """Why the records past the last one a rescue read are lost."""
    if rescued.records_faults:
        return IN_A_PAGE_OR_AFTER if rescued.snapshot_faults else IN_A_DAMAGED_PAGE
    return AFTER_THE_SNAPSHOT if rescued.snapshot_faults else DURABLE_ONCE


def _damaged_pages(rescued: Rescued, damage: JournalCorruptedError | None) -> list[str]:
    """Each damage a rescue went around: the open's first, unless the rescue met it too."""
    met = [str(fault) for fault in (*rescued.snapshot_faults, *rescued.records_faults)]
    return met if str(damage) in met else [str(damage), *met]


def _unchecked(journal: Journal) -> str:
    anchor = journal.anchor
    assert anchor is not None
    return (f"the record at LSN {anchor.durable_lsn}, whose digest the anchor holds, was lost with the damage: "
            "nothing shows the records copied are the history written here rather than another copy's of this "
            "ledger (a data file copied back from elsewhere)")


def _verdict(report: AuditReport, anchor_problem: str | None, index_damaged: bool, rescued: Rescued | None,
             corrupt_lsn: int | None) -> str:
    """What a salvage made of the ledger `report` audited (`anchor_problem`: its anchor is gone;
    `index_damaged`: an index entry failed its checksum as it opened; `rescued`: its records were
    read around damaged pages; `corrupt_lsn`: the first record lost)."""
    if corrupt_lsn is not None:
        return "salvaged: everything before the first corrupt record was copied"
    if rescued is not None and rescued.end_unknown:
        return ("salvaged: every record read verifies, but the damage leaves unknown how far the ledger reached (a "
                "meta page, another snapshot or the records' last pages): its last commits may be lost")
    if rescued is not None and rescued.counted_lsn > rescued.through_lsn:
        return ("salvaged: every record read verifies, but the records database counts more than were found (see "
                "what was lost)")
    if rescued is not None:
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


def _copy_prefix(journal: Journal, into: str, stop: int, missing_why: str) -> tuple[int, list[dict[str, Any]]]:
    """Copy the records of `journal` before LSN `stop` into a new journal at `into`: (records
    copied, what was lost: the record at `stop` and each after it, `missing_why` saying why of
    one that is not there)."""
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
    lost: list[dict[str, Any]] = []
    before = stop - 1
    with ledger_errors():
        stored = list(journal.stored_lsns(before))
    for lsn in stored:  # (the records there are, not every LSN up to the last: a damaged key may make it huge)
        if lsn > before + 1:  # (LSNs no record holds: one row)
            lost.append({"lsn": before + 1, **({"through_lsn": lsn - 1} if lsn - 1 > before + 1 else {}),
                         "transfer": None, "why": missing_why})
        before = lsn
        try:
            found = record_at(journal, lsn)
        except JournalCorrupted:
            lost.append({"lsn": lsn, "transfer": None, "why": CORRUPT if lsn == stop else "corrupt too"})
            continue
        if found is None or lsn == stop:  # (the first: whatever it is, the checks stop at it)
            lost.append({"lsn": lsn, "transfer": None, "why": missing_why if found is None else CORRUPT})
        elif isinstance(found, Committed):
            lost += ({"lsn": lsn, "transfer": made.id, "why": "commit after the corruption"}
                     for made in found.transfers)
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


__all__ = ["salvage"]
