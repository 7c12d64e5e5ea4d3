"""`ShardedLedger`: one ledger spread over N shards, each an ordinary Tally ledger in a Ray actor.

    from engine import ShardedLedger
    with ShardedLedger.open("books", shards=2) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("t-1", source="bank", destination="alice", amount=10_000)

Same methods and errors as `Ledger`; what differs, a user sees here:
- An account lives on one shard, by a hash of its id or of `create_account(..., placement=KEY)`
  (`engine._placement`). A transfer within a shard runs as in a `Ledger`; across shards it
  runs in three durable steps and is acknowledged once all are durable (`engine._crossing`).
- Ids: no user id may contain "\\x1f" (the steps' ids and the protocol's accounts use it), and
  a transfer id is at most 117 characters (`USER_ID_LENGTH_MAX`). Transfer ids are kept once
  *per source shard*: an id reused with a source on another shard is not detected (use ids
  unique to the whole ledger, as a host generating UUIDs does).
- A retry that differs in any field is `IdempotencyConflict` even if its first caller died
  between a cross-shard transfer's steps (the first step keeps the destination and a digest of
  the metadata; the user's metadata is the credit's: `engine._crossing`).
- A pending transfer and a linked chain run within one shard; across shards they raise
  `CrossShardRefused` (nothing written: colocate the accounts with `placement`).
- `Transfer.lsn` and `Entry.lsn` are positions in a shard's journal; a cross-shard transfer's
  `lsn` and `timestamp` are its prepare's, on the source's shard. `balance(at_lsn=...)` reads
  the account's shard's journal.
- `state_hash` is the SHA-256 of the shards' state hashes in shard order (the protocol's
  clearing accounts included).

Blocking: every call waits on Ray replies, each wait bounded by `timeout_s` (`LedgerTimeout`:
the outcome is unknown, retry with the same id). Thread-safe: call it from any threads.

Here: opening, the reads, recovery of in-doubt transfers (and its sweeper thread) and closing.
The writes (`create_account(s)`, `transfer`, `transfer_many`, `post_pending`, `void_pending`,
`transfer_linked`) are its base class, `ShardedWrites`, in `engine._sharded_writes`; the router
both use is `engine._crossing`'s `Router`, and each shard's actor is `engine._shard`'s `Shard`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from coordinator import (
    TIMEOUT_S_DEFAULT,
    TIMESTAMP_MAX,
    Account,
    Balance,
    Entry,
    InvalidRequest,
    LedgerClosed,
    LedgerError,
    LedgerTimeout,
    Transfer,
    check_path,
    items_of,
    seconds_of,
    shown,
)

from engine import _ray
from engine._history import check_count, check_lsn
from engine._checks import check_page, check_timeout_s
from engine._ledger import Ledger
from engine._crossing import Router
from engine._placement import SEPARATOR, check_user_id, read_manifest, write_manifest
from engine._sharded_writes import ShardedWrites

logger = logging.getLogger("tally.sharded")

OLDER_THAN_S_MAX = TIMESTAMP_MAX / 1e9
"""`recover_in_doubt`'s `older_than_s` past this is this: older than every timestamp a shard can hold."""

SHARD_PREFIX = "shard-"
IN_DOUBT_AFTER_S_MIN = 120.0
"""The least default age at which the sweeper resolves a cross-shard transfer in doubt."""
OPEN_WAIT_S = 600.0
"""The longest `open` waits for the shards' actors to start and their ledgers to recover
(each recovers its journal as `Ledger.open` does, at once; then `LedgerTimeout`)."""


class ShardedLedger(ShardedWrites):
    """An open sharded ledger. Use `ShardedLedger.open(path, shards=N)`, preferably as a
    context manager."""

    def __init__(self, path: Path, router: Router, actors: list[Any], started_ray: bool,
                 in_doubt_after_s: float, own_clock: bool) -> None:
        self.path = path
        self.timeout_s = router.timeout_s
        self.in_doubt_after_s = in_doubt_after_s
        self._router = router
        self._actors = actors
        self._started_ray = started_ray
        self._closed = False
        self._closing = threading.Lock()
        """Held while `close` looks at `closed` and marks it, so two closes at once leave Ray once."""
        self.recovered_in_doubt = 0
        """How many in-doubt cross-shard transfers the open resolved."""
        self.swept_in_doubt = 0
        """How many the sweeper resolved since (`_sweep`)."""
        self._stopping = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep, name="tally-in-doubt-sweeper", daemon=True)
        self._own_clock = own_clock
        """The shards' ledgers run on a `clock_ns` of the caller's: no sweeper, no age."""
        self._pid = os.getpid()
        """The process that opened it: Ray's connection does not survive a fork (`_live`)."""

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, shards: int, address: str | None = None,
             nodes: Sequence[str] | None = None, in_doubt_after_s: float | None = None,
             **ledger_options: Any) -> ShardedLedger:
        """Open (creating if missing) the sharded ledger in directory `path`, with `shards`
        shards, and resolve every cross-shard transfer left in doubt by a crash. While it is
        open, a thread resolves those whose first step is `in_doubt_after_s` old (default:
        4 x `timeout_s`, at least `IN_DOUBT_AFTER_S_MIN`), so the funds a caller that died left
        held are freed without waiting for the next open; it must be more than 3 x `timeout_s`
        (a live caller's steps take at most that), else `InvalidRequest`. Ages are read on the
        wall clock: with a `clock_ns` of one's own no thread runs (as in a `Ledger`): call
        `recover_in_doubt()`.

        `address` None: join the Ray this process already joined, or start a local one bound to
        127.0.0.1 (`engine._ray`); else join the Ray cluster there (one that does not answer
        takes Ray's own retries, minutes, then `LedgerUnavailable`). A host that shuts down the
        Ray the shards run on (also to start another Ray, or to join a cluster again) takes the
        shards' actors with it: every call that asks a shard then raises `LedgerClosed` (open
        the ledger again; `shard_of` still answers for an account found before), and `close`
        stops nothing and shuts no Ray down. `nodes`: the Ray node id of each shard
        (default: this process's node); a shard's directory is `path/shard-i` on its node's
        disk, so give a path every node has. `ledger_options` go to each shard's `Ledger.open`
        (`timeout_s` also bounds every wait here). Blocks while the shards open and recover
        (each in its own process, at once; at most `OPEN_WAIT_S`).

        Raises `InvalidRequest` (bad arguments, or a directory that is not a sharded ledger),
        `ShardCountMismatch` if `shards` differs from the count the directory was made with,
        `NotALedger` if a shard's directory is missing or empty (restore it: it is not made
        anew, empty, once the manifest exists), and whatever a shard's `Ledger.open` raises.
        """
        timeout_s = _check_options(ledger_options)
        if address is not None and (type(address) is not str or not address):
            raise InvalidRequest(f"address must be a Ray cluster's address (a str) or None, got {shown(address)}")
        root = Path(check_path(path)).absolute()
        made = read_manifest(root, shards)
        count: int = shards
        if nodes is not None:
            if not isinstance(nodes, Sequence) or isinstance(nodes, (str, bytes)):
                raise InvalidRequest(f"nodes must list one Ray node id per shard ({count}), got {shown(nodes)}")
            nodes = items_of(nodes, "nodes")
            if len(nodes) != count or not all(type(node) is str for node in nodes):
                raise InvalidRequest(f"nodes must list one Ray node id per shard ({count}), got {shown(nodes)}")
        after_s = _in_doubt_after_s(in_doubt_after_s, timeout_s)
        started, session = _ray.join(address)
        actors: list[Any] = []
        try:
            if nodes is not None:
                _ray.check_nodes(nodes)
            placed = list(nodes) if nodes is not None else [_ray.local_node()] * count
            actors = [_ray.start_shard(str(root / f"{SHARD_PREFIX}{i}"), i, placed[i], dict(ledger_options))
                      for i in range(count)]
            router = Router(actors, timeout_s, session)
            # A shard's ledger is made only by the open that writes the manifest, once all are made.
            for failure in router.everywhere("failure" if made else "create",
                                             timeout_s=max(OPEN_WAIT_S, router.timeout_s)):
                if failure is not None:
                    raise failure
            if not made:
                write_manifest(root, count)
            router.fill()
            ledger = cls(root, router, actors, started, after_s, ledger_options.get("clock_ns") is not None)
            ledger.recovered_in_doubt = router.recover()
            if not ledger._own_clock:  # with a clock of one's own nothing runs behind one's back (as in a Ledger)
                ledger._sweeper.start()
            return ledger
        except BaseException:
            for actor in actors:
                _ray.stop_shard(actor, session, _ray.JOIN_WAIT_S)  # (a lock held through a start of Ray: waited out)
            if started:
                _ray.leave(session, timeout_s)
            raise

    def __enter__(self) -> ShardedLedger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def shards(self) -> int:
        return self._router.shards

    def _live(self) -> Router:
        if os.getpid() != self._pid:  # a child made by fork(): a call would wait on the parent's connection
            raise LedgerClosed(f"the sharded ledger at {self.path} belongs to process {self._pid}, which opened it: "
                               "Ray's connection does not survive a fork, so open the ledger from a process started "
                               "with spawn")
        if self._closed:
            raise LedgerClosed(f"the sharded ledger at {self.path} is closed")
        return self._router

    def shard_of(self, account: str) -> int:
        """The shard `account` lives on (its hash shard if no shard has it)."""
        check_user_id(account, "account id")
        return self._live().locate([account])[account]

    def accounts(self) -> list[Account]:
        """Every durable account, shard by shard, each shard's in creation order (the
        protocol's clearing accounts are left out)."""
        return [account for found in self._live().everywhere("accounts") for account in found]

    def account(self, id: str) -> Account:
        """`Ledger.account`, from the account's shard."""
        return self._on_account(id, "account", id)  # type: ignore[no-any-return]

    def _on_account(self, account_id: str, method: str, *args: Any, **kwargs: Any) -> Any:
        router = self._live()
        check_user_id(account_id, "account id")
        return router.call(router.locate([account_id])[account_id], method, *args, **kwargs)
    def recover_in_doubt(self, older_than_s: float = 0.0) -> int:
        """Resolve every cross-shard transfer left in doubt (its caller died between steps),
        or those whose first step is at least `older_than_s` old: post it if its credit
        committed, else fence the credit's id and void it. How many. Run by every open, and
        while open by the sweeper (`in_doubt_after_s`); safe at any time, but a transfer in
        flight from a live caller is resolved too (aborted if its credit has not landed: that
        caller then gets `CrossShardAborted`)."""
        age_s = seconds_of(older_than_s)
        if age_s is None or not 0 <= age_s < float("inf"):
            raise InvalidRequest(f"older_than_s must be a finite number of seconds >= 0, got {shown(older_than_s)}")
        if age_s and self._own_clock:
            raise InvalidRequest("older_than_s needs the shards on the wall clock (their transfers' timestamps are "
                                 "compared with it); with clock_ns, call recover_in_doubt() when you decide")
        return self._live().recover(min(age_s, OLDER_THAN_S_MAX))  # older than any timestamp: none of them

    def _sweep(self) -> None:
        """The sweeper: every quarter of `in_doubt_after_s`, resolve the cross-shard transfers
        in doubt that long (a shard that does not answer is tried again next time)."""
        while not self._stopping.wait(self.in_doubt_after_s / 4):
            try:
                self.swept_in_doubt += self._router.recover(self.in_doubt_after_s)
            except LedgerClosed as error:  # closing, or its Ray shut down by the host: no shard of it comes back
                if not self._stopping.is_set():
                    logger.warning("the in-doubt sweeper of the sharded ledger at %s stops: %s", self.path, error)
                return
            except Exception as error:  # a shard unavailable for now: the next sweep tries again
                if not self._stopping.is_set():
                    logger.warning("resolving in-doubt cross-shard transfers failed: %r; trying again in %.0f s",
                                   error, self.in_doubt_after_s / 4)

    def get_transfer(self, id: str) -> Transfer | None:
        """`Ledger.get_transfer` across shards (every shard asked at once); a cross-shard
        transfer as its user made it, once posted."""
        check_user_id(id, "transfer id")
        return self._live().get_transfer(id)

    def outcome(self, id: str) -> Transfer | LedgerError | None:
        """`Ledger.outcome` across shards (None while a cross-shard transfer is in flight)."""
        check_user_id(id, "transfer id")
        return self._live().outcome(id)

    # --- reads ---------------------------------------------------------------------------

    def balance(self, account: str, *, at_lsn: int | None = None, at_timestamp: int | None = None) -> Balance:
        """`Ledger.balance` from the account's shard (`at_lsn`: a position in that shard's journal)."""
        if at_lsn is not None:
            check_lsn("at_lsn", at_lsn)
        if at_timestamp is not None:
            check_count("at_timestamp", at_timestamp)
        return self._on_account(account, "balance", account,  # type: ignore[no-any-return]
                                at_lsn=at_lsn, at_timestamp=at_timestamp)

    def entries(self, account: str, after: int = 0, limit: int | None = None) -> list[Entry]:
        """`Ledger.entries` from the account's shard; a cross-shard transfer's entry names its
        user's transfer id (the shard journals it under a step's id: `T` and a suffix)."""
        check_page(after, limit)
        found: list[Entry] = self._on_account(account, "entries", account, after, limit)
        return [entry if SEPARATOR not in entry.transfer_id else
                dataclasses.replace(entry, transfer_id=entry.transfer_id.split(SEPARATOR, 1)[0]) for entry in found]

    def state_hash(self) -> str:
        """SHA-256 over the shards' state hashes, in shard order."""
        hashes = [self._live().call(i, "state_hash") for i in range(self.shards)]
        return hashlib.sha256("".join(hashes).encode()).hexdigest()

    def shard_balances(self, shard: int) -> dict[str, Balance]:
        """Every account's balance on shard `shard`, the protocol's clearing accounts included
        (for audits: each shard's posted balances sum to zero)."""
        router = self._live()
        if type(shard) is not int or not 0 <= shard < router.shards:
            raise InvalidRequest(f"shard must be an int in 0..{router.shards - 1}, got {shown(shard)}")
        sent = router._sent(lambda: [router.actors[shard].balances.remote()])
        return _ray.gather(sent, self.timeout_s, router.session)[0]  # type: ignore[no-any-return]

    def expire_pending(self) -> int:
        """`Ledger.expire_pending` on every shard (needed with `clock_ns` only: on the wall
        clock, each shard's ledger expires its own); how many expired in all."""
        expired = 0
        for ok, value in self._live().everywhere("call", "expire_pending", (), {}):  # every shard at once
            if not ok:
                raise value
            expired += value
        return expired

    def pids(self) -> list[int]:
        """The process id of each shard's actor (for operators and crash tests)."""
        router = self._live()
        return _ray.gather(router._sent(lambda: [actor.pid.remote() for actor in self._actors]), self.timeout_s,
                           router.session)

    def nodes(self) -> list[str]:
        """The Ray node id each shard's actor runs on."""
        router = self._live()
        return _ray.gather(router._sent(lambda: [actor.node.remote() for actor in self._actors]), self.timeout_s,
                           router.session)

    def close(self) -> None:
        """Close every shard's ledger (each finishes the calls it is running, bounded by
        `timeout_s`), stop the actors, and shut Ray down if the open started it. Idempotent.
        After the host shut the ledger's Ray down (and perhaps started another), it only marks
        the ledger closed and stops its sweeper: the shards went with that Ray.
        Unlike `Ledger.close`, it does not wait for this object's calls under way in other
        threads: one between two steps fails (`LedgerClosed` or `LedgerUnavailable`), and what
        it left in doubt is resolved by the next open; nor does a close made while another
        thread closes it wait for that one: it returns at once. A shard whose ledger does not
        close within `timeout_s` (a stopped process) is stopped all the same, then
        `LedgerTimeout` says so: the ledger is closed, and the next open recovers that shard's
        ledger from its journal (a shard's own close error, or its actor gone, is raised as it
        is, after the same)."""
        with self._closing:  # of two closes at once, one runs: Ray is left once
            if self.closed:  # (in a child made by fork(), the shards are the parent's: nothing to do)
                return
            self._closed = True
        self._stopping.set()
        if self._sweeper.is_alive():  # a sweep under way ends within its calls' timeouts
            self._sweeper.join(3 * self.timeout_s)
        router = self._router
        try:
            _ray.gather(router._sent(lambda: [actor.close.remote() for actor in self._actors]), self.timeout_s,
                        router.session)
        except LedgerClosed:  # its Ray is gone (its host shut it down): the shards' processes went with it
            pass
        except LedgerTimeout as error:  # (a close's, not a transfer's to retry)
            raise LedgerTimeout(f"the sharded ledger is closed, but a shard's ledger did not finish closing within "
                                f"{self.timeout_s:g} s: its actor is stopped, and the next open recovers that ledger "
                                "from its journal, as after a crash (nothing acknowledged is lost)") from error
        finally:
            router.closed = True  # (before the actors stop: a call under way sends nothing after: `_ray.sent`)
            for actor in self._actors:
                _ray.stop_shard(actor, router.session, _ray.JOIN_WAIT_S)  # (none on a Ray the host started since)
            if self._started_ray:
                _ray.leave(router.session, self.timeout_s)

    @property
    def closed(self) -> bool:
        return self._closed or os.getpid() != self._pid  # (in a child made by fork(): closed to it)

def _in_doubt_after_s(value: object, timeout_s: float) -> float:
    """`open`'s `in_doubt_after_s`, checked (None: the default for `timeout_s`)."""
    if value is None:
        return max(IN_DOUBT_AFTER_S_MIN, 4 * timeout_s)
    after_s = seconds_of(value)
    if after_s is None or not 3 * timeout_s < after_s <= threading.TIMEOUT_MAX:
        raise InvalidRequest(f"in_doubt_after_s must be a number of seconds above 3 x timeout_s ({3 * timeout_s:g}) "
                             f"and at most {threading.TIMEOUT_MAX:.0f}: a live caller's steps may take that long; "
                             f"got {shown(value)}")
    return float(after_s)


def _check_options(options: dict[str, Any]) -> float:
    """`InvalidRequest` for an option `Ledger.open` does not take, `readonly` (a shard is
    written through its actor only), or a bad `timeout_s`; the other values are checked by
    each shard's open. The `timeout_s` the shards get, as a float."""
    try:
        inspect.signature(Ledger.open).bind("path", **options)
    except TypeError as error:
        raise InvalidRequest(f"ShardedLedger.open: {error} (ledger_options go to each shard's Ledger.open)") from None
    readonly = options.get("readonly", False)
    if readonly is not False:
        raise InvalidRequest("a sharded ledger opens its shards for writing: readonly is not supported"
                             if readonly is True else f"readonly must be a bool, got {shown(readonly)}")
    return check_timeout_s(options.get("timeout_s", TIMEOUT_S_DEFAULT))  # it bounds the router's waits too
