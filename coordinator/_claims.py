"""Transfer ids: who has claimed which, and what became of it.

A transfer id is claimed once. While its protocol runs, the claim is an
in-flight `Ticket`; once durable, the journal's transfer index answers. Both
are consulted under one lock per stripe of ids, so a retry racing the original
either finds the ticket or finds the durable outcome, never neither. What either
answers a caller (the transfer, its refusal, or a conflict) is `coordinator._tickets`'.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from itertools import islice
from operator import attrgetter
from typing import Any

from journal import Journal, JournalError

from coordinator._errors import JournalCorrupted
from coordinator._history import Committed, Refused, named_record, transfer_record, transfer_records
from coordinator._idfilter import IdFilter
from coordinator._limits import CLAIM_STRIPES, CLAIMS_SWEEP_MIN, DURABLE_WAIT_S, INDEX_KEYS_PER_SNAPSHOT, KEY_BYTES_MAX
from coordinator._records import DIGEST_MARK, RESOLUTION_MARK, TRANSFERS_INDEX, id_key, value_lsn
from coordinator._tickets import Prior, Ticket
from coordinator._values import Request

_STRIPE_MASK = CLAIM_STRIPES - 1
_ID = attrgetter("id")
_RAW_KEY_CHARS = KEY_BYTES_MAX // 4
"""An id of at most this many characters is its own index key (in UTF-8, 4 bytes a character at most)."""


def id_hash(tid: str) -> int:
    """What the filters know an id by: `hash(tid)`, which the str caches once it has been
    hashed (the in-flight table hashes it first), unless its index key is a digest (too
    long in UTF-8), then the key's hash: `key_hash` of its index key is the same number."""
    if len(tid) <= _RAW_KEY_CHARS:
        return hash(tid)
    key = id_key(tid)
    return hash(key) if key[:1] == DIGEST_MARK else hash(tid)


def key_hash(key: bytes) -> int:
    """`id_hash` of the id whose index key is `key` (for the warm-up, which reads keys)."""
    # A key that is not UTF-8 is corrupt (the audit reports it); it must not stop the warm-up.
    return hash(key) if key[:1] == DIGEST_MARK else hash(key.decode(errors="surrogateescape"))

def check_ids_against_records(journal: Journal) -> int:
    """Read every entry of the transfers index and the record it names, and check the record
    is that id's outcome (or what resolved that pending transfer); return how many. For
    ledgers whose index entries carry no checksum (format 1): there, a damaged key would hide
    an id, and a retry of it would run again. Reads a chunk of entries per snapshot."""
    after: bytes | None = None
    checked = 0
    while True:
        with journal.snapshot() as txn:
            keys = list(islice(journal.index_keys(TRANSFERS_INDEX, txn, after), INDEX_KEYS_PER_SNAPSHOT))
            for key in keys:
                value = journal.index_get(TRANSFERS_INDEX, key, txn)
                if value is None or len(value) != 8:
                    raise JournalCorrupted(f"the transfers index entry {key!r} does not hold an LSN",
                                           where="the transfers index")
                named_record(journal, key, value_lsn(value), txn)
        checked += len(keys)
        if len(keys) < INDEX_KEYS_PER_SNAPSHOT:
            return checked
        after = keys[-1]


class Claims:
    """The in-flight tickets, striped by id. Safe from any thread; never waits.

    An id's outcome is looked up in the transfers index, which the journal checked entry by
    entry as it opened (so a miss there means the id is new); the filters, loaded from it
    in the background, spare most new ids that lookup."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._locks = [threading.Lock() for _ in range(CLAIM_STRIPES)]
        with journal.snapshot() as txn:  # the ids journaled already, about (resolutions count too)
            expected = journal.index_count(TRANSFERS_INDEX, txn) * 5 // 4 // CLAIM_STRIPES
        self._filters = [IdFilter(expected) for _ in range(CLAIM_STRIPES)]
        self._inflight: dict[str, Ticket] = {}
        self._sweep_above = CLAIMS_SWEEP_MIN
        """How many tickets in flight make the next claim `_sweep` (see `CLAIMS_SWEEP_MIN`)."""
        self._warm = False
        self._stopping = False
        """Until the filters hold every id already journaled, every claim asks the index."""
        self._warming = threading.Thread(target=self._warm_up, name="tally-claims-warm-up", daemon=True)
        self._warming.start()

    def _warm_up(self) -> None:
        """Load every journaled id into the filters, off the caller's path (opening stays fast).

        Ids claimed meanwhile are added by `claim` itself, so nothing is missed. Keys are read
        a chunk per snapshot, and no snapshot is open while a stripe lock is awaited: a claim
        holding stripe locks may wait for a map grow, which waits for every reader to close.
        """
        journal = self._journal
        try:
            # Every id past the index's last key now is claimed here, and `claim` adds it:
            # the warm-up ends there, not chasing ids that keep coming.
            end = journal.index_last(TRANSFERS_INDEX)
            after: bytes | None = None
            while end is not None and (after is None or after < end):
                if self._stopping:
                    return
                with journal.snapshot() as txn:
                    keys = list(islice(journal.index_keys(TRANSFERS_INDEX, txn, after), INDEX_KEYS_PER_SNAPSHOT))
                by_stripe: list[list[int]] = [[] for _ in range(CLAIM_STRIPES)]
                for key in keys:
                    if key[:1] == RESOLUTION_MARK:
                        continue  # what resolved a pending transfer: not an id
                    h = key_hash(key)
                    by_stripe[h & _STRIPE_MASK].append(h >> 6)
                for stripe, hashes in enumerate(by_stripe):  # each stripe's lock once a chunk
                    if hashes:
                        with self._locks[stripe]:
                            self._filters[stripe].add_all(hashes)
                after = keys[-1]  # the index only grows: there is a key up to `end`
        except JournalError:  # closed while warming: claims keep asking the index
            return
        self._warm = True

    def stop(self) -> None:
        """Stop loading the filters (before the journal closes under it); bounded wait."""
        self._stopping = True
        self._warming.join(timeout=30.0)

    def wait_warm(self, timeout_s: float) -> bool:
        """Block until the filters are loaded (for benchmarks and tests)."""
        self._warming.join(timeout_s)
        return self._warm

    def claim(self, request: Request, relayed: bool = False) -> tuple[Ticket | Prior, bool]:
        """Claim `request.id`: (new ticket, True), or (the existing ticket or outcome, False).
        A relayed ticket is for a caller that waits on it (see `journal.Completion`)."""
        tid = request.id
        h = id_hash(tid)
        stripe = h & _STRIPE_MASK
        lock = self._locks[stripe]
        lock.acquire()  # not `with`: see `claim_many`, which this is for one request
        try:
            inflight = self._inflight
            ticket = inflight.get(tid)
            if ticket is not None:
                return ticket, False
            if self._filters[stripe].check_and_add(h >> 6) or not self._warm:
                outcome = self.lookup(tid)
                if outcome is not None:
                    return outcome, False
            ticket = inflight[tid] = Ticket((request,), stripe, relayed)
        finally:
            lock.release()
        if len(inflight) > self._sweep_above:
            self._sweep()
        return ticket, True

    def claim_many(self, requests: Sequence[Request], fresh: list[Ticket], relayed: bool = False) -> list[Prior]:
        """`claim` each request, in order: its new ticket (also appended to `fresh`), or the
        ticket or outcome its id already has (a request repeated in `requests` finds the
        ticket its first occurrence got)."""
        filters, inflight, warm = self._filters, self._inflight, self._warm
        claimed: list[Prior] = []
        locks = self._locks_for(len(requests), lambda: id_hash(requests[0].id) & _STRIPE_MASK)
        for lock in locks:
            lock.acquire()  # not `with`: on CPython 3.11 it costs three times as much
        try:
            for request in requests:
                tid = request.id
                ticket = inflight.get(tid)
                if ticket is None:
                    h = id_hash(tid)
                    stripe = h & _STRIPE_MASK
                    if filters[stripe].check_and_add(h >> 6) or not warm:
                        outcome = self.lookup(tid)
                        if outcome is not None:
                            claimed.append(outcome)
                            continue
                    ticket = Ticket((request,), stripe, relayed)
                    inflight[tid] = ticket
                    fresh.append(ticket)
                claimed.append(ticket)
        finally:
            for lock in locks:
                lock.release()
        if len(inflight) > self._sweep_above:
            self._sweep()
        return claimed

    def claim_chain(self, requests: tuple[Request, ...], relayed: bool = False) -> Ticket | list[Prior | None]:
        """Claim every id of a linked chain at once: one new ticket for them all if every id is
        new, else what each id already has (None for a new one), claiming nothing. Each id
        goes into its stripe's filter as it is looked at (`check_and_add`, one pass, as `claim`
        does), also when the chain is not claimed: a filter may say "maybe" of an id never
        claimed, which costs a later claim of it one look at the index, never a wrong answer."""
        filters, inflight = self._filters, self._inflight
        found: list[Prior | None] = []
        hashes = list(map(id_hash, map(_ID, requests)))  # `map`, not comprehensions: no frames, once a chain
        locks = list(map(self._locks.__getitem__, sorted(set(map(_STRIPE_MASK.__and__, hashes)))))  # in order: no deadlock
        for lock in locks:
            lock.acquire()
        try:
            warm = self._warm
            asked: list[int] = []  # those the index must answer: looked up at once (`transfer_records`)
            for request, h in zip(requests, hashes, strict=True):
                prior: Prior | None = inflight.get(request.id)
                if prior is None and (filters[h & _STRIPE_MASK].check_and_add(h >> 6) or not warm):
                    asked.append(len(found))
                found.append(prior)
            if asked:
                with self._journal.snapshot() as txn:
                    for index, outcome in zip(asked, transfer_records(self._journal, [requests[i].id for i in asked],
                                                                      txn), strict=True):
                        found[index] = self._durable(outcome)
            if any(prior is not None for prior in found):
                return found
            ticket = Ticket(requests, hashes[0] & _STRIPE_MASK, relayed, linked=True)
            ticket.locks = locks  # what releasing it takes again, not hashed again
            for request in requests:
                inflight[request.id] = ticket
        finally:
            for lock in locks:
                lock.release()
        if len(inflight) > self._sweep_above:
            self._sweep()
        return ticket

    def _locks_for(self, count: int, stripe_of_one: Callable[[], int]) -> Sequence[threading.Lock]:
        """The locks to take for `count` ids: the one's stripe's (`stripe_of_one()`), or every
        stripe's for more (in order, so never a deadlock): a batch of 1,000 then takes 64
        locks once, not a lock 1,000 times."""
        return (self._locks[stripe_of_one()],) if count == 1 else self._locks

    def _ticket_locks(self, tickets: Sequence[Ticket]) -> Sequence[threading.Lock]:
        """The stripe locks of every id of `tickets`, in order (every lock, for many)."""
        if len(tickets) == 1 and len(tickets[0].requests) == 1:
            return (self._locks[tickets[0].stripe],)
        if len(tickets) > 1:
            return self._locks
        if not tickets:
            return ()
        locks = getattr(tickets[0], "locks", None)  # a chain's, since it was claimed
        if locks is not None:
            return locks
        return [self._locks[stripe] for stripe in sorted({id_hash(request.id) & _STRIPE_MASK
                                                           for request in tickets[0].requests})]

    def lookup(self, tid: str, txn: Any | None = None) -> Committed | Refused | None:
        """The durable outcome of `tid`, from the transfers index (no scan)."""
        return self._durable(transfer_record(self._journal, tid, txn))

    def _durable(self, outcome: Committed | Refused | None) -> Committed | Refused | None:
        """`outcome`, found in the index, once its record is durable. Until a record is, the
        in-flight ticket of its id answers, not the index; an index entry past the durable
        LSN with no ticket is one of a commit whose flush failed (`journal._store.Store.flush`): the
        journal's failure is raised (`JournalWriteError`), never that outcome."""
        if outcome is not None and outcome.lsn > self._journal.durable_lsn:
            self._journal.wait_durable(outcome.lsn, DURABLE_WAIT_S)
        return outcome

    def release(self, ticket: Ticket) -> None:
        """Forget a ticket once it is durable (the index answers from now on) or failed."""
        if ticket.linked:
            self.release_many((ticket,))
            return
        lock = self._locks[ticket.stripe]
        lock.acquire()  # not `with`: see `claim_many`
        try:
            tid = ticket.request.id
            if ticket.done and self._inflight.get(tid) is ticket:
                del self._inflight[tid]
        finally:
            lock.release()

    def release_many(self, tickets: Sequence[Ticket]) -> None:
        """`release` of each."""
        inflight = self._inflight
        locks = self._ticket_locks(tickets)
        for lock in locks:
            lock.acquire()  # not `with`: see `claim_many`
        try:
            for ticket in tickets:
                if not ticket.done:
                    continue
                if not ticket.linked:  # one request
                    tid = ticket.request.id
                    if inflight.get(tid) is ticket:
                        del inflight[tid]
                    continue
                for request in ticket.requests:
                    tid = request.id
                    if inflight.get(tid) is ticket:
                        del inflight[tid]
        finally:
            for lock in locks:
                lock.release()

    def _sweep(self) -> None:
        """Forget every ticket that is done (durable, or failed) and still claimed: its caller
        would have released it (`release`), unless it gave up waiting (`LedgerTimeout`) and never
        retried the id. Without this, each such ticket stayed for good: a ledger kept past its
        bound (callers timing out, over and over) grew without end. Forgetting a done ticket is
        what `release` does: the index answers for its ids from now on. Called with no stripe
        lock held; takes them all, in order, once in `_sweep_above` claims."""
        for lock in self._locks:
            lock.acquire()
        try:
            inflight = self._inflight
            if len(inflight) <= self._sweep_above:  # another claim swept while this one waited
                return
            for tid in [tid for tid, ticket in inflight.items() if ticket.done]:
                del inflight[tid]
            self._sweep_above = max(CLAIMS_SWEEP_MIN, 2 * len(inflight))
        finally:
            for lock in self._locks:
                lock.release()

    def in_flight(self) -> list[Ticket]:
        """The tickets claimed and not yet released."""
        for lock in self._locks:
            lock.acquire()
        try:
            return list(self._inflight.values())
        finally:
            for lock in self._locks:
                lock.release()

    def abandon(self, ticket: Ticket) -> None:
        """Drop a ticket whose protocol never started; nothing was written for it."""
        locks = self._ticket_locks((ticket,))
        for lock in locks:
            lock.acquire()
        try:
            for request in ticket.requests:
                if self._inflight.get(request.id) is ticket:
                    del self._inflight[request.id]
        finally:
            for lock in locks:
                lock.release()
