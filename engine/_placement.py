"""Where an account lives in a sharded ledger, the manifest that fixes it, and the reserved names.

A sharded ledger's directory holds `shard-0` .. `shard-{N-1}` (each an ordinary Tally ledger)
and `tally-shards.json`, the manifest: the shard count, the placement rule and the format
version. It is written once, atomically (a temporary file, fsynced, linked into place, the
directory fsynced), by the first open once every shard's ledger is made; every later open reads
it and refuses another shard count (`ShardCountMismatch`: resharding is out of scope), and a
shard whose directory is missing or empty (`NotALedger`: opening it would make it anew, empty,
and lose what it held).

Placement: an account lives on shard `int(sha256(key)) % N`, where `key` is the account id, or
the `placement` key given to `create_account` (accounts that share a key share a shard, so
their transfers stay local).

Reserved names: the ids a cross-shard transfer's steps use are the user's transfer id `T`
followed by `SEPARATOR` ("\\x1f") and a step name, and the accounts the protocol keeps on each
shard start with `SEPARATOR`; so no user id may contain it (`check_user_id`), and a user's
transfer id is at most `USER_ID_LENGTH_MAX` characters (room for the longest step suffix: a
credit's names the source's shard too, `credit_id`). A prepare's metadata is the protocol's,
under keys that start with `SEPARATOR` too: `DESTINATION_KEY` (the user's destination) and
`METADATA_DIGEST_KEY` (a digest of the user's metadata, when given), so that the prepare's own
idempotency check refuses a retry that names another destination or other metadata
(`engine._shard_steps.prepare_row`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from coordinator import ID_LENGTH_MAX, InvalidRequest, LedgerError, PendingTransferNotFound, check_id, shown

SEPARATOR = "\x1f"
CREDIT, POST, VOID = SEPARATOR + "credit", SEPARATOR + "post", SEPARATOR + "void"
DESTINATION_KEY, METADATA_DIGEST_KEY = SEPARATOR + "destination", SEPARATOR + "metadata-sha256"
MANIFEST_NAME = "tally-shards.json"
MANIFEST_FORMAT = 1
TEMPORARY_PREFIX = MANIFEST_NAME + ".tmp-"
PLACEMENT_RULE = "sha256-mod"
SHARDS_MAX = 1024
USER_ID_LENGTH_MAX = ID_LENGTH_MAX - max(len(CREDIT) + len(str(SHARDS_MAX - 1)), len(POST), len(VOID))


def credit_id(transfer_id: str, source_shard: int) -> str:
    """The id of a cross-shard transfer's credit on its destination's shard: the user's id,
    the step, and the source's shard. A transfer id is claimed per source shard, so two
    transfers from two shards may share one toward a third: their credits must not."""
    return transfer_id + CREDIT + str(source_shard)


class ShardCountMismatch(LedgerError):
    """`ShardedLedger.open` asked for a shard count other than the one the directory's
    manifest fixes. Nothing was opened; open it with the manifest's count (resharding is not
    supported)."""

    code = "shard_count_mismatch"


class CrossShardRefused(LedgerError):
    """A request whose accounts live on different shards, of a kind that only runs within one
    shard: a linked chain, or a pending transfer. Nothing was written and the id is not
    consumed. Colocate the accounts with `create_account(..., placement=KEY)`."""

    code = "cross_shard_refused"


class CrossShardAborted(LedgerError):
    """A cross-shard transfer was in doubt after a crash (its caller died between its steps)
    and recovery aborted it: nothing moved, and its id is consumed (a retry raises this again)."""

    code = "cross_shard_aborted"


def shard_of(key: str, shards: int) -> int:
    """The shard of placement key `key` among `shards`: stable across processes and versions."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % shards


def check_user_id(value: object, what: str, length_max: int = ID_LENGTH_MAX) -> str:
    """`check_id`, and no `SEPARATOR` in it, and at most `length_max` characters: else
    `InvalidRequest`."""
    checked = check_id(value, what)
    if SEPARATOR in checked or len(checked) > length_max:
        raise InvalidRequest(f"{what} must have at most {length_max} characters and no \\x1f (reserved by "
                             f"the sharded ledger's steps), got {checked!r}")
    return checked


def clearing_to(peer: int, currency: str) -> str:
    """On shard a: the account a cross-shard transfer toward shard `peer` is held for, then posted to."""
    return f"{SEPARATOR}clearing-to-{peer}{SEPARATOR}{currency}"


def clearing_from(peer: int, currency: str) -> str:
    """On shard b: the account credits from shard `peer` come from (no overdraft limit)."""
    return f"{SEPARATOR}clearing-from-{peer}{SEPARATOR}{currency}"


def fence(currency: str) -> str:
    """On each shard: the empty account (overdraft limit 0) whose refused transfer fences a
    credit's id when recovery aborts an in-doubt transfer."""
    return f"{SEPARATOR}fence{SEPARATOR}{currency}"


def shard_mark(index: int) -> str:
    """In shard `index`'s ledger: the empty account that says which shard it is (made with the
    ledger, or by the first open of a ledger made before marks), so a shard's directory swapped
    with another's, or restored into the wrong place, is refused at open, not served."""
    return f"{SEPARATOR}shard-{index}"


def peer_of(clearing_account: str) -> tuple[int, str] | None:
    """(peer shard, currency) of a `clearing_to` account id; None for any other id."""
    prefix = f"{SEPARATOR}clearing-to-"
    if not clearing_account.startswith(prefix):
        return None
    peer, _, currency = clearing_account[len(prefix):].partition(SEPARATOR)
    return int(peer), currency


def read_manifest(path: Path, shards: object) -> bool:
    """Check `shards` against the manifest in `path`: True if it has one, False if `path` is
    a sharded ledger not made yet (missing, empty, or holding only what an open that crashed
    before writing the manifest left: its temporary files and `shard-i` directories, whose
    ledgers `engine._shard.Shard.create` checks are empty). Raises `InvalidRequest` for a bad
    `shards`, a path that is not a directory, a directory that holds something else, or a
    foreign or damaged manifest; `ShardCountMismatch` if `shards` differs from the manifest's."""
    if type(shards) is not int or not 1 <= shards <= SHARDS_MAX:
        raise InvalidRequest(f"shards must be an int in 1..{SHARDS_MAX}, got {shown(shards)}")
    manifest = path / MANIFEST_NAME
    try:
        if path.exists() and not path.is_dir():
            raise InvalidRequest(f"{path} is not a directory: not a sharded ledger")
        if not manifest.exists():
            if path.exists() and any(not _made_by_an_open(entry.name) for entry in path.iterdir()):
                raise InvalidRequest(f"{path} is not empty and holds no {MANIFEST_NAME}: not a sharded ledger")
            return False
    except OSError as error:
        raise InvalidRequest(f"{manifest} is not a readable sharded-ledger manifest: {error}") from error
    count = manifest_shards(path)
    if count is None:  # gone since: as if never made
        return False
    if count != shards:
        raise ShardCountMismatch(f"{path} holds {count} shards (its manifest says so), not {shards}: open it "
                                 f"with shards={count}")
    return True


def manifest_shards(path: Path) -> int | None:
    """The shard count the manifest in directory `path` fixes, or None if it holds none.
    Raises `InvalidRequest` for a foreign or damaged manifest."""
    manifest = path / MANIFEST_NAME
    try:
        found = json.loads(manifest.read_text())
        count, rule, version = found["shards"], found["placement"], found["format"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InvalidRequest(f"{manifest} is not a readable sharded-ledger manifest: {error}") from error
    if version != MANIFEST_FORMAT or rule != PLACEMENT_RULE or type(count) is not int:
        raise InvalidRequest(f"{manifest} has format {version!r}, placement {rule!r} and shards {count!r}; this "
                             f"version reads format {MANIFEST_FORMAT}, placement {PLACEMENT_RULE!r} and an int")
    return count


def write_manifest(path: Path, shards: int) -> None:
    """Write the manifest of a sharded ledger of `shards` shards in `path`, once every shard's
    ledger is made (`ShardedLedger.open`); `read_manifest`'s errors if another process wrote
    one meanwhile that differs."""
    path.mkdir(parents=True, exist_ok=True)
    _write_once(path / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "shards": shards, "placement": PLACEMENT_RULE})
    read_manifest(path, shards)


def _made_by_an_open(name: str) -> bool:
    """Whether an entry of a sharded ledger's directory may be left by an open that made it
    and crashed before writing the manifest."""
    return name.startswith(TEMPORARY_PREFIX) or re.fullmatch(r"shard-(0|[1-9][0-9]*)", name) is not None


def _write_once(target: Path, content: dict[str, object]) -> None:
    """Write `content` as JSON to `target` unless it exists, so a crash leaves either no file or
    the whole one, and of two processes creating it at once one writes it and the other reads
    it (a temporary file of its own, linked into place: `link` never replaces)."""
    temporary = target.with_name(f"{TEMPORARY_PREFIX}{os.getpid()}-{os.urandom(4).hex()}")
    try:
        with open(temporary, "w") as file:
            json.dump(content, file)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, target)
        except FileExistsError:
            return  # another process wrote it first: the caller reads that one
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def prepare_not_pending(pending_id: str) -> PendingTransferNotFound:
    """The refusal of a user's post or void naming a cross-shard transfer's first step: the
    protocol's hold, never a user's pending transfer."""
    return PendingTransferNotFound(f"{pending_id!r} is a transfer across shards, not a pending transfer")
