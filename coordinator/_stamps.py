"""Stamping decisions: the sequencer's half that turns what the rules decided into records.

Under the sequencer's lock (`coordinator._sequencer`), a ticket is decided by the rules
(`coordinator._rules`) from the projection, and its outcome stamped at its LSN and timestamp:
the record's payload, its transfer index keys and the entries and hold rows it puts (which
wait for a checkpoint to reach the index, `coordinator._entries`), added to a `Chunk` the
sequencer then journals as one block; and the `Transfer` (or `Refused`) the caller is
answered with. `Stamping` is the sequencer's base class (under `Appending`,
`coordinator._appends`, and `AccountOpening`, `coordinator._account_opening`): these methods
read and move the sequencer's projection, and nothing else calls them but the sequencer's own
paths and the callers that decide in the accounts' turns (`coordinator._turns`), under the
same lock.
"""

from __future__ import annotations

import heapq
import struct
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from journal import Completion

from coordinator._entering import close_pending, deadline_of, enter, holds_after, open_pending
from coordinator._history import Refused
from coordinator._records import (
    HOLDS_MARK,
    PLAIN3,
    REFUSAL3,
    TRANSFER3,
    encode,
    encode_entry_value,
    encode_holds,
    entry_prefix,
    id_key,
    lsn_value,
    request_fields,
    resolution_key,
)
from coordinator._rules import (
    NOTHING,
    Leg,
    Refusal,
    Stamp,
    decide,
    decide_pending,
    decide_single,
    decide_singles,
    decide_transfer,
    resolve,
    resolve_open,
)
from coordinator._state import AccountState, Pending
from coordinator._values import (
    KINDS,
    PENDING,
    SINGLE,
    VOID,
    Account,
    Request,
    Resolution,
    Transfer,
    TransferRequest,
    TransferStatus,
    plain_transfer,
    stamped_transfer,
)

if TYPE_CHECKING:
    from coordinator._tickets import Ticket

Pin = Callable[[list[str]], None]
_U64 = struct.Struct(">Q")
_STATUS: tuple[TransferStatus, ...] = ("posted", "pending", "posted", "voided")
"""A transfer's status as decided, by kind."""
_NO_STAMP = (0, 0, 0, 0)
NOTHING_UNENTERED: tuple[Sequence[Request], list[Leg], int, int] = ((), [], 0, 0)
"""`Stamping._unentered` when every stamp was entered (or never will be: its record was not queued)."""
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


class Stamping:
    """The stamping methods of `coordinator._sequencer.Sequencer`, which holds (and sets up) the
    projection and counters they read and move; each is called with the sequencer's lock held."""

    accounts: dict[str, Account]
    states: dict[str, AccountState]
    held: dict[str, int]
    incoming: dict[str, int]
    pending: dict[str, Pending]
    opened_since: list[str]
    closed_since: list[Pending]
    clock: Callable[[], int]
    last_timestamp: int
    index_entries: int
    _prefixes: dict[str, bytes]
    _resolved: dict[str, TransferStatus]
    _resolved_at: deque[tuple[int, str]]
    _deadlines: list[tuple[int, str]]
    _deadlines_stale: int
    _unentered: tuple[Sequence[Request], list[Leg], int, int]

    def resolution(self, pending_id: str) -> TransferStatus | None:
        """What resolved a pending transfer no longer open (the sequencer's: it asks the journal)."""
        raise NotImplementedError

    def _marked(self, index: dict[str, Any], lsn: int) -> dict[str, Any]:
        """The sequencer's (`Sequencer._marked`), which its other bases call (`coordinator._appends`,
        `coordinator._account_opening`)."""
        raise NotImplementedError

    def _appended(self, records: int = 1) -> None:
        """The sequencer's (`Sequencer._appended`), likewise."""
        raise NotImplementedError

    def timestamp(self, count: int = 1, now: int | None = None) -> int:
        """The timestamp of the next decision, of `count` requests (the i-th gets it + i), from
        the clock's reading `now` (read here if None); call under `lock`."""
        if now is None:
            now = self.clock()
        last = self.last_timestamp
        stamp = now if now > last else last + 1
        self.last_timestamp = stamp + count - 1
        return stamp

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

    def stamp_pending(self, chunk: Chunk, ticket: Ticket, request: TransferRequest, lsn: int, source: Account,
                      destination: Account, origin: AccountState, target: AccountState, unspendable: int,
                      now: int) -> str | None:
        """`stamp` of a pending transfer that is not in a chain, between these accounts (two)
        in these states, by the same rule (`rules.decide_pending`; `unspendable`: what the
        source has reserved for transfers in flight): the same record, and the projection's
        holds and open pending transfers moved past it (`enter`'s); the code of its refusal,
        or None. The caller moves the accounts' own holds. `now`: as for `stamp_plain`."""
        timestamp = self.last_timestamp = now if now > self.last_timestamp else self.last_timestamp + 1
        source_id, destination_id, amount = request.source, request.destination, request.amount
        on_hold, on_its_way = self.held.get(source_id, 0), self.incoming.get(destination_id, 0)
        refused = decide_pending(source, destination, amount, origin, target, unspendable + on_hold, on_hold, on_its_way)
        if refused is not None:
            self.stamp_refusal(chunk, ticket, lsn, timestamp, 0, refused)
            return refused
        self._stamp_one(chunk, ticket, request, lsn, timestamp, (PENDING, source_id, destination_id, amount, None, None))
        open_pending(self, request, lsn, timestamp)
        return None

    def stamp_resolution(self, chunk: Chunk, ticket: Ticket, request: Resolution, lsn: int, found: Pending,
                         now: int) -> Leg | str:
        """`stamp` of a post or a void, not in a chain, of `found`, an open pending transfer
        between two accounts, by the same rule (`rules.resolve_open`): the same record, and
        the projection's holds and open pending transfers moved past it; its leg, or the code
        of its refusal. The caller moves `states` past a post's entries, as the accounts apply
        them (`stamp_plain`'s way), and the accounts' own holds. `now`: as for `stamp_plain`."""
        timestamp = self.last_timestamp = now if now > self.last_timestamp else self.last_timestamp + 1
        leg: Any = resolve_open(request, found, self.states, timestamp)  # type: ignore[arg-type]  # Leg | str
        if type(leg) is str:
            self.stamp_refusal(chunk, ticket, lsn, timestamp, 0, leg)
            return leg  # type: ignore[no-any-return]
        self._stamp_one(chunk, ticket, request, lsn, timestamp, leg)
        close_pending(self, found.id)
        return leg  # type: ignore[no-any-return]

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
            if pending.deadline:  # type: ignore[union-attr]  # its deadline in the heap is stale now
                self._deadlines_stale += 1
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
            heapq.heappush(self._deadlines, (deadline_of(timestamp, timeout_s), tid))

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
                if pending.deadline:  # its deadline in the heap is stale now
                    self._deadlines_stale += 1
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
                heapq.heappush(self._deadlines, (deadline_of(timestamp + i, timeout_s), tid))
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
