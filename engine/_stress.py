"""A short concurrent workload on a ledger, ending with a verified report.

This is the engine's main job on an embedded default (`tally stress` with no
arguments): open accounts, fire transfers from many threads, then check every
reply against the ledger and the invariants, close, reopen, and compare hashes.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from dataclasses import dataclass, field

from coordinator import LedgerError

from engine._ledger import Ledger


@dataclass
class StressReport:
    transfers: int = 0
    committed: int = 0
    refused: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    checks: dict[str, bool] = field(default_factory=dict)
    state_hash: str = ""

    @property
    def ok(self) -> bool:
        return all(self.checks.values())

    def percentile_ms(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def run_stress(
    path: str | None, *, accounts: int, clients: int, transfers: int, amount_max: int, seed: int
) -> StressReport:
    """Run the workload; blocks until done. Raises LedgerError for an unusable path."""
    if path is None:
        with tempfile.TemporaryDirectory(prefix="tally-stress-") as scratch:
            return run_stress(scratch, accounts=accounts, clients=clients, transfers=transfers,
                              amount_max=amount_max, seed=seed)
    report = StressReport()
    names = [f"acct-{n:06d}" for n in range(accounts)]
    acknowledged: dict[str, tuple[str, str, int]] = {}
    lock = threading.Lock()
    with Ledger.open(path) as ledger:
        ledger.create_account("stress-bank", currency="USD", overdraft_limit=None)
        for name in names:
            ledger.create_account(name, currency="USD")
        from coordinator import TransferRequest

        funding = [TransferRequest(f"fund-{seed}-{name}", "stress-bank", name, amount_max * 20) for name in names]
        for outcome in ledger.transfer_many(funding):
            assert not isinstance(outcome, LedgerError), outcome
        per_client = [transfers // clients + (1 if n < transfers % clients else 0) for n in range(clients)]
        barrier = threading.Barrier(clients + 1)

        def client(number: int) -> None:
            rng = random.Random(seed * 1_000_003 + number)
            latencies, refused, done = [], {}, {}
            barrier.wait(timeout=60)
            for k in range(per_client[number]):
                source, destination = rng.sample(names, 2)
                amount = rng.randint(1, amount_max)
                tid = f"s{seed}-c{number}-{k}"
                started = time.perf_counter()
                try:
                    ledger.transfer(tid, source=source, destination=destination, amount=amount)
                    done[tid] = (source, destination, amount)
                except LedgerError as error:
                    refused[error.code] = refused.get(error.code, 0) + 1
                latencies.append((time.perf_counter() - started) * 1000)
            with lock:
                acknowledged.update(done)
                report.latencies_ms.extend(latencies)
                for code, count in refused.items():
                    report.refused[code] = report.refused.get(code, 0) + count

        threads = [threading.Thread(target=client, args=(n,), name=f"stress-client-{n}") for n in range(clients)]
        for thread in threads:
            thread.start()
        barrier.wait(timeout=60)
        started = time.perf_counter()
        for thread in threads:
            thread.join()
        report.elapsed_s = time.perf_counter() - started
        report.transfers = sum(per_client)
        report.committed = len(acknowledged)
        report.checks = audit(ledger, acknowledged)
        report.state_hash = ledger.state_hash()
    with Ledger.open(path) as reopened:
        report.checks["reopen gives the same state hash"] = reopened.state_hash() == report.state_hash
    return report


def audit(ledger: Ledger, acknowledged: dict[str, tuple[str, str, int]]) -> dict[str, bool]:
    """Check every acknowledged transfer and the ledger's invariants."""
    present = all(
        (t := ledger.get_transfer(tid)) is not None and (t.source, t.destination, t.amount) == fields
        for tid, fields in acknowledged.items()
    )
    total, gapless, above_limit, no_pending = 0, True, True, True
    for account in ledger.accounts():
        entries = ledger.entries(account.id)
        running = 0
        for seq, entry in enumerate(entries, start=1):
            running += entry.amount
            gapless &= entry.seq == seq and entry.balance == running
            if account.overdraft_limit is not None:
                above_limit &= entry.balance >= -account.overdraft_limit
        balance = ledger.balance(account.id)
        no_pending &= balance.pending == 0 and balance.posted == running
        total += balance.posted
    return {
        "every acknowledged transfer is present with its fields": present,
        "money is conserved (posted balances sum to 0)": total == 0,
        "no balance below its overdraft limit": above_limit,
        "seq is gapless and balances are running sums": gapless,
        "nothing is left pending": no_pending,
    }


def main(args: object) -> int:
    """`tally stress`: run, print the report (or JSON), exit 0 only if every check passed."""
    import json

    report = run_stress(getattr(args, "path"), accounts=getattr(args, "accounts"), clients=getattr(args, "clients"),
                        transfers=getattr(args, "transfers"), amount_max=getattr(args, "amount_max"),
                        seed=getattr(args, "seed"))
    rate = report.transfers / report.elapsed_s if report.elapsed_s else 0.0
    latency = {q: round(report.percentile_ms(v), 3) for q, v in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))}
    summary = {
        "transfers": report.transfers, "committed": report.committed, "refused": report.refused,
        "elapsed_s": round(report.elapsed_s, 3), "transfers_per_s": round(rate, 1), "latency_ms": latency,
        "checks": report.checks, "state_hash": report.state_hash, "verdict": "ok" if report.ok else "FAILED",
    }
    if getattr(args, "json"):
        print(json.dumps(summary, indent=2))
        return 0 if report.ok else 1
    print(f"tally stress: {getattr(args, 'clients')} clients, {getattr(args, 'accounts')} accounts, seed {getattr(args, 'seed')}")
    print(f"  {report.transfers} transfers in {report.elapsed_s:.2f} s = {rate:,.0f} durable transfers/s")
    print(f"  committed {report.committed}, refused {sum(report.refused.values())} {report.refused or ''}")
    print(f"  latency ms: p50 {latency['p50']}  p90 {latency['p90']}  p99 {latency['p99']}  max {latency['max']}")
    for check, passed in report.checks.items():
        print(f"  {'✓' if passed else '✗'} {check}")
    print(f"  state hash {report.state_hash}")
    print(f"  verdict: {summary['verdict']}")
    return 0 if report.ok else 1
