"""The names a journal gives its files and LMDB databases, in one place."""

from __future__ import annotations

DATA_FILE = "data.mdb"
"""LMDB's data file: a directory that has one holds a journal."""
LMDB_LOCK_FILE = "lock.mdb"
"""LMDB's reader table, made before the data file."""
STAGING_DIR = ".tally-new"
"""Where a new data file is made, before it is renamed into the ledger directory."""
SALVAGE_STAGING_PREFIX = ".salvaging-"
REPLAY_STAGING_PREFIX = ".replaying-"
COPY_STAGING_PREFIXES = (SALVAGE_STAGING_PREFIX, REPLAY_STAGING_PREFIX)
"""Where `tally recover --salvage` and `tally replay` build their copy inside the directory
given them (`.salvaging-XXXXXXXX`), moving its files up once it is whole: one left there means a
copy was cut short, and the directory is not yet a ledger."""

RECORDS_DB = b"records"
META_DB = b"meta"
FORMAT_KEY = b"format_version"
"""In the meta database: the journal's format version, as decimal digits."""
LEDGER_ID_KEY = b"ledger_id"
"""In the meta database: the ledger's id, which its anchor holds too."""
COMMIT_MARK_KEY = b"commit_mark"
"""In the meta database: the LMDB transaction id of the commit that wrote it, then the shape
of every other database that commit made, decimal numbers apart by spaces
(`journal._marks.commit_mark`). Every commit writes it, so the snapshot a meta page names can
be told from an older one under it, or from one whose catalog is an older tree's
(`journal._unfinished`)."""
META_KEYS = frozenset({FORMAT_KEY, LEDGER_ID_KEY, COMMIT_MARK_KEY})
"""Every key the meta database holds (a format 1 ledger only the first): any other is damage."""
