"""The page walk's reading of a leaf whose nodes are all one size (`journal._pages`, `_uniform`),
and its check of the free list's age (`_check_free_list_age`).

Most leaves of a ledger's indexes and records hold nodes of one size; the walk reads such a
leaf in one `unpack_from` instead of node by node. These tests hold it to what the node-by-node
reading gives on a real ledger, and to finding damage in such a leaf as that reading does.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from coordinator import INDEX_NAMES
from engine import Account, JournalCorrupted, Ledger, TransferRequest
from journal._meta import committed_meta, read_metas
from journal._names import META_DB, RECORDS_DB
from journal._pages import Layout, PageWalk, walk
from support import newest_meta

PAGE_BYTES = 4096
PAGE_HEADER_BYTES = 16
CHECKPOINT_INTERVAL = 500


def build(path: Path) -> None:
    """A ledger whose leaves are of both kinds: nodes of one size (plain transfers, ids of one
    length) and of many (metadata, references, pending transfers, ids of other lengths)."""
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_accounts([Account(f"acct-{n:04}", "USD", 0) for n in range(600)])
        ledger.create_account("x" * 120, currency="USD", metadata={"tier": "gold", "limit": 5})
        ledger.transfer_many([TransferRequest(f"f-{n:05}", "bank", f"acct-{n % 600:04}", 1000) for n in range(3000)])
        ledger.transfer_many([TransferRequest(f"m-{n}-" + "y" * (n % 40), f"acct-{n % 600:04}", "x" * 120, 1,
                                              reference=f"r{n}" * (n % 7), metadata={"n": n} if n % 3 else None)
                              for n in range(400)])
        for n in range(50):
            ledger.transfer(f"p-{n}", source=f"acct-{n:04}", destination="bank", amount=5, pending=True, timeout_s=3600)
            if n % 2:
                ledger.post_pending(f"q-{n}", pending_id=f"p-{n}", amount=n % 5 or None)


def read_all(path: Path, uniform: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[Layout, list[tuple[bytes, list[bytes], list[bytes]]], dict[bytes, list[int]]]:
    """Walk the data file as opening does (every database's leaves visited), reading leaves of
    one size whole (`uniform`) or not at all that way: the layout, what each leaf gave, and the
    pages of each database read whole."""
    taken: dict[bytes, list[int]] = {}
    if uniform:
        leaf, whole = PageWalk._leaf, PageWalk._uniform

        def leaf_noted(self: PageWalk, name: bytes, data: bytes, *args: object) -> None:
            if whole(self, data, args[0], args[1]) is not None:  # type: ignore[arg-type]
                taken.setdefault(name, []).append(struct.unpack_from("<Q", data)[0])
            leaf(self, name, data, *args)  # type: ignore[arg-type]

        monkeypatch.setattr(PageWalk, "_leaf", leaf_noted)
    else:
        monkeypatch.setattr(PageWalk, "_uniform", lambda *_: None)
    seen: list[tuple[bytes, list[bytes], list[bytes]]] = []
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        meta = committed_meta(*read_metas(fd, data_file), data_file)
        names = frozenset({META_DB, RECORDS_DB, *(name.encode() for name in INDEX_NAMES)})
        layout = walk(fd, meta, data_file, lambda name, keys, values: seen.append((name, keys, values)), names,
                      first=META_DB, key_bytes={RECORDS_DB: 8})
    finally:
        os.close(fd)
    monkeypatch.undo()
    return layout, seen, taken


def test_a_leaf_read_whole_gives_what_reading_it_node_by_node_gives(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "ledger"
    build(path)
    layout, seen, taken = read_all(path, True, monkeypatch)
    by_node, seen_by_node, _ = read_all(path, False, monkeypatch)
    assert layout.trees == by_node.trees
    assert seen == seen_by_node
    assert {b"accounts", b"entries", b"transfers", b"records"} <= set(taken), taken  # each has leaves of one size
    leaves = sum(tree.leaf_pages for tree in layout.trees.values())
    assert sum(map(len, taken.values())) < leaves  # and some leaves were read node by node


def _uniform_leaf(path: Path, name: bytes, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int, int]:
    """The leaf of `name` read whole that holds the most nodes: its page number, its node
    count and its node size."""
    _, _, taken = read_all(path, True, monkeypatch)
    data = (path / "data.mdb").read_bytes()
    leaves = []
    for pgno in taken[name]:
        _, _, _, lower, upper = struct.unpack_from("<QHHHH", data, pgno * PAGE_BYTES)
        count = (lower - PAGE_HEADER_BYTES) // 2
        leaves.append((count, pgno, (PAGE_BYTES - upper) // count))
    count, pgno, size = max(leaves)
    assert count >= 8, leaves
    return pgno, count, size


def _patch(path: Path, offset: int, data: bytes) -> None:
    with open(path / "data.mdb", "r+b") as file:
        file.seek(offset)
        file.write(data)


@pytest.mark.parametrize("damage", ["two node pointers swapped", "a node pointer moved", "a key size", "a value size",
                                    "a node's flags", "a key byte", "a value byte"])
@pytest.mark.parametrize("name", [b"transfers", b"accounts", b"records"])
def test_damage_in_a_leaf_whose_nodes_are_one_size_is_found_at_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    damage: str, name: bytes) -> None:
    path = tmp_path / "ledger"
    build(path)
    pgno, count, size = _uniform_leaf(path, name, monkeypatch)
    at = pgno * PAGE_BYTES
    with open(path / "data.mdb", "rb") as file:
        file.seek(at)
        page = file.read(PAGE_BYTES)
    pointers = list(struct.unpack_from(f"<{count}H", page, PAGE_HEADER_BYTES))
    node = pointers[count // 2]  # a node in the middle of the leaf, in key order
    if damage == "two node pointers swapped":
        pointers[1], pointers[2] = pointers[2], pointers[1]
        _patch(path, at + PAGE_HEADER_BYTES, struct.pack(f"<{count}H", *pointers))
    elif damage == "a node pointer moved":
        _patch(path, at + PAGE_HEADER_BYTES + 2 * (count // 2), struct.pack("<H", node + 2))
    elif damage == "a key size":
        _patch(path, at + node + 6, struct.pack("<H", struct.unpack_from("<H", page, node + 6)[0] - 1))
    elif damage == "a value size":
        _patch(path, at + node, struct.pack("<H", struct.unpack_from("<H", page, node)[0] - 1))
    elif damage == "a node's flags":
        _patch(path, at + node + 4, struct.pack("<H", 0x01))  # F_BIGDATA: the value would name an overflow page
    elif damage == "a key byte":
        key_size = struct.unpack_from("<H", page, node + 6)[0]
        _patch(path, at + node + 8 + key_size - 1, bytes([page[node + 8 + key_size - 1] ^ 0x01]))
    else:
        key_size = struct.unpack_from("<H", page, node + 6)[0]
        _patch(path, at + node + 8 + key_size, bytes([page[node + 8 + key_size] ^ 0x01]))
    assert size  # (the leaf is one the walk read whole)
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path)
    assert caught.value.where is not None, caught.value


@pytest.mark.parametrize("name", [b"transfers", b"records"])
def test_a_leaf_whose_nodes_lie_an_odd_number_of_bytes_apart_is_found_at_open(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch,
                                                                              name: bytes) -> None:
    """LMDB starts every node on an even offset: a node's size is rounded up to an even number
    of bytes. A leaf whose nodes of one size are moved one byte further apart (its free-space
    bound moved to match) is damage the node-by-node reading refuses; so must the whole one."""
    path = tmp_path / "ledger"
    build(path)
    _, _, taken = read_all(path, True, monkeypatch)
    data = (path / "data.mdb").read_bytes()
    for pgno in taken[name]:  # a leaf with room for one more byte a node
        at = pgno * PAGE_BYTES
        page = data[at : at + PAGE_BYTES]
        _, _, _, lower, upper = struct.unpack_from("<QHHHH", page)
        count = (lower - PAGE_HEADER_BYTES) // 2
        size = (PAGE_BYTES - upper) // count
        value_bytes, _, _, key_bytes = struct.unpack_from("<HHHH", page, upper)
        node_bytes = 8 + key_bytes + value_bytes
        stride = node_bytes if node_bytes % 2 else node_bytes + 1  # odd: no pad, or one byte too many
        moved = PAGE_BYTES - count * stride
        if count >= 2 and moved >= lower:
            break
    else:
        pytest.fail(f"no leaf of {name!r} read whole has room")
    pointers = struct.unpack_from(f"<{count}H", page, PAGE_HEADER_BYTES)
    nodes = bytearray(count * stride)
    new_pointers = []
    for pointer in pointers:
        place = (pointer - upper) // size
        nodes[place * stride : place * stride + node_bytes] = page[pointer : pointer + node_bytes]
        new_pointers.append(moved + place * stride)
    damaged = bytearray(page)
    struct.pack_into("<H", damaged, 14, moved)  # mp_upper
    struct.pack_into(f"<{count}H", damaged, PAGE_HEADER_BYTES, *new_pointers)
    damaged[moved:] = nodes
    _patch(path, at, bytes(damaged))
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path)
    assert caught.value.where is not None, caught.value


def test_a_free_list_whose_newest_record_is_not_of_its_meta_pages_transaction_is_refused_and_nothing_written(
        tmp_path: Path) -> None:
    """A free list whose newest record is of another transaction than its meta page's is one
    the meta page's commit did not write (every commit Tally makes frees a page, saved under
    its own id): the next commits would reuse pages too early. The newest key of a real
    ledger's free list is moved 5 transactions on (the keys stay in order, the pages it names
    stay exactly the free ones): opening refuses it, naming the free list, and writes nothing."""
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        for n in range(20):
            ledger.transfer(f"t-{n}", source="bank", destination="alice", amount=10)
    meta = newest_meta(path)
    data = (path / "data.mdb").read_bytes()
    pgno = meta.free.root
    while True:  # down the last child of each branch to the leaf with the newest record
        at = pgno * PAGE_BYTES
        _, _, flags, lower, _ = struct.unpack_from("<QHHHH", data, at)
        count = (lower - PAGE_HEADER_BYTES) // 2
        last = at + struct.unpack_from("<H", data, at + PAGE_HEADER_BYTES + 2 * (count - 1))[0]
        if flags != 0x01:  # P_BRANCH
            break
        low, high, flags_high, _ = struct.unpack_from("<HHHH", data, last)
        pgno = low | high << 16 | flags_high << 32
    assert flags == 0x02 and struct.unpack_from("<H", data, last + 6)[0] == 8  # a leaf, 8-byte keys
    assert struct.unpack_from("<Q", data, last + 8)[0] == meta.txnid  # as every commit leaves it
    _patch(path, last + 8, struct.pack("<Q", meta.txnid + 5))
    files = {name: (path / name).read_bytes() for name in ("data.mdb", "tally.anchor")}
    with pytest.raises(JournalCorrupted) as caught:
        Ledger.open(path)
    assert caught.value.where == f"the free list of {path / 'data.mdb'}", caught.value
    assert f"transaction {meta.txnid + 5}, not of its meta page's {meta.txnid}" in str(caught.value)
    assert {name: (path / name).read_bytes() for name in files} == files
