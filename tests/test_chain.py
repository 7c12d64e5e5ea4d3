"""The journal's hash chain (`journal._chain`): a rewrite, a deletion or a reordering is found
even when every CRC is valid, a head noted earlier is proved extended or not, and an older
ledger keeps opening, chained from its first write by this code on."""

from __future__ import annotations

import hashlib
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import lmdb
import msgpack
import pytest
from coordinator import INDEX_NAMES
from coordinator._audit import CHECK_CHAIN, CHECKS
from engine import Head, Ledger, TransferRequest
from engine._tools_audit import verify
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from journal import GENESIS, ChainHead, Journal, JournalCorruptedError, lsn_key
from journal._format import frame_unchained

from tests.test_cli import tally, tally_json

FORMAT_1 = Path(__file__).resolve().parent / "fixtures" / "format-1"
RawLmdb = Callable[[Path], "lmdb.Environment"]


def digest_of(previous: bytes, lsn: int, payload: bytes) -> bytes:
    """The chain's rule, written out again: SHA-256(previous digest || LSN key || payload)."""
    return hashlib.sha256(previous + struct.pack(">Q", lsn) + payload).digest()


def reframe(lsn: int, digest: bytes, payload: bytes) -> bytes:
    """A version-2 record at `lsn` with a valid CRC: what anyone with the file can write."""
    body = digest + payload
    return struct.pack(">BI", 2, zlib.crc32(body, zlib.crc32(lsn_key(lsn) + b"\x02"))) + body


def split(value: bytes) -> tuple[bytes, bytes]:
    """(digest, payload) of a stored version-2 record."""
    assert value[0] == 2, value[:1]
    return bytes(value[5:37]), bytes(value[37:])


def stored(raw_lmdb, path: Path) -> dict[int, bytes]:
    with raw_lmdb(path) as env:
        records = env.open_db(b"records", create=False)
        with env.begin(db=records) as txn:
            return {struct.unpack(">Q", key)[0]: bytes(value) for key, value in txn.cursor()}


def rewrite(raw_lmdb, path: Path, values: dict[int, bytes | None]) -> None:
    """Put (or, for None, delete) stored records, as an attacker with the file would."""
    with raw_lmdb(path) as env:
        records = env.open_db(b"records", create=False)
        with env.begin(write=True, db=records) as txn:
            for lsn, value in values.items():
                if value is None:
                    assert txn.delete(lsn_key(lsn))
                else:
                    txn.put(lsn_key(lsn), value)


def write_journal(path: Path, count: int) -> None:
    journal = Journal.open(path)
    try:
        for n in range(count):
            journal.append(f"record {n}".encode())
        journal.wait_durable(count, 10)
    finally:
        journal.close()


def chain_of(path: Path, expected: ChainHead | None = None):  # type: ignore[no-untyped-def]
    journal = Journal.open_readonly(path)
    try:
        return journal.verify_chain(expected)
    finally:
        journal.close()


def build(path: Path) -> Head:
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD", metadata={"name": "Alice"})
        ledger.create_account("bob", currency="USD")
        ledger.transfer_many([TransferRequest(f"t-{n}", "bank", ("alice", "bob")[n % 2], 10 + n) for n in range(6)])
        return ledger.head()


# --- the journal --------------------------------------------------------------------


def test_each_record_carries_the_sha256_of_the_digest_before_it_its_lsn_key_and_its_payload(
    ledger_path: Path, raw_lmdb
) -> None:
    write_journal(ledger_path, 5)
    previous = GENESIS
    for lsn, value in sorted(stored(raw_lmdb, ledger_path).items()):
        digest, payload = split(value)
        assert payload == f"record {lsn - 1}".encode()
        assert digest == digest_of(previous, lsn, payload)
        previous = digest
    report = chain_of(ledger_path)
    assert report.break_lsn is None and report.chained_from == 1 and report.unchained_through == 0
    assert report.head == ChainHead(5, previous)


def test_the_head_is_the_durable_lsn_and_its_digest_in_the_writer_and_after_reopening(ledger_path: Path) -> None:
    journal = Journal.open(ledger_path)
    try:
        assert journal.head() == ChainHead(0, GENESIS)
        for n in range(3):
            journal.append(f"record {n}".encode())
        journal.wait_durable(3, 10)
        head = journal.head()
    finally:
        journal.close()
    assert head.lsn == 3
    reader = Journal.open_readonly(ledger_path)
    try:
        assert reader.head() == head
        assert reader.head_at(0) == ChainHead(0, GENESIS)
        assert reader.head_at(1) == ChainHead(1, digest_of(GENESIS, 1, b"record 0"))
        with pytest.raises(JournalCorruptedError):
            reader.head_at(4)
    finally:
        reader.close()
    journal = Journal.open(ledger_path)
    try:
        assert journal.head() == head
        journal.append(b"one more")
        journal.wait_durable(4, 10)
        assert journal.head() == ChainHead(4, digest_of(head.digest, 4, b"one more"))
    finally:
        journal.close()


def test_a_payload_rewritten_with_a_valid_crc_reads_back_but_breaks_the_chain_at_its_lsn(
    ledger_path: Path, raw_lmdb
) -> None:
    write_journal(ledger_path, 6)
    digest, _ = split(stored(raw_lmdb, ledger_path)[3])
    rewrite(raw_lmdb, ledger_path, {3: reframe(3, digest, b"record X")})

    journal = Journal.open(ledger_path)  # the CRC cannot tell, and the last link is whole
    try:
        assert journal.read(3) == b"record X"
    finally:
        journal.close(seal=False)
    report = chain_of(ledger_path)
    assert report.break_lsn == 3 and "LSN 3" in (report.problem or "")


def test_a_deleted_record_with_the_rest_renumbered_under_valid_crcs_breaks_the_chain_where_it_was(
    ledger_path: Path, raw_lmdb
) -> None:
    write_journal(ledger_path, 6)
    values = stored(raw_lmdb, ledger_path)
    moved: dict[int, bytes | None] = {lsn - 1: reframe(lsn - 1, *split(values[lsn])) for lsn in range(4, 7)}
    moved[6] = None
    rewrite(raw_lmdb, ledger_path, moved)

    assert chain_of(ledger_path).break_lsn == 3


def test_a_deleted_record_with_the_later_ones_rechained_under_valid_crcs_breaks_the_chain_at_the_gap(
    ledger_path: Path, raw_lmdb
) -> None:
    """LSN 3 of a ledger deleted, and every later record's digest computed anew from the one
    stored before it: each CRC is valid and each record links to its stored predecessor, so
    only the LSNs tell. The chain walk itself must name the missing LSN (not leave it to
    the audit's own check that LSNs run on), since a chain that skips an LSN vouches for a
    history with a record taken out."""
    build(ledger_path)
    values = stored(raw_lmdb, ledger_path)
    forged: dict[int, bytes | None] = {3: None}
    previous = split(values[2])[0]
    for lsn in range(4, max(values) + 1):
        payload = split(values[lsn])[1]
        previous = digest_of(previous, lsn, payload)
        forged[lsn] = reframe(lsn, previous, payload)
    rewrite(raw_lmdb, ledger_path, forged)

    journal = Journal.open_readonly(ledger_path, index_names=INDEX_NAMES)
    try:
        report = journal.verify_chain(None)
    finally:
        journal.close()
    assert report.break_lsn == 3 and "LSN 3 is missing" in (report.problem or ""), report
    assert verify(str(ledger_path))["chain"]["break_lsn"] == 3


def test_a_record_that_fails_its_checksum_leaves_the_head_at_the_record_before_it(
    ledger_path: Path, raw_lmdb, flip_record_byte
) -> None:
    """The head a walk reports is a pair some record holds: the last one read, never the
    damaged record's LSN with the digest of the one before it (a head no ledger ever had)."""
    write_journal(ledger_path, 6)
    before = split(stored(raw_lmdb, ledger_path)[2])[0]
    flip_record_byte(ledger_path, 3)

    report = chain_of(ledger_path)

    assert report.break_lsn == 3 and "checksum" in (report.problem or "")
    assert report.head == ChainHead(2, before)


def test_verify_of_a_ledger_with_a_damaged_record_prints_the_head_of_the_record_before_it_which_the_original_extends(
    ledger_path: Path, tmp_path: Path, flip_record_byte
) -> None:
    build(ledger_path)
    original = tmp_path / "original"
    shutil.copytree(ledger_path, original)
    lsn = verify(str(ledger_path))["head"]["lsn"] - 2
    flip_record_byte(ledger_path, lsn)

    report = verify(str(ledger_path))

    assert report["corrupt_lsn"] == lsn and report["chain"]["break_lsn"] == lsn
    assert report["head"]["lsn"] == lsn - 1
    head = ChainHead(lsn - 1, bytes.fromhex(report["head"]["digest"]))
    assert verify(str(original), expected=head)["expect_head"]["extends"] is True


def test_two_records_swapped_under_valid_crcs_break_the_chain_at_the_first_of_them(ledger_path: Path, raw_lmdb) -> None:
    write_journal(ledger_path, 6)
    values = stored(raw_lmdb, ledger_path)
    rewrite(raw_lmdb, ledger_path, {2: reframe(2, *split(values[4])), 4: reframe(4, *split(values[2]))})

    assert chain_of(ledger_path).break_lsn == 2


def test_an_unchained_record_in_a_format_4_journal_breaks_the_chain(ledger_path: Path, raw_lmdb) -> None:
    write_journal(ledger_path, 6)
    rewrite(raw_lmdb, ledger_path, {2: frame_unchained(2, b"record 1")})

    report = chain_of(ledger_path)
    assert report.break_lsn == 2 and "unchained" in (report.problem or "")


@pytest.mark.parametrize("damage", ["the last record's payload", "the digest of the one before it"])
def test_a_writable_open_refuses_a_journal_whose_last_link_is_broken_naming_the_lsn(
    ledger_path: Path, raw_lmdb, damage: str
) -> None:
    write_journal(ledger_path, 6)
    values = stored(raw_lmdb, ledger_path)
    if damage == "the last record's payload":
        lsn, forged = 6, reframe(6, split(values[6])[0], b"rewritten")
    else:
        lsn, forged = 5, reframe(5, bytes(32), split(values[5])[1])
    rewrite(raw_lmdb, ledger_path, {lsn: forged})

    with pytest.raises(JournalCorruptedError) as caught:
        Journal.open(ledger_path)
    assert caught.value.lsn == 6 and "chain breaks" in str(caught.value)
    assert chain_of(ledger_path).break_lsn == lsn


def test_an_expected_head_is_extended_by_a_longer_journal_and_not_by_a_truncated_or_rewritten_one(
    ledger_path: Path, raw_lmdb
) -> None:
    write_journal(ledger_path, 4)
    noted = chain_of(ledger_path).head
    journal = Journal.open(ledger_path)
    try:
        for n in range(3):
            journal.append(f"later {n}".encode())
        journal.wait_durable(7, 10)
    finally:
        journal.close()
    assert chain_of(ledger_path, noted).diverges_at is None
    assert chain_of(ledger_path, ChainHead(0, GENESIS)).diverges_at is None

    values = stored(raw_lmdb, ledger_path)
    # Every digest from LSN 2 on recomputed: the chain holds, only the noted head tells.
    previous = split(values[1])[0]
    forged: dict[int, bytes | None] = {}
    for lsn in range(2, 8):
        payload = b"forged" if lsn == 2 else split(values[lsn])[1]
        previous = digest_of(previous, lsn, payload)
        forged[lsn] = reframe(lsn, previous, payload)
    rewrite(raw_lmdb, ledger_path, forged)
    report = chain_of(ledger_path, noted)
    assert report.break_lsn is None
    assert report.diverges_at == 4 and "rewritten" in (report.divergence or "")

    rewrite(raw_lmdb, ledger_path, {lsn: None for lsn in range(3, 8)})
    report = chain_of(ledger_path, noted)
    assert report.diverges_at == 3 and "truncated" in (report.divergence or "")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sessions=st.lists(st.lists(st.tuples(st.integers(1, 40), st.booleans()), min_size=1, max_size=6),
                        min_size=1, max_size=4))
def test_the_chain_continues_across_group_commits_blocks_and_reopens(tmp_path_factory, sessions) -> None:
    """Blocks of records, queued at once (several a group commit, by the writer thread) or
    written by the caller (`commit_inline`), over several opens: the stored chain is the one
    computed from the payloads alone."""
    path = tmp_path_factory.mktemp("chain") / "journal"
    payloads: list[bytes] = []
    for session in sessions:
        journal = Journal.open(path)
        try:
            for size, inline in session:
                block = [f"{len(payloads) + k}:{'x' * (k % 7)}".encode() for k in range(size)]
                journal.append_block(block, {}, [None] * size, wake=not inline)
                if inline:
                    journal.commit_inline()
                payloads += block
            journal.wait_durable(len(payloads), 10)
            head = journal.head()
        finally:
            journal.close()
    digest = GENESIS
    for lsn, payload in enumerate(payloads, 1):
        digest = digest_of(digest, lsn, payload)
    assert head == ChainHead(len(payloads), digest)
    report = chain_of(path)
    assert report.break_lsn is None and report.head == head


# --- the ledger and `tally verify` --------------------------------------------------


def renamed(payload: bytes) -> bytes:
    """Alice's account opening (LSN 2 of `build`) with its metadata rewritten: nothing else in
    the books says otherwise, so only the chain can tell."""
    record = msgpack.unpackb(payload)
    assert "alice" in record and {"name": "Alice"} in record, record
    return msgpack.packb([{"name": "Mallory"} if field == {"name": "Alice"} else field for field in record])


def test_ledger_head_is_what_verify_prints_and_survives_reopening(ledger_path: Path) -> None:
    head = build(ledger_path)
    assert isinstance(head, Head) and len(head.digest) == 64
    with Ledger.open(ledger_path) as ledger:
        assert ledger.head() == head
    done = tally("verify", ledger_path)
    code, report = tally_json("verify", ledger_path)
    assert done.returncode == 0 and code == 0
    assert f"head: {head.lsn}:{head.digest}" in done.stdout
    assert "chain: intact (SHA-256) from LSN 1" in done.stdout
    assert report["head"] == {"lsn": head.lsn, "digest": head.digest}
    assert report["chain"]["chained_from"] == 1 and report["chain"]["unchained_lsns"] is None
    assert report["checks"] == dict.fromkeys(CHECKS, True)


def test_verify_reports_a_record_rewritten_with_a_valid_crc_at_its_lsn(ledger_path: Path, raw_lmdb) -> None:
    build(ledger_path)
    digest, payload = split(stored(raw_lmdb, ledger_path)[2])
    rewrite(raw_lmdb, ledger_path, {2: reframe(2, digest, renamed(payload))})

    done = tally("verify", ledger_path)
    report = verify(str(ledger_path))

    assert done.returncode == 1 and "chain: BROKEN at LSN 2" in done.stdout
    assert report["corrupt_lsn"] == 2 and report["verdict"] == "NOT WHOLE"
    assert [check for check, passed in report["checks"].items() if not passed] == [CHECK_CHAIN]
    assert report["chain"]["break_lsn"] == 2


def test_expect_head_passes_on_an_extended_ledger_and_fails_naming_the_lsn_on_a_truncated_one(
    ledger_path: Path, raw_lmdb
) -> None:
    noted = build(ledger_path)
    with Ledger.open(ledger_path) as ledger:
        ledger.transfer("later", source="bank", destination="bob", amount=1)
        later = ledger.head()
    assert later.lsn > noted.lsn

    done = tally("verify", ledger_path, "--expect-head", str(noted))
    assert done.returncode == 0, done.stdout
    assert f"expected head {noted}: extended" in done.stdout

    rewrite(raw_lmdb, ledger_path, {lsn: None for lsn in range(noted.lsn, later.lsn + 1)})
    done = tally("verify", ledger_path, "--expect-head", str(noted))
    code, report = tally_json("verify", ledger_path, "--expect-head", str(noted))
    assert done.returncode == 1 and code == 1
    assert f"NOT extended: the ledger does not extend the head noted ({noted})" in done.stdout
    assert f"diverges at LSN {noted.lsn}" in done.stdout
    assert report["expect_head"]["extends"] is False and report["expect_head"]["diverges_at"] == noted.lsn


def test_expect_head_fails_on_a_history_rewritten_with_every_digest_recomputed(ledger_path: Path, raw_lmdb) -> None:
    noted = build(ledger_path)
    values = stored(raw_lmdb, ledger_path)
    previous = split(values[1])[0]
    forged: dict[int, bytes | None] = {}
    for lsn in range(2, noted.lsn + 1):
        payload = split(values[lsn])[1]
        if lsn == 2:
            payload = renamed(payload)
        previous = digest_of(previous, lsn, payload)
        forged[lsn] = reframe(lsn, previous, payload)
    rewrite(raw_lmdb, ledger_path, forged)

    code, report = tally_json("verify", ledger_path)  # the anchor kept the start of the digest at its LSN
    assert code == 1 and f"the record at LSN {noted.lsn} is not the one this directory's anchor saw" in report["problem"]
    (ledger_path / "tally.anchor").unlink()  # a forger who also makes the anchor anew
    assert tally("recover", ledger_path).returncode == 0
    assert tally("verify", ledger_path).returncode == 0  # a whole new history: only the noted head tells
    code, report = tally_json("verify", ledger_path, "--expect-head", str(noted))
    assert code == 1 and report["verdict"] == "NOT WHOLE"
    assert report["expect_head"]["diverges_at"] == noted.lsn and "rewritten" in report["expect_head"]["problem"]


def test_expect_head_that_is_not_a_head_is_a_usage_error(ledger_path: Path) -> None:
    build(ledger_path)
    for text in ("12", "x:" + "0" * 64, "3:abc", "3:" + "g" * 64, "0:" + "ab" * 32):
        done = tally("verify", ledger_path, "--expect-head", text)
        assert done.returncode == 2 and "LSN:DIGEST" in done.stderr, (text, done.stderr)


def test_a_format_1_ledger_opens_gets_chained_records_and_verify_names_the_unchained_prefix(tmp_path: Path) -> None:
    path = tmp_path / "format-1"
    shutil.copytree(FORMAT_1, path)
    (path / "expected.json").unlink()
    with Ledger.open(path) as ledger:
        before = ledger.head()
        assert before.digest == "0" * 64  # no record chained yet
        ledger.transfer("new", source="bank", destination="alice", amount=7)
        ledger.transfer("newer", source="bank", destination="bob", amount=7)
        after = ledger.head()
        assert ledger._journal.format_version == 1
    first = before.lsn + 1
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        assert [digest is None for digest in _digests(journal, after.lsn)] == [True] * before.lsn + [False] * (
            after.lsn - before.lsn)
    finally:
        journal.close()

    unvouched = tally("verify", path, "--expect-head", str(before))  # all zeros: nothing chains it
    assert unvouched.returncode == 1 and f"LSN {before.lsn} predates the chain" in unvouched.stdout
    done = tally("verify", path, "--expect-head", str(after))
    code, report = tally_json("verify", path)
    assert done.returncode == 0 and code == 0, done.stdout
    assert f"chain: LSN 1 to {before.lsn} predate the chain" in done.stdout and "format 1" in done.stdout
    assert f"chain: intact (SHA-256) from LSN {first} to {after.lsn}" in done.stdout
    assert report["chain"]["unchained_lsns"] == [1, before.lsn] and report["chain"]["chained_from"] == first
    assert report["head"] == {"lsn": after.lsn, "digest": after.digest}


def _digests(journal: Journal, last: int) -> list[bytes | None]:
    from journal._format import unframe_chained

    with journal.snapshot() as txn:
        return [unframe_chained(lsn, bytes(txn.get(lsn_key(lsn), db=journal._store.records)))[0]
                for lsn in range(1, last + 1)]


def test_an_unchained_record_after_a_chained_one_in_an_older_ledger_breaks_the_chain(
    tmp_path: Path, raw_lmdb
) -> None:
    path = tmp_path / "format-1"
    shutil.copytree(FORMAT_1, path)
    (path / "expected.json").unlink()
    with Ledger.open(path) as ledger:
        ledger.transfer("new", source="bank", destination="alice", amount=7)
        ledger.transfer("newer", source="bank", destination="bob", amount=7)
        ledger.transfer("newest", source="bank", destination="carol", amount=7)
        last = ledger.head().lsn
    _, payload = split(stored(raw_lmdb, path)[last - 1])
    rewrite(raw_lmdb, path, {last - 1: frame_unchained(last - 1, payload)})

    report = verify(str(path))
    assert report["chain"]["break_lsn"] == last - 1 and report["corrupt_lsn"] == last - 1
    assert report["verdict"] == "NOT WHOLE"


@pytest.mark.parametrize("command", [["recover", "--salvage"], ["replay"]])
def test_salvage_and_replay_copies_come_out_chained_in_the_new_ledger(tmp_path: Path, command: list[str]) -> None:
    source = tmp_path / "format-1"
    shutil.copytree(FORMAT_1, source)
    (source / "expected.json").unlink()
    done = tally(command[0], source, *command[1:], "--into", tmp_path / "new")
    assert done.returncode == 0, (done.stdout, done.stderr)

    code, report = tally_json("verify", tmp_path / "new")
    assert code == 0 and report["chain"]["chained_from"] == 1 and report["chain"]["unchained_lsns"] is None
    assert report["chain"]["format_version"] == 4 and report["head"]["lsn"] == report["last_lsn"] > 0
