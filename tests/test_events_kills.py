"""A consumer in another process follows the event stream while the writer is SIGKILLed and reopened.

The writer is `bench/bench_kills.py`'s child (the same workload and kill loop as
`test_kills.py`, fewer rounds); the consumer is `tally tail --follow --json`, a read-only
ledger in its own process, kept across the writer's kills and reopenings, and itself
SIGKILLed once and restarted after the last event it printed; beside it, a Python consumer
(`Ledger.open(path, readonly=True).events(follow=True)`) rebuilds every balance itself. The test
rebuilds every balance from the consumer's lines alone: at the end they equal the ledger's,
and every acknowledged transfer and refusal was seen exactly once. No sleeps: the children's
own output is the clock. Set `TALLY_KILL_SEED` to replay a failing run.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pytest
from engine import Ledger
from engine import jsonable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_kills  # noqa: E402

KILLS = 6
ACKS_MAX = 120
SEED = int(os.environ.get("TALLY_KILL_SEED", "20261205"))
WAIT_S = 60.0

pytestmark = pytest.mark.slow


def _lines(process: subprocess.Popen[str], into: queue.Queue[str | None]) -> None:
    """The consumer's stdout, line by line, then None at its end (a reader thread's loop)."""
    assert process.stdout is not None
    for line in process.stdout:
        into.put(line)
    into.put(None)


def _consumer(path: Path, after_lsn: int) -> tuple[subprocess.Popen[str], queue.Queue[str | None]]:
    """`tally tail PATH --from-lsn AFTER --follow --json` and the queue its lines arrive on."""
    process = subprocess.Popen([sys.executable, "-m", "engine", "tail", str(path), "--from-lsn", str(after_lsn),
                                "--follow", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(process, lines), daemon=True).start()
    return process, lines


REBUILDER = """
import json, sys, threading
from collections import Counter
from engine import Ledger

target: list[int] = []  # the last LSN to wait for, once the parent writes it on stdin
threading.Thread(target=lambda: target.append(int(sys.stdin.readline())), daemon=True).start()
balances: dict[str, int] = {}
seen: Counter[str] = Counter()
wrong = []
last = 0
with Ledger.open(sys.argv[1], readonly=True) as reader:
    print("ready", flush=True)
    while not target or last < target[0]:
        for event in reader.events(last, follow=True, timeout_s=0.1):
            if event.kind == "account":
                balances[event.account.id] = 0
            for entry in event.entries:
                balances[entry.account] += entry.amount
                if balances[entry.account] != entry.balance:
                    wrong.append(event.lsn)
            if event.kind in ("transfer", "refusal"):
                seen.update(t.id for t in event.transfers)
            last = event.lsn
    print(json.dumps({"balances": balances, "seen": seen, "wrong": wrong}), flush=True)
"""
"""A consumer that rebuilds every balance itself, from `Ledger.open(path, readonly=True).events`,
until the LSN the parent writes on its stdin; then prints what it rebuilt."""


def _stop(process: subprocess.Popen[str]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait(timeout=WAIT_S)


def test_a_consumer_in_another_process_rebuilds_every_balance_across_sigkills_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    rng = random.Random(SEED)
    books = bench_kills.Books(seed=SEED, threads=3)
    bench_kills.run_round(path, books, rng.randint(1, ACKS_MAX), tmp_path)  # makes the ledger
    consumer, lines = _consumer(path, 0)
    rebuilder = subprocess.Popen([sys.executable, "-c", REBUILDER, str(path)], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                 env=dict(os.environ, PYTHONPATH=str(ROOT)))
    seen: list[dict] = []
    try:
        assert rebuilder.stdout is not None and rebuilder.stdout.readline() == "ready\n"
        for round_ in range(KILLS - 1):
            bench_kills.run_round(path, books, rng.randint(1, ACKS_MAX), tmp_path)
            if round_ == 1:  # the consumer dies too, and resumes after the last event it processed
                consumer.send_signal(signal.SIGKILL)
                consumer.wait(timeout=WAIT_S)
                while (line := lines.get(timeout=WAIT_S)) is not None:
                    if line.endswith("\n"):  # a line cut by the kill was not processed
                        seen.append(json.loads(line))
                consumer, lines = _consumer(path, seen[-1]["lsn"] if seen else 0)
        with Ledger.open(path) as ledger:
            expected = [jsonable(event) for event in ledger.events()]
            final = {account.id: ledger.balance(account.id).posted for account in ledger.accounts()}
        while not seen or seen[-1]["lsn"] < expected[-1]["lsn"]:
            line = lines.get(timeout=WAIT_S)
            assert line is not None, f"seed {SEED}: the consumer ended early"
            seen.append(json.loads(line))
        rebuilt_there, rebuilder_errors = rebuilder.communicate(f"{expected[-1]['lsn']}\n", timeout=WAIT_S)
        assert rebuilder.returncode == 0, rebuilder_errors
        consumer.send_signal(signal.SIGINT)  # Ctrl-C: ends quietly, exit 0
        consumer.wait(timeout=WAIT_S)
        assert consumer.stderr is not None
        assert (consumer.returncode, consumer.stderr.read()) == (0, ""), f"seed {SEED}"
    finally:
        _stop(consumer)
        _stop(rebuilder)

    assert books.kills == KILLS and len(books.acknowledged) > KILLS
    assert seen == expected, f"seed {SEED}: the consumer's stream differs from the ledger's"
    rebuilt: dict[str, int] = {}
    for event in seen:
        if event["kind"] == "account":
            rebuilt[event["account"]["id"]] = 0
        for entry in event["entries"]:
            rebuilt[entry["account"]] += entry["amount"]
            assert rebuilt[entry["account"]] == entry["balance"], (SEED, event)
    assert rebuilt == final, f"seed {SEED}"
    committed = Counter(t["id"] for event in seen if event["kind"] == "transfer" for t in event["transfers"])
    refused = Counter(t["id"] for event in seen if event["kind"] == "refusal" for t in event["transfers"])
    assert all(count == 1 for count in (committed + refused).values()), f"seed {SEED}: an id seen twice"
    assert all(committed[tid] == 1 for tid in books.acknowledged), f"seed {SEED}: an acknowledged transfer unseen"
    transfers = {t["id"]: t for event in seen if event["kind"] == "transfer" for t in event["transfers"]}
    assert all((transfers[tid]["source"], transfers[tid]["destination"], transfers[tid]["amount"]) == fields
               for tid, fields in books.acknowledged.items())
    assert books.refused and all(refused[tid] == 1 for tid in books.refused), f"seed {SEED}"
    there = json.loads(rebuilt_there)  # the Python consumer's own rebuild, across the same kills
    assert there["wrong"] == [] and there["balances"] == final, f"seed {SEED}: {there['wrong'][:5]}"
    assert there["seen"] == dict(committed + refused), f"seed {SEED}"
