"""The chain of checkpoints an open walks back: the checkpoint before one, checked, and the
open pending transfers as of a CHECKPOINT5 (see `coordinator._records`).

Every CHECKPOINT4 and CHECKPOINT5 names the one before it (`previous_lsn`); opening takes the
accounts' rows from the newest back (`coordinator._checkpoints._walk_back`) and the open
pending transfers likewise (`open_pending_at`), as does a read of the funds held at an LSN
(`coordinator._holds.checkpoint_before`). What is read is checked before it is used: damage is
`JournalCorrupted` naming the LSN where it is, never repaired.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import compress
from operator import and_, itemgetter, not_
from typing import Any

from journal import Journal, JournalCorruptedError

from coordinator._errors import JournalCorrupted
from coordinator._records import CHECKPOINT4, CHECKPOINT5, decode

_FIRST = itemgetter(0)
PENDING_LSN = itemgetter(5)
"""The LSN of a pending transfer's row ([id, source, destination, amount, deadline, lsn, code])."""


def corrupted(lsn: int, reason: str) -> JournalCorrupted:
    return JournalCorrupted(f"journal corrupted at LSN {lsn}: {reason}", lsn)


def checkpoint_before(journal: Journal, lsn: int, at: int, previous: Any, txn: Any | None = None) -> list[Any]:
    """The checkpoint that the one at `at` (on the walk back from the one at `lsn`) names as
    the one before it, at `previous`: a CHECKPOINT4 or CHECKPOINT5, checked (`check_checkpoint`)."""
    if type(previous) is not int or not 0 < previous < at:
        raise corrupted(at, f"the checkpoint names LSN {previous!r} as the one before it")
    try:
        payload = journal.read(previous, txn)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn) from error
    if payload is None:
        raise corrupted(lsn, f"the checkpoint before it, at LSN {previous}, is not there")
    record = decode(previous, payload)
    if record[0] != CHECKPOINT4 and record[0] != CHECKPOINT5:
        raise corrupted(previous, "a checkpoint names it as the one before, but it is not a CHECKPOINT4 or CHECKPOINT5")
    check_checkpoint(previous, record)
    return record


def check_checkpoint(lsn: int, record: list[Any]) -> None:
    """What opening takes from the CHECKPOINT4 or CHECKPOINT5 `record` at `lsn` must have a
    checkpoint's shape (its sum says the bytes are as written; this, that what was written is
    one). Its rows are checked as they are taken."""
    _, _, _, previous, total, sweep_next, rows, pendings = record[:8]
    if type(total) is not int or total < 0 or type(previous) is not int or previous < 0:
        raise corrupted(lsn, f"the checkpoint's account count {total!r} or previous LSN {previous!r} is not one")
    if type(sweep_next) is not int or not 0 <= sweep_next < max(total, 1):
        raise corrupted(lsn, f"the checkpoint's sweep position {sweep_next!r} is not one of its {total} accounts")
    if type(rows) is not list:
        raise corrupted(lsn, "the checkpoint's rows are not a list")
    if type(pendings) is not list:
        raise corrupted(lsn, "the checkpoint's pending transfers are not a list")
    if record[0] == CHECKPOINT5:
        pending_previous, closed, open_count, sweep_from = record[8:]
        if type(pending_previous) is not int or not 0 <= pending_previous < lsn or type(closed) is not list or \
                type(open_count) is not int or open_count < 0 or type(sweep_from) is not int or sweep_from < 0:
            raise corrupted(lsn, f"the checkpoint's previous LSN {pending_previous!r} for its pending transfers, those "
                                 f"it names closed, their count {open_count!r} or where its sweep goes on {sweep_from!r} "
                                 "is not one")
        if pending_previous == 0 and len(pendings) != open_count:
            raise corrupted(lsn, f"the checkpoint holds {len(pendings)} open pending transfers, not {open_count}")


def holds_every_pending(record: list[Any]) -> bool:
    """Whether the checkpoint `record` holds every pending transfer open at its LSN."""
    return record[0] != CHECKPOINT5 or record[8] == 0


_PENDING_TYPES = (str, str, str, int, int, int, int)
"""The type of each field of a pending transfer's row (`coordinator._state.Pending`)."""


def pending_rows_shaped(rows: list[Any]) -> bool:
    """Whether `rows` are pending transfers' rows, each field of its type (checked a column
    at a time, in C)."""
    return set(map(type, rows)) <= {list} and set(map(len, rows)) <= {len(_PENDING_TYPES)} and all(
        set(map(type, map(itemgetter(at), rows))) <= {kind} for at, kind in enumerate(_PENDING_TYPES))


def open_pending_at(journal: Journal, lsn: int, read: Sequence[tuple[int, list[Any]]],
                    txn: Any | None = None) -> tuple[list[list[Any]], list[int]]:
    """The rows of the pending transfers open as of the CHECKPOINT5 at `lsn`, in the order of
    their LSNs (the legs of one chain, which share one, in the order met), and the LSNs of the
    checkpoints read for them. `read` holds it, first, and checkpoints before it already read,
    newest first, (LSN, record) each: those the walk meets are taken from there, the others
    read (`pending_previous_lsn` links them).

    Newest first, a pending transfer's row is taken unless a checkpoint after the one holding
    it named it closed, or a newer one had it already; the walk stops at a checkpoint that
    holds every one open then, or once it has as many as the newest says are open (each row
    taken is of one still open at the newest, so that many is every one: the count is trusted,
    as the rows are, and a replay checks both). Fewer at the end of the chain is damage at
    `lsn`; a row that is no row, damage at the checkpoint holding it."""
    count = read[0][1][10]
    known = dict(read)
    found: dict[str, list[Any]] = {}
    closed: set[str] = set()  # named closed by the checkpoints read (none of which a newer one holds:
    # closed before it, one was not open there)
    at, record = read[0]
    met = [(at, record[7])]
    while True:
        rows = record[7]
        try:  # its rows of ids neither found nor closed, added: the loops run in C (the fields: below)
            ids = list(map(_FIRST, rows))
            taking = map(not_, map(found.__contains__, ids))
            if closed:
                taking = map(and_, taking, map(not_, map(closed.__contains__, ids)))
            found.update(compress(zip(ids, rows, strict=True), taking))
        except (TypeError, IndexError, KeyError, ValueError) as error:
            raise corrupted(at, f"the checkpoint's pending transfers are not pending transfers' rows: {error!r}") \
                from error
        if holds_every_pending(record) or len(found) >= count:
            break
        if not set(map(type, record[9])) <= {str}:
            raise corrupted(at, "the checkpoint names as closed pending transfers ids that are no ids")
        closed.update(record[9])
        previous = record[8]
        record = known.get(previous) or checkpoint_before(journal, lsn, at, previous, txn)
        at = previous
        met.append((at, record[7]))
    taken = list(found.values())
    if not pending_rows_shaped(taken):  # say where: the first checkpoint holding a row that is no row
        at = next((at for at, rows in met if not pending_rows_shaped(rows)), lsn)
        raise corrupted(at, "the checkpoint's pending transfers are not pending transfers' rows")
    if len(found) != count:
        raise corrupted(lsn, f"the checkpoint and those before it hold {len(found)} open pending transfers, not {count}")
    return sorted(taken, key=PENDING_LSN), [at for at, _ in met]
