"""`tally stress --url`: the workload and the auditor drive a `tally serve` over HTTP.

A real server (a `tally serve` subprocess on a free loopback port) passes the audit; a
stand-in server that lies (one balance off by one) fails it with a clear line; the options that
make no sense remotely are refused; the client turns error bodies back into `LedgerError`s.
"""

from __future__ import annotations

import contextlib
import json
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

from coordinator import REJECTIONS
from engine import (
    Account,
    InsufficientFunds,
    Ledger,
    LedgerError,
    LinkedTransferFailed,
    Transfer,
    TransferRequest,
)
from engine._auditor import CHECK_EXPLAINED, CHECK_PRESENT
from engine._remote import RemoteLedger
from engine._remote_replies import ServerOverloaded, UnexpectedReply
from engine._stress import StressConfig
from engine._stress_remote import CHECK_ACCOUNTS, CHECK_CONTRACT, run_remote_stress

STARTUP_S = 30.0
SMALL = ["--accounts", "20", "--clients", "4", "--transfers", "300", "--amount-max", "50", "--seed", "5"]


def tally(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def announced_url(server: subprocess.Popen[str], log: Path) -> str:
    """The URL `tally serve` prints once it is ready, read within `STARTUP_S`; the rest of its
    stdout is drained by a thread. If it is not ready, the failure shows its `log` (stderr)."""
    assert server.stdout is not None
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def drain() -> None:
        assert server.stdout is not None
        for line in server.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=drain, daemon=True).start()
    deadline = time.monotonic() + STARTUP_S
    while True:
        try:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            raise AssertionError(f"tally serve did not say it was ready within {STARTUP_S} s; its log:\n"
                                 f"{log.read_text()[-4000:]}") from None
        if line is None:
            raise AssertionError(f"tally serve exited with {server.wait(timeout=STARTUP_S)} before it was ready; "
                                 f"its log:\n{log.read_text()[-4000:]}")
        found = re.search(r"serving .* on (http://\S+)", line)
        if found:
            return found.group(1)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A `tally serve` subprocess on a free loopback port (`--port 0`) with a token; its URL and
    token file. Its log goes to a file (a pipe nobody reads would fill and stall it)."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "engine", "serve", str(tmp_path / "ledger"), "--host",
                                   "127.0.0.1", "--port", "0", "--token-file", str(token_file)],
                                  cwd=tmp_path, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        yield announced_url(server, tmp_path / "serve.log"), token_file
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=30)


# --- a stand-in server over an in-process Ledger, which can be told to lie ------------------------

_STATUS = {"invalid_request": 400, "account_not_found": 404, "account_exists": 409, "idempotency_conflict": 409}


class StandIn(ThreadingHTTPServer):
    """The routes `tally stress --url` uses, over an in-process `Ledger`. `lie_about` ends the
    name of an account whose posted balance it reports one too high, or of a transfer it reads
    back with an amount one too high; `statuses` maps an error code to its HTTP status (422 if
    absent); `marks_replays` False leaves the Idempotency-Replayed header off; `doubles_retries`
    applies a `POST /transfers` sent again a second time (under an id of its own), answering it
    as the replay it should be; `overloads_retries` turns away the first such retry of each
    transfer made, 503 `overloaded`, as an honest server at its bound of requests does (nothing
    written); `loses_replies` applies the first try of each pending transfer, post and void, then
    closes the connection without a reply (as a server killed and restarted would);
    `forgets_after` writes of transfers, it serves `forgotten_into` instead (its books lost);
    after `dies_after` writes of transfers it dies: it answers nothing more, closes every
    connection and listens no more (a server killed)."""

    daemon_threads = True

    def __init__(self, ledger: Ledger, lie_about: str | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.ledger = ledger
        self.lie_about = lie_about
        self.answered: set[str] = set()
        self.statuses = dict(_STATUS)
        self.marks_replays = True
        self.doubles_retries = False
        self.overloads_retries = False
        self.overloaded: set[str] = set()
        self.loses_replies = False
        self.forgets_after: int | None = None
        self.forgotten_into: Ledger | None = None
        self.transfer_writes = 0
        self.dies_after: int | None = None
        self.dead = False
        self.lost: set[str] = set()
        self.lock = threading.Lock()

    def die(self) -> None:
        """Answer nothing from now on, and stop listening (on a thread: `shutdown` waits for the
        loop that may be the caller's)."""
        with self.lock:
            if self.dead:
                return
            self.dead = True
        threading.Thread(target=lambda: (self.shutdown(), self.socket.close()), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go in two writes: no 40 ms delayed-ACK stall
    server: StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        if self.server.dead:
            self.close_connection = True  # no reply: the server is gone
            return
        self._answer(lambda: self._read(urlsplit(self.path)))

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        if self.server.dead:
            self.close_connection = True
            return
        key = self.headers["Idempotency-Key"]
        path = urlsplit(self.path).path
        if self.server.loses_replies and (body.get("pending") or path.endswith(("/post", "/void"))):
            with self.server.lock:
                first = key not in self.server.lost
                self.server.lost.add(key)
            if first:
                with contextlib.suppress(LedgerError):
                    self._write(path, body, key)
                self.close_connection = True  # applied; the reply is lost
                return
        self._answer(lambda: self._write(path, body, key), key)

    def _read(self, parts: Any) -> Any:
        ledger, path = self.server.ledger, [unquote(p) for p in parts.path.strip("/").split("/")]
        if path[0] == "health":
            return {"status": "ok"}
        if path[0] == "transfers":
            found = ledger.get_transfer(path[1])
            if found is None:
                return 404, "transfer_not_found", f"no transfer {path[1]!r}"
            read = _plain(found)
            if self.server.lie_about is not None and path[1].endswith(self.server.lie_about):
                read["amount"] += 1
            return read
        if len(path) == 2:
            return _plain(ledger.account(path[1]))
        if path[2] == "entries":
            query = {name: int(values[0]) for name, values in parse_qs(parts.query).items()}
            return {"entries": [_plain(e) for e in ledger.entries(path[1], query.get("after", 0), query.get("limit"))]}
        balance = _plain(ledger.balance(path[1]))
        if self.server.lie_about is not None and path[1].endswith(self.server.lie_about):
            balance["posted"] += 1
            balance["available"] += 1
        return balance

    def _write(self, path: str, body: dict[str, Any], key: str) -> Any:
        with self.server.lock:
            if path.startswith("/transfers"):
                self.server.transfer_writes += 1
            if self.server.transfer_writes == self.server.forgets_after and self.server.forgotten_into is not None:
                self.server.ledger = self.server.forgotten_into
        if self.server.transfer_writes == self.server.dies_after:
            self.server.die()
        ledger = self.server.ledger
        if path == "/accounts":
            return _plain(ledger.create_account(body.pop("id"), **body))
        if (path == "/transfers" and self.server.overloads_retries and key in self.server.answered
                and key not in self.server.overloaded
                and ledger.get_transfer(key) is not None):  # a transfer made (not a refusal the audit sends again)
            self.server.overloaded.add(key)
            raise ServerOverloaded("this server is serving its limit of requests at once: retry later")
        if path == "/transfers":
            made: Any = ledger.transfer(key, **body)
            if self.server.doubles_retries and key in self.server.answered:
                with contextlib.suppress(LedgerError):
                    ledger.transfer(f"{key}-again", **body)  # the money moves a second time
        elif path == "/transfers/linked":
            made = ledger.transfer_linked([TransferRequest(**leg) for leg in body["legs"]])
        elif path.endswith("/post"):
            made = ledger.post_pending(key, pending_id=unquote(path.split("/")[2]), **body)
        else:
            made = ledger.void_pending(key, pending_id=unquote(path.split("/")[2]), **body)
        return {"transfers": [_plain(t) for t in made]} if isinstance(made, list) else _plain(made)

    def _answer(self, reply: Any, key: str | None = None) -> None:
        """Send what `reply()` gives: a value (200, or 201 for a write), or a tuple (status, code,
        message[, more]) or a `LedgerError` as an error. A write's answer, or a journaled
        refusal, given for a key answered before is marked a replay."""
        replayable = True
        try:
            answer = reply()
        except LinkedTransferFailed as error:
            answer = (422, error.code, str(error), {"index": error.index,
                                                     "cause": {"code": error.cause.code, "message": str(error.cause)}})
        except LedgerError as error:
            answer = (self.server.statuses.get(error.code, 422), error.code, str(error))
            replayable = error.code in REJECTIONS
        if isinstance(answer, tuple):
            status, code, message, *more = answer
            data = {"error": {"code": code, "message": message, **(more[0] if more else {})}}
        else:
            status, data = (200 if key is None else 201), answer
        headers = {}
        if key is not None and replayable:
            with self.server.lock:
                if key in self.server.answered and self.server.marks_replays:
                    headers = {"Idempotency-Replayed": "true"}
                self.server.answered.add(key)
        payload = json.dumps(data).encode()
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", "Content-Length": str(len(payload)), **headers}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)


def _plain(value: Any) -> Any:
    data = asdict(value)
    if data.get("metadata") is not None:
        data["metadata"] = dict(value.metadata)
    return data


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[StandIn]:
    with Ledger.open(tmp_path / "stand-in") as ledger:
        server = StandIn(ledger)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        thread.start()
        try:
            yield server
        finally:
            server.shutdown()
            server.server_close()
            thread.join(timeout=10)


# --- the tests ---------------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_a_run_against_a_real_server_passes_its_audit(served: tuple[str, Path]) -> None:
    url, token_file = served
    done = tally("stress", "--url", url, "--token-file", str(token_file), *SMALL, "--retry-rate", "0.05",
                 "--pending-rate", "0.1", "--linked-rate", "0.1", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = json.loads(done.stdout)
    assert summary["verdict"] == "ok"
    assert summary["checks"][CHECK_CONTRACT] is True
    assert summary["transfers_sent"] == 300 and summary["remote"]["fault_count"] == 0


@pytest.mark.timeout(120)
def test_a_second_run_on_the_same_server_audits_only_its_own_accounts(served: tuple[str, Path]) -> None:
    url, token_file = served
    runs = [tally("stress", "--url", url, "--token-file", str(token_file), *SMALL) for _ in range(2)]
    prefixes = set()
    for done in runs:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "verdict: ok" in done.stdout
        prefixes.update(re.findall(r"ids of this run start (\S+)-", done.stdout))
    assert len(prefixes) == 2


@pytest.mark.timeout(60)
def test_a_run_without_the_servers_token_or_with_another_is_refused_before_it_starts(
        served: tuple[str, Path], tmp_path: Path) -> None:
    url, _ = served
    done = tally("stress", "--url", url, *SMALL)
    assert done.returncode == 2
    assert "401" in done.stderr and "--token-file" in done.stderr
    wrong = tmp_path / "wrong-token"
    wrong.write_text("not-the-token")
    done = tally("stress", "--url", url, "--token-file", str(wrong), *SMALL)
    assert done.returncode == 2
    assert "401: the server refused the bearer token given" in done.stderr


@pytest.mark.timeout(60)
def test_a_run_against_an_honest_stand_in_passes(stand_in: StandIn) -> None:
    config = StressConfig(accounts=10, clients=3, transfers=200, amount_max=40, retry_rate=0.05, pending_rate=0.1,
                          linked_rate=0.1, seed=7, url=stand_in.url)
    report = run_remote_stress(config, progress=False)
    assert report.ok, report.checks
    assert report.checks[CHECK_CONTRACT] is True
    assert report.remote is not None and report.remote["fault_count"] == 0


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("lie", "failed"), [
    ("-acct-000003", "✗ money is conserved (posted balances sum to 0)"),
    ("-c1-7", "✗ every acknowledged transfer is present exactly once with its fields"),
], ids=["a wrong balance", "a transfer read back wrong"])
def test_a_server_that_lies_fails_the_run_with_a_clear_line(stand_in: StandIn, lie: str, failed: str) -> None:
    stand_in.lie_about = lie  # a balance, or the amount of transfer 7 of client 1 when read back
    done = tally("stress", "--url", stand_in.url, "--accounts", "10", "--clients", "2", "--transfers", "100")
    assert done.returncode == 1, done.stdout + done.stderr
    assert failed in done.stdout
    assert "verdict: FAILED" in done.stdout


@pytest.mark.timeout(60)
def test_a_server_that_moves_retried_money_twice_fails_the_run(stand_in: StandIn) -> None:
    """Each retry answered as a replay (same transfer, marked), but the money moved again under an
    id the run never sent: every acknowledged transfer is there once, money is conserved among
    the run's accounts, balances run gaplessly; only entries the run cannot explain show it."""
    stand_in.doubles_retries = True
    config = StressConfig(accounts=10, clients=2, transfers=300, amount_max=40, retry_rate=0.2, seed=7,
                          url=stand_in.url)
    report = run_remote_stress(config, progress=False)
    assert any(made.id.endswith("-again") for made in stand_in.ledger.transfers(limit=10_000))
    assert report.checks[CHECK_EXPLAINED] is False, report.checks
    assert not report.ok


@pytest.mark.timeout(60)
def test_a_retry_turned_away_by_an_overloaded_server_is_no_mismatch(stand_in: StandIn) -> None:
    """503 `overloaded` (or `timeout`, or no answer) to a retry is no outcome: it neither differs
    from the original nor fails the run, whose books are whole; sent again, the retry is answered."""
    stand_in.overloads_retries = True
    stand_in.statuses["overloaded"] = 503
    config = StressConfig(accounts=10, clients=2, transfers=200, amount_max=40, retry_rate=0.2, seed=7,
                          url=stand_in.url)
    report = run_remote_stress(config, progress=False)
    assert report.outcomes.get("overloaded", 0) > 0, report.outcomes
    assert report.resent[0] == report.outcomes["overloaded"] and report.resent[1] == 0
    assert report.ok, report.checks


@pytest.mark.timeout(60)
def test_pending_transfers_posts_and_voids_whose_replies_were_lost_are_learned_before_the_audit(
        stand_in: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each applied, its reply lost (no answer: `server_unreachable`): sent again with the same id,
    each tells its outcome, and the audit counts it (it audited them as if they had not
    happened, and failed a whole server)."""
    monkeypatch.setattr("engine._sending.RESEND_BACKOFF_S", (0.0,) * 6)
    stand_in.loses_replies = True
    config = StressConfig(accounts=10, clients=3, transfers=60, amount_max=40, retry_rate=0.0, pending_rate=0.9,
                          seed=7, url=stand_in.url)
    report = run_remote_stress(config, progress=False)
    assert report.outcomes.get("server_unreachable", 0) > 0, report.outcomes
    assert report.resent[0] >= report.outcomes["server_unreachable"] and report.resent[1] == 0
    assert report.ok, report.checks


@pytest.mark.timeout(60)
def test_requests_no_server_answered_count_in_neither_the_rate_nor_the_latencies(
        stand_in: StandIn, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine._sending.RESEND_BACKOFF_S", (0.0,) * 6)
    stand_in.loses_replies = True
    config = StressConfig(accounts=10, clients=2, transfers=60, amount_max=40, retry_rate=0.0, pending_rate=0.5,
                          seed=7, url=stand_in.url)
    report = run_remote_stress(config, progress=False)
    summary = report.summary()
    unanswered = report.outcomes["server_unreachable"]
    assert unanswered > 0 and summary["transfers_unanswered"] == unanswered and report.sent == 60
    assert len(report.latencies_ms) == len(report.samples) == 60 - unanswered
    assert summary["transfers_per_s"] == round((60 - unanswered) / report.elapsed_s, 1)


@pytest.mark.timeout(60)
def test_a_server_that_loses_its_books_mid_run_fails_naming_what_is_gone(
        stand_in: StandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Restarted on an empty directory: the verdict is FAILED, naming the accounts and the
    acknowledged transfers gone (it was a traceback in the wait for expiries, or exit 2 when an
    account read came back 404)."""
    monkeypatch.setattr("engine._sending.RESEND_BACKOFF_S", (0.0,) * 6)
    with Ledger.open(tmp_path / "empty") as empty:
        stand_in.forgets_after, stand_in.forgotten_into = 60, empty
        config = StressConfig(accounts=10, clients=2, transfers=120, amount_max=40, pending_rate=0.3, seed=7,
                              url=stand_in.url)
        report = run_remote_stress(config, progress=False)
    assert report.checks[CHECK_ACCOUNTS] is False and report.checks[CHECK_PRESENT] is False
    assert report.remote is not None and report.remote["accounts_gone_count"] == 11
    assert 0 < len(report.remote["transfers_gone"]) <= report.remote["transfers_gone_count"]
    assert report.summary()["verdict"] == "FAILED"


@pytest.mark.timeout(30)
def test_a_server_that_dies_mid_run_stops_the_clients_and_the_report_says_what_it_acknowledged(
        stand_in: StandIn, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Killed: the clients fired on at it for the whole --duration (each refused connection a
    transfer of the progress line), and the audit's first read ended the run with one line,
    exit 2, nothing said of what had been acknowledged. Now they stop once no request is
    answered for `SERVER_GONE_S`, and the report says what was told, unaudited: FAILED."""
    import argparse

    from engine._cli_render import render_stress
    from engine._stress_remote import CHECK_ANSWERING

    monkeypatch.setattr("engine._sending.RESEND_BACKOFF_S", (0.0,) * 6)
    monkeypatch.setattr("engine._stress_remote.SERVER_GONE_S", 0.2)
    stand_in.dies_after = 120
    config = StressConfig(accounts=10, clients=2, transfers=None, duration_s=600, amount_max=40, seed=7,
                          url=stand_in.url)
    report = run_remote_stress(config, progress=False)
    assert stand_in.dead
    summary = report.summary()
    assert summary["verdict"] == "FAILED" and report.checks[CHECK_ANSWERING] is False
    assert 0 < report.acknowledged < report.sent and report.outcomes["committed"] > 0
    assert report.unanswered > 0 and len(report.latencies_ms) == report.sent - report.unanswered
    stopped = summary["stopped"]
    assert stopped.startswith("the clients stopped at ") and "answered no request for 0.2 s" in stopped, stopped
    assert f"({report.acknowledged:,} transfers) was not audited: it answered no read" in stopped, stopped
    render_stress(summary, argparse.Namespace(report=None))
    shown = capsys.readouterr().out
    assert f"({report.acknowledged:,} acknowledged)" in shown and "✗ " + CHECK_ANSWERING in shown, shown
    assert "verdict: FAILED" in shown


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("extra", "says"), [
    (["--chaos"], "--chaos cannot be used with --url"),
    (["--chaos", "--kills", "3"], "--chaos cannot be used with --url"),
    (["--path", "somewhere"], "--path cannot be used with --url"),
    (["--batch", "8"], "--batch cannot be used with --url: the HTTP API has no batch route"),
])
def test_options_that_make_no_sense_remotely_are_refused(extra: list[str], says: str) -> None:
    done = tally("stress", "--url", "http://127.0.0.1:9", *extra)
    assert done.returncode == 2 and says in done.stderr, done.stderr


@pytest.mark.timeout(30)
def test_a_token_file_without_a_url_and_a_url_with_a_path_or_a_password_are_refused(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("t")
    done = tally("stress", "--token-file", str(token), "--transfers", "5")
    assert done.returncode == 2 and "--token-file goes with --url" in done.stderr
    done = tally("stress", "--url", "http://127.0.0.1:9/accounts")
    assert done.returncode == 2 and "not a server's URL" in done.stderr
    done = tally("stress", "--url", "http://user:s3cr3t@127.0.0.1:9", "--token-file", str(token))  # sent as Basic auth
    assert done.returncode == 2 and "holds a user name or password" in done.stderr and done.stderr.count("\n") == 1
    assert "s3cr3t" not in done.stderr  # never echoed
    for malformed in ("http://user:s3cr3t@127.0.0.1:99999", "http://user:s3cr3t@127.0.0.1:9/path",
                      "ftp://user:s3cr3t@127.0.0.1:9", "http://user:s3/cr3t@127.0.0.1:9", "user:s3cr3t@127.0.0.1:9",
                      "http:/user:s3cr3t@127.0.0.1:9"):
        done = tally("stress", "--url", malformed)
        assert done.returncode == 2 and "s3cr3t" not in done.stderr and "cr3t" not in done.stderr, done.stderr


@pytest.mark.timeout(30)
@pytest.mark.parametrize(("content", "says"), [
    (None, "cannot be read"),
    ("", "1 to 4096 visible ASCII characters"),
    ("two words", "without spaces"),
])
def test_a_token_file_that_is_missing_or_holds_no_single_token_is_one_line_and_exit_2(
        tmp_path: Path, content: str | None, says: str) -> None:
    """By the rules `tally serve --token-file` reads its own token by: before anything is sent."""
    token = tmp_path / "token"
    if content is not None:
        token.write_text(content)
    done = tally("stress", "--url", f"http://127.0.0.1:{free_port()}", "--token-file", str(token))
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"tally stress: --token-file {token}: ") and says in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


@pytest.mark.timeout(30)
def test_a_server_that_is_not_there_is_one_line_and_exit_2() -> None:
    done = tally("stress", "--url", f"http://127.0.0.1:{free_port()}", "--transfers", "5")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "is `tally serve` running at" in done.stderr


@pytest.mark.timeout(30)
def test_the_client_raises_the_error_class_a_reply_names(stand_in: StandIn) -> None:
    with RemoteLedger(stand_in.url) as remote:
        remote.create_accounts([Account("bank", "USD", None), Account("a", "USD", 0), Account("b", "USD", 0)])
        remote.transfer("fund", source="bank", destination="a", amount=10)
        with pytest.raises(InsufficientFunds):
            remote.transfer("big", source="a", destination="b", amount=11)
        with pytest.raises(LinkedTransferFailed) as failed:
            remote.transfer_linked([TransferRequest("l0", "a", "b", 5), TransferRequest("l1", "b", "a", 50)])
        assert failed.value.index == 1 and isinstance(failed.value.cause, InsufficientFunds)
        assert remote.get_transfer("big") is None and remote.get_transfer("nothing") is None
        assert isinstance(remote.get_transfer("fund"), Transfer)
        assert sorted(a.id for a in remote.accounts()) == ["a", "b", "bank"]
        assert remote.fault_count == 0


@pytest.mark.timeout(30)
def test_the_client_counts_a_status_that_does_not_fit_its_code_as_a_fault(stand_in: StandIn) -> None:
    stand_in.statuses["insufficient_funds"] = 500
    with RemoteLedger(stand_in.url) as remote:
        remote.create_accounts([Account("bank", "USD", None), Account("a", "USD", 0)])
        with pytest.raises(UnexpectedReply, match="500 'insufficient_funds'"):
            remote.transfer("big", source="a", destination="bank", amount=1)
        assert remote.fault_count == 1


@pytest.mark.timeout(30)
def test_the_client_reads_an_accounts_entries_a_page_at_a_time(stand_in: StandIn,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("engine._remote.ENTRIES_PAGE_SIZE", 2)
    with RemoteLedger(stand_in.url) as remote:
        remote.create_accounts([Account("bank", "USD", None), Account("a", "USD", 0)])
        for k in range(5):
            remote.transfer(f"t{k}", source="bank", destination="a", amount=k + 1)
        assert remote.entries("a") == stand_in.ledger.entries("a") and len(remote.entries("a")) == 5
        assert remote.entries("a", after=1, limit=3) == stand_in.ledger.entries("a", 1, 3)


@pytest.mark.timeout(60)
def test_a_server_that_does_not_mark_its_replays_fails_the_contract_check(stand_in: StandIn) -> None:
    stand_in.marks_replays = False
    done = tally("stress", "--url", stand_in.url, "--accounts", "10", "--clients", "2", "--transfers", "100",
                 "--retry-rate", "0.2")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "✗ every reply kept the HTTP contract" in done.stdout
    assert "its replay is not marked Idempotency-Replayed: true" in done.stdout


def test_a_request_no_connection_could_carry_is_not_sent_and_not_one_to_learn() -> None:
    """A server down refuses the connection: nothing was sent, so nothing was written
    (`NotSent`). Such a request is not resent before the audit (a server down a few seconds
    left tens of thousands, whose resends one by one outlasted the run's wait and failed it);
    one whose reply was lost is."""
    from engine._auditor import Replies
    from engine._remote_replies import NotSent, ServerUnreachable
    from engine._sending import _record_reply
    from engine._workload import Op

    with RemoteLedger(f"http://127.0.0.1:{free_port()}") as ledger:
        with pytest.raises(NotSent, match="nothing was sent"):
            ledger.transfer("t", source="a", destination="b", amount=1)
    replies = Replies()
    _record_reply(replies, Op("t1", "a", "b", 1, False), NotSent("refused"))
    _record_reply(replies, Op("t2", "a", "b", 1, False, kind="pending", resolution="post"),
                  (NotSent("refused"), None))
    assert replies.unknown == []
    lost = Op("t3", "a", "b", 1, False)
    _record_reply(replies, lost, ServerUnreachable("the reply was lost"))
    assert replies.unknown == [lost]


def test_a_resend_no_connection_could_carry_leaves_the_outcome_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A request whose first reply was lost may have landed: a resend that meets a server still
    down (no connection: `NotSent`) tells nothing of it, and it stays one to learn."""
    from engine._auditor import Replies
    from engine._remote_replies import NotSent, ServerUnreachable
    from engine._sending import _record_reply, learn_outcomes
    from engine._workload import Op

    class Down:
        def transfer_many(self, requests: Any) -> list[Any]:
            return [NotSent("refused") for _ in requests]

        def transfer(self, *args: Any, **kwargs: Any) -> Any:
            raise NotSent("refused")

    replies = Replies()
    lost = Op("t", "a", "b", 1, False)
    _record_reply(replies, lost, ServerUnreachable("the reply was lost"))
    monkeypatch.setattr("engine._sending.RESEND_BACKOFF_S", (0.0,))
    learn_outcomes(Down(), replies)
    assert replies.unknown == [lost] and "t" not in replies.acknowledged
