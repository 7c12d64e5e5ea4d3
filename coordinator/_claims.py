"""Transfer ids: who has claimed which, and what became of it.

A transfer id is claimed once. While its protocol runs, the claim is an
in-flight `Ticket`; once durable, the journal's transfer index answers. Both
are consulted under one lock per stripe of ids, so a retry racing the original
either finds the ticket or finds the durable outcome, never neither.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from itertools import islice
from typing import Any, NamedTuple, cast

from journal import Completion, Journal, JournalCorruptedError, JournalError

from coordinator._errors import REJECTIONS, IdempotencyConflict, JournalCorrupted, LedgerError, LedgerUnavailable
from coordinator._idfilter import IdFilter
from coordinator._limits import CLAIM_STRIPES, INDEX_KEYS_PER_SNAPSHOT, KEY_BYTES_MAX
from coordinator._records import COMMIT, DIGEST_MARK, REJECT, TRANSFERS_INDEX, decode, id_key, value_lsn
from coordinator._values import Transfer, TransferRequest


class Refusal(NamedTuple):
    """A journaled rejection: it consumes the id, and a retry gets the same error class."""

    request: TransferRequest
    code: str
    lsn: int


Outcome = Transfer | Refusal
_STRIPE_MASK = CLAIM_STRIPES - 1
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


_completion_init = Completion.__init__


class Ticket(Completion):
    """The claim on a transfer id while its protocol runs. `value` becomes its Outcome."""

    __slots__ = ("request", "stripe", "on_decided")

    def __init__(self, request: TransferRequest, stripe: int, relayed: bool = False) -> None:
        _completion_init(self, None, relayed)  # not `super().__init__(relayed=...)`: half the cost, once a transfer
        self.request = request
        self.stripe = stripe
        """The claims stripe its id belongs to."""
        self.on_decided: Callable[[Ticket], None] | None = None
        """Called once, on the deciding thread, when the outcome is known (not yet durable)."""


def refusal_error(refusal: Refusal) -> LedgerError:
    request = refusal.request
    cls = REJECTIONS[refusal.code]
    return cls(
        f"transfer {request.id!r} of {request.amount} from {request.source!r} to "
        f"{request.destination!r} was refused: {refusal.code}"
    )


def settle(request: TransferRequest, outcome: Outcome) -> Transfer:
    """The caller's result for `request` given the id's outcome: a Transfer, or raise."""
    prior = outcome.request if isinstance(outcome, Refusal) else outcome
    if (prior.source, prior.destination, prior.amount) != (request.source, request.destination, request.amount):
        raise IdempotencyConflict(
            f"transfer id {request.id!r} was already used for {prior.amount} from "
            f"{prior.source!r} to {prior.destination!r}"
        )
    if isinstance(outcome, Refusal):
        raise refusal_error(outcome)
    return outcome


def ticket_outcome(ticket: Ticket) -> Outcome:
    """The decided outcome of a ticket, or raise the error that kept it from being durable."""
    if ticket.error is not None:
        if isinstance(ticket.error, LedgerError):
            raise ticket.error
        raise LedgerUnavailable(f"the journal failed: {ticket.error}") from ticket.error
    assert ticket.value is not None, "a resolved ticket carries its outcome"
    return cast(Outcome, ticket.value)


def lsn_of(result: Outcome | Ticket | LedgerError | None) -> int:
    """The journal position a batch result waits for (0 if it wrote nothing)."""
    value: object = result.value if isinstance(result, Ticket) else result
    return int(getattr(value, "lsn", 0))


def result_of(request: TransferRequest, result: Outcome | Ticket | LedgerError | None) -> Transfer | LedgerError:
    """A batch item's answer: the Transfer, or the LedgerError it would have raised."""
    if type(result) is Ticket and result.request is request and result.error is None and type(result.value) is Transfer:
        return result.value  # this very request's own commit: nothing to compare
    if isinstance(result, LedgerError):
        return result
    assert result is not None
    try:
        return settle(request, ticket_outcome(result) if isinstance(result, Ticket) else result)
    except LedgerError as error:
        return error


def decode_outcome(lsn: int, payload: bytes) -> Outcome:
    return outcome_of(lsn, decode(lsn, payload))


def outcome_of(lsn: int, record: list[Any]) -> Outcome:
    """The outcome a decoded commit or refusal record at `lsn` holds."""
    request = TransferRequest(record[1], record[2], record[3], record[4])
    if record[0] == COMMIT:
        return Transfer(request.id, request.source, request.destination, request.amount, lsn)
    return Refusal(request, record[5], lsn)


def check_ids_against_records(journal: Journal) -> int:
    """Read every entry of the transfers index and the record it names, and check the record
    is that id's commit or refusal; return how many. For ledgers whose index entries carry no
    checksum (format 1): there, a damaged key would hide an id, and a retry of it would run
    again. Reads a chunk of entries per snapshot."""
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
                _named_record(journal, key, value_lsn(value), txn)
        checked += len(keys)
        if len(keys) < INDEX_KEYS_PER_SNAPSHOT:
            return checked
        after = keys[-1]


def _named_record(journal: Journal, key: bytes, lsn: int, txn: Any) -> list[Any]:
    """The commit or refusal record at `lsn`, which the transfers index names for `key`;
    `JournalCorrupted` if it is missing, damaged, or another id's (the pair check of an index
    entry against the record it points at)."""
    try:
        payload = journal.read(lsn, txn)
    except JournalCorruptedError as error:
        raise JournalCorrupted(str(error), error.lsn) from error
    if payload is None:
        raise JournalCorrupted(f"journal corrupted: the transfers index points {key!r} at LSN {lsn}, which is missing",
                               lsn)
    record = decode(lsn, payload)
    if record[0] not in (COMMIT, REJECT) or id_key(record[1]) != key:
        raise JournalCorrupted(f"journal corrupted: the transfers index points {key!r} at LSN {lsn}, "
                               "which is another record", lsn)
    return record


def transfer_record(journal: Journal, tid: str, txn: Any | None = None) -> tuple[int, list[Any]] | None:
    """The LSN and decoded record of the commit or refusal of `tid`, from the transfers index
    (no scan), checked against each other; None if the id was never used."""
    if txn is None:
        with journal.snapshot() as txn:
            return transfer_record(journal, tid, txn)
    key = id_key(tid)
    value = journal.index_get(TRANSFERS_INDEX, key, txn)
    if value is None:
        return None
    if len(value) != 8:
        raise JournalCorrupted(f"the transfers index entry of {tid!r} does not hold an LSN", where="the transfers index")
    lsn = value_lsn(value)
    return lsn, _named_record(journal, key, lsn, txn)


class Claims:
    """The in-flight tickets, striped by id. Safe from any thread; never waits.

    An id's outcome is looked up in the transfers index, which the journal checked entry by
    entry as it opened (so a miss there means the id is new); the filters, loaded from it
    in the background, spare most new ids that lookup."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self._locks = [threading.Lock() for _ in range(CLAIM_STRIPES)]
        self._filters = [IdFilter() for _ in range(CLAIM_STRIPES)]
        self._inflight: dict[str, Ticket] = {}
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
                for key in keys:
                    h = key_hash(key)
                    stripe = h & _STRIPE_MASK
                    with self._locks[stripe]:
                        self._filters[stripe].add(h >> 6)
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

    def claim(self, request: TransferRequest, relayed: bool = False) -> tuple[Ticket | Outcome, bool]:
        """Claim `request.id`: (new ticket, True), or (the existing ticket or outcome, False).
        A relayed ticket is for a caller that waits on it (see `journal.Completion`)."""
        fresh: list[Ticket] = []
        (claimed,) = self.claim_many((request,), fresh, relayed)
        return claimed, bool(fresh)

    def claim_many(
        self, requests: Sequence[TransferRequest], fresh: list[Ticket], relayed: bool = False
    ) -> list[Ticket | Outcome]:
        """`claim` each request, in order: its new ticket (also appended to `fresh`), or the
        ticket or outcome its id already has (a request repeated in `requests` finds the
        ticket its first occurrence got)."""
        filters, inflight, warm = self._filters, self._inflight, self._warm
        claimed: list[Ticket | Outcome] = []
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
                    ticket = Ticket(request, stripe, relayed)
                    inflight[tid] = ticket
                    fresh.append(ticket)
                claimed.append(ticket)
        finally:
            for lock in locks:
                lock.release()
        return claimed

    def _locks_for(self, count: int, stripe_of_one: Callable[[], int]) -> Sequence[threading.Lock]:
        """The locks to take for `count` ids: the one's stripe's (`stripe_of_one()`), or every
        stripe's for more (in order, so never a deadlock): a batch of 1,000 then takes 64
        locks once, not a lock 1,000 times."""
        return (self._locks[stripe_of_one()],) if count == 1 else self._locks

    def lookup(self, tid: str, txn: Any | None = None) -> Outcome | None:
        """The durable outcome of `tid`, from the transfer index (no scan)."""
        if txn is None:
            with self._journal.snapshot() as txn:
                return self.lookup(tid, txn)
        found = transfer_record(self._journal, tid, txn)
        return None if found is None else outcome_of(*found)

    def release(self, ticket: Ticket) -> None:
        """Forget a ticket once it is durable (the index answers from now on) or failed."""
        self.release_many((ticket,))

    def release_many(self, tickets: Sequence[Ticket]) -> None:
        """`release` of each."""
        inflight = self._inflight
        locks = self._locks_for(len(tickets), lambda: tickets[0].stripe)
        for lock in locks:
            lock.acquire()  # not `with`: see `claim_many`
        try:
            for ticket in tickets:
                tid = ticket.request.id
                if inflight.get(tid) is ticket and ticket.done:
                    del inflight[tid]
        finally:
            for lock in locks:
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
        tid = ticket.request.id
        with self._locks[ticket.stripe]:
            if self._inflight.get(tid) is ticket:
                del self._inflight[tid]
