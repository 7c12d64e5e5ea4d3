"""The `tally` command line's parser: its commands, options and argument types, and their limits.

Each argument type turns a word of the command line into a value or a one-line usage error
(`argparse.ArgumentTypeError`, exit 2), and each limit is a constant here (`STRESS_*_MAX`; an
LSN's is the journal's, `journal.LSN_MAX`). `engine._cli` (`main`) parses with `command_parser`
and runs the command; the reports are rendered by `engine._cli_render`, `tally stress` run by
`engine._cli_stress`.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

from coordinator import AMOUNT_MAX, InvalidRequest, check_path, shown

from journal import LSN_MAX

from engine import __version__
from engine._cli_render import printable
from engine._workload import MIXES, RETRY_RATE_DEFAULT

STRESS_CLIENTS_MAX = 1024
"""The most client threads `tally stress` starts (each a thread of this process)."""
STRESS_ACCOUNTS_MAX = 1_000_000
"""The most accounts `tally stress` opens (each named and funded in this process's memory first)."""
STRESS_BATCH_MAX = 10_000
"""The largest `tally stress --batch` (each batch's ops are built in memory before it is sent)."""


_WHOLE = re.compile(r"-?[0-9]+")
"""A whole number on the command line: the digits 0-9 alone (a minus before them, to be told it
is below a minimum). Python's `int` also reads `1_0` as 10, ` 3`, `+3` and another script's
digits as 3: a slip taken as if another number had been meant."""


def _whole(text: str) -> int:
    if _WHOLE.fullmatch(text) is None:
        raise argparse.ArgumentTypeError(f"{shown(text)} is not a whole number (the digits 0-9 alone)")
    try:
        return int(text)
    except ValueError:  # more digits than Python turns into an int
        raise argparse.ArgumentTypeError(f"a number of {len(text.lstrip('-')):,} digits is out of range") from None


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = _whole(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{shown(value)} is below the minimum of {minimum}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"{shown(value)} is above the maximum of {maximum}")
        return value

    return parse


def _path(text: str) -> str:
    """A directory or file name the tools can use (see `coordinator.check_path`)."""
    try:
        return check_path(text)
    except InvalidRequest as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit 2), like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(printable(f"{self.prog}: {message}"), file=sys.stderr)
        raise SystemExit(2)


def _url(text: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        bad = parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query
        parts.port  # noqa: B018 (a port out of range raises here)
    except ValueError:  # e.g. an unclosed [IPv6 address
        bad = True
    if bad:
        raise argparse.ArgumentTypeError(f"{shown(_no_userinfo(text))} is not a server's URL (http://HOST:PORT)")
    if parts.username is not None or parts.password is not None:  # httpx would send it as Basic auth
        raise argparse.ArgumentTypeError(f"{shown(_no_userinfo(text))} holds a user name or password: give the "
                                         "server's bearer token with --token-file instead")
    return text


def _no_userinfo(url: str) -> str:
    """`url` with all before its last `@` shown as `…` (a password is never echoed, however the
    rest is spelled)."""
    return f"…@{url.rpartition('@')[2]}" if "@" in url else url


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 0 and below 1")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0.0 < value <= 86_400:
        raise argparse.ArgumentTypeError(f"{value} must be above 0 and at most a day")
    return value


_FRACTION = re.compile(r"([Tt ]\d\d(?::?\d\d){2})[.,](\d+)")
"""Seconds' fraction in an ISO 8601 time: up to nanoseconds, which `datetime` does not hold."""


def _instant(text: str) -> int:
    """An ISO 8601 time as nanoseconds since the epoch (UTC when it gives no offset), to the
    nanosecond: a record's time as `tally balance` prints it reads back as that record's."""
    given, nanoseconds = text, 0
    fraction = _FRACTION.search(text)
    if fraction is not None:
        digits = fraction.group(2)
        if len(digits) > 9:
            raise argparse.ArgumentTypeError(f"{given!r} gives a time finer than a nanosecond")
        nanoseconds = int(digits.ljust(9, "0"))
        text = text[:fraction.start()] + fraction.group(1) + text[fraction.end():]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{given!r} is not an ISO 8601 time (e.g. 2026-12-05T10:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    since = moment - datetime(1970, 1, 1, tzinfo=timezone.utc)
    if since < timedelta(0):
        raise argparse.ArgumentTypeError(f"{given!r} is before 1970")
    return since // timedelta(microseconds=1) * 1000 + nanoseconds  # (a fraction not taken above: microseconds)


def _head(text: str) -> Any:
    """A head, `LSN:DIGEST` (see `engine._tools_audit.parse_head`)."""
    from engine._tools_audit import parse_head

    try:
        return parse_head(text)
    except InvalidRequest as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def command_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tally", description="Tally: an embeddable, actor-based, journaled ledger engine.")
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, path: bool = True,
                json_help: str = "print the report as JSON") -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if path:
            sub.add_argument("path", metavar="PATH", type=_path, help="the ledger directory")
        sub.add_argument("--json", action="store_true", help=json_help)
        return sub

    stress = command("stress", "fire concurrent transfers at a ledger and verify the books", path=False)
    stress.add_argument("--path", type=_path, help="ledger directory to use or create (default: a temporary one)")
    stress.add_argument("--accounts", type=_count(2, STRESS_ACCOUNTS_MAX), default=1000,
                        help=f"accounts to open (default 1000, at most {STRESS_ACCOUNTS_MAX:,})")
    stress.add_argument("--clients", type=_count(1, STRESS_CLIENTS_MAX), default=16,
                        help=f"concurrent client threads (default 16, at most {STRESS_CLIENTS_MAX:,})")
    amount = stress.add_mutually_exclusive_group()
    amount.add_argument("--transfers", type=_count(1), default=None, help="transfers to fire (default 30000)")
    amount.add_argument("--duration", type=_seconds, default=None, metavar="S", help="fire for S seconds instead")
    stress.add_argument("--mix", choices=MIXES, default="uniform", help="account choice (hotspot: 10%% of accounts take 90%%)")
    stress.add_argument("--amount-max", type=_count(1, AMOUNT_MAX), default=500, help="largest amount (default 500)")
    stress.add_argument("--batch", type=_count(1, STRESS_BATCH_MAX), default=1, metavar="N",
                        help=f"send transfer_many batches of N (at most {STRESS_BATCH_MAX:,})")
    stress.add_argument("--retry-rate", type=_rate, default=None, metavar="R",
                        help=f"resubmit this fraction with the same id (default {RETRY_RATE_DEFAULT:g}); a quarter of them with "
                             "another amount, which must be refused idempotency_conflict")
    stress.add_argument("--pending-rate", type=_rate, default=0.0, metavar="R",
                        help="share of transfers made pending, then posted (all or part), voided, let expire "
                             "or left open (default 0)")
    stress.add_argument("--linked-rate", type=_rate, default=0.0, metavar="R",
                        help="share of transfers made linked chains of 2 or 3 legs (default 0)")
    stress.add_argument("--seed", type=_whole, default=1, help="workload seed (default 1)")
    stress.add_argument("--chaos", action="store_true",
                        help="run the engine in a child process and SIGKILL it, round after round (single transfers"
                             " one at a time; --transfers N: the last round, unkilled, fires N / (kills + 1))")
    stress.add_argument("--kills", type=_count(1), default=None, metavar="N", help="with --chaos: kills (default 20)")
    stress.add_argument("--url", type=_url, default=None, metavar="URL",
                        help="drive the `tally serve` at URL over HTTP instead (e.g. http://127.0.0.1:8000); the audit"
                             " covers the accounts and transfers this run makes")
    stress.add_argument("--token-file", type=_path, default=None, metavar="F",
                        help="with --url: a file holding the server's bearer token")
    stress.add_argument("--report", metavar="FILE", type=_path, help="write a throughput and latency plot (.html or .png)")

    verify = command("verify", "read-only audit of every journal record, the hash chain and every invariant; never writes")
    verify.add_argument("--expect-head", metavar="LSN:DIGEST", type=_head, default=None,
                        help="also prove the ledger still extends this head (as an earlier verify printed it)")
    recover = command("recover", "after a crash: verify, rebuild, resolve, checkpoint, and report")
    recover.add_argument("--dry-run", action="store_true", help="change nothing; say what would be done")
    recover.add_argument("--salvage", action="store_true", help="copy the verifiable records before the first corrupt one")
    recover.add_argument("--into", metavar="NEW", type=_path, help="with --salvage: the new ledger directory")
    replay = command("replay", "replay the journal into a fresh ledger through the engine and compare state hashes")
    replay.add_argument("--into", metavar="NEW", type=_path, required=True, help="a new, empty ledger directory")
    inspect = command("inspect", "the journal as readable lines")
    inspect.add_argument("--from", dest="start", type=_count(1, LSN_MAX), default=1, metavar="LSN",
                         help="first LSN to show")
    inspect.add_argument("--limit", type=_count(1), default=None, metavar="N", help="show at most N records")
    inspect.add_argument("--transfer", metavar="ID", help="only records of this transfer")
    inspect.add_argument("--account", metavar="ID", help="only records touching this account")
    balance = command("balance", "an account's balance (now, or at an LSN or a time), read-only")
    balance.add_argument("account", metavar="ACCOUNT", help="the account's id")
    at = balance.add_mutually_exclusive_group()
    at.add_argument("--at-lsn", type=_count(0, LSN_MAX), default=None, metavar="N",
                    help="the balance after the record at LSN N")
    at.add_argument("--at", type=_instant, default=None, metavar="TIME",
                    help="the balance at TIME, ISO 8601 (e.g. 2026-12-05T10:00:00Z; UTC if no offset is given)")
    history = command("history", "an account's latest entries and transfers, read-only")
    history.add_argument("account", metavar="ACCOUNT", help="the account's id")
    history.add_argument("--limit", type=_count(1), default=20, metavar="N", help="latest N entries (default 20)")
    tail = command("tail", "the stream of events as lines, read-only: beside a live writer, never taking its lock",
                   json_help="print each event as a JSON object, one a line")
    tail.add_argument("--from-lsn", dest="from_lsn", type=_count(0, LSN_MAX), default=0, metavar="N",
                      help="the events after LSN N (default 0: all); resume with the LSN of the last one processed")
    tail.add_argument("--follow", action="store_true", help="then wait for new events, until interrupted")
    _serve_parser(commands)
    return parser


def _serve_parser(commands: Any) -> None:
    from engine._serve import BODY_BYTES_MAX

    text = "serve the ledger over HTTP (JSON; FastAPI and uvicorn: pip install 'tally-ledger[serve]')"
    serve = commands.add_parser("serve", help=text, description=text)
    serve.add_argument("path", metavar="PATH", type=_path, help="the ledger directory (created if missing)")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_count(0, 65535), default=8000, help="port (default 8000; 0: a free one)")
    serve.add_argument("--token-file", metavar="F", type=_path, default=None,
                       help="a file holding a bearer token that every request but /health must send")
    serve.add_argument("--insecure", action="store_true",
                       help="allow a non-loopback --host without --token-file (anyone who reaches it can move money)")
    serve.add_argument("--body-bytes-max", type=_count(1024, 1 << 30), default=BODY_BYTES_MAX, metavar="N",
                       help=f"largest request body in bytes (default {BODY_BYTES_MAX:,}); larger is 413")
    serve.add_argument("--no-access-log", action="store_true", help="do not log a line per request")
