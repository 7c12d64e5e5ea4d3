"""What the sequencer's next checkpoint holds, and the chain of checkpoints an open reads back.

A CHECKPOINT5 (`coordinator._records`; a CHECKPOINT4 before it) holds the rows of the accounts that changed or opened
since the checkpoint before it, plus a sweep through as many others, in creation order, going
on from where the last sweep stopped; or, at a clean close after a long chain, every account
(`Sequencer.checkpoint_on_close`). `CheckpointRows` makes those rows and keeps count of the
chain, so the sequencer (`coordinator._sequencer`) only journals them; opening reads the chain
back (`coordinator._checkpoints`). `pending_rows` makes the part of the open pending
transfers (CHECKPOINT5). Used under the sequencer's lock only.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from itertools import compress, islice, repeat
from operator import attrgetter, is_not, lt
from typing import Any

from coordinator._limits import CHECKPOINT_PENDING_CHAIN, CHECKPOINT_PENDING_SWEEP_MIN, CHECKPOINT_SWEEP_MIN
from coordinator._state import Pending, Projection

AccountRow = tuple[Any, ...]
"""An account's row in a checkpoint: id, currency, overdraft limit, code, metadata, opening LSN,
seq, posted, last LSN; or its fixed start, the first six (`CheckpointRows.fixed`). Not
`coordinator._entries.Row`, an entry index row."""


class CheckpointRows:
    """The rows of the next checkpoint of `books` (the sequencer's projection) and the chain
    of checkpoints before it."""

    def __init__(self, books: Projection) -> None:
        self._accounts, self._account_lsns, self._states = books.accounts, books.account_lsns, books.states
        self.fixed: dict[str, AccountRow] = {}
        """The unchanging start of an account's row (id, currency, overdraft limit, code,
        metadata, opening LSN), made the first time a checkpoint holds its row (`_fixed_row`):
        never all at once, which for a million accounts reopened would hold the lock through
        the first checkpoint for most of a second."""
        self.ids: list[str] = []
        """Every account's id, in creation order (where the sweep walks); `next` adds the new ones."""
        self.last: tuple[int, int, int] | None = books.checkpoint_chain
        """The newest checkpoint's (LSN, accounts, sweep_next), if the next one may build on it."""
        self._chain: deque[tuple[int, int]] = deque(reversed(books.chain_read))
        """(rows, sweep length) of each checkpoint an open may read back to, the newest last
        (`rows_an_open_reads`); first, those the open read."""

    def next(self, changed: Iterable[str], whole: bool = False) -> tuple[list[AccountRow], int, int, int]:
        """The next checkpoint's rows (of the accounts in `changed`, those with entries since the
        last one, and of those opened since, and the sweep's; with `whole`, of every account),
        the previous checkpoint's LSN it builds on (0: it holds every account), where the next
        sweep starts, and how many accounts there are."""
        ids = self.ids
        if len(ids) < len(self._accounts):  # accounts only grow, in order: add the new ones
            ids += islice(self._accounts, len(ids), None)
        total = len(ids)
        if whole:
            return self._every_row(), 0, 0, total
        included, previous, sweep_next = self._included(total, changed)
        fixed, states, made = self.fixed, self._states, self._fixed_row
        return [(fixed.get(account_id) or made(account_id)) + states[account_id] for account_id in included], (
            previous), sweep_next, total

    def journaled(self, lsn: int, rows: int, previous: int, sweep_next: int, total: int) -> None:
        """Count the checkpoint `next` made, journaled at `lsn` with `rows` rows."""
        last = self.last
        swept = (sweep_next - last[2]) % total if last and previous else None  # None: every account
        chain = self._chain
        if swept is None:
            chain.clear()
            swept = total
        chain.append((rows, swept))
        while len(chain) > 2 and sum(sweep for _, sweep in islice(chain, 2, None)) >= total:
            chain.popleft()  # the walk back stops before it
        self.last = (lsn, total, sweep_next)

    def rows_an_open_reads(self, total: int) -> int:
        """The rows an open would read from the chain (`coordinator._checkpoints._walk_back`):
        the newest checkpoint's, then those of each one before it until the sweeps of those
        after it have passed over every account."""
        rows = swept = 0
        for held, sweep in reversed(self._chain):
            rows += held
            if swept >= total:
                break
            swept += sweep
        return rows

    def _every_row(self) -> list[AccountRow]:
        """Every account's row, in creation order (as `_fixed_row` then its state), made a
        column at a time (the loops run in C), none kept in `fixed`."""
        ids = self.ids
        accounts = list(map(self._accounts.__getitem__, ids))
        metadata = list(map(_METADATA, accounts))
        for at in compress(range(len(metadata)), map(is_not, metadata, repeat(None))):  # sent as a dict
            metadata[at] = metadata[at].as_dict()  # type: ignore[union-attr]
        seqs, posted, last_lsns = zip(*map(self._states.__getitem__, ids), strict=True) if ids else ((), (), ())
        return list(zip(ids, map(_CURRENCY, accounts), map(_OVERDRAFT_LIMIT, accounts), map(_CODE, accounts),
                        metadata, map(self._account_lsns.__getitem__, ids), seqs, posted, last_lsns, strict=True))

    def _fixed_row(self, account_id: str) -> AccountRow:
        """Make and keep the unchanging start of an account's row (`fixed`)."""
        account = self._accounts[account_id]
        metadata = None if account.metadata is None else account.metadata.as_dict()
        row = self.fixed[account_id] = (account_id, account.currency, account.overdraft_limit, account.code,
                                        metadata, self._account_lsns[account_id])
        return row

    def _included(self, total: int, changed_since: Iterable[str]) -> tuple[Iterable[str], int, int]:
        """The accounts the next checkpoint holds rows of, the previous checkpoint's LSN (0:
        it holds every account), and where the next sweep starts."""
        last = self.last
        if last is None:
            return self.ids, 0, 0
        previous, known, sweep_next = last
        changed = dict.fromkeys(changed_since)  # the accounts with entries since the last
        changed.update(dict.fromkeys(islice(self.ids, known, None)))  # and those opened since
        length = max(len(changed), CHECKPOINT_SWEEP_MIN)
        if len(changed) + length >= total:
            return self.ids, 0, 0
        ids = self.ids
        end = sweep_next + length
        changed.update(dict.fromkeys(ids[sweep_next:end]))
        if end > total:
            end -= total
            changed.update(dict.fromkeys(ids[:end]))
        return changed, previous, end % total


def pending_rows(pending: dict[str, Pending], opened: list[str], closed: list[Pending], base: int,
                 sweep: tuple[int, int], share: float) -> tuple[list[Pending], int, tuple[int, int]]:
    """The open pending transfers the next checkpoint holds (see `coordinator._records`,
    CHECKPOINT5), the checkpoint it builds on for the rest (0: it holds every one) and where
    the sweep after it starts. `opened`: those opened since the checkpoint at `base` (0: none
    to build on); `closed`: those closed since; `sweep`: where this sweep starts, (a position
    in `pending`, whose order is the order they opened in; the LSN of the one that was there):
    each closed since with a lower LSN moved it one place back; `share`: the part of the
    accounts this checkpoint holds rows of (0 if it holds every one).

    The sweep takes at least `CHECKPOINT_PENDING_SWEEP_MIN` of them, as large a part of them
    as `share` is of the accounts (so the walk back for them ends about where the accounts'
    does) and 1/`CHECKPOINT_PENDING_CHAIN` of them (so it ends within about that many
    checkpoints, however many change: each is found in the newest checkpoint holding it,
    those opened since it in that one)."""
    total = len(pending)
    still = [pending[pending_id] for pending_id in opened if pending_id in pending]
    length = max(CHECKPOINT_PENDING_SWEEP_MIN, math.ceil(total * share), -(-total // CHECKPOINT_PENDING_CHAIN))
    if not base or len(still) + length >= total:
        return list(pending.values()), 0, (0, 0)
    # Each closed since with a lower LSN moved its place back one (in C). A leg of one chain,
    # sharing the LSN, closed before it is not counted: the sweep then skips one, a guide still.
    start = sweep[0] - sum(map(lt, map(_LSN, closed), repeat(sweep[1])))
    if not 0 <= start < total:
        start = 0
    values = pending.values()
    swept = list(islice(values, start, start + length))  # (skipping to `start` in C)
    end = start + len(swept)
    if len(swept) < length:  # round to the first
        swept += islice(values, length - len(swept))
        end = length - (total - start)
    held = dict(zip(map(_ID, swept), swept, strict=True))
    held.update(zip(map(_ID, still), still, strict=True))
    end %= total
    following = next(islice(values, end, None))
    return list(held.values()), base, (end, following.lsn)


_ID = attrgetter("id")
_LSN = attrgetter("lsn")
_CURRENCY = attrgetter("currency")
_OVERDRAFT_LIMIT = attrgetter("overdraft_limit")
_CODE = attrgetter("code")
_METADATA = attrgetter("metadata")
