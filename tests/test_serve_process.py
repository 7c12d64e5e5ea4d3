"""`tally serve` as a process: auth, what it refuses to start with, 64 concurrent clients with
the books audited through the API, SIGKILL under load (every 2xx transfer survives), SIGTERM
(drains, ends the event streams, exits 0, the ledger whole); and, in process, the JSON 500 of
a bug and the 503 of a closed ledger."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import fields
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine import Ledger, LedgerUnavailable
from journal._seal import SEAL_FILE
from serve_support import HTTP_TIMEOUT_S, ROOT, STOP_S_MAX, Server, error_of, run_tally, write

pytestmark = pytest.mark.timeout(180)

LOAD_THREADS = 16
"""Client threads of the kill and stop tests."""
ACKNOWLEDGED_BEFORE_SIGNAL = 150
"""2xx transfers the kill and stop tests wait for before they signal the server."""
WAIT_S_MAX = 60.0


def open_books(client: httpx.Client, accounts: int, each: int) -> list[str]:
    """A bank (no bound) and `accounts` customers holding `each` from it; the customers' ids."""
    assert write(client, "/accounts", "bank", {"currency": "USD", "overdraft_limit": None}).status_code == 201
    names = [f"c{i}" for i in range(accounts)]
    for name in names:
        assert write(client, "/accounts", name, {"currency": "USD"}).status_code == 201
        assert write(client, "/transfers", f"fund-{name}", {"source": "bank", "destination": name,
                                                            "amount": each}).status_code == 201
    return names


# --- auth and refusals to start ----------------------------------------------------------------


def test_with_a_token_every_route_but_health_needs_it(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    server = Server(tmp_path / "books", tmp_path, "--host", "0.0.0.0", "--token-file", token_file)
    try:
        url = server.url.replace("0.0.0.0", "127.0.0.1")
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S) as anonymous:
            assert anonymous.get("/health").json() == {"status": "ok"}
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer s3cret-token2"},
                            {"Authorization": "Basic s3cret-token"}, {"Authorization": "s3cret-token"},
                            {"Authorization": "Bearer\ts3cret-token"}, {"Authorization": "Bearer"}):
                for method, path in (("GET", "/accounts/bank"), ("POST", "/transfers"), ("GET", "/events"),
                                     ("GET", "/openapi.json"), ("GET", "/nowhere")):
                    refused = anonymous.request(method, path, headers=headers)
                    assert refused.status_code == 401, (method, path, headers)
                    assert error_of(refused)["code"] == "unauthorized"
                    assert refused.headers["www-authenticate"] == "Bearer"
            refused = anonymous.post("/accounts", headers={"Idempotency-Key": "bank"}, json={"currency": "USD"})
            assert refused.status_code == 401
        with httpx.Client(base_url=url, timeout=HTTP_TIMEOUT_S,
                          headers={"Authorization": "Bearer s3cret-token"}) as client:
            assert write(client, "/accounts", "bank", {"currency": "USD"}).status_code == 201
            assert client.get("/accounts/bank").status_code == 200
            for scheme in ("bearer ", "BEARER ", "Bearer   "):  # a scheme is case-insensitive; 1*SP after it
                assert client.get("/accounts/bank", headers={"Authorization": f"{scheme}s3cret-token"}).status_code == 200
            schema = client.get("/openapi.json").json()  # says so, for generated clients
            assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
            assert schema["security"] == [{"bearer": []}] and schema["paths"]["/health"]["get"]["security"] == []
    finally:
        assert server.stop() == 0


def test_a_non_loopback_host_without_a_token_is_refused_before_the_ledger_opens(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::"):
        refused = run_tally("serve", tmp_path / "books", "--host", host, "--port", "0")
        assert refused.returncode == 2
        assert "--token-file" in refused.stderr and "--insecure" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "books").exists()
    server = Server(tmp_path / "books", tmp_path, "--host", "0.0.0.0", "--insecure")
    try:
        with httpx.Client(base_url=server.url.replace("0.0.0.0", "127.0.0.1")) as client:
            assert client.get("/health").status_code == 200
    finally:
        assert server.stop() == 0


def test_a_locked_ledger_or_a_taken_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    with Ledger.open(tmp_path / "books"):
        locked = run_tally("serve", tmp_path / "books", "--port", "0")
    assert locked.returncode == 2
    assert locked.stderr.strip().splitlines()[-1].startswith("tally serve: ")
    assert "Traceback" not in locked.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = run_tally("serve", tmp_path / "other", "--port", str(port))
    assert busy.returncode == 2 and busy.stderr.startswith("tally serve: cannot listen on 127.0.0.1:")
    assert not (tmp_path / "other").exists()
    for bad in ("", "two words", "\N{SNOWMAN}"):
        (tmp_path / "token").write_text(bad)
        refused = run_tally("serve", tmp_path / "books", "--token-file", tmp_path / "token")
        assert refused.returncode == 2 and "--token-file" in refused.stderr


def test_without_the_serve_extra_the_command_says_what_to_install(tmp_path: Path) -> None:
    hidden = "import sys; [sys.modules.__setitem__(name, None) for name in ('fastapi', 'uvicorn')];"
    done = subprocess.run([sys.executable, "-c", hidden + "from engine._cli import main; "
                           f"sys.exit(main(['serve', {str(tmp_path / 'books')!r}]))"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2
    assert "pip install 'tally-ledger[serve]'" in done.stderr and "Traceback" not in done.stderr
    plain = subprocess.run([sys.executable, "-c", "import sys; [sys.modules.__setitem__(name, None) for name in "
                            "('fastapi', 'uvicorn', 'starlette', 'pydantic')]; import engine; print(engine.Ledger)"],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert plain.returncode == 0, plain.stderr


# --- load ----------------------------------------------------------------------------------------


def test_64_concurrent_clients_move_money_and_the_books_balance(tmp_path: Path) -> None:
    server = Server(tmp_path / "books", tmp_path)
    try:
        with server.client() as client:
            customers = open_books(client, 24, 1_000)
        outcomes: Counter[tuple[int, str]] = Counter()
        moved: list[dict[str, Any]] = []
        lock = threading.Lock()

        def one_client(seed: int) -> None:
            rng = random.Random(seed)
            with server.client() as mine:
                for n in range(20):
                    source, destination = rng.sample(customers, 2)
                    key, body = f"t-{seed}-{n}", {"source": source, "destination": destination,
                                                  "amount": rng.randint(1, 300)}
                    answers = [write(mine, "/transfers", key, body) for _ in range(1 + (rng.random() < 0.1))]
                    with lock:
                        for answer in answers:
                            outcomes[(answer.status_code, answer.headers.get("idempotency-replayed", ""))] += 1
                        if answers[0].status_code == 201:
                            moved.append(answers[0].json())
                        assert all(a.status_code in (201, 422) for a in answers), answers[-1].text
                        assert all(a.json() == answers[0].json() for a in answers)

        _run_threads(one_client, 64)
        assert outcomes[(201, "")] == len(moved) > 100
        with server.client() as client:
            expected = {name: 1_000 for name in customers}
            for made in moved:
                expected[made["source"]] -= made["amount"]
                expected[made["destination"]] += made["amount"]
            posted = {name: client.get(f"/accounts/{name}/balance").json()["posted"] for name in customers}
            assert posted == expected
            assert sum(posted.values()) + client.get("/accounts/bank/balance").json()["posted"] == 0
            listed = _all_transfers(client)
            assert {made["id"] for made in moved} <= {made["id"] for made in listed}
            assert len(listed) == len(moved) + len(customers)
    finally:
        assert server.stop() == 0


def _all_transfers(client: httpx.Client) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = []
    while True:
        page = client.get("/transfers", params={"after_lsn": listed[-1]["lsn"] if listed else 0,
                                                "limit": 1000}).json()["transfers"]
        if not page:
            return listed
        listed.extend(page)


def _run_threads(work: Callable[[int], None], count: int) -> None:
    """`work(i)` on `count` threads; re-raises the first failure."""
    failures: list[BaseException] = []

    def guarded(i: int) -> None:
        try:
            work(i)
        except BaseException as failure:  # reported by the test's thread
            failures.append(failure)

    threads = [threading.Thread(target=guarded, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S_MAX)
        assert not thread.is_alive()
    if failures:
        raise failures[0]


class Load:
    """`LOAD_THREADS` clients moving money until the server goes away; every 2xx kept."""

    def __init__(self, server: Server, customers: list[str]) -> None:
        self.acknowledged: list[dict[str, Any]] = []
        self.statuses: Counter[int] = Counter()
        self.enough = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._client, args=(server, customers, i)) for i in
                         range(LOAD_THREADS)]
        for thread in self._threads:
            thread.start()

    def _client(self, server: Server, customers: list[str], seed: int) -> None:
        rng = random.Random(seed)
        with server.client() as client:
            for n in range(100_000):
                source, destination = rng.sample(customers, 2)
                try:
                    answer = write(client, "/transfers", f"l-{seed}-{n}", {"source": source,
                                                                           "destination": destination,
                                                                           "amount": rng.randint(1, 50)})
                except httpx.TransportError:  # the server is gone (killed) or stopping
                    return
                with self._lock:
                    self.statuses[answer.status_code] += 1
                    if answer.status_code == 201:
                        self.acknowledged.append(answer.json())
                        if len(self.acknowledged) >= ACKNOWLEDGED_BEFORE_SIGNAL:
                            self.enough.set()

    def join(self) -> None:
        for thread in self._threads:
            thread.join(WAIT_S_MAX)
            assert not thread.is_alive()


def _check_acknowledged_survive(path: Path, acknowledged: list[dict[str, Any]], customers: list[str]) -> None:
    with Ledger.open(path) as ledger:
        for made in acknowledged:
            found = ledger.get_transfer(made["id"])
            assert found is not None, made
            assert {field.name: getattr(found, field.name) for field in fields(found)} == made
        total = sum(ledger.balance(name).posted for name in customers) + ledger.balance("bank").posted
        assert total == 0


@pytest.mark.slow
def test_sigkill_under_load_loses_no_acknowledged_transfer(tmp_path: Path) -> None:
    server = Server(tmp_path / "books", tmp_path)
    with server.client() as client:
        customers = open_books(client, 32, 10_000)
    load = Load(server, customers)
    try:
        assert load.enough.wait(WAIT_S_MAX)
    finally:
        assert server.stop(signal.SIGKILL) == -signal.SIGKILL
        load.join()
    assert len(load.acknowledged) >= ACKNOWLEDGED_BEFORE_SIGNAL
    _check_acknowledged_survive(tmp_path / "books", load.acknowledged, customers)


def test_sigterm_drains_ends_the_streams_closes_the_ledger_and_exits_0(tmp_path: Path) -> None:
    server = Server(tmp_path / "books", tmp_path)
    with server.client() as client:
        customers = open_books(client, 32, 10_000)
    streamed: list[str] = []
    listening = threading.Event()

    def follow() -> None:
        with server.client() as client, client.stream("GET", "/events") as stream:
            listening.set()
            streamed.extend(stream.iter_lines())  # ends when the server ends the stream

    follower = threading.Thread(target=follow)
    follower.start()
    assert listening.wait(WAIT_S_MAX)
    load = Load(server, customers)
    try:
        assert load.enough.wait(WAIT_S_MAX)
    finally:
        status = server.stop(signal.SIGTERM)
        load.join()
        follower.join(WAIT_S_MAX)
    assert status == 0
    assert not follower.is_alive()
    assert any(line.startswith("id: ") for line in streamed)
    assert set(load.statuses) <= {201, 422}, load.statuses  # in flight at the signal: finished, not failed
    assert "Traceback" not in server.stderr and "ERROR" not in server.stderr, server.stderr
    assert (tmp_path / "books" / SEAL_FILE).exists()  # closed cleanly: the next open need not walk the file
    _check_acknowledged_survive(tmp_path / "books", load.acknowledged, customers)
    verified = run_tally("verify", tmp_path / "books", "--json")
    assert verified.returncode == 0 and json.loads(verified.stdout)["verdict"] == "whole"


@contextmanager
def _stalled_write(server: Server) -> Iterator[socket.socket]:
    """A connection to `server` holding a write that sent its headers and not its body, once
    the server has it in (it answers another request meanwhile)."""
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT_S_MAX) as stalled:
        stalled.sendall(b"POST /accounts HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                        b"Idempotency-Key: a1\r\nContent-Length: 20\r\n\r\n")
        with server.client() as client:
            assert client.get("/health").status_code == 200
        yield stalled


def test_sigterm_answers_a_request_still_waiting_for_its_body_at_once(tmp_path: Path) -> None:
    """A client that sent a write's headers and not its body must not hold the stop for the
    graceful wait: it is answered 503 (JSON, nothing done) and the server exits 0."""
    server = Server(tmp_path / "books", tmp_path)
    with _stalled_write(server) as stalled:
        assert server.stop(signal.SIGTERM) == 0
        answer = b""
        while chunk := stalled.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503"), answer
    assert json.loads(body)["error"]["code"] == "ledger_closed"
    with Ledger.open(tmp_path / "books") as ledger:
        assert ledger.accounts() == []


def test_sigterm_closes_an_event_stream_whose_client_stopped_reading_without_the_graceful_wait(
        tmp_path: Path) -> None:
    """An event stream's client that stops reading leaves the server's socket full: its last
    bytes would never drain, and uvicorn would wait for them until its graceful shutdown (35 s)
    gave up. The connection is closed once its bytes have not moved for `STALLED_S`."""
    from engine import Account
    from engine._serve import GRACEFUL_SHUTDOWN_S

    socket_bytes_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    accounts = max(60_000, 2 * socket_bytes_max // 150)  # ~150 bytes an event: twice what a socket holds
    with Ledger.open(tmp_path / "books") as ledger:
        made = ledger.create_accounts([Account(f"customer-{n:06}", "USD", 0) for n in range(accounts)])
        assert all(isinstance(account, Account) for account in made)
    server = Server(tmp_path / "books", tmp_path)
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    with socket.socket() as stuck:
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.settimeout(WAIT_S_MAX)
        stuck.connect((host, int(port)))
        stuck.sendall(b"GET /events?follow=true HTTP/1.1\r\nHost: x\r\n\r\n")
        assert stuck.recv(1, socket.MSG_PEEK)  # the stream began; the client reads no more of it
        _wait_until_the_server_cannot_send(int(port), stuck.getsockname()[1])
        with server.client() as client:  # the server answers others meanwhile
            assert client.get("/health").status_code == 200
        # (without the watch, the whole graceful wait, longer than `stop`'s own bound, which then fails)
        assert STOP_S_MAX < GRACEFUL_SHUTDOWN_S and server.stop(signal.SIGTERM) == 0
    assert "its client stopped reading" in server.stderr, server.stderr
    assert "Traceback" not in server.stderr and "ERROR" not in server.stderr, server.stderr


def _wait_until_the_server_cannot_send(server_port: int, client_port: int) -> None:
    """Until the server's socket toward `client_port` holds bytes the client does not take
    (its send queue, in /proc/net/tcp, grown past 64 KiB and still for 0.2 s)."""
    def queued() -> int:
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            local, remote, _state, queues = line.split()[1:5]
            if int(local.split(":")[1], 16) == server_port and int(remote.split(":")[1], 16) == client_port:
                return int(queues.split(":")[0], 16)
        return 0

    deadline = time.monotonic() + WAIT_S_MAX
    last = -1
    while time.monotonic() < deadline:
        now = queued()
        if now >= 64 * 1024 and now == last:
            return
        last = now
        time.sleep(0.2)
    raise AssertionError(f"the server's send queue toward the stalled client never filled (last {last} bytes)")


def test_ctrl_c_stops_it_as_sigterm_does(tmp_path: Path) -> None:
    server = Server(tmp_path / "books", tmp_path)
    with server.client() as client:
        assert write(client, "/accounts", "bank", {"currency": "USD"}).status_code == 201
    assert server.stop(signal.SIGINT) == 0
    assert "Traceback" not in server.stderr
    with Ledger.open(tmp_path / "books") as ledger:
        assert [account.id for account in ledger.accounts()] == ["bank"]


SECOND_SIGNAL_TRIES = 4
"""Tries of the second-Ctrl-C case (see its test)."""


def _logged(server: Server, line: str) -> bool:
    """Until `line` is in the server's stderr (polled, bounded): whether it came."""
    deadline = time.monotonic() + WAIT_S_MAX
    while time.monotonic() < deadline:
        if line in server.stderr:
            return True
        if server.process.poll() is not None:
            return line in server.stderr
        time.sleep(0.01)
    return False


def test_a_second_ctrl_c_stops_at_once_closes_the_ledger_and_says_so_in_one_line(tmp_path: Path) -> None:
    """A second Ctrl-C while the stop waits for a request under way (one still waiting for its
    body): uvicorn stopped waiting, skipped the application's shutdown, and the loop's end
    cancelled the request and the lifespan, a `CancelledError` traceback each in the log.
    Now the request is cancelled quietly, the ledger still closes (sealed), one line says so,
    and the exit status is an interrupted command's, 130.

    The stop waits for that request `BODY_READ_STOPPING_S` (1 s); a second signal that lands
    after it (a loaded machine) meets a server that has stopped as after one Ctrl-C, exit 0:
    that try did not reach the case, and another is made (each outcome is checked in full)."""
    for attempt in range(SECOND_SIGNAL_TRIES):
        server = Server(tmp_path / f"books-{attempt}", tmp_path)
        with _stalled_write(server):
            server.process.send_signal(signal.SIGINT)
            assert _logged(server, "Waiting for connections to close"), server.stderr  # (the request holds the stop)
            status = server.stop(signal.SIGINT)
        stderr = server.stderr
        assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
        said = [line for line in stderr.splitlines() if line.startswith("tally serve:")]
        if status == 0 and not said:  # the stop was over before the second signal: not this case, try again
            continue
        assert status == 130, stderr
        assert said == ["tally serve: stopped at once (a second Ctrl-C): 1 request under way cancelled (a retry "
                        "with the same Idempotency-Key learns each outcome); the ledger closed"], stderr
        assert (tmp_path / f"books-{attempt}" / SEAL_FILE).exists()  # closed as a clean close does
        with Ledger.open(tmp_path / f"books-{attempt}") as ledger:
            assert ledger.accounts() == []
        return
    raise AssertionError(f"in {SECOND_SIGNAL_TRIES} tries, no second Ctrl-C landed within the 1 s the stop waited")


# --- in process: a bug, a closed ledger --------------------------------------------------------


def _in_process(tmp_path: Path, work: Callable[[Any, httpx.AsyncClient], Awaitable[None]],
                **ledger_options: Any) -> None:
    """`work(app, client)` against `make_app` in this process, its lifespan run around it."""
    from engine._serve import make_app

    async def run() -> None:
        app = make_app(tmp_path / "books", **ledger_options)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
                await work(app, client)

    asyncio.run(run())


def test_an_unexpected_error_is_a_json_500_without_internals(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    async def broken(*_args: object, **_kwargs: object) -> object:
        raise RuntimeError("secret internals")

    async def work(app: Any, client: httpx.AsyncClient) -> None:
        app.state.ledger.transfer = broken
        answer = await client.post("/transfers", headers={"Idempotency-Key": "t"},
                                   json={"source": "a", "destination": "b", "amount": 1})
        assert answer.status_code == 500
        assert answer.json() == {"error": {"code": "internal_error",
                                           "message": "the server met an unexpected error; it is logged"}}

    _in_process(tmp_path, work)
    assert "secret internals" in caplog.text


def test_a_closed_ledger_is_503_and_health_says_so(tmp_path: Path) -> None:
    async def work(app: Any, client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).status_code == 200
        await app.state.ledger.close()
        answer = await client.post("/accounts", headers={"Idempotency-Key": "a"}, json={"currency": "USD"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "ledger_closed"
        assert (await client.get("/accounts/a")).status_code == 503
        assert (await client.get("/health")).status_code == 503

    _in_process(tmp_path, work)


def test_health_is_503_once_the_journal_failed_and_every_write_is_refused(tmp_path: Path) -> None:
    """A full disk fails the journal: every write is refused until the ledger is reopened, so
    `/health` says so (a supervisor restarts the server), not 200."""
    async def work(app: Any, client: httpx.AsyncClient) -> None:
        assert (await client.get("/health")).status_code == 200 and app.state.ledger.failure is None
        app.state.ledger._ledger._journal.refuse_writes("a stand-in for a full disk")
        assert isinstance(app.state.ledger.failure, LedgerUnavailable)
        answer = await client.post("/accounts", headers={"Idempotency-Key": "a"}, json={"currency": "USD"})
        assert answer.status_code == 503 and answer.json()["error"]["code"] == "ledger_unavailable"
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["error"]["code"] == "ledger_unavailable"
        assert "a stand-in for a full disk" in health.json()["error"]["message"]

    _in_process(tmp_path, work)


def test_a_write_to_a_read_only_ledger_is_no_refusal_and_no_replay(tmp_path: Path) -> None:
    """`make_app(path, readonly=True)` (a reader beside the process that writes): a write is
    `read_only_ledger`, nothing done, which is no refusal the journal keeps: not a 422, and a
    key whose transfer the writer committed is not answered as a replayed refusal of it; a
    405 (this application takes no write, ever), not a 503 a client would retry."""
    with Ledger.open(tmp_path / "books") as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("a", currency="USD")
        ledger.transfer("t-1", source="bank", destination="a", amount=5)

    async def work(app: Any, client: httpx.AsyncClient) -> None:
        for key, path, body, reads in (
                ("t-1", "/transfers", {"source": "bank", "destination": "a", "amount": 5}, "GET"),
                ("t-2", "/transfers", {"source": "bank", "destination": "a", "amount": 5}, "GET"),
                ("a", "/accounts", {"currency": "USD"}, "")):  # (no read at /accounts: `Allow` names none)
            answer = await client.post(path, headers={"Idempotency-Key": key}, json=body)
            assert answer.json()["error"]["code"] == "read_only_ledger"
            assert answer.status_code == 405 and answer.headers["allow"] == reads, (key, answer.status_code)
            assert "idempotency-replayed" not in answer.headers, key
        assert (await client.get("/transfers/t-1")).json()["status"] == "posted"

    _in_process(tmp_path, work, readonly=True)


def test_the_guard_answers_503_overloaded_past_its_requests_in_flight() -> None:
    from engine._serve_app import Guard

    release = asyncio.Event()
    answers: list[dict[str, Any]] = []

    async def held(_scope: Any, _receive: Any, _send: Any) -> None:
        await release.wait()

    async def send(message: dict[str, Any]) -> None:
        answers.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def run() -> None:
        guard = Guard(held, token=None, body_bytes_max=1024, requests_in_flight_max=2)
        scope = {"type": "http", "path": "/accounts", "headers": []}
        first = [asyncio.ensure_future(guard(scope, receive, send)) for _ in range(2)]
        await asyncio.sleep(0)  # both enter the application and hold there
        await guard(scope, receive, send)
        assert answers[0]["status"] == 503 and json.loads(answers[1]["body"])["error"]["code"] == "overloaded"
        answers.clear()
        health = asyncio.ensure_future(guard({"type": "http", "path": "/health", "headers": []}, receive, send))
        await asyncio.sleep(0)
        assert answers == [] and not health.done()  # the liveness probe reached the application all the same
        release.set()
        await health
        await asyncio.gather(*first)
        assert guard.in_flight == 0
        answers.clear()
        await guard(scope, receive, send)
        assert answers == []  # the application answered (here: nothing), not the guard

    asyncio.run(run())
