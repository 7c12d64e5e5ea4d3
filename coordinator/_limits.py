"""Every limit of the coordinator, defined once."""

from __future__ import annotations

AMOUNT_MAX = 2**63 - 1
"""Largest amount, overdraft limit, and magnitude of any balance."""

ID_LENGTH_MAX = 128
"""Longest account or transfer id, in characters."""

CURRENCY_LENGTH_MAX = 16

KEY_BYTES_MAX = 400
"""Index keys longer than this (in UTF-8) are replaced by a 32-byte digest (LMDB keys stop at 511)."""

CLAIM_STRIPES = 64
"""Locks striping the in-flight transfer ids; a power of two."""
CLAIMS_SWEEP_MIN = 4096
"""Tickets in flight past which a claim first looks for those done that no caller released
(`Claims._sweep`: a caller that timed out never comes back for its ticket); after a sweep, twice
what it left, so a sweep is paid for by as many claims as it looks at."""

INDEX_KEYS_PER_SNAPSHOT = 4096
"""Transfer ids read per read transaction by the claims' warm-up (see `Claims._warm_up`), and
checked against their records, opening a ledger whose index entries carry no checksum
(`check_ids_against_records`)."""
INFLIGHT_TRANSFERS_MAX = 100_000
"""Transfers admitted into the protocol at once; beyond it callers wait (bounded)."""

TIMEOUT_S_DEFAULT = 30.0
"""Default bound on every wait a caller makes (decision, durability, replies)."""

CHECKPOINT_RECORDS_INTERVAL = 50_000
"""Records between two checkpoints of the account projection (bounds the replay on open)."""

CHECKPOINT_ACCOUNTS_MAX = 20_000
"""Accounts changed since the last checkpoint at which the next is due, whatever the
checkpoint interval: a checkpoint's rows, built under the sequencer lock, cost what changed
(and as much again of the sweep), so this bounds the pause it makes."""

CHECKPOINT_SWEEP_MIN = 1_000
"""Fewest unchanged accounts a checkpoint holds rows of (its sweep, see
`coordinator._records`): opening walks back at most about (accounts / this) checkpoints."""

CHECKPOINT_PENDING_SWEEP_MIN = 1_000
"""Fewest open pending transfers, beyond those opened since the last, a checkpoint holds rows
of (its sweep of them, see `coordinator._records`, CHECKPOINT5); with no more open than that
and the ones opened since, it holds every one."""

CHECKPOINT_PENDING_CHAIN = 16
"""A checkpoint's sweep of the open pending transfers takes at least 1/this of them, so an
open walks back about this many checkpoints for them at most, however few change."""

CLOSE_CHECKPOINT_PENDING = 1_000
"""Closing a ledger journals a checkpoint of every open pending transfer (and of the accounts
that changed) when the newest holds only some and more than this many are open: the next
open then reads them from it, not from the chain behind it."""

CLOSE_CHECKPOINT_ROWS = 1.25
"""Closing a ledger journals a checkpoint of every account when an open would otherwise read
more than this many rows an account (`Sequencer.checkpoint_on_close`)."""

UNINDEXED_ENTRIES_MAX = 400_000
"""Entries and hold rows waiting in memory for the checkpoint that indexes them (~50 MB): at
this many a checkpoint is due, whatever the checkpoint interval."""

AGED_AFTER_OPEN_MIN = 100_000
"""Objects an open must have made (tracked by the collector, net, while it is paused: one or
two an account, so about 50,000 accounts and up) before it moves everything young to the
collector's oldest generation (`coordinator._recovery.recover`). A small ledger opened often
must not send the host's young garbage there, where only a full collection frees it."""

CHUNK_REQUESTS_MAX = 256
"""Requests a batch in turn decides per hold of the sequencer lock, journaled as one block:
long enough to amortise taking the lock, short enough that concurrent single transfers
are not kept waiting for a whole batch. (While single transfers arrive beside the lane's
groups, the lane's runner decides `CHUNK_REQUESTS_BESIDE` instead.)"""

CHUNK_REQUESTS_BESIDE = 96
"""Requests a batch in turn decides per chunk while single transfers arrive beside it (the
lane's runner adopted one in this group or the one before: `coordinator._lane.Lane`). Each
step of a single transfer beside a group (its decision, its record's group commit, its
caller's wake-up) waits for the runner to let go of the interpreter, which it does between
two chunks, so a shorter chunk shortens each wait. Beside four threads of batches, 96 took
the singles' p99 from ~64-76 ms to ~48-52 ms, and cost the batches ~7% of their rate there
(the singles get twice as far); 64 took it to ~41-48 ms at ~10% (`bench/README.md`,
"Single transfers beside batches: shorter chunks while they arrive"). Alone, the batches keep the
longer chunk: a chunk of 64 costs ~2% more instructions a transfer."""

TURN_WAIT_S_MAX = 0.2
"""Longest a batch waits for the turns of accounts busy elsewhere (a single transfer's, or
mailbox work) before it takes the mailbox path instead (`coordinator._taking`). A busy turn
is held for a handful of messages, so this is rarely reached."""

LANE_GROUP_REQUESTS_MAX = 8_192
"""Most requests of the batches the lane decides in one run (`coordinator._lane.Lane`)."""

DECIDING_PAUSE_S = 0.0002
"""How long a thread that decides round after round lets go of the interpreter between two
rounds: the lane's runner between two chunks of a group, the combiner between two rounds of
single transfers. Deciding back to back it would hold the GIL for the interpreter's whole
switch interval (5 ms) at a time, and every thread that needs it meanwhile waits that long:
the journal writer back from its fsync, callers woken by a group commit. Letting go for a
moment lets them through; a switch alone (`os.sched_yield`) does not, as the decider takes
the GIL back before a woken thread can. (While single transfers arrive beside the lane's
groups, its runner pauses `BESIDE_PAUSE_S` instead.)"""

BESIDE_PAUSE_S = 0.00005
"""The lane's runner's pause between two chunks while single transfers arrive beside its
group (`CHUNK_REQUESTS_BESIDE`), in place of `DECIDING_PAUSE_S`: pausing that much more often,
the longer pause cost the batches beside the singles ~22% of their rate in chunks of 64, this
one ~10%, and it is still long enough for a thread woken meanwhile to take the interpreter."""

TURN_POLL_S = (0.00005, 0.001)
"""The first and the longest pause between two looks at the turns a batch waits for (the
pause doubles from one to the other)."""

ACCOUNTS_PER_BLOCK_MAX = 1_000
"""Accounts `create_accounts` journals per hold of the sequencer lock, as one block."""

CODE_MAX = 65_535
"""Largest `code` of a transfer or an account (a type the host defines)."""

REFERENCE_LENGTH_MAX = 256
"""Longest `reference` of a transfer, in characters."""

METADATA_KEYS_MAX = 16
METADATA_KEY_LENGTH_MAX = 64
METADATA_VALUE_LENGTH_MAX = 256
"""Metadata: at most this many keys, each a `str` of 1..64 characters, each value a `str` of at
most 256 characters or an `int` in ±(2**63 - 1)."""

TIMEOUT_S_MAX = 2**31 - 1
"""Longest timeout of a pending transfer, in seconds."""

TIMESTAMP_MAX = 2**63 - 1
"""The largest timestamp (nanoseconds since the epoch) a record holds."""

LINKED_LEGS_MAX = 1_000
"""Most transfers in one linked chain (`transfer_linked`)."""

EXPIRY_INTERVAL_S = 0.5
"""How often the ledger looks for pending transfers past their deadline (so one expires
within a second of it)."""

EXPIRY_RECORD_IDS_MAX = 1_000
"""Most pending transfers one expiry record ends (more due make more records)."""

DEADLINES_STALE_SLACK = 1_024
"""Stale deadlines (of pending transfers posted or voided) the sequencer's deadline heap may
hold beyond as many as it holds live ones before it is rebuilt without them
(`Deadlines._compact_deadlines`, a step at a time): so it stays within about three times the
open pending transfers with a deadline, plus this, and a small ledger is not rebuilding it every few posts."""

DEADLINES_DRAIN_STEP = 512
"""Entries of the old deadline heap a compaction moves to the new one each time a record is
queued, plus twice the records, up to three times this in all (`coordinator._deadlines`): up
to ~5 ms a step, where a rebuild in one go paused every transfer 0.13-0.2 s at 300,000 open
pending transfers with a deadline (`bench/README.md`)."""

SNAPSHOT_AGE_S_DEFAULT = 60.0
"""How long a snapshot answers by default (`Ledger.snapshot(max_age_s=...)`)."""

SNAPSHOT_AGE_S_MAX = 3600.0
"""The longest a snapshot may be asked to answer."""

TRANSFERS_PAGE_MAX = 10_000
"""The largest `limit` of a page of transfers (`Ledger.transfers`)."""

EVENTS_PER_READ_MAX = 1_024
"""Records an event reader reads per read transaction (`coordinator._events`): short, so a
follower never holds an LMDB reader open for long (which would stall page reuse and map growth)."""


DURABLE_WAIT_S = 10.0
"""How long a claim waits for the record of an outcome the index holds past the durable LSN
(`coordinator._claims.Claims._durable`): none is there in live operation, where the in-flight
ticket answers until its record is durable; one whose commit's flush failed raises at once."""
