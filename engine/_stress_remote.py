"""`tally stress --url`: the stress harness's workload and audit, at a `tally serve` over HTTP.

The workload (`engine._workload`) and the auditor (`engine._auditor`) drive an
`engine._remote.RemoteLedger`, which has the `Ledger` methods they call, through the same
clients, progress and report as a local run (`engine._stress`). The run's accounts and transfer
ids start with a prefix of its own (`rXXXXXXXX-`), so a server holding other books is not
disturbed, and the audit covers the accounts the run opened: their entries, balances and sum
(money is conserved among them, since the run moves money only between them), and every reply
it got, and that no entry is of a transfer the run did not send (a server may move money of
its own accord, or twice for a retry, in moves that balance). Replies outside the HTTP
contract fail the verdict (`CHECK_CONTRACT`), and so does an account the run opened that the
server no longer has (`CHECK_ACCOUNTS`: a server restarted on other books); the report names
those, and the acknowledged transfers gone. Nothing is closed or reopened: the server's state
hash is not read.

A server that answers nothing for `SERVER_GONE_S` (stopped, killed) stops the clients
(`Silence`): firing on would only count requests no one answered. What told no outcome is sent
again as in any run (a server restarted meanwhile answers), then the audit reads the server; if
it answers no read, the audit is not run and the report says what the run was told before the
server went away. Either way the verdict fails (`CHECK_ANSWERING`): the server was not proven.

A run needs httpx (through `engine._remote`: the `serve` extra); the option checks do not.
"""

from __future__ import annotations

import argparse
import secrets
import threading
import time

from coordinator import AccountNotFound, InvalidRequest

from engine._auditor import CHECK_OUTCOMES, CHECK_PRESENT, audit_replies
from engine._sending import Recorded, learn_outcomes
from engine._stress import StressConfig, StressReport, await_expiries, fire, open_accounts
from engine._workload import Picker

CHECK_CONTRACT = "every reply kept the HTTP contract (JSON, a status fitting its code, replays marked)"
CHECK_ACCOUNTS = "every account the run opened is on the server"
CHECK_ANSWERING = "the server answered throughout the run and its audit"
CHECK_UNAUDITED = "the server's books hold what the run was told (not audited: the server answered no read)"
SERVER_GONE_S = 5.0
"""How long the clients go on while every request they send goes unanswered (no connection, or
none answered), before they stop: longer than a request's own wait for a connection, shorter
than a run a dead server would otherwise waste."""
GONE_NAMED_MAX = 20
"""Accounts, and acknowledged transfers, the server no longer has that the report names (all are counted)."""
RUN_PREFIX_BYTES = 4
"""Random bytes in a run's prefix (8 hex digits): its ids collide with another run's one time
in 4 billion."""


def run_remote_stress(config: StressConfig, token: str | None = None, progress: bool = True) -> StressReport:
    """Run the workload at the `tally serve` at `config.url` and audit what the run made; blocks
    until both are done. Nothing is closed or reopened: the server's state hash is not read.

    Raises `engine._remote_replies.ServerUnreachable` (or `UnexpectedReply`, e.g. a 401) if the server
    does not answer the first read as its contract says, or if it goes away while the run opens
    its accounts; a fault met later fails the verdict, a server gone too (see the module docstring).
    """
    from engine._remote_replies import ServerUnreachable
    from engine._remote import REMOTE_CONNECTIONS_DEFAULT, RemoteLedger  # httpx: only when a run starts

    assert config.url is not None and config.batch == 1
    run = f"r{secrets.token_hex(RUN_PREFIX_BYTES)}"
    report = StressReport(config)
    names = [f"{run}-acct-{n:06d}" for n in range(config.accounts)]
    picker = Picker(names, config.mix)
    with RemoteLedger(config.url, token=token, connections=max(config.clients, REMOTE_CONNECTIONS_DEFAULT)) as ledger:
        try:
            ledger.account(f"{run}-bank")  # before the run: is it there, does it take the token?
        except AccountNotFound:
            pass
        funded = open_accounts(ledger, names, config, bank=f"{run}-bank", checked=False)  # (its ids are its own)
        silence = Silence(ledger.url)
        replies = fire(ledger, picker, config, report, progress, run, watch=silence)
        learn_outcomes(ledger, replies)  # a reply lost (a server restarted, say): the same id again tells it
        report.resent = (replies.resent, len(replies.unknown))
        gone: list[str] = []
        try:
            await_expiries(ledger, replies)
            report.checks = audit_replies(ledger, replies, sent=ledger.sent(), funded=funded)
            report.checks[CHECK_ACCOUNTS] = not ledger.accounts_gone
            gone = [] if report.checks[CHECK_PRESENT] else sorted(
                tid for tid in replies.acknowledged if ledger.get_transfer(tid) is None)
            report.checks[CHECK_ANSWERING] = report.stopped is None
        except ServerUnreachable as error:  # it went away (or stayed away): what the run was told, unaudited
            report.checks = {CHECK_ANSWERING: False, CHECK_OUTCOMES: not replies.unknown, CHECK_UNAUDITED: None}
            unaudited = (f"what the server acknowledged before it went away ({report.acknowledged:,} transfers) was"
                         f" not audited: it answered no read ({error})")
            report.stopped = unaudited if report.stopped is None else f"{report.stopped}; {unaudited}"
        report.checks[CHECK_CONTRACT] = not ledger.fault_count
        report.remote = {"url": ledger.url, "run_prefix": run, "faults": ledger.faults,
                         "fault_count": ledger.fault_count, "accounts_gone": ledger.accounts_gone[:GONE_NAMED_MAX],
                         "accounts_gone_count": len(ledger.accounts_gone), "transfers_gone": gone[:GONE_NAMED_MAX],
                         "transfers_gone_count": len(gone)}
    return report


class Silence:
    """`fire`'s watch at a server: once every request sent for `SERVER_GONE_S` went unanswered
    (no reply of any kind since the first of them), it says the server is gone and the clients
    stop. Called by each client thread after each request (under a lock of its own); never blocks."""

    def __init__(self, url: str) -> None:
        self._url = url
        self._lock = threading.Lock()
        self._since: float | None = None
        """When the first request went unanswered that no answer has followed; None: answered."""

    def __call__(self, recorded: Recorded) -> str | None:
        now = time.monotonic()
        with self._lock:
            if recorded.told or recorded.untold:
                self._since = None
            elif recorded.unanswered and self._since is None:
                self._since = now
            elif self._since is not None and now - self._since >= SERVER_GONE_S:
                return (f"the server at {self._url} answered no request for {SERVER_GONE_S:g} s (stopped, or"
                        f" unreachable)")
        return None


def refuse_remote_misfits(args: argparse.Namespace) -> None:
    """The options `--url` cannot honour, refused before anything is sent; `--token-file` without it."""
    if args.url is None:
        if args.token_file is not None:
            raise InvalidRequest("--token-file goes with --url (the token of the server it drives)")
        return
    misfits = {"--chaos": "it kills the engine's process, and a server's is not ours to kill (SIGKILL the server"
                          " and restart it yourself)",
               "--kills": "it goes with --chaos",
               "--path": "the ledger is the server's",
               "--batch": "the HTTP API has no batch route: every transfer is a request of its own"}
    given = {"--chaos": args.chaos, "--kills": args.kills is not None, "--path": args.path is not None,
             "--batch": args.batch != 1}
    for option, reason in misfits.items():
        if given[option]:
            raise InvalidRequest(f"{option} cannot be used with --url: {reason}")


def read_token(path: str | None) -> str | None:
    """The bearer token in `path` (surrounding whitespace dropped), or None; by the rules
    `tally serve --token-file` reads its own by."""
    from engine._serve import read_token as read

    return None if path is None else read(path)
