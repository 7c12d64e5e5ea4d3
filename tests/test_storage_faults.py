"""Damage a ledger's files every way `bench/bench_faults.py` knows, a few faults of each kind.

The sweep lives in `bench/bench_faults.py` (a few thousand faults); here it runs on a seeded
sample, in its own process (it forks a child per fault, which a process with threads must not
do). Every outcome must be harmless damage, damage `tally verify` names, or a `LedgerError`
with nothing written: never different data, a raw exception, a signal, a retry committed
twice, or verify saying whole over damage. Set `TALLY_FAULT_SEED` to replay another sample.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("TALLY_FAULT_SEED", "20261204"))
SWEEP_TIMEOUT_S = 300.0
KINDS = {"meta page", "free list page", "free page", "overflow page", "file truncated", "file replaced", "anchor",
         "lost write (a page zeroed)", "branch page header", "branch node pointers", "branch node headers",
         "branch keys", "leaf page header", "leaf node pointers", "leaf node headers", "leaf keys", "leaf values",
         "commit cut off in its flush"}

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("walk", ["one process", "two processes"])
def test_a_sample_of_every_kind_of_storage_fault_is_harmless_reported_or_refused(tmp_path: Path, walk: str) -> None:
    """Also with every page walk split across two processes (`journal._walk_aside`, which
    only a large file takes otherwise; one fault of each kind, each walk starting a process):
    its outcomes must be the one-process walk's."""
    out = tmp_path / "faults.json"
    aside = ["--walk-aside", "--per-kind", "1"] if walk == "two processes" else []
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_faults.py"), "--sample", "--seed", str(SEED),
                           "--json", str(out), *aside], capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S,
                          cwd=ROOT)
    report = json.loads(out.read_text())

    assert report["bad"] == [], (SEED, done.stdout)
    assert done.returncode == 0, (SEED, done.stdout, done.stderr)
    assert set(report["table"]) == KINDS, SEED
    refused = sum(counts.get("refused", 0) for counts in report["table"].values())
    assert refused >= (len(KINDS) if not aside else len(KINDS) // 2), (SEED, report["table"])  # damage done, and found
