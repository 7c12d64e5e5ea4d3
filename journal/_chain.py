"""The journal's hash chain: its head, the cheap check an open makes, and the whole walk.

Every record written by this code carries a digest (`journal._format`):
`digest_n = SHA-256(digest_{n-1} || LSN key_n || payload_n)`, from `GENESIS`. The *head* is
the last LSN and its digest; an auditor who notes it can later prove that the ledger still
extends it (`ChainReport.diverges_at`): a record rewritten (even with a valid CRC), deleted
(and the rest renumbered) or reordered changes the digest of every record from it on.

What the chain cannot prove on its own: that nobody rewrote the whole history from some
record on and recomputed every digest after it (the chain would verify). Only a head noted
outside the ledger catches that, hence `--expect-head`.

Older formats (1-3) wrote unchained records (record version 1). Formats never upgrade in
place: such a ledger keeps its format, and the records this code writes into it are chained,
from `GENESIS` at the first of them. So a chain is: an unchained prefix (only in formats 1-3,
and empty in format 4), then chained records to the end. An unchained record after a chained
one, or any in a format-4 ledger, is a break; so is a digest that does not follow from the
record before it.

The digest *at* an LSN is that record's digest, or `GENESIS` if the record predates the chain
(the chain is empty there): so a head is always an LSN and 32 bytes, `GENESIS` for a ledger
whose records all predate the chain, or that has none.

Costs: an open checks the last record's link only (two reads and one hash: `tail_head`),
enough to continue the chain; never the whole chain, which `walk_chain` checks, reading
and hashing every record (`tally verify`, the audit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from journal._errors import JournalCorruptedError
from journal._format import GENESIS, chain_digest, key_lsn, lsn_key, unframe_chained
from journal._limits import CHAIN_FROM_FORMAT


@dataclass(frozen=True)
class ChainHead:
    """The last LSN of a journal (or the LSN a head was noted at) and the chain's digest there."""

    lsn: int
    digest: bytes
    """32 bytes; `GENESIS` where no chained record is at or before `lsn`."""

    def __post_init__(self) -> None:
        assert self.lsn >= 0 and len(self.digest) == len(GENESIS), self


@dataclass(frozen=True)
class ChainReport:
    """What walking the whole chain found."""

    head: ChainHead
    """The last LSN and the digest its record carries (as `Journal.head` reads it); where a
    record fails its checksum or is missing, the one before it: the last record the walk
    read, so always an LSN and the digest stored there."""
    chained_from: int | None
    """The first chained LSN (1 in a format-4 ledger); None if no record is chained yet."""
    break_lsn: int | None = None
    """The first LSN where the chain breaks (None: it holds to the head)."""
    problem: str | None = None
    """Why it breaks there."""
    diverges_at: int | None = None
    """With an expected head: the LSN where the ledger stops extending it (None: it extends it)."""
    divergence: str | None = None
    """Why it does not extend the expected head."""
    unchained_through: int = 0
    """The last LSN that predates the chain (0: none does; always 0 in format 4, whose every
    record is chained from LSN 1)."""


def _unchained(format_version: int) -> str:
    return f"its record is unchained (record version 1) in a format-{format_version} ledger, whose every record is chained"


def _link(lsn: int, previous: bytes | None, digest: bytes | None, payload: bytes, chaining: bool,
          format_version: int) -> str | None:
    """Why record `lsn` (its `digest`, None if unchained) does not follow `previous` (the
    digest before it, None if that record predates the chain), or None if it does.
    `chaining`: a chained record came before it."""
    if digest is None:
        if format_version >= CHAIN_FROM_FORMAT:
            return _unchained(format_version)
        if chaining:
            return "its record is unchained (record version 1) after chained ones: the chain was cut here"
        return None
    expected = chain_digest(GENESIS if previous is None else previous, lsn_key(lsn), payload)
    if digest != expected:
        return ("its digest does not follow from the record before it: this record, or one before it, "
                "was rewritten, deleted or moved")
    return None


def tail_head(read: Callable[[int], bytes | None], last_lsn: int, format_version: int) -> ChainHead:
    """The head to continue the chain from, once the last record's link checks: its digest
    follows from the record before it (two reads, one hash: cheap enough for every open).
    `read(lsn)` is the stored record at `lsn` (None if missing). Raises `JournalCorruptedError`
    naming the LSN where the link breaks, or a record that fails its checksum."""
    if last_lsn == 0:
        return ChainHead(0, GENESIS)
    last = read(last_lsn)
    if last is None:
        raise JournalCorruptedError(f"LSN {last_lsn} is missing", last_lsn)
    digest, payload = unframe_chained(last_lsn, last)
    previous: bytes | None = None
    if last_lsn > 1:
        before = read(last_lsn - 1)
        if before is None:
            raise JournalCorruptedError(f"LSN {last_lsn - 1} is missing", last_lsn - 1)
        previous = unframe_chained(last_lsn - 1, before)[0]
        if previous is None and format_version >= CHAIN_FROM_FORMAT:
            raise JournalCorruptedError(f"the chain breaks: {_unchained(format_version)}", last_lsn - 1)
    problem = _link(last_lsn, previous, digest, payload, previous is not None, format_version)
    if problem is not None:
        raise JournalCorruptedError(f"the chain breaks: {problem}", last_lsn)
    return ChainHead(last_lsn, GENESIS if digest is None else digest)


def walk_chain(records: Iterable[tuple[bytes, bytes]], format_version: int,
               expected: ChainHead | None = None) -> ChainReport:
    """Walk every stored record `(key, value)`, in key order from LSN 1: check each checksum,
    that LSNs run 1, 2, 3... and each link of the chain; report the first break and, with
    `expected`, whether the journal extends that head. Reads everything, writes nothing."""
    digest: bytes | None = None  # the digest at the LSN before, None: it predates the chain
    chained_from: int | None = None
    last = 0
    break_lsn = problem = None
    at_expected: bytes | None = None  # the digest at expected.lsn, once passed
    for key, value in records:
        lsn = last + 1
        if key != lsn_key(lsn):
            found = key_lsn(key) if len(key) == 8 else key
            break_lsn, problem = lsn, f"LSN {lsn} is missing (next stored is {found!r})"
            break
        try:
            record_digest, payload = unframe_chained(lsn, value)
        except JournalCorruptedError as error:  # the head stays the record before it: the last one read
            break_lsn, problem = lsn, str(error)
            break
        last = lsn
        if break_lsn is None:
            why = _link(lsn, digest, record_digest, payload, chained_from is not None, format_version)
            if why is not None:
                break_lsn, problem = lsn, why
        if record_digest is not None and chained_from is None:
            chained_from = lsn
        digest = record_digest
        if expected is not None and lsn == expected.lsn:
            at_expected = GENESIS if digest is None else digest
    head = ChainHead(last, GENESIS if digest is None else digest)
    unchained = 0 if format_version >= CHAIN_FROM_FORMAT else last if chained_from is None else chained_from - 1
    report = ChainReport(head, chained_from, break_lsn, f"the chain breaks at LSN {break_lsn}: {problem}"
                         if break_lsn is not None else None, unchained_through=unchained)
    if expected is None or expected.lsn == 0:
        return report
    return _against(report, expected, at_expected)


def _against(report: ChainReport, expected: ChainHead, at_expected: bytes | None) -> ChainReport:
    """`report`, with where (if anywhere) the journal stops extending the `expected` head."""
    lsn = expected.lsn
    if lsn <= report.unchained_through:  # its digest is GENESIS whatever the records up to it hold
        return replace(report, diverges_at=lsn, divergence=(
            f"nothing shows the ledger extends the head noted ({lsn}:{expected.digest.hex()}): LSN {lsn} predates "
            f"the chain (LSN 1 to {report.unchained_through} were written unchained, before format 4), so no digest "
            f"vouches for the history up to it; note a head past LSN {report.unchained_through}"))
    if report.break_lsn is not None and report.break_lsn <= lsn:
        where, why = report.break_lsn, f"{report.problem} (at or before the head): the history up to it was changed"
    elif at_expected is None:
        where = min(report.head.lsn, lsn - 1) + 1
        why = f"the journal ends at LSN {report.head.lsn}: LSN {where} to {lsn} are gone (truncated)"
    elif at_expected != expected.digest:
        where, why = lsn, f"its digest at LSN {lsn} is {at_expected.hex()}: the history up to LSN {lsn} was rewritten"
    else:
        return report
    return replace(report, diverges_at=where, divergence=f"the ledger does not extend the head noted "
                   f"({lsn}:{expected.digest.hex()}): it diverges at LSN {where}: {why}")
