"""A consumer in another process follows the event stream while the writer is SIGKILLed and reopened.

The writer is `bench/bench_kills.py`'s child (the same workload and kill loop as
`test_kills.py`, fewer rounds); the consumer is `tally tail --follow --json`, a read-only
ledger in its own process, opened once and kept across every kill and reopening. The test
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
from engine._follow import event_dict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_kills  # noqa: E402

KILLS = 4
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


def test_a_consumer_in_another_process_rebuilds_every_balance_across_sigkills_of_the_writer(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    rng = random.Random(SEED)
    books = bench_kills.Books(seed=SEED, threads=3)
    bench_kills.run_round(path, books, rng.randint(1, ACKS_MAX), tmp_path)  # makes the ledger
    consumer = subprocess.Popen([sys.executable, "-m", "engine", "tail", str(path), "--follow", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_lines, args=(consumer, lines), daemon=True).start()
    try:
        for _ in range(KILLS - 1):
            bench_kills.run_round(path, books, rng.randint(1, ACKS_MAX), tmp_path)
        with Ledger.open(path) as ledger:
            expected = [event_dict(event) for event in ledger.events()]
            final = {account.id: ledger.balance(account.id).posted for account in ledger.accounts()}
        seen: list[dict] = []
        while not seen or seen[-1]["lsn"] < expected[-1]["lsn"]:
            line = lines.get(timeout=WAIT_S)
            assert line is not None, f"seed {SEED}: the consumer ended early"
            seen.append(json.loads(line))
        consumer.send_signal(signal.SIGINT)  # Ctrl-C: ends quietly, exit 0
        assert consumer.wait(timeout=WAIT_S) == 0
        assert consumer.stderr is not None and consumer.stderr.read() == ""
    finally:
        if consumer.poll() is None:
            consumer.kill()
            consumer.wait(timeout=WAIT_S)

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
    for tid, (source, destination, amount) in books.acknowledged.items():
        assert committed[tid] == 1, f"seed {SEED}: acknowledged {tid} not seen"
    transfers = {t["id"]: t for event in seen if event["kind"] == "transfer" for t in event["transfers"]}
    assert all((transfers[tid]["source"], transfers[tid]["destination"], transfers[tid]["amount"]) == fields
               for tid, fields in books.acknowledged.items())
    assert books.refused and all(refused[tid] == 1 for tid in books.refused), f"seed {SEED}"
