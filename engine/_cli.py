"""The `tally` command line."""

from __future__ import annotations

import argparse
import json
import sys

from coordinator import LedgerError

from engine import __version__


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tally", description="Tally: an embeddable, actor-based, journaled ledger engine."
    )
    parser.add_argument("--version", action="version", version=f"tally {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    stress = commands.add_parser(
        "stress", help="fire concurrent transfers at a ledger and verify the books (default: a temporary ledger)"
    )
    stress.add_argument("--path", help="ledger directory to use (default: a temporary one)")
    stress.add_argument("--accounts", type=_positive, default=1000, help="accounts to open (default 1000)")
    stress.add_argument("--clients", type=_positive, default=16, help="concurrent client threads (default 16)")
    stress.add_argument("--transfers", type=_positive, default=20_000, help="transfers to fire (default 20000)")
    stress.add_argument("--amount-max", type=_positive, default=500, help="largest amount (default 500)")
    stress.add_argument("--seed", type=int, default=1, help="workload seed (default 1)")
    stress.add_argument("--json", action="store_true", help="print the report as JSON")
    return parser


def _stress(args: argparse.Namespace) -> int:
    from engine._stress import run_stress

    if args.accounts < 2:
        raise SystemExit("tally stress: --accounts must be at least 2")
    report = run_stress(args.path, accounts=args.accounts, clients=args.clients, transfers=args.transfers,
                        amount_max=args.amount_max, seed=args.seed)
    rate = report.transfers / report.elapsed_s if report.elapsed_s else 0.0
    summary = {
        "transfers": report.transfers,
        "committed": report.committed,
        "refused": report.refused,
        "elapsed_s": round(report.elapsed_s, 3),
        "transfers_per_s": round(rate, 1),
        "latency_ms": {q: round(report.percentile_ms(v), 3) for q, v in
                       (("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        "checks": report.checks,
        "state_hash": report.state_hash,
        "verdict": "ok" if report.ok else "FAILED",
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"tally stress: {args.clients} clients, {args.accounts} accounts, seed {args.seed}")
        print(f"  {report.transfers} transfers in {report.elapsed_s:.2f} s = {rate:,.0f} durable transfers/s")
        print(f"  committed {report.committed}, refused {sum(report.refused.values())} {report.refused or ''}")
        lat = summary["latency_ms"]
        print(f"  latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  max {lat['max']}")
        for check, passed in report.checks.items():
            print(f"  {'✓' if passed else '✗'} {check}")
        print(f"  state hash {report.state_hash}")
        print(f"  verdict: {summary['verdict']}")
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command is None:
        _parser().print_help()
        return 0
    try:
        return _stress(args)
    except LedgerError as error:
        print(f"tally {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
