"""A million accounts: creating them, touching each, load with checkpoints, reopening, memory.

    python bench/bench_million.py [--accounts 1000000] [--load-transfers 100000] [--json out.json]

Takes minutes; not part of the test suite. In one ledger, in order:
1. `create_accounts` of `--accounts` accounts (lists of 10,000) and one bank account;
2. one `transfer_many` funding each account once from the bank (batches of 1,000): every
   account touched;
3. load: 64 threads calling `transfer` between random accounts, `--load-transfers` in all,
   while checkpoints fall every 20,000 changed accounts: rate, p50, p99 and the longest
   latency, and the longest pause the sequencer lock took for a checkpoint;
4. the process's peak resident memory so far; the data file's size; then the process is
   SIGKILLed, as a crash ends it (every transfer acknowledged, so durable);
5. reopen after that crash in a new process: the time `Ledger.open` takes (it reads back the
   chain of checkpoints and, with no seal, walks every page), then the time `close` takes
   (it writes a checkpoint of every account, and the seal);
6. reopen in a new process, as a restart after a clean close does: the time `Ledger.open`
   takes to return, that process's peak resident memory, and one balance read; then
   `--after-transfers` more from 64 threads in that process (rate, p99, and the longest
   checkpoint pause: the first checkpoint after an open is the one that once paused longest).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_engine import run_clients, transfer_call, workload, write_json  # noqa: E402

import coordinator._sequencer as sequencer_module  # noqa: E402
from engine import Account, Ledger, TransferRequest  # noqa: E402

CLIENTS = 64
LIST = 10_000
BATCH = 1_000
FUNDING = 10**9


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def timed_checkpoints() -> list[float]:
    """Wrap `Sequencer.checkpoint` to record how long each held the sequencer lock."""
    pauses: list[float] = []
    real = sequencer_module.Sequencer.checkpoint

    def checkpoint(self: sequencer_module.Sequencer, whole: bool = False) -> int:
        started = time.perf_counter()
        try:
            return real(self, whole)
        finally:
            pauses.append(time.perf_counter() - started)

    sequencer_module.Sequencer.checkpoint = checkpoint  # type: ignore[method-assign]
    return pauses


REOPEN = """
import json, sys, time
sys.path.insert(0, sys.argv[3])
sys.path.insert(0, sys.argv[3] + "/bench")
from bench_engine import run_clients, transfer_call, workload
from bench_million import timed_checkpoints
from engine import Ledger
started = time.perf_counter()
ledger = Ledger.open(sys.argv[1])
open_s = time.perf_counter() - started
balance = ledger.balance(sys.argv[2])
accounts, transfers = int(sys.argv[4]), int(sys.argv[5])
after = None
if transfers:
    pauses = timed_checkpoints()
    names = [f"acct-{n:07d}" for n in range(accounts)]
    after = run_clients(64, workload(accounts, transfers, "uniform", 11), transfer_call(ledger, names, "after"))
    after["checkpoints"] = len(pauses)
    after["checkpoint_pauses_ms"] = [round(pause * 1e3, 1) for pause in pauses]
started = time.perf_counter()
ledger.close()
close_s = time.perf_counter() - started
with open("/proc/self/status") as status:  # VmHWM: this process's peak (ru_maxrss starts at the parent's)
    peak_kib = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
print(json.dumps({"open_s": round(open_s, 2), "close_s": round(close_s, 2), "balance": [balance.posted, balance.pending],
                  "peak_rss_mib": round(peak_kib / 1024), "after": after}))
"""


def reopen(path: str, account: str, accounts: int = 0, transfers: int = 0) -> dict:
    """Open the ledger in a new process, as a restart does: how long `Ledger.open` takes, that
    process's peak resident memory, and one balance; then, with `transfers`, that many from 64
    threads between the `accounts` accounts (`after`: rate, latencies, checkpoint pauses)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", REOPEN, path, account, root, str(accounts), str(transfers)],
                          capture_output=True, text=True, check=True, timeout=900)
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def build(path: str, accounts: int, load_transfers: int, seed: int) -> dict:
    """Steps 1 to 4 into a new ledger at `path`, in a process of its own, which then ends as a
    crash does (SIGKILL): the figures, with the last account's balance (posted, pending)
    under "balance", written to `path` + ".json" before."""
    result: dict = {"accounts": accounts}
    pauses = timed_checkpoints()
    names = [f"acct-{n:07d}" for n in range(accounts)]
    ledger = Ledger.open(path)
    started = time.perf_counter()
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for first in range(0, len(names), LIST):
        made = ledger.create_accounts([Account(name, "USD", 0) for name in names[first : first + LIST]])
        assert all(isinstance(account, Account) for account in made), made
    result["create_s"] = round(time.perf_counter() - started, 1)
    print(f"created {accounts:,} accounts in {result['create_s']} s", file=sys.stderr)

    started = time.perf_counter()
    for first in range(0, len(names), BATCH):
        ledger.transfer_many([TransferRequest(f"fund-{name}", "bank", name, FUNDING)
                              for name in names[first : first + BATCH]])
    result["touch_each_s"] = round(time.perf_counter() - started, 1)
    print(f"funded each once in {result['touch_each_s']} s", file=sys.stderr)

    pauses.clear()
    work = workload(accounts, load_transfers, "uniform", seed)
    result["load"] = run_clients(CLIENTS, work, transfer_call(ledger, names, "load"))
    result["load"]["checkpoints"] = len(pauses)
    result["load"]["checkpoint_pause_max_ms"] = round(max(pauses, default=0) * 1e3, 1)
    print(f"load: {result['load']}", file=sys.stderr)
    balance = ledger.balance(names[-1])
    result["balance"] = [balance.posted, balance.pending]
    result["peak_rss_mib"] = round(peak_rss_bytes() / 2**20)
    result["data_file_mib"] = round(os.path.getsize(os.path.join(path, "data.mdb")) / 2**20)
    with open(path + ".json", "w") as out:
        json.dump(result, out)
    os.kill(os.getpid(), signal.SIGKILL)  # every transfer acknowledged is durable: a crash loses none
    raise AssertionError("not killed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1_000_000)
    parser.add_argument("--load-transfers", type=int, default=100_000)
    parser.add_argument("--after-transfers", type=int, default=40_000,
                        help="transfers from 64 threads after reopening (0: none)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.accounts < 2 or args.load_transfers < 0 or args.after_transfers < 0:
        parser.error("--accounts must be at least 2, and the transfer counts at least 0")
    with tempfile.TemporaryDirectory(prefix="tally-bench-", dir=os.environ.get("TALLY_BENCH_DIR")) as scratch:
        path = os.path.join(scratch, "ledger")
        # This process holds nothing; a builder that dies (the OOM killer) raises BrokenProcessPool.
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as builder:
            try:
                builder.submit(build, path, args.accounts, args.load_transfers, args.seed).result(3600)
            except BrokenProcessPool:  # the builder's end, as planned, if it wrote its figures
                if not os.path.exists(path + ".json"):
                    raise
        with open(path + ".json") as built:
            result = json.load(built)
        last = f"acct-{args.accounts - 1:07d}"
        balance = result.pop("balance")
        crashed = reopen(path, last)
        reopened = reopen(path, last, args.accounts, args.after_transfers)
        for after in (crashed, reopened):
            if after["balance"] != balance:
                raise SystemExit(f"the reopened ledger's balance {after['balance']} is not {balance}")
        result["reopen_after_crash_s"], result["close_after_crash_s"] = crashed["open_s"], crashed["close_s"]
        result["reopen_s"], result["reopen_peak_rss_mib"] = reopened["open_s"], reopened["peak_rss_mib"]
        result["after_reopen"] = reopened["after"]
    print(f"\n{args.accounts:,} accounts")
    print(f"create_accounts                 {result['create_s']:>8} s")
    print(f"fund each once (transfer_many)  {result['touch_each_s']:>8} s")
    lo = result["load"]
    print(f"load, {CLIENTS} clients              {lo['transfers_per_s']:>8,.0f}/s  p50 {lo['p50_ms']} ms  p99 {lo['p99_ms']} ms"
          f"  max {lo['max_ms']} ms")
    print(f"  checkpoints during load       {lo['checkpoints']:>8}  longest pause {lo['checkpoint_pause_max_ms']} ms")
    print(f"reopen after the crash          {result['reopen_after_crash_s']:>8} s   then close "
          f"{result['close_after_crash_s']} s")
    print(f"reopen after that close         {result['reopen_s']:>8} s   peak memory {result['reopen_peak_rss_mib']} MiB")
    after = result["after_reopen"]
    if after is not None:
        print(f"load after reopening            {after['transfers_per_s']:>8,.0f}/s  p50 {after['p50_ms']} ms  "
              f"p99 {after['p99_ms']} ms  max {after['max_ms']} ms")
        print(f"  checkpoints                   {after['checkpoints']:>8}  pauses "
              f"{', '.join(f'{pause:g}' for pause in after['checkpoint_pauses_ms'])} ms")
    print(f"peak resident memory (1.-3.)    {result['peak_rss_mib']:>8} MiB")
    print(f"data file                       {result['data_file_mib']:>8} MiB")
    print(json.dumps(result))
    write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
