"""What several test files share: a clock the test moves, a look at a ledger's books, and
ways to stop the engine at a chosen point."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import pytest

from coordinator import INDEX_NAMES, AuditReport, audit
from engine import Balance, Ledger
from journal import Journal
from journal._meta import Meta, committed_meta, read_metas

NS_PER_S = 1_000_000_000
START_NS = 1_700_000_000 * NS_PER_S
"""Where a test clock starts: a plausible wall-clock time, in nanoseconds."""


class Clock:
    """A clock the test moves: nanoseconds since the epoch, as `Ledger.open(clock_ns=...)` takes."""

    def __init__(self, now_ns: int = START_NS) -> None:
        self.now_ns = now_ns

    def __call__(self) -> int:
        return self.now_ns

    def advance(self, seconds: int) -> None:
        self.now_ns += seconds * NS_PER_S


def balances(ledger: Ledger, *accounts: str) -> dict[str, Balance]:
    return {account: ledger.balance(account) for account in accounts}


def written(ledger: Ledger) -> tuple[int, int]:
    """(records written, durable LSN): what a request that writes nothing leaves as it was."""
    stats = ledger.stats()
    return stats["records_written"], stats["durable_lsn"]


def audit_of(path: Path) -> AuditReport:
    """The audit of a closed ledger (`tally verify`'s, in-process)."""
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        return audit(journal)
    finally:
        journal.close()


def interrupt_after(monkeypatch: pytest.MonkeyPatch, owner: object, name: str) -> None:
    """The next call of `owner.name` runs as usual, then raises `KeyboardInterrupt`: an
    interrupt landing right after it returned. Later calls are the real one again."""
    real = getattr(owner, name)

    def interrupted(*args: Any, **kwargs: Any) -> Any:
        monkeypatch.setattr(owner, name, real)
        real(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(owner, name, interrupted)


def hold_after_commit(ledger: Ledger, wait_s: float = 10.0) -> tuple[threading.Event, threading.Event]:
    """Hold the journal writer once, between LMDB's commit of a group and its release to its
    callers (the durable LSN advanced past it): (`committed`, set once it is held there;
    `release`, which the test sets to let it go on)."""
    writer = ledger._journal._writer
    assert writer is not None
    advance_anchor = writer._advance_anchor
    committed, release = threading.Event(), threading.Event()

    def held(durable_lsn: int) -> None:
        advance_anchor(durable_lsn)
        writer._advance_anchor = advance_anchor  # type: ignore[method-assign]  # once
        committed.set()
        assert release.wait(wait_s)

    writer._advance_anchor = held  # type: ignore[method-assign]
    return committed, release


def wait_until(condition: Any, timeout_s: float = 10.0) -> bool:
    """Poll `condition` until it holds, at most `timeout_s` (for a state another thread reaches)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


LEFT_ASIDE = ["a FIFO", "a link to a file elsewhere", "a hard link to a file elsewhere"]
"""What may be found where the seal or the anchor is written aside before its rename."""


def leave_aside(aside: Path, elsewhere: Path, what: str) -> Callable[[], bool]:
    """Put `what` (one of `LEFT_ASIDE`) at `aside`, a link's target being `elsewhere`; the
    returned check says it was left as it was (the FIFO still there, `elsewhere`'s bytes
    untouched: never written through, nor truncated by its other name)."""
    if what == "a FIFO":
        os.mkfifo(aside)
        return aside.is_fifo
    elsewhere.write_bytes(b"someone else's")
    if what == "a link to a file elsewhere":
        aside.symlink_to(elsewhere)
    else:
        os.link(elsewhere, aside)
    return lambda: elsewhere.read_bytes() == b"someone else's"


def newest_meta(path: Path) -> Meta:
    """The meta page LMDB opens the ledger at `path` by: its newest snapshot's (`journal._meta`)."""
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        return committed_meta(*read_metas(fd, data_file), data_file)
    finally:
        os.close(fd)
