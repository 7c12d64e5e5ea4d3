"""HTTP transfers/s at 64 clients: `tally serve` vs in-process `Ledger` vs FastAPI + SQLite, in one run.

    python bench/bench_serve.py [--clients 64] [--transfers 4000] [--accounts 1000] [--rounds 5]
                                [--client httpx|stdlib] [--json out.json]

Three services get the same seeded workload of uniform random pairs, a round at a time, one
after another (their order turns round by round):
- `tally-http`: `tally serve` in a subprocess on a free loopback port (its own ledger, no token),
  `POST /transfers` with `Idempotency-Key`;
- `ledger`: an in-process `Ledger` (`bench_engine.TallyBench`), `ledger.transfer` from as many
  threads: the engine without HTTP;
- `sqlite-http`: `bench/sqlite_service.py` (FastAPI + SQLite, WAL, synchronous=FULL, the
  balance check and the updates in one transaction, the same JSON) under uvicorn in a
  subprocess, run as `tally serve` runs uvicorn (one worker, no access log).
Both HTTP services are driven by the same client: one thread per client, each with its own
`httpx.Client` (one keep-alive connection, opened and warmed before the clock starts), in this
process; `--client stdlib` gives each thread an `http.client.HTTPConnection` instead, which
costs a fraction of httpx's CPU a request. That client is Python too and shares the machine with the servers, so the HTTP rates
are of the client and the server together; read the ratios of the same round: `tally-http /
ledger` (what HTTP costs) and `tally-http / sqlite-http` (against the plain service). Medians
over the rounds, with their range; latency is per request (the medians of the rounds' p50 and
p99). CPU per transfer is shown for this process (the clients; for `ledger`, clients and
engine) and for the server's process (from /proc), to say which side a rate is bound by.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_engine import TallyBench, run_clients, workload, write_json  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
STARTUP_S = 60.0
REQUEST_TIMEOUT_S = 60.0
FUNDING = 10**12
SERVICES = ("tally-http", "ledger", "sqlite-http")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process `pid` so far (Linux /proc; 0.0 elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def server(command: list[str], env: dict[str, str] | None = None) -> Iterator[tuple[str, int]]:
    """Start `command` (a server taking `--port`), wait for `GET /health`, yield its URL and
    pid; SIGTERM at the end."""
    port = free_port()
    process = subprocess.Popen([*command, "--port", str(port)], env={**os.environ, **(env or {})},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_S
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:4]} exited with {process.returncode}: {process.communicate()[1]}")
            try:
                if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:4]} not healthy within {STARTUP_S} s")
            time.sleep(0.05)  # polling another process's startup: no event to wait on
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=60)


class HttpxConnection:
    """An `httpx.Client` holding one keep-alive connection."""

    def __init__(self, url: str) -> None:
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        self.client = httpx.Client(base_url=url, limits=limits, timeout=REQUEST_TIMEOUT_S)
        self.warm()

    def warm(self) -> None:
        """A `GET /health`, reconnecting if the server closed the idle connection."""
        self.client.get("/health").raise_for_status()

    def post(self, path: str, key: str, body: dict) -> tuple[int, str]:
        response = self.client.post(path, json=body, headers={"Idempotency-Key": key})
        return response.status_code, response.text

    def close(self) -> None:
        self.client.close()


class StdlibConnection:
    """One keep-alive `http.client.HTTPConnection`: the lightest Python client (`--client stdlib`)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                                     timeout=REQUEST_TIMEOUT_S)
        self.warm()

    def warm(self) -> None:
        """A `GET /health`, reconnecting if the server closed the idle connection (uvicorn does
        after 5 s; http.client only learns it when a request fails)."""
        for attempt in range(2):
            try:
                self.connection.request("GET", "/health")
                response = self.connection.getresponse()
                response.read()
                break
            except (OSError, http.client.HTTPException):
                self.connection.close()  # the next request opens a new connection
                if attempt:
                    raise
        if response.status != 200:
            raise RuntimeError(f"GET /health: {response.status}")

    def post(self, path: str, key: str, body: dict) -> tuple[int, str]:
        # bytes, so headers and body leave in one send (no Nagle and delayed-ACK stall)
        self.connection.request("POST", path, json.dumps(body).encode(),
                                {"Content-Type": "application/json", "Idempotency-Key": key})
        response = self.connection.getresponse()
        return response.status, response.read().decode()

    def close(self) -> None:
        self.connection.close()


CLIENTS: dict[str, type[HttpxConnection] | type[StdlibConnection]] = {"httpx": HttpxConnection,
                                                                      "stdlib": StdlibConnection}


class HttpClients:
    """`clients` connections of one kind (`CLIENTS`), warmed; connection n serves `run_clients`' thread n."""

    def __init__(self, url: str, clients: int, kind: str) -> None:
        self.pool = [CLIENTS[kind](url) for _ in range(clients)]

    def close(self) -> None:
        for connection in self.pool:
            connection.close()

    def warm(self) -> None:
        """Every connection open and answered, before a round's clock starts."""
        for connection in self.pool:
            connection.warm()

    def post(self, k: int, path: str, key: str, body: dict) -> None:
        """POST on connection k's; a refusal (422) is an outcome, anything else not 2xx a bug here."""
        status, text = self.pool[k % len(self.pool)].post(path, key, body)
        if status >= 300 and status != 422:
            raise RuntimeError(f"POST {path} {key}: {status} {text[:200]}")

    def setup(self, names: list[str]) -> None:
        """Open the accounts and fund them, every client at work."""
        everyone = [*names, "bank"]
        run_clients(len(self.pool), [(n, 0, 0) for n in range(len(everyone))], lambda k, n, _s, _a: self.post(
            k, "/accounts", everyone[n], {"id": everyone[n], "currency": "USD",
                                          "overdraft_limit": None if everyone[n] == "bank" else 0}))
        run_clients(len(self.pool), [(n, 0, 0) for n in range(len(names))], lambda k, n, _s, _a: self.post(
            k, "/transfers", f"fund-{n}", {"source": "bank", "destination": names[n], "amount": FUNDING}))

    def call(self, names: list[str], prefix: str) -> Callable[[int, int, int, int], None]:
        def transfer(k: int, source: int, destination: int, amount: int) -> None:
            self.post(k, "/transfers", f"{prefix}-{k}",
                      {"source": names[source], "destination": names[destination], "amount": amount})

        return transfer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--transfers", type=int, default=4_000, help="per service and round")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--client", choices=sorted(CLIENTS), default="httpx",
                        help="the HTTP client of both servers (default httpx; stdlib: http.client, lighter)")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    names = [f"a{n}" for n in range(args.accounts)]
    rates: dict[str, list[float]] = {service: [] for service in SERVICES}
    latencies: dict[str, list[dict]] = {service: [] for service in SERVICES}
    uvicorn = [sys.executable, "-m", "uvicorn", "sqlite_service:app", "--app-dir", BENCH_DIR, "--host", "127.0.0.1",
               "--workers", "1", "--no-access-log", "--log-level", "warning"]
    with tempfile.TemporaryDirectory(prefix="tally-bench-serve-", dir=os.environ.get("TALLY_BENCH_DIR")) as scratch, \
            server([sys.executable, "-m", "engine", "serve", os.path.join(scratch, "served"), "--host",
                    "127.0.0.1", "--no-access-log"]) as (tally_url, tally_pid), \
            server(uvicorn, {"TALLY_BENCH_SQLITE": os.path.join(scratch, "ledger.sqlite")}) as (sqlite_url, sqlite_pid):
        print(f"setting up {args.accounts} accounts in each service...", file=sys.stderr, flush=True)
        tally_http = HttpClients(tally_url, args.clients, args.client)
        sqlite_http = HttpClients(sqlite_url, args.clients, args.client)
        tally_http.setup(names)
        sqlite_http.setup(names)
        ledger = TallyBench(os.path.join(scratch, "ledger"), args.accounts)
        calls = {"tally-http": lambda prefix: tally_http.call(names, prefix), "ledger": ledger.call,
                 "sqlite-http": lambda prefix: sqlite_http.call(names, prefix)}
        pids = {"tally-http": tally_pid, "ledger": None, "sqlite-http": sqlite_pid}
        pools = {"tally-http": tally_http, "ledger": None, "sqlite-http": sqlite_http}
        try:
            for round_ in range(args.rounds):
                work = workload(args.accounts, args.transfers, "uniform", args.seed + round_)
                order = SERVICES[round_ % 3:] + SERVICES[: round_ % 3]
                for service in order:
                    pid, pool = pids[service], pools[service]
                    if pool is not None:
                        pool.warm()
                    before = (time.process_time(), cpu_s(pid) if pid is not None else 0.0)
                    result = run_clients(args.clients, work, calls[service](f"r{round_}"))
                    result["client_cpu_us"] = round((time.process_time() - before[0]) / len(work) * 1e6, 1)
                    result["server_cpu_us"] = round((cpu_s(pid) - before[1]) / len(work) * 1e6, 1) \
                        if pid is not None else None
                    rates[service].append(result["transfers_per_s"])
                    latencies[service].append(result)
                print(f"round {round_ + 1}: " + ", ".join(f"{s} {rates[s][-1]:,.0f}/s" for s in SERVICES),
                      file=sys.stderr, flush=True)
        finally:
            ledger.ledger.close()
            tally_http.close()
            sqlite_http.close()
    result = summarize(args, rates, latencies)
    write_json(args.json, result)
    return 0


def summarize(args: argparse.Namespace, rates: dict[str, list[float]], latencies: dict[str, list[dict]]) -> dict:
    """Print the table, and return it as a dict: medians [ranges], and the per-round ratios."""
    print(f"\n{args.clients} clients ({args.client}), {args.transfers:,} transfers per service and round,"
          f" {args.rounds} rounds, {args.accounts:,} accounts, uniform pairs")
    print(f"{'service':<12} {'transfers/s':>11} {'range':>17} {'p50 ms':>7} {'p99 ms':>7} {'client CPU us':>14}"
          f" {'server CPU us':>14}   (medians of the rounds; CPU a transfer)")
    services = {}
    for service in SERVICES:
        rounds = latencies[service]
        p50, p99 = (round(statistics.median(r[name] for r in rounds), 2) for name in ("p50_ms", "p99_ms"))
        client_cpu = round(statistics.median(r["client_cpu_us"] for r in rounds))
        server_cpu = None if rounds[0]["server_cpu_us"] is None else \
            round(statistics.median(r["server_cpu_us"] for r in rounds))
        services[service] = {"transfers_per_s": rates[service], "median": statistics.median(rates[service]),
                             "p50_ms": p50, "p99_ms": p99, "client_cpu_us": client_cpu, "server_cpu_us": server_cpu,
                             "rounds": rounds}
        print(f"{service:<12} {statistics.median(rates[service]):>11,.0f} {min(rates[service]):>8,.0f}-"
              f"{max(rates[service]):<8,.0f} {p50:>7} {p99:>7} {client_cpu:>14}"
              f" {'-' if server_cpu is None else server_cpu:>14}")
    ratios = {}
    for top, bottom in (("tally-http", "ledger"), ("tally-http", "sqlite-http"), ("sqlite-http", "ledger")):
        paired = [a / b for a, b in zip(rates[top], rates[bottom], strict=True)]
        ratios[f"{top} / {bottom}"] = {"per_round": paired, "median": statistics.median(paired)}
        print(f"{top + ' / ' + bottom:<26} {statistics.median(paired):>6.2f} [{min(paired):.2f}-{max(paired):.2f}]"
              "  (median of the per-round ratios [range])")
    return {"clients": args.clients, "client": args.client, "transfers": args.transfers, "accounts": args.accounts, "rounds": args.rounds,
            "services": services, "ratios": ratios, "python": sys.version.split()[0], "time": time.time()}


if __name__ == "__main__":
    sys.exit(main())
