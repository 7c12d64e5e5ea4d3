"""Damage a ledger's files the ways disks do, and check that every outcome is a safe one.

    python bench/bench_faults.py [--seed 1] [--sample [--per-kind 3]] [--json out.json] [--walk-aside]

In the spirit of TigerBeetle's storage fault injection. One reference ledger is built
(accounts, transfers, refusals, checkpoints, an overflow record, a free list) and its truth
read: every account, balance and entry, every transfer's outcome, the state hash. Then each
fault is applied to a fresh copy:

- one flipped bit in every kind of page: the two meta pages (every byte), and in branch
  pages, leaf pages, overflow pages and the free list of every database: the page header,
  the node pointers, node headers, keys and values (bodies);
- the data file truncated (to 0 bytes, 1 and 2 pages, half, one page short) or deleted;
- a page zeroed (a lost write); the anchor damaged, deleted, or from another ledger;
- a commit cut off in its flush by a power loss: its meta page on disk, its other pages (each
  alone, then all) as they were before it, with the anchor from before it (the open takes
  back the snapshot before, or finds the commit whole) or from after it (damage).

A child process (forked, so a signal kills only it) then does what users do: `tally verify`,
`Ledger.open`, read everything, retry every transfer with its id, make a new transfer, close,
`tally verify` again. Every outcome must be one of:

- `same`: everything reads as before, retries return their first outcomes, the new transfer
  works, and verify says whole (harmless damage, e.g. in a free page);
- `reported`: the same, but verify names the damage (in a record that nothing read);
- `refused`: a `LedgerError` saying what is damaged, with the data file unchanged;

and never `BAD`: different data, a raw exception, a signal, a hang, a retried transfer
committed twice, a write over damage, or verify saying whole over damage. Each ledger verify
finds damaged is then salvaged (`tally recover --salvage`, `salvaged`): its copy must verify
whole, the damaged ledger be left as it was, and the copy hold exactly the outcomes (transfers
committed, requests refused) decided before some LSN ("all" or "a prefix"; "refused": nothing
could be saved), else `BAD`. `tests/
test_storage_faults.py` runs a sample (`--sample`: a few faults of each kind); the full sweep
is a few thousand faults (minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import LedgerError, Transfer, TransferRequest  # noqa: E402

ACCOUNTS = 120
"""Enough that a checkpoint record outgrows a page and goes to an overflow run."""
TRANSFERS = 700
CHECKPOINT_INTERVAL = 150
CHILD_TIMEOUT_S = 60.0
OUTCOMES = ("same", "reported", "refused", "BAD")
SALVAGED = ("all", "a prefix", "refused", "BAD")
"""What a salvage of a ledger verify finds damaged saves (`salvaged`)."""
PAGE_BYTES = 4096


# --- the reference ledger and its truth ----------------------------------------------------------


def build(path: Path, seed: int) -> list[TransferRequest]:
    """The reference ledger; returns every transfer request made, refused ones included."""
    from engine import Ledger

    rng = random.Random(seed)
    names = [f"acct-{n:02d}" for n in range(ACCOUNTS)]
    requests: list[TransferRequest] = []
    with Ledger.open(path, checkpoint_interval=CHECKPOINT_INTERVAL) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in names:
            ledger.create_account(name, currency="USD")
        ledger.create_account("euro", currency="EUR")
        for n in range(TRANSFERS):
            if n < ACCOUNTS:
                request = TransferRequest(f"fund-{n}", "bank", names[n], 1_000)
            elif n % 97 == 0:
                request = TransferRequest(f"t-{n}", rng.choice(names), "euro", 5)  # refused: currencies differ
            else:
                source, destination = rng.sample(names, 2)
                request = TransferRequest(f"t-{n}", source, destination, rng.randint(1, 900))  # some refused
            requests.append(request)
            if n % 10 == 0:
                ledger.transfer_many(requests[-10:])
            else:
                try:
                    ledger.transfer(request.id, source=request.source, destination=request.destination,
                                    amount=request.amount)
                except LedgerError:
                    pass
    return requests


def read_all(ledger: object, requests: list[TransferRequest]) -> dict:
    """Everything a user can read, as plain values."""
    accounts = ledger.accounts()  # type: ignore[attr-defined]
    return {
        "accounts": [[a.id, a.currency, a.overdraft_limit] for a in accounts],
        "balances": {a.id: list(_fields(ledger.balance(a.id))) for a in accounts},  # type: ignore[attr-defined]
        "entries": {a.id: [list(_fields(e)) for e in ledger.entries(a.id)] for a in accounts},  # type: ignore[attr-defined]
        "transfers": {r.id: _outcome(ledger.get_transfer(r.id)) for r in requests},  # type: ignore[attr-defined]
        "state_hash": ledger.state_hash(),  # type: ignore[attr-defined]
    }


def _fields(value: object) -> tuple:
    return tuple(getattr(value, name) for name in value.__dataclass_fields__)  # type: ignore[attr-defined]


def _outcome(found: Transfer | LedgerError | None) -> list | str | None:
    if isinstance(found, LedgerError):
        return found.code
    return list(_fields(found)) if found is not None else None


# --- the data file, read independently of the code under test -------------------------------------


@dataclass
class Page:
    pgno: int
    database: str
    kind: str
    """"meta", "branch", "leaf" or "overflow"."""
    regions: dict[str, list[int]] = field(default_factory=dict)
    """Byte offsets in the page worth flipping, by region ("header", "pointers", ...)."""


def pages(data: bytes) -> list[Page]:
    """Every meta page and every page reachable from the newer meta, with their regions."""
    found = [Page(n, "", "meta", {"meta": list(range(16, 152))}) for n in (0, 1)]
    metas = [struct.unpack_from("<QQ", data, n * PAGE_BYTES + 136) for n in (0, 1)]  # last page, txnid
    base = (0 if metas[0][1] > metas[1][1] else 1) * PAGE_BYTES + 16 + 24
    free_root = struct.unpack_from("<Q", data, base + 40)[0]
    main_root = struct.unpack_from("<Q", data, base + 48 + 40)[0]
    named: list[tuple[str, int]] = []
    for database, root in (("free list", free_root), ("main", main_root)):
        if root != (1 << 64) - 1:
            found += _tree(data, root, database, named if database == "main" else None)
    for database, root in named:
        if root != (1 << 64) - 1:
            found += _tree(data, root, database, None)
    return found


def _tree(data: bytes, pgno: int, database: str, named: list[tuple[str, int]] | None) -> list[Page]:
    at = pgno * PAGE_BYTES
    _, _, flags, lower, upper = struct.unpack_from("<QHHHH", data, at)
    kind = "branch" if flags & 1 else "leaf"
    ptrs = [struct.unpack_from("<H", data, at + 16 + 2 * i)[0] for i in range((lower - 16) // 2)]
    chosen = sorted({0, len(ptrs) // 2, len(ptrs) - 1})
    page = Page(pgno, database, kind, {"header": list(range(16)),
                                       "pointers": [16 + 2 * i + b for i in chosen for b in (0, 1)]})
    page.regions["node headers"] = [ptrs[i] + b for i in chosen for b in range(8)]
    keys: list[int] = []
    values: list[int] = []
    found = [page]
    children: list[int] = []
    for i, ptr in enumerate(ptrs):
        lo, hi, node_flags, key_bytes = struct.unpack_from("<HHHH", data, at + ptr)
        key_at, value_at, size = ptr + 8, ptr + 8 + key_bytes, lo | hi << 16
        if i in chosen and key_bytes:
            keys += [key_at, key_at + key_bytes - 1]
        if kind == "branch":
            children.append(lo | hi << 16 | node_flags << 32)
            continue
        if named is not None and node_flags & 2:
            named.append((data[at + key_at : at + value_at].decode(), struct.unpack_from("<Q", data, at + value_at + 40)[0]))
        if node_flags & 1:  # an overflow run
            run = struct.unpack_from("<Q", data, at + value_at)[0]
            found.append(Page(run, database, "overflow", {"header": list(range(16)),
                                                          "body": [16, 16 + size // 2, 16 + size - 1]}))
            continue
        if i in chosen and size:
            values += sorted({value_at, value_at + size // 2, value_at + size - 1})
    page.regions["keys"] = keys
    page.regions["values"] = values
    for child in children:
        found += _tree(data, child, database, named)
    return found


# --- faults ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    kind: str
    """The table row it counts in."""
    label: str
    """What was done, precisely enough to do it again."""
    apply: Callable[[Path], None]
    after_commit: bool = False
    """The fault leaves either the reference's state or that state after one more commit (a
    commit cut off in its flush: taken back, or whole after all): either truth may be read."""


def flip(pgno: int, offset: int, mask: int) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        with open(directory / "data.mdb", "r+b") as file:
            file.seek(pgno * PAGE_BYTES + offset)
            byte = file.read(1)[0]
            file.seek(pgno * PAGE_BYTES + offset)
            file.write(bytes([byte ^ mask]))
    return apply


def truncate(size: Callable[[int], int]) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        target = directory / "data.mdb"
        os.truncate(target, size(target.stat().st_size))
    return apply


def zero_page(pgno: int) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        with open(directory / "data.mdb", "r+b") as file:
            file.seek(pgno * PAGE_BYTES)
            file.write(bytes(PAGE_BYTES))
    return apply


def faults(reference: Path, other: Path, seed: int, sample: bool, per_kind: int = 3,
           captured: Path | None = None) -> list[Fault]:
    """Every fault of the sweep (or, with `sample`, `per_kind` of each kind), in a seeded order;
    with `captured` (`capture_commit`'s), commits cut off in their flush too."""
    rng = random.Random(seed)
    data = (reference / "data.mdb").read_bytes()
    found: list[Fault] = []
    for page in pages(data):
        for region, offsets in page.regions.items():
            kind = _kind(page, region)
            for offset in offsets:
                mask = 1 << rng.randrange(8)
                label = f"page {page.pgno} ({page.database} {page.kind}), {region}, byte {offset} ^ {mask:#04x}"
                found.append(Fault(kind, label, flip(page.pgno, offset, mask)))
        if page.kind != "meta":
            found.append(Fault("lost write (a page zeroed)", f"page {page.pgno} ({page.database} {page.kind}) zeroed",
                               zero_page(page.pgno)))
    newer = 0 if struct.unpack_from("<Q", data, 144)[0] > struct.unpack_from("<Q", data, PAGE_BYTES + 144)[0] else 1
    found.append(Fault("meta page", f"meta page {newer}'s transaction id lowered by 2 (LMDB opens the older snapshot)",
                       _lower_txnid(newer)))
    for pgno in _free_pages(data, pages(data))[:8]:
        found.append(Fault("free page", f"free page {pgno}, byte 100 ^ 0x01", flip(pgno, 100, 1)))
    size = len(data)
    runs = [page.pgno for page in pages(data) if page.kind == "overflow"]
    if runs:  # the run LMDB would read furthest into the file, cut after its first page
        head = max(runs)
        found.append(Fault("file truncated", f"data.mdb truncated inside the overflow run at page {head}",
                           truncate(lambda n: (head + 1) * PAGE_BYTES)))
    for label, cut in (("to 0 bytes", lambda n: 0), ("to 1 page", lambda n: PAGE_BYTES),
                       ("to 2 pages", lambda n: 2 * PAGE_BYTES), ("to half", lambda n: n // 2 // PAGE_BYTES * PAGE_BYTES),
                       ("by one page", lambda n: n - PAGE_BYTES), ("by one byte", lambda n: n - 1)):
        found.append(Fault("file truncated", f"data.mdb truncated {label} (of {size})", truncate(cut)))
    found += [
        Fault("file replaced", "data.mdb deleted", lambda d: (d / "data.mdb").unlink()),
        Fault("file replaced", "data.mdb and lock.mdb deleted",
              lambda d: ((d / "data.mdb").unlink(), (d / "lock.mdb").unlink(missing_ok=True))),
        Fault("file replaced", "data.mdb from another ledger", lambda d: shutil.copy(other / "data.mdb", d / "data.mdb")),
        Fault("anchor", "one anchor copy damaged", _anchor_flip(5)),
        Fault("anchor", "both anchor copies damaged", lambda d: (_anchor_flip(5)(d), _anchor_flip(64 + 5)(d))),
        Fault("anchor", "anchor truncated to 0 bytes", lambda d: os.truncate(d / "tally.anchor", 0)),
        Fault("anchor", "anchor deleted", lambda d: (d / "tally.anchor").unlink()),
        Fault("anchor", "anchor from another ledger", lambda d: shutil.copy(other / "tally.anchor", d / "tally.anchor")),
    ]
    if captured is not None:
        found += cut_off_faults(captured)
    if sample:
        by_kind: dict[str, list[Fault]] = {}
        for fault in found:
            by_kind.setdefault(fault.kind, []).append(fault)
        found = [fault for kind in by_kind.values() for fault in rng.sample(kind, min(per_kind, len(kind)))]
    return found


def capture_commit(reference: Path, into: Path, requests: list[TransferRequest]) -> dict:
    """Runs in a child: a copy of the reference opened for writing, its files just before the
    commit of one more transfer and just after it (the ledger open and idle each time), in
    `into`/before and `into`/after; returns the truth after it (`cut_off`)."""
    from engine import Ledger

    work = into / "ledger"
    shutil.copytree(reference, work)
    with Ledger.open(work, checkpoint_interval=CHECKPOINT_INTERVAL) as ledger:
        _keep(work, into / "before")
        ledger.transfer("cut-off", source="bank", destination="acct-00", amount=1)
        _keep(work, into / "after")
        truth = read_all(ledger, requests)
        truth["retries"] = [_outcome(outcome) for outcome in ledger.transfer_many(requests)]
        truth["decided_at"] = decided_at(ledger)
    return truth


def _keep(directory: Path, into: Path) -> None:
    into.mkdir(parents=True)
    for name in ("data.mdb", "tally.anchor"):
        shutil.copy(directory / name, into / name)


def cut_off_faults(captured: Path) -> list[Fault]:
    """A commit the machine cut off while it was being flushed: its meta page on disk and some
    of its pages not (each alone, and all), the anchor from before it (the open takes back the
    snapshot before it, or finds it whole) or from after it (it was flushed whole: damage)."""
    before = (captured / "before" / "data.mdb").read_bytes()
    after = (captured / "after" / "data.mdb").read_bytes()
    newer = 0 if struct.unpack_from("<Q", after, 144)[0] > struct.unpack_from("<Q", after, PAGE_BYTES + 144)[0] else 1
    written = [pgno for pgno in range(2, len(after) // PAGE_BYTES)
               if after[pgno * PAGE_BYTES:(pgno + 1) * PAGE_BYTES] != before[pgno * PAGE_BYTES:(pgno + 1) * PAGE_BYTES]]
    found = []
    for anchor in ("before", "after"):
        for lost in [[pgno] for pgno in written] + [written]:
            label = (f"commit cut off: {'every page' if len(lost) > 1 else f'page {lost[0]}'} of {len(written)} lost, "
                     f"its meta page {newer} kept, the anchor from {anchor} it")
            found.append(Fault("commit cut off in its flush", label,
                               _cut_off(before, after, newer, lost, captured / anchor / "tally.anchor"),
                               after_commit=True))
    return found


def _cut_off(before: bytes, after: bytes, newer: int, lost: list[int], anchor: Path) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        torn = bytearray(after)
        for pgno in lost:
            torn[pgno * PAGE_BYTES:(pgno + 1) * PAGE_BYTES] = before[pgno * PAGE_BYTES:(pgno + 1) * PAGE_BYTES].ljust(
                PAGE_BYTES, b"\0")
        (directory / "data.mdb").write_bytes(bytes(torn))
        shutil.copy(anchor, directory / "tally.anchor")
        (directory / "tally.seal").unlink(missing_ok=True)  # (an open ledger's: the machine stopped)
    return apply


def _lower_txnid(number: int) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        with open(directory / "data.mdb", "r+b") as file:
            file.seek(number * PAGE_BYTES + 144)
            (txnid,) = struct.unpack("<Q", file.read(8))
            file.seek(number * PAGE_BYTES + 144)
            file.write(struct.pack("<Q", txnid - 2))
    return apply


def _free_pages(data: bytes, used: list[Page]) -> list[int]:
    """Pages of the file no tree reaches (the free list's, and never written ones)."""
    reached = {page.pgno for page in used}
    return [pgno for pgno in range(2, len(data) // PAGE_BYTES) if pgno not in reached]


def _kind(page: Page, region: str) -> str:
    if page.kind == "meta":
        return "meta page"
    if page.database == "free list":
        return "free list page"
    if page.kind == "overflow":
        return "overflow page"
    name = {"header": "page header", "pointers": "node pointers", "node headers": "node headers",
            "keys": "keys", "values": "values"}[region]
    return f"{page.kind} {name}"


def _anchor_flip(offset: int) -> Callable[[Path], None]:
    def apply(directory: Path) -> None:
        with open(directory / "tally.anchor", "r+b") as file:
            file.seek(offset)
            byte = file.read(1)[0]
            file.seek(offset)
            file.write(bytes([byte ^ 0x10]))
    return apply


# --- the probe: what a user would do with the damaged copy ----------------------------------------


def digest(directory: Path) -> str | None:
    target = directory / "data.mdb"
    return hashlib.sha256(target.read_bytes()).hexdigest() if target.exists() else None


def verdict(directory: Path) -> str:
    """What `tally verify` says: "whole", "NOT WHOLE", or the error it stopped on."""
    from engine import _tools_audit

    try:
        return str(_tools_audit.verify(str(directory))["verdict"])
    except LedgerError as error:
        return f"error {error.code}"


def probe(directory: Path, truths: list[dict], requests: list[TransferRequest]) -> dict:
    """Runs in the child. Observations, for `classify`."""
    from engine import Ledger

    seen: dict = {"digest_before": digest(directory)}
    seen["verify"] = verdict(directory)
    seen["verify_wrote"] = digest(directory) != seen["digest_before"]
    try:
        ledger = Ledger.open(directory, timeout_s=10.0)
    except LedgerError as error:
        seen["refused"] = f"open: {error.code}: {error}"
        seen["wrote"] = digest(directory) != seen["digest_before"]
        seen["salvage"] = salvaged(directory, truths, requests)
        return seen
    try:
        seen.update(_use(ledger, truths, requests))
    except LedgerError as error:
        seen["refused"] = f"{error.code}: {error}"
        seen["wrote"] = digest(directory) != seen["digest_before"]
        return seen
    finally:
        ledger.close()
    seen["verify_after"] = verdict(directory)
    if seen["verify"] != "whole":
        seen["salvage"] = salvaged(directory, truths, requests)
    return seen


def salvaged(directory: Path, truths: list[dict], requests: list[TransferRequest]) -> str:
    """Runs in the child: `tally recover --salvage` of the damaged ledger, and what its copy
    holds. "refused" (nothing saved, `LedgerError`), "all" (every outcome the ledger decided:
    each transfer committed, each request refused), "a prefix" (those decided before some LSN,
    and none after), or "BAD: ..." (the original changed, the copy not whole, or holding other
    than a prefix of the truth)."""
    from engine import Ledger, _tools_salvage

    into = directory.parent / f"{directory.name}-salvaged"
    shutil.rmtree(into, ignore_errors=True)
    before = digest(directory)
    try:
        _tools_salvage.salvage(str(directory), str(into))
    except LedgerError:
        return "refused" if digest(directory) == before else "BAD: a refused salvage wrote to the ledger"
    if digest(directory) != before:
        return "BAD: the salvage wrote to the ledger"
    if verdict(into) != "whole":
        return f"BAD: the copy verifies {verdict(into)}"
    with Ledger.open(into, readonly=True) as copy:
        held = {request.id: _outcome(copy.outcome(request.id)) for request in requests}
    lsn_at = list(Transfer.__dataclass_fields__).index("lsn")  # (the copy's LSNs are its own)
    for truth in truths:
        first = {request.id: outcome for request, outcome in zip(requests, truth["retries"], strict=True)}
        decided = sorted((lsn, tid) for tid, lsn in truth["decided_at"].items() if tid in held)
        kept = [held[tid] is not None for _, tid in decided]
        if kept != sorted(kept, reverse=True):  # (True up to a point, False after it)
            continue
        if all(held[tid] is None or _without_lsn(held[tid], lsn_at) == _without_lsn(first[tid], lsn_at)
               for _, tid in decided) and not any(held[tid] for tid in held if tid not in truth["decided_at"]):
            return "all" if all(kept) else "a prefix"
    return "BAD: the copy holds other than the outcomes (transfers and refusals) decided before some LSN"


def _without_lsn(outcome: list | str, lsn_at: int) -> list | str:
    return outcome[:lsn_at] + outcome[lsn_at + 1:] if isinstance(outcome, list) else outcome


def decided_at(ledger: object) -> dict[str, int]:
    """The LSN of the record that decided each transfer id (committed or refused), by the
    ledger's events: the order a salvage's copy must keep a prefix of."""
    return {transfer.id: event.lsn for event in ledger.events()  # type: ignore[attr-defined]
            if event.kind in ("transfer", "refusal") for transfer in event.transfers}


def _use(ledger: object, truths: list[dict], requests: list[TransferRequest]) -> dict:
    """What using the opened ledger shows, against the first of `truths` it reads as."""
    seen: dict = {}
    reads = read_all(ledger, requests)
    truth = next((truth for truth in truths if all(reads[key] == truth[key] for key in reads)), truths[0])
    seen["different"] = [key for key in reads if reads[key] != truth[key]]
    if seen["different"]:
        return seen
    retried = [_outcome(outcome) for outcome in ledger.transfer_many(requests)]  # type: ignore[attr-defined]
    if retried != truth["retries"]:
        first = next(i for i, (a, b) in enumerate(zip(retried, truth["retries"], strict=True)) if a != b)
        seen["retry_differs"] = f"{requests[first].id}: {retried[first]!r}, first {truth['retries'][first]!r}"
        return seen
    if ledger.state_hash() != truth["state_hash"]:  # type: ignore[attr-defined]
        seen["retry_differs"] = "the state hash moved: a retry committed again"
        return seen
    first, second = truth["accounts"][1][0], truth["accounts"][2][0]
    ledger.transfer("fault-probe", source="bank", destination=first, amount=7)  # type: ignore[attr-defined]
    ledger.transfer("fault-probe-2", source=first, destination=second, amount=3)  # type: ignore[attr-defined]
    after = read_all(ledger, requests)
    expected = {a: b for a, b in truth["balances"].items()}
    expected["bank"] = [expected["bank"][0] - 7, 0, expected["bank"][0] - 7, 0]
    expected[first] = [expected[first][0] + 4, 0, expected[first][0] + 4, 0]
    expected[second] = [expected[second][0] + 3, 0, expected[second][0] + 3, 0]
    if after["balances"] != expected or after["transfers"] != truth["transfers"]:
        seen["different"] = ["after a new transfer"]
    return seen


def classify(seen: dict) -> tuple[str, str]:
    """(outcome, why) of one fault's observations."""
    if "signal" in seen or "timeout" in seen or "raw" in seen:
        return "BAD", seen.get("signal") or seen.get("timeout") or seen["raw"]
    if seen.get("verify_wrote"):
        return "BAD", "tally verify wrote to the data file"
    if "refused" in seen:
        if seen.get("salvage", "").startswith("BAD"):
            return "BAD", f"refused, and its salvage: {seen['salvage']}"
        if seen.get("wrote"):
            return "BAD", f"refused, but after writing: {seen['refused']}"
        if seen["verify"] == "whole":
            return "BAD", f"verify says whole, but: {seen['refused']}"
        return "refused", seen["refused"]
    if seen.get("different"):
        return "BAD", f"served different data: {seen['different']}"
    if "retry_differs" in seen:
        return "BAD", f"a retry was not idempotent: {seen['retry_differs']}"
    if seen.get("verify_after") != "whole" and seen["verify"] == "whole":
        return "BAD", f"whole before, {seen.get('verify_after')} after writing"
    if seen.get("salvage", "").startswith("BAD"):
        return "BAD", f"salvage: {seen['salvage']}"
    if seen["verify"] == "whole":
        return "same", ""
    return "reported", f"verify: {seen['verify']}, after writing: {seen.get('verify_after')}"


# --- running it -----------------------------------------------------------------------------------


def in_child(work: Callable[[], dict], timeout_s: float = CHILD_TIMEOUT_S) -> dict:
    """Run `work` in a forked child; its result, or what killed it."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        try:
            payload = json.dumps(work()).encode()
        except BaseException as error:  # the child's top level: report whatever escaped
            payload = json.dumps({"raw": "".join(traceback.format_exception(error))[-2000:]}).encode()
        os.write(write_fd, payload)
        os._exit(0)
    os.close(write_fd)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout_s
    while True:
        waited, status = os.waitpid(pid, os.WNOHANG)
        chunk = _read_some(read_fd)
        if chunk:
            chunks.append(chunk)
        if waited:
            break
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_fd)
            return {"timeout": f"no outcome within {timeout_s} s"}
        time.sleep(0.002)
    while chunk := _read_some(read_fd):
        chunks.append(chunk)
    os.close(read_fd)
    if os.WIFSIGNALED(status):
        return {"signal": f"killed by {signal.Signals(os.WTERMSIG(status)).name}"}
    return json.loads(b"".join(chunks) or b'{"raw": "the child said nothing"}')


def _read_some(fd: int) -> bytes:
    import select

    ready, _, _ = select.select([fd], [], [], 0)
    return os.read(fd, 1 << 20) if ready else b""


@dataclass
class Report:
    table: dict[str, Counter] = field(default_factory=dict)
    salvages: dict[str, Counter] = field(default_factory=dict)
    """By kind of fault, what a salvage of each damaged ledger saved (`salvaged`)."""
    bad: list[tuple[str, str]] = field(default_factory=list)
    cases: int = 0
    elapsed_s: float = 0.0

    def add(self, fault: Fault, outcome: str, why: str) -> None:
        self.table.setdefault(fault.kind, Counter())[outcome] += 1
        self.cases += 1
        if outcome == "BAD":
            self.bad.append((fault.label, why))


def run_faults(scratch: Path, *, seed: int = 1, sample: bool = False, per_kind: int = 3,
               progress: Callable[[int, int], None] | None = None) -> Report:
    """Build the reference, apply every fault to a fresh copy, classify each outcome.
    The caller's process must have no threads (children are forked)."""
    started = time.monotonic()
    reference, other = scratch / "reference", scratch / "other"
    made = in_child(lambda: {"requests": [list(_fields(r)) for r in build(reference, seed)]})
    if "requests" not in made:
        raise RuntimeError(f"building the reference failed: {made}")
    requests = [TransferRequest(*fields) for fields in made["requests"]]
    in_child(lambda: {"requests": len(build(other, seed + 1))})

    def read_truth() -> dict:
        from engine import Ledger

        with Ledger.open(reference) as ledger:
            truth = read_all(ledger, requests)
            # A retry returns the first outcome and writes nothing: the refusals' codes, read here.
            truth["retries"] = [_outcome(outcome) for outcome in ledger.transfer_many(requests)]
            truth["decided_at"] = decided_at(ledger)
            return truth

    truth = in_child(read_truth)
    captured = scratch / "commit"
    truth_after = in_child(lambda: capture_commit(reference, captured, requests))
    if "state_hash" not in truth_after:
        raise RuntimeError(f"capturing a commit failed: {truth_after}")
    report = Report()
    todo = faults(reference, other, seed, sample, per_kind, captured)
    copy = scratch / "copy"
    for done, fault in enumerate(todo):
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(reference, copy)
        fault.apply(copy)
        truths = [truth, truth_after] if fault.after_commit else [truth]
        seen = in_child(lambda truths=truths: probe(copy, truths, requests))
        report.add(fault, *classify(seen))
        if "salvage" in seen:
            report.salvages.setdefault(fault.kind, Counter())[seen["salvage"].split(":")[0]] += 1
        if progress is not None:
            progress(done + 1, len(todo))
    report.elapsed_s = time.monotonic() - started
    return report


def render(report: Report) -> Iterator[str]:
    yield f"{'fault':<32} {'cases':>6} " + " ".join(f"{outcome:>9}" for outcome in OUTCOMES)
    totals: Counter = Counter()
    for kind, counts in sorted(report.table.items()):
        totals.update(counts)
        yield f"{kind:<32} {sum(counts.values()):>6} " + " ".join(f"{counts[o]:>9}" for o in OUTCOMES)
    yield f"{'all':<32} {sum(totals.values()):>6} " + " ".join(f"{totals[o]:>9}" for o in OUTCOMES)
    yield ""
    yield f"{'salvage of the damaged ledger':<32} {'cases':>6} " + " ".join(f"{saved:>9}" for saved in SALVAGED)
    for kind, counts in sorted(report.salvages.items()):
        yield f"{kind:<32} {sum(counts.values()):>6} " + " ".join(f"{counts[saved]:>9}" for saved in SALVAGED)
    for label, why in report.bad[:40]:
        yield f"  BAD: {label}: {why}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--sample", action="store_true", help="a few faults of each kind, as the test suite runs")
    parser.add_argument("--per-kind", type=int, default=3, metavar="N", help="with --sample: N faults of each kind")
    parser.add_argument("--json", metavar="FILE", help="also write the table and every BAD case as JSON")
    parser.add_argument("--walk-aside", action="store_true",
                        help="every page walk gives its last trees to a second process, however small the file "
                             "(journal._walk_aside: by default only files of a few hundred thousand entries)")
    args = parser.parse_args()
    if args.walk_aside:
        import journal._walk_aside

        journal._walk_aside.ASIDE_ENTRIES_MIN = 0
    with tempfile.TemporaryDirectory(prefix="tally-faults-") as scratch:
        report = run_faults(Path(scratch), seed=args.seed, sample=args.sample, per_kind=args.per_kind,
                            progress=lambda done, total: print(f"\r{done}/{total}", end="", file=sys.stderr))
    print(file=sys.stderr)
    print(f"seed {args.seed}: {report.cases} faults in {report.elapsed_s:.0f} s")
    for line in render(report):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"table": report.table, "salvages": report.salvages, "bad": report.bad},
                                              indent=2))
    return 1 if report.bad else 0


if __name__ == "__main__":
    sys.exit(main())
