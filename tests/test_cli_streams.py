"""The `tally` command's output streams and interrupts, run as a real process: a report
printed whatever the output's encoding, and Ctrl-C ending a command with one line and 130."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from engine import Ledger, TransferRequest

from tests.test_cli import ROOT, tally

BLOCKED_WAIT_S = 30.0
"""The longest a test waits for a `tally` process to block, or to end once interrupted."""

ASCII_OUTPUT = {"PYTHONIOENCODING": "ascii"}
"""An output that cannot encode a check's mark nor an id outside ASCII (strict, as Python
takes the variable)."""


@pytest.fixture
def non_ascii(tmp_path: Path) -> Path:
    """A closed ledger with an account and a transfer whose ids are not ASCII."""
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("ünï", currency="USD")
        ledger.transfer("t-ü", source="bank", destination="ünï", amount=5)
    return path


@pytest.mark.timeout(60)
def test_verify_on_an_output_that_cannot_encode_its_marks_prints_them_in_ascii_and_exits_0(non_ascii: Path) -> None:
    done = tally("verify", non_ascii, env=ASCII_OUTPUT)

    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "  ok   money is conserved (posted balances sum to 0)\n" in done.stdout
    assert done.stdout.endswith("  verdict: whole\n")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", [["inspect"], ["balance", "ünï"], ["history", "ünï"], ["tail"]])
def test_a_report_naming_an_id_its_output_cannot_encode_shows_it_escaped_and_exits_0(
        non_ascii: Path, command: list[str]) -> None:
    done = tally(command[0], non_ascii, *command[1:], env=ASCII_OUTPUT)

    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "\\xfcn\\xef" in done.stdout


def _blocked_in_a_write(pid: int) -> bool:
    """Whether process `pid` waits in a write to a pipe, as Linux's /proc tells (`pipe_write`,
    `anon_pipe_write`; `pipe_wait` on older kernels); where it cannot tell, taken as so: the
    caller has seen the pipe filled."""
    try:
        return "pipe" in Path(f"/proc/{pid}/wchan").read_text()
    except OSError:
        return True


@pytest.mark.timeout(60)
@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="a pipe's size is set on Linux only")
@pytest.mark.parametrize("buffered", ["", "1"], ids=["buffered", "unbuffered"])
def test_ctrl_c_ends_a_tail_blocked_on_a_full_pipe_with_exit_130(tmp_path: Path, buffered: str) -> None:
    """Without --follow, Ctrl-C ends `tally tail` as it ends every command (exit 130,
    "interrupted"), its output being cut short; and it does so while its write waits on a
    reader that reads no more, which once retried that write forever."""
    path = tmp_path / "ledger"
    with Ledger.open(path) as ledger:
        ledger.create_account("bank", currency="USD", overdraft_limit=None)
        ledger.create_account("alice", currency="USD")
        ledger.transfer_many([TransferRequest(f"t-{n}", "bank", "alice", 1) for n in range(200)])
    reading, writing = os.pipe()
    fcntl.fcntl(reading, fcntl.F_SETPIPE_SZ, 4096)  # a page: filled by some 50 events of the 202
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED=buffered)
    tail = subprocess.Popen([sys.executable, "-m", "engine", "tail", str(path)], stdout=writing,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    os.close(writing)
    try:
        with os.fdopen(reading, "rb") as output:
            assert output.readline().split()[:1] == [b"1"]  # the first event: it runs, its handler set
            deadline = time.monotonic() + BLOCKED_WAIT_S
            while not _blocked_in_a_write(tail.pid):  # (a state of the other process: nothing to wait on)
                assert time.monotonic() < deadline, "tally tail never filled the pipe"
                time.sleep(0.01)
            tail.send_signal(signal.SIGINT)
            _, err = tail.communicate(timeout=BLOCKED_WAIT_S)
    finally:
        if tail.poll() is None:
            tail.kill()
            tail.wait(timeout=BLOCKED_WAIT_S)

    assert (tail.returncode, err) == (130, "tally tail: interrupted\n")


IN_PROCESS_TAIL = """
import signal, sys
from engine import _cli, _follow

shown = _follow.event_line


def line(event):  # Ctrl-C as the first event is written
    signal.raise_signal(signal.SIGINT)
    return shown(event)


_follow.event_line = line
code = _cli.main(["tail", sys.argv[1]])
print(f"main returned {code}", flush=True)
"""


@pytest.mark.timeout(60)
def test_a_tail_interrupted_in_process_gives_its_caller_back_its_output(non_ascii: Path) -> None:
    """`engine._cli.main` called by a program whose output is a pipe: the null device `tail`
    points it at once interrupted is the program's output no longer when `main` returns."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", IN_PROCESS_TAIL, str(non_ascii)], capture_output=True, text=True,
                          check=False, env=env, cwd=ROOT, timeout=BLOCKED_WAIT_S)

    assert (done.returncode, done.stderr) == (0, "tally tail: interrupted\n"), done.stderr
    assert done.stdout.endswith("main returned 130\n"), done.stdout


@pytest.mark.timeout(60)
@pytest.mark.parametrize("output", [{"PYTHONIOENCODING": "ascii:surrogateescape"},
                                    {"LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}],
                         ids=["surrogateescape", "the C locale, UTF-8 mode off"])
def test_a_report_on_an_output_that_smuggles_bytes_shows_an_id_it_cannot_encode_escaped(
        non_ascii: Path, output: dict[str, str]) -> None:
    """Python writes its output with `surrogateescape` in the C locale: a character that is no
    smuggled byte still fails there, as with `strict` (no id nor path a tool takes holds one)."""
    done = tally("inspect", non_ascii, env=output)

    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert "\\xfcn\\xef" in done.stdout
