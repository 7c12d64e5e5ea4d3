"""The runner of `tally stress`: the options checked before a run, the run (in this process,
under `--chaos`, or at a `tally serve` with `--url`), its report and plot, and SIGTERM.

The options are parsed by `engine._cli_parse`; the run is `engine._stress` (`engine._chaos`,
`engine._stress_remote`), the plot `engine._plot`; the summary is rendered by
`engine._cli_render` (`render_stress`). `engine._cli` (`main`) calls `stress_command` and says
`terminated` for a `Terminated`.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from typing import Any

from coordinator import InvalidRequest, NotALedger

from engine._cli_render import emit, render_stress
from engine._workload import RETRY_RATE_DEFAULT


class Terminated(KeyboardInterrupt):
    """SIGTERM during `tally stress`, raised in the main thread as Ctrl-C's interrupt is (the
    engine treats both alike): the run stops, its ledger is closed and a temporary one removed."""


def _terminate(_signal: int, _frame: Any) -> None:
    raise Terminated


def stress_command(args: argparse.Namespace) -> int:
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
    emit(args, summary, lambda: render_stress(summary, args, written=unwritten is None))
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
