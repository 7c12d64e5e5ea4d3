"""The journal: an ordered, checksummed, durable sequence of opaque records.

It knows nothing about accounts or money. A record is bytes the caller made;
the journal gives it the next LSN (strictly increasing, gapless from 1), stores
it framed with a checksum and chained by its digest to the record before it
(`journal._chain`: `head`, `verify_chain`), and writes the caller's index entries in
the same LMDB transaction, so an index never points at a record that is not there.

Threads: any thread may `append`, `wait_durable` and read. Exactly one thread,
the writer, ever opens a write transaction.

Here: opening (the checks against the anchor and the chain's last link), the writes, which
`journal._writer.Writer` makes (its group commit: `journal._commits`), the durable head,
closing and the seal. The reads (records, index entries, the chain as stored) are the base
class's, `journal._journal_reads.JournalReads`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import lmdb

from journal._anchor import Anchor, AnchorState, create_anchor
from journal._completion import Completion
from journal._directory import DirectoryLock, clear_staging, lock_directory, prepare_directory, recognise, refuse_missing
from journal._errors import (
    JournalAnchorMissingError,
    JournalClosedError,
    JournalCorruptedError,
    JournalError,
    lmdb_read_error,
)
from journal._chain import ChainHead, tail_head
from journal._chunks import Chunks
from journal._commits import Behind, IndexPut, IndexPuts
from journal._format import index_seed, key_lsn, lsn_key
from journal._journal_reads import JournalReads
from journal._limits import MAP_SIZE_BYTES_DEFAULT
from journal._check import check_records, check_to_seal, seal_stands
from journal._names import DATA_FILE, RECORDS_DB
from journal._seal import SEAL_FILE, write_seal
from journal._store import Store, os_error
from journal._writer import Writer

logger = logging.getLogger("tally.journal")


class Journal(JournalReads):
    """Open with `Journal.open`; close exactly once with `close` (idempotent)."""

    def __init__(self, store: Store, lock: DirectoryLock | None, path: str, anchor: AnchorState | None) -> None:
        self._store = store
        self._lock = lock
        self._open = True
        self.path = path
        self.readonly = store.readonly
        self.format_version = store.format_version
        self._seeds = {name: index_seed(name) for name in store.indexes} if store.format_version >= 2 else None
        """Each index's checksum seed, or None for a format without index checksums."""
        self._chunks = Chunks()
        """Per thread, what its reads call between two chunks (`reading_in_chunks`)."""
        self.anchor = anchor
        """The anchor as this open read it (None: the ledger has none yet)."""
        self.problem: JournalCorruptedError | None = None
        """What a read-only open found wrong with the records or against the anchor and let
        pass, for the audit to report (a writable open raises it)."""
        self.index_damage = store.opened.index_damage
        """The first index entry that failed its checksum, if the open kept it (`open_readonly`'s
        `index_damage_kept`)."""
        try:
            self._last_lsn_read = check_records(store.opened, anchor, lambda: _first_gap(store),
                                                os.path.join(path, DATA_FILE))
            self._check_anchor_digest()
        except JournalCorruptedError as error:
            if not store.readonly:
                raise
            self.problem = error
            last_key = store.layout.trees[RECORDS_DB].last_key
            self._last_lsn_read = key_lsn(last_key) if last_key is not None and len(last_key) == 8 else 0
        self._writer = None
        if not store.readonly:
            head = self._tail_head()  # the last link checked, to continue the chain from
            try:
                writing_anchor = Anchor(path, anchor) if anchor is not None else None
            except OSError as error:
                raise JournalError(f"cannot open the anchor of {path} for writing: {error}") from error
            self._writer = Writer(store, head, writing_anchor, self._seeds)

    def _check_anchor_digest(self) -> None:
        """The record at the anchor's durable LSN must be the one the anchor saw made durable
        there: the chain's digest at it begins with the anchor's (`journal._anchor`). Raises
        `JournalCorruptedError` in the data file, naming that LSN in its reason, if not: the
        file is not the one the anchor names."""
        anchor = self.anchor
        if anchor is None or not anchor.digest or not anchor.durable_lsn:
            return
        other = anchor.other_history(self.head_at(anchor.durable_lsn).digest, os.path.join(self.path, DATA_FILE))
        if other is not None:
            raise other

    def _tail_head(self) -> ChainHead:
        """The durable head, its last link checked (`journal._chain.tail_head`); raises
        `JournalCorruptedError` where the link breaks."""
        with self._store.reading() as txn:
            def read(lsn: int) -> bytes | None:
                try:
                    value = txn.get(lsn_key(lsn), db=self._store.records)
                except lmdb.Error as error:
                    raise lmdb_read_error(error, f"the record at LSN {lsn}") from error
                return None if value is None else bytes(value)

            return tail_head(read, self._last_lsn_read, self.format_version)

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        index_names: Sequence[str] = (),
        map_size_bytes: int = MAP_SIZE_BYTES_DEFAULT,
        sync: bool = True,
        create: bool = True,
    ) -> Journal:
        """Lock the directory and open (or, with `create`, make) its journal.

        The data file is checked page by page before LMDB maps it, every index entry's
        checksum is verified, and the file is checked against its anchor. Raises
        `JournalLockedError` if another holder is live, `JournalNotFoundError` for a path
        that holds no journal (without `create`) or cannot hold one, `JournalCorruptedError`
        saying where a journal is damaged (nothing is written then), and `JournalError` for
        a system condition (no space left, a read-only file system).
        """
        path = os.fsdecode(path)  # a str; bytes become one, undecodable ones refused below
        prepare_directory(path, create)
        if not create and not recognise(path)[0]:
            refuse_missing(path)  # before the lock file is made: a directory that is no ledger stays as it was
        lock = lock_directory(path)

        def make() -> tuple[Store, AnchorState | None]:
            clear_staging(path)
            exists, anchor = recognise(path)
            if not exists:
                if not create:
                    refuse_missing(path)
                anchor = Store.create(path, map_size_bytes=map_size_bytes, index_names=index_names)
            return Store.open(path, map_size_bytes=map_size_bytes, sync=sync, index_names=index_names,
                              readonly=False, anchor=anchor), anchor

        return cls._made(path, lock, make)

    @classmethod
    def open_readonly(cls, path: str | os.PathLike[str], *, index_names: Sequence[str] = (),
                      lock: bool = False, index_damage_kept: bool = False) -> Journal:
        """Open an existing journal for reading only; nothing is written to its data file.

        Checked as `open` checks, except that a gap in the records or a disagreement with
        the anchor is kept in `problem` rather than raised (the audit reports it; reads
        past a gap raise). Without `lock` a live writer in another process may go on (LMDB
        readers see a snapshot); with it, the directory is locked as a writer locks it
        (`JournalLockedError` while a live process holds it). With `index_damage_kept`, an
        index entry that fails its checksum is kept in `index_damage` rather than raised (but
        for the tear of a last commit cut off in its flush, raised as such): for an audit,
        which finds what it hides, and a salvage, which rebuilds the indexes from the records;
        never for an open that answers reads from the indexes."""
        path = os.fsdecode(path)
        prepare_directory(path, create=False)
        exists, anchor = recognise(path)
        if not exists:
            refuse_missing(path)
        held = lock_directory(path, readonly=True) if lock else None

        def make() -> tuple[Store, AnchorState | None]:
            again = recognise(path)[1] if lock else anchor  # as of now that no writer can move it
            return Store.open(path, map_size_bytes=MAP_SIZE_BYTES_DEFAULT, sync=True, index_names=index_names,
                              readonly=True, anchor=again, index_damage_kept=index_damage_kept), again

        return cls._made(path, held, make)

    @classmethod
    def _made(cls, path: str, lock: DirectoryLock | None,
              make: Callable[[], tuple[Store, AnchorState | None]]) -> Journal:
        """The journal on the store `make()` opens, the directory held with `lock` (if any);
        whatever fails, what was opened is closed again."""
        try:
            store, anchor = make()
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        try:
            return cls(store, lock, path, anchor)
        except BaseException:
            store.close()
            if lock is not None:
                lock.release()
            raise

    @property
    def _writing(self) -> Writer:
        if self._writer is None:
            raise JournalClosedError("the journal is open read-only")
        return self._writer

    # --- writing -----------------------------------------------------------------

    def append(
        self, payload: bytes, index: Sequence[IndexPut] = (), completion: Completion | None = None
    ) -> int:
        """Queue a record and return its LSN at once; see `Writer.append`."""
        return self._writing.append(payload, index, completion)

    def append_block(
        self,
        payloads: Sequence[bytes],
        index: IndexPuts,
        completions: Sequence[Completion | None],
        room_made: bool = False,
        wake: bool = True,
        behind: Behind | None = None,
    ) -> int:
        """Queue records under consecutive LSNs, with their index entries (by index name)
        and one completion (or None) each, and index entries to write behind them (`behind`);
        return the first LSN. See `Writer.append_block`."""
        return self._writing.append_block(payloads, index, completions, room_made, wake, behind)

    def wait_room(self, records: int) -> None:
        """Block (bounded) until `records` more can be queued without waiting."""
        self._writing.wait_room(records)

    def commit_inline(self) -> bool:
        """Write what is queued on this thread if no one is writing (see `Writer.commit_inline`);
        True if it did. For a caller about to wait for its records: a lone one then waits
        for no thread hand-off."""
        return self._writer is not None and self._writer.commit_inline()

    def durable_completion(self, lsn: int) -> Completion | None:
        """A completion resolved once every record up to `lsn` is durable (with the failure if
        the journal fails first), for a waiter that must not block (an event loop: see
        `Completion.add_callback`); None if they are durable already. Raises the journal's
        failure."""
        return None if self._writer is None else self._writer.durable_completion(lsn)

    def wait_durable(self, lsn: int, timeout_s: float) -> None:
        """Block (at most `timeout_s`) until every record up to `lsn` is on disk."""
        if self._writer is None:
            return
        self._writer.wait_durable(lsn, timeout_s)

    def wait_past(self, lsn: int, timeout_s: float) -> bool:
        """Block (at most `timeout_s`, less once the journal closes) until a record after `lsn`
        is durable; True if one is. A read-only journal returns False at once: the process
        that writes it cannot notify this one, so its followers poll."""
        return self._writer is not None and self._writer.wait_past(lsn, timeout_s)

    @property
    def last_lsn(self) -> int:
        """The LSN most recently assigned (possibly not yet durable)."""
        return self._writer.last_lsn if self._writer is not None else self._last_lsn_read

    @property
    def durable_lsn(self) -> int:
        return self._writer.durable_lsn if self._writer is not None else self._last_lsn_read

    @property
    def indexed_lsn(self) -> int:
        """The LSN of the newest record whose index entries written behind it (`append_block`)
        are all durable; 0 if this process wrote none (or has no writer)."""
        return self._writer.indexed_lsn if self._writer is not None else 0

    def head(self) -> ChainHead:
        """The durable head: the last durable LSN and the chain's digest there (`GENESIS` if no
        record is chained yet). Writing, from memory (never blocks on the writer; it moves once
        a group commit is durable); read-only, from the last record of the snapshot opened
        (`head_at`)."""
        if self._writer is not None:
            return self._writer.durable_head
        return self.head_at(self._last_lsn_read)

    @property
    def failure(self) -> Exception | None:
        return self._writer.failure if self._writer is not None else None

    @property
    def directory(self) -> str:
        """The ledger's directory as it was resolved when opened (absolute, links resolved)."""
        return self._store.directory

    @property
    def files(self) -> frozenset[tuple[int, int]]:
        """(device, inode) of its LMDB files as opened (`journal.files_of`)."""
        return self._store.files

    def refuse_writes(self, reason: str) -> None:
        """For a caller whose memory got ahead of what it journaled (a bug met halfway): fail
        the journal, so nothing more is written on top of it until it is reopened, when
        memory is rebuilt from what is durable. Queued records not yet being written fail too."""
        if self._writer is not None:
            self._writer.refuse_writes(reason)

    def stats(self) -> dict[str, int]:
        writer = self._writing
        return {"commits": writer.commits, "records_written": writer.records_written, "durable_lsn": writer.durable_lsn}

    # --- closing -----------------------------------------------------------------

    def release_after_fork(self) -> None:
        """In a child made by `fork()`: close this process's copy of the directory lock and
        mark the journal closed, touching nothing else (LMDB must not be used across a fork,
        and the writer thread is not in this process)."""
        self._open = False
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def close(self, seal: bool = True) -> None:
        """Drain the writer, seal the data file (unless `seal` is False: say, an open that
        failed), close LMDB and release the directory lock. Idempotent."""
        if not self._open:
            return
        self._open = False
        try:
            if self._writer is not None:
                self._writer.close()
                if seal and self._writer.failure is None:
                    self._seal()
        finally:
            self._store.close()
            if self._lock is not None:
                self._lock.release()
                self._lock = None



    def _seal(self) -> None:
        """Walk every page of a data file this journal wrote and closed cleanly, as an open
        would, and seal what it checked (`journal._seal`). Damage found here (a page that
        changed on disk while the ledger was open) is logged and left unsealed: the next open
        walks and reports it. A seal that cannot be written only costs the next open its walk.
        The seal an open took, if the file is still the one it sealed (nothing committed since,
        every byte as it summed them: `seal_stands`), is kept as it is, and nothing walked."""
        store = self._store
        data_file = os.path.join(store.directory, DATA_FILE)
        if not store.in_place():  # its directory removed or moved away: whatever is at the path is not ours
            logger.warning("%s is no longer the data file this ledger opened (removed or moved away): no seal written",
                           data_file)
            return
        try:
            if seal_stands(store.directory, data_file):
                return
        except (OSError, JournalError):  # (read as below: damage, or a file that cannot be read, is the walk's to say)
            pass
        try:
            os.unlink(os.path.join(store.directory, SEAL_FILE))  # never a seal of other bytes than those walked here
        except FileNotFoundError:
            pass
        except OSError as error:
            logger.warning("the old seal of %s cannot be removed (%s)", data_file, error)
            return
        try:
            checked = check_to_seal(data_file, list(store.indexes))
            if checked is not None:  # (None: another snapshot since the sums, not this close's to seal)
                meta, sums, layout = checked
                write_seal(store.directory, meta, sums, store.ledger_id, layout.trees)
        except JournalCorruptedError as error:
            logger.error("closing %s found damage; not sealed, so the next open reports it: %s", data_file, error)
        except (OSError, JournalError) as error:
            logger.warning("the seal of %s was not written (%s): the next open checks every page", data_file, error)


def _first_gap(store: Store) -> int:
    """The first LSN missing from the records (their pages are checked: LMDB may read them)."""
    expected = 1
    with store.reading() as txn:
        for key in txn.cursor(db=store.records).iternext(keys=True, values=False):
            if key != lsn_key(expected):
                break
            expected += 1
    return expected


def reanchor(path: str | os.PathLike[str], *, index_names: Sequence[str] = ()) -> int:
    """Write a new anchor for the journal in `path`, which lost its own, at its last LSN; return
    that LSN. Nothing can tell whether the data file is the newest the journal had: this is an
    operator's decision (`tally recover` makes it after a whole audit, say once `data.mdb` was
    restored from a backup). Locks the directory; raises `JournalError` if the journal has an
    anchor or another problem, and what `open_readonly` raises."""
    journal = Journal.open_readonly(path, index_names=index_names, lock=True)
    try:
        if not isinstance(journal.problem, JournalAnchorMissingError):
            raise JournalError(f"{journal.path} is not a journal that lost only its anchor: "
                               f"{journal.problem or 'its anchor is there'}")
        ledger_id = journal._store.ledger_id
        assert ledger_id is not None
        try:
            create_anchor(journal.path, ledger_id, journal.format_version, journal.last_lsn,
                          journal.head_at(journal.last_lsn).digest)
        except OSError as error:
            raise os_error(journal.path, error) from error
        return journal.last_lsn
    finally:
        journal.close()
