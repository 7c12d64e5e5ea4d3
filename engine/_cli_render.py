"""The renderers of the `tally` commands' reports: each prints, for people, the dict a command
returns (`emit` prints it as JSON instead with `--json`).

The reports come from the offline tools (`engine._tools_audit`, `engine._tools_salvage`,
`engine._tools_copy`, `engine._tools_read`) and from `tally stress` (`engine._cli_stress`); `engine._cli` runs the
commands and calls these, and escapes what they print. Times are shown here as ISO 8601
(`shown_instant`), which `--at` reads back (`engine._cli_parse`, `_instant`).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any


UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
"""Control characters, line and paragraph separators, and the invisible and bidirectional
marks, that an id or a path may hold."""


def printable(text: str) -> str:
    """`text` with each of its `UNPRINTABLE` characters written escaped (a newline as `\\n`):
    what the `tally` commands print for people (a report, an error's one line) is one line a
    line, and drives no terminal, whatever an id or a path holds."""
    return UNPRINTABLE.sub(lambda found: repr(found.group())[1:-1], text)


def said_at(message: str, at: int, account: str, unknown: bool) -> str:
    """The API's refusal of a balance at a time, as `--at` put it: its times in ISO 8601
    rather than nanoseconds, the flag's name rather than the argument's."""
    named = repr(account)  # the account's id, kept as it is even if it looks like a timestamp
    message = named.join(re.sub(r"\b\d{18,21}\b", _shown_if_instant, part) for part in message.split(named))
    given = shown_instant(at) if at else "1970-01-01T00:00:00Z"  # a time given, never "no timestamp"
    message = message.replace(f"at_timestamp {shown_instant(at)}", f"--at {given}")
    return f"account {account!r} did not exist yet at {given} ({message})" if unknown else message


_LAST_INSTANT_NS = 253_402_300_799_999_999_999
"""The last nanosecond of the year 9999: the latest time `--at` reads (and ISO 8601 shows)."""


def _shown_if_instant(found: re.Match[str]) -> str:
    """A number of 18 to 21 digits in a refusal, a time from 1973 on (as `--at` gives it, up
    to the year 9999), shown in ISO 8601; a larger one as it is."""
    value = int(found.group())
    return shown_instant(value) if value <= _LAST_INSTANT_NS else found.group()


def shown_instant(timestamp: int) -> str:
    """Nanoseconds since the epoch as an ISO 8601 UTC time, to the nanosecond (which `--at`
    reads back: a time cut to the microsecond would come before the record it names)."""
    if not timestamp:
        return "no timestamp"
    seconds, nanoseconds = divmod(timestamp, 1_000_000_000)
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(seconds=seconds)
    return moment.strftime("%Y-%m-%dT%H:%M:%S") + (f".{nanoseconds:09d}" if nanoseconds else "") + "Z"


CHECK_MARKS = ("✓", "✗", "·")
"""How a report marks a check passed, failed, and not made."""
CHECK_MARKS_ASCII = ("ok  ", "FAIL", "-   ")
"""The same, on an output whose encoding has no ✓ or ✗ (ASCII, Latin-1)."""


def _check_marks() -> tuple[str, str, str]:
    """`CHECK_MARKS`, or `CHECK_MARKS_ASCII` where standard output cannot encode them."""
    try:
        "".join(CHECK_MARKS).encode(getattr(sys.stdout, "encoding", None) or "utf-8")
    except (UnicodeEncodeError, LookupError):
        return CHECK_MARKS_ASCII
    return CHECK_MARKS


def noun_for(count: int, noun: str, plural: str | None = None) -> str:
    """`noun` as it agrees with `count`: "entry" for 1, else `plural` ("entries"; by default
    `noun` and an s)."""
    return noun if count == 1 else plural or f"{noun}s"


def _print_checks(report: dict[str, Any]) -> None:
    passed_mark, failed_mark, unmade_mark = _check_marks()
    for check, passed in report["checks"].items():
        mark = passed_mark if passed else (failed_mark if passed is False else unmade_mark)
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


def render_audit(title: str, report: dict[str, Any]) -> None:
    print(f"{title} {report['path']}")
    lock_file = damaged_lock_file(report)
    if lock_file is not None and report["last_lsn"] is None:
        print(f"  the journal was not opened: its lock file {lock_file} is no regular file (the data file was not read)")
    elif report["last_lsn"] is None:
        print("  the journal could not be read: its data file is damaged")
    elif report["records_scanned"] is None:
        print(f"  last LSN {report['last_lsn']}; the books were not rebuilt: the audit stopped at the damage below")
    else:
        print(f"  records scanned {report['records_scanned']}, last LSN {report['last_lsn']}, accounts {report['accounts']}")
        print(f"  transfers: committed {report['transfers_committed']}, rejected {report['transfers_rejected']}")
    if lock_file is not None and report["last_lsn"] is not None:  # (verify takes no lock: the journal was read)
        print(f"  its lock file {lock_file} is no regular file: every open refuses this directory until it is removed")
    _print_chain(report)
    _print_checks(report)
    if report["problem"]:
        print(f"  problem: {report['problem']}")
    state_hash = report["state_hash"] or "none (the books were not rebuilt: see above)"
    print(f"  elapsed {report['elapsed_s']} s, state hash {state_hash}")
    print(f"  verdict: {report['verdict']}")


def damaged_lock_file(report: dict[str, Any]) -> str | None:
    """The lock file (the directory's, or LMDB's) whose damage kept an audit's journal from
    opening, if that is what did: it holds no history (locks, and LMDB's table of readers),
    and with no process using the ledger removing it mends the ledger."""
    from journal import LMDB_LOCK_FILE, LOCK_FILE

    damaged = report.get("damaged")
    return damaged if damaged is not None and os.path.basename(damaged) in (LOCK_FILE, LMDB_LOCK_FILE) else None


def subject_of(row: dict[str, Any]) -> str:
    """What a record of `tally inspect`'s rows is about, in a few words."""
    if row.get("transfer") or row.get("account"):
        return str(row.get("transfer") or row.get("account"))
    if "legs" in row:
        return f"of a linked chain of {len(row['legs'])} ({row['legs'][0]['transfer']}, ...)"
    if "pending_ids" in row:
        count = len(row["pending_ids"])
        return f"of {count} pending {noun_for(count, 'transfer')}"
    return f"of {row['accounts']} {noun_for(row['accounts'], 'account')}"


def render_stress(summary: dict[str, Any], args: argparse.Namespace, written: bool = True) -> None:
    config = summary["config"]
    shape = "" if "chaos" in summary else f", batch {config['batch']}, retry rate {config['retry_rate']}"
    if config["pending_rate"] or config["linked_rate"]:
        shape += f", pending rate {config['pending_rate']}, linked rate {config['linked_rate']}"
    print(f"tally stress: {config['clients']} clients, {config['accounts']} accounts, mix {config['mix']}{shape},"
          f" seed {config['seed']}")
    sent, unanswered, acknowledged = (summary["transfers_sent"], summary["transfers_unanswered"],
                                      summary["transfers_acknowledged"])
    counted = f" ({acknowledged:,} acknowledged)" if acknowledged != sent else ""
    print(f"  {sent:,} {noun_for(sent, 'transfer')}{counted} in {summary['elapsed_s']} s ="
          f" {summary['transfers_per_s']:,.0f} acknowledged transfers/s (committed, or refused for good)")
    if sent - unanswered - acknowledged:
        print(f"  answered without an outcome (a timeout, the ledger unavailable, the server overloaded):"
              f" {sent - unanswered - acknowledged:,}, not in the rate")
    if unanswered:
        print(f"  no answer (server unreachable): {unanswered:,}, in neither the rate nor the latencies")
    if summary.get("stopped"):
        print(f"  {summary['stopped']}")
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
    elif resent and resent["still_unknown"]:
        print(f"  not sent again (see above), so still unknown: {resent['still_unknown']:,}")
    if "chaos" in summary:
        chaos = summary["chaos"]
        print(f"  chaos: {chaos['kills']} {noun_for(chaos['kills'], 'kill')}, survived {chaos['kills_survived']},"
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


def render_inspect(report: dict[str, Any], transfer: str | None = None, start: int = 1,
                   account: str | None = None) -> None:
    if transfer is not None and not report["records"] and not report["problem"]:
        at = report["transfer_lsn"]  # (a transfer with no record at all is refused: `engine._cli`)
        if at < start:
            print(f"no record of transfer {transfer!r} at or after LSN {start}: its record is at LSN {at}")
        else:
            print(f"no record of transfer {transfer!r} touching account {account!r}: its record, at LSN {at}, names"
                  " other accounts")
    for row in report["records"]:
        lsn, kind = f"{row['lsn']:>10}", row["kind"]
        if kind == "account":
            code = f"  code {row['code']}" if row["code"] else ""
            print(f"{lsn}  account     {row['account']}  {row['currency']}  limit {row['overdraft_limit']}{code}")
        elif kind == "checkpoint":
            held = (f"{row['accounts']} of {row['ledger_accounts']} accounts (those changed, and its sweep's)"
                    if "ledger_accounts" in row and row["accounts"] < row["ledger_accounts"]
                    else f"{row['accounts']} {noun_for(row['accounts'], 'account')}")
            pending = (f"{row['pending']} of {row['ledger_pending']} open pending transfers (those opened since, and "
                       "its sweep's)" if "ledger_pending" in row and row["pending"] < row["ledger_pending"]
                       else f"{row['pending']} pending {noun_for(row['pending'], 'transfer')} open")
            print(f"{lsn}  checkpoint  {held}, {pending}")
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


def render_history(report: dict[str, Any]) -> None:
    total = report["entries_total"]
    print(f"{report['account']} ({report['currency']}), {total} {noun_for(total, 'entry', 'entries')}; the latest,"
          " in seq order:")
    width = max([24, *(len(entry["transfer"]) for entry in report["entries"])])  # the ids in one column
    for entry in report["entries"]:
        print(f"  seq {entry['seq']:>6}  LSN {entry['lsn']:>8}  {entry['transfer']:<{width}} {entry['amount']:>14}  "
              f"balance {entry['balance']}")
    print("latest transfers, newest first:")
    width = max([24, *(len(made["id"]) for made in report["transfers"])])
    for made in report["transfers"]:
        print(f"  LSN {made['lsn']:>8}  {made['kind']:<7} {made['status']:<7}  {made['id']:<{width}} {made['source']} -> "
              f"{made['destination']}  {made['amount']}")


def render_replay(report: dict[str, Any]) -> None:
    replayed, rejections = report["transfers_replayed"], report["rejections_not_replayed"]
    print(f"replay {report['path']} -> {report['into']}: {replayed} {noun_for(replayed, 'transfer')}"
          f" ({rejections} {noun_for(rejections, 'rejection')} not replayed) in {report['elapsed_s']} s")
    print(f"  original {report['state_hash_original']}")
    print(f"  replayed {report['state_hash_replayed']}")
    print(f"  verdict: {report['verdict']}")


def render_salvage(report: dict[str, Any]) -> None:
    print(f"salvage {report['path']} -> {report['into']}: {report['verdict']}")
    if report["problem"]:
        print(f"  damage: {report['problem']}")
    if report["anchor_problem"]:
        print(f"  anchor: {report['anchor_problem']}")
    for page in report["damaged_pages"]:
        if page != report["problem"]:
            print(f"  also gone around: {page}")
    if report["history_unchecked"]:
        print(f"  unchecked: {report['history_unchecked']}")
    print(f"  records copied: {report['records_copied']}")
    for lost in report["lost"][:50]:
        what = lost.get("transfer") or lost.get("account") or "?"
        lsns = f"LSN {lost['lsn']}" + (f" to {lost['through_lsn']}" if "through_lsn" in lost else "")
        print(f"  lost: {lsns} {what} ({lost['why']})")
    if len(report["lost"]) > 50:
        print(f"  ... and {len(report['lost']) - 50} more (--json lists them all)")


def emit(args: argparse.Namespace, report: dict[str, Any], render: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        render()
