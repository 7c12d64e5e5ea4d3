"""Reopening one ledger with two trees of Tally, side by side: open, the page walk inside it, close.

    python bench/bench_reopen.py LEDGER TREE_A TREE_B [--rounds 3] [--json out.json]

LEDGER is a ledger directory left as a user's would be: crashed (a SIGKILLed writer: the open
walks every page and reads back the chain of checkpoints) or closed (sealed: the open takes
the seal). Each round copies it afresh for each tree in turn and, in a new process whose
import path starts with that tree (a clone of the repository at some commit), times
`Ledger.open`, the page walk inside it (`journal._check.walk`, wrapped) and `close` (which
walks again for the seal after a crash). It prints each tree's medians and ranges and the
paired ratios B / A; the machine is shared, so read the ratios. A million-account LEDGER takes
minutes a round (the copy is ~800 MiB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_TIMED = r"""
import json, sys, time
sys.meta_path[:] = [finder for finder in sys.meta_path if "editable" not in repr(finder)]
sys.path.insert(0, sys.argv[2])
import engine, journal._check as check
assert engine.__file__.startswith(sys.argv[2]), engine.__file__
walked = [0.0]
walk = check.walk
def timed_walk(*args, **kwargs):
    started = time.perf_counter()
    try:
        return walk(*args, **kwargs)
    finally:
        walked[0] += time.perf_counter() - started
check.walk = timed_walk
started = time.perf_counter()
ledger = engine.Ledger.open(sys.argv[1])
opened = time.perf_counter() - started
walk_in_open = walked[0]
started = time.perf_counter()
ledger.close()
print(json.dumps({"open_s": opened, "walk_in_open_s": walk_in_open, "close_s": time.perf_counter() - started}))
"""
FIGURES = ("open_s", "walk_in_open_s", "close_s")


def run(ledger: Path, tree: Path, scratch: Path) -> dict[str, float]:
    copy = scratch / "copy"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(ledger, copy)
    done = subprocess.run([sys.executable, "-c", _TIMED, str(copy), str(tree)], capture_output=True, text=True,
                          timeout=3600, cwd=scratch)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {done.stderr.strip()}")
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ledger", type=Path)
    parser.add_argument("trees", type=Path, nargs=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    trees = [tree.resolve() for tree in args.trees]
    results: dict[str, list[dict[str, float]]] = {str(tree): [] for tree in trees}
    with tempfile.TemporaryDirectory(prefix="tally-reopen-") as scratch:
        for round_ in range(args.rounds):
            for tree in trees:
                results[str(tree)].append(run(args.ledger, tree, Path(scratch)))
            print(f"round {round_ + 1}: " + ", ".join(
                f"{tree.name} open {results[str(tree)][-1]['open_s']:.2f} s" for tree in trees), flush=True)
    a, b = (results[str(tree)] for tree in trees)
    print(f"\n{args.ledger}, {args.rounds} rounds: median [range] seconds, and B / A paired")
    print(f"{'':<16}" + "".join(f"{figure:>26}" for figure in FIGURES))
    for name, rows in ((f"A {trees[0].name}", a), (f"B {trees[1].name}", b)):
        print(f"{name[:16]:<16}" + "".join(
            f"{statistics.median(r[f] for r in rows):>12.2f} [{min(r[f] for r in rows):.2f}-{max(r[f] for r in rows):.2f}]"
            for f in FIGURES))
    ratios = {f: [y[f] / x[f] for x, y in zip(a, b, strict=True) if x[f]] for f in FIGURES}
    print(f"{'B / A':<16}" + "".join(
        f"{statistics.median(r):>12.2f} [{min(r):.2f}-{max(r):.2f}]" if r else f"{'-':>26}" for r in ratios.values()))
    if args.json:
        Path(args.json).write_text(json.dumps({"ledger": str(args.ledger), "results": results}, indent=2))


if __name__ == "__main__":
    main()
