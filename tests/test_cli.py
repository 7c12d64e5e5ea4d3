"""The `tally` operator commands, run as a real process against ledgers built with the public API.

Exit codes: 0 ok / whole, 1 not whole or a check failed, 2 could not run (one
line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shlex
import select
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lmdb
import msgpack
import pytest
from coordinator import CHECKS, INDEX_NAMES
from coordinator import _audit, _recovery
from coordinator._audit import CHECK_RECORDS
from engine import CurrencyMismatch, InsufficientFunds, JournalCorrupted, Ledger, LedgerLocked, NotALedger, TransferRequest
from engine import _cli, _cli_parse, _cli_render, _readonly, _tools_audit, _tools_copy, _tools_read, _tools_salvage
from engine._history import History
from journal import ANCHOR_FILE, COPY_STAGING_PREFIXES, FORMAT_VERSION, Journal, lsn_key
from journal import _directory
from journal._directory import LOCK_FILE
from journal._anchor import create_anchor, read_anchor

ROOT = Path(__file__).resolve().parents[1]
CLI_TIMEOUT_S = 60.0
HOLDER_TIMEOUT_S = 30.0
COMMIT, REJECT, TRANSFER3, REFUSAL3, PLAIN3 = 2, 3, 6, 7, 10  # record kinds, as the journal stores them
"""Record kinds, as the journal stores them (the first element of each msgpack record)."""


def tally(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run `python -m engine ARGS` from this tree (bounded), `env` added to the environment."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT, env=env)


def tally_json(*args: str | Path) -> tuple[int, dict]:
    done = tally(*args, "--json")
    assert done.stderr == "", done.stderr
    return done.returncode, json.loads(done.stdout)


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def journal_transfer_ids(path: Path) -> dict[int, str]:
    """LSN -> transfer id of every commit and refusal record, read from the journal layer alone."""
    journal = Journal.open_readonly(path, index_names=INDEX_NAMES)
    try:
        ids: dict[int, str] = {}
        for lsn, payload in journal.scan(0):
            record = msgpack.unpackb(payload)
            if record[0] in (COMMIT, REJECT):
                ids[lsn] = record[1]
            elif record[0] in (TRANSFER3, REFUSAL3):  # the first leg's (or refused request's) id
                ids[lsn] = record[3 if record[0] == TRANSFER3 else 5][1]
            elif record[0] == PLAIN3:
                ids[lsn] = record[2]
        return ids
    finally:
        journal.close()


@dataclass
class Built:
    """A closed ledger and what the API said about it while it was open."""

    path: Path
    state_hash: str
    last_lsn: int
    committed: dict[str, tuple[str, str, int, int]]
    """transfer id -> (source, destination, amount, lsn)"""
    refused: dict[str, str]
    """transfer id -> refusal code"""
    balances: dict[str, int]
    entries: dict[str, list[tuple[int, str, int, int, int]]]
    """account -> [(seq, transfer id, amount, balance, lsn)]"""


@pytest.fixture
def built(tmp_path: Path) -> Built:
    path = tmp_path / "ledger"
    committed: dict[str, tuple[str, str, int, int]] = {}
    refused: dict[str, str] = {}
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in ("alice", "bob", "carol"):
            ledger.create_account(name, currency="USD")
        ledger.create_account("euro", currency="EUR")
        for n, name in enumerate(("alice", "bob", "carol", "alice")):
            ledger.transfer(f"fund-{n}", source="bank", destination=name, amount=1_000 + n)
        with pytest.raises(InsufficientFunds) as raised:
            ledger.transfer("refused-alice", source="alice", destination="bob", amount=10**9)
        refused["refused-alice"] = raised.value.code
        with pytest.raises(CurrencyMismatch) as raised:
            ledger.transfer("refused-euro", source="bob", destination="euro", amount=5)
        refused["refused-euro"] = raised.value.code
        batch = [TransferRequest(f"move-{n}", ("alice", "bob", "carol")[n % 3], ("bob", "carol", "alice")[n % 3], 7 + n)
                 for n in range(9)]
        assert all(outcome.id == request.id for request, outcome in zip(batch, ledger.transfer_many(batch), strict=True))
        ledger.transfer("last", source="carol", destination="bank", amount=3)
        for tid in [f"fund-{n}" for n in range(4)] + [request.id for request in batch] + ["last"]:
            transfer = ledger.get_transfer(tid)
            assert transfer is not None
            committed[tid] = (transfer.source, transfer.destination, transfer.amount, transfer.lsn)
        accounts = [account.id for account in ledger.accounts()]
        balances = {account: ledger.balance(account).posted for account in accounts}
        entries = {account: [(e.seq, e.transfer_id, e.amount, e.balance, e.lsn) for e in ledger.entries(account)]
                   for account in accounts}
        state_hash = ledger.state_hash()
    last_lsn = max(lsn for *_, lsn in committed.values())
    return Built(path, state_hash, last_lsn, committed, refused, balances, entries)


# --- verify ----------------------------------------------------------------------


def test_an_interrupt_while_tally_imports_the_engine_ends_it_with_one_line_not_a_traceback() -> None:
    """`tally` (`engine._entry`) is running before the engine's ~0.2 s of imports begin: an
    interrupt landing in them (an import hook raises it at the first layer below `engine`, as
    a Ctrl-C would) ends the command with exit 130 and one line, as an interrupt does later.
    The import of the entry point itself imports none of the engine (the hook would fire)."""
    code = """
import sys

class Interrupting:
    def find_spec(self, name, path=None, target=None):
        if name == "coordinator":
            raise KeyboardInterrupt
        return None

sys.meta_path.insert(0, Interrupting())
from engine._entry import main
sys.exit(main())
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "tally: interrupted\n")


def test_the_tally_command_is_the_entry_point_and_engine_imports_its_public_names_when_asked() -> None:
    """pyproject's `tally` names `engine._entry:main`; `import engine` imports no layer, and each
    public name is there once asked for, the same object as in its home module."""
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'tally = "engine._entry:main"' in pyproject
    code = """
import sys
import engine
assert not {"coordinator", "journal", "engine._ledger"} & set(sys.modules), sorted(sys.modules)
import coordinator
from engine import *  # noqa: F403
assert engine.Ledger is __import__("engine._ledger", fromlist=["Ledger"]).Ledger
assert engine.Transfer is coordinator.Transfer and "Ledger" in dir(engine)
try:
    engine.Nothing
except AttributeError as error:
    assert "Nothing" in str(error)
else:
    raise AssertionError("no AttributeError")
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")


def test_engines_type_checking_imports_name_exactly_the_homes_it_imports_from_when_asked() -> None:
    """`engine/__init__.py` lists each public name twice: imported under `TYPE_CHECKING` (what
    type checkers see) and in `_HOMES` (what `__getattr__` imports): the two agree."""
    import ast

    import engine

    tree = ast.parse(Path(engine.__file__).read_text())
    checked = [node for node in tree.body if isinstance(node, ast.If) and isinstance(node.test, ast.Name)
               and node.test.id == "TYPE_CHECKING"][0]
    imported = {alias.name: node.module for node in checked.body if isinstance(node, ast.ImportFrom)
                for alias in node.names if node.module != "typing"}
    assert imported == engine._HOMES
    assert sorted([*imported, "__version__"]) == sorted(engine.__all__)


def test_verify_of_a_whole_ledger_exits_0_and_marks_every_check_passed(built: Built) -> None:
    done = tally("verify", built.path)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "verdict: whole" in done.stdout
    assert done.stdout.count("✓") == len(CHECKS)
    assert "✗" not in done.stdout and done.stderr == ""


def test_verify_json_says_whole_with_every_check_true_and_the_apis_state_hash(built: Built) -> None:
    code, report = tally_json("verify", built.path)

    assert code == 0
    assert report["verdict"] == "whole"
    assert report["checks"] == dict.fromkeys(CHECKS, True)
    assert report["state_hash"] == built.state_hash
    assert report["transfers_committed"] == len(built.committed)
    assert report["transfers_rejected"] == len(built.refused)
    assert report["accounts"] == len(built.balances)
    assert report["last_lsn"] == report["records_scanned"] == built.last_lsn
    assert report["problem"] is None and report["corrupt_lsn"] is None


def test_verify_never_writes(built: Built) -> None:
    before = file_digest(built.path / "data.mdb")
    assert tally("verify", built.path).returncode == 0
    assert file_digest(built.path / "data.mdb") == before


# --- inspect ---------------------------------------------------------------------


def test_inspect_prints_one_line_per_record_in_lsn_order(built: Built) -> None:
    done = tally("inspect", built.path)

    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert [int(line.split()[0]) for line in lines] == list(range(1, built.last_lsn + 1))
    for tid, (source, destination, amount, lsn) in built.committed.items():
        assert lines[lsn - 1].split() == [str(lsn), "commit", tid, source, "->", destination, str(amount)]
    refusal = next(line for line in lines if " refused-alice " in line)
    assert refusal.split()[1] == "reject" and refusal.endswith("refused: insufficient_funds")


def test_inspect_json_rows_carry_what_the_api_committed_and_refused(built: Built) -> None:
    code, report = tally_json("inspect", built.path)

    assert code == 0 and report["problem"] is None
    rows = {row["lsn"]: row for row in report["records"]}
    assert sorted(rows) == list(range(1, built.last_lsn + 1))
    for tid, (source, destination, amount, lsn) in built.committed.items():
        row = rows[lsn]
        assert (row["kind"], row["transfer"], row["source"], row["destination"], row["amount"]) == (
            "commit", tid, source, destination, amount)
    for account, entries in built.entries.items():
        for seq, tid, amount, balance, lsn in entries:
            side = "source" if amount < 0 else "destination"
            assert (rows[lsn]["transfer"], rows[lsn][f"{side}_seq"], rows[lsn][f"{side}_balance"], rows[lsn][side]) == (
                tid, seq, balance, account)
    rejects = {row["transfer"]: row["code"] for row in rows.values() if row["kind"] == "reject"}
    assert {tid: rejects[tid] for tid in built.refused} == built.refused
    opened = [row["account"] for row in rows.values() if row["kind"] == "account"]
    assert opened == list(built.balances)


def test_inspect_from_and_limit_show_a_window_of_lsns(built: Built) -> None:
    code, report = tally_json("inspect", built.path, "--from", "5", "--limit", "3")

    assert code == 0
    assert [row["lsn"] for row in report["records"]] == [5, 6, 7]


def test_inspect_from_past_the_last_lsn_shows_nothing(built: Built) -> None:
    done = tally("inspect", built.path, "--from", str(built.last_lsn + 1))

    assert done.returncode == 0 and done.stdout == ""


def test_inspect_transfer_shows_only_that_transfers_record(built: Built) -> None:
    code, report = tally_json("inspect", built.path, "--transfer", "move-4")

    assert code == 0
    assert [(row["lsn"], row["transfer"]) for row in report["records"]] == [(built.committed["move-4"][3], "move-4")]


def test_inspect_account_shows_its_opening_and_every_record_touching_it(built: Built) -> None:
    code, report = tally_json("inspect", built.path, "--account", "carol")

    assert code == 0
    rows = report["records"]
    assert rows[0]["kind"] == "account" and rows[0]["account"] == "carol"
    touching = {tid for tid, (source, destination, *_) in built.committed.items() if "carol" in (source, destination)}
    assert {row["transfer"] for row in rows[1:]} == touching
    assert [row["lsn"] for row in rows] == sorted(row["lsn"] for row in rows)


# --- balance and history ---------------------------------------------------------


@pytest.mark.parametrize("account", ["bank", "alice", "bob", "carol", "euro"])
def test_balance_reports_the_posted_balance_and_entry_count_the_api_reports(built: Built, account: str) -> None:
    code, report = tally_json("balance", built.path, account)

    assert code == 0
    assert report["posted"] == built.balances[account]
    assert report["entries"] == len(built.entries[account])
    assert report["last_lsn"] == (built.entries[account][-1][4] if built.entries[account] else None)


def test_balance_prints_the_posted_balance_and_currency(built: Built) -> None:
    done = tally("balance", built.path, "carol")

    assert done.returncode == 0
    assert done.stdout.startswith(f"carol: posted {built.balances['carol']} USD, pending 0, available ")


def test_balance_of_an_account_with_no_entry_says_so_rather_than_name_no_lsn(built: Built) -> None:
    done = tally("balance", built.path, "euro")

    assert done.returncode == 0
    assert done.stdout == "euro: posted 0 EUR, pending 0, available 0, incoming 0 (no entries yet)\n"


def test_history_lists_the_latest_entries_exactly_as_the_api_does(built: Built) -> None:
    code, report = tally_json("history", built.path, "alice", "--limit", "3")

    assert code == 0
    assert report["entries_total"] == len(built.entries["alice"])
    assert [(e["seq"], e["transfer"], e["amount"], e["balance"], e["lsn"]) for e in report["entries"]] == (
        built.entries["alice"][-3:])


def test_history_without_a_limit_shows_every_entry_of_a_short_history(built: Built) -> None:
    done = tally("history", built.path, "bob")

    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"bob (USD), {len(built.entries['bob'])} entries")
    transfers_at = lines.index("latest transfers, newest first:")
    assert [line.split()[4] for line in lines[1:transfers_at]] == [tid for _, tid, *_ in built.entries["bob"]]
    touching = [tid for tid, (source, destination, *_) in built.committed.items() if "bob" in (source, destination)]
    assert sorted(line.split()[4] for line in lines[transfers_at + 1:]) == sorted(touching)


@pytest.mark.parametrize("limit", [0, 2, 7, 20])
def test_history_pages_through_transfers_past_a_page_s_maximum(built: Built, monkeypatch: pytest.MonkeyPatch,
                                                                limit: int) -> None:
    """An account's latest transfers were one page, so a limit above a page's maximum (10,000)
    gave that many and no more, without a word; they are read page by page now (here with
    pages of 3, so the paging is what is tested)."""
    monkeypatch.setattr(_tools_read, "TRANSFERS_PAGE_MAX", 3)
    report = _tools_read.history(str(built.path), "alice", limit)
    with Ledger.open(built.path, readonly=True) as ledger:
        every = ledger.transfers(account="alice", limit=10_000, reverse=True)
    assert len(every) > 7
    assert [transfer["id"] for transfer in report["transfers"]] == [transfer.id for transfer in every][:limit or None]


def test_history_ends_before_a_chain_that_would_take_it_past_its_limit_as_one_page_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of 3 (patched), a limit of 4: three transfers fill the first page, and the one
    left for the next is a chain of two legs, which a page of one returns whole (a chain alone
    longer than its page); one page of 4 ends before it, and so does `tally history`."""
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        for name in ("z", "a", "b"):
            ledger.create_account(name, currency="USD")
        ledger.transfer_linked([TransferRequest("c-1", "bank", "z", 50), TransferRequest("c-2", "z", "a", 20)])
        for n in range(3):
            ledger.transfer(f"s-{n}", source="bank", destination="z", amount=1)
        one_page = [t.id for t in ledger.transfers(account="z", reverse=True, limit=4)]
    monkeypatch.setattr(_tools_read, "TRANSFERS_PAGE_MAX", 3)
    shown = [row["id"] for row in _tools_read.history(str(path), "z", 4)["transfers"]]
    assert one_page == ["s-2", "s-1", "s-0"]
    assert shown == one_page


# --- replay ----------------------------------------------------------------------


def test_replay_into_a_new_directory_is_identical_and_the_copy_opens_with_the_same_state_hash(
    built: Built, tmp_path: Path
) -> None:
    code, report = tally_json("replay", built.path, "--into", tmp_path / "copy")

    assert code == 0
    assert report["verdict"] == "identical"
    assert report["state_hash_original"] == report["state_hash_replayed"] == built.state_hash
    assert report["transfers_replayed"] == len(built.committed)
    with Ledger.open(tmp_path / "copy") as copy:
        assert copy.state_hash() == built.state_hash
        assert copy.get_transfer("move-8") is not None


def test_replay_into_a_directory_that_is_not_empty_is_refused_and_writes_nothing(built: Built, tmp_path: Path) -> None:
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")

    done = tally("replay", built.path, "--into", occupied)

    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "not empty" in done.stderr
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize("command", [["replay"], ["recover", "--salvage"]])
def test_a_copy_into_a_file_says_it_is_not_a_directory_and_leaves_it_as_it_was(
        built: Built, tmp_path: Path, command: list[str]) -> None:
    (tmp_path / "file").write_bytes(b"")

    done = tally(command[0], built.path, *command[1:], "--into", tmp_path / "file")

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"tally {command[0]}: {tmp_path / 'file'} exists and is not a directory: choose a new directory\n"
    assert (tmp_path / "file").read_bytes() == b""


# --- recover ---------------------------------------------------------------------


@pytest.mark.parametrize("later", ["2099-01-01T00:00:00Z", "2300-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999Z"])
def test_balance_at_a_time_outside_an_accounts_life_is_refused_in_the_flags_terms(built: Built, later: str) -> None:
    """Also a time of 20 digits of nanoseconds or more (from late 2286 on)."""
    future = tally("balance", built.path, "alice", "--at", later)
    past = tally("balance", built.path, "alice", "--at", "2020-01-01")

    assert future.returncode == past.returncode == 2 and future.stdout == past.stdout == ""
    assert future.stderr.startswith(f"tally balance: --at {later} is still to come (the ledger's clock reads 20")
    assert past.stderr.startswith("tally balance: account 'alice' did not exist yet at 2020-01-01T00:00:00Z (")
    assert "at_timestamp" not in future.stderr + past.stderr


def test_balance_at_an_lsn_past_the_end_is_refused_in_the_flags_terms(built: Built) -> None:
    done = tally("balance", built.path, "alice", "--at-lsn", "99999")

    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("tally balance: --at-lsn 99999 is past the durable end of the journal (LSN ")
    assert "at_lsn" not in done.stderr


@pytest.mark.parametrize("more", [[], ["--account", "alice", "--json"]])
def test_inspect_of_a_transfer_id_with_no_record_gives_one_line_on_stderr_and_exit_2(built: Built, more: list[str]) -> None:
    """As balance and history refuse an account the ledger has not."""
    done = tally("inspect", built.path, "--transfer", "nope", *more)

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"tally inspect: no record of transfer 'nope' in {built.path}: no such id, or it is still in flight\n"


def test_inspect_of_a_transfer_not_among_the_records_asked_for_does_not_call_its_id_unknown(built: Built) -> None:
    """fund-1 is bank -> bob: there is a record of it, none of it touching alice."""
    done = tally("inspect", built.path, "--transfer", "fund-1", "--account", "alice")

    assert done.returncode == 0 and done.stderr == ""
    lsn = built.committed["fund-1"][3]
    assert done.stdout == (f"no record of transfer 'fund-1' touching account 'alice': its record, at LSN {lsn}, names"
                           " other accounts\n")
    assert tally("inspect", built.path, "--transfer", "fund-1", "--from", str(lsn + 1)).stdout == (
        f"no record of transfer 'fund-1' at or after LSN {lsn + 1}: its record is at LSN {lsn}\n")


def test_recover_dry_run_changes_no_byte_and_says_where_it_would_checkpoint(built: Built) -> None:
    before = file_digest(built.path / "data.mdb")

    code, report = tally_json("recover", built.path, "--dry-run")

    assert code == 0
    assert report["verdict"] == "whole" and report["dry_run"] is True
    assert report["would_write_checkpoint_at"] == built.last_lsn + 1
    assert "checkpoint_written_at" not in report
    assert file_digest(built.path / "data.mdb") == before
    with Ledger.open(built.path) as ledger:
        assert ledger.recovered.records == built.last_lsn


@pytest.mark.parametrize(("lock_file", "command"), [("lock.mdb", ["verify"]), ("lock.mdb", ["recover"]),
                                                     ("lock.mdb", ["recover", "--dry-run"]), (LOCK_FILE, ["verify"]),
                                                     (LOCK_FILE, ["recover"]), (LOCK_FILE, ["recover", "--dry-run"])])
def test_a_lock_file_that_is_no_regular_file_is_named_and_the_data_file_not_called_damaged(
        built: Built, lock_file: str, command: list[str]) -> None:
    """It holds no history (only locks, and LMDB's table of readers): removing it mends the
    ledger, and the report says so; neither a backup nor a new anchor is called for. (Verify
    takes no lock, so it never opens the directory's lock file; it looks at it, as every open
    refuses the directory while it is no regular file.)"""
    (built.path / lock_file).unlink(missing_ok=True)
    os.mkfifo(built.path / lock_file)
    before = file_digest(built.path / "data.mdb")

    done = tally(command[0], built.path, *command[1:])
    code, report = tally_json(command[0], built.path, *command[1:])

    assert done.returncode == 1 and code == 1, done.stdout + done.stderr
    assert report["damaged"] == str(built.path / lock_file) and report["verdict"] == "NOT WHOLE"
    assert "data file is damaged" not in done.stdout and "backup" not in done.stdout, done.stdout
    assert ANCHOR_FILE not in done.stdout, done.stdout
    assert f"{built.path / lock_file} is no regular file" in done.stdout, done.stdout
    if command[0] == "recover":
        assert f"remove it and run `tally recover {built.path}`" in done.stdout, done.stdout
    assert file_digest(built.path / "data.mdb") == before
    (built.path / lock_file).unlink()
    assert tally("verify", built.path).returncode == 0


def test_verify_reads_the_whole_history_of_a_directory_whose_lock_file_is_a_fifo_and_calls_it_not_whole(
        built: Built) -> None:
    """The history is whole, and verify (which takes no lock) audits all of it; but an open
    refuses the directory, so verify does not call it whole: it names the lock file as the open
    does, and never opens the FIFO (which would wait for a writer that never comes)."""
    (built.path / LOCK_FILE).unlink(missing_ok=True)
    os.mkfifo(built.path / LOCK_FILE)
    with pytest.raises(JournalCorrupted) as refused:
        Ledger.open(built.path)

    code, report = tally_json("verify", built.path)

    assert code == 1 and report["verdict"] == "NOT WHOLE"
    assert report["problem"] == str(refused.value) and report["damaged"] == refused.value.where
    assert report["records_scanned"] == report["last_lsn"] == built.last_lsn and report["state_hash"] == built.state_hash
    assert [check for check, passed in report["checks"].items() if not passed] == [_tools_audit.CHECK_LOCK_FILE]
    assert stat.S_ISFIFO(os.lstat(built.path / LOCK_FILE).st_mode)


def test_recover_dry_run_of_a_whole_journal_without_its_anchor_points_to_recover_in_place(built: Built) -> None:
    (built.path / ANCHOR_FILE).unlink()

    dry = tally("recover", built.path, "--dry-run")

    assert dry.returncode == 1, dry.stdout
    assert f"`tally recover {built.path}` writes the anchor" in dry.stdout and "--salvage" not in dry.stdout
    assert tally("recover", built.path).returncode == 0
    assert (built.path / ANCHOR_FILE).exists()


@pytest.mark.parametrize("damage", ["a data file of garbage, no anchor", "a truncated data file, its anchor kept"])
def test_recover_of_a_journal_it_cannot_read_prints_no_figure_and_names_no_anchor_to_remove(
        built: Built, damage: str) -> None:
    data = built.path / "data.mdb"
    if damage.startswith("a data file of garbage"):
        (built.path / ANCHOR_FILE).unlink()
        data.write_bytes(bytes(range(256)) * 64)
    else:
        data.write_bytes(data.read_bytes()[:len(data.read_bytes()) // 2])

    done = tally("recover", built.path)
    code, report = tally_json("recover", built.path, "--dry-run")

    assert done.returncode == code == 1 and done.stderr == ""
    assert "in doubt" not in done.stdout and "aborted by recovery" not in done.stdout, done.stdout
    # (half a file may hold a snapshot's catalog, or not: where LMDB put it; garbage holds none)
    assert report["salvage_reads_around"] is not damage.startswith("a data file of garbage") or not report[
        "salvage_reads_around"]
    advice = ("  the journal could not be opened (the problem above): nothing was changed. Restore the ledger from a"
              f" backup, or `tally recover {built.path} --salvage --into NEW` copies the records it can still read,"
              ' around the damaged pages, up to the first one lost (README.md, "Damage")\n') if report[
        "salvage_reads_around"] else ("  the journal could not be read (the problem above): nothing was changed."
                                      ' Restore the ledger from a backup (README.md, "Damage")\n')
    assert ANCHOR_FILE not in done.stdout and done.stdout.endswith(advice), done.stdout
    assert report["in_doubt"] is None and report["last_lsn"] is None


def test_recover_of_a_journal_that_went_on_elsewhere_points_to_removing_its_anchor(built: Built, tmp_path: Path) -> None:
    """A copy of the ledger written elsewhere, its data file copied back: the one case where
    removing the anchor keeps a history (README.md, "Damage")."""
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(built.path, elsewhere)
    for path, tid in ((built.path, "here"), (elsewhere, "there")):
        with Ledger.open(path) as ledger:
            ledger.transfer(tid, source="bank", destination="alice", amount=1)
    shutil.copyfile(elsewhere / "data.mdb", built.path / "data.mdb")

    code, report = tally_json("recover", built.path, "--dry-run")
    done = tally("recover", built.path, "--dry-run")

    assert code == done.returncode == 1 and report["anchor_missing"] is False and report["in_doubt"] is None
    assert f"remove {built.path}/{ANCHOR_FILE} and run `tally recover {built.path}`" in done.stdout
    assert "in doubt" not in done.stdout


@pytest.mark.parametrize("last", ["expiry", "linked"])
def test_recover_names_the_last_durable_record_of_every_kind(tmp_path: Path, last: str) -> None:
    now = [1_700_000_000_000_000_000]
    with Ledger.open(tmp_path / "ledger", clock_ns=lambda: now[0]) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        ledger.create_account("b", currency="USD")
        if last == "expiry":
            ledger.transfer("hold", source="bank", destination="a", amount=5, pending=True, timeout_s=1)
            now[0] += 2_000_000_000
            assert ledger.expire_pending() == 1
        else:
            ledger.transfer_linked([TransferRequest("l-0", "bank", "a", 5), TransferRequest("l-1", "a", "b", 5)])

    done = tally("recover", tmp_path / "ledger", "--dry-run")

    assert done.returncode == 0, done.stdout
    named = {"expiry": "expiry of 1 pending transfer\n", "linked": "commit of a linked chain of 2 (l-0, ...)\n"}
    assert named[last] in done.stdout and "None" not in done.stdout


def test_recover_writes_a_checkpoint_after_which_a_reopen_replays_no_record(built: Built) -> None:
    code, report = tally_json("recover", built.path)

    assert code == 0
    assert report["verdict"] == "whole" and report["dry_run"] is False
    assert report["replayed_past_checkpoint"] == built.last_lsn
    assert report["checkpoint_written_at"] == built.last_lsn + 1
    with Ledger.open(built.path) as ledger:
        assert ledger.recovered.checkpoint_lsn == report["checkpoint_written_at"]
        assert ledger.recovered.records == 0
        assert ledger.state_hash() == built.state_hash


def test_recover_of_a_just_recovered_ledger_has_nothing_left_to_do(built: Built) -> None:
    assert tally("recover", built.path).returncode == 0
    before = file_digest(built.path / "data.mdb")

    code, report = tally_json("recover", built.path)

    assert code == 0
    assert report["replayed_past_checkpoint"] == 0
    assert "checkpoint_written_at" not in report
    assert file_digest(built.path / "data.mdb") == before


def test_recover_prints_its_verdict_and_the_checkpoint_it_wrote(built: Built) -> None:
    done = tally("recover", built.path)

    assert done.returncode == 0
    assert "verdict: whole" in done.stdout
    assert f"wrote a checkpoint at LSN {built.last_lsn + 1}" in done.stdout


# --- a damaged record ------------------------------------------------------------


@dataclass
class Corrupted:
    built: Built
    lsn: int
    """The damaged record."""
    digest: str
    """Of data.mdb, just after the damage."""
    transfer_ids: dict[int, str]
    """LSN -> transfer id of every commit and refusal, read before the damage."""
    damage: str
    """The fixture's parameter: "a flipped byte" or "a missing record"."""


@pytest.fixture(params=["a flipped byte", "a missing record"])
def corrupted(
    request: pytest.FixtureRequest,
    built: Built,
    flip_record_byte: Callable[[Path, int], None],
    raw_lmdb: Callable[[Path], AbstractContextManager[lmdb.Environment]],
) -> Corrupted:
    """`built` with move-4's commit record damaged: one payload byte flipped, or the record deleted."""
    lsn = built.committed["move-4"][3]
    transfer_ids = journal_transfer_ids(built.path)
    if request.param == "a flipped byte":
        flip_record_byte(built.path, lsn)
    else:
        with raw_lmdb(built.path) as env:
            records = env.open_db(b"records", create=False)
            with env.begin(write=True, db=records) as txn:
                assert txn.delete(lsn_key(lsn))
    return Corrupted(built, lsn, file_digest(built.path / "data.mdb"), transfer_ids, request.param)


@pytest.mark.parametrize("command", [["verify"], ["recover"], ["recover", "--dry-run"]])
def test_a_damaged_record_makes_verify_and_recover_exit_1_naming_its_lsn_and_change_nothing(
    corrupted: Corrupted, command: list[str]
) -> None:
    built, lsn, digest = corrupted.built, corrupted.lsn, corrupted.digest

    done = tally(command[0], built.path, *command[1:])
    code, report = tally_json(command[0], built.path, *command[1:])

    assert done.returncode == 1 and code == 1
    assert f"LSN {lsn}" in done.stdout and "verdict: NOT WHOLE" in done.stdout
    assert "None" not in done.stdout and "newest checkpoint" not in done.stdout, done.stdout  # (no figure it has not)
    assert done.stderr == ""
    assert report["corrupt_lsn"] == lsn
    assert report["verdict"] == "NOT WHOLE"
    assert report["checks"][CHECK_RECORDS] is False
    assert "checkpoint_written_at" not in report and report["state_hash"] is None
    assert file_digest(built.path / "data.mdb") == digest


def test_a_replay_of_a_damaged_journal_exits_1_naming_its_lsn_and_makes_nothing(corrupted: Corrupted,
                                                                                tmp_path: Path) -> None:
    """The ledger is not whole (exit 1, as README.md's replay row says), not a replay that could not run (2)."""
    done = tally("replay", corrupted.built.path, "--into", tmp_path / "copy")

    assert (done.returncode, done.stdout) == (1, "")
    (line,) = done.stderr.splitlines()
    assert line.startswith("tally replay: ") and f"LSN {corrupted.lsn}" in line
    assert not (tmp_path / "copy").exists()


def test_the_help_of_tail_says_its_json_is_an_object_an_event() -> None:
    done = tally("tail", "--help")

    assert done.returncode == 0
    assert "print each event as a JSON object, one a line" in " ".join(done.stdout.split())
    assert "the report" not in done.stdout


def test_inspect_stops_at_a_damaged_record_and_exits_1(corrupted: Corrupted) -> None:
    built, lsn = corrupted.built, corrupted.lsn

    code, report = tally_json("inspect", built.path)

    assert code == 1
    assert [row["lsn"] for row in report["records"]] == list(range(1, lsn))
    assert f"LSN {lsn}" in report["problem"]


def test_salvage_copies_the_records_before_a_damaged_one_and_lists_every_transfer_after_it_as_lost(
    corrupted: Corrupted, tmp_path: Path
) -> None:
    built, lsn, digest = corrupted.built, corrupted.lsn, corrupted.digest
    assert lsn < built.last_lsn - 2, "the fixture should corrupt a record with transfers after it"

    code, report = tally_json("recover", built.path, "--salvage", "--into", tmp_path / "salvaged")

    assert code == 1  # the ledger is not whole: records were lost
    assert report["whole"] is False
    assert report["first_corrupt_lsn"] == lsn and report["records_copied"] == lsn - 1
    why = "this record is corrupt" if corrupted.damage == "a flipped byte" else "missing from the journal"
    assert report["lost"][0] == {"lsn": lsn, "transfer": None, "why": f"{why}: whatever it held is lost"}
    after = [(at, tid) for at, tid in sorted(corrupted.transfer_ids.items()) if at > lsn]
    assert [(row["lsn"], row["transfer"]) for row in report["lost"][1:]] == after
    assert file_digest(built.path / "data.mdb") == digest
    assert tally("verify", tmp_path / "salvaged").returncode == 0
    with Ledger.open(tmp_path / "salvaged") as salvaged:
        for tid, (source, destination, amount, at) in built.committed.items():
            found = salvaged.get_transfer(tid)
            if at < lsn:
                assert found is not None and (found.source, found.destination, found.amount) == (source, destination, amount)
            else:
                assert found is None, tid


def test_text_reports_show_control_characters_in_ids_escaped(tmp_path: Path) -> None:
    """An id may hold any character: a newline in one must not forge a line of a report, nor
    an escape sequence drive the terminal. The JSON reports keep them as they are."""
    forged = "t-1\n         9  commit      FORGED  alice -> bank  1000000"
    painted = "\x1b[2J\x1b[31mred\u202e"
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account(painted, currency="USD")
        ledger.transfer(forged, source="bank", destination=painted, amount=5)
    inspect = tally("inspect", tmp_path / "l")
    assert inspect.returncode == 0 and len(inspect.stdout.splitlines()) == 3, inspect.stdout
    assert "t-1\\n         9  commit      FORGED" in inspect.stdout
    balance = tally("balance", tmp_path / "l", painted)
    assert balance.returncode == 0 and balance.stdout.startswith("\\x1b[2J\\x1b[31mred\\u202e: posted 5 USD")
    assert "\x1b" not in inspect.stdout + balance.stdout and "\u202e" not in balance.stdout
    code, report = tally_json("balance", tmp_path / "l", painted)
    assert code == 0 and report["account"] == painted


def test_a_count_of_one_says_its_noun_in_the_singular(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer("t-1", source="bank", destination="alice", amount=5)
        with pytest.raises(InsufficientFunds):
            ledger.transfer("t-2", source="alice", destination="bank", amount=50)

    balance, history = tally("balance", path, "alice"), tally("history", path, "alice")
    replay = tally("replay", path, "--into", tmp_path / "copy")
    _cli_render.render_inspect({"records": [{"lsn": 9, "kind": "checkpoint", "accounts": 1, "pending": 1}], "problem": None})

    assert balance.stdout.endswith(" (1 entry, last LSN 3)\n"), balance.stdout
    assert history.stdout.startswith("alice (USD), 1 entry; the latest, in seq order:\n"), history.stdout
    assert replay.stdout.startswith(f"replay {path} -> {tmp_path / 'copy'}: 1 transfer (1 rejection not replayed) in ")
    assert capsys.readouterr().out == "         9  checkpoint  1 account, 1 pending transfer open\n"


def test_replays_text_report_is_four_lines(built: Built, tmp_path: Path) -> None:
    done = tally("replay", built.path, "--into", tmp_path / "copy")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 4 and "\\n" not in done.stdout, done.stdout


def test_a_dry_run_of_a_salvage_is_refused_and_writes_nothing(built: Built, tmp_path: Path) -> None:
    """--dry-run promises no change; a salvage's whole work is writing NEW: refused, not ignored."""
    done = tally("recover", built.path, "--dry-run", "--salvage", "--into", tmp_path / "copy")
    assert done.returncode == 2 and "--dry-run does not go with --salvage" in done.stderr, done.stderr
    assert not (tmp_path / "copy").exists()


@pytest.mark.parametrize("new", ["missing", "an empty directory", "a symlink to an empty directory",
                                 "missing, with its parents"])
def test_salvage_of_a_whole_ledger_reports_nothing_lost(built: Built, tmp_path: Path, new: str) -> None:
    """NEW may be missing (its parents too), an empty directory, or a symlink to one: the copy
    is built inside it and lands there, with nothing of the building left."""
    into = tmp_path / "copy"
    if new == "an empty directory":
        into.mkdir()
    elif new == "a symlink to an empty directory":
        (tmp_path / "target").mkdir()
        into.symlink_to(tmp_path / "target")
    elif new == "missing, with its parents":
        into = tmp_path / "deep" / "er" / "copy"
    code, report = tally_json("recover", built.path, "--salvage", "--into", into)

    assert code == 0
    assert report["first_corrupt_lsn"] is None and report["whole"] is True
    assert report["records_copied"] == built.last_lsn
    assert report["lost"] == []
    assert not [name for name in os.listdir(into) if "salvaging" in name]
    copy_code, copy = tally_json("verify", into)
    assert copy_code == 0 and copy["state_hash"] == built.state_hash


def test_salvage_of_a_ledger_without_its_anchor_copies_what_precedes_a_damaged_record_as_with_it(
    built: Built, flip_record_byte: Callable[[Path, int], None], tmp_path: Path
) -> None:
    """The missing anchor is reported, and the rest audited as `recover` audits it: it used
    to stop the audit at the data file's check, so the copy ran into the damaged record and
    failed, leaving a partial ledger under the new name."""
    lsn = built.committed["move-4"][3]
    flip_record_byte(built.path, lsn)
    anchored = tmp_path / "anchored"
    shutil.copytree(built.path, anchored)
    (built.path / ANCHOR_FILE).unlink()

    code, report = tally_json("recover", built.path, "--salvage", "--into", tmp_path / "salvaged")
    _, control = tally_json("recover", anchored, "--salvage", "--into", tmp_path / "control")

    assert code == 1, report
    assert report["first_corrupt_lsn"] == lsn and report["records_copied"] == lsn - 1
    assert report["lost"] == control["lost"] and report["lost"][0]["lsn"] == lsn
    assert report["verdict"] == control["verdict"] and report["whole"] is False
    assert "anchor is missing" in report["anchor_problem"] and control["anchor_problem"] is None
    done = tally("recover", built.path, "--salvage", "--into", tmp_path / "again")
    assert "anchor: " in done.stdout and "anchor is missing" in done.stdout
    salvaged, copied = tally_json("verify", tmp_path / "salvaged"), tally_json("verify", tmp_path / "control")
    assert salvaged[0] == 0 and salvaged[1]["state_hash"] == copied[1]["state_hash"]


def test_salvage_of_a_whole_ledger_without_its_anchor_says_the_anchor_is_missing_not_that_indexes_were_damaged(
    built: Built, tmp_path: Path
) -> None:
    (built.path / ANCHOR_FILE).unlink()

    code, report = tally_json("recover", built.path, "--salvage", "--into", tmp_path / "copy")

    assert code == 1  # not whole: nothing can tell whether this journal is the newest
    assert report["records_copied"] == built.last_lsn and report["lost"] == []
    assert report["first_corrupt_lsn"] is None and report["problem"] is None
    assert "anchor is missing" in report["verdict"] and "index" not in report["verdict"]
    assert "anchor is missing" in report["anchor_problem"] and report["whole"] is False
    copy_code, copy = tally_json("verify", tmp_path / "copy")
    assert copy_code == 0 and copy["state_hash"] == built.state_hash


@pytest.mark.parametrize("new", ["missing", "an empty directory"])
def test_a_salvage_that_fails_while_copying_leaves_nothing_under_the_new_name(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new: str
) -> None:
    """The copy is built in a directory of its own and renamed once closed: nothing is ever
    under the new name that could verify whole, not even while the copy is being made (a
    salvage killed then leaves only the directory named for what it is)."""
    into = tmp_path / "copy"
    if new == "an empty directory":
        into.mkdir()
    real, copied = _tools_salvage._copy_record, []

    def failing(sequencer: Any, record: Any) -> int:
        assert not (into / "data.mdb").exists()
        copied.append(record.lsn)
        if len(copied) == 5:
            raise NotALedger("the copy diverged (as this test makes it)")
        return real(sequencer, record)

    monkeypatch.setattr(_tools_salvage, "_copy_record", failing)
    with pytest.raises(NotALedger, match="as this test makes it"):
        _tools_salvage.salvage(str(built.path), str(into))

    assert len(copied) == 5
    assert sorted(os.listdir(tmp_path)) == sorted(["ledger", *(["copy"] if new == "an empty directory" else [])])
    assert not into.exists() or os.listdir(into) == []


@pytest.mark.parametrize("tool", ["salvage", "replay"])
@pytest.mark.parametrize("failing", ["publishing the copy", "making the staging directory"])
def test_a_copy_that_fails_removes_the_parents_of_the_new_name_it_made_and_none_that_was_there(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tool: str, failing: str
) -> None:
    """NEW is made with its missing parents; a copy that fails takes away each directory it
    made (they used to stay behind, NEW's parents empty), and never one that was there
    before, empty as it is."""
    kept = tmp_path / "kept"
    kept.mkdir()
    into = kept / "made" / "deeper" / "copy"
    if failing == "publishing the copy":
        def refuse(staging: str, target: str) -> None:
            raise OSError(errno.EIO, "the publishing fails (as this test makes it)")

        monkeypatch.setattr(_tools_copy, "_publish", refuse)
    else:
        real_mkdir = os.mkdir

        def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
            if os.path.basename(path).startswith(COPY_STAGING_PREFIXES):
                raise OSError(errno.ENOSPC, "no room for the staging directory (as this test makes it)")
            real_mkdir(path, *args, **kwargs)

        monkeypatch.setattr(os, "mkdir", mkdir)

    with pytest.raises(OSError, match="as this test makes it"):
        getattr(_tools_salvage if tool == "salvage" else _tools_copy, tool)(str(built.path), str(into))

    assert sorted(os.listdir(tmp_path)) == ["kept", "ledger"] and os.listdir(kept) == []


@pytest.mark.parametrize("doing", ["salvaging", "replaying"])
def test_a_directory_where_a_killed_salvage_or_replay_left_its_copy_is_never_made_a_new_empty_ledger(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doing: str
) -> None:
    """A salvage or replay killed while it copies leaves NEW holding only its unfinished copy,
    hidden (`.salvaging-XXXXXXXX`). Opening NEW then made a new, empty ledger beside it, with
    no word: one that a host would take for the copy. It is refused, naming what is there."""
    into = tmp_path / "copy"

    def killed(*args: Any) -> Any:  # the process dies here: what it leaves, left as it was
        raise SystemExit("killed (as this test makes it)")

    owner, name = (_tools_salvage, "_copy_record") if doing == "salvaging" else (_tools_copy, "_flush")
    monkeypatch.setattr(owner, name, killed)
    monkeypatch.setattr(_tools_copy.shutil, "rmtree", lambda *_args, **_kwargs: None)  # a kill cleans nothing up
    with pytest.raises(SystemExit):
        (_tools_salvage.salvage if doing == "salvaging" else _tools_copy.replay)(str(built.path), str(into))
    monkeypatch.undo()
    left = os.listdir(into)
    assert len(left) == 1 and left[0].startswith(f".{doing}-"), left

    with pytest.raises(NotALedger, match=f"holds '\\.{doing}-[0-9a-f]{{8}}', the unfinished copy of a salvage or a replay"):
        Ledger.open(into)
    assert os.listdir(into) == left  # nothing made beside it


@pytest.mark.parametrize("new", ["missing", "an empty directory"])
@pytest.mark.parametrize("fails", ["diverges", "is written meanwhile"])
def test_a_replay_that_fails_leaves_nothing_under_the_new_name(
    built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, new: str, fails: str
) -> None:
    """As a salvage's: a replay refused (exit 2) leaves no copy behind, neither a part of one
    nor one that would verify whole, and the same command can be run again."""
    into = tmp_path / "copy"
    if new == "an empty directory":
        into.mkdir()
    real, flushed = _tools_copy._flush, []
    writer = Writer(built.path) if fails == "is written meanwhile" else None

    def failing(*args: Any) -> None:
        assert not (into / "data.mdb").exists()
        flushed.append(True)
        if writer is None:
            raise NotALedger("replay diverged (as this test makes it)")
        if len(flushed) == 1:
            writer.write()
        real(*args)

    monkeypatch.setattr(_tools_copy, "_flush", failing)
    try:
        with pytest.raises((NotALedger, LedgerLocked), match="as this test makes it|changed while it was replayed"):
            _tools_copy.replay(str(built.path), str(into))
    finally:
        if writer is not None:
            writer.stop()

    assert flushed
    assert sorted(os.listdir(tmp_path)) == sorted(["ledger", *(["copy"] if new == "an empty directory" else [])])
    assert not into.exists() or os.listdir(into) == []


@pytest.fixture
def entry_unindexed(built: Built, raw_lmdb: Callable[[Path], AbstractContextManager[lmdb.Environment]]) -> Built:
    """`built` with carol's latest entry (the debit of transfer "last") deleted from the entries index.

    Entries are indexed by the checkpoint after them, which `tally recover` writes. An entry key
    is the account id's length (2 bytes, big-endian), the id, and the seq (8 bytes)."""
    seq, tid, *_ = built.entries["carol"][-1]
    assert tid == "last"
    assert tally("recover", built.path).returncode == 0
    with raw_lmdb(built.path) as env:
        entries = env.open_db(b"entries", create=False)
        with env.begin(write=True, db=entries) as txn:
            assert txn.delete(b"\x00\x05carol" + seq.to_bytes(8, "big"))
    return built


@pytest.mark.parametrize("command", ["verify", "recover"])
def test_an_entry_missing_from_its_index_fails_the_pairs_check_with_exit_1(entry_unindexed: Built, command: str) -> None:
    before = file_digest(entry_unindexed.path / "data.mdb")

    code, report = tally_json(command, entry_unindexed.path)

    assert code == 1
    assert report["verdict"] == "NOT WHOLE"
    pairs = next(check for check in CHECKS if check.startswith("each committed transfer has exactly two entries"))
    assert report["checks"][pairs] is False
    assert "'last'" in report["problem"]
    assert "checkpoint_written_at" not in report
    assert file_digest(entry_unindexed.path / "data.mdb") == before


def test_salvage_of_a_ledger_with_a_damaged_index_does_not_call_it_whole(entry_unindexed: Built, tmp_path: Path) -> None:
    code, report = tally_json("recover", entry_unindexed.path, "--salvage", "--into", tmp_path / "copy")

    assert code == 1
    assert tally("verify", tmp_path / "copy").returncode == 0
    assert report["records_copied"] == entry_unindexed.last_lsn
    assert report["whole"] is False and "whole" not in report["verdict"]
    assert report["lost"] == []


def _damage_key_in_place(path: Path, key: bytes, damaged: bytes) -> None:
    """Change the key `key` of a leaf node into `damaged` (as long) in the data file's bytes, as
    a flipped bit does, with no commit: found as LMDB lays a node out, its key's length (two
    bytes, little-endian) then the key (a record or an entry holding the same text has a
    msgpack header there instead). Every copy, in the live tree and in pages freed since."""
    data_file = path / "data.mdb"
    node = len(key).to_bytes(2, "little") + key
    data = data_file.read_bytes()
    assert data.count(node) >= 1, key
    data_file.write_bytes(data.replace(node, len(key).to_bytes(2, "little") + damaged))


@pytest.fixture
def index_key_damaged(built: Built) -> Built:
    """`built` with the transfers index's key of "last" changed in place ("lasu": one bit, the
    keys still in order), its value and checksum kept (every record is intact)."""
    _damage_key_in_place(built.path, b"last", b"lasu")
    return built


def test_salvage_of_a_ledger_whose_only_damage_is_an_index_key_copies_every_record(index_key_damaged: Built,
                                                                                   tmp_path: Path) -> None:
    """The records are whole: a salvage copies all of them and makes the indexes anew (it
    refused to open the ledger at all, and saved nothing, where a damaged record lets it save
    what precedes it)."""
    before = file_digest(index_key_damaged.path / "data.mdb")

    code, report = tally_json("recover", index_key_damaged.path, "--salvage", "--into", tmp_path / "copy")

    assert code == 1, report
    assert report["records_copied"] == index_key_damaged.last_lsn and report["lost"] == []
    assert report["first_corrupt_lsn"] is None and report["whole"] is False
    assert "the indexes were damaged; NEW has them rebuilt" in report["verdict"]
    assert tally("verify", tmp_path / "copy").returncode == 0
    with Ledger.open(tmp_path / "copy") as copy:
        assert copy.get_transfer("last").amount == index_key_damaged.committed["last"][2]
        assert copy.state_hash() == index_key_damaged.state_hash
    assert file_digest(index_key_damaged.path / "data.mdb") == before


@pytest.mark.parametrize("command", ["verify", "recover"])
def test_an_index_key_damaged_in_place_is_reported_where_and_every_record_is_still_checked(
        index_key_damaged: Built, command: str) -> None:
    before = file_digest(index_key_damaged.path / "data.mdb")

    code, report = tally_json(command, index_key_damaged.path)

    assert code == 1 and report["verdict"] == "NOT WHOLE"
    assert report["checks"][CHECKS[0]] is False  # the data file's check: an index entry fails its checksum
    assert report["checks"][CHECK_RECORDS] is True and report["records_scanned"] == index_key_damaged.last_lsn
    assert "transfers index" in report["problem"] and "lasu" in report["problem"]
    assert report["damaged"] == "the transfers index" and report["index_damaged"] is True
    assert "checkpoint_written_at" not in report
    assert file_digest(index_key_damaged.path / "data.mdb") == before
    if command == "recover":
        said = tally(command, index_key_damaged.path)
        assert "--salvage --into NEW` copies every record" in said.stdout, said.stdout


def test_an_index_key_damaged_and_a_record_damaged_too_never_pass_the_data_files_check(
        index_key_damaged: Built, flip_record_byte: Callable[[Path, int], None]) -> None:
    """The record, damage a salvage stops at, is the problem named; the data file's check is
    failed all the same (it was marked passed on the way to the record's)."""
    lsn = index_key_damaged.committed["move-4"][3]
    flip_record_byte(index_key_damaged.path, lsn)

    code, report = tally_json("verify", index_key_damaged.path)

    assert code == 1 and report["verdict"] == "NOT WHOLE"
    assert report["corrupt_lsn"] == lsn and f"LSN {lsn}" in report["problem"]
    assert report["checks"][CHECKS[0]] is False and report["index_damaged"] is True


def test_an_index_key_damaged_under_another_ledgers_anchor_is_reported_as_that_first(
        index_key_damaged: Built, tmp_path: Path) -> None:
    """The file not being the one its anchor names is the damage a salvage refuses: it stays the
    problem named, and recover does not advise a salvage that would refuse."""
    with Ledger.open(tmp_path / "other") as other:
        other.create_account("x", currency="USD")
    shutil.copy(tmp_path / "other" / ANCHOR_FILE, index_key_damaged.path / ANCHOR_FILE)

    code, report = tally_json("verify", index_key_damaged.path)

    assert code == 1 and report["verdict"] == "NOT WHOLE"
    assert "lasu" not in report["problem"] and "anchor" in report["problem"], report["problem"]
    said = tally("recover", index_key_damaged.path)
    assert "--salvage --into NEW` copies every record" not in said.stdout, said.stdout
    assert "not the one its anchor names" in said.stdout, said.stdout


def test_an_index_key_damaged_in_place_is_never_served(index_key_damaged: Built) -> None:
    """Only an audit or a salvage goes on past it: an open that answers from the indexes (the
    key hides "last" from every lookup) refuses, as do the views."""
    with pytest.raises(JournalCorrupted, match="transfers index"):
        Ledger.open(index_key_damaged.path)
    with pytest.raises(JournalCorrupted, match="transfers index"):
        Ledger.open(index_key_damaged.path, readonly=True)
    shown = tally("history", index_key_damaged.path, "alice")
    assert shown.returncode == 1 and "transfers index" in shown.stderr


def test_a_key_of_the_meta_database_damaged_in_place_is_damage_not_a_ledger_without_it(built: Built) -> None:
    """A bit flipped in the commit mark's key left a ledger that checked whole (its mark read
    as missing, as in a ledger made before marks) and was written to beside the damaged key."""
    _damage_key_in_place(built.path, b"commit_mark", b"com}it_mark")
    before = file_digest(built.path / "data.mdb")

    code, report = tally_json("verify", built.path)

    assert code == 1 and report["verdict"] == "NOT WHOLE"
    assert "com}it_mark" in report["problem"] and report["damaged"] == "the meta database"
    with pytest.raises(JournalCorrupted, match="meta database"):
        Ledger.open(built.path)
    assert file_digest(built.path / "data.mdb") == before


# --- wrong inputs ----------------------------------------------------------------


def _not_a_ledger(tmp_path: Path) -> Path:
    path = tmp_path / "random"
    path.mkdir()
    (path / "notes.bin").write_bytes(os.urandom(4096))
    return path


def _a_file(tmp_path: Path) -> Path:
    path = tmp_path / "file"
    path.write_bytes(b"not a directory")
    return path


def _newer_format(tmp_path: Path) -> Path:
    """A ledger as a newer Tally would make it: format 99 in its data file and its anchor."""
    path = tmp_path / "newer"
    with Ledger.open(path) as ledger:
        ledger.create_account("a", currency="USD")
    env = lmdb.open(str(path), subdir=True, max_dbs=8, create=False)
    try:
        meta = env.open_db(b"meta", create=False)
        with env.begin(write=True, db=meta) as txn:
            assert txn.get(b"format_version") == str(FORMAT_VERSION).encode()
            txn.put(b"format_version", b"99")
    finally:
        env.close()
    anchor = read_anchor(str(path))
    assert anchor is not None
    create_anchor(str(path), anchor.ledger_id, 99, anchor.durable_lsn)
    return path


def _empty_directory(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir()
    return path


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "missing"


WRONG_INPUTS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "a directory that is not a ledger": (_not_a_ledger, "not a Tally ledger"),
    "a file": (_a_file, "is a file"),
    "a newer format version": (_newer_format, "newer"),
    "an empty directory": (_empty_directory, "empty directory"),
    "a missing path": (_missing, "does not exist"),
}
COMMANDS = {
    "verify": ["verify"],
    "recover": ["recover"],
    "recover --dry-run": ["recover", "--dry-run"],
    "inspect": ["inspect"],
    "balance": ["balance", "{path}", "a"],
    "history": ["history", "{path}", "a"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("wrong", WRONG_INPUTS)
def test_a_wrong_path_gives_one_line_on_stderr_and_exit_2_without_a_traceback(
    tmp_path: Path, wrong: str, command: str
) -> None:
    make, says = WRONG_INPUTS[wrong]
    path = make(tmp_path)
    args = COMMANDS[command]
    args = [arg.format(path=path) for arg in args] if "{path}" in args else [args[0], str(path), *args[1:]]

    done = tally(*args)

    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"tally {args[0]}: ") and says in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("args", [["verify", "{tmp}/no\nsuch"], ["balance", "{tmp}/led\x1b[31mger", "a"],
                                  ["inspect", "{tmp}/empty\u202e"], ["verify", "{tmp}/empty\u202e", "stray\nword"]])
def test_an_error_naming_a_path_with_control_characters_is_one_line_with_them_escaped(
        tmp_path: Path, args: list[str]) -> None:
    """A path may hold any character but NUL (a directory listing's, say): the error naming it
    is still one line, and no escape sequence in it reaches the terminal."""
    (tmp_path / "led\x1b[31mger").mkdir()
    (tmp_path / "empty\u202e").mkdir()
    done = tally(*(arg.format(tmp=tmp_path) for arg in args))

    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith("tally") and not set("\x1b\u202e") & set(line), line  # (argparse's: "tally: ")
    assert "\\n" in line or "\\x1b" in line or "\\u202e" in line, line


SHARDED_ROOT_COMMANDS = {
    "verify": (["verify", "{root}"], "each of shard-0 to shard-2 in turn", "verify {shard}"),
    "recover --dry-run": (["recover", "{root}", "--dry-run"], "each of shard-0 to shard-2 in turn",
                          "recover {shard} --dry-run"),
    "replay": (["replay", "{root}", "--into", "{tmp}/copy"],
               "each of shard-0 to shard-2 in turn, each into its own directory, {tmp}/copy/shard-N",
               "replay {shard} --into {tmp}/copy/shard-0"),
    "recover --salvage": (["recover", "{root}", "--salvage", "--into", "{tmp}/saved"],
                          "each of shard-0 to shard-2 in turn, each into its own directory, {tmp}/saved/shard-N",
                          "recover {shard} --salvage --into {tmp}/saved/shard-0"),
    "replay --into=": (["replay", "{root}", "--into={tmp}/copy"],
                       "each of shard-0 to shard-2 in turn, each into its own directory, {tmp}/copy/shard-N",
                       "replay {shard} --into={tmp}/copy/shard-0"),
    "inspect": (["inspect", "{root}"], "each of shard-0 to shard-2 in turn", "inspect {shard}"),
    "tail": (["tail", "{root}"], "each of shard-0 to shard-2 in turn", "tail {shard}"),
    "balance": (["balance", "{root}", "{account}"], "the shard its id places it on", "balance {shard} {account}"),
    "history": (["history", "{root}", "{account}", "--limit", "3"], "the shard its id places it on",
                "history {shard} {account} --limit 3"),
}


@pytest.fixture(scope="module")
def sharded_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, int]:
    """A sharded ledger's directory as `ShardedLedger.open` lays it out (three shards, each an
    ordinary ledger, and the manifest), with an account on the shard its id places it on:
    made without Ray, which these commands never start. (root, account, its shard)"""
    from engine._placement import shard_of, write_manifest

    root = tmp_path_factory.mktemp("sharded") / "books"
    account = next(name for name in (f"acct-{n}" for n in range(100)) if shard_of(name, 3) != 0)
    for shard in range(3):
        with Ledger.open(str(root / f"shard-{shard}")) as ledger:
            if shard == shard_of(account, 3):
                ledger.create_account(account, currency="USD")
    write_manifest(root, 3)
    return root, account, shard_of(account, 3)


@pytest.mark.parametrize("command", SHARDED_ROOT_COMMANDS)
def test_a_tool_given_a_sharded_ledgers_directory_names_the_command_for_a_shard(
        sharded_root: tuple[Path, str, int], tmp_path: Path, command: str) -> None:
    """Each shard is an ordinary ledger the tools work on; the sharded ledger's own directory
    holds the manifest and the shards' directories, no journal. The command it suggests is
    the one given, on a shard's directory (for an account, its shard), and it works."""
    root, account, shard = sharded_root
    args, which, suggested = SHARDED_ROOT_COMMANDS[command]
    fill = {"root": root, "tmp": tmp_path, "account": account}
    shard_path = root / f"shard-{shard if '{account}' in args else 0}"

    done = tally(*[arg.format(**fill) for arg in args])

    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    suggestion = suggested.format(shard=shard_path, **fill)
    assert done.stderr.splitlines() == [
        f"tally {args[0]}: {root} is not a Tally ledger (it holds no journal); it is a sharded ledger of 3 shards, "
        f"each an ordinary ledger: give a shard's directory ({which.format(**fill)}"
        + ("; one made with placement=KEY lives on the key's" if "{account}" in args else "")
        + f"), e.g. `tally {suggestion}`"]
    again = tally(*suggestion.split())
    assert again.returncode == 0, again.stderr


def test_the_command_suggested_for_a_shard_quotes_the_id_and_escapes_what_it_cannot_show(
        sharded_root: tuple[Path, str, int]) -> None:
    """An id with a space is one word of the command suggested; one with an escape sequence
    does not reach the terminal."""
    from engine._placement import shard_of

    root, _, _ = sharded_root
    for account in ("my account", "red\x1b[31m"):
        done = tally("balance", root, account)
        assert done.returncode == 2 and "\x1b" not in done.stderr, done.stderr
        shown = shlex.quote(account).replace("\x1b", "\\x1b")
        assert f"`tally balance {root / f'shard-{shard_of(account, 3)}'} {shown}`" in done.stderr, done.stderr


@pytest.mark.parametrize("command", [["serve"], ["stress", "--path"]])
def test_serve_and_stress_given_a_sharded_ledgers_directory_are_not_sent_to_one_shard(
        sharded_root: tuple[Path, str, int], command: list[str]) -> None:
    """They write: pointed at one shard they would go around the sharded ledger's placement."""
    root, _, _ = sharded_root
    done = tally(*command, root)
    assert done.returncode == 2
    assert "shard's directory" not in done.stderr and "holds other files" in done.stderr, done.stderr


def test_serve_without_fastapi_says_what_to_install_in_one_line_naming_the_command_once(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "fastapi.py").write_text("raise ModuleNotFoundError(\"No module named 'fastapi'\", name='fastapi')\n")

    done = tally("serve", tmp_path / "books", env={"PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT)])})

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == ("tally serve: FastAPI and uvicorn are needed to serve (fastapi is missing): "
                           "pip install 'tally-ledger[serve]'\n")
    assert not (tmp_path / "books").exists()


def test_no_command_is_a_usage_error_with_the_commands_on_stderr_and_exit_2() -> None:
    done = tally()

    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("usage: tally ") and "verify" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("command", [["balance", "nobody"], ["history", "nobody"], ["inspect", "--account", "nobody"],
                                     ["inspect", "--transfer", "fund-1", "--account", "nobody"]])
def test_an_unknown_account_gives_one_line_on_stderr_and_exit_2(built: Built, command: list[str]) -> None:
    done = tally(command[0], built.path, *command[1:])

    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [f"tally {command[0]}: no account 'nobody' in {built.path}"]


BAD_ARGUMENTS = {
    "a PATH not UTF-8": (["verify", "{tmp}/led\udcffger"], "argument PATH: a path must be"),
    "an empty PATH": (["history", "", "alice"], "argument PATH: a path must be"),
    "--into under a file": (["replay", "{ledger}", "--into", "{tmp}/file/new"], "cannot be made a ledger directory"),
    "salvage --into under a file": (["recover", "{ledger}", "--salvage", "--into", "{tmp}/file/new"],
                                    "cannot be made a ledger directory"),
    "--into not UTF-8": (["replay", "{ledger}", "--into", "{tmp}/new\udcff"], "argument --into: a path must be"),
    "--from past the last LSN a key holds": (["inspect", "{ledger}", "--from", str(2**64)], "above the maximum"),
    "--at-lsn with an underscore": (["balance", "{ledger}", "alice", "--at-lsn", "1_0"],
                                    "argument --at-lsn: '1_0' is not a whole number (the digits 0-9 alone)"),
    "--from-lsn with an underscore": (["tail", "{ledger}", "--from-lsn", "1_2"], "'1_2' is not a whole number"),
    "--path under a file": (["stress", "--path", "{tmp}/file/new", "--transfers", "5"], "cannot be made a ledger"),
    "--into without --salvage": (["recover", "{ledger}", "--into", "{tmp}/new"], "--into NEW goes with --salvage"),
    "--report in no directory": (["stress", "--transfers", "5", "--report", "{tmp}/none/r.html"], "no such directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_ARGUMENTS))
def test_an_argument_that_cannot_be_used_gives_one_line_on_stderr_exit_2_and_makes_nothing(
    built: Built, tmp_path: Path, case: str
) -> None:
    (tmp_path / "file").write_text("hello")
    before = sorted(os.listdir(tmp_path))
    args, says = BAD_ARGUMENTS[case]
    done = tally(*(arg.format(tmp=tmp_path, ledger=built.path) for arg in args))

    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"tally {args[0]}: ") and says in line, line
    assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("command", ["balance", "history"])
def test_an_account_id_utf8_cannot_encode_gives_one_line_on_stderr_and_exit_2(built: Built, command: str) -> None:
    done = tally(command, built.path, "\udcff")  # the byte 0xff on the command line

    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"tally {command}: account id must be a non-empty str"), line


@pytest.mark.parametrize("wrong", ["a directory that is not a ledger", "an empty directory"])
@pytest.mark.parametrize("salvage", [[], ["--salvage", "--into", "{new}"]])
def test_recover_of_a_directory_that_is_not_a_ledger_leaves_it_as_it_was(
    tmp_path: Path, wrong: str, salvage: list[str]
) -> None:
    path = WRONG_INPUTS[wrong][0](tmp_path)
    before = sorted(p.name for p in path.iterdir())

    assert tally("recover", path, *[arg.format(new=tmp_path / "new") for arg in salvage]).returncode == 2
    assert sorted(p.name for p in path.iterdir()) == before
    assert not (tmp_path / "new").exists()


def test_salvage_without_into_is_a_usage_error_with_exit_2(built: Built) -> None:
    done = tally("recover", built.path, "--salvage")

    assert len(done.stderr.splitlines()) == 1 and "--into" in done.stderr
    assert done.returncode == 2


# --- a live process --------------------------------------------------------------

HOLDER = """
import sys
from engine import Ledger
with Ledger.open(sys.argv[1]) as ledger:
    print("ready", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def held(built: Built) -> Iterator[Built]:
    """`built`, held open by another live process until the test ends."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(built.path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        assert holder.stdout is not None
        readable, _, _ = select.select([holder.stdout], [], [], HOLDER_TIMEOUT_S)  # a bounded wait for "ready"
        assert readable and holder.stdout.readline() == "ready\n", "the holder did not open the ledger"
        yield built
    finally:
        holder.kill()
        holder.wait(timeout=HOLDER_TIMEOUT_S)


@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_recover_refuses_while_a_live_process_holds_the_ledger(held: Built, dry_run: list[str]) -> None:
    done = tally("recover", held.path, *dry_run)

    assert done.returncode == 2
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert len(done.stderr.splitlines()) == 1 and "live process" in done.stderr


def test_salvage_refuses_while_a_live_process_holds_the_ledger(held: Built, tmp_path: Path) -> None:
    done = tally("recover", held.path, "--salvage", "--into", tmp_path / "copy")

    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "live process" in done.stderr
    assert not (tmp_path / "copy").exists()


def _read_only_file_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process's opens of a ledger's lock file for writing fail as on a read-only file system."""
    real = os.open

    def opening(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(LOCK_FILE) and flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real(path, flags, *args)

    monkeypatch.setattr(_directory.os, "open", opening)


def test_recover_dry_run_reads_a_ledger_on_a_read_only_file_system(built: Built, monkeypatch: pytest.MonkeyPatch
                                                                    ) -> None:
    """The lock that tells no live process writes is taken on the lock file opened for
    reading (a file system turned read-only on errors is when the dry run is wanted)."""
    _read_only_file_system(monkeypatch)
    report = _tools_audit.recover(str(built.path), dry_run=True)
    assert report["verdict"] == "whole" and report["state_hash"] == built.state_hash


def test_recover_dry_run_on_a_read_only_file_system_still_refuses_while_a_live_process_holds_it(
        held: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    _read_only_file_system(monkeypatch)
    with pytest.raises(LedgerLocked, match="live process"):
        _tools_audit.recover(str(held.path), dry_run=True)


def test_verify_and_balance_read_a_ledger_a_live_process_holds(held: Built) -> None:
    code, report = tally_json("verify", held.path)
    balance_code, balance = tally_json("balance", held.path, "alice")

    assert code == 0
    assert report["state_hash"] == held.state_hash
    assert balance_code == 0 and balance["posted"] == held.balances["alice"]



WRITER = """
import sys
from engine import Ledger
with Ledger.open(sys.argv[1]) as ledger:
    print("ready", flush=True)
    for n, line in enumerate(iter(sys.stdin.readline, "")):
        if line.strip() == "account":
            ledger.create_account(f"beside-{n}", currency="USD")
        else:
            ledger.transfer(f"beside-{n}", source="alice", destination="bob", amount=1)
        print("written", flush=True)
"""


class Writer:
    """Another live process writing the ledger: a `write` is one transfer of 1 from alice to
    bob (or, of "account", an account opened), durable when it returns."""

    def __init__(self, path: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.process = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
        self._expect("ready")

    def _expect(self, line: str) -> None:
        assert self.process.stdout is not None
        readable, _, _ = select.select([self.process.stdout], [], [], HOLDER_TIMEOUT_S)  # bounded
        assert readable and self.process.stdout.readline() == line + "\n", f"the writer did not say {line!r}"

    def write(self, what: str = "transfer") -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{what}\n")
        self.process.stdin.flush()
        self._expect("written")

    def stop(self) -> None:
        self.process.kill()
        self.process.wait(timeout=HOLDER_TIMEOUT_S)


def test_balance_beside_a_writer_that_appends_while_it_reads_is_the_balance_after(
        built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    """The index counts are read in a later snapshot than the replay's: a record written
    between the two is the writer's, not damage (it was reported as a corrupt journal)."""
    writer = Writer(built.path)
    try:
        real = _readonly.check_index_counts

        def a_write_between(*args: object) -> None:
            if not written:
                writer.write()  # durable before the counts are read
                written.append(True)
            real(*args)  # type: ignore[arg-type]

        written: list[bool] = []
        monkeypatch.setattr(_readonly, "check_index_counts", a_write_between)
        monkeypatch.setattr(_recovery, "check_index_counts", a_write_between)  # (what `recover` calls)
        found = _tools_read.balance(str(built.path), "alice")
    finally:
        writer.stop()

    assert written
    assert found["posted"] == built.balances["alice"] - 1 and found["pending"] == 0
    assert found["last_lsn"] > built.last_lsn


@pytest.mark.parametrize("writes", [["transfer"], ["account", "transfer"]])
def test_verify_beside_a_writer_that_appends_while_it_audits_judges_and_hashes_the_books_of_one_lsn(
        built: Built, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], writes: list[str]) -> None:
    """The chain, the replay, the index check and the state hash read one snapshot: a writer
    that moves money (and opens an account) before each of them changes no figure (the index
    check read a later snapshot than the replay and called a whole ledger NOT WHOLE; the
    state hash was of the entries of yet another)."""
    writer = Writer(built.path)
    written: list[str] = []
    try:
        alone = _tools_audit.verify(str(built.path))

        def writing_first(real: Callable[..., Any]) -> Callable[..., Any]:
            def call(*args: Any, **kwargs: Any) -> Any:
                for what in writes:
                    writer.write(what)  # durable before `real` reads
                    written.append(what)
                return real(*args, **kwargs)
            return call

        monkeypatch.setattr(_audit, "replay", writing_first(_audit.replay))
        monkeypatch.setattr(_audit, "_cross_check", writing_first(_audit._cross_check))
        monkeypatch.setattr(_tools_audit, "state_hash", writing_first(_tools_audit.state_hash))
        code = _cli.main(["verify", str(built.path), "--json"])
        report = json.loads(capsys.readouterr().out)
    finally:
        monkeypatch.undo()
        writer.stop()

    assert code == 0 and report["verdict"] == "whole", report["problem"]
    assert len(written) == 3 * len(writes)
    assert report["state_hash"] == alone["state_hash"] == built.state_hash
    assert report["last_lsn"] == report["records_scanned"] == report["head"]["lsn"] == alone["last_lsn"]
    assert report["head"] == alone["head"] and report["accounts"] == alone["accounts"]
    assert _tools_audit.verify(str(built.path))["last_lsn"] == alone["last_lsn"] + len(written)  # there to be seen


def test_history_beside_a_writer_that_appends_while_it_reads_shows_entries_and_transfers_of_one_lsn(
        built: Built, monkeypatch: pytest.MonkeyPatch) -> None:
    """A transfer written after the transfers were read and before the entries were is in
    neither (the entries came from a later snapshot than the transfers' LSN)."""
    writer = Writer(built.path)
    written: list[bool] = []
    try:
        real = History.transfers

        def then_a_write(self: History, *args: Any, **kwargs: Any) -> Any:
            found = real(self, *args, **kwargs)
            writer.write()  # alice to bob, durable before the entries are read
            written.append(True)
            return found

        monkeypatch.setattr(History, "transfers", then_a_write)
        report = _tools_read.history(str(built.path), "alice", 3)
    finally:
        monkeypatch.undo()
        writer.stop()

    assert written
    assert report["entries"][-1]["lsn"] == report["transfers"][0]["lsn"]
    assert report["entries_total"] == len(built.entries["alice"])
    assert [(entry["seq"], entry["transfer"], entry["amount"], entry["balance"], entry["lsn"])
            for entry in report["entries"]] == built.entries["alice"][-3:]


def test_replay_of_a_ledger_written_meanwhile_refuses_rather_than_compare(
        built: Built, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    writer = Writer(built.path)
    try:
        real = _tools_copy._flush

        def a_write_meanwhile(*args: object) -> None:
            if not written:
                writer.write()
                written.append(True)
            real(*args)  # type: ignore[arg-type]

        written: list[bool] = []
        monkeypatch.setattr(_tools_copy, "_flush", a_write_meanwhile)
        with pytest.raises(LedgerLocked, match="changed while it was replayed"):
            _tools_copy.replay(str(built.path), str(tmp_path / "copy"))
    finally:
        writer.stop()
    assert written


@pytest.mark.parametrize("command", ["balance", "history"])
def test_an_account_id_no_ledger_could_hold_on_a_sharded_ledgers_directory_is_one_line(
        sharded_root: tuple[Path, str, int], command: str) -> None:
    """Not UTF-8 (argv's bytes \\xff): the hint names no shard for it, and nothing is raised."""
    root, _, _ = sharded_root
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-m", "engine", command, str(root), b"\xff"], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, cwd=ROOT, env=env)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"tally {command}: {root} is not a Tally ledger (it holds no journal)"]


@pytest.mark.parametrize(("args", "said"), [
    (["--clients", "40000"], "argument --clients: 40000 is above the maximum of 1024"),
    (["--transfers", "9" * 5000], "argument --transfers: a number of 5,000 digits is out of range"),
    (["--transfers", "x" * 500], "argument --transfers: '" + "x" * 76 + "... is not a whole number (the digits 0-9 alone)"),
    (["--seed", "1_0"], "argument --seed: '1_0' is not a whole number (the digits 0-9 alone)"),
    (["--url", "http://[::1"], "argument --url: 'http://[::1' is not a server's URL (http://HOST:PORT)"),
])
def test_stress_arguments_out_of_range_or_malformed_are_one_line(args: list[str], said: str) -> None:
    done = tally("stress", *args)
    assert done.returncode == 2 and done.stdout == "", done.stdout + done.stderr
    assert done.stderr.splitlines() == [f"tally stress: {said}"]


@pytest.mark.parametrize(("account", "at", "shown"), [
    ("100000000000000000", "2000-01-01", "2000-01-01T00:00:00Z"),  # an id that looks like a timestamp stays as it is
    ("alice", "1970-01-01T00:00:00Z", "1970-01-01T00:00:00Z"),  # the epoch is a time given, not "no timestamp"
])
def test_balance_at_a_time_before_the_account_names_the_account_and_the_time_given(
        tmp_path: Path, account: str, at: str, shown: str) -> None:
    with Ledger.open(tmp_path / "l") as ledger:
        ledger.create_account(account, currency="USD")
    done = tally("balance", tmp_path / "l", account, "--at", at)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (f"tally balance: account {account!r} did not exist yet at {shown} "
                           f"(account {account!r} was opened at LSN 1, after LSN 0)\n")


def test_the_time_tally_balance_prints_for_an_lsn_reads_back_as_that_lsn(tmp_path: Path) -> None:
    """Timestamps are nanoseconds: printed to the microsecond, a record's time fell before it,
    and `--at` with it named the LSN before."""
    ticks = iter(range(1_796_000_000_123_456_789, 1_796_000_000_123_457_789, 7))
    with Ledger.open(tmp_path / "l", clock_ns=lambda: next(ticks)) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        made = ledger.transfer("t", source="bank", destination="alice", amount=5)
    shown = tally("balance", tmp_path / "l", "alice", "--at-lsn", str(made.lsn))
    assert shown.returncode == 0, shown.stderr
    moment = shown.stdout.rsplit("(", 1)[1].rstrip(")\n")
    fraction = made.timestamp % 1_000_000_000
    assert moment == f"2026-11-30T00:53:20.{fraction:09d}Z"

    code, report = tally_json("balance", tmp_path / "l", "alice", "--at", moment)
    assert code == 0 and report["at_lsn"] == made.lsn and report["posted"] == 5
    code, before = tally_json("balance", tmp_path / "l", "alice", "--at", f"2026-11-30T00:53:20.{fraction - 1:09d}Z")
    assert code == 0 and before["at_lsn"] == made.lsn - 1 and before["posted"] == 0
    finer = tally("balance", tmp_path / "l", "alice", "--at", f"2026-11-30T00:53:20.{fraction:09d}1Z")
    assert finer.returncode == 2
    assert finer.stderr == (f"tally balance: argument --at: '2026-11-30T00:53:20.{fraction:09d}1Z' gives a time "
                            "finer than a nanosecond\n")


@pytest.mark.parametrize("text", ["1_0", " 10", "10 ", "+10", "\u0661\u0660", "0x5", "1.0", "1e1", "", "-"])
def test_a_number_on_the_command_line_is_the_digits_0_to_9_alone(text: str) -> None:
    """As `tally serve` takes a number in a query: Python's `int` would take the first five."""
    with pytest.raises(argparse.ArgumentTypeError, match=r"is not a whole number \(the digits 0-9 alone\)$"):
        _cli_parse._count(0)(text)
    assert _cli_parse._count(0)("010") == 10 and _cli_parse._whole("-3") == -3


@pytest.mark.parametrize("text", ["2026-11-30T00:53:20.9Z", "2026-11-30 00:53:20.9Z", "2026-11-30t00:53:20.9Z",
                                  "20261130T005320.9Z", "2026-11-30T02:53:20,900000000+02:00"])
def test_a_time_keeps_its_fraction_of_a_second_in_every_iso_form(text: str) -> None:
    assert _cli_parse._instant(text) == 1_796_000_000_900_000_000
