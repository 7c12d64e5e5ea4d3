"""Tally's journal: ordered, checksummed, group-committed records in LMDB.

This layer knows nothing about accounts; it stores records the caller encoded.
"""

from journal._completion import Completion
from journal._crash import ARMED as CRASH_POINT_ARMED
from journal._crash import POINTS as CRASH_POINTS
from journal._crash import crash_point
from journal._errors import (
    JournalAnchorMissingError,
    JournalClosedError,
    JournalCorruptedError,
    JournalError,
    JournalFormatError,
    JournalLockedError,
    JournalNotFoundError,
    JournalTimeoutError,
    JournalWriteError,
)
from journal._chain import ChainHead, ChainReport
from journal._format import GENESIS, lsn_key
from journal._anchor import ANCHOR_FILE, sync_directory
from journal._directory import LOCK_FILE, refuse_foreign, refuse_irregular_lock_file
from journal._journal import Journal, reanchor
from journal._limits import FORMAT_VERSION, LSN_MAX
from journal._names import COPY_STAGING_PREFIXES, LMDB_LOCK_FILE, REPLAY_STAGING_PREFIX, SALVAGE_STAGING_PREFIX
from journal._lmdb_files import files_of
from journal._rescue import Rescued, reads_around, rescuable, rescue, snapshots_vouch
from journal._commits import Behind, IndexPut, IndexPuts

__all__ = [
    "ANCHOR_FILE",
    "Behind",
    "ChainHead",
    "ChainReport",
    "GENESIS",
    "FORMAT_VERSION",
    "LOCK_FILE",
    "COPY_STAGING_PREFIXES",
    "LMDB_LOCK_FILE",
    "REPLAY_STAGING_PREFIX",
    "SALVAGE_STAGING_PREFIX",
    "LSN_MAX",
    "CRASH_POINTS",
    "CRASH_POINT_ARMED",
    "Completion",
    "crash_point",
    "refuse_foreign",
    "refuse_irregular_lock_file",
    "IndexPut",
    "IndexPuts",
    "Journal",
    "JournalAnchorMissingError",
    "JournalClosedError",
    "JournalCorruptedError",
    "JournalError",
    "JournalFormatError",
    "JournalLockedError",
    "JournalNotFoundError",
    "JournalTimeoutError",
    "JournalWriteError",
    "files_of",
    "Rescued",
    "reads_around",
    "rescuable",
    "rescue",
    "snapshots_vouch",
    "lsn_key",
    "reanchor",
    "sync_directory",
]
