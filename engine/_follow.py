"""`Ledger.events`: the stream of business events, read and followed.

The iterator reads a chunk of records at a time (`coordinator.EventReader`), each chunk in
its own short read transaction inside a ledger call, and yields outside any call and any
transaction: a consumer that takes its time holds nothing (not `Ledger.close`, not an LMDB
reader). Following, it waits for the next durable record in bounded slices of
`FOLLOW_WAIT_S_MAX`: an open ledger's writer wakes it as each group commit is published
(`Journal.wait_past`); a read-only ledger, which another process writes, polls
(`FOLLOW_POLL_S`), since that process cannot notify this one.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from coordinator import Event, EventReader, LedgerClosed, Resolution, Transfer

if TYPE_CHECKING:
    from engine._ledger_reads import LedgerReads

FOLLOW_WAIT_S_MAX = 0.05
"""Longest one wait of a follower before it looks again whether its ledger closed (a close
releases an open ledger's followers at once; this bounds it whatever happens)."""

FOLLOW_POLL_S = (0.0002, 0.002)
"""A read-only follower's first and longest pause between two looks for a new record (the
pause doubles from one to the other, and starts again at the first after each record)."""


def follow_events(ledger: LedgerReads, after_lsn: int, follow: bool, timeout_s: float | None) -> Iterator[Event]:
    """The events after `after_lsn` (see `Ledger.events`). Not following, it ends at the last
    durable record, and raises `LedgerClosed` if the ledger closes before it gets there;
    following, it ends when the ledger closes or `timeout_s` passes with no new record."""
    reader = EventReader(ledger._journal, after_lsn)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            with ledger._read():
                chunk = reader.read(ledger._events_last_lsn())
        except LedgerClosed:
            if follow:
                return
            raise
        if chunk:
            yield from chunk
            if timeout_s is not None:  # the time without a new event counts from here (the consumer
                deadline = time.monotonic() + timeout_s  # may have taken long over the chunk)
        if not reader.caught_up:
            continue
        if not follow:
            return
        wait_s = FOLLOW_WAIT_S_MAX
        if deadline is not None:
            wait_s = min(wait_s, deadline - time.monotonic())
            if wait_s <= 0:
                return
        try:
            ledger._await_records(reader.after_lsn, wait_s)
        except LedgerClosed:
            return
        if ledger.closed:
            return


def event_line(event: Event) -> str:
    """An event as one line for people (`tally tail`): LSN, timestamp, kind, what it did."""
    head = f"{event.lsn:>10}  {event.timestamp:>19}  {event.kind:<8}"
    if event.account is not None:
        account = event.account
        return f"{head}  {account.id}  {account.currency}  limit {account.overdraft_limit}"
    parts = []
    for made in event.transfers:
        if isinstance(made, Transfer):
            part = f"{made.id} {made.source} -> {made.destination} {made.amount}"
            if made.kind != "single":
                part += f" ({made.kind}{' of ' + made.pending_id if made.pending_id else ''})"
        elif isinstance(made, Resolution):
            amount = "all" if made.amount is None else made.amount
            part = f"{made.id} {'void' if made.void else 'post'} of {made.pending_id} {amount}"
        else:
            part = f"{made.id} {made.source} -> {made.destination} {made.amount}"
        parts.append(part)
    tail = f"  refused: {event.code}" if event.code is not None else ""
    return f"{head}  {'; '.join(parts)}{tail}"
