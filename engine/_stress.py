"""`tally stress`: fire concurrent transfers at a ledger, then prove the books.

Clients are threads; each runs its own seeded workload (`engine._workload`) and
records every reply. A reporter prints progress. At the end the auditor
(`engine._auditor`) checks every reply against the ledger and the invariants, and
that each entry made since the run began is of a transfer id the run sent, then the
ledger is closed, reopened, and its state hash compared.

`engine._stress_remote` runs the same workload and audit at a `tally serve` over HTTP.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator import (
    AMOUNT_MAX,
    REJECTIONS,
    Account,
    IdempotencyConflict,
    InvalidRequest,
    LedgerError,
    LinkedTransferFailed,
    Transfer,
    TransferRequest,
)

from engine._auditor import Replies, audit_replies, open_pending
from engine._ledger import Ledger
from engine._workload import PENDING_EXPIRY_S, PENDING_TIMEOUT_S, ClientWorkload, Op, Picker

FUNDING_PER_ACCOUNT_AMOUNTS = 5
"""Each account starts with this many times --amount-max."""
PROGRESS_TTY_S = 0.25
PROGRESS_PLAIN_S = 5.0
SAMPLES_MAX = 200_000
CLIENT_STOP_WAIT_S = 90.0
"""How long a stopped run waits, at most, for each client to finish the op it is in (above a
ledger call's bound, 30 s by default, and a remote call's, 60 s)."""
EXPIRY_WAIT_S = 10.0
"""How long the audit waits, at most, for the pending transfers let expire to be expired."""

Outcome = Any
"""What a client was told for one op: a Transfer or LedgerError (a single transfer); the pair
(reply to the pending transfer, reply to its post or void or None); the chain's Transfers or
its LedgerError."""


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
    outcomes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    samples: list[tuple[float, float]] = field(default_factory=list)
    """(seconds since start, latency ms) per reply, for the plots."""
    checks: dict[str, bool] = field(default_factory=dict)
    state_hash: str = ""
    retries: tuple[int, int] = (0, 0)
    """Retries sent, and of them those that changed the amount (refused idempotency_conflict)."""
    remote: dict[str, Any] | None = None
    """A remote run's server, the prefix of its ids, and the replies outside the contract."""

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(self.checks.values())

    def percentile_ms(self, q: float) -> float:
        return percentile(sorted(self.latencies_ms), q)

    def summary(self) -> dict[str, Any]:
        rate = self.sent / self.elapsed_s if self.elapsed_s else 0.0
        return {
            "config": vars(self.config),
            "transfers_sent": self.sent,
            "elapsed_s": round(self.elapsed_s, 3),
            "transfers_per_s": round(rate, 1),
            "latency_ms": {name: round(self.percentile_ms(q), 3) for name, q in
                           (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
            "outcomes": self.outcomes,
            "retries": {"sent": self.retries[0], "differing": self.retries[1]},
            "checks": self.checks,
            "state_hash": self.state_hash,
            **({"remote": self.remote} if self.remote is not None else {}),
            "verdict": "ok" if self.ok else "FAILED",
        }


class _Tally:
    """Counters shared by the clients and the progress reporter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.done = 0
        self.refused = 0
        self.recent: list[float] = []

    def add(self, count: int, refused: int, latency_ms: float) -> None:
        with self.lock:
            self.done += count
            self.refused += refused
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
        funded = _open_accounts(ledger, names, config)
        replies = _fire(ledger, picker, config, report, progress, f"s{config.seed}-{os.getpid()}-{int(time.time())}")
        replies.sent.update(funded)
        _await_expiries(ledger, replies)
        report.state_hash = ledger.state_hash()
        report.checks = audit_replies(ledger, replies, prior=prior, sent=replies.sent, since_lsn=since_lsn)
    with open_ledger(config.path) as reopened:
        report.checks["close and reopen give the same state hash"] = reopened.state_hash() == report.state_hash
    return report


def _open_accounts(ledger: Any, names: list[str], config: StressConfig, bank: str = "stress-bank") -> list[str]:
    """Open the bank and `names`, and fund each from the bank; the funding transfers' ids.
    Raises the first refusal."""
    accounts = [Account(bank, "USD", None)] + [Account(name, "USD", 0) for name in names]
    for first in range(0, len(accounts), 1000):
        for outcome in ledger.create_accounts(accounts[first : first + 1000]):
            if isinstance(outcome, LedgerError):
                raise outcome
    # Each account starts with a few of the largest amounts, but all of them together never more
    # than a balance can hold: money only moves between them, so none can overflow.
    each = min(config.amount_max * FUNDING_PER_ACCOUNT_AMOUNTS, AMOUNT_MAX // len(names))
    # The amount in the id: a later run on this ledger with other sizes funds its accounts again
    # instead of meeting its first funding as a retry that differs (idempotency_conflict).
    funding = [TransferRequest(f"fund-{name}-{each}", bank, name, each) for name in names]
    for first in range(0, len(funding), 1000):
        for outcome in ledger.transfer_many(funding[first : first + 1000]):
            if isinstance(outcome, LedgerError):
                raise outcome
    return [request.id for request in funding]


def _fire(ledger: Any, picker: Picker, config: StressConfig, report: StressReport, progress: bool,
          tag: str) -> Replies:
    """Run the clients; what each was told. `tag` starts every transfer id."""
    quota = threading.Semaphore(config.transfers) if config.transfers is not None else None
    stop = threading.Event()
    tally = _Tally()
    per_client: list[tuple[Replies, dict[str, int], list[float], list[tuple[float, float]]]] = []
    barrier = threading.Barrier(config.clients + 1)
    started = [0.0]

    def take(count: int) -> int:
        if stop.is_set():
            return 0
        if quota is None:
            return count
        taken = 0
        while taken < count and quota.acquire(blocking=False):
            taken += 1
        return taken

    def client(number: int) -> None:
        workload = ClientWorkload(picker, tag=tag, client=number, seed=config.seed, amount_max=config.amount_max,
                                  retry_rate=config.retry_rate, pending_rate=config.pending_rate,
                                  linked_rate=config.linked_rate)
        state: tuple[Replies, dict[str, int], list[float], list[tuple[float, float]]] = (Replies(), {}, [], [])
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
            state[0].sent.update(tid for op in ops for tid in _ids_of(op))
            began = time.perf_counter()
            outcomes = _send(ledger, ops)
            latency_ms = (time.perf_counter() - began) * 1000
            refused = _record(state, ops, outcomes, latency_ms, began - started[0])
            tally.add(count, refused, latency_ms)

    threads = [threading.Thread(target=client, args=(n,), name=f"stress-client-{n}") for n in range(config.clients)]
    reporter = threading.Thread(target=_report_progress, args=(tally, stop, config, progress), daemon=True)
    try:
        for thread in threads:
            thread.start()
        barrier.wait(timeout=60)
        started[0] = time.perf_counter()
        reporter.start()
        if config.duration_s is not None:
            stop.wait(config.duration_s)
            stop.set()
        for thread in threads:
            thread.join()
    finally:
        # Also on an interrupt (Ctrl-C; SIGTERM, which `tally stress` raises as one) landing in
        # this thread: the clients stop after the op they are in, before the ledger is closed.
        stop.set()
        barrier.abort()
        for thread in threads:
            if thread.ident is not None:
                thread.join(timeout=CLIENT_STOP_WAIT_S)
    report.elapsed_s = time.perf_counter() - started[0]
    if reporter.ident is not None:
        reporter.join(timeout=5)
    return _merge(per_client, report)


def _send(ledger: Any, ops: list[Op]) -> list[Outcome]:
    """Send `ops`: single transfers together (`transfer_many`, or `transfer` for one alone),
    pending transfers and chains each on its own; the outcome of each, in order."""
    singles = [op for op in ops if op.kind == "single"]
    if len(singles) == 1 and len(ops) == 1:
        op = ops[0]
        try:
            return [ledger.transfer(op.transfer_id, source=op.source, destination=op.destination, amount=op.amount)]
        except LedgerError as error:
            return [error]
    batched = iter(ledger.transfer_many([TransferRequest(o.transfer_id, o.source, o.destination, o.amount)
                                         for o in singles]) if singles else ())
    return [next(batched) if op.kind == "single" else _send_pending(ledger, op) if op.kind == "pending"
            else _send_chain(ledger, op) for op in ops]


def _ids_of(op: Op) -> list[str]:
    """The transfer ids sending `op` may write: its own, its post's or void's, its chain's legs."""
    if op.kind == "linked":
        return [leg[0] for leg in op.legs]
    if op.kind == "pending" and op.resolution in ("post", "post-part", "void"):
        return [op.transfer_id, _resolution_id(op)]
    return [op.transfer_id]


def _resolution_id(op: Op) -> str:
    """The id of a pending op's post or void."""
    return f"{op.transfer_id}-{'void' if op.resolution == 'void' else 'post'}"


def _send_pending(ledger: Any, op: Op) -> tuple[Transfer | LedgerError, Transfer | LedgerError | None]:
    """A pending transfer, then what its resolution says: post it (all or part), void it, or nothing."""
    try:
        made = ledger.transfer(op.transfer_id, source=op.source, destination=op.destination, amount=op.amount,
                               pending=True, timeout_s=_timeout_of(op))
    except LedgerError as error:
        return error, None
    try:
        if op.resolution in ("post", "post-part"):
            part = None if op.resolution == "post" else max(1, op.amount // 2)
            return made, ledger.post_pending(_resolution_id(op), pending_id=op.transfer_id, amount=part)
        if op.resolution == "void":
            return made, ledger.void_pending(_resolution_id(op), pending_id=op.transfer_id)
    except LedgerError as error:
        return made, error
    return made, None


def _send_chain(ledger: Any, op: Op) -> list[Transfer] | LedgerError:
    try:
        return list(ledger.transfer_linked([TransferRequest(*leg) for leg in op.legs]))
    except LedgerError as error:
        return error


def _record(state: tuple[Replies, dict[str, int], list[float], list[tuple[float, float]]], ops: list[Op],
            outcomes: list[Outcome], latency_ms: float, at_s: float) -> int:
    replies, counts, latencies, samples = state
    refused = 0
    for op, outcome in zip(ops, outcomes, strict=True):
        first = outcome[0] if op.kind == "pending" else outcome
        code = first.code if isinstance(first, LedgerError) else "committed"
        counts[code] = counts.get(code, 0) + 1
        refused += code != "committed"
        latencies.append(latency_ms)
        if len(samples) < SAMPLES_MAX:
            samples.append((at_s, latency_ms))
        if op.kind == "pending":
            _record_pending(replies, op, *outcome)
        elif op.kind == "linked":
            legs = tuple(TransferRequest(*leg) for leg in op.legs)
            if isinstance(outcome, LinkedTransferFailed):
                replies.chains.append((legs, outcome.cause.code))
            elif not isinstance(outcome, LedgerError):
                replies.chains.append((legs, None))
                replies.acknowledged.update((made.id, made) for made in outcome)
        elif op.retry:
            replies.retries += 1
            if op.differs:
                replies.retries_differing += 1
                replies.differed.add(op.transfer_id)
            _record_retry(replies, op, outcome)
        else:
            _record_single(replies, op, outcome)
    return refused


def _record_single(replies: Replies, op: Op, outcome: Transfer | LedgerError) -> None:
    if isinstance(outcome, Transfer):
        replies.acknowledged[op.transfer_id] = outcome
    elif outcome.code in REJECTIONS:  # journaled refusals: the id stays refused
        replies.refused[op.transfer_id] = (op.source, op.destination, op.amount, outcome.code)


def _record_retry(replies: Replies, op: Op, outcome: Transfer | LedgerError) -> None:
    """A retry's reply, compared with the first outcome told for its id: the same, or
    `IdempotencyConflict` if the retry's fields differ from those of the request that outcome
    was for (an `Op.differs` retry's, or the original's after a differing retry was the first
    to land). A reply that tells none (a timeout, a ledger unavailable or closed, a server
    overloaded or not answering) is no mismatch; one after replies that told none is the
    first outcome told, and must be of this retry's fields."""
    if not isinstance(outcome, Transfer) and outcome.code not in REJECTIONS and not isinstance(
            outcome, (IdempotencyConflict, InvalidRequest)):
        return
    fields = (op.source, op.destination, op.amount)
    before = replies.acknowledged.get(op.transfer_id) or replies.refused.get(op.transfer_id)
    if before is None and (isinstance(outcome, Transfer) or outcome.code in REJECTIONS):
        if isinstance(outcome, Transfer) and (outcome.source, outcome.destination, outcome.amount) != fields:
            replies.retry_mismatches.append(op.transfer_id)  # the answer is another request's
        _record_single(replies, op, outcome)
        return
    if before is None:  # a conflict, no outcome told yet: right if a request with other fields may have landed
        if isinstance(outcome, IdempotencyConflict) and not op.differs and op.transfer_id not in replies.differed:
            replies.retry_mismatches.append(op.transfer_id)
        return
    told_for = (before.source, before.destination, before.amount) if isinstance(before, Transfer) else before[:3]
    if fields != told_for:
        same = isinstance(outcome, IdempotencyConflict)
    elif isinstance(outcome, Transfer):
        same = before == outcome
    else:
        same = isinstance(before, tuple) and before[3] == outcome.code
    if not same:
        replies.retry_mismatches.append(op.transfer_id)


def _record_pending(replies: Replies, op: Op, made: Transfer | LedgerError,
                    resolved: Transfer | LedgerError | None) -> None:
    if isinstance(made, LedgerError):
        if made.code in REJECTIONS:
            request = TransferRequest(op.transfer_id, op.source, op.destination, op.amount, pending=True,
                                      timeout_s=_timeout_of(op))
            replies.refused_requests[op.transfer_id] = (request, made.code)
        return
    replies.acknowledged[made.id] = made
    replies.pendings[made.id] = (op.resolution, resolved.code if isinstance(resolved, LedgerError) else resolved)
    if isinstance(resolved, Transfer):
        replies.acknowledged[resolved.id] = resolved


def _timeout_of(op: Op) -> int | None:
    """The timeout a pending op was sent with."""
    return PENDING_EXPIRY_S if op.resolution == "expire" else None if op.resolution == "open" else PENDING_TIMEOUT_S


def _await_expiries(ledger: Any, replies: Replies) -> None:
    """Wait (at most `EXPIRY_WAIT_S`) until the pending transfers let expire have expired:
    then what the audit reads holds still. Those that do not expire in time fail the audit."""
    waiting = [tid for tid, (plan, _) in replies.pendings.items() if plan == "expire"]
    deadline = time.monotonic() + EXPIRY_WAIT_S
    while waiting and time.monotonic() < deadline:
        waiting = [tid for tid in waiting if ledger.get_transfer(tid).status == "pending"]
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
        for code, count in counts.items():
            report.outcomes[code] = report.outcomes.get(code, 0) + count
        report.latencies_ms.extend(latencies)
        report.samples.extend(samples)
    report.sent = len(report.latencies_ms)
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
                done, refused, recent = tally.done, tally.refused, tally.recent
                tally.recent = []
            elapsed = time.perf_counter() - began
            recent.sort()
            p50, p99 = percentile(recent, 0.5), percentile(recent, 0.99)
            line = (f"stress {elapsed:6.1f} s  {done:>9,} transfers  {done / elapsed if elapsed else 0:>8,.0f}/s"
                    f"  refused {refused:,}  p50 {p50:.1f} ms  p99 {p99:.1f} ms")
            if live is not None:
                live.update(line)
            else:
                print(line, file=sys.stderr, flush=True)
    finally:
        if live is not None:
            live.stop()
