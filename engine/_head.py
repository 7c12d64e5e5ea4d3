"""`Head`: where a ledger's hash chain ends, as an auditor notes it."""

from __future__ import annotations

from dataclasses import dataclass

from journal import ChainHead


@dataclass(frozen=True)
class Head:
    """The last durable LSN of a ledger's journal and the hash chain's digest there.

    Every record's digest covers the digest before it, its LSN and its bytes (SHA-256; see
    README.md, "Damage"), so a head noted down outside the ledger pins the whole history up
    to it: `tally verify --expect-head LSN:DIGEST` later fails, naming the LSN, if any record
    up to it was rewritten, deleted or reordered, or the journal was truncated below it.
    `digest` is 64 hex digits; all zeros where no record is chained yet (a new ledger, or
    one of an older format whose records all predate the chain)."""

    lsn: int
    digest: str

    def __str__(self) -> str:
        """`LSN:DIGEST`, the form `--expect-head` takes."""
        return f"{self.lsn}:{self.digest}"


def head_of(found: ChainHead) -> Head:
    """The journal's head, as the engine shows it."""
    return Head(found.lsn, found.digest.hex())
