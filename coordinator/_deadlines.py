"""The deadlines of the open pending transfers: which comes due next, kept without a pause.

Every pending transfer with a timeout pushes (deadline, id) onto a heap as it is stamped
(`coordinator._stamps`); one posted or voided leaves its entry there, stale, and `expire`
drops stale ones as they come due. Left alone, an hour's timeouts would keep an hour of posted
pending transfers; so once the stale ones counted outnumber the rest by
`DEADLINES_STALE_SLACK`, the heap is compacted: the live entries move to a new heap. A
rebuild in one go is one pass over the heap under the sequencer's lock, 0.13-0.2 s at 300,000
open pending transfers with a deadline (`bench/README.md`, "The deadline heap compacted a step
at a time"), a pause every transfer waits out; so it moves `DEADLINES_DRAIN_STEP` entries (and
twice the records, up to three steps' worth) a time, each time a record is queued (`Sequencer._appended`). `Deadlines` is
the sequencer's base class that keeps them; every method is called with the sequencer's lock
held, but `next_deadline`, a hint.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping

from coordinator._limits import DEADLINES_DRAIN_STEP, DEADLINES_STALE_SLACK
from coordinator._state import Pending

Deadline = tuple[int, str]
"""(deadline, id) of a pending transfer."""


class Deadlines:
    """The deadline heaps of `coordinator._sequencer.Sequencer`, which sets them up
    (`_set_up_deadlines`) and calls `_tidy_deadlines` from its `_appended`."""

    pending: dict[str, Pending]
    _deadlines: list[Deadline]
    """A heap of (deadline, id): every open pending transfer with a deadline has its own here
    or in `_draining` (pushed here where it is stamped, `coordinator._stamps`), and stale ones
    may follow (of pending transfers posted or voided since, or stamped in a record never
    queued), which `expire` drops as they come due and the compaction before."""
    _draining: list[Deadline]
    """The heap a compaction started with (`_compact_deadlines`), whose live entries it moves
    to `_deadlines` a step at a time (`_drain_deadlines`), each taken from its end, which keeps
    it a heap: so what comes due next is at the top of one of the two. Empty between compactions."""
    _deadlines_stale: int
    """How many entries are stale, counted where a post or a void of a pending transfer with a
    deadline is stamped (forgotten again if its record is not queued, `_undo_counts`) and where
    `expire` drops one; back to 0 as a compaction starts. It only says when to compact, never
    what: an entry stale some other way (its record refused) is not counted, one dropped may be
    such (so it never goes below 0), and one a compaction drops was counted after it started."""

    def _set_up_deadlines(self, pending: Mapping[str, Pending]) -> None:
        """The heaps of a sequencer opening on these open pending transfers: exactly the live ones."""
        self._deadlines = [(found.deadline, found.id) for found in pending.values() if found.deadline]
        heapq.heapify(self._deadlines)
        self._draining = []
        self._deadlines_stale = 0

    def next_deadline(self) -> int | None:
        """The earliest deadline of an open pending transfer (or a stale one: a hint). Also
        read without the lock (the expirer's wait): a heap emptied meanwhile reads None."""
        for _ in range(3):  # a heap emptied meanwhile (the old one's last step, an expiry): read again
            try:
                heap = self._earlier()
                return heap[0][0] if heap else None
            except IndexError:
                continue
        return None

    def _earlier(self) -> list[Deadline]:
        """The heap whose top is the earliest entry (either, if both are empty)."""
        heap, draining = self._deadlines, self._draining
        return draining if draining and (not heap or draining[0] < heap[0]) else heap

    def _due_top(self, cutoff: int) -> tuple[list[Deadline], Deadline] | None:
        """The heap whose top is the earliest entry, and that entry, if it is due by `cutoff`
        (live or stale); else None. The caller pops it once it has taken what it needs."""
        heap = self._earlier()
        return (heap, heap[0]) if heap and heap[0][0] <= cutoff else None

    def _tidy_deadlines(self, records: int) -> None:
        """After `records` records were queued and everything stamped was entered: a step of
        the compaction under way, or a compaction started if it is due (`_compact_deadlines`)."""
        if self._draining:  # (records beyond a step's worth count as that: most push no deadline)
            self._drain_deadlines(DEADLINES_DRAIN_STEP + 2 * min(records, DEADLINES_DRAIN_STEP))
        elif self._deadlines_stale > DEADLINES_STALE_SLACK and (
                2 * self._deadlines_stale > len(self._deadlines) + DEADLINES_STALE_SLACK):
            self._compact_deadlines()

    def _compact_deadlines(self) -> None:
        """Start moving the live entries of `_deadlines` to a new heap (`_draining` is the old
        one now), and make the first step. Started by `_tidy_deadlines` once the stale ones
        counted outnumber the rest by `DEADLINES_STALE_SLACK`: so the two heaps stay within about
        three times the open pending transfers with a deadline plus that slack (a step moves at
        least twice what the records since the last pushed, for a record of one request), and
        a compaction costs, amortised, O(log heap) a post or void counted since the last one.

        Why it drops no live deadline: a step keeps (deadline, id) exactly when `pending[id]` is
        open with that deadline, so the only entry it could wrongly drop is that of a pending
        transfer stamped (its deadline pushed) and not yet entered in `pending`. Each path
        stamps and enters in one hold of `lock` (`Stamping.stamp` enters at once, but for
        `commit`, which enters once the record is queued (`enter_stamped`), in the same hold;
        a chunk in turn, `coordinator._turns`, whichever way it goes, the lane's and the
        combiner's, enters each ticket as it stamps it; a chain's legs are stamped and entered
        together; `expire` re-pushes only what it took out of the heaps, all still open), and
        each path calls `_appended` under that hold only after it entered all it stamped (a
        record not queued never reaches `_appended`, nor is ever entered). `lock` is not
        reentrant, so no other path is between a stamp and its entering meanwhile: at
        `_appended` nothing stamped is unentered (`_unentered` empty: `_appended` checks it,
        since an interrupt in the wrong place could leave one). The heap built at open holds
        exactly the open ones with a deadline. An interrupt cannot lose an entry either: the
        old heap becomes `_draining` before `_deadlines` is replaced (in between both are the
        same list, which the next step puts right), and a step pushes its entries onto the new heap
        before it takes them off the old: in between they are in both, and the next step pushes
        them again. Such copies of an entry are equal, so they come due together, and `expire`
        takes each id once (the second copy, in this record's batch or, if the first filled it,
        the next's, is dropped as stale)."""
        self._draining = self._deadlines
        self._deadlines = []
        self._deadlines_stale = 0
        self._drain_deadlines(DEADLINES_DRAIN_STEP)

    def _drain_deadlines(self, step: int) -> None:
        """Move up to `step` entries from the end of `_draining` to `_deadlines`, the live ones."""
        draining, pending = self._draining, self.pending
        if draining is self._deadlines:  # an interrupt landed between the two assignments of `_compact_deadlines`
            self._deadlines = []
        heap, cut = self._deadlines, max(0, len(draining) - step)  # (the old heap without its end is still a heap)
        push = heapq.heappush
        for entry in [entry for entry in draining[cut:] if (found := pending.get(entry[1])) is not None
                      and found.deadline == entry[0]]:
            push(heap, entry)
        del draining[cut:]  # only once they are in the new heap: an interrupt leaves a copy, never none
