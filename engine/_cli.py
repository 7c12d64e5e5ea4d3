"""The `tally` command line: `main`, and the runners of the commands that read or repair one ledger.

Every command prints a report for people, or with `--json` for machines. An
error is one line on stderr (no traceback) and a non-zero exit: 1 when the
ledger is not whole (or a check failed), 2 when the command could not run.
This module parses the command line with `engine._cli_parse` (the parser and its argument
types), runs the command (`_run`; `tally stress` in `engine._cli_stress`, `tally serve` in
`engine._serve`) on the offline tools (`engine._tools_audit`, `engine._tools_copy`,
`engine._tools_read`), and prints the report through `engine._cli_render`; the text it prints
is escaped (`engine._cli_render.printable`: a report's lines through `_Escaped`, an error's
one line on stderr too).
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shlex
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from coordinator import CHECK_FILE, AccountNotFound, InvalidRequest, JournalCorrupted, LedgerError, NotALedger, check_id

from engine._cli_parse import command_parser
from engine._cli_render import (
    damaged_lock_file,
    emit,
    noun_for,
    printable,
    render_audit,
    render_history,
    render_inspect,
    render_replay,
    render_salvage,
    said_at,
    shown_instant,
    subject_of,
)
from engine._cli_stress import Terminated, stress_command


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


def _run(args: argparse.Namespace) -> int:
    from engine import _tools_audit, _tools_copy, _tools_read

    if args.command == "stress":
        return stress_command(args)
    if args.command == "serve":
        from engine._serve import run_command

        return run_command(args)
    if args.command == "verify":
        with _progress("verifying", not args.json) as progress:
            report = _tools_audit.verify(args.path, progress, args.expect_head)
        emit(args, report, lambda: render_audit("verify", report))
        return 0 if report["verdict"] == "whole" else 1
    if args.command == "recover":
        return _recover(args)
    if args.command == "replay":
        with _progress("replaying", not args.json) as progress:
            report = _tools_copy.replay(args.path, args.into, progress)
        emit(args, report, lambda: render_replay(report))
        return 0 if report["verdict"] == "identical" else 1
    if args.command == "inspect":
        report = _tools_read.inspect(args.path, args.start, args.limit, args.transfer, args.account)
        if args.transfer is not None and report["transfer_lsn"] is None and not report["problem"]:
            print(printable(f"tally inspect: no record of transfer {args.transfer!r} in {args.path}: no such id, or it"
                            " is still in flight"), file=sys.stderr)  # (as balance and history refuse an account)
            return 2
        emit(args, report, lambda: render_inspect(report, args.transfer, args.start, args.account))
        return 1 if report["problem"] else 0
    if args.command == "tail":
        return _tail(args)
    if args.command == "balance":
        try:
            report = _tools_read.balance(args.path, args.account, args.at_lsn, args.at)
        except (InvalidRequest, AccountNotFound) as error:
            opened_later = type(error) is AccountNotFound and "was opened at LSN" in str(error)
            if args.at is None and type(error) is InvalidRequest and args.at_lsn is not None:
                raise InvalidRequest(str(error).replace(f"at_lsn {args.at_lsn} ", f"--at-lsn {args.at_lsn} ", 1)) from error
            if args.at is None or (type(error) is AccountNotFound and not opened_later):
                raise
            raise type(error)(said_at(str(error), args.at, args.account, opened_later)) from error
        entries = report.get("entries", 0)  # (none in a balance as of an LSN)
        where = (f" at LSN {report['at_lsn']} ({shown_instant(report['at_timestamp'])})" if "at_lsn" in report else
                 f" ({entries} {noun_for(entries, 'entry', 'entries')}, last LSN {report['last_lsn']})" if entries else
                 " (no entries yet)")
        emit(args, report, lambda: print(
            f"{report['account']}: posted {report['posted']} {report['currency']}, pending {report['pending']}, "
            f"available {report['available']}, incoming {report['incoming']}{where}"))
        return 0
    report = _tools_read.history(args.path, args.account, args.limit)
    emit(args, report, lambda: render_history(report))
    return 0


TAIL_IDLE_S = 0.25
"""How long `tally tail --follow` waits for an event before it looks whether Ctrl-C was pressed."""


def _tail(args: argparse.Namespace) -> int:
    """`tally tail`: one line per event (one JSON object with `--json`), each flushed as it is
    written, for a pipe. Ctrl-C ends it after the line it is writing (or within `TAIL_IDLE_S`
    of waiting): `--follow`, which waits for events until then, quietly with exit 0; without
    it, as every command is interrupted (`KeyboardInterrupt`: "interrupted", exit 130), the
    events printed being only some of those asked for. Ctrl-C only sets a flag here: raised
    as an exception wherever the interpreter happened to be, it could land inside a lock's
    acquire or release and leave the lock held, and closing the ledger would then wait for it
    forever. A write a reader leaves blocked (a full pipe nobody reads) is not retried forever:
    the flag's handler points the output at the null device (`_drop_unwritten_output`), and the
    write it interrupted ends there; what is still buffered is flushed there too, and the
    output is given back before return (a program calling `main` keeps its own)."""
    from engine import Ledger
    from engine._follow import event_line
    from engine._json import jsonable

    interrupted: list[bool] = []
    dropped: list[int] = []  # the output's own file, duplicated, while it points at the null device

    def on_interrupt(_signal: int, _frame: Any) -> None:
        interrupted.append(True)
        if not dropped:
            dropped.extend(_drop_unwritten_output())

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGINT, on_interrupt)
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
        interrupted.append(True)
    finally:
        try:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        finally:  # (also if the handler given back raises at once: a second Ctrl-C)
            if dropped:
                _give_back_output(dropped[0])
    if interrupted and not args.follow:
        raise KeyboardInterrupt
    return 0


def _drop_unwritten_output() -> list[int]:
    """Point this process's standard output, if it is a pipe or a socket, at the null device,
    once `tally tail` is interrupted: a write blocked on a reader that reads no more (a full
    pipe), retried when the signal's handler returns, then ends, rather than waiting forever.
    What was not yet written is dropped (the output stops short either way); a terminal or a
    file, whose writes end, keeps it. Standard output replaced in this process (a test
    capturing it) is left as it is. Returns a duplicate of the output's own file, for
    `_give_back_output` (none: left as it was)."""
    stream = sys.__stdout__
    if stream is None or (sys.stdout._out if isinstance(sys.stdout, _Escaped) else sys.stdout) is not stream:
        return []
    try:
        fd = stream.fileno()
        mode = os.fstat(fd).st_mode
        if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
            return []
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            kept = os.dup(fd)
            try:
                os.dup2(null, fd)
            except OSError:
                os.close(kept)
                raise
        finally:
            os.close(null)
    except (OSError, ValueError):  # closed, or no file descriptor: nothing is blocked on it
        return []
    return [kept]


def _give_back_output(kept: int) -> None:
    """Undo `_drop_unwritten_output` once `tally tail` wrote its last: what is still buffered
    is flushed to the null device (not left for the exit's flush to wait on the pipe), then the
    output is its own file again (a program calling `main` in-process keeps its output)."""
    try:
        sys.__stdout__.flush()  # type: ignore[union-attr]  # (not None: `kept` was duplicated from it)
        os.dup2(kept, sys.__stdout__.fileno())  # type: ignore[union-attr]
    except (OSError, ValueError):  # closed meanwhile: nothing to give back
        pass
    finally:
        os.close(kept)


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
        emit(args, report, lambda: render_salvage(report))
        return 0 if report["whole"] else 1  # NEW holds what was saved; the ledger it came from was not whole
    if args.into:
        print("tally recover: --into NEW goes with --salvage (recover works in place)", file=sys.stderr)
        return 2
    with _progress("recovering", not args.json) as progress:
        report = _tools_audit.recover(args.path, args.dry_run, progress)

    def render() -> None:
        render_audit("recover" + (" (dry run)" if args.dry_run else ""), report)
        last = report.get("last_record")
        if last:
            print(f"  the last durable record: LSN {last['lsn']}, {last['kind']} {subject_of(last)}")
        if report["in_doubt"] is not None:  # (the books were rebuilt: else it read no such figure)
            print("  in doubt: none on disk (reservations are never journaled; a commit record carries both entries);"
                  " transfers in flight at the crash left no record, were never acknowledged, and run afresh if retried")
            print("  aborted by recovery: 0, finished by recovery: 0")
        if report["last_record"] is not None or report["verdict"] == "whole":  # (the checkpoints of whole books only)
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
        elif damaged_lock_file(report) is not None:
            print(f"  nothing was changed. With no process using the ledger, remove it and run `tally recover {args.path}`"
                  " again: the next open makes it anew")
        elif report["verdict"] != "whole" and report["checks"].get(CHECK_FILE) is False and report["last_lsn"] is None:
            print("  the journal could not be read (the problem above): nothing was changed. Restore the ledger from a"
                  " backup (README.md, \"Damage\")")
        elif report["verdict"] != "whole" and report["checks"].get(CHECK_FILE) is False and not report["anchor_missing"]:
            print("  the data file is damaged, or is not the one its anchor names: nothing was changed. Restore the"
                  " ledger from a backup; or, if this file holds the history to keep (a copy that went on elsewhere),"
                  f" remove {args.path}/tally.anchor and run `tally recover {args.path}` (README.md, \"Damage\")")
        elif report["verdict"] != "whole":
            print(f"  the ledger is not whole: nothing was changed. `tally recover {args.path} --salvage --into NEW`"
                  " copies what precedes the damage.")

    emit(args, report, render)
    return 0 if report["verdict"] == "whole" else 1


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
    into = getattr(args, "into", None)  # a copy (replay, salvage): each shard's into a directory of its own
    command = [os.path.join(path, f"shard-{shard}") if word == path else _into_shard(word, into, shard)
               for word in argv]
    which = ("the shard its id places it on; one made with placement=KEY lives on the key's" if account is not None
             else f"each of shard-0 to shard-{shards - 1} in turn"
             + ("" if into is None else f", each into its own directory, {os.path.join(into, 'shard-N')}"))
    shown_command = printable(shlex.join(command))  # (the words as a shell reads them)
    return (f"; it is a sharded ledger of {shards} shards, each an ordinary ledger: give a shard's directory "
            f"({which}), e.g. `tally {shown_command}`")


def _into_shard(word: str, into: str | None, shard: int) -> str:
    """`word` of a command line, with the `--into` directory `into` made the shard's own in it
    (`NEW` or `--into=NEW`, as argparse takes it, an abbreviation too)."""
    if into is None:
        return word
    if word == into:
        return os.path.join(into, f"shard-{shard}")
    option, equals, value = word.partition("=")
    if equals and option.startswith("--") and value == into:
        return f"{option}={os.path.join(into, f'shard-{shard}')}"
    return word


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with _unfailing_output():
        return _main(argv)


def _main(argv: list[str]) -> int:
    args = command_parser().parse_args(argv)
    if args.command is None:  # a usage error, as argparse's own: what the commands are, on stderr
        command_parser().print_help(sys.stderr)
        return 2
    plain = sys.stdout
    if args.command in _SHARD_TOOLS and not getattr(args, "json", False):  # (not serve: its log is uvicorn's)
        sys.stdout = _Escaped(plain)  # type: ignore[assignment]
    said = _OneLineLog(args.command)
    if args.command != "serve":  # (a server's log keeps its tracebacks: a bug there is for its operator to read)
        logging.getLogger("tally").addHandler(said)
    try:
        return _run(args)
    except LedgerError as error:
        print(printable(f"tally {args.command}: {error}{_shards_hint(args, error, argv)}"), file=sys.stderr)
        from engine._tools import unreadable

        return 1 if isinstance(error, JournalCorrupted) and not unreadable(error) else 2
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        return 0
    except OSError as error:  # e.g. a directory that cannot be made, a report that cannot be written
        print(printable(f"tally {args.command}: {error}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt as error:
        terminated = isinstance(error, Terminated)
        print(f"tally {args.command}: {'terminated' if terminated else 'interrupted'}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        sys.stdout = plain
        logging.getLogger("tally").removeHandler(said)


class _OneLineLog(logging.Handler):
    """What the engine logs while a command runs (a journal write that failed, a seal not
    written), as the command's own errors are said: one line on stderr each, `tally COMMAND: `
    and the message, an exception's own message after it and never its traceback (Python's
    last-resort handler printed the traceback of every `logger.exception`, and its
    `lmdb.Error`, to a user who can do nothing with them). Warnings and worse, as that
    handler; what it says is escaped (`printable`)."""

    def __init__(self, command: str) -> None:
        super().__init__(logging.WARNING)
        self._command = command

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            error = record.exc_info[1] if record.exc_info else None
            if error is not None:
                text += f" ({error})" if str(error) else f" ({type(error).__name__})"
            print(printable(f"tally {self._command}: {text}"), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 - logging's rule: a handler that fails says so and goes on
            self.handleError(record)


@contextmanager
def _unfailing_output() -> Iterator[None]:
    """Standard output and error writing a character their encoding cannot (an id, a check's
    mark, on a terminal or a pipe that is not UTF-8: `PYTHONIOENCODING=ascii`, `LC_ALL` of
    Latin-1) as a backslash escape rather than failing: a report is printed after the work is
    done, and an `UnicodeEncodeError` there would turn a whole ledger's exit 0 into a
    traceback and 1. `surrogateescape` (Python's in the C locale, UTF-8 mode off) fails on any
    other character as `strict` does, and is replaced too: no id nor path the tools take holds
    a byte it smuggles. Each stream's own error handling comes back on return."""
    changed: list[tuple[io.TextIOWrapper, str]] = []
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper) and stream.errors in ("strict", "surrogateescape"):
            errors = stream.errors
            stream.reconfigure(errors="backslashreplace")
            changed.append((stream, errors))
    try:
        yield
    finally:
        for stream, errors in changed:
            try:
                stream.reconfigure(errors=errors)
            except (OSError, ValueError):  # closed, or its flush failed (a reader gone): nothing to restore
                pass


class _Escaped:
    """The standard output of a text report: each control character in what is printed (an id
    may hold any) is written escaped (a newline as `\\n`), so that no id can forge a line or
    drive the terminal; only the newline `print` ends each line with goes as it is."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def write(self, text: str) -> int:
        self._out.write(text if text == "\n" else printable(text))
        return len(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._out, name)


if __name__ == "__main__":
    sys.exit(main())
