"""The `tally` command line: the stress harness, the recovery tool, and read-only views.

Every command prints a report for people, or with `--json` for machines. An
error is one line on stderr (no traceback) and a non-zero exit: 1 when the
ledger is not whole (or a check failed), 2 when the command could not run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from coordinator import LedgerError

from engine import __version__


def _count(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is below the minimum of {minimum}")
        return value

    return parse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Tally: an embeddable, actor-based, journaled ledger engine.")
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str, path: bool = True) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        if path:
            sub.add_argument("path", metavar="PATH", help="the ledger directory")
        sub.add_argument("--json", action="store_true", help="print the report as JSON")
        return sub

    stress = command("stress", "fire concurrent transfers at a ledger and verify the books", path=False)
    stress.add_argument("--path", help="ledger directory to use (default: a temporary one)")
    stress.add_argument("--accounts", type=_count(2), default=1000, help="accounts to open (default 1000)")
    stress.add_argument("--clients", type=_count(1), default=16, help="concurrent client threads (default 16)")
    stress.add_argument("--transfers", type=_count(1), default=20_000, help="transfers to fire (default 20000)")
    stress.add_argument("--amount-max", type=_count(1), default=500, help="largest amount (default 500)")
    stress.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")

    command("verify", "read-only audit of every journal record and every invariant; never writes")
    recover = command("recover", "after a crash: verify, rebuild, resolve, checkpoint, and report")
    recover.add_argument("--dry-run", action="store_true", help="change nothing; say what would be done")
    recover.add_argument("--salvage", action="store_true", help="copy the verifiable records before the first corrupt one")
    recover.add_argument("--into", metavar="NEW", help="with --salvage: the new ledger directory")
    replay = command("replay", "replay the journal into a fresh ledger through the engine and compare state hashes")
    replay.add_argument("--into", metavar="NEW", required=True, help="a new, empty ledger directory")
    inspect = command("inspect", "the journal as readable lines")
    inspect.add_argument("--from", dest="start", type=_count(1), default=1, metavar="LSN", help="first LSN to show")
    inspect.add_argument("--limit", type=_count(1), default=None, metavar="N", help="show at most N records")
    inspect.add_argument("--transfer", metavar="ID", help="only records of this transfer")
    inspect.add_argument("--account", metavar="ID", help="only records touching this account")
    balance = command("balance", "an account's posted balance, read-only")
    balance.add_argument("account", metavar="ACCOUNT")
    history = command("history", "an account's latest entries, read-only")
    history.add_argument("account", metavar="ACCOUNT")
    history.add_argument("--limit", type=_count(1), default=20, metavar="N", help="latest N entries (default 20)")
    return parser


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


def _render_audit(title: str, report: dict[str, Any]) -> None:
    print(f"{title} {report['path']}")
    print(f"  records scanned {report['records_scanned']}, last LSN {report['last_lsn']}, accounts {report['accounts']}")
    print(f"  transfers: committed {report['transfers_committed']}, rejected {report['transfers_rejected']}")
    _print_checks(report)
    if report["problem"]:
        print(f"  problem: {report['problem']}")
    print(f"  elapsed {report['elapsed_s']} s, state hash {report['state_hash']}")
    print(f"  verdict: {report['verdict']}")


def _run(args: argparse.Namespace) -> int:
    from engine import _tools

    if args.command == "stress":
        from engine._stress import main as stress_main

        return stress_main(args)
    if args.command == "verify":
        with _progress("verifying", not args.json) as progress:
            report = _tools.verify(args.path, progress)
        _emit(args, report, lambda: _render_audit("verify", report))
        return 0 if report["verdict"] == "whole" else 1
    if args.command == "recover":
        return _recover(args)
    if args.command == "replay":
        with _progress("replaying", not args.json) as progress:
            report = _tools.replay(args.path, args.into, progress)
        _emit(args, report, lambda: print(
            f"replay {report['path']} -> {report['into']}: {report['transfers_replayed']} transfers"
            f" ({report['rejections_not_replayed']} rejections not replayed) in {report['elapsed_s']} s\n"
            f"  original {report['state_hash_original']}\n  replayed {report['state_hash_replayed']}\n"
            f"  verdict: {report['verdict']}"))
        return 0 if report["verdict"] == "identical" else 1
    if args.command == "inspect":
        report = _tools.inspect(args.path, args.start, args.limit, args.transfer, args.account)
        _emit(args, report, lambda: _render_inspect(report))
        return 1 if report["problem"] else 0
    if args.command == "balance":
        report = _tools.balance(args.path, args.account)
        _emit(args, report, lambda: print(
            f"{report['account']}: posted {report['posted']} {report['currency']}"
            f" ({report['entries']} entries, last LSN {report['last_lsn']})"))
        return 0
    report = _tools.history(args.path, args.account, args.limit)
    _emit(args, report, lambda: _render_history(report))
    return 0


def _recover(args: argparse.Namespace) -> int:
    from engine import _tools

    if args.salvage:
        if not args.into:
            raise SystemExit("tally recover: --salvage needs --into NEW")
        with _progress("salvaging", not args.json) as progress:
            report = _tools.salvage(args.path, args.into, progress)
        _emit(args, report, lambda: _render_salvage(report))
        return 0
    with _progress("recovering", not args.json) as progress:
        report = _tools.recover(args.path, args.dry_run, progress)

    def render() -> None:
        _render_audit("recover" + (" (dry run)" if args.dry_run else ""), report)
        print(f"  in doubt: none on disk (holds are never journaled; a commit record carries both entries)")
        print(f"  aborted by recovery: 0, finished by recovery: 0")
        print(f"  records past the newest checkpoint (LSN {report['checkpoint_lsn']}): {report['replayed_past_checkpoint']}")
        if "checkpoint_written_at" in report:
            print(f"  wrote a checkpoint at LSN {report['checkpoint_written_at']}: the next open replays nothing")
        if "would_write_checkpoint_at" in report:
            print(f"  would write a checkpoint at LSN {report['would_write_checkpoint_at']}")
        if report["verdict"] != "whole":
            print(f"  the ledger is not whole: nothing was changed. `tally recover {args.path} --salvage --into NEW`"
                  " copies what precedes the damage.")

    _emit(args, report, render)
    return 0 if report["verdict"] == "whole" else 1


def _render_inspect(report: dict[str, Any]) -> None:
    for row in report["records"]:
        if row["kind"] == "account":
            print(f"{row['lsn']:>10}  account     {row['account']}  {row['currency']}  limit {row['overdraft_limit']}")
        elif row["kind"] == "checkpoint":
            print(f"{row['lsn']:>10}  checkpoint  {row['accounts']} accounts")
        else:
            tail = f"  refused: {row['code']}" if row["kind"] == "reject" else ""
            print(f"{row['lsn']:>10}  {row['kind']:<10}  {row['transfer']}  {row['source']} -> {row['destination']}"
                  f"  {row['amount']}{tail}")
    if report["problem"]:
        print(f"stopped: {report['problem']}")


def _render_history(report: dict[str, Any]) -> None:
    print(f"{report['account']} ({report['currency']}), {report['entries_total']} entries; latest:")
    for entry in report["entries"]:
        print(f"  seq {entry['seq']:>6}  LSN {entry['lsn']:>8}  {entry['transfer']:<24} {entry['amount']:>14}  balance {entry['balance']}")


def _render_salvage(report: dict[str, Any]) -> None:
    print(f"salvage {report['path']} -> {report['into']}: {report['verdict']}")
    if report["problem"]:
        print(f"  damage: {report['problem']}")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        return _run(args)
    except LedgerError as error:
        print(f"tally {args.command}: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (| head): nothing left to say
        return 0
    except KeyboardInterrupt:
        print(f"tally {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
