"""The `tally` command line: `main`, and the runners of the commands that read or repair one ledger.

Every command prints a report for people, or with `--json` for machines. An
error is one line on stderr (no traceback) and a non-zero exit: 1 when the
ledger is not whole (or a check failed), 2 when the command could not run.
This module parses the command line with `engine._cli_parse` (the parser and its argument
types), runs the command (`_run`; `tally stress` in `engine._cli_stress`, `tally serve` in
`engine._serve`) on the offline tools (`engine._tools_audit`, `engine._tools_salvage`,
`engine._tools_copy`, `engine._tools_read`), and prints the report through `engine._cli_render`; the text it prints
is escaped (`engine._cli_render.printable`: a report's lines through `engine._cli_output.Escaped`, an error's
one line on stderr too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from coordinator import (CHECK_FILE, CHECK_RECORDS, AccountNotFound, InvalidRequest, JournalCorrupted, LedgerError,
                         NotALedger, check_id)

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
from engine._cli_output import Escaped, OneLineLog, drop_unwritten_output, give_back_output, unfailing_output
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
    the flag's handler points the output at the null device (`drop_unwritten_output`), and the
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
            dropped.extend(drop_unwritten_output())

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
                give_back_output(dropped[0])
    if interrupted and not args.follow:
        raise KeyboardInterrupt
    return 0


def _recover(args: argparse.Namespace) -> int:
    from engine import _tools_audit, _tools_salvage

    if args.salvage:
        if not args.into:
            print("tally recover: --salvage needs --into NEW", file=sys.stderr)
            return 2
        if args.dry_run:
            print("tally recover: --dry-run does not go with --salvage, which writes a new ledger into NEW and "
                  f"never changes {args.path}; `tally verify {args.path}` says where its damage starts", file=sys.stderr)
            return 2
        with _progress("salvaging", not args.json) as progress:
            report = _tools_salvage.salvage(args.path, args.into, progress)
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
        elif report.get("index_damaged") and report["checks"].get(CHECK_RECORDS) and report["corrupt_lsn"] is None:
            # (every record replayed and verified: only the indexes are damaged)
            print(f"  an index is damaged (the problem above): nothing was changed. `tally recover {args.path}"
                  " --salvage --into NEW` copies every record into a new ledger, its indexes made anew from them")
        elif report.get("salvage_reads_around"):  # (not opened for damage in its pages)
            print("  the journal could not be opened (the problem above): nothing was changed. Restore the ledger"
                  f" from a backup, or `tally recover {args.path} --salvage --into NEW` copies the records it can"
                  " still read, around the damaged pages, up to the first one lost (README.md, \"Damage\")")
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
    with unfailing_output():
        return _main(argv)


def _main(argv: list[str]) -> int:
    args = command_parser().parse_args(argv)
    if args.command is None:  # a usage error, as argparse's own: what the commands are, on stderr
        command_parser().print_help(sys.stderr)
        return 2
    plain = sys.stdout
    if args.command in _SHARD_TOOLS and not getattr(args, "json", False):  # (not serve: its log is uvicorn's)
        sys.stdout = Escaped(plain)  # type: ignore[assignment]
    said = OneLineLog(args.command)
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




if __name__ == "__main__":
    sys.exit(main())
