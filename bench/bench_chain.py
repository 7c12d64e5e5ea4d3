"""What the hash chain costs: the same runs with records chained and unchained, side by side.

    python bench/bench_chain.py [--pairs 10] [--transfers 100000] [--clients 64 --singles 20000]

Each run is a process of its own: a ledger of 10,000 funded accounts, then `--transfers`
transfers in `transfer_many` batches of 1,000, and `--singles` single transfers from
`--clients` threads. A run without the chain frames its records as the chained format does
but keeps the digest of the record before (`frame_all` with the SHA-256 left out, patched into
the journal writer's group commit, `journal._commits`, of that process only): everything else is the same code. Chained and
unchained runs alternate, in turn ABBA, so drift falls on both; the figures are the medians of
the paired ratios chained / unchained, with their range, for the rate and for the process's
CPU per transfer. Issue 15's budget: the rates drop by at most 5%.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

ACCOUNTS = 10_000
BATCH = 1_000


def unchained(first_lsn: int, payloads: Sequence[bytes], previous: bytes) -> tuple[list[bytes], bytes]:
    """`journal._format.frame_all` without the chain: the same loop, the digest not advanced."""
    import zlib

    from journal import _format

    pack_lsn, pack_header, crc32, version = _format._LSN.pack, _format._HEADER.pack, zlib.crc32, _format._VERSION_BYTE
    framed: list[bytes] = []
    for lsn, payload in enumerate(payloads, first_lsn):
        assert type(payload) is bytes and payload, "a record carries a non-empty payload"
        key = pack_lsn(lsn)
        body = previous + payload
        framed += (key, pack_header(_format.RECORD_VERSION, crc32(body, crc32(key + version))) + body)
    return framed, previous


def child(chained: bool, transfers: int, clients: int, singles: int) -> dict[str, float]:
    """One run (in this process): the rates and the CPU per transfer of each phase."""
    from bench_engine import TallyBench, run_clients, workload

    from engine import TransferRequest
    from journal import _commits

    if not chained:
        _commits.frame_all = unchained  # type: ignore[assignment]
    result: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="tally-bench-", dir=os.environ.get("TALLY_BENCH_DIR")) as scratch:
        tally = TallyBench(os.path.join(scratch, "tally"), ACCOUNTS)
        tally.ledger._coordinator.claims.wait_warm(60.0)
        names = tally.names
        work = workload(ACCOUNTS, transfers, "uniform", 7)
        requests = [TransferRequest(f"m{k}", names[s], names[d], a) for k, (s, d, a) in enumerate(work)]
        gc.collect()
        started, cpu = time.perf_counter(), time.process_time()
        for first in range(0, len(requests), BATCH):
            tally.ledger.transfer_many(requests[first:first + BATCH])
        result["batch_per_s"] = len(requests) / (time.perf_counter() - started)
        result["batch_cpu_us"] = (time.process_time() - cpu) / len(requests) * 1e6
        if singles:
            cpu = time.process_time()
            timed = run_clients(clients, workload(ACCOUNTS, singles, "uniform", 8), tally.call("s"))
            result["singles_per_s"] = timed["transfers_per_s"]
            result["singles_cpu_us"] = (time.process_time() - cpu) / singles * 1e6
        tally.ledger.close()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--transfers", type=int, default=100_000, help="in transfer_many batches of 1,000")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--singles", type=int, default=20_000, help="single transfers from --clients threads (0: none)")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--child", choices=("chained", "unchained"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child == "chained", args.transfers, args.clients, args.singles)))
        return 0
    runs: dict[str, list[dict[str, float]]] = {"chained": [], "unchained": []}
    for pair in range(args.pairs):
        order = ("chained", "unchained") if pair % 2 == 0 else ("unchained", "chained")
        for mode in order:
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", mode, "--transfers",
                                   str(args.transfers), "--clients", str(args.clients), "--singles", str(args.singles)],
                                  capture_output=True, text=True, check=True, timeout=1800)
            runs[mode].append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"pair {pair + 1}/{args.pairs} done", file=sys.stderr)
    print(f"{args.pairs} pairs, ABBA; {args.transfers:,} transfers in batches of {BATCH:,}"
          + (f", {args.singles:,} single transfers from {args.clients} threads" if args.singles else ""))
    print(f"{'':24}{'chained':>18}{'unchained':>18}   chained / unchained, paired: median [range]")
    summary: dict[str, object] = {}
    for key, label in (("batch_per_s", "transfer_many /s"), ("batch_cpu_us", "  CPU us a transfer"),
                       ("singles_per_s", "single transfers /s"), ("singles_cpu_us", "  CPU us a transfer")):
        if key not in runs["chained"][0]:
            continue
        on = [run[key] for run in runs["chained"]]
        off = [run[key] for run in runs["unchained"]]
        ratios = [a / b for a, b in zip(on, off, strict=True)]
        print(f"{label:24}{statistics.median(on):>18,.1f}{statistics.median(off):>18,.1f}   "
              f"{statistics.median(ratios):.3f} [{min(ratios):.3f}-{max(ratios):.3f}]")
        summary[key] = {"chained": on, "unchained": off, "ratio_median": statistics.median(ratios)}
    if args.json:
        with open(args.json, "w") as out:
            json.dump(summary, out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
