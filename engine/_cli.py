"""The `tally` command line: the stress harness, the recovery tool, and read-only views.

Every command prints a report for people, or with `--json` for machines. An
error is one line on stderr (no traceback) and a non-zero exit: 1 when the
ledger is not whole (or a check failed), 2 when the command could not run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

from coordinator import (
    AMOUNT_MAX,
    CHECK_FILE,
    AccountNotFound,
    InvalidRequest,
    JournalCorrupted,
    LedgerError,
    NotALedger,
    check_id,
    check_path,
    shown,
)

from engine import __version__
from engine._workload import MIXES, RETRY_RATE_DEFAULT

LSN_MAX = 2**64 - 1
"""The largest LSN a journal key holds."""
STRESS_CLIENTS_MAX = 1024
"""The most client threads `tally stress` starts (each a thread of this process)."""
STRESS_ACCOUNTS_MAX = 1_000_000
"""The most accounts `tally stress` opens (each named and funded in this process's memory first)."""
STRESS_BATCH_MAX = 10_000
"""The largest `tally stress --batch` (each batch's ops are built in memory before it is sent)."""


def _count(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            digits = text.strip().lstrip("+-").replace("_", "")
            if digits.isdecimal():  # more digits than Python turns into an int
                raise argparse.ArgumentTypeError(f"a number of {len(digits):,} digits is out of range") from None
            raise argparse.ArgumentTypeError(f"{shown(text)} is not a whole number") from None
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
        print(f"{self.prog}: {message}", file=sys.stderr)
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


def _said_at(message: str, at: int, account: str, unknown: bool) -> str:
    """The API's refusal of a balance at a time, as `--at` put it: its times in ISO 8601
    rather than nanoseconds, the flag's name rather than the argument's."""
    named = repr(account)  # the account's id, kept as it is even if it looks like a timestamp
    message = named.join(re.sub(r"\b\d{18,19}\b", lambda found: _shown_instant(int(found.group())), part)
                         for part in message.split(named))
    given = _shown_instant(at) if at else "1970-01-01T00:00:00Z"  # a time given, never "no timestamp"
    message = message.replace(f"at_timestamp {_shown_instant(at)}", f"--at {given}")
    return f"account {account!r} did not exist yet at {given} ({message})" if unknown else message


def _shown_instant(timestamp: int) -> str:
    """Nanoseconds since the epoch as an ISO 8601 UTC time, to the nanosecond (which `--at`
    reads back: a time cut to the microsecond would come before the record it names)."""
    if not timestamp:
        return "no timestamp"
    seconds, nanoseconds = divmod(timestamp, 1_000_000_000)
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{nanoseconds:09d}" if nanoseconds else "") + "Z"


def _head(text: str) -> Any:
    """A head, `LSN:DIGEST` (see `engine._tools_audit.parse_head`)."""
    from engine._tools_audit import parse_head

    try:
        return parse_head(text)
    except InvalidRequest as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tally", description="Tally: an embeddable, actor-based, journaled ledger engine.")
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, path: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if path:
            sub.add_argument("path", metavar="PATH", type=_path, help="the ledger directory")
        sub.add_argument("--json", action="store_true", help="print the report as JSON")
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
    stress.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
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
    tail = command("tail", "the stream of events as lines, read-only: beside a live writer, never taking its lock")
    tail.add_argument("--from-lsn", dest="from_lsn", type=_count(0, LSN_MAX - 1), default=0, metavar="N",
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


@contextmanager
def _progress(label: str, enabled: bool) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr for long scans, only when stderr is a terminal."""
    if not enabled or not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(label, total=None)
        yield lambda lsn: progress.update(task, completed=lsn, description=f"{label} (LSN {lsn:,})")


def _print_checks(report: dict[str, Any]) -> None:
    for check, passed in report["checks"].items():
        mark = "✓" if passed else ("✗" if passed is False else "·")
        print(f"  {mark} {check}")


def _print_chain(report: dict[str, Any]) -> None:
    """The head and the chain's status (which records predate it, where it breaks)."""
    head, chain = report.get("head"), report.get("chain")
    if head is not None and chain is not None:
        _print_head(head, chain)
    expected = report.get("expect_head")
    if expected is not None:
        if expected["extends"]:
            print(f"  expected head {expected['lsn']}:{expected['digest']}: extended (the history up to it is unchanged)")
        else:
            print(f"  expected head: NOT extended: {expected['problem']}")


def _print_head(head: dict[str, Any], chain: dict[str, Any]) -> None:
    if chain["break_lsn"] is None:
        print(f"  head: {head['lsn']}:{head['digest']}  (LSN:DIGEST; note it, and pass it to --expect-head later)")
    else:  # not a head to note: the chain does not vouch for it
        print(f"  head: {head['lsn']}:{head['digest']}  (LSN:DIGEST of the last record read; the chain is broken)")
    unchained = chain["unchained_lsns"]
    if unchained:
        print(f"  chain: LSN {unchained[0]} to {unchained[1]} predate the chain (written before it, this ledger being"
              f" of format {chain['format_version']}): their checksums are checked, they are not chained")
    if chain["chained_from"] is None:
        print("  chain: no record is chained yet (the next one written starts it)")
    elif chain["break_lsn"] is None:
        print(f"  chain: intact ({chain['hash']}) from LSN {chain['chained_from']} to {head['lsn']}")
    else:
        print(f"  chain: BROKEN at LSN {chain['break_lsn']}: {chain['problem']}")


def _render_audit(title: str, report: dict[str, Any]) -> None:
    print(f"{title} {report['path']}")
    if report["last_lsn"] is None:
        print("  the journal could not be read: its data file is damaged")
    else:
        print(f"  records scanned {report['records_scanned']}, last LSN {report['last_lsn']}, accounts {report['accounts']}")
        print(f"  transfers: committed {report['transfers_committed']}, rejected {report['transfers_rejected']}")
    _print_chain(report)
    _print_checks(report)
    if report["problem"]:
        print(f"  problem: {report['problem']}")
    state_hash = report["state_hash"] or "none (the books were not rebuilt: see above)"
    print(f"  elapsed {report['elapsed_s']} s, state hash {state_hash}")
    print(f"  verdict: {report['verdict']}")


def _run(args: argparse.Namespace) -> int:
    from engine import _tools_audit, _tools_copy, _tools_read

    if args.command == "stress":
        return _stress(args)
    if args.command == "serve":
        from engine._serve import run_command

        return run_command(args)
    if args.command == "verify":
        with _progress("verifying", not args.json) as progress:
            report = _tools_audit.verify(args.path, progress, args.expect_head)
        _emit(args, report, lambda: _render_audit("verify", report))
        return 0 if report["verdict"] == "whole" else 1
    if args.command == "recover":
        return _recover(args)
    if args.command == "replay":
        with _progress("replaying", not args.json) as progress:
            report = _tools_copy.replay(args.path, args.into, progress)
        _emit(args, report, lambda: _render_replay(report))
        return 0 if report["verdict"] == "identical" else 1
    if args.command == "inspect":
        report = _tools_read.inspect(args.path, args.start, args.limit, args.transfer, args.account)
        _emit(args, report, lambda: _render_inspect(report, args.transfer, args.start))
        return 1 if report["problem"] else 0
    if args.command == "tail":
        return _tail(args)
    if args.command == "balance":
        try:
            report = _tools_read.balance(args.path, args.account, args.at_lsn, args.at)
        except (InvalidRequest, AccountNotFound) as error:
            opened_later = type(error) is AccountNotFound and "was opened at LSN" in str(error)
            if args.at is None or (type(error) is AccountNotFound and not opened_later):
                raise
            raise type(error)(_said_at(str(error), args.at, args.account, opened_later)) from error
        where = (f" ({report['entries']} entries, last LSN {report['last_lsn']})" if "at_lsn" not in report else
                 f" at LSN {report['at_lsn']} ({_shown_instant(report['at_timestamp'])})")
        _emit(args, report, lambda: print(
            f"{report['account']}: posted {report['posted']} {report['currency']}, pending {report['pending']}, "
            f"available {report['available']}, incoming {report['incoming']}{where}"))
        return 0
    report = _tools_read.history(args.path, args.account, args.limit)
    _emit(args, report, lambda: _render_history(report))
    return 0


TAIL_IDLE_S = 0.25
"""How long `tally tail --follow` waits for an event before it looks whether Ctrl-C was pressed."""


def _tail(args: argparse.Namespace) -> int:
    """`tally tail`: one line per event (one JSON object with `--json`), each flushed as it is
    written, for a pipe. Ctrl-C ends it quietly, exit 0, after the line it is writing (or
    within `TAIL_IDLE_S` of waiting). Ctrl-C only sets a flag here: raised as an exception
    wherever the interpreter happened to be, it could land inside a lock's acquire or
    release and leave the lock held, and closing the ledger would then wait for it forever."""
    from engine import Ledger
    from engine._follow import event_line
    from engine._json import jsonable

    interrupted: list[bool] = []
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, lambda _signal, _frame: interrupted.append(True))
    try:
        with Ledger.open(args.path, readonly=True) as ledger:
            after = args.from_lsn
            while not interrupted:
                for event in ledger.events(after, follow=args.follow, timeout_s=TAIL_IDLE_S if args.follow else None):
                    line = json.dumps(jsonable(event), separators=(",", ":")) if args.json else event_line(event)
                    print(line, flush=True)
                    after = event.lsn
                    if interrupted:
                        break
                if not args.follow:
                    break
    except KeyboardInterrupt:  # not the main thread: the interpreter's own handling
        pass
    finally:
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
    return 0


def _recover(args: argparse.Namespace) -> int:
    from engine import _tools_audit, _tools_copy

    if args.salvage:
        if not args.into:
            print("tally recover: --salvage needs --into NEW", file=sys.stderr)
            return 2
        if args.dry_run:
            print("tally recover: --dry-run does not go with --salvage, which writes a new ledger into NEW and "
                  f"never changes {args.path}; `tally verify {args.path}` says where its damage starts", file=sys.stderr)
            return 2
        with _progress("salvaging", not args.json) as progress:
            report = _tools_copy.salvage(args.path, args.into, progress)
        _emit(args, report, lambda: _render_salvage(report))
        return 0 if report["whole"] else 1  # NEW holds what was saved; the ledger it came from was not whole
    if args.into:
        print("tally recover: --into NEW goes with --salvage (recover works in place)", file=sys.stderr)
        return 2
    with _progress("recovering", not args.json) as progress:
        report = _tools_audit.recover(args.path, args.dry_run, progress)

    def render() -> None:
        _render_audit("recover" + (" (dry run)" if args.dry_run else ""), report)
        last = report.get("last_record")
        if last:
            print(f"  the last durable record: LSN {last['lsn']}, {last['kind']} {_named(last)}")
        print("  in doubt: none on disk (reservations are never journaled; a commit record carries both entries);"
              " transfers in flight at the crash left no record, were never acknowledged, and run afresh if retried")
        print("  aborted by recovery: 0, finished by recovery: 0")
        newest = f"LSN {report['checkpoint_lsn']}" if report["checkpoint_lsn"] else "none yet"
        print(f"  records past the newest checkpoint ({newest}): {report['replayed_past_checkpoint']}")
        if "checkpoint_written_at" in report:
            print(f"  wrote a checkpoint at LSN {report['checkpoint_written_at']}: the next open replays nothing")
        if "anchor_written_at" in report:
            print(f"  wrote a new anchor at LSN {report['anchor_written_at']}: this journal, as it is, is the ledger's")
        if "would_write_anchor_at" in report:
            print(f"  would write a new anchor at LSN {report['would_write_anchor_at']} (the anchor is missing)")
        if "would_write_checkpoint_at" in report:
            print(f"  would write a checkpoint at LSN {report['would_write_checkpoint_at']}")
        if "would_write_anchor_at" in report:  # the journal is whole: recovering in place mends it
            print(f"  nothing was changed. `tally recover {args.path}` writes the anchor (the journal, as it is,"
                  " becomes the ledger's)")
        elif report["verdict"] != "whole" and report["checks"].get(CHECK_FILE) is False:
            print("  the data file is damaged, or is not the one its anchor names: nothing was changed. Restore the"
                  " ledger from a backup; or, if this file holds the history to keep (a copy that went on elsewhere),"
                  f" remove {args.path}/tally.anchor and run `tally recover {args.path}` (README.md, \"Damage\")")
        elif report["verdict"] != "whole":
            print(f"  the ledger is not whole: nothing was changed. `tally recover {args.path} --salvage --into NEW`"
                  " copies what precedes the damage.")

    _emit(args, report, render)
    return 0 if report["verdict"] == "whole" else 1


def _named(row: dict[str, Any]) -> str:
    """What a record of `tally inspect`'s rows is about, in a few words."""
    if row.get("transfer") or row.get("account"):
        return str(row.get("transfer") or row.get("account"))
    if "legs" in row:
        return f"of a linked chain of {len(row['legs'])} ({row['legs'][0]['transfer']}, ...)"
    if "pending_ids" in row:
        count = len(row["pending_ids"])
        return f"of {count} pending transfer{'s' if count != 1 else ''}"
    return f"of {row.get('accounts')} accounts"


class _Terminated(KeyboardInterrupt):
    """SIGTERM during `tally stress`, raised in the main thread as Ctrl-C's interrupt is (the
    engine treats both alike): the run stops, its ledger is closed and a temporary one removed."""


def _terminate(_signal: int, _frame: Any) -> None:
    raise _Terminated


def _stress(args: argparse.Namespace) -> int:
    if threading.current_thread() is not threading.main_thread():  # (only the main thread sets a handler)
        return _run_stress(args)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        return _run_stress(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_stress(args: argparse.Namespace) -> int:
    from coordinator import ledger_errors
    from journal import refuse_foreign

    from engine._stress import StressConfig, run_stress
    from engine._stress_remote import read_token, refuse_remote_misfits, run_remote_stress

    refuse_remote_misfits(args)
    if args.path is not None and os.path.exists(args.path):
        if not os.path.isdir(args.path):
            raise NotALedger(f"{args.path} is a file, not a ledger directory")
        with ledger_errors():  # the rule `Ledger.open` applies, before the run starts
            refuse_foreign(args.path)
    if args.kills is not None and not args.chaos:
        raise InvalidRequest("--kills goes with --chaos")
    if args.chaos:
        misfits = [flag for flag, given in (("--pending-rate", args.pending_rate), ("--linked-rate", args.linked_rate),
                                            ("--duration", args.duration is not None), ("--batch", args.batch != 1),
                                            ("--retry-rate", args.retry_rate is not None)) if given]
        if misfits:
            raise InvalidRequest(f"--chaos fires single transfers one at a time, each once, for a number of kills: "
                                 f"drop {', '.join(misfits)}, or --chaos")
    if args.retry_rate is None:
        args.retry_rate = RETRY_RATE_DEFAULT
    if args.pending_rate + args.linked_rate + args.retry_rate >= 1.0:
        raise InvalidRequest(f"--pending-rate, --linked-rate and --retry-rate add up to "
                             f"{args.pending_rate + args.linked_rate + args.retry_rate:g}: they must leave room for "
                             "single transfers (below 1)")
    if args.report:
        _refuse_report_target(args.report)  # before the run, not after it
    transfers = args.transfers if args.duration is None else None
    config = StressConfig(path=args.path, accounts=args.accounts, clients=args.clients,
                          transfers=transfers if transfers is not None or args.duration else 30_000,
                          duration_s=args.duration, mix=args.mix, amount_max=args.amount_max, batch=args.batch,
                          retry_rate=args.retry_rate, pending_rate=args.pending_rate, linked_rate=args.linked_rate,
                          seed=args.seed, url=args.url)
    chaos = None
    if args.url is not None:
        try:
            import httpx  # noqa: F401 - only to say what is missing before the run
        except ModuleNotFoundError:
            raise InvalidRequest("--url needs httpx: pip install 'tally-ledger[serve]'") from None

        report = run_remote_stress(config, read_token(args.token_file), progress=not args.json)
    elif args.chaos:
        import tempfile

        from engine._chaos import run_chaos

        kills = 20 if args.kills is None else args.kills
        if config.path is None:
            with tempfile.TemporaryDirectory(prefix="tally-chaos-") as scratch:
                config.path = scratch
                report, chaos = run_chaos(config, kills, progress=not args.json)
                config.path = None
        else:
            report, chaos = run_chaos(config, kills, progress=not args.json)
    else:
        report = run_stress(config, progress=not args.json)
    summary = report.summary()
    if chaos is not None:
        summary["chaos"] = chaos
    unwritten = None
    if args.report:
        from engine._plot import write_report

        try:
            write_report(report.samples, summary, args.report)
        except OSError as error:  # the figures and the verdict are printed all the same
            unwritten = f"--report {args.report!r} was not written: {error}"
    _emit(args, summary, lambda: _render_stress(summary, args, written=unwritten is None))
    if unwritten is not None:
        print(f"tally stress: {unwritten}", file=sys.stderr)
    if summary["verdict"] != "ok":
        return 1
    return 0 if unwritten is None else 2


def _refuse_report_target(path: str) -> None:
    """What would keep `--report` from being written, refused before the run: a name that is not
    .html or .png, a directory, a place that cannot be written, matplotlib missing."""
    import importlib.util

    if not path.endswith((".html", ".png")):
        raise InvalidRequest(f"--report takes a .html or .png file name, got {path!r}")
    where = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(where):
        raise InvalidRequest(f"--report {path!r}: no such directory to write it in")
    if os.path.isdir(path):
        raise InvalidRequest(f"--report {path!r} is a directory: name a file")
    if not os.access(path if os.path.exists(path) else where, os.W_OK):
        raise InvalidRequest(f"--report {path!r}: not writable")
    if importlib.util.find_spec("matplotlib") is None:
        raise InvalidRequest("--report needs matplotlib: pip install 'tally-ledger[report]'")


def _render_stress(summary: dict[str, Any], args: argparse.Namespace, written: bool = True) -> None:
    config = summary["config"]
    shape = "" if "chaos" in summary else f", batch {config['batch']}, retry rate {config['retry_rate']}"
    if config["pending_rate"] or config["linked_rate"]:
        shape += f", pending rate {config['pending_rate']}, linked rate {config['linked_rate']}"
    print(f"tally stress: {config['clients']} clients, {config['accounts']} accounts, mix {config['mix']}{shape},"
          f" seed {config['seed']}")
    unanswered = summary["transfers_unanswered"]
    answered = f" ({summary['transfers_sent'] - unanswered:,} answered)" if unanswered else ""
    print(f"  {summary['transfers_sent']:,} transfers{answered} in {summary['elapsed_s']} s ="
          f" {summary['transfers_per_s']:,.0f} durable transfers/s")
    if unanswered:
        print(f"  no answer (server unreachable): {unanswered:,}, in neither the rate nor the latencies")
    lat = summary["latency_ms"]
    if "chaos" not in summary:
        print(f"  latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
    print("  outcomes: " + ", ".join(f"{code} {count:,}" for code, count in sorted(summary["outcomes"].items())))
    retries = summary.get("retries")
    if retries and retries["sent"]:
        print(f"  retries: {retries['sent']:,}, of which {retries['differing']:,} with another amount "
              "(each must be refused idempotency_conflict)")
    resent = summary.get("resent")
    if resent and resent["sent"]:
        print(f"  sent again, as no reply told their outcome: {resent['sent']:,}; still unknown: {resent['still_unknown']:,}")
    if "chaos" in summary:
        chaos = summary["chaos"]
        print(f"  chaos: {chaos['kills']} kills, survived {chaos['kills_survived']},"
              f" acknowledged {chaos['acknowledged']:,}, lost {chaos['lost']}")
        if "child_failure" in chaos:
            print("  chaos stopped at " + chaos["child_failure"].replace("\n", "\n    | "))
    remote = summary.get("remote")
    if remote is not None:
        print(f"  server {remote['url']}, ids of this run start {remote['run_prefix']}-")
        for fault in remote["faults"]:
            print(f"  outside the HTTP contract: {fault}")
        if remote["fault_count"] > len(remote["faults"]):
            print(f"  ... and {remote['fault_count'] - len(remote['faults'])} more replies outside it")
        for what, shown_what in (("accounts", "accounts the run opened"), ("transfers", "acknowledged transfers")):
            if remote[f"{what}_gone_count"]:
                more = remote[f"{what}_gone_count"] - len(remote[f"{what}_gone"])
                print(f"  {shown_what} the server no longer has: {remote[f'{what}_gone_count']:,}: "
                      + ", ".join(remote[f"{what}_gone"]) + (f" and {more:,} more" if more else ""))
    _print_checks(summary)
    if summary["state_hash"]:
        print(f"  state hash {summary['state_hash']}")
    if args.report and written:
        print(f"  report written to {args.report}")
    print(f"  verdict: {summary['verdict']}")


def _render_inspect(report: dict[str, Any], transfer: str | None = None, start: int = 1) -> None:
    if transfer is not None and not report["records"] and not report["problem"]:
        since = f" at or after LSN {start}" if start > 1 else ""
        print(f"no record of transfer {transfer!r}{since}: no such id, or it is still in flight")
    for row in report["records"]:
        lsn, kind = f"{row['lsn']:>10}", row["kind"]
        if kind == "account":
            code = f"  code {row['code']}" if row["code"] else ""
            print(f"{lsn}  account     {row['account']}  {row['currency']}  limit {row['overdraft_limit']}{code}")
        elif kind == "checkpoint":
            held = (f"{row['accounts']} of {row['ledger_accounts']} accounts (those changed, and its sweep's)"
                    if "ledger_accounts" in row and row["accounts"] < row["ledger_accounts"]
                    else f"{row['accounts']} accounts")
            print(f"{lsn}  checkpoint  {held}, {row['pending']} pending transfers open")
        elif kind == "expiry":
            print(f"{lsn}  expiry      {', '.join(row['pending_ids'])}")
        elif row.get("linked"):
            tail = f"  refused: leg {row['index']}: {row['code']}" if kind == "reject" else ""
            print(f"{lsn}  {kind:<10}  linked chain of {len(row['legs'])}{tail}")
            for leg in row["legs"]:
                print(f"{'':>10}    {_leg_line(leg)}")
        else:
            tail = f"  refused: {row['code']}" if kind == "reject" else ""
            print(f"{lsn}  {kind:<10}  {_leg_line(row)}{tail}")
    if report["problem"]:
        print(f"stopped: {report['problem']}")


def _leg_line(leg: dict[str, Any]) -> str:
    """One transfer (or request) of an inspect row."""
    kind = leg["type"]
    if leg["source"] is None:  # a refused post or void: its pending transfer is named only
        amount = "all" if leg["amount"] is None else leg["amount"]
        return f"{leg['transfer']}  {kind} of {leg['pending_id']}  {amount}"
    line = f"{leg['transfer']}  {leg['source']} -> {leg['destination']}  {leg['amount']}"
    if kind != "single":
        line += f"  ({kind}{' of ' + leg['pending_id'] if leg.get('pending_id') else ''})"
    return line


def _render_history(report: dict[str, Any]) -> None:
    print(f"{report['account']} ({report['currency']}), {report['entries_total']} entries; the latest, in seq order:")
    width = max([24, *(len(entry["transfer"]) for entry in report["entries"])])  # the ids in one column
    for entry in report["entries"]:
        print(f"  seq {entry['seq']:>6}  LSN {entry['lsn']:>8}  {entry['transfer']:<{width}} {entry['amount']:>14}  "
              f"balance {entry['balance']}")
    print("latest transfers, newest first:")
    width = max([24, *(len(made["id"]) for made in report["transfers"])])
    for made in report["transfers"]:
        print(f"  LSN {made['lsn']:>8}  {made['kind']:<7} {made['status']:<7}  {made['id']:<{width}} {made['source']} -> "
              f"{made['destination']}  {made['amount']}")


def _render_replay(report: dict[str, Any]) -> None:
    print(f"replay {report['path']} -> {report['into']}: {report['transfers_replayed']} transfers"
          f" ({report['rejections_not_replayed']} rejections not replayed) in {report['elapsed_s']} s")
    print(f"  original {report['state_hash_original']}")
    print(f"  replayed {report['state_hash_replayed']}")
    print(f"  verdict: {report['verdict']}")


def _render_salvage(report: dict[str, Any]) -> None:
    print(f"salvage {report['path']} -> {report['into']}: {report['verdict']}")
    if report["problem"]:
        print(f"  damage: {report['problem']}")
    if report["anchor_problem"]:
        print(f"  anchor: {report['anchor_problem']}")
    print(f"  records copied: {report['records_copied']}")
    for lost in report["lost"][:50]:
        what = lost.get("transfer") or lost.get("account") or "?"
        print(f"  lost: LSN {lost['lsn']} {what} ({lost['why']})")
    if len(report["lost"]) > 50:
        print(f"  ... and {len(report['lost']) - 50} more (--json lists them all)")


def _emit(args: argparse.Namespace, report: dict[str, Any], render: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render()


_SHARD_TOOLS = frozenset({"verify", "recover", "replay", "inspect", "balance", "history", "tail"})
"""The commands that read or repair one ledger's journal: each shard of a sharded ledger is one."""


def _shards_hint(args: argparse.Namespace, error: LedgerError, argv: list[str]) -> str:
    """For a tool given the directory of a sharded ledger, which holds no journal of its own:
    the same command on a shard's directory (for an account's balance or history, the
    shard its id places it on). `argv`: the command line, whose PATH it replaces."""
    path = getattr(args, "path", None)
    if not isinstance(error, NotALedger) or path is None or args.command not in _SHARD_TOOLS:
        return ""
    from pathlib import Path

    from engine._placement import manifest_shards, shard_of

    try:
        shards = manifest_shards(Path(path))
    except InvalidRequest:  # a manifest, but not one to read a hint from
        return ""
    if shards is None or shards < 1:
        return ""
    account = getattr(args, "account", None)
    try:
        shard = 0 if account is None else shard_of(check_id(account, "account"), shards)
    except InvalidRequest:  # no id a shard could hold: the error said what is wrong
        return ""
    command = [os.path.join(path, f"shard-{shard}") if word == path else word for word in argv]
    which = ("the shard its id places it on; one made with placement=KEY lives on the key's" if account is not None
             else f"each of shard-0 to shard-{shards - 1} in turn")
    shown_command = _UNPRINTABLE.sub(_escaped, shlex.join(command))  # (the words as a shell reads them)
    return (f"; it is a sharded ledger of {shards} shards, each an ordinary ledger: give a shard's directory "
            f"({which}), e.g. `tally {shown_command}`")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    plain = sys.stdout
    if args.command in _SHARD_TOOLS and not getattr(args, "json", False):  # (not serve: its log is uvicorn's)
        sys.stdout = _Escaped(plain)  # type: ignore[assignment]
    try:
        return _run(args)
    except LedgerError as error:
        print(f"tally {args.command}: {error}{_shards_hint(args, error, argv)}", file=sys.stderr)
        from engine._tools import unreadable

        return 1 if isinstance(error, JournalCorrupted) and not unreadable(error) else 2
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        return 0
    except OSError as error:  # e.g. a directory that cannot be made, a report that cannot be written
        print(f"tally {args.command}: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        terminated = isinstance(error, _Terminated)
        print(f"tally {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        sys.stdout = plain


_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
"""Control characters, line and paragraph separators, and the invisible and bidirectional
marks, that an id may hold."""


class _Escaped:
    """The standard output of a text report: each control character in what is printed (an id
    may hold any) is written escaped (a newline as `\\n`), so that no id can forge a line or
    drive the terminal; only the newline `print` ends each line with goes as it is."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, text: str) -> int:
        self._out.write(text if text == "\n" else _UNPRINTABLE.sub(_escaped, text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)


def _escaped(found: re.Match[str]) -> str:
    return repr(found.group())[1:-1]


if __name__ == "__main__":
    sys.exit(main())
