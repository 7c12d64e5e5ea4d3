"""SIGKILL a loaded ledger process at seeded random moments, again and again, and check the books.

The kill loop lives in `bench/bench_kills.py` (which runs it 1,000 times); here it
runs `KILLS` times. Each round a child reopens the same ledger and continues a
deterministic workload; the parent kills it after reading a seeded random number
(1..200) of acknowledgement lines (no sleeps: the child's own output is the
clock). Set `TALLY_KILL_SEED` to replay a failing run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from engine import InsufficientFunds, Ledger

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import bench_kills  # noqa: E402

KILLS = 24
SEED = int(os.environ.get("TALLY_KILL_SEED", "20261123"))
CLI_TIMEOUT_S = 60.0

pytestmark = pytest.mark.slow


def test_every_outcome_acknowledged_before_a_sigkill_survives_all_later_kills_and_restarts(tmp_path: Path) -> None:
    path = tmp_path / "ledger"
    books = bench_kills.run_kills(path, kills=KILLS, seed=SEED, acks_max=200, verify_every=KILLS,
                                  scratch=tmp_path)

    assert books.kills == books.survived == KILLS
    assert len(books.acknowledged) > KILLS, f"seed {SEED}: the children were barely loaded"
    with Ledger.open(path) as ledger:
        missing = {tid: fields for tid, fields in books.acknowledged.items()
                   if (found := ledger.get_transfer(tid)) is None
                   or (found.source, found.destination, found.amount) != fields}
        assert not missing, f"seed {SEED}: acknowledged transfers lost or changed: {list(missing.items())[:5]}"
        assert books.refused, f"seed {SEED}: the workload met no refusal"
        for tid in books.refused:
            assert ledger.get_transfer(tid) is None, f"seed {SEED}: acknowledged refusal {tid} was committed"
            request = bench_kills.stream_request(SEED, *map(int, tid[1:].split("-")))
            with pytest.raises(InsufficientFunds):  # the refusal is journaled: a retry meets it again
                ledger.transfer(tid, source=request.source, destination=request.destination, amount=request.amount)
        balances = {account.id: ledger.balance(account.id) for account in ledger.accounts()}
        assert sum(balance.posted for balance in balances.values()) == 0, f"seed {SEED}: {balances}"
        assert all(balance.pending == 0 for balance in balances.values()), f"seed {SEED}: {balances}"
        assert set(balances) == {bench_kills.BANK, *bench_kills.ACCOUNTS}
    done = subprocess.run([sys.executable, "-m", "engine", "verify", str(path), "--json"], capture_output=True,
                          text=True, timeout=CLI_TIMEOUT_S, cwd=ROOT)
    assert done.returncode == 0, (SEED, done.stdout, done.stderr)
    assert json.loads(done.stdout)["verdict"] == "whole"

