"""Half the page walk in a second process: a large data file checked on two cores.

The walk (`journal._pages.walk`) is Python, one core's worth: about half a microsecond a
node, ~5 s for a million accounts. Its trees are independent but for the pages they claim
(each page used once in the whole file), so once the meta database is walked (it gives the
format version the index checks need), the last trees in walk order can be walked by a second
Python process while this one walks the others (`start`, then `AsideWalk.result`). That
process runs this module (`main`): it gets the open data file's descriptor, the trees'
records and what the checks need, walks them with the same code, and answers with what it
found in each tree and the pages they claimed.

Its answer is only ever a shortcut to the answer the walk in one process would give. It is
taken only when it is whole (every tree walked without a fault) and its pages are none this
process claimed; anything else (a fault found there, a page claimed by both, the process not
starting, dying, answering late or with anything unexpected) means those trees are walked
here, after the others, exactly as in one process: so the first fault, and how it is said,
are always the one-process walk's, and no answer from elsewhere can hide one.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgpack

from journal._limits import ASIDE_ENTRIES_MIN, ASIDE_WAIT_S
from journal._meta import NO_PAGE, Database, Meta
from journal._pages import PageWalk, Tree

logger = logging.getLogger("tally.journal")

_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CHILD = "import sys; sys.path[:] = sys.argv[1:]; from journal._walk_aside import main; main()"
"""The second process's program: its import path is this process's (each entry an argument),
this package's first, so it runs the code this process runs: not the working directory's
modules, which `-c` would put first (as ""), and which this process may not have on its path."""
_OK = "ok"


class Aside:
    """What `walk` needs to give its last trees to a second process: the open data file, the
    snapshot, and what the checks of a visited tree need (`visitor`, read once the meta
    database is walked: its format version)."""

    def __init__(self, fd: int, meta: Meta, data_file: str, visitor: Any, key_bytes: Mapping[bytes, int]) -> None:
        self.fd, self.meta, self.data_file, self.visitor, self.key_bytes = fd, meta, data_file, visitor, key_bytes

    def walk(self, trees: list[tuple[bytes, bytes]], walk_tree: Callable[[bytes, bytes], None], pages: PageWalk,
             found: dict[bytes, Tree]) -> None:
        """Walk `trees` (name, `MDB_db` record, in walk order) by `walk_tree`, all but the last
        ones (`aside_part`), which a second process walks meanwhile; its answer (what it found
        in each, into `found`; the pages they use, into `pages.seen`) is taken if whole and claiming
        no page these claimed, else they are walked here too, after the others."""
        there = trees[len(trees) - aside_part(trees, self.visitor.names):]
        helper = start(self.fd, self.meta, self.data_file, pages.file_pages, there, self.visitor.index_names,
                       self.visitor.format_version, self.key_bytes) if there else None
        try:
            for name, record in trees[:len(trees) - len(there)]:
                walk_tree(name, record)
            answer = helper.result() if helper is not None else None
        except BaseException:  # (an interrupt while waiting for its answer too: it is ended and reaped)
            if helper is not None:
                helper.stop()
            raise
        if answer is not None:
            seen = pages.seen
            mine, theirs = int.from_bytes(seen, "little"), int.from_bytes(answer[1], "little")
            if not mine & theirs:
                seen[:] = (mine | theirs).to_bytes(len(seen), "little")
                found.update((name, answer[0][name]) for name, _ in there)
                return
            logger.info("the second page walk claims pages these trees use: walking its trees here")
        for name, record in there:  # as in one process, which finds and says what is wrong
            walk_tree(name, record)


def aside_part(trees: Sequence[tuple[bytes, bytes]], visited: frozenset[bytes]) -> int:
    """How many of the last `trees` (name, `MDB_db` record; in walk order) to walk in a second
    process: as many as balance the work of the two (an entry of a visited tree, whose
    checksum is checked, weighs half as much again); 0 when they would hold fewer than
    `ASIDE_ENTRIES_MIN` entries (its start would cost more than it saves)."""
    entries = [Database.parse(record).entries for _, record in trees]
    weights = [count * (3 if name in visited else 2) for count, (name, _) in zip(entries, trees, strict=True)]
    total = best_load = sum(weights)  # (all of it here)
    best = suffix = 0
    for count in range(1, len(trees)):  # this process keeps one tree at least
        suffix += weights[-count]
        if max(suffix, total - suffix) < best_load:
            best, best_load = count, max(suffix, total - suffix)
    return best if best and sum(entries[len(trees) - best:]) >= ASIDE_ENTRIES_MIN else 0


class AsideWalk:
    """The second process walking some trees, once started (`start`)."""

    def __init__(self, process: subprocess.Popen[bytes], trees: Sequence[tuple[bytes, bytes]], pages: int) -> None:
        self._process = process
        self._trees = dict(trees)
        self._pages = pages
        self._started = time.monotonic()

    def result(self) -> tuple[dict[bytes, Tree], bytes] | None:
        """What the process found in each of its trees, and the pages they claimed (one byte
        a page: 1 if claimed), once it answers whole; None for anything else. Waits at most
        `ASIDE_WAIT_S` more than the time since it started (the two halves take about as long)."""
        timeout = ASIDE_WAIT_S + (time.monotonic() - self._started)
        try:
            out, _ = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.info("the second page walk did not answer in %.0f s: walking its trees here", timeout)
            self.stop()
            return None
        except OSError as error:
            logger.info("the second page walk failed (%s): walking its trees here", error)
            self.stop()
            return None
        if self._process.returncode != 0:
            logger.info("the second page walk ended with %s: walking its trees here", self._process.returncode)
            return None
        return _answer(out, self._trees, self._pages)

    def stop(self) -> None:
        """End the process (if it runs) and reap it."""
        process = self._process
        if process.poll() is None:
            process.kill()
        try:
            process.communicate(timeout=ASIDE_WAIT_S)
        except (subprocess.TimeoutExpired, OSError, ValueError):  # (reaped, or its pipes closed, already)
            pass


def start(fd: int, meta: Meta, data_file: str, file_pages: int, trees: Sequence[tuple[bytes, bytes]],
          index_names: Sequence[str], format_version: int | None, key_bytes: Mapping[bytes, int]) -> AsideWalk | None:
    """Start a second process walking `trees` (name, `MDB_db` record) of the data file open as
    `fd`, in the snapshot `meta` commits, taking it to hold `file_pages` pages (as this
    process's walk does); None if it cannot be started (the walk then stays
    here), or if this process's interpreter is not one to start (`sys.executable` is no
    `python` or `pypy`: a frozen application, a server that embeds Python)."""
    interpreter = sys.executable or ""
    if getattr(sys, "frozen", False) or not os.path.basename(interpreter).startswith(("python", "pypy")):
        return None  # (a host binary that embeds Python: not one to start with these arguments)
    spec = msgpack.packb([fd, data_file, meta.page_bytes, meta.last_page, file_pages, [list(tree) for tree in trees],
                          dict(key_bytes), list(index_names), format_version], use_bin_type=True)
    try:
        process = subprocess.Popen([interpreter, "-c", _CHILD, _PACKAGE_PARENT, *filter(None, sys.path)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                   pass_fds=(fd,))
    except Exception as error:  # (OSError, ValueError; RuntimeError where no process may be made: a subinterpreter)
        logger.info("no second process for the page walk (%s): walking every tree here", error)
        return None
    aside = AsideWalk(process, trees, meta.last_page + 1)
    stdin, process.stdin = process.stdin, None  # (written and closed here: `communicate` only reads)
    try:
        assert stdin is not None
        stdin.write(spec)
        stdin.close()
    except OSError as error:  # it died already: its result says so
        logger.info("the second page walk took no work (%s)", error)
    return aside


def _answer(out: bytes, records: Mapping[bytes, bytes], pages: int) -> tuple[dict[bytes, Tree], bytes] | None:
    """The process's answer, if it is a whole one for exactly the trees of `records` (name,
    `MDB_db` record), each tree's counters those its record claims (as the walk checks them),
    over `pages` pages, each marked 0 or 1."""
    try:
        status, found, seen = msgpack.unpackb(out, raw=False, strict_map_key=False)
        if (status != _OK or type(seen) is not bytes or len(seen) != pages or seen.translate(None, b"\x00\x01")
                or sorted(found) != sorted(records)):
            return None
        trees = {}
        for name, record in records.items():
            entries, branch, leaf, overflow, depth, first_key, last_key = found[name]
            claimed = Database.parse(record)
            if (entries, branch, leaf, overflow, depth) != (claimed.entries, claimed.branch_pages, claimed.leaf_pages,
                                                            claimed.overflow_pages, claimed.depth) or not all(
                    key is None or type(key) is bytes for key in (first_key, last_key)):
                return None
            trees[name] = Tree(entries, branch, leaf, overflow, depth, first_key, last_key)
        return trees, seen
    except Exception:  # msgpack raises several unrelated types on bad input: nothing to take from it
        logger.info("the second page walk answered out of shape: walking its trees here")
        return None


def main() -> None:
    """The second process: walk the trees the spec on stdin names, answer on stdout. A fault
    found is no answer (exit 1): the first process walks those trees again and says it."""
    from journal._check import visitor_for  # (here: `journal._check` starts this process)

    fd, data_file, page_bytes, last_page, file_pages, trees, key_bytes, index_names, format_version = (
        msgpack.unpackb(sys.stdin.buffer.read(), raw=False, strict_map_key=False))
    blank = Database(0, 0, 0, 0, 0, 0, NO_PAGE, page_bytes)
    walk = PageWalk(fd, Meta(0, 0, last_page, blank, blank), data_file, None)
    walk.file_pages = file_pages  # (the first process's look at the file: the halves judge one size)
    walk.seen[0] = walk.seen[1] = 0  # (the first process holds the meta pages)
    visit = visitor_for(index_names, format_version)
    found: dict[bytes, Any] = {}
    try:
        for name, record in trees:
            walk.visit = visit if name in visit.names else None
            walk.key_bytes = key_bytes.get(name, 0)
            tree = walk.tree(name, Database.parse(record))
            found[name] = [tree.entries, tree.branch_pages, tree.leaf_pages, tree.overflow_pages, tree.depth,
                           tree.first_key, tree.last_key]
    except Exception:  # a fault, or anything else: the first process walks them and says what
        sys.exit(1)
    sys.stdout.buffer.write(msgpack.packb([_OK, found, bytes(walk.seen)], use_bin_type=True))
    sys.stdout.buffer.flush()
