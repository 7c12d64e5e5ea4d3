"""`tally stress`: fire concurrent transfers at a ledger, then prove the books.

Clients are threads; each runs its own seeded workload (`engine._workload`) and
records every reply. A reporter prints progress. A ledger whose journal fails (a full disk)
stops the clients: it takes no write until it is reopened. At the end the auditor
(`engine._auditor`) checks every reply against the ledger and the invariants, and
that each entry made since the run began is of a transfer id the run sent, then the
ledger is closed, reopened, and its state hash compared.

`engine._stress_remote` runs the same workload and audit at a `tally serve` over HTTP.
"""

from __future__ import annotations

import math
import secrets
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator import AMOUNT_MAX, Account, AccountNotFound, IdempotencyConflict, LedgerError, Transfer, TransferRequest

from engine._auditor import Replies, audit_replies, open_pending
from engine._checks import account_exists
from engine._ledger import Ledger
from engine._sending import (
    TELLING,
    UNANSWERED,
    ClientState,
    Recorded,
    cannot_write,
    ids_of,
    learn_outcomes,
    record,
    send,
)
from engine._workload import ClientWorkload, Picker

FUNDING_PER_ACCOUNT_AMOUNTS = 5
"""Each account starts with this many times --amount-max."""
PROGRESS_TTY_S = 0.25
PROGRESS_PLAIN_S = 5.0
CLIENT_STOP_WAIT_S = 90.0
"""How long a stopped run waits, at most, for each client to finish the op it is in (above a
ledger call's bound, 30 s by default, and a remote call's, 60 s)."""
EXPIRY_WAIT_S = 10.0
"""How long the audit waits, at most, for the pending transfers let expire to be expired."""

def percentile(ordered: list[float], q: float) -> float:
    """The nearest-rank q-quantile of an already sorted list (0.0 if empty)."""
    return ordered[max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))] if ordered else 0.0


@dataclass
class StressConfig:
    path: str | None = None
    accounts: int = 1000
    clients: int = 16
    transfers: int | None = 20_000
    duration_s: float | None = None
    mix: str = "uniform"
    amount_max: int = 500
    batch: int = 1
    retry_rate: float = 0.0
    pending_rate: float = 0.0
    """Share of the new transfers that are pending ones (each then posted in full or in
    part, voided, let expire, or left open)."""
    linked_rate: float = 0.0
    """Share of the new transfers that are linked chains of 2 or 3 legs."""
    seed: int = 1
    url: str | None = None
    """A `tally serve` to drive over HTTP instead of a ledger at `path`."""


@dataclass
class StressReport:
    config: StressConfig
    elapsed_s: float = 0.0
    sent: int = 0
    unanswered: int = 0
    """Of `sent`, those no server answered (`--url`): in neither the rate nor the latencies."""
    outcomes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since start, latency ms) per reply, for the plots."""
    checks: dict[str, bool | None] = field(default_factory=dict)
    """Each check by name: True passed, False failed, None not run."""
    state_hash: str = ""
    retries: tuple[int, int] = (0, 0)
    """Retries sent, and of them those that changed the amount (refused idempotency_conflict)."""
    resent: tuple[int, int] = (0, 0)
    """Ops sent again because no reply told their outcome, and of them those it stayed unknown for."""
    remote: dict[str, Any] | None = None
    """A remote run's server, the prefix of its ids, and the replies outside the contract."""
    stopped: str | None = None
    """What stopped short (the clients, or the sending again), when, and why (its ledger took no
    more writes); None if nothing did."""

    @property
    def acknowledged(self) -> int:
        """Of `sent`, those whose reply told their outcome (committed, or refused for good): the
        rate counts these alone."""
        return sum(count for code, count in self.outcomes.items() if code in TELLING)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def percentile_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)

    def summary(self) -> dict[str, Any]:
        rate = self.acknowledged / self.elapsed_s if self.elapsed_s else 0.0
        return {
            "config": vars(self.config),
            "transfers_sent": self.sent,
            "transfers_unanswered": self.unanswered,
            "transfers_acknowledged": self.acknowledged,
            "elapsed_s": round(self.elapsed_s, 3),
            "transfers_per_s": round(rate, 1),
            "latency_ms": {name: round(self.percentile_ms(q), 3) for name, q in
                           (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
            "outcomes": self.outcomes,
            "retries": {"sent": self.retries[0], "differing": self.retries[1]},
            "resent": {"sent": self.resent[0], "still_unknown": self.resent[1]},
            "checks": self.checks,
            "state_hash": self.state_hash,
            **({"remote": self.remote} if self.remote is not None else {}),
            "stopped": self.stopped,
            "verdict": "ok" if self.ok else "FAILED",
        }


class _Tally:
    """Counters shared by the clients and the progress reporter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.told = 0
        self.refused = 0
        self.untold = 0
        self.unanswered = 0
        self.recent: list[float] = []

    def add(self, recorded: Recorded, latency_ms: float) -> None:
        """Count one call's replies (`record`'s count of them) and its latency, if a server answered."""
        with self.lock:
            self.told += recorded.told
            self.refused += recorded.refused
            self.untold += recorded.untold
            self.unanswered += recorded.unanswered
            if recorded.told or recorded.untold:  # (none answered: the wait for no one, not a latency)
                self.recent.append(latency_ms)


def run_stress(
    config: StressConfig, progress: bool = True, open_ledger: Callable[[str], Any] = Ledger.open
) -> StressReport:
    """Run the workload and the audit; blocks until both are done.

    `open_ledger` opens the ledger under test (a test passes one that injects faults).
    """
    if config.path is None:
        with tempfile.TemporaryDirectory(prefix="tally-stress-") as scratch:
            config.path = scratch
            try:
                return run_stress(config, progress, open_ledger)
            finally:
                config.path = None
    report = StressReport(config)
    names = [f"acct-{n:06d}" for n in range(config.accounts)]
    picker = Picker(names, config.mix)
    with open_ledger(config.path) as ledger:
        prior = open_pending(ledger)  # a ledger used before: what its runs left pending holds funds too
        since_lsn = ledger.head().lsn  # and its entries until here are of those runs
        funded = open_accounts(ledger, names, config)
        replies = fire(ledger, picker, config, report, progress, f"s{config.seed}-{secrets.token_hex(6)}")  # (a run's own)
        replies.sent.update(funded)
        stopped = learn_outcomes(ledger, replies)
        report.resent = (replies.resent, len(replies.unknown))
        if stopped is not None and report.stopped is None:  # (it failed once the clients were done)
            report.stopped = f"sending again stopped: {stopped}"
        await_expiries(ledger, replies)
        report.state_hash = ledger.state_hash()
        report.checks = audit_replies(ledger, replies, prior=prior, sent=replies.sent, since_lsn=since_lsn,
                                      funded=funded)
    with open_ledger(config.path) as reopened:
        report.checks["close and reopen give the same state hash"] = reopened.state_hash() == report.state_hash
    return report


def open_accounts(ledger: Any, names: list[str], config: StressConfig, bank: str = "stress-bank",
                  checked: bool = True) -> list[str]:
    """Open the bank and `names`, and fund each from the bank; the funding transfers' ids.
    Raises the first refusal. `checked` (a ledger that may hold other books: `--path`): an
    account the ledger holds with other fields (`AccountExists`), or a funding's id used for
    another transfer (`IdempotencyConflict`), is refused before anything is written (it was
    found once the accounts before it in the list were made); those of an earlier run with
    the same accounts are taken as they are."""
    accounts = [Account(bank, "USD", None)] + [Account(name, "USD", 0) for name in names]
    # Each account starts with a few of the largest amounts, but all of them together never more
    # than a balance can hold: money only moves between them, so none can overflow.
    each = min(config.amount_max * FUNDING_PER_ACCOUNT_AMOUNTS, AMOUNT_MAX // len(names))
    # The amount in the id: a later run on this ledger with other sizes funds its accounts again
    # instead of meeting its first funding as a retry that differs (idempotency_conflict).
    funding = [TransferRequest(f"fund-{name}-{each}", bank, name, each) for name in names]
    if checked and ledger.head().lsn:  # (a new ledger holds nothing to clash with)
        _refuse_clashes(ledger, accounts, funding)
    for first in range(0, len(accounts), 1000):
        for outcome in ledger.create_accounts(accounts[first : first + 1000]):
            if isinstance(outcome, LedgerError):
                raise outcome
    for first in range(0, len(funding), 1000):
        for outcome in ledger.transfer_many(funding[first : first + 1000]):
            if isinstance(outcome, LedgerError):
                raise outcome
    return [request.id for request in funding]


def _refuse_clashes(ledger: Any, accounts: list[Account], funding: list[TransferRequest]) -> None:
    """Raise what opening `accounts` and making `funding` would meet in `ledger` that a run
    cannot use (see `open_accounts`), before anything is written. Reads only."""
    for account in accounts:
        try:
            found = ledger.account(account.id)
        except AccountNotFound:
            continue
        if found != account:
            raise account_exists(found)
    for request in funding:
        made = ledger.outcome(request.id)
        if made is None or isinstance(made, Transfer) and (
                made.kind, made.source, made.destination, made.amount, made.code, made.reference, made.metadata) == (
                "single", request.source, request.destination, request.amount, 0, None, None):
            continue  # new, or an earlier run's funding of it, which a retry returns
        raise IdempotencyConflict(f"transfer id {request.id!r}, with which the run funds {request.destination!r}, was "
                                  f"already used for another transfer ({made})")


DURATION_LOOK_S = 0.05
"""How often a `--duration` run's main thread looks whether its clients stopped on their own (a
ledger that can no longer write): it sleeps, as it must hold no lock (`fire`)."""


def fire(ledger: Any, picker: Picker, config: StressConfig, report: StressReport, progress: bool,
         tag: str, watch: Callable[[Recorded], str | None] | None = None) -> Replies:
    """Run the clients; what each was told. `tag` starts every transfer id. After each call a
    client asks `watch` (by default: whether the ledger can still write, `cannot_write`)
    whether to go on; once it says why not, every client stops after the op it is in, and
    `report.stopped` says why, and when.

    An interrupt (Ctrl-C; SIGTERM, which `tally stress` raises as one) may land in this thread
    between any two bytecodes, also inside threading's own code: right after `Condition.__enter__`
    took its lock (the lock then stays taken), or before `Condition.wait` takes its lock back.
    So nothing that stops the run needs a lock this thread may have taken before: the clients
    read `stopped`, a plain flag; this thread waits out a duration in `time.sleep`, not on an
    event the clients or the reporter share, and is no party of the clients' barrier (whose
    action starts the clock). A thread whose start an interrupt cut short (it never ran its
    target, and never will: it waits for the lock left taken) is not waited for: `running` and
    `reporting` say which did."""
    if watch is None:
        watch = lambda _recorded: cannot_write(ledger)  # noqa: E731 - (a local ledger's journal failed)
    quota = threading.Semaphore(config.transfers) if config.transfers is not None else None
    stopped = [False]  # set (with no lock) once the run stops: the clients take nothing more
    stop = threading.Event()  # the reporter's wake-up, set after `stopped`
    tally = _Tally()
    per_client: list[ClientState] = []
    running = [False] * config.clients  # set by each client as its thread runs it, before it looks at `stopped`
    started = [0.0]
    barrier = threading.Barrier(config.clients, action=lambda: started.__setitem__(0, time.perf_counter()))

    def take(count: int) -> int:
        if stopped[0]:
            return 0
        if quota is None:
            return count
        taken = 0
        while taken < count and quota.acquire(blocking=False):
            taken += 1
        return taken

    def client(number: int) -> None:
        running[number] = True  # before the look at `stopped`: this thread's `finally` waits for us or we see it
        if stopped[0]:
            return
        workload = ClientWorkload(picker, tag=tag, client=number, seed=config.seed, amount_max=config.amount_max,
                                  retry_rate=config.retry_rate, pending_rate=config.pending_rate,
                                  linked_rate=config.linked_rate)
        state: ClientState = (Replies(), {}, [], [])
        per_client.append(state)
        try:
            barrier.wait(timeout=60)
        except threading.BrokenBarrierError:  # the run stopped before it started
            return
        while True:
            count = take(config.batch)
            if not count:
                return
            ops = [workload.next() for _ in range(count)]
            state[0].sent.update(tid for op in ops for tid in ids_of(op))
            began = time.perf_counter()
            outcomes = send(ledger, ops)
            latency_ms = (time.perf_counter() - began) * 1000
            recorded = record(state, ops, outcomes, latency_ms, began - started[0])
            tally.add(recorded, latency_ms)
            why = watch(recorded)
            if why is not None:
                with tally.lock:
                    if report.stopped is None:
                        report.stopped = f"the clients stopped at {time.perf_counter() - started[0]:.1f} s: {why}"
                stopped[0] = True
                stop.set()

    # Daemons: a client whose start an interrupt cut short waits forever, before it sends anything,
    # for the lock that interrupt left taken; it must not keep the process from exiting.
    threads = [threading.Thread(target=client, args=(n,), name=f"stress-client-{n}", daemon=True)
               for n in range(config.clients)]
    reporting = [False]

    def report_progress() -> None:
        reporting[0] = True
        _report_progress(tally, stop, config, progress)

    reporter = threading.Thread(target=report_progress, daemon=True)
    began = time.perf_counter()
    try:
        for thread in threads:
            thread.start()
        reporter.start()
        if config.duration_s is not None:
            # From the barrier's action on, as the clients fire: stopped before it, a client not yet
            # at it would return, and the others wait for it there until the barrier times out.
            while not stopped[0] and not barrier.broken:  # (`broken` reads a field: no lock)
                left = (started[0] + config.duration_s - time.perf_counter()) if started[0] else DURATION_LOOK_S
                if left <= 0:
                    break
                time.sleep(min(left, DURATION_LOOK_S))  # (no lock: see the docstring)
            stopped[0] = True
        for thread in threads:
            thread.join()
    finally:
        # Also on an interrupt landing in this thread: the clients stop after the op they are in,
        # before the ledger is closed. `stopped` first, and with no lock: the rest may meet one
        # the interrupt left taken (an interrupt that lands in this `finally` too cuts it short).
        stopped[0] = True
        stop.set()
        barrier.abort()
        for number, thread in enumerate(threads):
            if running[number]:
                thread.join(timeout=CLIENT_STOP_WAIT_S)
    report.elapsed_s = time.perf_counter() - (started[0] or began)
    if reporting[0]:
        reporter.join(timeout=5)
    return _merge(per_client, report)


def await_expiries(ledger: Any, replies: Replies) -> None:
    """Wait (at most `EXPIRY_WAIT_S`) until the pending transfers let expire have expired:
    then what the audit reads holds still. Those that do not expire in time fail the audit. A
    ledger that cannot write (`cannot_write`) expires nothing: not waited for."""
    waiting = [tid for tid, (plan, _) in replies.pendings.items() if plan == "expire" and not cannot_write(ledger)]
    deadline = time.monotonic() + EXPIRY_WAIT_S
    while waiting and time.monotonic() < deadline:
        waiting = [tid for tid in waiting if (found := ledger.get_transfer(tid)) is not None and found.status == "pending"]
        if waiting:
            time.sleep(0.05)  # polling a ledger thread's progress: no event to wait on from outside


def _merge(per_client: list[Any], report: StressReport) -> Replies:
    merged = Replies()
    for replies, counts, latencies, samples in per_client:
        merged.acknowledged.update(replies.acknowledged)
        merged.refused.update(replies.refused)
        merged.refused_requests.update(replies.refused_requests)
        merged.pendings.update(replies.pendings)
        merged.chains.extend(replies.chains)
        merged.retry_mismatches.extend(replies.retry_mismatches)
        merged.retries += replies.retries
        merged.retries_differing += replies.retries_differing
        merged.sent.update(replies.sent)
        merged.differed.update(replies.differed)
        merged.unknown.extend(replies.unknown)
        for code, count in counts.items():
            report.outcomes[code] = report.outcomes.get(code, 0) + count
        report.latencies_ms.extend(latencies)
        report.samples.extend(samples)
    report.unanswered = report.outcomes.get(UNANSWERED, 0)
    report.sent = len(report.latencies_ms) + report.unanswered
    report.samples.sort()
    report.retries = (merged.retries, merged.retries_differing)
    return merged


def _report_progress(tally: _Tally, stop: threading.Event, config: StressConfig, enabled: bool) -> None:
    """A live line on a terminal; a plain line every few seconds otherwise."""
    if not enabled:
        return
    tty = sys.stderr.isatty()
    began = time.perf_counter()
    live = None
    if tty:
        from rich.console import Console
        from rich.live import Live

        live = Live("", console=Console(stderr=True), transient=True, refresh_per_second=8)
        live.start()
    try:
        while not stop.wait(PROGRESS_TTY_S if tty else PROGRESS_PLAIN_S):
            with tally.lock:
                told, refused, untold, unanswered, recent = (tally.told, tally.refused, tally.untold, tally.unanswered,
                                                             tally.recent)
                tally.recent = []
            elapsed = time.perf_counter() - began
            recent.sort()
            p50, p99 = percentile(recent, 0.5), percentile(recent, 0.99)
            line = (f"stress {elapsed:6.1f} s  {told:>9,} transfers  {told / elapsed if elapsed else 0:>8,.0f}/s"
                    f"  refused {refused:,}  p50 {p50:.1f} ms  p99 {p99:.1f} ms"
                    + (f"  no outcome {untold:,}" if untold else "") + (f"  no answer {unanswered:,}" if unanswered else ""))
            if live is not None:
                live.update(line)
            else:
                print(line, file=sys.stderr, flush=True)
    finally:
        if live is not None:
            live.stop()
