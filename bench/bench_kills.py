"""Kill a loaded ledger process with SIGKILL again and again; check the books after every kill.

    python bench/bench_kills.py [--kills 1000] [--seed 1] [--threads 4] [--path DIR] [--json]

Each round starts a child process that opens the same ledger (recovering it),
then runs a deterministic workload from several threads (single transfers, and
`transfer_many` batches on one thread) and prints one line per acknowledged
outcome. The parent reads a seeded random number of those lines (1 to
`--acks-max`), sends SIGKILL, reads whatever the child had already printed, and
checks the books before the next round:

- every outcome acknowledged in any earlier round is still there (sampled for
  old rounds, all of them for the newest), with its fields, and every
  acknowledged refusal is still a refusal;
- every new entry is the next seq of its account with the running balance, and
  every new transfer has exactly two entries, on its source and destination,
  summing to 0, with the fields its id was requested with;
- money is conserved and nothing is pending.

Every `--verify-every` rounds, and at the end, `tally verify` replays the whole
journal. One round in four runs `tally recover` before the next child.

Each workload thread is a deterministic stream of transfers (`c{thread}-{k}`):
a new child resumes every stream at its first unacknowledged position, so the
transfer that was in flight at the kill is retried with the same id and fields
and must be applied exactly once. `run_kills` is also what `tests/test_kills.py`
drives.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import selectors
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import InsufficientFunds, Ledger, LedgerError, Transfer, TransferRequest  # noqa: E402

ACCOUNTS = tuple(f"acct-{n:02d}" for n in range(12))
BANK = "bank"
AMOUNT_MAX = 500
BATCH_THREAD = 0
"""The workload thread that sends `transfer_many` batches; the others send single transfers."""
BATCH_SIZE_MAX = 40
STREAM_LENGTH_MAX = 1_000_000
"""A child stops after this many transfers per thread (it is always killed long before)."""
CHILD_LIFETIME_S_MAX = 600.0
CHECKPOINT_INTERVAL = 200
"""Small, so kills land around checkpoints and reopening replays a short tail."""
ACK_WAIT_S_MAX = 60.0
"""Longest the parent waits for a child's next line, or for it to die after SIGKILL."""
CLI_TIMEOUT_S = 120.0
SAMPLE_OLD_ACKS = 64

# --- the child: runs the workload until it is killed --------------------------------------------


def stream_request(seed: int, thread: int, k: int) -> TransferRequest:
    """The k-th transfer of a thread's stream: the same id always has the same fields."""
    rng = random.Random(f"{seed}:{thread}:{k}")
    draw = rng.random()
    if draw < 0.2:
        source, destination = BANK, rng.choice(ACCOUNTS)
    elif draw < 0.4:  # as much flows back to the bank: balances stay low and refusals keep coming
        source, destination = rng.choice(ACCOUNTS), BANK
    else:
        source, destination = rng.sample(ACCOUNTS, 2)
    return TransferRequest(f"c{thread}-{k}", source, destination, rng.randint(1, AMOUNT_MAX))


class _Child:
    """Open the ledger, resume each stream at `starts[thread]`, print every acknowledged outcome."""

    def __init__(self, path: str, seed: int, threads: int, starts: list[int]) -> None:
        self.path, self.seed, self.threads, self.starts = path, seed, threads, starts
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        # One short write and a flush per line, made only once the outcome is durable: whatever
        # reached the pipe before SIGKILL landed was acknowledged.
        with self.lock:
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def die(self, error: BaseException) -> None:
        with self.lock:
            sys.stderr.write("".join(traceback.format_exception(error)))
            sys.stderr.flush()
            os._exit(3)

    def report(self, request: TransferRequest, outcome: Transfer | LedgerError) -> None:
        if isinstance(outcome, LedgerError):
            if outcome.code != InsufficientFunds.code:  # the only refusal this workload can meet
                raise outcome
            self.say(f"R {request.id} {outcome.code}")
        else:
            self.say(f"A {request.id} {outcome.source} {outcome.destination} {outcome.amount}")

    def single(self, ledger: Ledger, thread: int) -> None:
        start = self.starts[thread]
        for k in range(start, start + STREAM_LENGTH_MAX):
            request = stream_request(self.seed, thread, k)
            try:
                outcome: Transfer | LedgerError = ledger.transfer(
                    request.id, source=request.source, destination=request.destination, amount=request.amount)
            except InsufficientFunds as refusal:
                outcome = refusal
            self.report(request, outcome)

    def batches(self, ledger: Ledger, thread: int) -> None:
        start = k = self.starts[thread]
        rng = random.Random(f"{self.seed}:batches:{start}")
        while k < start + STREAM_LENGTH_MAX:
            requests = [stream_request(self.seed, thread, j) for j in range(k, k + rng.randint(1, BATCH_SIZE_MAX))]
            for request, outcome in zip(requests, ledger.transfer_many(requests), strict=True):
                self.report(request, outcome)
            k += len(requests)

    def work(self, ledger: Ledger, thread: int) -> None:
        try:
            (self.batches if thread == BATCH_THREAD else self.single)(ledger, thread)
        except BaseException as error:  # the thread's top level: any failure ends the child, loudly
            self.die(error)

    def run(self) -> None:
        try:
            ledger = Ledger.open(self.path, checkpoint_interval=CHECKPOINT_INTERVAL)
            ledger.create_account(BANK, currency="USD", overdraft_limit=None)
            for name in ACCOUNTS:
                ledger.create_account(name, currency="USD")
        except BaseException as error:
            self.die(error)
        self.say("ready")
        workers = [threading.Thread(target=self.work, args=(ledger, n), daemon=True) for n in range(self.threads)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=CHILD_LIFETIME_S_MAX)
        ledger.close()


def child_main(argv: list[str]) -> None:
    """`bench_kills.py --child PATH SEED THREADS STARTS`: the workload a round kills."""
    path, seed, threads, starts = argv
    _Child(path, int(seed), int(threads), [int(s) for s in starts.split(",")]).run()


# --- the parent: kills, reads, checks ----------------------------------------------------------


def expected_fields(seed: int, tid: str) -> tuple[str, str, int] | None:
    """The (source, destination, amount) a workload id was requested with; None if not a workload id."""
    thread, _, k = tid[1:].partition("-")
    if not tid.startswith("c") or not thread.isdigit() or not k.isdigit():
        return None
    request = stream_request(seed, int(thread), int(k))
    return request.source, request.destination, request.amount


class KillFailure(AssertionError):
    """An invariant failed, or a child did not behave: the message says which, and the seed."""


@dataclass
class Books:
    """What the parent knows: every acknowledged outcome, and how far it has checked each account."""

    seed: int
    threads: int
    acknowledged: dict[str, tuple[str, str, int]] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    starts: list[int] = field(default_factory=list)
    checked_seq: dict[str, int] = field(default_factory=dict)
    checked_balance: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    survived: int = 0
    """Kills after which every check passed."""
    recovers: int = 0
    verifies: int = 0

    def __post_init__(self) -> None:
        self.starts = [0] * self.threads

    def acknowledge(self, line: str) -> bool:
        """Record one line from a child; True if it was an acknowledged outcome."""
        parts = line.split()
        if not parts or parts[0] not in ("A", "R"):
            return False
        tid = parts[1]
        if parts[0] == "A":
            self.acknowledged[tid] = (parts[2], parts[3], int(parts[4]))
        else:
            self.refused[tid] = parts[2]
        thread, _, k = tid[1:].partition("-")
        self.starts[int(thread)] = max(self.starts[int(thread)], int(k) + 1)
        return True


class LineReader:
    """Complete lines from a child's stdout, each read bounded by a deadline."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        assert process.stdout is not None
        self._fd = process.stdout.fileno()
        os.set_blocking(self._fd, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._fd, selectors.EVENT_READ)
        self._buffer = b""
        self._lines: list[str] = []
        self.eof = False

    def next_line(self, timeout_s: float) -> str | None:
        """The next complete line, or None at end of file. Raises TimeoutError after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not self._lines and not self.eof:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no line from the child within {timeout_s} s")
            if not self._selector.select(remaining):
                continue
            chunk = os.read(self._fd, 65536)
            if not chunk:
                self.eof = True  # a partial last line (none in practice: lines are short writes) is dropped
                break
            self._buffer += chunk
            *complete, self._buffer = self._buffer.split(b"\n")
            self._lines.extend(line.decode() for line in complete)
        return self._lines.pop(0) if self._lines else None

    def close(self) -> None:
        self._selector.close()


def run_round(path: Path, books: Books, acks_target: int, scratch: Path) -> int:
    """One child: read `acks_target` acknowledged outcomes, SIGKILL it, read the rest. Returns acks read."""
    starts = ",".join(str(s) for s in books.starts)
    stderr_path = scratch / f"child-{books.kills}.stderr"
    with open(stderr_path, "wb") as stderr:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", str(path), str(books.seed), str(books.threads), starts],
            stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL,
        )
    reader = LineReader(child)
    acks = 0
    try:
        while acks < acks_target:
            line = reader.next_line(ACK_WAIT_S_MAX)
            if line is None:
                child.wait(timeout=ACK_WAIT_S_MAX)
                raise KillFailure(
                    f"seed {books.seed}, round {books.kills + 1}: the child ended (exit {child.returncode}) after"
                    f" {acks} of {acks_target} acks: {stderr_path.read_text()[-2000:]}")
            acks += books.acknowledge(line)
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=ACK_WAIT_S_MAX)
        while (line := reader.next_line(ACK_WAIT_S_MAX)) is not None:
            acks += books.acknowledge(line)  # printed before the kill landed: acknowledged too
    finally:
        reader.close()
        if child.poll() is None:
            child.kill()
            child.wait(timeout=ACK_WAIT_S_MAX)
        assert child.stdout is not None
        child.stdout.close()
    if child.returncode != -signal.SIGKILL:
        raise KillFailure(f"seed {books.seed}: the child exited {child.returncode}, not by SIGKILL:"
                          f" {stderr_path.read_text()[-2000:]}")
    books.kills += 1
    return acks


def tally(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the `tally` CLI in a child process (bounded)."""
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True,
                          timeout=CLI_TIMEOUT_S, cwd=ROOT)


def check_cli(books: Books, *args: str) -> None:
    done = tally(*args, "--json")
    report = json.loads(done.stdout) if done.stdout.startswith("{") else {}
    if done.returncode != 0 or report.get("verdict") != "whole":
        raise KillFailure(f"seed {books.seed}, after kill {books.kills}: `tally {' '.join(args)}` exited"
                          f" {done.returncode}: {done.stdout[-2000:]} {done.stderr[-2000:]}")


def check_books(path: Path, books: Books, newest: dict[str, object], rng: random.Random) -> None:
    """Open the ledger and check everything listed in the module docstring; raise KillFailure."""
    problems: list[str] = []
    with Ledger.open(path) as ledger:
        old = [tid for tid in books.acknowledged if tid not in newest]
        old_refused = [tid for tid in books.refused if tid not in newest]
        sample = list(newest) + rng.sample(old, min(SAMPLE_OLD_ACKS, len(old))) \
            + rng.sample(old_refused, min(SAMPLE_OLD_ACKS // 4, len(old_refused)))
        for tid in sample:
            found = ledger.get_transfer(tid)
            if tid in books.acknowledged:
                fields = None if found is None else (found.source, found.destination, found.amount)
                if fields != books.acknowledged[tid]:
                    problems.append(f"acknowledged transfer {tid} {books.acknowledged[tid]} is {fields}")
            elif found is not None:
                problems.append(f"refused transfer {tid} ({books.refused[tid]}) is committed: {found}")
        pairs: dict[str, list[tuple[str, int]]] = {}
        total = 0
        for account in [BANK, *ACCOUNTS]:
            seq, running = books.checked_seq.get(account, 0), books.checked_balance.get(account, 0)
            for entry in ledger.entries(account, after=seq):
                seq, running = seq + 1, running + entry.amount
                if (entry.seq, entry.balance) != (seq, running):
                    problems.append(f"{account} entry {entry} is not seq {seq} with balance {running}")
                pairs.setdefault(entry.transfer_id, []).append((account, entry.amount))
            books.checked_seq[account], books.checked_balance[account] = seq, running
            balance = ledger.balance(account)
            if balance.pending != 0 or balance.posted != running:
                problems.append(f"{account}: {balance}, expected posted {running} and nothing pending")
            total += balance.posted
        if total != 0:
            problems.append(f"posted balances sum to {total}, not 0")
        for tid, legs in pairs.items():
            fields = expected_fields(books.seed, tid)
            found = ledger.get_transfer(tid)
            if fields is None or found is None or (found.source, found.destination, found.amount) != fields:
                problems.append(f"transfer {tid}: requested {fields}, committed {found}")
            elif sorted(legs) != sorted([(fields[0], -fields[2]), (fields[1], fields[2])]):
                problems.append(f"transfer {tid} ({fields}) has the entries {legs}")
    if problems:
        raise KillFailure(f"seed {books.seed}, after kill {books.kills}: " + "; ".join(problems[:10]))


def run_kills(
    path: Path,
    *,
    kills: int,
    seed: int,
    threads: int = 4,
    acks_max: int = 200,
    verify_every: int = 50,
    scratch: Path | None = None,
    progress: Callable[[Books], None] | None = None,
    books: Books | None = None,
) -> Books:
    """Kill and restart `kills` times, checking the books after each; raise KillFailure on the first problem.

    Pass `books` to keep what was learnt (and `books.survived`) when a KillFailure is raised."""
    assert kills >= 1 and threads >= 2 and acks_max >= 1, (kills, threads, acks_max)
    rng = random.Random(seed)
    books = books if books is not None else Books(seed=seed, threads=threads)
    assert (books.seed, books.threads, books.kills) == (seed, threads, 0), books
    with tempfile.TemporaryDirectory(prefix="tally-kills-") as fallback:
        scratch = scratch if scratch is not None else Path(fallback)
        while books.kills < kills:
            before = set(books.acknowledged) | set(books.refused)
            run_round(path, books, rng.randint(1, acks_max), scratch)
            newest = {tid: None for tid in [*books.acknowledged, *books.refused] if tid not in before}
            if rng.random() < 0.25:
                check_cli(books, "recover", str(path))
                books.recovers += 1
            check_books(path, books, newest, rng)
            if books.kills % verify_every == 0 or books.kills == kills:
                check_cli(books, "verify", str(path))
                books.verifies += 1
            books.survived += 1
            if progress is not None:
                progress(books)
    return books


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=1000, help="SIGKILLs to survive (default 1000)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the kill moments and workload (default 1)")
    parser.add_argument("--threads", type=int, default=4, help="workload threads per child (default 4)")
    parser.add_argument("--acks-max", type=int, default=200, help="most acks read before a kill (default 200)")
    parser.add_argument("--verify-every", type=int, default=50, help="run `tally verify` every N kills (default 50)")
    parser.add_argument("--path", help="ledger directory (default: a temporary one)")
    parser.add_argument("--json", action="store_true", help="also print the summary as one JSON line")
    args = parser.parse_args()
    started = time.perf_counter()
    every = max(1, args.kills // 20)

    def progress(books: Books) -> None:
        if books.survived % every == 0:
            print(f"  {books.survived:>6} kills survived, {len(books.acknowledged):>8} transfers and"
                  f" {len(books.refused):>7} refusals acknowledged, {time.perf_counter() - started:7.1f} s", flush=True)

    with tempfile.TemporaryDirectory(prefix="tally-bench-kills-") as scratch:
        path = Path(args.path) if args.path else Path(scratch) / "ledger"
        print(f"bench_kills: {args.kills} SIGKILLs, seed {args.seed}, {args.threads} threads, ledger {path}")
        books = Books(seed=args.seed, threads=args.threads)
        failure = None
        try:
            run_kills(path, kills=args.kills, seed=args.seed, threads=args.threads, acks_max=args.acks_max,
                      verify_every=args.verify_every, scratch=Path(scratch), progress=progress, books=books)
        except KillFailure as error:
            failure = str(error)
        elapsed_s = time.perf_counter() - started
        survived = books.survived
        summary = {
            "kills_asked": args.kills, "kills_survived": survived, "seed": args.seed,
            "transfers_acknowledged": len(books.acknowledged), "refusals_acknowledged": len(books.refused),
            "recovers_run": books.recovers, "verifies_run": books.verifies,
            "elapsed_s": round(elapsed_s, 1), "failure": failure, "verdict": "ok" if failure is None else "FAILED",
        }
    if failure is not None:
        print(f"FAILED after surviving {survived} of {args.kills} kills ({elapsed_s:.1f} s): {failure}")
    else:
        print(f"survived {survived} of {args.kills} kills; {len(books.acknowledged)} transfers and"
              f" {len(books.refused)} refusals acknowledged, all present; {books.recovers} `tally recover` runs,"
              f" {books.verifies} `tally verify` runs; {elapsed_s:.1f} s ({elapsed_s / args.kills:.2f} s per kill)")
    if args.json:
        print(json.dumps(summary))
    return 0 if failure is None else 1


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
    else:
        sys.exit(main())
