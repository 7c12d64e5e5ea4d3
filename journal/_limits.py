"""Every limit of the journal layer, defined once (house style 6)."""

from __future__ import annotations

FORMAT_VERSION = 4
"""Version of the on-disk layout. Written once at creation, checked on every open.
Version 2 adds a CRC-32 to every index entry and a ledger id (and the anchor file).
Version 3 has version 2's layout; its records may be of the kinds pending and linked
transfers brought (the coordinator's), which a release that reads only 1 and 2 must
refuse by its version rather than meet as damage. Version 4 has version 3's layout, and
every one of its records is chained (record version 2, `journal._format`): an unchained
record anywhere in it is a break of the chain."""

FORMAT_VERSIONS_READ = (1, 2, 3, 4)
"""Versions this code opens. A version-1, -2 or -3 ledger keeps its format (a version-1 one:
its index entries have no checksums, and it gets its ledger id and anchor with its first
commit here); the records written into it from now on may be of the new kinds, and are
chained, from `GENESIS` at the first of them: the records before it predate the chain."""

LSN_MAX = 2**64 - 1
"""The largest LSN a record's key holds (8 bytes, big-endian: `_format.lsn_key`). A position
past it is no position at all: a reader refuses it, where one past the journal's end (still to
come) reads as nothing yet."""

CHAIN_FROM_FORMAT = 4
"""The first format whose records are all chained, from LSN 1."""

SNAPSHOT_TRIES_MAX = 100
"""Times an open retries checking a snapshot that a live writer elsewhere moved past."""

RACE_TRIES_MAX = 5
"""Times an open reads the meta pages before it calls an inconsistency damage (a read racing
a live writer in another process can see a page half written)."""

RACE_WAIT_S = 0.002
"""Between those reads."""

RECORD_VERSION = 2
"""Version byte of every record written (chained: it carries its chain digest); checked on
every read."""

RECORD_VERSION_UNCHAINED = 1
"""Version byte of the records formats 1-3 wrote before the chain; still read."""

MAP_SIZE_BYTES_DEFAULT = 256 * 1024 * 1024
"""Initial LMDB map size. The data file is sparse, so this costs address space, not disk."""

MAP_SIZE_BYTES_MAX = 1 << 40
"""The map doubles when full, up to this bound (1 TiB)."""

DBS_MAX = 8
"""Named LMDB databases: records, meta and up to six indexes supplied by the caller."""

READERS_MAX = 1024
"""Concurrent read transactions (one per thread reading at the same instant)."""

BATCH_RECORDS_MAX = 8192
"""Most records one group commit writes in one transaction."""

BEHIND_PAIRS_MIN = 4096
"""Fewest index entries written behind their record (`Writer.append_block`'s `behind`: a
checkpoint's) that one group commit after it carries, while any wait; the slices keep a group commit
short beside the one big transaction they were (~100,000 entries, ~0.1 s, every later record
waiting behind it)."""

BEHIND_PAIRS_PER_RECORD = 4
"""And at least this many a record the group commit writes: the slices drain at least twice
as fast as commits of plain transfers make entries (two a transfer)."""

BEHIND_SLICES_MAX = 16
"""And at least this share of all that waits (1/16): however many index rows a record makes
(a linked chain's legs, a post's hold rows), what waits goes in within about this many group
commits, while the next checkpoint comes tens of thousands of records later."""

PENDING_RECORDS_MAX = 65536
"""Most records waiting for the writer; `append` waits (bounded) beyond this."""

APPEND_WAIT_S_MAX = 30.0
"""Longest `append` waits for room in the pending queue before raising."""

WRITER_IDLE_WAIT_S = 0.1
"""How long the idle writer sleeps before re-checking for shutdown."""

GROW_WAIT_S_MAX = 30.0
"""How often a full map waiting for its readers to close logs that it is still waiting."""
CLOSE_WAIT_S_MAX = 30.0
"""Longest `close` waits for the writer to drain what was appended."""

COMMIT_DELAY_S_MAX = 0.001
"""Longest the writer waits for callers released by the previous commit to rejoin."""

READER_CHECK_S = 1.0
"""How often, at most, the journal writer clears the LMDB reader slots of processes that died
while reading (`tally verify` killed, a read-only ledger's process SIGKILLed): a slot left
behind pins the snapshot it read, and every page written since stays in the data file, which
grows without bound while any process keeps the ledger open. LMDB clears them only when its
table is full, or when asked."""

DATA_FILE_LOOK_S = 0.1
"""How often, at most, a group commit first looks whether the data file at the ledger's path is
still the one it opened (`Store.in_place`). Not every commit: the look is a system call, which
lets go of the interpreter, and taking it back beside busy threads cost single transfers a
sixth of their rate beside batches (`bench/README.md`). So a ledger whose directory is removed
while open acknowledges at most this long of commits into files no path reaches."""

READ_CHUNK_RECORDS = 128
"""Records (or index entries) a thread reads between two calls of the function it gave
`Journal.reading_in_chunks`: about 1-2 ms of reading and decoding transfers, so a thread that
must not wait longer than that for the interpreter (an event loop) waits about that long."""

READ_PAUSE_S = 0.0002
"""How long a thread reading for a caller of its own lets go of the interpreter between two
chunks of its reads once it has held it for the switch interval (`journal._chunks.Pause`, what
`Journal.reading_in_chunks` calls by default): long enough for a thread waiting for the GIL to
wake and take it, which a switch alone does not let it do (`journal._chunks`). Measured beside
16 threads of single transfers (`bench/README.md`): letting go every chunk instead read a page
of 10,000 transfers alone ~29% slower; every 2 ms, 15%; every 5 ms (the switch interval), 7%."""

ASIDE_ENTRIES_MIN = 400_000
"""The fewest entries the last trees of a data file must hold for a second process to walk
them while the first walks the others (`journal._walk_aside`): ~0.2 s of walk, where the
second process's start costs ~0.1 s."""

ASIDE_WAIT_S = 60.0
"""How much longer than it has already run the second page walk is waited for, once this
process's own half is done, before its trees are walked here instead (`journal._walk_aside`)."""

SEEN_ANCHOR_PAUSES_S = (0.0002, 0.0005, 0.001, 0.002)
"""A read-only reader that sees a commit its writer's anchor does not yet name as flushed looks
at the anchor again after each of these pauses (~4 ms in all: a flush takes about one) before it
flushes the data file itself (`journal._seen`)."""

RESCUE_RECORD_BYTES_MIN = 16
"""No record takes less of a page than this (an 8-byte key and a node's header): a records
database can hold no more entries than its file's bytes over this, whatever its record says
(`journal._rescue`, which bounds what it lists as lost by it)."""

RESCUE_MAP_FILES = 2
RESCUE_MAP_BYTES_SPARE = 64 << 20
"""A rescue's scratch journal maps `RESCUE_MAP_FILES` times the damaged file, and this more:
its records, which the damaged file holds, fit in it with LMDB's own pages."""
