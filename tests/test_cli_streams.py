"""The `tally` command's output streams and interrupts, run as a real process: a report
printed whatever the output's encoding, and Ctrl-C ending a command with one line and 130."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine import Ledger

from tests.test_cli import tally

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
