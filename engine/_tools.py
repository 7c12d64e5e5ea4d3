"""The offline tools' shared ground: how they open a journal read-only, and what they call a
format they cannot read.

The `tally` CLI's offline tools (`engine._cli` runs them, `engine._cli_render` renders their
reports) each return a plain dict (the `--json` form), and live beside this module: the journal
audits, `verify` and `recover`, in `engine._tools_audit`; making a new ledger from an old one,
`salvage` in `engine._tools_salvage` and `replay` in `engine._tools_copy`; reading a ledger
offline, `inspect`, `balance` and `history`, in `engine._tools_read`. Each opens the journal through `reading` here, and
reports the long scans' progress through a `Progress`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from coordinator import INDEX_NAMES, JournalCorrupted, LedgerError, NotALedger, ledger_errors
from journal import Journal, JournalFormatError


Progress = Callable[[int], None] | None


def unreadable(error: LedgerError) -> bool:
    """A format this code does not read (`JournalCorrupted` from a `JournalFormatError`): not
    damage, but a ledger the command cannot run on here."""
    return isinstance(error, JournalCorrupted) and isinstance(error.__cause__, JournalFormatError)


@contextmanager
def reading(path: str, lock: bool = False, audited: bool = False,
            index_damage_kept: bool = False) -> Iterator[Journal]:
    """The journal, open read-only (with `lock`, refusing while a live process holds it).
    Damage found as it opens is `JournalCorrupted`, except a format this code does not read,
    which the command cannot run on (`NotALedger` says so). A gap in the records or a journal
    short of its anchor is `JournalCorrupted` too, unless the caller is `audited` (the audit
    reports it): the views never show what the journal is known to have lost. With
    `index_damage_kept` (an audit's), an index entry failing its checksum is kept in the
    journal's `index_damage` for the audit to report, and its records are still checked
    (unless it is the tear of a last commit cut off in its flush: `JournalCorrupted` says so)."""
    try:
        with ledger_errors():
            journal = Journal.open_readonly(path, index_names=INDEX_NAMES, lock=lock,
                                            index_damage_kept=index_damage_kept)
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

