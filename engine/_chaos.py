"""`tally stress --chaos`: the engine in a child process, killed with SIGKILL again and again.

The child opens the ledger (recovering it), runs the seeded workload and prints
one line per reply it got, after the reply (so after durability). The parent
reads those lines, kills the child at a seeded random moment, and starts the
next child on the same ledger. At the end every transfer acknowledged before any
kill must be present, every refusal must still stand, and the books must balance.

A child that ends other than by the parent's SIGKILL (it could not open or fund the ledger,
it crashed, it exited before its round's end) fails the run: the rounds stop, the report
names its exit status and the tail of its stderr, and the verdict is FAILED. So does a run
that acknowledged no transfer at all: it proved nothing.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from typing import IO, Any

from coordinator import Transfer

from engine._auditor import Replies, audit_replies, open_pending
from engine._ledger import Ledger
from engine._stress import StressConfig, StressReport

LINES_BEFORE_KILL_MIN = 10
LINES_BEFORE_KILL_MAX = 300
CHILD_WAIT_S = 60.0
STDERR_TAIL_LINES = 20
"""The last lines of a failed child's stderr the report shows."""
CHECK_CHILDREN = "every engine child ran until it was killed, or to the end of its round"
CHECK_ACKNOWLEDGED = "some transfer was acknowledged (a run that acknowledged none proves nothing)"


class _ChildFailed(Exception):
    """An engine child ended other than by the parent's SIGKILL; the message says how."""


def run_chaos(config: StressConfig, kills: int, progress: bool = True) -> tuple[StressReport, dict[str, Any]]:
    """Kill the engine `kills` times mid-workload, then audit what every child was told."""
    assert config.path is not None
    rng = random.Random(config.seed)
    replies = Replies()
    report = StressReport(config)
    with Ledger.open(config.path) as ledger:  # a ledger used before: what its runs left pending holds funds too
        prior = open_pending(ledger)
    started = time.perf_counter()
    survived = 0
    failure = None
    for round_number in range(kills + 1):
        last = round_number == kills
        budget = None if not last else max(1, (config.transfers or 1000) // (kills + 1))
        try:
            killed = _round(config, round_number, rng, replies, report, budget)
        except _ChildFailed as error:
            failure = f"round {round_number + 1}/{kills + 1}: {error}"
            break
        if killed:
            with Ledger.open(config.path):  # recovery must succeed after every kill
                survived += 1
        if progress:
            print(f"chaos: round {round_number + 1}/{kills + 1}, acknowledged {len(replies.acknowledged):,},"
                  f" kills survived {survived}", file=sys.stderr, flush=True)
    report.elapsed_s = time.perf_counter() - started
    with Ledger.open(config.path) as ledger:
        lost = [tid for tid, reply in replies.acknowledged.items() if ledger.get_transfer(tid) != reply]
        report.checks = audit_replies(ledger, replies, prior=prior)
        report.state_hash = ledger.state_hash()
    report.checks["every transfer acknowledged before a kill survived it"] = not lost
    report.checks[CHECK_CHILDREN] = failure is None
    report.checks[CHECK_ACKNOWLEDGED] = bool(replies.acknowledged)
    chaos = {"kills": kills, "kills_survived": survived, "acknowledged": len(replies.acknowledged), "lost": len(lost)}
    return report, chaos if failure is None else {**chaos, "child_failure": failure}


def _round(config: StressConfig, number: int, rng: random.Random, replies: Replies, report: StressReport,
           budget: int | None) -> bool:
    """One child's round: True if the parent killed it. Raises `_ChildFailed` if it ended any
    other way (an exit of its own, status 0 included, in a round meant to end with a kill), or
    stopped answering for `CHILD_WAIT_S`."""
    assert config.path is not None
    command = [sys.executable, "-m", "engine._chaos", config.path, str(config.accounts), str(config.clients),
               config.mix, str(config.amount_max), str(config.seed * 1000 + number), str(budget or 0)]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        assert child.stdout is not None and child.stderr is not None
        readers = [threading.Thread(target=_read, args=(child.stdout, lines), daemon=True),
                   threading.Thread(target=tail.extend, args=(child.stderr,), daemon=True)]
        for reader in readers:
            reader.start()
        return _watch(child, readers, lines, tail, rng, replies, report, budget)
    except BaseException:  # an interrupt (Ctrl-C, SIGTERM) too: no child is left running on the ledger
        child.kill()
        child.wait(timeout=CHILD_WAIT_S)
        raise


def _watch(child: subprocess.Popen[str], readers: list[threading.Thread], lines: queue.SimpleQueue[str | None],
           tail: deque[str], rng: random.Random, replies: Replies, report: StressReport, budget: int | None) -> bool:
    """Read the child's replies, kill it when the round says; True if it was killed."""
    kill_after = None if budget else rng.randint(LINES_BEFORE_KILL_MIN, LINES_BEFORE_KILL_MAX)
    seen = 0
    killed = False
    deadline = time.monotonic() + CHILD_WAIT_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            child.kill()
            child.wait(timeout=CHILD_WAIT_S)
            raise _ChildFailed(f"the engine child stopped answering for {CHILD_WAIT_S:g} s"
                               f"{_stderr_tail(readers, tail)}") from None
        if line is None:
            break
        deadline = time.monotonic() + CHILD_WAIT_S  # `CHILD_WAIT_S` without a line, not for the whole round
        seen += _parse(line, replies, report)
        if kill_after is not None and seen >= kill_after:
            os.kill(child.pid, signal.SIGKILL)
            killed = True
            break
    try:
        status = child.wait(timeout=CHILD_WAIT_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait(timeout=CHILD_WAIT_S)
        raise _ChildFailed(f"the engine child closed its output and did not exit within {CHILD_WAIT_S:g} s"
                           f"{_stderr_tail(readers, tail)}") from None
    if status != (-signal.SIGKILL if killed else 0) or (kill_after is not None and not killed):
        ended = f"was killed by {signal.Signals(-status).name}" if status < 0 else f"exited with status {status}"
        when = "before the parent killed it" if kill_after is not None else "in the last round, which no kill ends"
        raise _ChildFailed(f"the engine child {ended} {when}, after {seen:,} replies{_stderr_tail(readers, tail)}")
    for reader in readers:
        reader.join(timeout=CHILD_WAIT_S)
    return killed


def _read(stream: IO[str], lines: queue.SimpleQueue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _stderr_tail(readers: list[threading.Thread], tail: deque[str]) -> str:
    """The last lines the child wrote to stderr, once it has closed it, as the end of a message."""
    for reader in readers:
        reader.join(timeout=CHILD_WAIT_S)
    text = "".join(tail).rstrip()
    return f"; the end of its stderr:\n{text}" if text else "; it wrote nothing to stderr"


def _parse(line: str, replies: Replies, report: StressReport) -> int:
    parts = line.split()
    if len(parts) != (7 if parts[:1] == ["A"] else 6) or parts[0] not in ("A", "R"):
        return 0  # a line cut short by the kill: the reply never fully reached us
    kind, tid, source, destination, amount, last = parts[:6]
    if kind == "A":
        replies.acknowledged[tid] = Transfer(tid, source, destination, int(amount), int(last), int(parts[6]))
        report.outcomes["committed"] = report.outcomes.get("committed", 0) + 1
    else:
        replies.refused[tid] = (source, destination, int(amount), last)
        report.outcomes[last] = report.outcomes.get(last, 0) + 1
    report.sent += 1
    return 1


def _child(argv: list[str]) -> int:
    from coordinator import LedgerError

    from engine._stress import open_accounts
    from engine._workload import ClientWorkload, Picker

    path, accounts, clients, mix, amount_max, seed, budget = argv
    config = StressConfig(path=path, accounts=int(accounts), clients=int(clients), mix=mix,
                          amount_max=int(amount_max), seed=int(seed))
    names = [f"acct-{n:06d}" for n in range(config.accounts)]
    printing = threading.Lock()
    remaining = [int(budget) or 10**12]
    with Ledger.open(path) as ledger:
        open_accounts(ledger, names, config)
        picker = Picker(names, config.mix)

        def client(number: int) -> None:
            workload = ClientWorkload(picker, tag=f"x{seed}", client=number, seed=config.seed,
                                      amount_max=config.amount_max, retry_rate=0.0)
            while True:
                with printing:
                    if remaining[0] <= 0:
                        return
                    remaining[0] -= 1
                op = workload.next()
                try:
                    done = ledger.transfer(op.transfer_id, source=op.source, destination=op.destination, amount=op.amount)
                    line = f"A {op.transfer_id} {op.source} {op.destination} {op.amount} {done.lsn} {done.timestamp}\n"
                except LedgerError as error:
                    line = f"R {op.transfer_id} {op.source} {op.destination} {op.amount} {error.code}\n"
                with printing:
                    sys.stdout.write(line)
                    sys.stdout.flush()

        threads = [threading.Thread(target=client, args=(n,)) for n in range(config.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return 0


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
