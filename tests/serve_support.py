"""A real `tally serve` process for the tests: started on a free loopback port, waited for by
its readiness line, stopped by a signal, its output kept in files (never a pipe that could
fill and stall it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
START_S_MAX = 30.0
"""Longest a server may take to say it serves (importing FastAPI, opening the ledger)."""
STOP_S_MAX = 30.0
"""Longest a server may take to exit after SIGTERM or SIGKILL."""
POLL_S = 0.01
HTTP_TIMEOUT_S = 30.0


def _environment() -> dict[str, str]:
    known = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) if not known else f"{ROOT}{os.pathsep}{known}")


def run_tally(*args: str | Path, timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    """`python -m engine ARGS` to its end (bounded), for the commands that fail at once."""
    return subprocess.run([sys.executable, "-m", "engine", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout_s, cwd=ROOT, env=_environment())


class Server:
    """`tally serve PATH --port 0 ARGS` in a child process. `url` once it serves."""

    def __init__(self, path: Path, logs: Path, *args: str | Path) -> None:
        self.path = path
        logs.mkdir(parents=True, exist_ok=True)
        self.out = logs / f"serve-{time.monotonic_ns()}.out"
        self.err = self.out.with_suffix(".err")
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "engine", "serve", str(path), "--port", "0", "--no-access-log", *map(str, args)],
                stdout=out, stderr=err, cwd=ROOT, env=_environment())
        self.url = self._wait_ready()

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + START_S_MAX
        while time.monotonic() < deadline:
            for line in self.out.read_text().splitlines():
                if line.startswith("tally serve: serving "):
                    return line.split(" on ", 1)[1].split(" ", 1)[0]
            if self.process.poll() is not None:
                raise AssertionError(f"tally serve exited {self.process.returncode}: {self.err.read_text()}")
            time.sleep(POLL_S)
        self.process.kill()
        raise AssertionError(f"tally serve did not start in {START_S_MAX} s: {self.err.read_text()}")

    def client(self, token: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=HTTP_TIMEOUT_S)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send `sig` and wait for the exit; its status."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=STOP_S_MAX)

    @property
    def stderr(self) -> str:
        return self.err.read_text()


def write(client: httpx.Client, path: str, key: str | bytes | None, body: object = None) -> httpx.Response:
    """A POST with its Idempotency-Key (None: without one; bytes: as they are, e.g. UTF-8) and a
    JSON body (None: none)."""
    headers: dict[str, str | bytes] = {} if key is None else {"Idempotency-Key": key}
    if body is None:
        return client.post(path, headers=headers)
    return client.post(path, headers=headers, json=body)


def error_of(response: httpx.Response) -> dict[str, object]:
    """The `error` object of a JSON error answer (after checking it is one)."""
    assert response.headers["content-type"].startswith("application/json"), response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert {"code", "message"} <= set(body["error"]), body
    error: dict[str, object] = body["error"]
    return error
