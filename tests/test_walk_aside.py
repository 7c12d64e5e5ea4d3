"""The page walk split across two processes (`journal._walk_aside`): the second walks the last
trees while the first walks the others, and what the walk returns or raises is the one-process
walk's, whatever the second process does (answers, finds damage, claims a page the first
claimed, never starts, hangs, answers nonsense)."""

from __future__ import annotations

import os
import sys
import time
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from coordinator import INDEX_NAMES
from engine import JournalCorrupted, Ledger
from journal import JournalCorruptedError
from journal._check import _Visitor, _walk_snapshot
from journal._meta import committed_meta, read_metas
from journal._pages import Layout

import journal._walk_aside as aside
from tests.test_pages import PAGE_BYTES, PAGE_HEADER_BYTES, _patch, _uniform_leaf, build

THERE = [b"transfers", b"records"]
"""The two trees of `build`'s ledger that hold the most entries, in walk order (the fewest
first): the last two, which the second process walks here."""


@pytest.fixture
def ledger(tmp_path: Path) -> Path:
    path = tmp_path / "ledger"
    build(path)
    return path


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[list[bytes], bool]]]:
    """Every walk gives its last two trees (`THERE`) to a second process, however
    small the file; noted here for each: the trees it was given, and whether its answer was
    taken whole."""
    noted: list[tuple[list[bytes], bool]] = []
    start = aside.start

    def noting(*args: Any) -> aside.AsideWalk | None:
        helper = start(*args)
        if helper is not None:
            result = helper.result

            def answered() -> Any:
                found = result()
                noted.append(([name for name, _ in args[4]], found is not None))
                return found

            helper.result = answered  # type: ignore[method-assign]
        return helper

    monkeypatch.setattr(aside, "ASIDE_ENTRIES_MIN", 0)
    monkeypatch.setattr(aside, "aside_part", lambda trees, _visited: 2)
    monkeypatch.setattr(aside, "start", noting)
    yield noted


def walked(path: Path, monkeypatch: pytest.MonkeyPatch | None = None) -> Layout:
    """The layout opening's walk finds (in one process with `monkeypatch`)."""
    if monkeypatch is not None:
        monkeypatch.setattr(aside, "aside_part", lambda _trees, _visited: 0)
    layout = _walk_snapshot(None, str(path / "data.mdb"), _Visitor(INDEX_NAMES))
    assert layout is not None
    return layout


def test_the_second_process_walks_the_last_trees_and_the_layout_is_the_one_process_walks(
        ledger: Path, answers: list[tuple[list[bytes], bool]], monkeypatch: pytest.MonkeyPatch) -> None:
    split = walked(ledger)
    assert answers == [(THERE, True)]
    with monkeypatch.context() as alone:
        assert walked(ledger, alone).trees == split.trees
    with Ledger.open(ledger) as reopened:  # a sealed close walks too; nothing was written here
        assert reopened.get_transfer("p-1") is not None


def test_the_work_is_split_by_entries_and_a_small_file_keeps_it_all(ledger: Path) -> None:
    trees = [(b"a", struct.pack("<IHHQQQQQ", 0, 0, 1, 0, 1, 0, 600_000, 2)),
             (b"b", struct.pack("<IHHQQQQQ", 0, 0, 1, 0, 1, 0, 300_000, 3)),
             (b"c", struct.pack("<IHHQQQQQ", 0, 0, 1, 0, 1, 0, 400_000, 4))]
    assert aside.aside_part(trees, frozenset()) == 2  # 600,000 here, 700,000 there
    assert aside.aside_part(trees, frozenset({b"a"})) == 2  # checked entries weigh more: here still the most
    assert aside.aside_part(trees[1:], frozenset()) == 1  # 400,000 go: the least worth a process
    fewer = [trees[1], (b"c", struct.pack("<IHHQQQQQ", 0, 0, 1, 0, 1, 0, 399_999, 4))]
    assert aside.aside_part(fewer, frozenset()) == 0
    assert aside.aside_part(trees[:1], frozenset()) == 0  # one tree stays here


@pytest.mark.parametrize("name", THERE)
@pytest.mark.parametrize("damage", ["a key byte", "a node pointer moved"])
def test_damage_in_a_tree_the_second_process_walks_is_said_as_one_process_says_it(
        ledger: Path, answers: list[tuple[list[bytes], bool]], monkeypatch: pytest.MonkeyPatch, name: bytes,
        damage: str) -> None:
    with monkeypatch.context() as scratch:
        pgno, count, _ = _uniform_leaf(ledger, name, scratch)
    at = pgno * PAGE_BYTES
    page = (ledger / "data.mdb").read_bytes()[at : at + PAGE_BYTES]
    node = struct.unpack_from(f"<{count}H", page, PAGE_HEADER_BYTES)[count // 2]
    if damage == "a key byte":
        key_size = struct.unpack_from("<H", page, node + 6)[0]
        _patch(ledger, at + node + 8 + key_size - 1, bytes([page[node + 8 + key_size - 1] ^ 0x01]))
    else:
        _patch(ledger, at + PAGE_HEADER_BYTES + 2 * (count // 2), struct.pack("<H", node + 2))
    with pytest.raises(JournalCorruptedError) as split:
        walked(ledger)
    assert answers == [(THERE, False)]  # it found the damage: no answer
    with monkeypatch.context() as alone, pytest.raises(JournalCorruptedError) as one:
        walked(ledger, alone)
    assert (str(split.value), split.value.where) == (str(one.value), one.value.where)
    with pytest.raises(JournalCorrupted) as opened:
        Ledger.open(ledger)
    assert str(opened.value) == str(one.value)


def test_a_page_both_processes_claim_is_walked_here_and_said_as_one_process_says_it(
        ledger: Path, answers: list[tuple[list[bytes], bool]], monkeypatch: pytest.MonkeyPatch) -> None:
    """The root of a tree the second process walks made to name a leaf of one the first walks:
    each half alone may look whole; the two together use a page twice."""
    with monkeypatch.context() as scratch:
        pgno, _, _ = _uniform_leaf(ledger, b"accounts", scratch)
        layout = walked(ledger, scratch)
    assert layout.trees[b"accounts"].depth >= 2  # (a leaf under a branch: no root of its own)
    _patch(ledger, _record_at(ledger, b"transfers") + 40, struct.pack("<Q", pgno))  # md_root: the record's last 8 bytes
    with pytest.raises(JournalCorruptedError) as split:
        walked(ledger)
    with monkeypatch.context() as alone, pytest.raises(JournalCorruptedError) as one:
        walked(ledger, alone)
    assert "already uses" in str(one.value)
    assert (str(split.value), split.value.where) == (str(one.value), one.value.where)


def _record_at(path: Path, name: bytes) -> int:
    """Where database `name`'s `MDB_db` record lies in the data file: in the main database's
    one leaf (its root), the value of the node whose key is the name."""
    data_file = str(path / "data.mdb")
    fd = os.open(data_file, os.O_RDONLY)
    try:
        root = committed_meta(*read_metas(fd, data_file), data_file).main.root
    finally:
        os.close(fd)
    page = path.joinpath("data.mdb").read_bytes()[root * PAGE_BYTES : (root + 1) * PAGE_BYTES]
    lower = struct.unpack_from("<H", page, 12)[0]
    for at in struct.unpack_from(f"<{(lower - PAGE_HEADER_BYTES) // 2}H", page, PAGE_HEADER_BYTES):
        key_bytes = struct.unpack_from("<H", page, at + 6)[0]
        if page[at + 8 : at + 8 + key_bytes] == name:
            return root * PAGE_BYTES + at + 8 + key_bytes
    raise AssertionError(f"no database {name!r}")


def test_an_answer_claiming_a_page_this_process_claimed_is_not_taken(
        ledger: Path, answers: list[tuple[list[bytes], bool]], monkeypatch: pytest.MonkeyPatch) -> None:
    whole = walked(ledger)  # a true answer, to forge from
    start = aside.start

    class Overlapping:
        def __init__(self, helper: aside.AsideWalk) -> None:
            self.helper = helper

        def result(self) -> Any:
            found = self.helper.result()
            assert found is not None
            trees, seen = found
            claimed = bytearray(seen)
            claimed[seen.index(0)] = 1  # a page the first process claims (every page is used or free)
            return trees, bytes(claimed)

        def stop(self) -> None:
            self.helper.stop()

    monkeypatch.setattr(aside, "start", lambda *args: Overlapping(start(*args)))  # type: ignore[arg-type]
    walks: list[bytes] = []
    tree = aside.Aside.walk

    def noting(self: aside.Aside, trees: Any, walk_tree: Any, pages: Any, found: Any) -> None:
        tree(self, trees, lambda name, record: (walks.append(name), walk_tree(name, record)), pages, found)

    monkeypatch.setattr(aside.Aside, "walk", noting)
    assert walked(ledger).trees == whole.trees
    assert walks[-2:] == THERE  # walked here, after the others


@pytest.mark.parametrize("trouble", ["no interpreter", "not an interpreter", "no answer", "an answer out of shape",
                                     "it hangs"])
def test_a_second_process_that_fails_leaves_the_walk_to_this_one(
        ledger: Path, answers: list[tuple[list[bytes], bool]], monkeypatch: pytest.MonkeyPatch, trouble: str) -> None:
    with monkeypatch.context() as alone:
        whole = walked(ledger, alone)
    started: list[Any] = []
    if trouble == "no interpreter":
        monkeypatch.setattr(aside.sys, "executable", str(ledger / "python-gone"))
    elif trouble == "not an interpreter":  # (a server that embeds Python: never started with these arguments)
        monkeypatch.setattr(aside.sys, "executable", "/bin/false")
        monkeypatch.setattr(aside.subprocess, "Popen", lambda *_, **__: pytest.fail("started"))
    elif trouble == "no answer":
        monkeypatch.setattr(aside, "_CHILD", "import sys; sys.exit(0)")
    elif trouble == "an answer out of shape":
        monkeypatch.setattr(aside, "_CHILD", "import sys; sys.stdout.buffer.write(b'\\x93\\xa2ok\\x80\\xc4\\x00')")
    else:
        monkeypatch.setattr(aside, "_CHILD", "import time; time.sleep(120)")
        monkeypatch.setattr(aside, "ASIDE_WAIT_S", 0.5)
        popen = aside.subprocess.Popen

        def keep(*args: Any, **kwargs: Any) -> Any:
            process = popen(*args, **kwargs)
            started.append(process)
            return process

        monkeypatch.setattr(aside.subprocess, "Popen", keep)
    assert walked(ledger).trees == whole.trees
    if trouble in ("no interpreter", "not an interpreter"):
        assert answers == []
    else:
        assert answers == [(THERE, False)]
    for process in started:
        assert process.poll() is not None  # killed and reaped
    assert not [name for name in os.listdir(ledger) if name.startswith(".")]


def test_an_interrupt_while_this_process_waits_for_the_second_ends_and_reaps_it(
        ledger: Path, answers: list[tuple[list[bytes], bool]], monkeypatch: pytest.MonkeyPatch) -> None:
    """A KeyboardInterrupt landing while the first process waits for the second's answer (its
    own half walked) leaves no process walking on, nor one unreaped."""
    import signal
    import threading

    started: list[Any] = []
    popen = aside.subprocess.Popen

    def keep(*args: Any, **kwargs: Any) -> Any:
        process = popen(*args, **kwargs)
        started.append(process)
        return process

    monkeypatch.setattr(aside, "_CHILD", "import time; time.sleep(120)")
    monkeypatch.setattr(aside.subprocess, "Popen", keep)
    waiting = threading.Event()
    result = aside.AsideWalk.result

    def noted(self: aside.AsideWalk) -> Any:
        waiting.set()
        return result(self)

    monkeypatch.setattr(aside.AsideWalk, "result", noted)
    main = threading.main_thread().ident
    assert main is not None

    def in_communicate() -> bool:
        frame = sys._current_frames().get(main)
        while frame is not None:
            if frame.f_code.co_name in ("communicate", "_communicate"):
                return True
            frame = frame.f_back
        return False

    def interrupt() -> None:
        """Once the main thread waits in `communicate` for the second process (not on a clock:
        a loaded machine may take longer to get there), and only then."""
        if not waiting.wait(30):
            return
        deadline = time.monotonic() + 30
        while not in_communicate():
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)  # (polling another thread's stack: no event to wait on)
        signal.pthread_kill(main, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        walked(ledger)
    [process] = started
    assert process.poll() is not None  # killed and reaped
    assert process.stdout is None or process.stdout.closed


def test_the_second_process_imports_nothing_from_the_working_directory(
        ledger: Path, answers: list[tuple[list[bytes], bool]], monkeypatch: pytest.MonkeyPatch,
        tmp_path: Path) -> None:
    """The second process finds its modules where this one does, not in the directory it was
    started in (`python -c` puts that first on its path): a `msgpack.py` there is never run."""
    here = tmp_path / "cwd"
    here.mkdir()
    marker = tmp_path / "ran"
    (here / "msgpack.py").write_text(f"open({str(marker)!r}, 'w').close()\nraise ImportError('not this one')\n")
    monkeypatch.chdir(here)
    split = walked(ledger)
    assert not marker.exists()
    assert answers == [(THERE, True)]
    with monkeypatch.context() as alone:
        assert walked(ledger, alone).trees == split.trees


@pytest.mark.parametrize("forged", ["none", "a page marked 2", "a counter its record does not claim", "a tree more",
                                    "a tree fewer", "pages short", "a key not bytes", "not ok"])
def test_only_a_whole_answer_for_exactly_the_trees_given_is_taken(forged: str) -> None:
    import msgpack

    record = struct.pack("<IHHQQQQQ", 0, 0, 1, 0, 1, 0, 5, 7)  # depth 1, one leaf, 5 entries
    found: dict[bytes, list[Any]] = {b"t": [5, 0, 1, 0, 1, b"a", b"e"]}
    seen, status = b"\x00\x00\x00\x00\x00\x00\x00\x01", "ok"
    if forged == "a page marked 2":
        seen = seen[:-1] + b"\x02"
    elif forged == "a counter its record does not claim":
        found[b"t"][0] = 6
    elif forged == "a tree more":
        found[b"u"] = [0, 0, 0, 0, 0, None, None]
    elif forged == "a tree fewer":
        found = {}
    elif forged == "pages short":
        seen = seen[:-1]
    elif forged == "a key not bytes":
        found[b"t"][5] = "a"
    elif forged == "not ok":
        status = "no"
    answer = aside._answer(msgpack.packb([status, found, seen], use_bin_type=True), {b"t": record}, 8)
    if forged == "none":
        assert answer is not None and answer[1] == seen and answer[0][b"t"].entries == 5
    else:
        assert answer is None


def test_the_second_process_imports_from_this_processs_path(ledger: Path, answers: Any,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """This package's directory first, then this process's path (an entry a host added too),
    never the working directory, which `-c` would put first."""
    import sys

    popen, given = aside.subprocess.Popen, []

    def noting(args: list[str], **kwargs: Any) -> Any:
        given.append(args)
        return popen(args, **kwargs)

    monkeypatch.setattr(aside.subprocess, "Popen", noting)
    monkeypatch.syspath_prepend(str(ledger))  # (a directory a host put on its path)
    walked(ledger)
    assert answers == [(THERE, True)]
    assert given[0][3:] == [aside._PACKAGE_PARENT, *filter(None, sys.path)] and given[0][4] == str(ledger)
