"""The anchor: a small file beside `data.mdb` that says a ledger lives here, and how far it got.

LMDB keeps everything, its own bookkeeping included, in `data.mdb`. If that file is lost,
emptied, truncated or damaged, nothing in it can be trusted to say so, and LMDB would
happily create a fresh, empty database in its place. The anchor survives that: it is
written when the ledger is created (or, for a ledger made before anchors existed, with
its first commit after this version opens it), and it holds

- the ledger's id, also stored in `data.mdb`, so a data file from another ledger is
  refused;
- the journal's format version;
- the highest LSN known to be durable, and the first 12 bytes of the hash chain's digest
  at it (`journal._chain`). The journal writer refreshes both after each group commit,
  once the commit is on disk and before any caller hears of it. A journal found ending
  below that LSN has lost acknowledged records (for example a damaged meta page made LMDB
  open an older snapshot); one whose record there has another digest holds another
  history (the data file of a copy of this ledger that went on elsewhere, copied back):
  both are reported, never served. (An anchor written before the digest was kept has
  zeros there: its LSN is checked alone.)
- the LMDB transaction id (its low 32 bits) of the last commit whose flush returned, records
  or not: a commit it names was whole, so damage found in it is damage, never a commit the
  machine cut off in its flush (`journal._unfinished`).

The refresh is one `pwrite` of 64 bytes into a file that already has its blocks, with no
fsync: a process crash cannot lose it (the page cache keeps it), and a power loss can only
leave an older LSN and transaction, which are weaker but still true bounds. The file holds two copies,
each with its own CRC-32, written alternately (as LMDB writes its two meta pages), so a
write torn by a power loss leaves the other copy whole. Creation writes a temporary file,
fsyncs it and renames it into place.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import struct
import uuid
import zlib
from dataclasses import dataclass

from journal._errors import JournalCorruptedError, os_read_error

ANCHOR_FILE = "tally.anchor"
_MAGIC = b"TALLYANC"
_LAYOUT = 1
_SLOT = struct.Struct(">8sHHI16sQQ12s")  # magic, layout, format version, txnid, ledger id, LSN, generation, digest
TXNID_MASK = 0xFFFFFFFF
"""The anchor keeps a transaction id's low 32 bits (in a field that was reserved, 0, before)."""
DIGEST_BYTES = 12
_NO_DIGEST = bytes(DIGEST_BYTES)
_CRC = struct.Struct(">I")
SLOT_BYTES = _SLOT.size + _CRC.size
assert SLOT_BYTES == 64, SLOT_BYTES


@dataclass(frozen=True)
class AnchorState:
    ledger_id: bytes
    """16 random bytes, made when the ledger is created."""
    format_version: int
    durable_lsn: int
    """A lower bound of the journal's durable end."""
    generation: int
    """Counts the anchor's writes: the copy with the higher one is the newer."""
    digest: bytes = b""
    """The first `DIGEST_BYTES` of the chain's digest at `durable_lsn` (empty: not known)."""
    txnid: int = 0
    """The low 32 bits of the LMDB transaction id of the last commit whose flush returned, with
    or without records (0: not known; an anchor written before it was kept has 0 there). It
    tells a commit the machine cut off in its flush from one that was whole and was damaged
    since (`journal._unfinished`)."""

    def other_history(self, digest: bytes, where: str) -> JournalCorruptedError | None:
        """The damage of a data file whose record at `durable_lsn` carries the chain's `digest`
        (as stored), if that is not the digest this anchor saw made durable there: the file
        holds another history (an open refuses it, `Journal._check_anchor_digest`; a rescue
        copies nothing of it, `journal._rescue_scratch`). None if it is."""
        if digest[:DIGEST_BYTES] == self.digest:
            return None
        return JournalCorruptedError(  # (no `lsn`: as for another ledger's file, nothing in it is this ledger's to copy)
            f"the record at LSN {self.durable_lsn} is not the one this directory's anchor saw made durable there "
            f"(the chain's digest at it begins {digest[:DIGEST_BYTES].hex()}, the anchor's {self.digest.hex()}): the "
            "data file holds another history than the one written here (a copy of this ledger that went on "
            "elsewhere, copied back?), or it is damaged", where=where)


def new_ledger_id() -> bytes:
    return uuid.uuid4().bytes


def _slot(state: AnchorState) -> bytes:
    body = _SLOT.pack(_MAGIC, _LAYOUT, state.format_version, state.txnid & TXNID_MASK, state.ledger_id,
                      state.durable_lsn, state.generation, state.digest or _NO_DIGEST)
    return body + _CRC.pack(zlib.crc32(body))


def _parse(data: bytes) -> AnchorState | None:
    body = data[: _SLOT.size]
    if len(data) != SLOT_BYTES or _CRC.unpack_from(data, _SLOT.size)[0] != zlib.crc32(body):
        return None
    magic, layout, version, txnid, ledger_id, lsn, generation, digest = _SLOT.unpack(body)
    if magic != _MAGIC or layout != _LAYOUT:
        return None
    return AnchorState(ledger_id, version, lsn, generation, b"" if digest == _NO_DIGEST else digest, txnid)


ASIDE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
"""How `open_aside` opens a file written aside and renamed into place: never waiting on what
is there (a FIFO), never following it (a link), and not truncating it until it is known to be
a file of no other name."""


def open_aside(path: str) -> int:
    """A descriptor of the empty file at `path`, to be written and then renamed into place (the
    seal's, the anchor's): made if missing; one left there from before is truncated if it is a
    regular file with no other name. Anything else there is an `OSError` naming it: a FIFO
    (never waited on), a link (never followed), a directory, or a hard link to a file that has
    another name (never truncated: that file would lose its bytes)."""
    fd = os.open(path, ASIDE_FLAGS, 0o644)
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1:
            raise OSError(errno.EMLINK, "a file Tally writes aside is found there with another name, or is no "
                                        "regular file: left as it is", path)
        os.ftruncate(fd, 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


LOCK_FILE_REMEDY = "with no process using the ledger, remove it, and the next open makes it anew"
"""What to do about a lock file (the directory's, LMDB's) that is no regular file: it holds no
history, so removing it mends the ledger."""


def open_regular(path: str, what: str, flags: int = os.O_RDONLY, *,
                 remedy: str = "") -> tuple[int, os.stat_result]:
    """A descriptor of the regular file at `path`, opened with `flags` (by default for reading;
    with `os.O_CREAT`, made if missing), and what `fstat` said of it once open (its size, its
    identity: the caller need not look again). The file is looked at twice, no more: by its
    path before it is opened (opening some devices acts on them), then by the descriptor (it
    may have been replaced since). Anything but a regular file there (a FIFO, a device, a
    directory: what no open should block on, nor read without end) is `JournalCorruptedError`
    naming it, "`what` is not a regular file" and `remedy` (what to do, if anything); a
    missing file (without `os.O_CREAT`) `FileNotFoundError`; other errors `OSError`."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        if not flags & os.O_CREAT:
            raise
        regular = True
    if regular:
        fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC, 0o644)
        try:
            found = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISREG(found.st_mode):
            return fd, found
        os.close(fd)  # (replaced since it was looked at)
    raise not_regular(path, what, remedy)


def not_regular(path: str, what: str, remedy: str = "") -> JournalCorruptedError:
    """The damage `open_regular` names where `path` is no regular file (`what`, `remedy`: as
    there): also said by a reader that only looks at a file it does not open."""
    return JournalCorruptedError(f"{what} is not a regular file{remedy}", where=path)


def read_small_file(path: str, what: str, limit: int) -> bytes:
    """At most `limit` bytes of the regular file at `path` (`what`: as `open_regular` says it);
    raises as `open_regular`."""
    fd, _ = open_regular(path, what)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def read_anchor(directory: str) -> AnchorState | None:
    """The anchor of `directory`, or None if it has none. A copy that fails its check is
    one a power loss tore mid-write; the other is used. Both failing is damage."""
    path = os.path.join(directory, ANCHOR_FILE)
    try:
        data = read_small_file(path, "the anchor", 2 * SLOT_BYTES + 1)  # (a directory, a FIFO, a device: damage)
    except FileNotFoundError:
        return None
    except OSError as error:
        raise os_read_error(error, path) from error
    copies = [_parse(data[i * SLOT_BYTES : (i + 1) * SLOT_BYTES]) for i in range(2)]
    valid = [copy for copy in copies if copy is not None]
    if len(data) != 2 * SLOT_BYTES or not valid:
        raise JournalCorruptedError(
            f"the anchor file is damaged ({len(data)} bytes, {len(valid)} of its 2 copies intact): "
            "it is what says this directory holds a ledger, and how far its journal got",
            where=path,
        )
    return max(valid, key=lambda copy: copy.generation)


def create_anchor(directory: str, ledger_id: bytes, format_version: int, durable_lsn: int = 0,
                  digest: bytes = b"") -> AnchorState:
    """Write a new anchor durably (temporary file, fsync, rename, fsync of the directory);
    `digest`: the chain's at `durable_lsn` (`AnchorState.digest`), if known. Raises `OSError`
    (naming the temporary file when it is not one of its own: `open_aside`)."""
    state = AnchorState(ledger_id, format_version, durable_lsn, 1, digest[:DIGEST_BYTES])
    write_aside(os.path.join(directory, ANCHOR_FILE), _slot(state) + _slot(state))
    return state


def write_aside(target: str, data: bytes) -> None:
    """Write `data` as the file `target`, durably and whole or not at all: into `target.new`
    (`open_aside`), synced, renamed into place, the directory synced. Raises `OSError`, naming
    the file aside when it is anything but a regular file of its own (left as it is); one it
    made is removed when it cannot be written or renamed (a full disk)."""
    aside = target + ".new"
    fd = open_aside(aside)
    try:
        try:
            view = memoryview(data)
            while view:  # (a write may be short)
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(aside, target)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(aside)
        raise
    sync_directory(os.path.dirname(target) or ".")


def sync_directory(directory: str) -> None:
    """fsync a directory, so the names made or renamed in it are durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Anchor:
    """An open anchor that the journal writer advances. Writer thread only."""

    def __init__(self, directory: str, state: AnchorState) -> None:
        self.state = state
        self._fd = os.open(os.path.join(directory, ANCHOR_FILE), os.O_WRONLY | os.O_CLOEXEC)

    def advance(self, durable_lsn: int, digest: bytes, txnid: int) -> None:
        """Record that every record up to `durable_lsn` is on disk, the chain's digest there
        `digest`, and that the commit of LMDB transaction `txnid` was flushed whole (one
        pwrite, no fsync)."""
        state = self.state
        txnid &= TXNID_MASK
        if durable_lsn < state.durable_lsn or (durable_lsn == state.durable_lsn and txnid == state.txnid):
            return
        if durable_lsn == state.durable_lsn:  # a commit of no record: only its id is news
            digest = state.digest
        state = AnchorState(state.ledger_id, state.format_version, durable_lsn, state.generation + 1,
                            digest[:DIGEST_BYTES], txnid)
        os.pwrite(self._fd, _slot(state), (state.generation % 2) * SLOT_BYTES)
        self.state = state

    def close(self) -> None:
        """Flush the anchor to disk (once, at close) and close it."""
        try:
            os.fsync(self._fd)
        finally:
            os.close(self._fd)
