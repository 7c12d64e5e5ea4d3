"""The stress harness: its auditor catches injected faults, its arguments are checked, and
short runs (plain, batched with retries, chaos) end with a verified report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from engine import (
    Account,
    Balance,
    Entry,
    IdempotencyConflict,
    InvalidRequest,
    Ledger,
    LedgerError,
    LedgerTimeout,
    LinkedTransferFailed,
    Transfer,
    TransferRequest,
)
from engine._auditor import (
    CHECK_CONSERVED,
    CHECK_EXPLAINED,
    CHECK_GAPLESS,
    CHECK_HOLDS,
    CHECK_LIMITS,
    CHECK_LINKED,
    CHECK_OUTCOMES,
    CHECK_PENDING_ENDED,
    CHECK_PRESENT,
    CHECK_REFUSED,
    CHECK_RETRIES,
    Replies,
    audit_replies,
    open_pending,
)
from engine._sending import record
from engine._stress import StressConfig, StressReport, run_stress
from engine._workload import Op

SMALL = dict(accounts=20, clients=4, transfers=400, amount_max=50, seed=3)


def tally(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=timeout)


class Faulty:
    """A ledger double: the real ledger's answers, with one fault injected."""

    def __init__(self, ledger: Ledger, fault: str, victim: str) -> None:
        self._ledger = ledger
        self._fault = fault
        self._victim = victim

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ledger, name)

    def __enter__(self) -> Faulty:
        return self

    def __exit__(self, *exc: object) -> None:
        self._ledger.close()

    def accounts(self) -> list[Account]:
        accounts = self._ledger.accounts()
        if self._fault == "entry one below its limit":  # the limit one tighter than the victim's lowest balance
            return [replace(account, overdraft_limit=account.overdraft_limit - 1)
                    if account.id == self._victim and account.overdraft_limit is not None else account
                    for account in accounts]
        return accounts

    def get_transfer(self, transfer_id: str) -> Transfer | None:
        if self._fault == "lost transfer" and transfer_id == self._victim:
            return None
        if self._fault == "refused id committed" and transfer_id == self._victim:  # yet a retry is still refused
            return replace(self._ledger.transfers(limit=1)[0], id=transfer_id)
        return self._ledger.get_transfer(transfer_id)

    def entries(self, account_id: str, after: int = 0, limit: int | None = None) -> list[Entry]:
        entries = self._ledger.entries(account_id, after, limit)
        if self._fault == "duplicated entry" and entries and entries[-1].transfer_id == self._victim:
            last = entries[-1]
            entries.append(replace(last, seq=last.seq + 1, balance=last.balance + last.amount))
        if self._fault == "pending transfer with entries":  # it moved money, as a single transfer does
            pending = self._ledger.get_transfer(self._victim)
            assert pending is not None and pending.kind == "pending"
            moves = {pending.source: -pending.amount, pending.destination: pending.amount}
            if account_id in moves:
                seq, balance = (entries[-1].seq, entries[-1].balance) if entries else (0, 0)
                entries.append(Entry(account_id, seq + 1, pending.id, moves[account_id], balance + moves[account_id],
                                     pending.lsn, pending.timestamp))
        return entries

    def balance(self, account_id: str) -> Balance:
        balance = self._ledger.balance(account_id)
        if self._fault == "wrong balance" and account_id == self._victim:
            return Balance(balance.posted + 1, balance.pending, balance.available + 1, balance.incoming)
        if self._fault == "lost hold" and account_id == self._victim:
            return Balance(balance.posted, 0, balance.posted, balance.incoming)
        if self._fault == "lost incoming" and account_id == self._victim:
            return Balance(balance.posted, balance.pending, balance.available, 0)
        return balance


@contextmanager
def stressed_ledger(tmp_path: Path) -> Iterator[tuple[Ledger, Replies]]:
    """A ledger after a small clean run, and the replies that run collected: `credit` spent
    exactly to its overdraft limit, and `p` is left pending from `a` to `b`."""
    ledger = Ledger.open(tmp_path / "ledger")
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    ledger.create_account("credit", currency="USD", overdraft_limit=50)
    for name in ("a", "b", "c"):
        ledger.create_account(name, currency="USD")
    replies = Replies()
    for k, (source, destination, amount) in enumerate(
        [("bank", "a", 100), ("a", "b", 30), ("b", "c", 10), ("c", "a", 5), ("bank", "c", 7), ("credit", "b", 50)]
    ):
        replies.acknowledged[f"t{k}"] = ledger.transfer(f"t{k}", source=source, destination=destination, amount=amount)
    replies.acknowledged["p"] = ledger.transfer("p", source="a", destination="b", amount=20, pending=True)
    replies.pendings["p"] = ("open", None)
    try:
        ledger.transfer("refused", source="b", destination="a", amount=10**6)
    except Exception as error:  # noqa: BLE001 - recorded as the harness would
        replies.refused["refused"] = ("b", "a", 10**6, error.code)  # type: ignore[attr-defined]
    try:
        yield ledger, replies
    finally:
        ledger.close()


def test_the_auditor_passes_a_clean_ledger(tmp_path: Path) -> None:
    with stressed_ledger(tmp_path) as (ledger, replies):
        checks = audit_replies(ledger, replies)
    assert checks and all(checks.values()), checks


@pytest.mark.parametrize(
    ("fault", "victim", "failed"),
    [
        ("lost transfer", "t2", CHECK_PRESENT),
        ("duplicated entry", "t4", CHECK_PRESENT),
        ("wrong balance", "b", CHECK_CONSERVED),
        ("entry one below its limit", "credit", CHECK_LIMITS),
        ("lost incoming", "b", CHECK_HOLDS),
        ("pending transfer with entries", "p", CHECK_PRESENT),
        ("refused id committed", "refused", CHECK_REFUSED),
    ],
)
def test_the_auditor_reports_an_injected_fault(tmp_path: Path, fault: str, victim: str, failed: str) -> None:
    with stressed_ledger(tmp_path) as (ledger, replies):
        checks = audit_replies(Faulty(ledger, fault, victim), replies)
    assert checks[failed] is False, checks


def test_the_auditor_reports_a_duplicated_entry_as_a_broken_sequence_too(tmp_path: Path) -> None:
    with stressed_ledger(tmp_path) as (ledger, replies):
        checks = audit_replies(Faulty(ledger, "duplicated entry", "t4"), replies)
    assert checks[CHECK_GAPLESS] is True  # the double keeps seq and balances consistent...
    assert checks[CHECK_PRESENT] is False  # ...but the transfer appears three times


def test_the_auditor_reports_a_refusal_that_no_longer_stands(tmp_path: Path) -> None:
    with stressed_ledger(tmp_path) as (ledger, replies):
        replies.refused["never-refused"] = ("bank", "a", 1, "insufficient_funds")
        checks = audit_replies(ledger, replies)
    assert checks[CHECK_REFUSED] is False


@pytest.mark.parametrize("fault", ["lost transfer", "wrong balance"])
def test_the_harness_fails_its_verdict_when_the_ledger_lies(tmp_path: Path, fault: str) -> None:
    victim = "acct-000001" if fault == "wrong balance" else "s3-"

    def open_faulty(path: str) -> Faulty:
        ledger = Ledger.open(path)
        if fault == "lost transfer":
            return _LoseFirstAcknowledged(ledger)
        return Faulty(ledger, fault, victim)

    report = run_stress(StressConfig(path=str(tmp_path / "ledger"), **SMALL), progress=False, open_ledger=open_faulty)
    assert not report.ok
    assert report.summary()["verdict"] == "FAILED"


def test_the_harness_fails_its_verdict_when_a_retry_that_differs_gets_the_original(tmp_path: Path) -> None:
    """A quarter of the retries change the amount: a ledger that answers one with the
    original transfer (idempotency by id alone) fails the retries check."""
    def open_lax(path: str) -> _Lax:
        return _Lax(Ledger.open(path), "", "")

    config = StressConfig(path=str(tmp_path / "ledger"), retry_rate=0.3, **SMALL)
    assert run_stress(StressConfig(path=str(tmp_path / "honest"), retry_rate=0.3, **SMALL), progress=False).ok
    report = run_stress(config, progress=False, open_ledger=open_lax)
    assert report.checks[CHECK_RETRIES] is False and report.summary()["verdict"] == "FAILED"


def test_a_retry_is_judged_against_the_request_that_landed_first(tmp_path: Path) -> None:
    """The original told nothing (a timeout) and never landed; a retry with another amount
    lands first: a retry of the original amount must then be refused, and is no mismatch.
    Answers of another request's fields, or a conflict no request with other fields could
    cause, are."""
    def replies_after(*sent: tuple[Op, Transfer | LedgerError]) -> list[str]:
        state: Any = (Replies(), {}, [], [])
        for op, outcome in sent:
            record(state, [op], [outcome], 1.0, 0.0)
        return state[0].retry_mismatches

    with Ledger.open(tmp_path / "ledger") as ledger:
        ledger.create_account("a", currency="USD", overdraft_limit=None)
        ledger.create_account("b", currency="USD")
        original, differing, plain = Op("t", "a", "b", 5, False), Op("t", "a", "b", 4, True, differs=True), Op(
            "t", "a", "b", 5, True)
        landed = ledger.transfer("t", source="a", destination="b", amount=4)
        conflict = IdempotencyConflict("another request")
        assert replies_after((original, LedgerTimeout("no reply")), (differing, landed), (plain, conflict)) == []
        assert replies_after((original, LedgerTimeout("no reply")), (plain, landed)) == ["t"]
        assert replies_after((original, LedgerTimeout("no reply")), (plain, conflict)) == ["t"]
        assert replies_after((original, landed), (plain, landed)) == ["t"]  # the original's answer was not its own


def test_a_local_run_fails_when_the_ledger_moves_retried_money_twice(tmp_path: Path) -> None:
    """Each retry answered as the original, but the money moved again under an id the run never
    sent: the moves balance, every acknowledged transfer is there once; only the entries show it."""
    def open_doubling(path: str) -> _DoubleMover:
        return _DoubleMover(Ledger.open(path))

    report = run_stress(StressConfig(path=str(tmp_path / "ledger"), retry_rate=0.3, **SMALL), progress=False,
                        open_ledger=open_doubling)
    with Ledger.open(tmp_path / "ledger") as ledger:
        assert any(made.id.endswith("-again") for made in ledger.transfers(limit=10_000))
    assert report.checks[CHECK_EXPLAINED] is False, report.checks
    assert report.checks[CHECK_PRESENT] and report.checks[CHECK_CONSERVED]
    assert report.summary()["verdict"] == "FAILED"


@pytest.mark.parametrize("denial", [InvalidRequest, IdempotencyConflict])
def test_a_local_run_fails_when_the_ledger_moves_money_and_answers_that_it_did_not(
        tmp_path: Path, denial: type[LedgerError]) -> None:
    """One transfer in five applied and answered as invalid, or as a conflict with no request
    that differed: the ids were sent, the moves balance, and nothing acknowledged is missing;
    only an entry of a move the run was not told was made shows it."""
    def open_denying(path: str) -> _Denier:
        return _Denier(Ledger.open(path), denial)

    report = run_stress(StressConfig(path=str(tmp_path / "ledger"), **SMALL), progress=False, open_ledger=open_denying)
    assert report.checks[CHECK_EXPLAINED] is False, report.checks
    assert report.checks[CHECK_PRESENT] and report.checks[CHECK_CONSERVED]
    assert report.summary()["verdict"] == "FAILED"


def test_a_retry_no_reply_tells_the_outcome_of_is_sent_again_and_fails_the_run_if_none_does(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger that answers every id it has seen with a timeout: no retry learned anything, so
    the run proved nothing of them (it said every retry returned the original outcome)."""
    monkeypatch.setattr("engine._sending.RESEND_BACKOFF_S", (0.0,) * 6)
    opened: list[_Forgetful] = []

    def open_forgetful(path: str) -> _Forgetful:
        opened.append(_Forgetful(Ledger.open(path)))
        return opened[-1]

    report = run_stress(StressConfig(path=str(tmp_path / "ledger"), retry_rate=0.3, **SMALL), progress=False,
                        open_ledger=open_forgetful)
    assert report.outcomes["timeout"] == report.retries[0] > 0
    assert opened[0].timeouts > report.retries[0]  # each was sent again
    assert report.resent == (report.retries[0], report.retries[0])
    assert report.checks[CHECK_OUTCOMES] is False and report.summary()["verdict"] == "FAILED"


def test_the_rate_counts_only_the_transfers_whose_reply_told_their_outcome(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reply that told no outcome (a timeout here; a ledger unavailable on a full disk) is no
    transfer made: it was counted in the rate all the same."""
    monkeypatch.setattr("engine._sending.RESEND_BACKOFF_S", (0.0,) * 6)
    report = run_stress(StressConfig(path=str(tmp_path / "ledger"), retry_rate=0.3, **SMALL), progress=False,
                        open_ledger=lambda path: _Forgetful(Ledger.open(path)))
    summary = report.summary()
    timeouts = report.outcomes["timeout"]
    assert timeouts > 0 and summary["transfers_acknowledged"] == report.sent - timeouts == report.acknowledged
    assert summary["transfers_per_s"] == round((report.sent - timeouts) / report.elapsed_s, 1)


class _Forgetful(Faulty):
    """Answers an id it has seen before with a timeout, never with its outcome."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger, "", "")
        self.seen: set[str] = set()
        self.timeouts = 0

    def transfer(self, transfer_id: str, **fields: Any) -> Transfer:
        if transfer_id in self.seen:
            self.timeouts += 1
            raise LedgerTimeout(f"transfer {transfer_id!r}: timed out")
        self.seen.add(transfer_id)
        return self._ledger.transfer(transfer_id, **fields)


class _DoubleMover(Faulty):
    """Answers a retry of a transfer made as the original, and moves its money again under an
    id of its own."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger, "", "")
        self.seen: set[str] = set()

    def transfer(self, transfer_id: str, **fields: Any) -> Transfer:
        made = self._ledger.transfer(transfer_id, **fields)
        if transfer_id in self.seen:
            with suppress(LedgerError):
                self._ledger.transfer(f"{transfer_id}-again", **fields)
        self.seen.add(transfer_id)
        return made


class _Denier(Faulty):
    """Applies every fifth single transfer and answers it with `denial`."""

    def __init__(self, ledger: Ledger, denial: type[LedgerError]) -> None:
        super().__init__(ledger, "", "")
        self.denial, self.count = denial, 0

    def transfer(self, transfer_id: str, **fields: Any) -> Transfer:
        made = self._ledger.transfer(transfer_id, **fields)
        self.count += 1
        if self.count % 5 == 0 and not fields.get("pending"):
            raise self.denial(f"transfer {transfer_id!r}: denied (as this test makes it)")
        return made


class _Lax(Faulty):
    def transfer(self, transfer_id: str, **fields: Any) -> Transfer:
        try:
            return self._ledger.transfer(transfer_id, **fields)
        except IdempotencyConflict:
            found = self._ledger.get_transfer(transfer_id)
            assert found is not None
            return found


class _LoseFirstAcknowledged(Faulty):
    def __init__(self, ledger: Ledger) -> None:
        super().__init__(ledger, "lost transfer", "")

    def transfer(self, transfer_id: str, **fields: Any) -> Transfer:
        result = self._ledger.transfer(transfer_id, **fields)
        if not self._victim:
            self._victim = transfer_id
        return result


def test_a_short_run_ends_with_every_check_passing(tmp_path: Path) -> None:
    report = run_stress(StressConfig(path=str(tmp_path / "ledger"), retry_rate=0.2, mix="hotspot", **SMALL), progress=False)
    assert report.ok, report.checks
    assert report.sent == SMALL["transfers"]
    assert sum(report.outcomes.values()) == SMALL["transfers"]
    retries = report.summary()["retries"]
    assert 0 < retries["differing"] < retries["sent"] and report.outcomes["idempotency_conflict"] == retries["differing"]


def test_a_run_with_pending_and_linked_transfers_passes_every_check(tmp_path: Path) -> None:
    config = StressConfig(path=str(tmp_path / "ledger"), retry_rate=0.05, pending_rate=0.3, linked_rate=0.2,
                          mix="hotspot", batch=3, **SMALL)
    report = run_stress(config, progress=False)
    assert report.ok, report.checks
    assert {CHECK_HOLDS, CHECK_PENDING_ENDED, CHECK_LINKED} <= set(report.checks)
    assert report.sent == SMALL["transfers"]


def pending_ledger(tmp_path: Path) -> tuple[Ledger, Replies]:
    """A ledger with a pending transfer of each fate and two chains, and the replies a harness got."""
    ledger = Ledger.open(tmp_path / "ledger")
    ledger.create_account("bank", currency="USD", overdraft_limit=None)
    for name in ("a", "b", "c"):
        ledger.create_account(name, currency="USD")
    replies = Replies()
    replies.acknowledged["fund"] = ledger.transfer("fund", source="bank", destination="a", amount=1000)
    for tid, plan in (("p-post", "post"), ("p-void", "void"), ("p-open", "open")):
        made = replies.acknowledged[tid] = ledger.transfer(tid, source="a", destination="b", amount=100, pending=True)
        resolved = (ledger.post_pending(f"{tid}-x", pending_id=tid, amount=40) if plan == "post"
                    else ledger.void_pending(f"{tid}-x", pending_id=tid) if plan == "void" else None)
        if resolved is not None:
            replies.acknowledged[resolved.id] = resolved
        replies.pendings[made.id] = (plan, resolved)
    chain = (TransferRequest("l-0", "a", "c", 10), TransferRequest("l-1", "c", "b", 10))
    replies.acknowledged.update((made.id, made) for made in ledger.transfer_linked(list(chain)))
    replies.chains.append((chain, None))
    refused = (TransferRequest("r-0", "a", "c", 10), TransferRequest("r-1", "c", "b", 10**6))
    with pytest.raises(LinkedTransferFailed):
        ledger.transfer_linked(list(refused))
    replies.chains.append((refused, "insufficient_funds"))
    return ledger, replies


def test_the_auditor_passes_pending_transfers_and_chains_and_reports_what_they_lose(tmp_path: Path) -> None:
    ledger, replies = pending_ledger(tmp_path)
    try:
        checks = audit_replies(ledger, replies)
        assert checks and all(checks.values()), checks
        assert audit_replies(Faulty(ledger, "lost hold", "a"), replies)[CHECK_HOLDS] is False
        assert audit_replies(Faulty(ledger, "lost transfer", "l-1"), replies)[CHECK_LINKED] is False
        assert audit_replies(Faulty(ledger, "lost transfer", "p-open"), replies)[CHECK_PENDING_ENDED] is False
        voided = replies.pendings["p-void"][1]
        assert isinstance(voided, Transfer)
        replies.pendings["p-open"] = ("void", replace(voided, pending_id="p-open"))  # told voided; the ledger has it open
        assert audit_replies(ledger, replies)[CHECK_PENDING_ENDED] is False
    finally:
        ledger.close()


def test_pending_transfers_a_run_before_left_open_count_as_holds_of_the_next(tmp_path: Path) -> None:
    """A second run on the ledger finds the first's open pending transfer holding funds: its
    audit counts them (`open_pending`), and still reports a hold that none explains."""
    ledger, _ = pending_ledger(tmp_path)
    try:
        prior = open_pending(ledger)
        assert prior == {"p-open"}
        assert audit_replies(ledger, Replies())[CHECK_HOLDS] is False  # what the auditor did before
        assert audit_replies(ledger, Replies(), prior=prior)[CHECK_HOLDS] is True
        assert audit_replies(Faulty(ledger, "lost hold", "a"), Replies(), prior=prior)[CHECK_HOLDS] is False
        ledger.void_pending("closed-since", pending_id="p-open")  # ended during the later run: no hold left
        assert audit_replies(ledger, Replies(), prior=prior)[CHECK_HOLDS] is True
    finally:
        ledger.close()


def test_a_second_run_on_the_same_ledger_passes_every_check(tmp_path: Path) -> None:
    path = str(tmp_path / "ledger")
    config = dict(SMALL, pending_rate=0.3, linked_rate=0.1)
    first = run_stress(StressConfig(path=path, **config), progress=False)  # type: ignore[arg-type]
    assert first.ok, first.checks
    with Ledger.open(path) as ledger:
        assert open_pending(ledger), "the first run left no pending transfer open: the second proves nothing"
    second = run_stress(StressConfig(path=path, **config), progress=False)  # type: ignore[arg-type]
    assert second.ok, second.checks
    other_sizes = run_stress(StressConfig(path=path, **dict(config, amount_max=77)), progress=False)  # type: ignore[arg-type]
    assert other_sizes.ok, other_sizes.checks


def test_a_batched_zipf_run_with_retries_passes_from_the_command_line(tmp_path: Path) -> None:
    out = tally("stress", "--path", str(tmp_path / "ledger"), "--accounts", "30", "--clients", "3", "--transfers", "600",
                "--batch", "25", "--mix", "zipf", "--retry-rate", "0.3", "--seed", "9", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["verdict"] == "ok" and summary["transfers_sent"] == 600
    assert all(summary["checks"].values())


def test_a_duration_bounded_run_stops_by_itself(tmp_path: Path) -> None:
    out = tally("stress", "--accounts", "10", "--clients", "2", "--duration", "1", "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["transfers_sent"] > 0


_SAYS_WHEN_FIRING = """
import sys
import engine._stress as stress
from engine._cli import main

send = stress.send


def said_first(ledger, ops):  # the run is firing: the test may signal it now
    if not said_first.done:
        said_first.done = True
        print("firing", flush=True)
    return send(ledger, ops)


said_first.done = False
stress.send = said_first
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(("signal_number", "status", "says"), [(2, 130, "interrupted"), (15, 143, "terminated")],
                         ids=["SIGINT", "SIGTERM"])
def test_a_duration_run_signalled_while_firing_stops_and_removes_its_temporary_ledger(
        tmp_path: Path, signal_number: int, status: int, says: str) -> None:
    """Its clients stop after the op they are in (they kept sending to the closed ledger, and the
    process never exited), and the temporary ledger is removed (SIGTERM left it behind)."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = subprocess.Popen([sys.executable, "-c", _SAYS_WHEN_FIRING, "stress", "--duration", "600", "--accounts", "10",
                            "--clients", "2", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TMPDIR": str(scratch)})
    try:
        assert run.stdout is not None and run.stdout.readline() == "firing\n"
        run.send_signal(signal_number)
        _, stderr = run.communicate(timeout=60)  # a bound for a hang, not a duration asserted
    finally:
        run.kill()
        run.wait(timeout=30)
    assert run.returncode == status, stderr
    assert stderr.strip().splitlines()[-1] == f"tally stress: {says}"
    assert list(scratch.iterdir()) == []


_FILLS_ITS_DISK = """
import os, resource, sys
import engine._stress as stress
from engine._cli import main

fire = stress.fire


def fire_on_a_full_disk(ledger, picker, config, *args):  # its accounts funded, the data file may grow 64 KiB more
    size = os.path.getsize(os.path.join(config.path, "data.mdb"))
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 65_536, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return fire(ledger, picker, config, *args)


stress.fire = fire_on_a_full_disk
sys.exit(main(sys.argv[1:]))
"""


def fill_the_disk(path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tally stress --path path` whose ledger can grow no more once its accounts are funded
    (the file size limit: a full disk, to LMDB, without mounting one)."""
    return subprocess.run([sys.executable, "-c", _FILLS_ITS_DISK, "stress", "--path", str(path), "--accounts", "50",
                           "--clients", "4", "--transfers", "1000", *args], capture_output=True, text=True,
                          timeout=60)


def test_a_journal_that_fails_as_stress_runs_is_one_line_on_stderr_not_a_traceback(tmp_path: Path) -> None:
    """The journal logs the failed write with its exception (`logger.exception`): Python's
    last-resort handler printed its traceback, down to `lmdb.Error`, to the user of `tally`."""
    done = fill_the_disk(tmp_path / "ledger")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and "File \"" not in done.stderr, done.stderr
    said = [line for line in done.stderr.splitlines() if "journal write failed" in line]
    assert len(said) == 1 and said[0].startswith("tally stress: journal write failed ("), done.stderr
    assert "ledger_unavailable" in done.stdout


def test_a_ledger_that_fails_as_stress_runs_stops_it_saying_why_and_its_rate_counts_only_the_acknowledged(
        tmp_path: Path) -> None:
    """A full disk: the clients fired on at a ledger that takes no write until it is reopened,
    the run counted every op in its rate ("4,000 transfers = 4,938 durable transfers/s" of
    which some hundred were committed), sent the rest again for 60 s, and said nowhere why."""
    done = fill_the_disk(tmp_path / "ledger", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    sent, acknowledged = summary["transfers_sent"], summary["transfers_acknowledged"]
    assert summary["outcomes"]["committed"] <= acknowledged < sent < 1000  # the clients stopped
    assert summary["transfers_per_s"] == pytest.approx(acknowledged / summary["elapsed_s"], rel=0.05)
    assert summary["stopped"].startswith("the clients stopped at ")
    assert ": the ledger takes no write until it is reopened: " in summary["stopped"]
    assert summary["resent"] == {"sent": 0, "still_unknown": summary["outcomes"]["ledger_unavailable"]}
    assert summary["checks"][CHECK_PRESENT] and summary["checks"][CHECK_CONSERVED]  # what it acknowledged holds
    assert not (tmp_path / "ledger" / "tally.seal.new").exists()


def test_the_stress_progress_line_counts_acknowledged_transfers_and_no_answer_apart(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Requests no server answered (and replies that told no outcome) were counted as transfers,
    in the rate, as refused, and in the latencies of the progress line."""
    from engine._sending import Recorded
    from engine._stress import _report_progress, _Tally

    class Once:  # the reporter's stop event: one line, then stopped
        waited = 0

        def wait(self, timeout: float) -> bool:
            self.waited += 1
            return self.waited > 1

    tally = _Tally()
    tally.add(Recorded(told=3, refused=1, untold=0, unanswered=0), 5.0)
    tally.add(Recorded(told=0, refused=0, untold=2, unanswered=0), 7.0)
    tally.add(Recorded(told=0, refused=0, untold=0, unanswered=40), 60_000.0)
    _report_progress(tally, Once(), StressConfig(), True)  # type: ignore[arg-type]
    line = capsys.readouterr().err.strip()
    assert " 3 transfers " in line and "refused 1 " in line, line
    assert "no outcome 2" in line and "no answer 40" in line and "p99 7.0 ms" in line, line


def test_no_resend_starts_later_than_the_readme_says(monkeypatch: pytest.MonkeyPatch) -> None:
    """README: "up to 6 rounds ..., none begun more than 20 s after the first"; the code let
    resends start for 60 s (`RESEND_WAIT_S`). A ledger that answers each resend with a timeout
    after 3 s of a clock of the test's own."""
    import re

    from engine import _sending

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    said = re.search(r"in up to (\d+) rounds \(.*?\), none begun more than (\d+) s after the first", readme)
    assert said is not None
    assert (int(said.group(1)), float(said.group(2))) == (_sending.RESEND_ROUNDS_MAX, _sending.RESEND_WAIT_S)
    now = [0.0]
    began: list[float] = []

    class Slow:
        def transfer(self, *args: Any, **kwargs: Any) -> Transfer:
            began.append(now[0])
            now[0] += 3.0
            raise LedgerTimeout("no outcome within 3 s")

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return now[0]

        @staticmethod
        def sleep(seconds: float) -> None:
            now[0] += seconds

    monkeypatch.setattr(_sending, "time", Clock)
    replies = Replies()
    replies.unknown = [Op(f"t{k}", "a", "b", 1, False) for k in range(4)]
    assert _sending.learn_outcomes(Slow(), replies) is None
    assert began and max(began) <= _sending.RESEND_WAIT_S and len(replies.unknown) == 4


_SIGNALLED_INSIDE_THREADING = """
import signal
import sys
import threading

import engine._stress as stress
from engine._cli import main

nth = int(sys.argv.pop(1))
entered = [0]
firing = [False]


def enter(self):  # Condition.__enter__, which the run's main thread calls inside Event.wait, Barrier.wait, ...
    taken = self._lock.__enter__()
    if firing[0] and threading.get_ident() == threading.main_thread().ident:  # (not current_thread(): a
        # thread starting calls this before it is one threading knows)
        entered[0] += 1
        if entered[0] == nth:
            print("signalled", flush=True)
            signal.raise_signal(signal.SIGTERM)  # its handler raises at the next check: the lock stays taken
    return taken


def fire(*args, **kwargs):
    firing[0] = True
    try:
        return stress_fire(*args, **kwargs)
    finally:
        firing[0] = False


stress_fire = stress.fire
stress.fire = fire
threading.Condition.__enter__ = enter
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("nth", range(1, 7))
def test_a_run_stops_wherever_in_threading_s_code_a_signal_lands_in_its_main_thread(tmp_path: Path, nth: int) -> None:
    """Python raises a signal handler's exception between any two bytecodes: one landing right
    after `Condition.__enter__` took its lock leaves the lock taken. Landing so in the main
    thread's wait for the duration (`stop.wait`), it left the lock of the event that stops the
    clients taken: stopping them then waited for it forever, the clients kept firing and the
    process never exited (a SIGTERM during a run on a loaded machine). The run's main thread
    takes such a lock at each of its calls into threading (the nth one here); wherever one
    leaves it taken, the run stops and the temporary ledger is removed."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run = subprocess.Popen([sys.executable, "-c", _SIGNALLED_INSIDE_THREADING, str(nth), "stress", "--duration", "1",
                            "--accounts", "10", "--clients", "2", "--json"], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env={**os.environ, "TMPDIR": str(scratch)})
    try:
        stdout, stderr = run.communicate(timeout=60)  # a bound for a hang, not a duration asserted
    finally:
        run.kill()
        run.wait(timeout=30)
    if nth == 1 or stdout.startswith("signalled"):  # (the first is the start of the first client, always)
        assert stdout == "signalled\n" and run.returncode == 143, stderr
        assert stderr.strip().splitlines()[-1] == "tally stress: terminated"
    else:  # fewer calls than nth: a run that ends by itself
        assert run.returncode == 0, stderr
    assert list(scratch.iterdir()) == []


def test_a_short_chaos_run_loses_nothing(tmp_path: Path) -> None:
    out = tally("stress", "--chaos", "--kills", "3", "--path", str(tmp_path / "ledger"), "--accounts", "20",
                "--clients", "3", "--transfers", "400", "--json")
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["chaos"]["kills_survived"] == 3
    assert summary["chaos"]["lost"] == 0 and summary["chaos"]["acknowledged"] > 0
    assert summary["verdict"] == "ok"


def test_a_chaos_run_whose_engine_child_dies_on_its_own_fails_saying_how(tmp_path: Path) -> None:
    """The child cannot open its accounts (one exists in another currency) and exits 1: no kill
    of the parent's, nothing acknowledged; the verdict names its status and stderr's end."""
    with Ledger.open(tmp_path / "ledger") as ledger:
        ledger.create_account("acct-000001", currency="EUR")
    out = tally("stress", "--chaos", "--kills", "2", "--path", str(tmp_path / "ledger"), "--accounts", "3",
                "--clients", "2", "--transfers", "30")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "round 1/3: the engine child exited with status 1 before the parent killed it" in out.stdout
    assert "AccountExists" in out.stdout  # the tail of its traceback
    assert "✗ some transfer was acknowledged" in out.stdout and "verdict: FAILED" in out.stdout


@pytest.mark.parametrize("suffix", [".png", ".html"])
def test_the_report_is_a_plot_a_person_can_open(tmp_path: Path, suffix: str) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / f"report{suffix}"
    out = tally("stress", "--accounts", "10", "--clients", "2", "--transfers", "300", "--report", str(target))
    assert out.returncode == 0, out.stderr
    data = target.read_bytes()
    assert data.startswith(b"\x89PNG") if suffix == ".png" else b"<svg" in data


def test_a_report_target_that_cannot_be_written_is_refused_before_the_run(tmp_path: Path) -> None:
    (tmp_path / "d.png").mkdir()
    out = tally("stress", "--report", str(tmp_path / "d.png"), "--transfers", "10", "--accounts", "3")
    assert out.returncode == 2 and out.stdout == "", out.stdout  # no run: it was found after one
    assert out.stderr.strip().endswith("is a directory: name a file") and out.stderr.count("\n") == 1


def test_a_report_that_fails_to_be_written_keeps_the_figures_and_the_verdict(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")

    def disk_full(*_: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("engine._plot.write_report", disk_full)
    from engine._cli import main

    status = main(["stress", "--accounts", "4", "--clients", "2", "--transfers", "40", "--report",
                   str(tmp_path / "r.png")])
    out, err = capsys.readouterr()
    assert status == 2 and "verdict: ok" in out and "40 transfers" in out and "report written" not in out
    assert "was not written: [Errno 28] No space left on device" in err


@pytest.mark.parametrize(
    "args",
    [
        ["--accounts", "0"],
        ["--clients", "-1"],
        ["--transfers", "-5"],
        ["--mix", "gaussian"],
        ["--retry-rate", "1.5"],
        ["--duration", "0"],
        ["--report", "plot.pdf", "--transfers", "10", "--accounts", "3"],
        ["--pending-rate", "-0.1"],
        ["--pending-rate", "0.6", "--linked-rate", "0.5", "--transfers", "10", "--accounts", "3"],
        ["--chaos", "--linked-rate", "0.1", "--transfers", "10", "--accounts", "3"],
        ["--chaos", "--duration", "3"],  # options a chaos run would ignore: refused, not ignored
        ["--chaos", "--batch", "8"],
        ["--chaos", "--retry-rate", "0.5"],
        ["--kills", "3", "--transfers", "10", "--accounts", "3"],
        ["--accounts", "100000000000000000000"],  # a MemoryError's traceback
        ["--batch", "100000000000", "--duration", "1", "--accounts", "10", "--clients", "1"],  # it hung, using GBs
    ],
)
def test_bad_arguments_get_one_clear_line_and_a_non_zero_exit(args: list[str]) -> None:
    out = tally("stress", *args)
    assert out.returncode != 0
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_a_path_that_is_not_a_ledger_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a ledger")
    out = tally("stress", "--path", str(tmp_path), "--transfers", "10")
    assert out.returncode == 2
    assert "not a Tally ledger" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    file_out = tally("stress", "--path", str(tmp_path / "notes.txt"), "--transfers", "10")
    assert file_out.returncode == 2 and "is a file" in file_out.stderr


def test_a_ledger_stress_cannot_use_is_refused_with_nothing_written(tmp_path: Path) -> None:
    """An account of the run's held with other fields: the run was refused only once it had
    made its bank and the accounts before that one, in the user's ledger."""
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("acct-000003", currency="EUR")
        head = ledger.head()
    out = tally("stress", "--path", str(path), "--accounts", "5", "--transfers", "100")
    assert out.returncode == 2, out.stdout + out.stderr
    assert out.stderr == ("tally stress: account 'acct-000003' exists with other fields: EUR, overdraft_limit 0, code 0,"
                          " no metadata\n")
    with Ledger.open(path, readonly=True) as ledger:
        assert [account.id for account in ledger.accounts()] == ["acct-000003"] and ledger.head() == head


def test_a_funding_id_used_for_another_transfer_is_refused_with_nothing_written(tmp_path: Path) -> None:
    """The run funds acct-000001 with transfer id fund-acct-000001-250 (the amount in it): one
    the ledger made otherwise is refused before the run opens any account, and one an earlier
    run made is taken as it is."""
    path = tmp_path / "ledger"
    config = StressConfig(path=str(path), accounts=3, clients=1, transfers=20, amount_max=50)
    with Ledger.open(path) as ledger:
        ledger.create_account("stress-bank", currency="USD", overdraft_limit=None)
        ledger.create_account("acct-000001", currency="USD")
        ledger.transfer("fund-acct-000001-250", source="stress-bank", destination="acct-000001", amount=7)
        head = ledger.head()
    with pytest.raises(IdempotencyConflict, match="'fund-acct-000001-250', with which the run funds 'acct-000001'"):
        run_stress(config, progress=False)
    with Ledger.open(path, readonly=True) as ledger:
        assert ledger.head() == head and len(ledger.accounts()) == 2
    again = tmp_path / "again"
    assert run_stress(replace(config, path=str(again)), progress=False).ok
    assert run_stress(replace(config, path=str(again)), progress=False).ok  # its own fundings: taken


def test_a_path_stress_may_use_is_one_ledger_open_may_use(tmp_path: Path) -> None:
    """The same rule as `Ledger.open`: a hidden file or `lost+found` does not make a directory foreign."""
    (tmp_path / ".keep").write_text("")
    (tmp_path / "lost+found").mkdir()
    out = tally("stress", "--path", str(tmp_path), "--accounts", "4", "--clients", "2", "--transfers", "40")
    assert out.returncode == 0, out.stderr
    assert "verdict: ok" in out.stdout


def test_the_plot_draws_a_short_run_as_a_line_and_says_what_it_cannot_show() -> None:
    """A run of a tenth of a second is sliced in twentieths (a second a slice was one point);
    a run with no samples (--chaos) or with samples that stop early (each client keeps its
    first SAMPLES_MAX) says so on the plot."""
    from engine._plot import _missing, _per_second
    from engine._sending import SAMPLES_MAX

    short = [(i / 1000, 1.0) for i in range(100)]  # 0.0 .. 0.099 s
    starts, rate, p50, _ = _per_second(short)
    assert len(starts) >= 10 and all(value > 0 for value in rate) and set(p50) == {1.0}
    assert _missing(short, {"elapsed_s": 0.1}) is None
    assert "no latency samples" in (_missing([], {"elapsed_s": 3.0}) or "")
    assert f"first {SAMPLES_MAX:,}" in (_missing(short, {"elapsed_s": 10.0}) or "")


def test_a_chaos_round_waits_child_wait_s_for_each_line_not_for_the_whole_round(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A last round longer than `CHILD_WAIT_S` in all, its child answering all along, is no child
    that stopped answering (it was: a long --transfers ended FAILED). A clock of the test's own:
    each line arrives 10 s after the one before, with `CHILD_WAIT_S` 15."""
    import queue
    import random
    from collections import deque

    from engine import _chaos
    from engine._auditor import Replies
    from engine._stress import StressConfig, StressReport

    now = [1000.0]
    monkeypatch.setattr(_chaos, "CHILD_WAIT_S", 15.0)
    monkeypatch.setattr(_chaos.time, "monotonic", lambda: now[0])
    sent = [f"A t{i} a b 1 {i} {i}\n" for i in range(5)] + [None]

    class Lines:
        def get(self, timeout: float) -> str | None:
            if timeout <= 0:  # nothing came within what was left of the wait
                raise queue.Empty
            now[0] += 10.0
            return sent.pop(0)

    class Child:
        pid = -1

        def wait(self, timeout: float) -> int:
            return 0  # the last round's child ends on its own, status 0

    report = StressReport(StressConfig(path="unused"))
    killed = _chaos._watch(Child(), [], Lines(), deque(), random.Random(1), Replies(), report,  # type: ignore[arg-type]
                           budget=5)
    assert killed is False and report.sent == 5


def test_the_plot_of_a_short_run_at_a_steady_rate_ends_steady_not_in_a_cliff() -> None:
    """The sample at the very end of a run belongs to the last slice: alone in a slice of its
    own, a run at 5,000/s ended its plot at 200/s."""
    from engine._plot import _per_second

    steady = [(i / 5000, 1.0) for i in range(10_001)]  # 2 s at 5,000/s, the last at exactly 2.0 s
    starts, rate, _, _ = _per_second(steady)
    assert len(starts) == 20 and min(rate) > 0.9 * 5000, rate[-3:]
    for end_s, per_s in ((25.01, 1000), (25.04, 1000), (25.6, 1000), (0.14, 20_000), (0.07, 20_000)):
        count = round(end_s * per_s)
        _, rate, _, _ = _per_second([(i / per_s, 1.0) for i in range(count + 1)])  # a tail past a whole slice
        assert min(rate) > 0.6 * per_s, (end_s, rate[-3:])


def test_a_duration_shorter_than_the_clients_start_still_runs_them_all(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The duration counts from the clients' barrier, not from before they start: a client whose
    thread ran its target only after the duration had passed returned before the barrier, and the
    others waited the barrier's 60 s out, then sent nothing."""
    class LateThread(threading.Thread):
        def run(self) -> None:
            if self.name == "stress-client-1":
                time.sleep(0.3)
            super().run()

    monkeypatch.setattr(threading, "Thread", LateThread)
    reports: list[StressReport] = []
    runner = threading.Thread(target=lambda: reports.append(run_stress(StressConfig(
        path=str(tmp_path / "ledger"), accounts=10, clients=2, transfers=None, duration_s=0.05), progress=False)),
        daemon=True)
    runner.start()
    runner.join(timeout=30)  # a bound for a stall, not a duration asserted
    assert reports, "the run stalled at its clients' barrier"
    assert reports[0].sent > 0 and reports[0].ok
