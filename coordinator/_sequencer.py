"""The sequencer: the one place where decisions get their journal order and their time.

A decision (open an account; commit or refuse a transfer, a post or a void of a pending
transfer, a linked chain; expire pending transfers) is made by the rules (`rules.decide`)
from the projection, stamped with its LSN and timestamp, and appended to the journal under
one short lock, and what it does to each account is handed to the account inside that same
lock. So every account receives its entries in LSN order, which is the order replay applies
them in, and an entry's seq and balance are decided exactly once, here.

The lock covers deciding, stamping and queueing only (microseconds), never a wait: the
protocol before it (reserving funds in the sources' mailboxes) runs in parallel.

Timestamps: nanoseconds since the epoch from `clock`, made strictly increasing in LSN order
(a clock that steps back, or repeats, gets the last timestamp + 1), also across a reopen:
the projection carries the last one journaled. The wall clock is read once for a chunk of
plain transfers and chains of single transfers decided together in turn (each after the first
gets the last timestamp + 1); a clock
of the caller's own (a test's, a replay's) is read once per decision, so it gives each
decision the time it says (`tally replay` sets every copied transfer's original timestamp so),
and a bad reading of it fails that decision alone (`InvalidRequest`, `checked_clock`), before
anything moved for it.

The sequencer keeps the journal-order projection (`Projection`: every account's state, the
open pending transfers and what they hold). It only grows by appending; the account actors
apply the same entries with the same pure `post` and must agree with it, so the projection
is both the stamp source and a cross-check. And it keeps the entries stamped since the
newest checkpoint (`unindexed`), which the next checkpoint has written to the entry index
behind it (see `coordinator._entries`).
"""

from __future__ import annotations

import gc
import heapq
import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import compress, islice, repeat
from operator import attrgetter, is_not, itemgetter
from typing import TYPE_CHECKING, Any

from journal import CRASH_POINT_ARMED, Behind, Completion, Journal, JournalError, crash_point

from coordinator._entries import Unindexed, Joined, UnindexedEntries, first_key, hold_row_lsn, newest_checkpoint_lsn
from coordinator._history import Refused, resolution_of
from coordinator._limits import (
    CHECKPOINT_ACCOUNTS_MAX,
    CHECKPOINT_RECORDS_INTERVAL,
    CHECKPOINT_SWEEP_MIN,
    CLOSE_CHECKPOINT_ROWS,
    EXPIRY_RECORD_IDS_MAX,
    UNINDEXED_ENTRIES_MAX,
)
from coordinator._records import (
    ACCOUNT4,
    ACCOUNTS_INDEX,
    CHECKPOINT4,
    CHECKPOINTS_INDEX,
    ENTRIES_INDEX,
    EXPIRY3,
    HOLDS_FROM_KEY,
    HOLDS_MARK,
    INDEXED_TO_KEY,
    PLAIN3,
    REFUSAL3,
    TRANSFER3,
    TRANSFERS_INDEX,
    encode,
    encode_entry_value,
    encode_holds,
    entry_prefix,
    holds_key,
    id_key,
    lsn_value,
    resolution_key,
)
from coordinator._rules import (
    NOTHING,
    Leg,
    Refusal,
    Stamp,
    decide,
    decide_single,
    decide_singles,
    decide_transfer,
    enter,
    expire,
    holds_after,
    holds_expired,
    resolve,
)
from coordinator._state import NO_ENTRIES, AccountState, Pending, Posting, Projection
from coordinator._values import (
    KINDS,
    PENDING,
    POST,
    SINGLE,
    VOID,
    Account,
    Request,
    Transfer,
    TransferRequest,
    TransferStatus,
    plain_transfer,
    stamped_transfer,
)

if TYPE_CHECKING:
    from coordinator._claims import Ticket

Deliver = Callable[[list[Posting]], None]
Pin = Callable[[list[str]], None]
_U64 = struct.Struct(">Q")
_STATUS: tuple[TransferStatus, ...] = ("posted", "pending", "posted", "voided")
"""A transfer's status as decided, by kind."""
_NO_STAMP = (0, 0, 0, 0)
_KIND = itemgetter(0)
"""A leg's kind."""


class Chunk:
    """Decisions stamped under the sequencer lock at consecutive LSNs, journaled together
    as one block (`Sequencer.append_chunk`): a payload and a completion per record, and
    the transfer index entries of all of them (their entries wait for a checkpoint)."""

    __slots__ = ("payloads", "completions", "transfers", "accounts", "entries", "holders", "holds")

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.completions: list[Completion | None] = []
        self.transfers: list[bytes] = []
        """Transfer index: id -> LSN of its outcome (flat: key, value, key, value...)."""
        self.accounts: list[str] = []
        self.entries: list[bytes] = []
        """The entries stamped, each its account's in `accounts`, then its key and value
        here: unindexed entries as the chunk is queued (`Sequencer._append`)."""
        self.holders: list[str] = []
        self.holds: list[bytes] = []
        """Hold rows (`coordinator._records.holds_key`), each its account's in `holders`,
        flat: unindexed, as the entries."""

    def __len__(self) -> int:
        return len(self.payloads)


logger = logging.getLogger("tally.coordinator")


class Sequencer:
    """Owns journal order. Every method is called with no lock held and returns at once,
    unless it says to hold `lock`. It is the `rules.Book` decisions read."""

    def __init__(
        self,
        journal: Journal,
        books: Projection,
        checkpoint_interval: int = CHECKPOINT_RECORDS_INTERVAL,
        unindexed: Unindexed | None = None,
        unindexed_holds: Unindexed | None = None,
        since_checkpoint: int = 0,
        clock: Callable[[], int] = time.time_ns,
    ) -> None:
        """`books`: the projection recovery rebuilt (taken over, not copied); `unindexed` holds
        the entries of the commits after the newest checkpoint, which `since_checkpoint`
        records follow (both from recovery; none for a new journal). `clock`: nanoseconds
        since the epoch."""
        self.lock = threading.Lock()
        self.delivered_lsn = journal.last_lsn
        """Every record up to it has had its postings handed to its accounts: set under `lock`,
        once a record is queued and its postings are (`_appended`); a read that finds it behind
        the durable LSN waits for the hold of `lock` in progress to end (`Ledger.balance`)."""
        self.checkpoint_interval = checkpoint_interval
        self._since_checkpoint = since_checkpoint
        self.unindexed = UnindexedEntries(unindexed)
        self.unindexed_holds = UnindexedEntries(unindexed_holds, hold_row_lsn)
        """The hold rows of the records since the newest checkpoint (which `unindexed_holds`
        holds for a sequencer taking over from recovery), written by the next one."""
        self._prefixes: dict[str, bytes] = {}
        """Entry-index key prefix per account, computed once."""
        self._journal = journal
        self.clock = clock
        self.accounts = books.accounts
        """Every account, in creation order. Read freely; written only under `lock`."""
        self.account_lsns = books.account_lsns
        self.states = books.states
        """Journal-order projection of every account; written only under `lock`."""
        self.held = books.held
        self.incoming = books.incoming
        self.pending = books.pending
        """The open pending transfers: read freely (to route a post), written under `lock`."""
        self.last_timestamp = books.last_timestamp
        self.index_entries = books.index_entries
        self._deadlines: list[tuple[int, str]] = [(p.deadline, p.id) for p in books.pending.values() if p.deadline]
        heapq.heapify(self._deadlines)
        self._journaled_timestamp = books.last_timestamp
        """The last stamp of a record queued (set as each is: `_append`, `_opened`, `expire`),
        which a checkpoint holds: `last_timestamp` may be past it (a read's `answered_at`, a
        stamp whose record was not queued)."""
        self._resolved: dict[str, TransferStatus] = {}
        """Pending transfers resolved by records not yet durable (the index answers for the rest)."""
        self._resolved_at: deque[tuple[int, str]] = deque()
        self._unentered: tuple[Sequence[Request], list[Leg], int, int] = ((), [], 0, 0)
        """What `stamp` decided without entering it (`enter_stamped`)."""
        self._fixed_rows: dict[str, tuple[Any, ...]] = {}
        """The unchanging start of an account's checkpoint row (id, currency, overdraft limit,
        code, metadata, opening LSN), made the first time a checkpoint holds its row
        (`_fixed_row`): never all at once, which for a million accounts reopened would hold
        the lock through the first checkpoint for most of a second."""
        self._ids: list[str] = []
        """Every account's id, in creation order (where the sweep walks); `checkpoint` adds the new ones."""
        self._checkpoint: tuple[int, int, int] | None = books.checkpoint_chain
        """The newest checkpoint's (LSN, accounts, sweep_next), if the next one may build on it."""
        self._chain: deque[tuple[int, int]] = deque(reversed(books.chain_read))
        """(rows, sweep length) of each checkpoint an open may read back to, the newest last
        (`_rows_an_open_reads`); first, those the open read."""
        with journal.snapshot() as txn:
            self._holds_from_due = journal.index_get(ENTRIES_INDEX, HOLDS_FROM_KEY, txn) is None
            """No `HOLDS_FROM_KEY` yet: the next block appended (never a checkpoint: one follows
            another record) carries it, with its own LSN, and the baseline hold rows."""
            marked = journal.index_get(ENTRIES_INDEX, INDEXED_TO_KEY, txn) is not None
            self._indexed_to: int | None = None if marked else newest_checkpoint_lsn(journal, txn)
            """No `INDEXED_TO_KEY` yet, so readers take the newest checkpoint for it: its LSN. The
            first checkpoint with rows to write behind it writes the key with its record, naming
            this one, before any of them."""
        self._baseline: list[bytes] = []
        """The baseline hold rows (`coordinator._records.holds_key` at LSN 0) of a ledger from
        before hold rows: every account's pending amounts as the records before the mark leave
        them, which are the projection's now, before anything is appended."""
        if self._holds_from_due:
            for account in {**self.held, **self.incoming}:
                held, incoming = self.held.get(account, 0), self.incoming.get(account, 0)
                if held or incoming:
                    self._baseline += (holds_key(account, 0), encode_holds(held, incoming))

    # --- the rules' view of the books ------------------------------------------------

    @property
    def last_lsn(self) -> int:
        """The journal's last LSN, appended if not yet durable (read without `lock`: it only grows)."""
        return self._journal.last_lsn

    @property
    def clock_per_decision(self) -> bool:
        """Whether `clock` is read for each decision, not once a chunk: a clock other than
        the wall clock (see the module docstring)."""
        return self.clock is not time.time_ns

    def resolution(self, pending_id: str) -> TransferStatus | None:
        """What resolved a pending transfer no longer open; call under `lock`."""
        status = self._resolved.get(pending_id)
        if status is not None:
            return status
        with self._journal.snapshot() as txn:
            return resolution_of(self._journal, pending_id, txn)

    def answered_at(self, timestamp: int) -> None:
        """A read is answering for `timestamp` (call under `lock`, before it settles the end it
        reads to): every decision from now on is stamped after it, whatever the clock reads
        (it may step back), so the answer never changes."""
        if timestamp > self.last_timestamp:
            self.last_timestamp = timestamp

    def timestamp(self, count: int = 1, now: int | None = None) -> int:
        """The timestamp of the next decision, of `count` requests (the i-th gets it + i), from
        the clock's reading `now` (read here if None); call under `lock`."""
        if now is None:
            now = self.clock()
        last = self.last_timestamp
        stamp = now if now > last else last + 1
        self.last_timestamp = stamp + count - 1
        return stamp

    # --- accounts ----------------------------------------------------------------------

    def open_account(self, account: Account, completion: Completion) -> int:
        """Journal a new account. The caller checked, under `lock`, that the id is free."""
        assert self.lock.locked()
        assert account.id not in self.accounts, account.id
        metadata = None if account.metadata is None else account.metadata.as_dict()
        payload = encode([ACCOUNT4, self.timestamp(), account.id, account.currency, account.overdraft_limit,
                          account.code, metadata])
        lsn = self._journal.last_lsn + 1
        index = [(ACCOUNTS_INDEX, id_key(account.id), lsn_value(lsn))]
        if self._holds_from_due:
            marks = iter(self._marked({}, lsn)[ENTRIES_INDEX])
            index += ((ENTRIES_INDEX, key, value) for key, value in zip(marks, marks, strict=True))
        try:
            appended = self._journal.append(payload, index, completion)
        finally:
            self._opened((account,), lsn)
        assert appended == lsn, (appended, lsn)
        self._appended()
        return lsn

    def open_accounts(self, accounts: Sequence[Account]) -> int:
        """Journal new accounts as one block (`open_account` of each, in order); the LSN of
        the last. The caller checked, under `lock`, that every id is free and none repeats."""
        assert self.lock.locked()
        payloads: list[bytes] = []
        keys: list[bytes] = []
        first = lsn = self._journal.last_lsn + 1
        readings = [self.clock() for _ in accounts]  # every reading first: a bad one raises before anything moved
        for account, now in zip(accounts, readings, strict=True):
            timestamp = self.timestamp(1, now)
            metadata = None if account.metadata is None else account.metadata.as_dict()
            payloads.append(encode([ACCOUNT4, timestamp, account.id, account.currency, account.overdraft_limit,
                                    account.code, metadata]))
            keys += (id_key(account.id), lsn_value(lsn))
            lsn += 1
        try:
            appended = self._journal.append_block(payloads, self._marked({ACCOUNTS_INDEX: keys}, first),
                                                  [None] * len(payloads))
        finally:
            self._opened(accounts, first)
        assert appended == first, (appended, first)
        self._appended(len(payloads))
        return first + len(payloads) - 1

    def _opened(self, accounts: Sequence[Account], first: int) -> None:
        """The projection takes the accounts journaled from `first` on, if their records were
        queued: also when an interrupt came out of the append after it queued them (else a
        retry would find the ids free and journal them twice)."""
        if self._journal.last_lsn < first:
            return
        self._journaled_timestamp = self.last_timestamp
        self._holds_from_due = False
        self.index_entries += len(accounts)
        account_lsns, states, known = self.account_lsns, self.states, self.accounts
        for lsn, account in enumerate(accounts, first):
            account_lsns[account.id] = lsn
            states[account.id] = NO_ENTRIES
            known[account.id] = account  # last: threads that find it there (without the lock) find the rest

    # --- decisions -----------------------------------------------------------------------

    def stamp(self, chunk: Chunk, ticket: Ticket, lsn: int, reserved: Mapping[str, int] = NOTHING,
              pin: Pin | None = None, enter_now: bool = True, now: int | None = None) -> list[Leg] | Refusal:
        """Decide `ticket`'s requests at `lsn` (`rules.decide`, from the projection and
        `reserved`), add the record, committed or refused, to `chunk`, and move the projection
        past it (with `enter_now`; else the caller calls `enter_stamped` once the chunk is
        queued). Call under `lock`; the caller appends the chunk and delivers the legs.
        `ticket.value` becomes the Transfer (a chain: the tuple of them) or the `Refused`.
        `pin`: called with the accounts the legs touch before the projection moves (see
        `commit`). `now`: the clock's reading for it, if the caller read it (else read here)."""
        requests = ticket.requests
        if ticket.linked:
            timestamp = self.timestamp(len(requests), now)
            decided = decide(requests, self, timestamp, reserved)
            if isinstance(decided, Refusal):
                self.stamp_refusal(chunk, ticket, lsn, timestamp, decided.index, decided.code)
                return decided
            if pin is not None:
                pin([name for leg in decided for name in (leg[1], leg[2])])
            self._stamp_legs(chunk, ticket, lsn, timestamp, decided)
        else:  # one request: `timestamp` and `decide`, inline (once per transfer)
            if now is None:
                now = self.clock()
            timestamp = self.last_timestamp = now if now > self.last_timestamp else self.last_timestamp + 1
            request = ticket.request
            leg: Any = (decide_transfer(request, self.accounts, self.states, self.held, self.incoming, reserved)
                        if type(request) is TransferRequest else resolve(request, self, self.states, timestamp))  # type: ignore[arg-type]
            if type(leg) is str:
                self.stamp_refusal(chunk, ticket, lsn, timestamp, 0, leg)
                return Refusal(0, leg)
            if pin is not None:
                pin([leg[1], leg[2]])
            decided = [leg]
            self._stamp_one(chunk, ticket, request, lsn, timestamp, leg)
        if enter_now:
            enter(self, requests, decided, lsn, timestamp)
        else:
            self._unentered = (requests, decided, lsn, timestamp)
        return decided

    def stamp_chain(self, chunk: Chunk, ticket: Ticket, lsn: int, reserved: Mapping[str, int],
                    now: int) -> list[Leg] | Refusal:
        """`stamp` of a chain of single transfers (`rules.decide_singles`), whose accounts'
        turns the caller holds: the same record and `Transfer`s, without moving the
        projection: the caller moves `states` past the legs' entries, as the accounts
        apply them (`stamp_plain`'s way). `now`: the clock, read by the caller."""
        requests = ticket.requests
        timestamp = self.timestamp(len(requests), now)
        decided = decide_singles(requests, self, reserved)
        assert decided is not None, "a chain of single transfers only"
        if type(decided) is Refusal:
            self.stamp_refusal(chunk, ticket, lsn, timestamp, decided.index, decided.code)
            return decided
        self._stamp_legs(chunk, ticket, lsn, timestamp, decided)  # type: ignore[arg-type]
        return decided  # type: ignore[return-value]

    def stamp_plain(self, chunk: Chunk, ticket: Ticket, request: TransferRequest, lsn: int, source: Account,
                    destination: Account, origin: AccountState, target: AccountState, unspendable: int,
                    now: int) -> Stamp | str:
        """`stamp` of the common case, a single transfer with no code, reference or metadata,
        between these accounts in these states (the projection's), by the same rule
        (`rules.decide_single`; `unspendable`: what the source has reserved for transfers in
        flight), recorded as a plain leg: its entries, or the code of its refusal. The caller
        moves the projection (`states`) past the entries. `now`: the clock, read by the
        caller (for a chunk of decisions, once, or once each with `clock_per_decision`)."""
        timestamp = self.last_timestamp = now if now > self.last_timestamp else self.last_timestamp + 1
        tid, source_id, destination_id, amount = request.id, request.source, request.destination, request.amount
        held, incoming = self.held, self.incoming
        stamp: Any = decide_single(source, destination, amount, origin, target,  # Stamp | str; `type() is`: no call
                                   unspendable + held.get(source_id, 0) if held else unspendable,
                                   incoming.get(destination_id, 0) if incoming else 0)
        if type(stamp) is str:
            self.stamp_refusal(chunk, ticket, lsn, timestamp, 0, stamp)
            return stamp
        debit_seq, debit_balance, credit_seq, credit_balance = stamp
        ticket.value = plain_transfer(tid, source_id, destination_id, amount, lsn, timestamp)
        chunk.payloads.append(encode([PLAIN3, timestamp, tid, source_id, destination_id, amount, debit_seq, debit_balance,
                                      credit_seq, credit_balance]))
        chunk.completions.append(ticket)
        chunk.transfers += (id_key(tid), _U64.pack(lsn))
        prefixes = self._prefixes
        source_prefix = prefixes.get(source_id) or prefixes.setdefault(source_id, entry_prefix(source_id))
        target_prefix = prefixes.get(destination_id) or prefixes.setdefault(destination_id, entry_prefix(destination_id))
        chunk.accounts += (source_id, destination_id)
        chunk.entries += (
            source_prefix + _U64.pack(debit_seq), encode_entry_value(tid, -amount, debit_balance, lsn, timestamp),
            target_prefix + _U64.pack(credit_seq), encode_entry_value(tid, amount, credit_balance, lsn, timestamp),
        )
        self.index_entries += 1
        return stamp

    def broken(self, error: BaseException) -> None:
        """A bug met after the projection (or an account) moved past a decision and before
        all of it reached the journal and the accounts: fail the journal, so nothing is
        written on top of memory the journal does not hold; reopening rebuilds it."""
        logger.error("the ledger's memory and its journal disagree after %r: refusing writes until reopened", error)
        self._journal.refuse_writes(f"refusing writes until the ledger is reopened: {error!r} was raised while a "
                                    "decision was being applied")

    def enter_stamped(self) -> None:
        """Move the projection past the legs `stamp` decided without `enter_now`."""
        requests, legs, lsn, timestamp = self._unentered
        enter(self, requests, legs, lsn, timestamp)

    def _not_appended(self, error: BaseException, lsn: int, counts: tuple[int, int]) -> None:
        """After `error` came out of appending the record stamped at `lsn`: forget what its
        stamp counted (`_undo_counts`), unless it was queued all the same, or `error` is an
        interrupt, which may have landed partway through what `_append` puts in memory: then
        memory cannot be trusted to follow the journal, and writes stop (`broken`)."""
        if self._journal.last_lsn >= lsn or not isinstance(error, Exception):
            self.broken(error)
        else:
            self._undo_counts(*counts)

    def _undo_counts(self, index_entries: int, resolved: int) -> None:
        """Forget what stamps counted for records the journal refused to queue: the index
        entries they would have put, the pending transfers they would have resolved."""
        self.index_entries = index_entries
        while len(self._resolved_at) > resolved:
            self._resolved.pop(self._resolved_at.pop()[1], None)

    def _marked(self, index: dict[str, Any], lsn: int) -> dict[str, Any]:
        """`index` (the puts of a block starting at `lsn`), with `HOLDS_FROM_KEY` and the
        baseline hold rows if still due (written at once, in the block's transaction)."""
        if self._holds_from_due:
            holds = index.get(ENTRIES_INDEX)
            index[ENTRIES_INDEX] = [*(holds or ()), HOLDS_FROM_KEY, lsn_value(lsn), *self._baseline]
        return index

    def _hold_rows(self, rows: dict[str, tuple[int, int]], key_lsn: bytes, holders: list[str],
                   holds: list[bytes]) -> None:
        """Add the hold rows `rows` of the record whose LSN packs to `key_lsn` (each account's
        (held, incoming) after it) to `holders` (their accounts) and `holds` (flat)."""
        prefixes, mark_lsn = self._prefixes, HOLDS_MARK + key_lsn  # a key: the entry prefix, then this
        for account, (held, incoming) in rows.items():
            holders.append(account)
            prefix = prefixes.get(account) or prefixes.setdefault(account, entry_prefix(account))
            holds += (prefix + mark_lsn, encode_holds(held, incoming))

    def _stamp_one(self, chunk: Chunk, ticket: Ticket, request: Request, lsn: int, timestamp: int, leg: Leg) -> None:
        """`_stamp_legs` of the one leg of a request that is not a chain (once per pending
        transfer, post or void, and single transfer the plain path does not take): the same
        record, index keys, hold rows and `Transfer`, without the loops around them."""
        kind, source, destination, amount, stamp, pending = leg
        tid = request.id
        key_lsn = _U64.pack(lsn)
        prefixes = self._prefixes
        source_prefix = prefixes.get(source) or prefixes.setdefault(source, entry_prefix(source))
        target_prefix = prefixes.get(destination) or prefixes.setdefault(destination, entry_prefix(destination))
        if kind != SINGLE and source == destination:  # never live (`check_transfer`), but a journal's, salvaged
            self._hold_rows(holds_after([leg], self.held, self.incoming), key_lsn, chunk.holders, chunk.holds)
        elif kind != SINGLE:  # its hold rows: `holds_after` of one leg between two accounts, inline
            held, incoming, mark = self.held, self.incoming, HOLDS_MARK + key_lsn
            change = amount if kind == PENDING else -pending.amount  # type: ignore[union-attr]
            chunk.holders += (source, destination)
            chunk.holds += (
                source_prefix + mark, encode_holds(held.get(source, 0) + change, incoming.get(source, 0)),
                target_prefix + mark, encode_holds(held.get(destination, 0), incoming.get(destination, 0) + change),
            )
        if type(request) is TransferRequest:
            code, reference, metadata, timeout_s = request.code, request.reference, request.metadata, request.timeout_s
            pending_id = requested = None
            chunk.transfers += (id_key(tid), key_lsn)
            self.index_entries += 1
        else:
            code, reference, metadata, timeout_s = pending.code, request.reference, request.metadata, None  # type: ignore[union-attr]
            pending_id, requested = request.pending_id, request.amount  # type: ignore[union-attr]
            chunk.transfers += (resolution_key(pending_id), key_lsn, id_key(tid), key_lsn)
            self._resolved[pending_id] = "voided" if kind == VOID else "posted"
            self._resolved_at.append((lsn, pending_id))
            self.index_entries += 2
        chunk.payloads.append(encode([TRANSFER3, timestamp, False, [
            kind, tid, source, destination, amount, code, reference, None if metadata is None else metadata.as_dict(),  # type: ignore[attr-defined]
            timeout_s, pending_id, requested, *(stamp or _NO_STAMP)]]))
        chunk.completions.append(ticket)
        ticket.value = stamped_transfer(tid, source, destination, amount, lsn, timestamp, code, reference, metadata,  # type: ignore[arg-type]
                                        KINDS[kind], pending_id, _STATUS[kind], timeout_s)
        if stamp is not None:
            debit_seq, debit_balance, credit_seq, credit_balance = stamp
            chunk.accounts += (source, destination)
            chunk.entries += (
                source_prefix + _U64.pack(debit_seq), encode_entry_value(tid, -amount, debit_balance, lsn, timestamp),
                target_prefix + _U64.pack(credit_seq), encode_entry_value(tid, amount, credit_balance, lsn, timestamp),
            )
        elif kind == PENDING and timeout_s is not None:
            heapq.heappush(self._deadlines, (timestamp + timeout_s * 1_000_000_000, tid))

    def _stamp_legs(self, chunk: Chunk, ticket: Ticket, lsn: int, timestamp: int, legs: list[Leg]) -> None:
        requests = ticket.requests
        fields: list[Any] = [TRANSFER3, timestamp, ticket.linked]
        transfers: list[Transfer] = []
        key_lsn = _U64.pack(lsn)
        index = chunk.transfers
        prefixes = self._prefixes
        resolved = 0
        if any(map(_KIND, legs)):  # a leg not SINGLE (0), found in C
            self._hold_rows(holds_after(legs, self.held, self.incoming), key_lsn, chunk.holders, chunk.holds)
        for i, leg in enumerate(legs):
            request = requests[i]
            kind, source, destination, amount, stamp, pending = leg
            tid = request.id
            if type(request) is TransferRequest:
                code, reference, metadata, timeout_s = request.code, request.reference, request.metadata, request.timeout_s
                pending_id = requested = None
            else:
                assert pending is not None
                code, reference, metadata, timeout_s = pending.code, request.reference, request.metadata, None
                pending_id, requested = request.pending_id, request.amount  # type: ignore[union-attr]
                index += (resolution_key(pending_id), key_lsn)
                self._resolved[pending_id] = "voided" if kind == VOID else "posted"
                self._resolved_at.append((lsn, pending_id))
                resolved += 1
            if kind == SINGLE and not code and reference is None and metadata is None:  # a plain leg: the same, shorter
                fields.append([SINGLE, tid, source, destination, amount, 0, None, None, None, None, None, *stamp])  # type: ignore[misc]
                transfers.append(plain_transfer(tid, source, destination, amount, lsn, timestamp + i))
            else:
                fields.append([kind, tid, source, destination, amount, code, reference,
                               None if metadata is None else metadata.as_dict(),  # type: ignore[attr-defined]
                               timeout_s, pending_id, requested, *(stamp or _NO_STAMP)])
                transfers.append(stamped_transfer(tid, source, destination, amount, lsn, timestamp + i, code, reference,
                                                  metadata, KINDS[kind], pending_id, _STATUS[kind], timeout_s))  # type: ignore[arg-type]
            index += (id_key(tid), key_lsn)
            if stamp is not None:
                debit_seq, debit_balance, credit_seq, credit_balance = stamp
                source_prefix = prefixes.get(source) or prefixes.setdefault(source, entry_prefix(source))
                target_prefix = prefixes.get(destination) or prefixes.setdefault(destination, entry_prefix(destination))
                chunk.accounts += (source, destination)
                chunk.entries += (
                    source_prefix + _U64.pack(debit_seq),
                    encode_entry_value(tid, -amount, debit_balance, lsn, timestamp + i),
                    target_prefix + _U64.pack(credit_seq),
                    encode_entry_value(tid, amount, credit_balance, lsn, timestamp + i),
                )
            elif kind == PENDING and timeout_s is not None:
                heapq.heappush(self._deadlines, (timestamp + i + timeout_s * 1_000_000_000, tid))
        ticket.value = transfers[0] if len(transfers) == 1 and not ticket.linked else tuple(transfers)
        chunk.payloads.append(encode(fields))
        chunk.completions.append(ticket)
        self.index_entries += len(legs) + resolved

    def stamp_refusal(self, chunk: Chunk, ticket: Ticket, lsn: int, timestamp: int, index: int, code: str) -> None:
        """Add the refusal of `ticket`'s request `index` (for a chain: of the chain) at `lsn`
        to `chunk` (under `lock`); `ticket.value` becomes the `Refused`."""
        requests = ticket.requests
        ticket.value = Refused(lsn, requests, index, code, ticket.linked, timestamp)
        fields: list[Any] = [REFUSAL3, timestamp, ticket.linked, index, code]
        key_lsn = lsn_value(lsn)
        for request in requests:
            fields.append(request_fields(request))
            chunk.transfers += (id_key(request.id), key_lsn)
        chunk.payloads.append(encode(fields))
        chunk.completions.append(ticket)
        self.index_entries += len(requests)

    def commit(self, ticket: Ticket, deliver: Deliver, reserved: bool, pin: Pin | None = None,
               refused: tuple[Deliver, list[Posting]] | None = None) -> list[Leg] | Refusal:
        """The mailbox path's decision, once every source has reserved its debits (`reserved`;
        or a ticket with none to reserve): decide the ticket from the projection, journal it
        (committed or refused), and deliver what it does to each account (the postings, which
        end the sources' reservations). The writer releases the ticket once its record is
        durable.

        `pin`, for a caller that did not pin every account the decision may touch beforehand
        (a post or a void: its pending transfer may have opened since it looked), pins the
        accounts the legs touch, under `lock` and before the projection moves: an account
        activated later starts from a projection past this decision, one activated earlier
        gets its postings, never both.

        `refused`: `(release, releases)`, the sources' reservations to hand back if it is refused,
        in the same hold of the lock as the refusal is queued (as `reject` does)."""
        chunk = Chunk()
        with self.lock:
            lsn = self._journal.last_lsn + 1
            counts = self.index_entries, len(self._resolved_at)
            try:  # from the stamp on: an interrupt between it and the append moved the counts
                decided = self.stamp(chunk, ticket, lsn, NOTHING, pin, enter_now=False)
                appended = self._append(chunk, lsn)
            except BaseException as error:
                self._not_appended(error, lsn, counts)
                raise
            assert appended == lsn, (appended, lsn)
            if type(decided) is not Refusal:
                try:
                    self.enter_stamped()
                    crash_point("after-commit-queued")
                    made = postings(decided, lsn, reserved)  # type: ignore[arg-type]
                    if CRASH_POINT_ARMED and len(decided) > 1:
                        deliver(made[:2])  # the first leg's
                        crash_point("mid-linked-chain")
                        made = made[2:]
                    deliver(made)
                except BaseException as error:  # a bug, or an interrupt: memory is behind the queued record
                    self.broken(error)
                    raise
            elif refused is not None and refused[1]:
                refused[0](refused[1])
            self._appended()
        return decided

    def reject(self, ticket: Ticket, index: int, code: str, release: Deliver | None = None,
               releases: list[Posting] | None = None) -> int:
        """Journal a refusal decided before the sequencer (a source refused its debit in its
        mailbox); it consumes every id of the ticket. The writer releases it once durable.
        `release(releases)`: the other sources' reservations handed back, once it is queued
        and in the same hold (a balance that waits for the hold sees them gone)."""
        chunk = Chunk()
        with self.lock:
            lsn = self._journal.last_lsn + 1
            counts = self.index_entries, len(self._resolved_at)
            try:  # from the stamp on, as in `commit`
                self.stamp_refusal(chunk, ticket, lsn, self.timestamp(len(ticket.requests)), index, code)
                appended = self._append(chunk, lsn)
            except BaseException as error:
                self._not_appended(error, lsn, counts)
                raise
            assert appended == lsn, (appended, lsn)
            if release is not None and releases:
                release(releases)  # (only queues: a reservation is not journaled, so the record does not wait on it)
            self._appended()
        return lsn

    def expire(self, deliver: Deliver, pin: Pin) -> tuple[int, int]:
        """Journal the expiry of every open pending transfer whose deadline has come by the
        clock (read once: the first expiry record's timestamp), at most `EXPIRY_RECORD_IDS_MAX`
        a record, and deliver the holds it releases: (how many expired, the LSN of the last
        expiry record, 0 if none). `pin`: as for `commit`."""
        expired = last = 0
        with self.lock:
            deadlines, pending = self._deadlines, self.pending
            cutoff = max(self.clock(), self.last_timestamp + 1)  # one reading: what is due by it expires
            while deadlines:
                now = max(cutoff, self.last_timestamp + 1)  # `timestamp`, spent only if a record is made
                due: list[Pending] = []
                while deadlines and deadlines[0][0] <= cutoff and len(due) < EXPIRY_RECORD_IDS_MAX:
                    deadline, pending_id = heapq.heappop(deadlines)
                    found = pending.get(pending_id)
                    if found is not None and found.deadline == deadline:
                        due.append(found)
                if not due:
                    break
                self.last_timestamp = now
                lsn = self._journal.last_lsn + 1
                ids = [found.id for found in due]
                index: list[bytes] = []
                key_lsn = lsn_value(lsn)
                for pending_id in ids:
                    index += (resolution_key(pending_id), key_lsn)
                holders: list[str] = []
                holds: list[bytes] = []
                self._hold_rows(holds_expired(due, self.held, self.incoming), key_lsn, holders, holds)
                self.unindexed_holds.add(holders, holds)
                try:
                    appended = self._journal.append_block([encode([EXPIRY3, now, ids])],
                                                          self._marked({TRANSFERS_INDEX: index}, lsn), [None])
                    self._journaled_timestamp = now
                    assert appended == lsn, (appended, lsn)
                    self._holds_from_due = False
                    for pending_id in ids:
                        self._resolved[pending_id] = "expired"
                        self._resolved_at.append((lsn, pending_id))
                    self.index_entries += len(ids)
                    crash_point("during-expiry")
                    pin([name for found in due for name in (found.source, found.destination)])
                    expire(self, ids)
                    deliver([posting for found in due for posting in _releasing(found, lsn)])
                except BaseException as error:
                    if self._journal.last_lsn >= lsn:  # queued (a bug, or an interrupt, after): memory is behind it
                        self.broken(error)
                        raise
                    self.unindexed_holds.remove(holders)
                    for found in due:  # not expired after all: due again next time
                        heapq.heappush(deadlines, (found.deadline, found.id))
                    raise
                expired += len(ids)
                last = lsn
                self._appended()
        return expired, last

    def next_deadline(self) -> int | None:
        """The earliest deadline of an open pending transfer (or a stale one: a hint)."""
        deadlines = self._deadlines
        return deadlines[0][0] if deadlines else None

    # --- appending -------------------------------------------------------------------------

    def append_chunk(self, chunk: Chunk, last_lsn: int, wake_writer: bool = True) -> int:
        """Journal the records stamped in `chunk` (under `lock`, at consecutive LSNs from the
        journal's `last_lsn + 1` up to `last_lsn`, the projection already past them); return
        the first LSN. The caller made room with `journal.wait_room` under this same hold of
        `lock`, so this never waits: it raises only if the journal failed, and then nothing
        was queued.
        `wake_writer` False: the caller commits them itself (`Journal.commit_inline`)."""
        first = self._append(chunk, last_lsn, room_made=True, wake_writer=wake_writer)
        self._appended(len(chunk))
        return first

    def _append(self, chunk: Chunk, last_lsn: int, room_made: bool = False, wake_writer: bool = True) -> int:
        """Queue the chunk's records (stamped up to `last_lsn`), their entries unindexed ones
        from before the records are queued (the writer may make them durable at once); a chunk
        the journal refuses leaves no entry behind, and its LSNs go to the next records."""
        assert self.lock.locked()
        self.unindexed.add(chunk.accounts, chunk.entries)
        if chunk.holds:
            self.unindexed_holds.add(chunk.holders, chunk.holds)
        index: dict[str, Any] = {TRANSFERS_INDEX: chunk.transfers}
        if self._holds_from_due:
            self._marked(index, self._journal.last_lsn + 1)
        try:
            appended = self._journal.append_block(chunk.payloads, index, chunk.completions, room_made, wake_writer)
        except BaseException:
            if self._journal.last_lsn < last_lsn:  # not queued (an interrupt may land after it was)
                self.unindexed.remove(chunk.accounts)
                if chunk.holds:
                    self.unindexed_holds.remove(chunk.holders)
            raise
        finally:
            if self._journal.last_lsn >= last_lsn:  # queued (also if an interrupt came out after)
                self._journaled_timestamp = self.last_timestamp
                self._holds_from_due = False  # (the mark went with it)
        return appended

    def _appended(self, records: int = 1) -> None:
        """Count records appended; journal a checkpoint when one is due. The records are
        queued already, so a checkpoint that cannot be queued must not fail them: it is
        logged and tried again after the next record (the writer reports its own failure).
        Every path that queues a record calls it once it has handed over that record's
        postings (`delivered_lsn`)."""
        self.delivered_lsn = self._journal.last_lsn
        self._since_checkpoint += records
        durable, indexed = self._journal.durable_lsn, self._journal.indexed_lsn
        self.unindexed.release(indexed)
        self.unindexed_holds.release(indexed)
        resolved_at = self._resolved_at
        while resolved_at and resolved_at[0][0] <= durable:  # the index answers for these now
            self._resolved.pop(resolved_at.popleft()[1], None)
        unindexed = self.unindexed
        holds = self.unindexed_holds
        if (self._since_checkpoint >= self.checkpoint_interval
                or unindexed.count + holds.count >= UNINDEXED_ENTRIES_MAX
                or len(unindexed.current) + len(holds.current) >= CHECKPOINT_ACCOUNTS_MAX):
            try:
                self.checkpoint()
                self.delivered_lsn = self._journal.last_lsn  # (a checkpoint has no postings)
            except JournalError:
                logger.exception("checkpoint not journaled; trying again after the next record")

    def checkpoint(self, whole: bool = False) -> int:
        """Journal the projection as of now (call with `lock` held), as a CHECKPOINT4: the rows
        of the accounts that changed or opened since the last checkpoint, and of a slice of
        the others (the sweep, see `coordinator._records`), or with `whole` of every account
        (`checkpoint_on_close`); every open pending transfer; the
        last timestamp; and behind it, in slices over the group commits after it, the entry
        index rows of every record since the last (their entries, and their hold rows), then
        `INDEXED_TO_KEY` (see `coordinator._entries`). The first checkpoint a sequencer
        writes without knowing the one before it (`Projection.checkpoint_chain` is None)
        holds every account.

        Opening the ledger starts from the newest checkpoint and replays only the
        records after it; a full replay checks every checkpoint it passes.
        """
        assert self.lock.locked()
        fixed, states, ids, made = self._fixed_rows, self.states, self._ids, self._fixed_row
        if len(ids) < len(self.accounts):  # accounts only grow, in order: add the new ones
            ids += islice(self.accounts, len(ids), None)
        total = len(ids)
        if whole:
            previous, sweep_next = 0, 0
            rows = self._every_row()
        else:
            included, previous, sweep_next = self._included(total)
            rows = [(fixed.get(account_id) or made(account_id)) + states[account_id] for account_id in included]
        pendings = [list(pending) for pending in self.pending.values()]
        lsn = self._journal.last_lsn + 1
        index: dict[str, list[bytes]] = {CHECKPOINTS_INDEX: [lsn_value(lsn), b""]}
        carried = Joined(sorted(self.unindexed.ordered_parts() + self.unindexed_holds.ordered_parts(), key=first_key))
        behind: Behind | None = None
        if len(carried):  # else the index holds every row before it already: the mark may stay
            behind = (ENTRIES_INDEX, carried, {ENTRIES_INDEX: [INDEXED_TO_KEY, lsn_value(lsn)]})
            if self._indexed_to is not None:
                index[ENTRIES_INDEX] = [INDEXED_TO_KEY, lsn_value(self._indexed_to)]
        payload = encode([CHECKPOINT4, self._journaled_timestamp, self.index_entries + 1, previous, total, sweep_next, rows,
                          pendings])
        try:
            appended = self._journal.append_block([payload], index, [None], behind=behind)  # may time out: nothing changed
            self.index_entries += 1
            assert appended == lsn, (appended, lsn)
            if behind is None:  # both empty: nothing to carry, nor to release
                if self._indexed_to is not None:
                    self._indexed_to = lsn
            else:
                self._indexed_to = None
                self.unindexed.carry(lsn)
                self.unindexed_holds.carry(lsn)
            crash_point("during-checkpoint")
            self._since_checkpoint = 0
            self._chained(len(rows), (sweep_next - self._checkpoint[2]) % total if self._checkpoint and previous else None,
                          total)
            self._checkpoint = (lsn, total, sweep_next)
        except BaseException as error:
            if self._journal.last_lsn >= lsn:  # queued (an interrupt after it): memory is behind it
                self.broken(error)
            raise
        return lsn

    def _every_row(self) -> list[tuple[Any, ...]]:
        """Every account's checkpoint row, in creation order (as `_fixed_row` then its state),
        made a column at a time (the loops run in C), none kept in `_fixed_rows`."""
        ids = self._ids
        accounts = list(map(self.accounts.__getitem__, ids))
        metadata = list(map(_METADATA, accounts))
        for at in compress(range(len(metadata)), map(is_not, metadata, repeat(None))):  # sent as a dict
            metadata[at] = metadata[at].as_dict()  # type: ignore[union-attr]
        seqs, posted, last_lsns = zip(*map(self.states.__getitem__, ids), strict=True) if ids else ((), (), ())
        return list(zip(ids, map(_CURRENCY, accounts), map(_OVERDRAFT_LIMIT, accounts), map(_CODE, accounts),
                        metadata, map(self.account_lsns.__getitem__, ids), seqs, posted, last_lsns, strict=True))

    def _chained(self, rows: int, swept: int | None, total: int) -> None:
        """Count a checkpoint just journaled, of `rows` rows and a sweep of `swept` accounts
        (None: it holds every account, and starts the chain again), of `total`."""
        chain = self._chain
        if swept is None:
            chain.clear()
            swept = total
        chain.append((rows, swept))
        while len(chain) > 2 and sum(sweep for _, sweep in islice(chain, 2, None)) >= total:
            chain.popleft()  # the walk back stops before it

    def _rows_an_open_reads(self, total: int) -> int:
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

    def checkpoint_on_close(self, timeout_s: float) -> int | None:
        """Journal a checkpoint of every account if an open would otherwise read more than
        `CLOSE_CHECKPOINT_ROWS` times as many rows (`_rows_an_open_reads`: up to about twice
        as many, see `coordinator._records`); its LSN, or None. What a database's shutdown
        checkpoint is: the close pays (~1 s a million accounts) what the next open then need
        not (about a third of its time, measured). An open that read a long chain (after a
        crash) is followed by one at close even if nothing was written meanwhile."""
        if not self.lock.acquire(timeout=timeout_s):
            return None
        collecting = gc.isenabled()
        gc.disable()  # millions of new tuples, in no cycle: each collection on the way walks all of them
        try:
            if self._rows_an_open_reads(len(self.accounts)) <= CLOSE_CHECKPOINT_ROWS * len(self.accounts):
                return None
            return self.checkpoint(whole=True)
        finally:
            if collecting:
                gc.enable()
            self.lock.release()

    def _fixed_row(self, account_id: str) -> tuple[Any, ...]:
        """Make and keep the unchanging start of an account's checkpoint row (`_fixed_rows`)."""
        account = self.accounts[account_id]
        metadata = None if account.metadata is None else account.metadata.as_dict()
        row = self._fixed_rows[account_id] = (account_id, account.currency, account.overdraft_limit, account.code,
                                              metadata, self.account_lsns[account_id])
        return row

    def _included(self, total: int) -> tuple[Iterable[str], int, int]:
        """The accounts the next checkpoint holds rows of, the previous checkpoint's LSN (0:
        it holds every account), and where the next sweep starts."""
        last = self._checkpoint
        if last is None:
            return self._ids, 0, 0
        previous, known, sweep_next = last
        changed = dict.fromkeys(self.unindexed.current)  # the accounts with entries since the last
        changed.update(dict.fromkeys(islice(self._ids, known, None)))  # and those opened since
        length = max(len(changed), CHECKPOINT_SWEEP_MIN)
        if len(changed) + length >= total:
            return self._ids, 0, 0
        ids = self._ids
        end = sweep_next + length
        changed.update(dict.fromkeys(ids[sweep_next:end]))
        if end > total:
            end -= total
            changed.update(dict.fromkeys(ids[:end]))
        return changed, previous, end % total


_CURRENCY = attrgetter("currency")
_OVERDRAFT_LIMIT = attrgetter("overdraft_limit")
_CODE = attrgetter("code")
_METADATA = attrgetter("metadata")


def request_fields(request: Request) -> list[Any]:
    """The fields a record keeps of a request (the first `REQUEST_FIELDS` of a leg)."""
    metadata = None if request.metadata is None else request.metadata.as_dict()  # type: ignore[attr-defined]
    if type(request) is TransferRequest:
        return [PENDING if request.pending else SINGLE, request.id, request.source, request.destination,
                request.amount, request.code, request.reference, metadata, request.timeout_s, None, None]
    return [VOID if request.void else POST, request.id, None, None, None, 0, request.reference,  # type: ignore[union-attr]
            metadata, None, request.pending_id, request.amount]  # type: ignore[union-attr]


def postings(legs: Sequence[Leg], lsn: int, reserved: bool) -> list[Posting]:
    """What decided legs do to each account, in order: per leg, the source's then the
    destination's. `reserved`: the sources reserved their debits (the mailbox path), which
    these release."""
    made: list[Posting] = []
    for kind, source, destination, amount, stamp, pending in legs:
        released = amount if reserved and (kind == SINGLE or kind == PENDING) else 0
        if kind == SINGLE:
            assert stamp is not None
            made += (Posting(source, stamp[0], -amount, stamp[1], lsn, released, 0, 0),
                     Posting(destination, stamp[2], amount, stamp[3], lsn, 0, 0, 0))
        elif kind == PENDING:
            made += (Posting(source, 0, 0, 0, lsn, released, amount, 0), Posting(destination, 0, 0, 0, lsn, 0, 0, amount))
        else:
            assert pending is not None
            if stamp is None:  # a void
                made += _releasing(pending, lsn)
            else:
                made += (Posting(source, stamp[0], -amount, stamp[1], lsn, 0, -pending.amount, 0),
                         Posting(destination, stamp[2], amount, stamp[3], lsn, 0, 0, -pending.amount))
    return made


def _releasing(pending: Pending, lsn: int) -> tuple[Posting, Posting]:
    """The postings that release a pending transfer's hold, on both of its accounts."""
    return (Posting(pending.source, 0, 0, 0, lsn, 0, -pending.amount, 0),
            Posting(pending.destination, 0, 0, 0, lsn, 0, 0, -pending.amount))

