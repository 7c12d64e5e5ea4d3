"""The scratch journal a rescue (`journal._rescue`) writes what it reads into, a leaf at a time,
and the anchor's digest checked on the way (`Scratch`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lmdb

from journal._anchor import AnchorState
from journal._check import expected_databases
from journal._errors import JournalCorruptedError
from journal._format import GENESIS, key_lsn, lsn_key, unframe_chained
from journal._limits import DBS_MAX, RESCUE_MAP_BYTES_SPARE, RESCUE_MAP_FILES
from journal._marks import commit_mark, marked_databases
from journal._names import COMMIT_MARK_KEY, FORMAT_KEY, LEDGER_ID_KEY, META_DB, RECORDS_DB

LSN_KEY_BYTES = len(lsn_key(0))
"""Every key of the records: an LSN (`journal._format.lsn_key`)."""


def chain_digest_at(lsn: int, stored: bytes) -> bytes | None:
    """The chain's digest at the record `stored` at `lsn` (`GENESIS` for an unchained one, of
    formats 1-3: the chain is empty there, as `Journal.head_at` says for the open's check of
    the anchor), or None if the record fails its checksum (the audit's to name)."""
    try:
        digest = unframe_chained(lsn, stored)[0]
    except JournalCorruptedError:
        return None
    return GENESIS if digest is None else digest


class Foreign(Exception):
    """The records are another history's (`Scratch._check_anchor_digest`): raised through the
    walk, which goes on past damage in a page (a `JournalCorruptedError`), to `rescue`."""

    def __init__(self, damage: JournalCorruptedError) -> None:
        super().__init__(str(damage))
        self.damage = damage


class Scratch:
    """The new journal a rescue writes what it reads into: one LMDB write transaction, committed
    when the block ends whole (aborted if not), holding the records as stored, the meta
    database's format and ledger id, its indexes empty, and a commit mark. Options as
    `journal._store`'s, but `sync=False` and `metasync=False` with no flush of ours: only this
    process reads it back, through the page cache, and it is removed once copied; its map is
    sized once, twice the damaged file (its records fit in it)."""

    def __init__(self, scratch: str, file_bytes: int, anchor: AnchorState | None, data_file: str) -> None:
        self.scratch = scratch
        self.map_size_bytes = RESCUE_MAP_FILES * file_bytes + RESCUE_MAP_BYTES_SPARE
        self.anchor = anchor
        self.data_file = data_file
        self.records = 0
        self.first_missing_lsn: int | None = None
        """The first LSN not read before one that was (None: none yet)."""
        self.next_lsn = 1
        """The LSN after the last one written."""
        self.durable_key = (lsn_key(anchor.durable_lsn) if anchor is not None and anchor.digest and anchor.durable_lsn
                            else None)
        self.anchor_checked = False
        """The record at the anchor's durable LSN was read, and carries its digest."""
        self._txn: Any = None

    def __enter__(self) -> Scratch:
        os.mkdir(self.scratch)
        self._env = lmdb.open(self.scratch, subdir=True, map_size=self.map_size_bytes, max_dbs=DBS_MAX, sync=False,
                              metasync=False, lock=True, writemap=False, meminit=True, create=True)
        return self

    def begin(self, format_version: int, ledger_id: bytes | None, index_names: Sequence[str]) -> None:
        self._txn = self._env.begin(write=True)
        self._dbs = {name: self._env.open_db(name, txn=self._txn, create=True)
                     for name in sorted(expected_databases(index_names))}
        self._txn.put(FORMAT_KEY, str(format_version).encode(), db=self._dbs[META_DB])
        if ledger_id is not None:
            self._txn.put(LEDGER_ID_KEY, ledger_id, db=self._dbs[META_DB])
        self._cursor = self._txn.cursor(db=self._dbs[RECORDS_DB])

    def leaf(self, _name: bytes, keys: list[bytes], values: list[bytes]) -> None:
        """A leaf of the records, checked by the walk: written as it is, after the one before."""
        if self.durable_key is not None and keys[0] <= self.durable_key <= keys[-1]:
            self._check_anchor_digest(keys, values)
        if key_lsn(keys[0]) != self.next_lsn and self.first_missing_lsn is None:
            self.first_missing_lsn = self.next_lsn
        self._cursor.putmulti(zip(keys, values, strict=True), append=True)
        self.records += len(keys)
        self.next_lsn = key_lsn(keys[-1]) + 1

    def _check_anchor_digest(self, keys: list[bytes], values: list[bytes]) -> None:
        """The record at the anchor's durable LSN must carry the digest the anchor saw there (as
        an open checks it: `Journal._check_anchor_digest`); else the file holds another history,
        and nothing in it is this ledger's to copy. (One that fails its checksum is left to the
        audit, which names it: nothing from it on is copied.)"""
        anchor = self.anchor
        assert anchor is not None
        if self.durable_key not in keys:
            return
        digest = chain_digest_at(anchor.durable_lsn, values[keys.index(self.durable_key)])
        if digest is None:
            return
        other = anchor.other_history(digest, self.data_file)
        if other is not None:
            raise Foreign(other)
        self.anchor_checked = True

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        try:
            if kind is None:
                dbs = self._dbs
                self._txn.put(COMMIT_MARK_KEY, commit_mark(self._txn, [dbs[name] for name in marked_databases(dbs)]),
                              db=dbs[META_DB])
                self._txn.commit()
            elif self._txn is not None:
                self._txn.abort()
        finally:
            self._env.close()
