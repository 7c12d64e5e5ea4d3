"""A ledger written before format 2 opens and keeps working, as it was made.

`tests/fixtures/format-1/` was made by commit e081952 (see `make_format1.py` there): format
version 1, no anchor, no ledger id, index entries without checksums. It must open, read as it
did, verify whole, take new transfers (the first of which gives it a ledger id and an anchor),
and stay openable whatever that first commit meets.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import struct
from dataclasses import astuple
from pathlib import Path
from typing import Any

import lmdb
import pytest
from engine import JournalCorrupted, Ledger, TransferRequest
from engine._tools_audit import verify
from journal import ANCHOR_FILE

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "format-1"


@pytest.fixture
def old(tmp_path: Path) -> Path:
    path = tmp_path / "format-1"
    shutil.copytree(FIXTURE, path)
    (path / "expected.json").unlink()
    return path


def expected() -> dict[str, Any]:
    return json.loads((FIXTURE / "expected.json").read_text())


def as_lists(value: Any) -> Any:
    return json.loads(json.dumps(value))


def made_then(value: Any) -> tuple[Any, ...]:
    """The fields the release that made the fixture had, with the values it gave them; the
    fields added since must read as their defaults (an old transfer has no timestamp, code,
    reference, metadata; it is a single transfer, posted)."""
    fields = astuple(value)
    count = {"Account": 3, "Balance": 3, "Entry": 6, "Transfer": 5}[type(value).__name__]
    added = fields[count:]
    defaults = tuple(field.default for field in dataclasses.fields(value)[count:])
    assert added == defaults, (value, defaults)
    return fields[:count]


def test_a_format_1_ledger_opens_and_reads_as_it_read_when_it_was_made(old: Path) -> None:
    want = expected()
    with Ledger.open(old) as ledger:
        assert ledger._journal.format_version == 1
        accounts = ledger.accounts()
        assert as_lists([made_then(a) for a in accounts]) == want["accounts"]
        assert as_lists({a.id: made_then(ledger.balance(a.id)) for a in accounts}) == want["balances"]
        assert as_lists({a.id: [made_then(e) for e in ledger.entries(a.id)] for a in accounts}) == want["entries"]
        assert ledger.state_hash() == want["state_hash"]
        for tid, outcome in want["outcomes"].items():
            found = ledger.get_transfer(tid)
            assert (found is None) == isinstance(outcome, str), tid
    assert verify(str(old))["verdict"] == "whole"
    assert not (old / ANCHOR_FILE).exists(), "opening and reading write nothing"


def test_a_format_1_ledger_retries_with_its_first_outcomes_and_takes_new_transfers(old: Path) -> None:
    want = expected()
    requests = [TransferRequest(f"move-{n}", ("alice", "bob", "carol")[n % 3], ("bob", "carol", "alice")[n % 3], 5 + n)
                for n in range(60)]
    with Ledger.open(old) as ledger:
        retried = ledger.transfer_many(requests)
        assert as_lists([made_then(outcome) for outcome in retried]) == [want["outcomes"][r.id] for r in requests]
        ledger.transfer("new", source="bank", destination="alice", amount=7)
        assert (old / ANCHOR_FILE).exists(), "the first commit gives it its anchor"
        state = ledger.state_hash()
    with Ledger.open(old) as reopened:
        assert reopened.state_hash() == state
        assert reopened._journal.format_version == 1
    assert verify(str(old))["verdict"] == "whole"


def test_a_format_1_ledger_keeps_the_id_it_is_given_when_that_commit_is_retried(
    old: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LMDB can report a full map as a commit ends (saving the free list); the writer grows
    the map and commits again. The id must be in the commit that lands, or the anchor would
    name a ledger the data file does not."""
    import journal._store

    real_open = journal._store._lmdb_open
    failed: list[bool] = []

    class Txn:
        def __init__(self, txn: Any) -> None:
            self._txn = txn

        def __getattr__(self, name: str) -> Any:
            return getattr(self._txn, name)

        def commit(self) -> None:
            if not failed:
                failed.append(True)
                raise lmdb.MapFullError("mdb_txn_commit: MDB_MAP_FULL (the test's)")
            self._txn.commit()

    class Env:
        def __init__(self, env: Any) -> None:
            self._env = env

        def __getattr__(self, name: str) -> Any:
            return getattr(self._env, name)

        def begin(self, write: bool = False, **options: Any) -> Any:
            txn = self._env.begin(write=write, **options)
            return Txn(txn) if write else txn

    monkeypatch.setattr(journal._store, "_lmdb_open", lambda *args, **options: Env(real_open(*args, **options)))
    with Ledger.open(old) as ledger:
        ledger.transfer("new", source="bank", destination="alice", amount=7)
    monkeypatch.undo()
    assert failed == [True]
    with Ledger.open(old) as reopened:
        assert reopened.get_transfer("new") is not None
    assert verify(str(old))["verdict"] == "whole"


def test_a_format_1_transfer_index_key_changed_in_place_is_refused_at_open(old: Path) -> None:
    """Format 1 has no index checksums: its transfer index is checked against the records as
    it opens, so an id the index no longer names cannot be committed a second time."""
    data = bytearray((old / "data.mdb").read_bytes())
    changed = 0
    at = data.find(b"to-euro")  # a refusal's id, between "move-9" and "too-much" in the index
    while at != -1:
        if struct.unpack_from("<H", data, at - 2)[0] == len(b"to-euro"):  # a node's key (live or stale)
            data[at + len(b"to-eur")] = ord("p")  # "to-eurp": still in order; the id "to-euro" looks unused
            changed += 1
        at = data.find(b"to-euro", at + 1)
    assert changed
    (old / "data.mdb").write_bytes(bytes(data))
    with pytest.raises(JournalCorrupted, match="another record"):
        Ledger.open(old)


def test_a_format_1_entry_value_that_does_not_decode_is_damage_not_a_raw_error(old: Path) -> None:
    """Format 1 has no checksum on an entry: one that no longer decodes must still be named."""
    from engine import _tools_copy

    data = bytearray((old / "data.mdb").read_bytes())
    at = data.find(b"\x00\x03bob\x00\x00\x00\x00\x00\x00\x00\x01")  # bob's first entry's key
    while at != -1 and struct.unpack_from("<H", data, at - 2)[0] != 13:  # a node's key (ksize 13)
        at = data.find(b"\x00\x03bob\x00\x00\x00\x00\x00\x00\x00\x01", at + 1)
    assert at != -1
    data[at + 13] = 0x93  # its value, a msgpack array of 4, now of 3: it decodes, with a byte left over
    (old / "data.mdb").write_bytes(bytes(data))
    with Ledger.open(old) as ledger:
        with pytest.raises(JournalCorrupted, match="does not decode"):
            ledger.state_hash()
        with pytest.raises(JournalCorrupted, match="does not decode"):
            ledger.entries("bob")
    with pytest.raises(JournalCorrupted):
        _tools_copy.replay(str(old), str(old.parent / "replayed"))
